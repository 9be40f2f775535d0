"""Masked token log-probs (and entropy) straight from hidden states: LM head + log-softmax + gather, fused.

    from kernels import linear_logprobs
    logp = linear_logprobs(hidden, lm_head_weight, targets, temperature=1.0, mask=loss_mask)   # (N,)
    logp, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)

The [N, V] logits never exist at once. Rows with mask 0 are dropped first (one host sync to count
them). Then the vocabulary is walked in chunks of C columns:
  forward:  z_c = h W_c^T (float32, N x C)  ->  online log-sum-exp state per row (`kernels.logprobs`)
  backward: z_c recomputed  ->  dz_c = d loss / d z_c in place (same file, math written there)
            grad_W_c = dz_c^T h       written once, complete (its own slice of grad_W)
            grad_h  += dz_c W_c       accumulated in float32 over the chunks
So the backward costs one extra GEMM (the recompute): 2 N V D flops forward, 6 N V D backward.

Memory beyond inputs and outputs, M = kept rows, D = hidden size, b = itemsize of hidden:
  forward   4 M C (one fp32 chunk) + 16 M (state) [+ M D b for the gathered rows when masked]
  backward  4 M C + b M C (the dz chunk, when b != 4) + 4 M D (fp32 grad_h accumulator when b != 4
            or masked, plus a 4 x 4096 x D product block) [+ M D b gathered rows when masked]
  kept for the backward: 8 M bytes (lse and E_p[z]); inputs are saved, nothing else.
C = chunk_size or, by default, as many columns as fit 256 MiB (CUDA) / 32 MiB (CPU) of fp32 logits,
a multiple of 256, at least 256. Memory traffic through the [M, C] chunks (weights and hidden
states aside): forward 8 M V bytes (the GEMM writes each fp32 chunk, the row kernel reads it once);
backward (8 + 3 b) M V (recompute written and read, dz written once and read by the two GEMMs). The
naive path (logits, float copy, log-softmax, their gradients) moves >= (4 b + 16) N V bytes and holds
several [N, V] tensors at once.
"""
from __future__ import annotations

import torch

from kernels._checks import FLOAT_DTYPES, check_temperature, check_tensor, pick_backend
from kernels.logprobs import finish_state, logits_grad, lse_update, new_state

# Default chunk budget of fp32 logits. CUDA: owed a measurement; 256 MiB keeps the chunk GEMM large
# (N = 32768 -> C = 2048 columns). CPU, N = 8192, V = 49152, D = 576, fp32, 1 thread (bench/kernels.py):
# C = 256 / 1024 / 4096 took 31.6 / 35.5 / 29.5 s fwd+bwd (noise ~10% on the shared machine; naive
# 32.6 s) for 153 / 214 / 409 MiB peak extra (naive 4619): 32 MiB (C = 1024 there) is the middle.
_CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 32 << 20}
_MIN_CHUNK = 256


def _chunk_columns(num_rows: int, vocab_size: int, device: torch.device, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return min(chunk_size, vocab_size)
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    columns = max(_MIN_CHUNK, budget // (4 * max(1, num_rows)) // _MIN_CHUNK * _MIN_CHUNK)
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


def _add_mm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows_per_step: int = 4096) -> None:
    """acc (float32) += a @ b, in row blocks so the float32 product of bf16 operands stays small."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    for r0 in range(0, a.shape[0], rows_per_step):
        acc[r0:r0 + rows_per_step] += _mm_f32(a[r0:r0 + rows_per_step], b)


def _chunk_buffer(h: torch.Tensor, chunk: int) -> torch.Tensor | None:
    """One float32 buffer reused by every chunk (float32 only; elsewhere the allocator caches)."""
    return torch.empty(h.shape[0] * chunk, dtype=torch.float32, device=h.device) if h.dtype == torch.float32 else None


def _view(buffer: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    return None if buffer is None else buffer[: rows * cols].view(rows, cols)


class LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, inv_t: float, chunk: int, backend: str):
        num_rows, vocab_size = hidden.shape[0], weight.shape[0]
        h = hidden if rows is None else hidden.index_select(0, rows)  # (M, D)
        t = targets if rows is None else targets.index_select(0, rows)  # (M,)
        state = new_state(h.shape[0], hidden.device)  # (4, M)
        buffer = _chunk_buffer(h, chunk)
        for col in range(0, vocab_size, chunk):
            w_c = weight[col:col + chunk]  # (C, D)
            z = _mm_f32(h, w_c.t(), _view(buffer, h.shape[0], w_c.shape[0]))  # (M, C) fp32
            lse_update(z, col, t, inv_t, state, backend)
            del z
        del buffer
        logp, entropy, lse, mean_z = finish_state(state)
        if rows is not None:
            logp = torch.zeros(num_rows, device=hidden.device).index_copy_(0, rows, logp)
            entropy = torch.zeros(num_rows, device=hidden.device).index_copy_(0, rows, entropy)
        ctx.save_for_backward(hidden, weight, targets, rows, lse, mean_z)
        ctx.inv_t, ctx.chunk, ctx.backend = inv_t, chunk, backend
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, rows, lse, mean_z = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        if (grad_logp is None and grad_entropy is None) or not (needs_hidden or needs_weight):
            return None, None, None, None, None, None, None

        def kept(grad: torch.Tensor | None) -> torch.Tensor | None:
            if grad is None:
                return None
            return (grad if rows is None else grad.index_select(0, rows)).float().contiguous()

        h = hidden if rows is None else hidden.index_select(0, rows)  # (M, D)
        t = targets if rows is None else targets.index_select(0, rows)
        g_logp = kept(grad_logp) if grad_logp is not None else torch.zeros_like(lse)
        g_entropy = kept(grad_entropy)
        vocab_size, chunk = weight.shape[0], ctx.chunk
        # float32 hidden without a mask: accumulate straight into the output
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if needs_hidden else None
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if needs_weight else None
        buffer = _chunk_buffer(h, chunk)
        for col in range(0, vocab_size, chunk):
            w_c = weight[col:col + chunk]  # (C, D)
            z = _mm_f32(h, w_c.t(), _view(buffer, h.shape[0], w_c.shape[0]))  # (M, C) fp32, recomputed
            dz = z if h.dtype == torch.float32 else torch.empty(z.shape, dtype=h.dtype, device=z.device)
            logits_grad(z, col, t, ctx.inv_t, lse, mean_z, g_logp, g_entropy, dz, ctx.backend)
            del z
            if needs_weight:
                torch.mm(dz.t(), h, out=grad_w[col:col + chunk])
            if needs_hidden:
                _add_mm_f32_(grad_h, dz, w_c)
            del dz
        del buffer
        if needs_hidden:
            if rows is not None:
                grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=h.device).index_copy_(0, rows, grad_h)
            grad_h = grad_h.to(hidden.dtype)
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(hidden @ weight.T / temperature)[i, targets[i]] per row, float32 (N,).

    hidden (N, D) and weight (V, D): same float dtype (fp32 / bf16 / fp16) and device; differentiable
    w.r.t. both. targets (N,) int; must lie in [0, V) on kept rows (checked on CPU; on CUDA a bad
    target gives NaN). mask (N,) or None: rows where mask == 0 are skipped, get log-prob 0, entropy 0
    and zero gradient. return_entropy=True also returns the entropy of each row's distribution.
    chunk_size: vocabulary columns per chunk (default: from a memory budget, see module docstring).
    backend: None (Triton row kernels on CUDA, torch on CPU), "triton" or "torch".
    """
    backend = pick_backend(backend, hidden)
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    check_tensor("targets", targets, ndim=1, integer=True, device=hidden.device)
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight is {tuple(weight.shape)}, expected [V, {hidden.shape[1]}] to match hidden {tuple(hidden.shape)}")
    if vocab_size == 0:
        raise ValueError(f"weight must have at least one row, got shape {tuple(weight.shape)}")
    if targets.shape[0] != num_rows:
        raise ValueError(f"targets has {targets.shape[0]} rows, hidden {num_rows}")
    inv_t = 1.0 / check_temperature(temperature)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    rows = None
    if mask is not None:
        check_tensor("mask", mask, ndim=1, device=hidden.device)
        if mask.shape[0] != num_rows:
            raise ValueError(f"mask has {mask.shape[0]} rows, hidden {num_rows}")
        rows = mask.nonzero().squeeze(1)  # host sync: the number of kept rows
    targets = targets.to(torch.int64).contiguous()
    if not targets.is_cuda:
        kept_targets = targets if rows is None else targets[rows]
        bad = (kept_targets < 0) | (kept_targets >= vocab_size)
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, {vocab_size}), got {int(kept_targets[bad][0])}")
    num_kept = num_rows if rows is None else rows.shape[0]
    chunk = _chunk_columns(num_kept, vocab_size, hidden.device, chunk_size)
    logp, entropy = LinearLogprobs.apply(hidden, weight, targets, rows, inv_t, chunk, backend)
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
