"""Torch twin of the batch-invariant matmul (cir_kernels/batch_invariant_triton.py): the CPU path of
`cir_kernels.batch_invariant`.

    out = bmm_reference(a, b, out_dtype=torch.float32)       # a (B, m, k) @ b (B, k, n)
    y = mm_rows_reference(x, weight)                         # x (M, K) @ weight.T, rows padded to ROW_TILE

torch.bmm with a fixed (m, k, n) gives each output element the same bits whatever the batch count
and the element's place in it (MKL, checked in tests/test_exact_mode.py); a row product gets a fixed
shape by padding the rows to whole ROW_TILE tiles.
"""
from __future__ import annotations

import torch

# Rows per CPU matmul tile. 1024 x 576 @ 576 x 1536 (2-core CPU, 1 thread): one F.linear 18.4 ms;
# tiles of 8 / 16 / 32 / 64 rows: 35 / 24 / 21 / 20 ms. 32 keeps the update near a plain GEMM;
# the price is paid by small decode batches (a 2-row step computes 32 rows).
ROW_TILE = 32


def bmm_reference(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a (B, m, k) @ b (B, k, n) with torch.bmm. out_dtype float32 keeps the fp32 accumulator of bf16 /
    fp16 operands (the operands upcast, their products exact). Autocast is off inside: the operands'
    dtypes are the caller's choice, the same in every path."""
    if out_dtype is not None and out_dtype != a.dtype:
        a, b = a.to(out_dtype), b.to(out_dtype)
    with torch.autocast(a.device.type, enabled=False):
        return torch.bmm(a, b)


def mm_rows_reference(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (M, K) @ weight.T (K, N) -> (M, N) in ROW_TILE-row tiles, each row's bits independent of M and
    of its row index."""
    rows, num_in = x.shape
    num_tiles = max(1, -(-rows // ROW_TILE))
    padded = num_tiles * ROW_TILE
    if padded != rows:
        x = torch.cat((x, x.new_zeros(padded - rows, num_in)))
    w_t = weight.t()[None].expand(num_tiles, num_in, weight.shape[0])  # stride-0 batch: no copy
    return bmm_reference(x.contiguous().view(num_tiles, ROW_TILE, num_in), w_t, out_dtype).view(padded, -1)[:rows]
