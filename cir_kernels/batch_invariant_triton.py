"""A batch-invariant matmul in Triton: every output element is reduced over K in one fixed order.

    out = bmm_triton(a, b)          # a (B, M, K), b (B, K, N) -> (B, M, N), fp32 accumulation, a's dtype
    out = bmm_triton(a, b, out_dtype=torch.float32)     # the fp32 accumulator itself (bf16 / fp16 operands)

Why it is batch-invariant: a program owns one BLOCK_M x BLOCK_N output tile and walks K from 0 to K
in BLOCK_K steps, `acc += tl.dot(a_tile, b_tile)`, in fp32, with no split-K and no autotuning: the
tile sizes, warps and stages are constants. An output element's sum therefore depends on its row of
`a`, its column of `b` and K only, never on M, N, B or the element's place in its tile (rows past M
load as zeros and are not stored). cuBLAS, by contrast, picks kernels and split-K from the shape,
so one token's bits change with the batch (a ~1e-2 log-prob gap, measured).

The price: a fixed 64 x 64 x 32 tile is not the fastest kernel for every shape (decode's skinny
M and the update's large GEMMs alike); bench/exact.py measures what the whole exact mode costs.
Memory traffic: reads M K + K N (times ceil(N / 64) and ceil(M / 64) re-reads through L2), writes
M N elements. Forward only; `cir_kernels.batch_invariant` wraps it in autograd (backward: plain torch).
The torch twin is `bmm_reference` (cir_kernels/batch_invariant_reference.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Fixed, on purpose: any change changes the bits (but never the batch invariance). Not yet tuned on a
# GPU (bench/exact.py is the tool).
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32
_NUM_WARPS, _NUM_STAGES = 4, 3


@triton.jit
def _bmm_kernel(
    a_ptr, b_ptr, out_ptr, M, N, K,
    a_stride_b, a_stride_m, a_stride_k,
    b_stride_b, b_stride_k, b_stride_n,
    out_stride_b, out_stride_m, out_stride_n,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    batch = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_base = a_ptr + batch * a_stride_b + rows[:, None] * a_stride_m
    b_base = b_ptr + batch * b_stride_b + cols[None, :] * b_stride_n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # one fixed order over K: the whole invariance argument
        k = k0 + ks
        a = tl.load(a_base + k[None, :] * a_stride_k, mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_base + k[:, None] * b_stride_k, mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        if IEEE:  # fp32 operands: true fp32 products, not TF32 (whose rounding is the hardware's)
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    out = out_ptr + batch * out_stride_b + rows[:, None] * out_stride_m + cols[None, :] * out_stride_n
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


def bmm_triton(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a (B, M, K) @ b (B, K, N) -> (B, M, N) in out_dtype (default a's); any strides (a stride-0
    batch included)."""
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"bmm_triton takes 3-d a and b, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise ValueError(f"bmm_triton: shapes {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"bmm_triton: a is {a.dtype} on {a.device}, b is {b.dtype} on {b.device}")
    batch, M, K = a.shape
    N = b.shape[2]
    out = torch.empty(batch, M, N, dtype=out_dtype or a.dtype, device=a.device)
    if out.numel() == 0:
        return out
    if K == 0:
        return out.zero_()
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), batch)
    _bmm_kernel[grid](
        a, b, out, M, N, K, *a.stride(), *b.stride(), *out.stride(),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, IEEE=a.dtype == torch.float32,
        num_warps=_NUM_WARPS, num_stages=_NUM_STAGES,
    )
    return out
