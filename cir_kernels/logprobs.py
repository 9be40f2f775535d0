"""Log-probs (and entropy) of target tokens under softmax(logits / T), streamed over vocabulary chunks.

    from cir_kernels import logprobs_from_logits
    logp = logprobs_from_logits(logits, targets, temperature=1.0)          # (N,) float32, differentiable

The two row operations here (`lse_update`, `logits_grad`) are the core of `cir_kernels.linear_logprobs`
too, which feeds them one vocabulary chunk of logits at a time; each dispatches to its Triton kernel
(cir_kernels/logprobs_triton.py) or its torch twin (cir_kernels/logprobs_reference.py), same math.

Math, per row, with z = logits / T over the vocabulary (chunks arrive one after another):
  online log-sum-exp: state (m, s, w) = (max z, sum e^(z-m), sum e^(z-m) (z-m)) seen so far; a chunk
  with max m' >= m rescales a = e^(m - m'):  s <- a s + sum_c e^(z-m'),
  w <- a (w + (m - m') s) + sum_c e^(z-m') (z - m').
  At the end L = m + log s,  log p_t = z_t - L,  H = -sum p log p = log s - w / s,
  E_p[z] = sum p z = m + w / s = L - H.
  Gradients w.r.t. the raw logits x (z = x / T), upstream g = dloss/dlog p_t and h = dloss/dH:
  d log p_t / dz_v = [v = t] - p_v,   dH / dz_v = -p_v (z_v - E_p[z]),
  dx_v = (g ([v = t] - p_v) - h p_v (z_v - E_p[z])) / T.
Memory traffic: forward reads each logit once (itemsize bytes) and writes 16 bytes of state per row per
chunk; backward reads each logit once and writes its gradient once. State: 4 float32 per row.
"""
from __future__ import annotations

import torch

from cir_kernels._checks import check_logprobs_args, pick_backend
from cir_kernels.logprobs_reference import finish_state, logits_grad_reference, lse_update_reference, new_state
from cir_kernels.logprobs_triton import logits_grad_triton, lse_update_triton


def lse_update(z: torch.Tensor, col_start: int, targets: torch.Tensor, inv_t: float, state: torch.Tensor,
               backend: str) -> None:
    """Fold a chunk z (R, C) of raw logits (columns col_start...) into `state` (see `new_state`)."""
    num_rows, num_cols = z.shape
    assert z.stride(1) == 1 and state.shape == (4, num_rows) and targets.shape == (num_rows,)
    if num_rows == 0:
        return
    (lse_update_triton if backend == "triton" else lse_update_reference)(z, col_start, targets, inv_t, state)


def logits_grad(
    z: torch.Tensor, col_start: int, targets: torch.Tensor, inv_t: float,
    lse: torch.Tensor, mean_z: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
    out: torch.Tensor, backend: str,
) -> None:
    """out (R, C) = d loss / d raw logits of chunk z (R, C); out may be z itself."""
    num_rows, num_cols = z.shape
    assert z.stride(1) == 1 and out.stride(1) == 1 and out.shape == z.shape
    if num_rows == 0:
        return
    (logits_grad_triton if backend == "triton" else logits_grad_reference)(
        z, col_start, targets, inv_t, lse, mean_z, grad_logp, grad_entropy, out)


class LogprobsFromLogits(torch.autograd.Function):
    """Whole logits as one chunk; saves only the per-row lse and E_p[z] for the backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, inv_t: float, backend: str):
        state = new_state(logits.shape[0], logits.device)
        lse_update(logits, 0, targets, inv_t, state, backend)
        logp, entropy, lse, mean_z = finish_state(state)
        ctx.save_for_backward(logits, targets, lse, mean_z)
        ctx.inv_t, ctx.backend = inv_t, backend
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None):
        logits, targets, lse, mean_z = ctx.saved_tensors
        if grad_logp is None and grad_entropy is None:
            return None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        grad_logits = torch.empty_like(logits)
        logits_grad(
            logits, 0, targets, ctx.inv_t, lse, mean_z, grad_logp.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(), grad_logits, ctx.backend,
        )
        return grad_logits, None, None, None


def logprobs_from_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits / temperature)[i, targets[i]] as float32 (N,), differentiable w.r.t. logits.

    logits: (N, V) fp32 / bf16 / fp16, last dim contiguous; targets: (N,) int in [0, V) (checked on
    CPU; on CUDA, where checking would synchronise, a target out of range gives NaN). return_entropy=True also returns
    the entropy of softmax(logits / temperature) per row. Saves only 2 floats per row for the
    backward (plus the logits themselves). backend: None (Triton on CUDA, torch on CPU), "triton", "torch".
    """
    backend = pick_backend(backend, logits)
    targets, inv_t = check_logprobs_args(logits, targets, temperature)
    logp, entropy = LogprobsFromLogits.apply(logits, targets, inv_t, backend)
    return (logp, entropy) if return_entropy else logp
