"""Log-probs (and entropy) of target tokens under softmax(logits / T), streamed over vocabulary chunks.

    from cir_kernels import logprobs_from_logits
    logp = logprobs_from_logits(logits, targets, temperature=1.0)          # (N,) float32, differentiable

The two row operations here are the core of `cir_kernels.linear_logprobs` too, which feeds them one
vocabulary chunk of logits at a time; each has a Triton kernel and a torch twin with the same math.

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
import triton
import triton.language as tl

from cir_kernels._checks import FLOAT_DTYPES, check_temperature, check_tensor, pick_backend

# Streaming row blocks: not yet tuned on a GPU (owed); 2048 x fp32 at 8 warps = 8 values per thread.
_BLOCK_V = 2048
_NUM_WARPS = 8
# Torch twins process rows in groups of ~4M logits so their temporaries stay ~16 MiB each.
_TORCH_GROUP_ELEMENTS = 1 << 22


@triton.jit
def _lse_update_kernel(
    z_ptr, z_row_stride, targets_ptr, state_ptr,
    num_rows, num_cols, col_start, inv_t,
    BLOCK_V: tl.constexpr,
):
    """Fold one chunk of columns [col_start, col_start + num_cols) into the (m, s, w, z_t) state of a row."""
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_row_stride
    m = tl.load(state_ptr + row)
    s = tl.load(state_ptr + num_rows + row)
    w = tl.load(state_ptr + 2 * num_rows + row)
    for start in range(0, num_cols, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        z = tl.load(z_row + offs, mask=offs < num_cols, other=float("-inf")).to(tl.float32) * inv_t
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)
        w = a * tl.where(s > 0.0, w + (m - m_safe) * s, 0.0) + tl.sum(tl.where(e > 0.0, e * (z - m_safe), 0.0), axis=0)
        s = a * s + tl.sum(e, axis=0)
        m = m_new
    tl.store(state_ptr + row, m)
    tl.store(state_ptr + num_rows + row, s)
    tl.store(state_ptr + 2 * num_rows + row, w)
    local = tl.load(targets_ptr + row) - col_start
    if (local >= 0) & (local < num_cols):
        tl.store(state_ptr + 3 * num_rows + row, tl.load(z_row + local).to(tl.float32) * inv_t)


@triton.jit
def _logits_grad_kernel(
    z_ptr, z_row_stride, out_ptr, out_row_stride,
    targets_ptr, lse_ptr, mean_z_ptr, grad_logp_ptr, grad_entropy_ptr,
    num_cols, col_start, inv_t,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """out = d loss / d logits for one chunk; out may alias z (in place)."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    valid = offs < num_cols
    z = tl.load(z_ptr + row * z_row_stride + offs, mask=valid, other=float("-inf")).to(tl.float32) * inv_t
    p = tl.exp(z - tl.load(lse_ptr + row))
    is_target = (offs + col_start) == tl.load(targets_ptr + row)
    dz = tl.load(grad_logp_ptr + row) * (is_target.to(tl.float32) - p)
    if HAS_GRAD_ENTROPY:
        mean_z = tl.load(mean_z_ptr + row)
        dz -= tl.load(grad_entropy_ptr + row) * tl.where(p > 0.0, p * (z - mean_z), 0.0)
    tl.store(out_ptr + row * out_row_stride + offs, (dz * inv_t).to(out_ptr.dtype.element_ty), mask=valid)


def new_state(num_rows: int, device: torch.device) -> torch.Tensor:
    """(4, num_rows) float32: max m = -inf, s = 0, w = 0, z_target = NaN (stays NaN for a target outside [0, V))."""
    state = torch.zeros(4, num_rows, dtype=torch.float32, device=device)
    state[0] = float("-inf")
    state[3] = float("nan")
    return state


def lse_update(z: torch.Tensor, col_start: int, targets: torch.Tensor, inv_t: float, state: torch.Tensor,
               backend: str) -> None:
    """Fold a chunk z (R, C) of raw logits (columns col_start...) into `state` (see `new_state`)."""
    num_rows, num_cols = z.shape
    assert z.stride(1) == 1 and state.shape == (4, num_rows) and targets.shape == (num_rows,)
    if num_rows == 0:
        return
    if backend == "triton":
        block_v = min(_BLOCK_V, triton.next_power_of_2(num_cols))
        _lse_update_kernel[(num_rows,)](
            z, z.stride(0), targets, state, num_rows, num_cols, col_start, inv_t,
            BLOCK_V=block_v, num_warps=_NUM_WARPS,
        )
        return
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


def finish_state(state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp of the target, entropy, lse, E_p[z]) per row, from a state that has seen every column."""
    m, s, w, z_target = state
    log_s = torch.log(s)
    lse = m + log_s
    return z_target - lse, log_s - w / s, lse, m + w / s


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
    if backend == "triton":
        block_v = min(_BLOCK_V, triton.next_power_of_2(num_cols))
        has_entropy = grad_entropy is not None
        _logits_grad_kernel[(num_rows, triton.cdiv(num_cols, block_v))](
            z, z.stride(0), out, out.stride(0),
            targets, lse, mean_z, grad_logp, grad_entropy if has_entropy else grad_logp,
            num_cols, col_start, inv_t,
            HAS_GRAD_ENTROPY=has_entropy, BLOCK_V=block_v, num_warps=_NUM_WARPS,
        )
        return
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
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("targets", targets, ndim=1, integer=True, device=logits.device)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} rows, logits {logits.shape[0]}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one column, got shape {tuple(logits.shape)}")
    inv_t = 1.0 / check_temperature(temperature)
    if not targets.is_cuda and targets.numel() > 0:
        bad = (targets < 0) | (targets >= logits.shape[1])
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, {logits.shape[1]}), got {int(targets[bad][0])}")
    logp, entropy = LogprobsFromLogits.apply(logits, targets.to(torch.int64).contiguous(), inv_t, backend)
    return (logp, entropy) if return_entropy else logp
