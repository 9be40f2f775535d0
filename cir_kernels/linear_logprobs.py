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
CPU (backend "torch", the twin): the same walk with torch GEMMs into an fp32 chunk z_c (N x C) and the
torch row ops of `cir_kernels.logprobs` on it, in the forward as well.
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

import torch

from cir_kernels._checks import FLOAT_DTYPES, check_temperature, check_tensor, pick_backend
from cir_kernels.linear_logprobs_triton import dz_gemm, lse_gemm
from cir_kernels.logprobs import finish_state, logits_grad, lse_update, new_state

# Chunk budgets (bytes of the [M, C] chunk buffer). CPU, torch path (fp32 logits), N = 8192, V = 49152,
# D = 576, 1 thread (bench/kernels.py): C = 256 / 1024 / 4096 took 31.6 / 35.5 / 29.5 s fwd+bwd (noise
# ~10% on the shared machine; naive 32.6 s) for 153 / 214 / 409 MiB peak extra (naive 4619): 32 MiB
# (C = 1024 there) is the middle. CUDA, fused path: the backward's dz chunk in the hidden dtype; 128 MiB
# gives C = 2048 at N = 32768 (GEMMs of 32768 x 2048 x 3584, still cuBLAS-efficient) and C = 16384 at
# N = 4096, i.e. a chunk never more than ~2% of the naive path's [N, V] tensors; owed: a device sweep.
_CHUNK_BYTES = {"cuda": 128 << 20, "cpu": 32 << 20}
_MIN_CHUNK = 256


def _chunk_columns(num_rows: int, vocab_size: int, device: torch.device, chunk_size: int | None,
                   bytes_per_logit: int = 4) -> int:
    if chunk_size is not None:
        return min(chunk_size, vocab_size)
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    columns = max(_MIN_CHUNK, budget // (bytes_per_logit * max(1, num_rows)) // _MIN_CHUNK * _MIN_CHUNK)
    return min(columns, vocab_size)


def _mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b as float32 for float32 / bf16 / fp16 operands (fp32 accumulation, one rounding).

    out: a float32 buffer to reuse (honoured for float32 operands).
    """
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out) if out is not None else a @ b
    if not a.is_cuda:
        return a.float() @ b.float()  # CPU has no mixed-dtype GEMM: upcast (test-only path)
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (TypeError, RuntimeError):  # torch without mm(out_dtype=): round to a.dtype first
        return (a @ b).float()


def _add_mm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows_per_step: int = 4096) -> torch.Tensor:
    """acc (float32) + a @ b with fp32 accumulation; returns the new accumulator (may be acc itself).

    CUDA bf16 / fp16: one cuBLAS call with beta = 1 and an fp32 C matrix (addmm out_dtype); else the
    product in row blocks so the float32 product of low-precision operands stays small.
    """
    if a.dtype == torch.float32:
        return acc.addmm_(a, b)
    if a.is_cuda:
        try:
            return torch.addmm(acc, a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):
            pass
    for r0 in range(0, a.shape[0], rows_per_step):
        acc[r0:r0 + rows_per_step] += _mm_f32(a[r0:r0 + rows_per_step], b)
    return acc


def _chunk_buffer(h: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """One buffer reused by every chunk (the last, narrower chunk takes a prefix of it)."""
    return torch.empty(h.shape[0] * chunk, dtype=dtype, device=h.device)


def _view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return buffer[: rows * cols].view(rows, cols)


def chunked_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                     mean_z: torch.Tensor, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                     inv_t: float, chunk: int, backend: str, fused: bool, needs_hidden: bool,
                     needs_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of (logp, entropy) w.r.t. hidden and weight, the logits recomputed `chunk` vocabulary
    columns at a time (fp32 accumulation); also the exact mode's backward (cir_kernels/batch_invariant_logprobs)."""
    h, num_rows = hidden, hidden.shape[0]
    g_logp = grad_logp.float().contiguous() if grad_logp is not None else torch.zeros_like(lse)
    g_entropy = grad_entropy.float().contiguous() if grad_entropy is not None else None
    vocab_size = weight.shape[0]
    grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if needs_hidden else None
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if needs_weight else None
    # fused: dz straight from the GEMM epilogue, in h's dtype; torch: fp32 z, then dz in place or in h's dtype
    buffer = _chunk_buffer(h, chunk, h.dtype if fused else torch.float32)
    dz_buffer = _chunk_buffer(h, chunk, h.dtype) if not fused and h.dtype != torch.float32 else None
    for col in range(0, vocab_size, chunk):
        w_c = weight[col:col + chunk]  # (C, D)
        if fused:
            dz = _view(buffer, num_rows, w_c.shape[0])
            dz_gemm(h, w_c, col, targets, inv_t, lse, mean_z, g_logp, g_entropy, dz)
        else:
            z = _mm_f32(h, w_c.t(), _view(buffer, num_rows, w_c.shape[0]) if h.dtype == torch.float32 else None)
            dz = z if dz_buffer is None else _view(dz_buffer, num_rows, w_c.shape[0])
            logits_grad(z, col, targets, inv_t, lse, mean_z, g_logp, g_entropy, dz, backend)
            del z
        if needs_weight:
            torch.mm(dz.t(), h, out=grad_w[col:col + chunk])  # (C, D), complete: its own rows of grad_W
        if needs_hidden:
            grad_h = _add_mm_f32(grad_h, dz, w_c)  # (N, D) += (N, C) @ (C, D), fp32
        del dz
    del buffer, dz_buffer
    if needs_hidden:
        grad_h = grad_h.to(hidden.dtype)
    return grad_h, grad_w


class LinearLogprobs(torch.autograd.Function):
    """Every row is computed (a mask is applied outside, without a host sync). fused: the Triton GEMMs
    of `linear_logprobs_triton`; else torch GEMMs into an fp32 chunk + the row ops of `backend`."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t: float, chunk: int, backend: str, fused: bool):
        vocab_size = weight.shape[0]
        if fused:
            state = lse_gemm(hidden, weight, targets, inv_t)  # (4, N): the logits never reach memory
        else:
            state = new_state(hidden.shape[0], hidden.device)  # (4, N)
            buffer = _chunk_buffer(hidden, chunk, torch.float32) if hidden.dtype == torch.float32 else None
            for col in range(0, vocab_size, chunk):
                w_c = weight[col:col + chunk]  # (C, D)
                z = _mm_f32(hidden, w_c.t(), None if buffer is None else _view(buffer, hidden.shape[0], w_c.shape[0]))
                lse_update(z, col, targets, inv_t, state, backend)  # z: (N, C) fp32
                del z
            del buffer
        logp, entropy, lse, mean_z = finish_state(state)
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        ctx.inv_t, ctx.chunk, ctx.backend, ctx.fused = inv_t, chunk, backend, fused
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        if (grad_logp is None and grad_entropy is None) or not (needs_hidden or needs_weight):
            return None, None, None, None, None, None, None
        grad_h, grad_w = chunked_backward(hidden, weight, targets, lse, mean_z, grad_logp, grad_entropy, ctx.inv_t,
                                          ctx.chunk, ctx.backend, ctx.fused, needs_hidden, needs_weight)
        return grad_h, grad_w, None, None, None, None, None


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
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    check_tensor("targets", targets, ndim=1, integer=True, device=hidden.device)
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight is {tuple(weight.shape)}, expected [V, {hidden.shape[1]}] "
                         f"to match hidden {tuple(hidden.shape)}")
    if vocab_size == 0:
        raise ValueError(f"weight must have at least one row, got shape {tuple(weight.shape)}")
    if targets.shape[0] != num_rows:
        raise ValueError(f"targets has {targets.shape[0]} rows, hidden {num_rows}")
    inv_t = 1.0 / check_temperature(temperature)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if mask is not None:
        check_tensor("mask", mask, ndim=1, device=hidden.device)
        if mask.shape[0] != num_rows:
            raise ValueError(f"mask has {mask.shape[0]} rows, hidden {num_rows}")
    targets = targets.to(torch.int64).contiguous()
    if check_targets and not targets.is_cuda:
        kept_targets = targets if mask is None else targets[mask != 0]
        bad = (kept_targets < 0) | (kept_targets >= vocab_size)
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, {vocab_size}), got {int(kept_targets[bad][0])}")
    fused = backend == "triton" if fused is None else bool(fused)
    if fused and backend != "triton":
        raise ValueError(f"fused=True needs backend 'triton' (the fused GEMMs are Triton kernels), got {backend!r}")
    if fused:
        hidden, weight = hidden.contiguous(), weight.contiguous()
    bytes_per_logit = hidden.element_size() if fused else 4
    chunk = _chunk_columns(num_rows, vocab_size, hidden.device, chunk_size, bytes_per_logit)
    logp, entropy = LinearLogprobs.apply(hidden, weight, targets, inv_t, chunk, backend, fused)
    if mask is not None:  # where, not a row gather: no host sync; masked rows get no gradient
        keep = mask != 0
        logp = torch.where(keep, logp, 0.0)
        entropy = torch.where(keep, entropy, 0.0)
    return (logp, entropy) if return_entropy else logp


def linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    *,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `linear_logprobs` (the CPU path): same chunking, torch ops instead of Triton."""
    return linear_logprobs(
        hidden, weight, targets, temperature, mask, return_entropy, chunk_size=chunk_size, backend="torch"
    )
