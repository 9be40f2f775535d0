"""Batch-invariant log-probs: the training forward's log-prob and the engine's behaviour log-prob of
a token are the same reduction of the same numbers (the exact mode, see cir_kernels/batch_invariant.py).

    from cir_kernels.batch_invariant_logprobs import linear_logprobs_invariant, logprobs_from_logits_invariant
    logp = linear_logprobs_invariant(hidden, weight, targets, temperature, mask)             # training
    logp = logprobs_from_logits_invariant(linear_invariant(hidden, weight, out_dtype=torch.float32), targets)

The logits of `linear_invariant` (per ROW_TILE rows: the very logits the engine samples from) are
reduced by `cir_kernels.logprobs`' row kernel (the one `cir_kernels.linear_logprobs` runs) in fixed
VOCAB_CHUNK column chunks, so a row's bits never depend on the other rows of the call.
"""
from __future__ import annotations

import torch

from cir_kernels._checks import check_temperature, pick_backend
from cir_kernels.batch_invariant import ROW_TILE, mm_rows_invariant
from cir_kernels.linear_logprobs import TRITON_ROW_OPS
from cir_kernels.linear_logprobs_reference import TORCH_OPS, chunked_backward_saved, save_for_chunked_backward
from cir_kernels.logprobs import lse_update
from cir_kernels.logprobs_reference import finish_state, new_state

VOCAB_CHUNK = 4096  # logit columns per step of the row kernel (and of the backward's recompute)


def _logit_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of fp32 logits held at once by linear_logprobs_invariant: whole ROW_TILE tiles within
    256 MiB (CUDA) / 32 MiB (CPU), as `cir_kernels.linear_logprobs` budgets its chunks. The count does not
    change any bits (a row's logits do not depend on the other rows of the call)."""
    budget = (256 << 20) if device.type == "cuda" else (32 << 20)
    return max(1, budget // (4 * vocab_size) // ROW_TILE) * ROW_TILE


def _rows_logprobs(z: torch.Tensor, targets: torch.Tensor, inv_t: float, backend: str) -> tuple[torch.Tensor, ...]:
    """`cir_kernels.logprobs`' row kernel over logits z (R, V) in fixed VOCAB_CHUNK column chunks:
    (logp, entropy, lse, E_p[z]) per row, each row's bits independent of R."""
    z = z.float()
    state = new_state(z.shape[0], z.device)  # (4, R)
    for col in range(0, z.shape[1], VOCAB_CHUNK):
        lse_update(z[:, col:col + VOCAB_CHUNK], col, targets, inv_t, state, backend)
    return finish_state(state)


class _LinearLogprobsInvariant(torch.autograd.Function):
    """Forward: per ROW_TILE rows, z = `linear_invariant`'s product (the logits the engine samples
    from), then the row kernel. Backward: `linear_logprobs`' own (`chunked_backward`, its torch GEMMs
    with fp32 accumulation: gradients need not be bitwise)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t: float, backend: str):
        step = _logit_rows(weight.shape[0], hidden.device)
        outs = [_rows_logprobs(mm_rows_invariant(hidden[r0:r0 + step], weight, torch.float32, backend),
                               targets[r0:r0 + step], inv_t, backend) for r0 in range(0, hidden.shape[0], step)]
        logp, entropy, lse, mean_z = (torch.cat(parts) for parts in zip(*outs, strict=True))
        ops = TRITON_ROW_OPS if backend == "triton" else TORCH_OPS
        save_for_chunked_backward(ctx, hidden, weight, targets, lse, mean_z, inv_t, VOCAB_CHUNK, ops)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        return *chunked_backward_saved(ctx, grad_logp, grad_entropy), None, None, None


def logprobs_from_logits_invariant(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                                   return_entropy: bool = False, *,
                                   backend: str | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The engine's side of `linear_logprobs_invariant`: logits (R, V) = `linear_invariant(hidden,
    weight, out_dtype=torch.float32)` (what exact-mode sampling reads) -> log_softmax(logits /
    temperature)[targets] (R,) fp32, the same bits `linear_logprobs_invariant(hidden, weight, targets,
    temperature)` gives. No autograd."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logprobs_from_logits_invariant: logits {tuple(logits.shape)}, "
                         f"targets {tuple(targets.shape)}")
    logp, entropy, _, _ = _rows_logprobs(logits, targets.to(torch.int64), 1.0 / check_temperature(temperature),
                                         pick_backend(backend, logits))
    return (logp, entropy) if return_entropy else logp


def linear_logprobs_invariant(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    mask: torch.Tensor | None = None, return_entropy: bool = False, *, check_targets: bool = True,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`cir_kernels.linear_logprobs` (same arguments, same values within float tolerance) whose value for
    a row does not depend on the other rows: masked rows are computed too (then zeroed), the logits of
    ROW_TILE rows at a time are `linear_invariant`'s (so the engine can sample from the very logits
    it records the log-prob of, `logprobs_from_logits_invariant`), reduced by `cir_kernels.logprobs`' row
    kernel in fixed VOCAB_CHUNK column chunks. check_targets: as linear_logprobs
    (a target outside [0, V) is a ValueError on CPU; False skips the host read). backend: None (Triton
    for CUDA tensors, torch otherwise), "triton" or "torch": the matmul and the row kernel's path."""
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_logprobs_invariant: hidden {tuple(hidden.shape)}, targets {tuple(targets.shape)}")
    if check_targets and not targets.is_cuda:
        bad = (targets < 0) | (targets >= weight.shape[0])
        if mask is not None:
            bad &= mask != 0
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, {weight.shape[0]}), got {int(targets[bad][0])}")
    if hidden.shape[0] == 0:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (empty, empty) if return_entropy else empty
    inv_t = 1.0 / check_temperature(temperature)
    logp, entropy = _LinearLogprobsInvariant.apply(hidden, weight, targets.to(torch.int64), inv_t,
                                                   pick_backend(backend, hidden))
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, targets {tuple(targets.shape)}")
        keep = mask != 0
        logp, entropy = torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)
    return (logp, entropy) if return_entropy else logp
