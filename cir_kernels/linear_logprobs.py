"""Masked token log-probs (and entropy) straight from hidden states: LM head + log-softmax + gather, fused.

    from cir_kernels import linear_logprobs
    logp = linear_logprobs(hidden, lm_head_weight, targets, temperature=1.0, mask=loss_mask)   # (N,)
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)

The [N, V] logits never exist at once, and nothing here reads a device value back (a mask zeroes
rows with torch.where instead of dropping them, which would need their count on the host).
CUDA (backend "triton", `cir_kernels.linear_logprobs_triton`):
  forward:  one Triton GEMM, z = h W^T tile by tile, folded into the online log-sum-exp state in the
            epilogue (`cir_kernels.logprobs` writes the math): 2 N V D flops, no logits in memory
  backward: per vocabulary chunk of C columns, a Triton GEMM recomputes z and writes dz = d loss / d z
            (hidden dtype) from its epilogue; then cuBLAS: grad_W_c = dz^T h (its own rows of grad_W,
            written once) and grad_h += dz W_c (fp32 C matrix, beta = 1): 6 N V D flops
CPU (backend "torch", the twin `linear_logprobs_reference` in cir_kernels/linear_logprobs_reference.py):
the same walk with torch GEMMs into an fp32 chunk z_c (N x C) and the torch row ops of
`cir_kernels.logprobs` on it, in the forward as well.
The backward's extra GEMM (the recompute) is the price of not keeping logits: 8 N V D flops in all
against the naive path's 6; the naive path pays instead with >= (4 b + 16) N V bytes of elementwise
traffic (logits, float copy, log-softmax, their gradients; b = itemsize) and several [N, V] tensors.
Fused path traffic through the chunks: forward 0, backward 3 b N V (dz written once, read by two GEMMs).

Memory beyond inputs and outputs, N rows, D = hidden size, b = itemsize of hidden:
  fused forward   16 N (state) + 12 N S (S <= ~64 vocabulary splits of the forward GEMM)
  fused backward  b N C (the dz chunk) + 4 N D (fp32 grad_h accumulator) [+ 4 N D for addmm's result]
  torch path      4 N C (fp32 chunk) [+ b N C dz when b != 4] + 4 N D
  kept for the backward: 8 N bytes (lse and E_p[z]); inputs are saved, nothing else.
C = chunk_size or, by default, as many columns as fit the budget below (dz in the hidden dtype on
CUDA, fp32 logits on CPU), a multiple of 256, at least 256.
"""
from __future__ import annotations

import functools

import torch

from cir_kernels._checks import check_linear_logprobs_args, pick_backend
from cir_kernels.linear_logprobs_reference import TORCH_OPS, ChunkOps, chunk_columns, chunked_logprobs
from cir_kernels.linear_logprobs_triton import dz_gemm, lse_gemm
from cir_kernels.logprobs import logits_grad, lse_update

# The Triton path's chunk operations: the row kernels after torch GEMMs (fused=False), or the fused GEMMs.
TRITON_ROW_OPS = ChunkOps(functools.partial(lse_update, backend="triton"),
                          functools.partial(logits_grad, backend="triton"))
FUSED_OPS = TRITON_ROW_OPS._replace(lse_gemm=lse_gemm, dz_gemm=dz_gemm)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    *,
    chunk_size: int | None = None,
    backend: str | None = None,
    check_targets: bool = True,
    fused: bool | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(hidden @ weight.T / temperature)[i, targets[i]] per row, float32 (N,).

    hidden (N, D) and weight (V, D): same float dtype (fp32 / bf16 / fp16) and device; differentiable
    w.r.t. both. targets (N,) int; must lie in [0, V) on kept rows (checked on CPU unless
    check_targets=False, which the training loop passes to stay free of host reads; on CUDA a bad
    target gives NaN). mask (N,) or None: rows where mask == 0 get log-prob 0, entropy 0 and zero
    gradient (they are computed, then discarded: dropping them would need their count on the host);
    their targets are never read. return_entropy=True also returns each row's entropy.
    chunk_size: vocabulary columns per backward chunk (default: from a memory budget, see above).
    backend: None (Triton on CUDA, torch on CPU), "triton" or "torch". fused: None = backend == "triton":
    the Triton GEMMs with the log-prob epilogues; False: torch GEMMs into fp32 chunks, then the row
    kernels of `backend` (the path before the fused GEMMs, kept for comparison: bench/kernels.py).
    No host synchronisation on CUDA.
    """
    backend = pick_backend(backend, hidden)
    targets, inv_t = check_linear_logprobs_args(hidden, weight, targets, temperature, mask, chunk_size, check_targets)
    fused = backend == "triton" if fused is None else bool(fused)
    if fused and backend != "triton":
        raise ValueError(f"fused=True needs backend 'triton' (the fused GEMMs are Triton kernels), got {backend!r}")
    if fused:
        hidden, weight = hidden.contiguous(), weight.contiguous()
    bytes_per_logit = hidden.element_size() if fused else 4
    chunk = chunk_columns(hidden.shape[0], weight.shape[0], hidden.device, chunk_size, bytes_per_logit)
    ops = FUSED_OPS if fused else TRITON_ROW_OPS if backend == "triton" else TORCH_OPS
    return chunked_logprobs(hidden, weight, targets, inv_t, mask, return_entropy, chunk, ops)
