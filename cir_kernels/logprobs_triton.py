"""Triton row kernels of `cir_kernels.logprobs` and their launchers (the math and the public API are in
cir_kernels/logprobs.py; the torch twins are in cir_kernels/logprobs_reference.py).

    lse_update_triton(z, col_start, targets, inv_t, state)     # fold a chunk of logits into the row state
    logits_grad_triton(z, col_start, targets, inv_t, lse, mean_z, grad_logp, grad_entropy, out)

One program per row (lse_update) or per (row, column block) (logits_grad); each reads a logit once.
"""
import torch
import triton
import triton.language as tl

# Streaming row blocks: not yet tuned on a GPU (owed); 2048 x fp32 at 8 warps = 8 values per thread.
_BLOCK_V = 2048
_NUM_WARPS = 8


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


def lse_update_triton(z: torch.Tensor, col_start: int, targets: torch.Tensor, inv_t: float,
                      state: torch.Tensor) -> None:
    """Launcher of `cir_kernels.logprobs.lse_update` (arguments asserted there, at least one row)."""
    num_rows, num_cols = z.shape
    block_v = min(_BLOCK_V, triton.next_power_of_2(num_cols))
    _lse_update_kernel[(num_rows,)](
        z, z.stride(0), targets, state, num_rows, num_cols, col_start, inv_t,
        BLOCK_V=block_v, num_warps=_NUM_WARPS,
    )


def logits_grad_triton(z: torch.Tensor, col_start: int, targets: torch.Tensor, inv_t: float, lse: torch.Tensor,
                       mean_z: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
                       out: torch.Tensor) -> None:
    """Launcher of `cir_kernels.logprobs.logits_grad` (arguments asserted there, at least one row)."""
    num_rows, num_cols = z.shape
    block_v = min(_BLOCK_V, triton.next_power_of_2(num_cols))
    has_entropy = grad_entropy is not None
    _logits_grad_kernel[(num_rows, triton.cdiv(num_cols, block_v))](
        z, z.stride(0), out, out.stride(0),
        targets, lse, mean_z, grad_logp, grad_entropy if has_entropy else grad_logp,
        num_cols, col_start, inv_t,
        HAS_GRAD_ENTROPY=has_entropy, BLOCK_V=block_v, num_warps=_NUM_WARPS,
    )
