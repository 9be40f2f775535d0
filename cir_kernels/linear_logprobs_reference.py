"""Plain-torch twin of `cir_kernels.linear_logprobs` (the CPU path), and the chunked walk it shares with
the Triton path: torch GEMMs into an fp32 chunk z_c = hidden @ weight[c]^T (N x C) at a time, each
folded by the row operations of `cir_kernels.logprobs` (the torch twins here; the front passes the
Triton row kernels or the fused GEMMs of cir_kernels/linear_logprobs_triton.py as `ChunkOps`).

    logp = linear_logprobs_reference(hidden, weight, targets, temperature=1.0, mask=loss_mask)   # (N,)

Same arguments and semantics as `cir_kernels.linear_logprobs` (its docstring has the memory budget).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from cir_kernels._checks import check_linear_logprobs_args
from cir_kernels.logprobs_reference import finish_state, logits_grad_reference, lse_update_reference, new_state

# Chunk budgets (bytes of the [M, C] chunk buffer). CPU, torch path (fp32 logits), N = 8192, V = 49152,
# D = 576, 1 thread (bench/kernels.py): C = 256 / 1024 / 4096 took 31.6 / 35.5 / 29.5 s fwd+bwd (noise
# ~10% on the shared machine; naive 32.6 s) for 153 / 214 / 409 MiB peak extra (naive 4619): 32 MiB
# (C = 1024 there) is the middle. CUDA, fused path: the backward's dz chunk in the hidden dtype; 128 MiB
# gives C = 2048 at N = 32768 (GEMMs of 32768 x 2048 x 3584, still cuBLAS-efficient) and C = 16384 at
# N = 4096, i.e. a chunk never more than ~2% of the naive path's [N, V] tensors; owed: a device sweep.
_CHUNK_BYTES = {"cuda": 128 << 20, "cpu": 32 << 20}
_MIN_CHUNK = 256


def chunk_columns(num_rows: int, vocab_size: int, device: torch.device, chunk_size: int | None,
                   bytes_per_logit: int = 4) -> int:
    if chunk_size is not None:
        return min(chunk_size, vocab_size)
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    columns = max(_MIN_CHUNK, budget // (bytes_per_logit * max(1, num_rows)) // _MIN_CHUNK * _MIN_CHUNK)
    return min(columns, vocab_size)


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
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


def add_mm_f32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows_per_step: int = 4096) -> torch.Tensor:
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
        acc[r0:r0 + rows_per_step] += mm_f32(a[r0:r0 + rows_per_step], b)
    return acc


def _chunk_buffer(h: torch.Tensor, chunk: int, dtype: torch.dtype) -> torch.Tensor:
    """One buffer reused by every chunk (the last, narrower chunk takes a prefix of it)."""
    return torch.empty(h.shape[0] * chunk, dtype=dtype, device=h.device)


def _view(buffer: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return buffer[: rows * cols].view(rows, cols)


class ChunkOps(NamedTuple):
    """What the chunked walk runs per vocabulary chunk: the row operations of `cir_kernels.logprobs`
    (signatures of `lse_update_reference` / `logits_grad_reference`), or fused GEMMs that replace the
    walk's torch GEMM and row operation at once (`cir_kernels.linear_logprobs_triton`)."""

    lse_update: Callable
    logits_grad: Callable
    lse_gemm: Callable | None = None  # (hidden, weight, targets, inv_t) -> (4, N) state over all columns
    dz_gemm: Callable | None = None  # (hidden, weight_chunk, col, targets, inv_t, lse, mean_z, g, h, out)


TORCH_OPS = ChunkOps(lse_update_reference, logits_grad_reference)


def chunked_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: float, chunk: int,
                    ops: ChunkOps) -> torch.Tensor:
    """(4, N) state (`new_state`) over every vocabulary column, `chunk` columns at a time."""
    if ops.lse_gemm is not None:
        return ops.lse_gemm(hidden, weight, targets, inv_t)  # (4, N): the logits never reach memory
    state = new_state(hidden.shape[0], hidden.device)  # (4, N)
    buffer = _chunk_buffer(hidden, chunk, torch.float32) if hidden.dtype == torch.float32 else None
    for col in range(0, weight.shape[0], chunk):
        w_c = weight[col:col + chunk]  # (C, D)
        z = mm_f32(hidden, w_c.t(), None if buffer is None else _view(buffer, hidden.shape[0], w_c.shape[0]))
        ops.lse_update(z, col, targets, inv_t, state)  # z: (N, C) fp32
        del z
    del buffer
    return state


def chunked_backward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                     mean_z: torch.Tensor, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None,
                     inv_t: float, chunk: int, ops: ChunkOps, needs_hidden: bool,
                     needs_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of (logp, entropy) w.r.t. hidden and weight, the logits recomputed `chunk` vocabulary
    columns at a time (fp32 accumulation); also the exact mode's backward (cir_kernels/batch_invariant_logprobs)."""
    fused = ops.dz_gemm is not None
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
            ops.dz_gemm(h, w_c, col, targets, inv_t, lse, mean_z, g_logp, g_entropy, dz)
        else:
            z = mm_f32(h, w_c.t(), _view(buffer, num_rows, w_c.shape[0]) if h.dtype == torch.float32 else None)
            dz = z if dz_buffer is None else _view(dz_buffer, num_rows, w_c.shape[0])
            ops.logits_grad(z, col, targets, inv_t, lse, mean_z, g_logp, g_entropy, dz)
            del z
        if needs_weight:
            torch.mm(dz.t(), h, out=grad_w[col:col + chunk])  # (C, D), complete: its own rows of grad_W
        if needs_hidden:
            grad_h = add_mm_f32(grad_h, dz, w_c)  # (N, D) += (N, C) @ (C, D), fp32
        del dz
    del buffer, dz_buffer
    if needs_hidden:
        grad_h = grad_h.to(hidden.dtype)
    return grad_h, grad_w


def save_for_chunked_backward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              lse: torch.Tensor, mean_z: torch.Tensor, inv_t: float, chunk: int, ops: ChunkOps) -> None:
    """In the forward of an autograd Function over (hidden, weight, ...): what `chunked_backward_saved` needs."""
    ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
    ctx.inv_t, ctx.chunk, ctx.ops = inv_t, chunk, ops
    ctx.set_materialize_grads(False)


def chunked_backward_saved(ctx, grad_logp: torch.Tensor | None,
                           grad_entropy: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad hidden, grad weight) by `chunked_backward` from what `save_for_chunked_backward` kept;
    None for each when no gradient flows or neither input needs one."""
    hidden, weight, targets, lse, mean_z = ctx.saved_tensors
    needs_hidden, needs_weight = ctx.needs_input_grad[:2]
    if (grad_logp is None and grad_entropy is None) or not (needs_hidden or needs_weight):
        return None, None
    return chunked_backward(hidden, weight, targets, lse, mean_z, grad_logp, grad_entropy, ctx.inv_t, ctx.chunk,
                            ctx.ops, needs_hidden, needs_weight)


class ChunkedLinearLogprobs(torch.autograd.Function):
    """Every row is computed (a mask is applied outside, without a host sync); `ops` picks the path."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t: float, chunk: int, ops: ChunkOps):
        logp, entropy, lse, mean_z = finish_state(chunked_forward(hidden, weight, targets, inv_t, chunk, ops))
        save_for_chunked_backward(ctx, hidden, weight, targets, lse, mean_z, inv_t, chunk, ops)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        return *chunked_backward_saved(ctx, grad_logp, grad_entropy), None, None, None, None


def chunked_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: float,
                     mask: torch.Tensor | None, return_entropy: bool, chunk: int,
                     ops: ChunkOps) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The walk on checked arguments (targets int64, 1 / temperature), masked rows zeroed after."""
    logp, entropy = ChunkedLinearLogprobs.apply(hidden, weight, targets, inv_t, chunk, ops)
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
    """Torch twin of `linear_logprobs` (the CPU path): same chunking, torch GEMMs and row operations."""
    targets, inv_t = check_linear_logprobs_args(hidden, weight, targets, temperature, mask, chunk_size, True)
    chunk = chunk_columns(hidden.shape[0], weight.shape[0], hidden.device, chunk_size)
    return chunked_logprobs(hidden, weight, targets, inv_t, mask, return_entropy, chunk, TORCH_OPS)
