"""Plain-torch twins of `cir_kernels.logprobs`' row operations (the CPU path and the yardstick of the
Triton row kernels in cir_kernels/logprobs_triton.py; the math is in cir_kernels/logprobs.py).

    state = new_state(num_rows, device)                                   # (4, N): m, s, w, z_target
    lse_update_reference(z, col_start, targets, inv_t, state)             # fold a chunk of logits
    logp, entropy, lse, mean_z = finish_state(state)
    logits_grad_reference(z, col_start, targets, inv_t, lse, mean_z, grad_logp, grad_entropy, out)

`new_state` and `finish_state` are the state's two ends, the same for both paths.
"""
from __future__ import annotations

import torch

# Rows are processed in groups of ~4M logits so the temporaries stay ~16 MiB each.
_TORCH_GROUP_ELEMENTS = 1 << 22


def new_state(num_rows: int, device: torch.device) -> torch.Tensor:
    """(4, num_rows) float32: max m = -inf, s = 0, w = 0, z_target = NaN (stays NaN for a target outside [0, V))."""
    state = torch.zeros(4, num_rows, dtype=torch.float32, device=device)
    state[0] = float("-inf")
    state[3] = float("nan")
    return state


def finish_state(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp of the target, entropy, lse, E_p[z]) per row, from a state that has seen every column."""
    m, s, w, z_target = state
    log_s = torch.log(s)
    lse = m + log_s
    return z_target - lse, log_s - w / s, lse, m + w / s


def lse_update_reference(z: torch.Tensor, col_start: int, targets: torch.Tensor, inv_t: float,
                         state: torch.Tensor) -> None:
    """Torch twin of `cir_kernels.logprobs.lse_update` (arguments asserted there)."""
    num_rows, num_cols = z.shape
    group = max(1, _TORCH_GROUP_ELEMENTS // num_cols)
    for r0 in range(0, num_rows, group):
        rows = slice(r0, min(r0 + group, num_rows))
        m, s, w, z_target = state[0, rows], state[1, rows], state[2, rows], state[3, rows]
        zz = z[rows].float()  # (r, C), a view for float32 input
        if inv_t != 1.0:
            zz = zz * inv_t
        m_new = torch.maximum(m, zz.amax(dim=1))
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        a = torch.exp(m - m_safe)
        dev = zz - m_safe[:, None]  # z - m'
        e = dev.exp()
        w_chunk = dev.mul_(e).nansum(dim=1)  # 0 * -inf = NaN only where e = 0
        w.copy_(a * torch.where(s > 0, w + (m - m_safe) * s, 0.0) + w_chunk)
        s.copy_(a * s + e.sum(dim=1))
        m.copy_(m_new)
        local = targets[rows] - col_start
        inside = (local >= 0) & (local < num_cols)
        picked = zz.gather(1, local.clamp(0, num_cols - 1)[:, None]).squeeze(1)
        z_target.copy_(torch.where(inside, picked, z_target))


def logits_grad_reference(z: torch.Tensor, col_start: int, targets: torch.Tensor, inv_t: float, lse: torch.Tensor,
                          mean_z: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                          out: torch.Tensor) -> None:
    """Torch twin of `cir_kernels.logprobs.logits_grad` (arguments asserted there)."""
    num_rows, num_cols = z.shape
    group = max(1, _TORCH_GROUP_ELEMENTS // num_cols)
    for r0 in range(0, num_rows, group):
        rows = slice(r0, min(r0 + group, num_rows))
        zz = z[rows].float()
        if inv_t != 1.0:
            zz = zz * inv_t
        p = (zz - lse[rows, None]).exp_()
        g = grad_logp[rows, None]
        if grad_entropy is None:
            dz = p.mul_(g * -inv_t)  # -g p / T
        else:  # -(g + h (z - E_p[z])) p / T; 0 where p = 0 and z = -inf
            dz = (zz - mean_z[rows, None]).mul_(grad_entropy[rows, None]).add_(g).mul_(p).mul_(-inv_t)
            dz = dz.nan_to_num_(nan=0.0)
        local = targets[rows] - col_start
        inside = (local >= 0) & (local < num_cols)  # no nonzero(): the CPU twin stays sync-free too
        hit = torch.where(inside, grad_logp[rows] * inv_t, 0.0)[:, None]
        dz.scatter_add_(1, local.clamp(0, num_cols - 1)[:, None], hit)  # + g [v = t] / T
        out[rows] = dz
