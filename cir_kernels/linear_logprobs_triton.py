"""Triton GEMMs with the log-prob math in their epilogue: the CUDA path of `cir_kernels.linear_logprobs`.

    state = lse_gemm(hidden, weight, targets, inv_t)                         # (4, N): m, s, w, z_target
    dz_gemm(hidden, weight[c0:c1], c0, targets, inv_t, lse, mean_z, g, h, dz)  # dz (N, c1 - c0)

`lse_gemm` computes z = hidden @ weight^T / T one [BLOCK_M, BLOCK_N] tile at a time (tl.dot, inputs
in their own dtype, fp32 accumulation) and folds each tile straight into the online log-sum-exp
state (m, s, w) of its rows (`cir_kernels.logprobs` writes the math): the logits never reach memory. A
program owns BLOCK_M rows and one of `num_splits` vocabulary ranges; the splits' states are merged after:
  m = max_i m_i,  s = sum_i e^(m_i - m) s_i,  w = sum_i e^(m_i - m) (w_i + (m_i - m) s_i).
The target's logit is a separate per-row dot product (`target_logits`: N x D reads, no GEMM).
Program ids run split-fastest, so the ~132 programs resident at once are ~16 row blocks x 8 splits:
16 hidden blocks (16 x BLOCK_M x D x 2 bytes = 15 MB at D = 3584) stay in L2 while 8 weight tiles
stream, i.e. the GEMM reads the weight ~M / (16 BLOCK_M) times and each hidden block once.
`dz_gemm` recomputes one vocabulary chunk's z tile by tile and writes only dz = d loss / d z in the
hidden dtype (2 bytes per logit in bf16, against 4 + 4 + 2 through an fp32 chunk and a row kernel);
the two gradient GEMMs (dz^T h, dz W) stay with cuBLAS.

Tiles are sized for Hopper's wgmma: 128 x 128 output tiles, K steps of 64, 8 warps (2 warpgroups),
3 (lse) / 4 (dz) stages of cp.async pipelining ((128 + 128) x 64 x 2 bytes = 32 KiB per stage); on
CUDA `triton.autotune` times four such configs per (D, log2 N) at first use and keeps the fastest.
Every config compiles for sm_80 and sm_90 without spills (tests/test_kernels_compile.py; registers
per config in bench/RESULTS.md; the target logit inside the epilogue took lse_gemm to 255 registers
with spills). Speed owed: bench/kernels.py on the device. fp32 inputs, and the interpreter, use IEEE
fp32 dots (no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_M, _BLOCK_N, _BLOCK_K = 128, 128, 64  # off CUDA (the interpreter; tests swap in each CUDA config)
_SPLIT_M, _SPLIT_N = 128, 128  # the vocabulary-split arithmetic, whatever tile the kernel runs
_NUM_WARPS, _LSE_STAGES, _DZ_STAGES = 8, 3, 4
# CUDA: the device times these on first use per (D, log2 N) and keeps the fastest (triton.autotune).
# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), each compiled for sm_80 and sm_90 without spills
# (tests/test_kernels_compile.py); 128 x 256 tiles and 4-warp 128 x 128 tiles spilled.
_LSE_CONFIGS = [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 8, 4), (64, 128, 64, 4, 4)]
_DZ_CONFIGS = [(128, 128, 64, 8, 4), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4)]
_MIN_SPLITS = 8  # vocabulary splits per row block: the L2 reuse pattern above
_TARGET_PROGRAMS = 4 * 132  # ~4 waves on an H100 / H200 (132 SMs)
_GROUP_M = 8  # dz_gemm: row blocks that sweep the columns together (L2 reuse of the weight chunk)


@triton.jit
def _tile_logits(h_ptr, h_stride, w_ptr, w_stride, rows, row_ok, cols, col_ok, hidden_size,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 tile of hidden[rows] @ weight[cols]^T."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * h_stride
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * w_stride
    for k0 in range(0, hidden_size, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < hidden_size
        a = tl.load(h_rows + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # (BM, BK)
        b = tl.load(w_cols + k[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BK, BN)
        if DOT_FP32:  # fp32 inputs, or the interpreter (its bf16 dot is wrong): exact products, IEEE sums
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _lse_gemm_kernel(
    h_ptr, h_stride, w_ptr, w_stride, part_ptr,
    num_rows, vocab_size, hidden_size, cols_per_split, num_splits, inv_t, rows_bucket,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """(m, s, w) of rows [BLOCK_M block] over columns [split range] -> part (splits, 3, rows)."""
    pid = tl.program_id(0)
    split = pid % num_splits
    rows = (pid // num_splits) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    w = tl.zeros((BLOCK_M,), dtype=tl.float32)
    col_lo = split * cols_per_split
    col_hi = tl.minimum(col_lo + cols_per_split, vocab_size)
    for n0 in range(col_lo, col_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < col_hi
        acc = _tile_logits(h_ptr, h_stride, w_ptr, w_stride, rows, row_ok, cols, col_ok, hidden_size,
                           BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32)
        z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - m_safe)
        dev = z - m_safe[:, None]  # -inf on padding columns
        e = tl.exp(dev)
        w = a * tl.where(s > 0.0, w + (m - m_safe) * s, 0.0) + tl.sum(tl.where(e > 0.0, e * dev, 0.0), axis=1)
        s = a * s + tl.sum(e, axis=1)
        m = m_new
    base = part_ptr + split * 3 * num_rows + rows
    tl.store(base, m, mask=row_ok)
    tl.store(base + num_rows, s, mask=row_ok)
    tl.store(base + 2 * num_rows, w, mask=row_ok)


@triton.jit
def _dz_gemm_kernel(
    h_ptr, h_stride, w_ptr, w_stride, dz_ptr, dz_stride,
    targets_ptr, lse_ptr, mean_z_ptr, grad_logp_ptr, grad_entropy_ptr,
    num_rows, num_cols, hidden_size, col_start, inv_t, rows_bucket,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """dz (rows, chunk columns) = (g ([v = t] - p) - h p (z - E_p[z])) / T, z recomputed per tile."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(num_rows, BLOCK_M)
    num_n = tl.cdiv(num_cols, BLOCK_N)
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size)
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < num_rows, cols < num_cols
    acc = _tile_logits(h_ptr, h_stride, w_ptr, w_stride, rows, row_ok, cols, col_ok, hidden_size,
                       BLOCK_M, BLOCK_N, BLOCK_K, DOT_FP32)
    z = acc * inv_t
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    t = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    g = tl.load(grad_logp_ptr + rows, mask=row_ok, other=0.0)
    is_t = (cols[None, :] + col_start) == t[:, None]
    dz = g[:, None] * (is_t.to(tl.float32) - p)
    if HAS_GRAD_ENTROPY:
        mean_z = tl.load(mean_z_ptr + rows, mask=row_ok, other=0.0)
        g_h = tl.load(grad_entropy_ptr + rows, mask=row_ok, other=0.0)
        dz -= g_h[:, None] * tl.where(p > 0.0, p * (z - mean_z[:, None]), 0.0)
    out = dz_ptr + rows.to(tl.int64)[:, None] * dz_stride + cols[None, :]
    tl.store(out, (dz * inv_t).to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _target_logit_kernel(h_ptr, h_stride, w_ptr, w_stride, targets_ptr, out_ptr, vocab_size, hidden_size, inv_t,
                         BLOCK_D: tl.constexpr):
    """out[row] = <h[row], w[targets[row]]> * inv_t, or NaN for a target outside [0, V)."""
    row = tl.program_id(0).to(tl.int64)
    t = tl.load(targets_ptr + row)
    inside = (t >= 0) & (t < vocab_size)
    w_row = w_ptr + tl.where(inside, t, 0).to(tl.int64) * w_stride
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for d0 in range(0, hidden_size, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = d < hidden_size
        acc += tl.load(h_ptr + row * h_stride + d, mask=ok, other=0.0).to(tl.float32) * \
            tl.load(w_row + d, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row, tl.where(inside, tl.sum(acc, axis=0) * inv_t, float("nan")))


def _tuned(kernel, specs: list[tuple[int, int, int, int, int]]):
    """`kernel` autotuned over `specs`, keyed by the hidden size and the row count's power of two (the first
    call in each bucket times every config once, a host sync; an out-of-resources config is skipped)."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
               for m, n, k, w, st in specs]
    return triton.autotune(configs=configs, key=["hidden_size", "rows_bucket"])(kernel)


_lse_gemm_tuned = _tuned(_lse_gemm_kernel, _LSE_CONFIGS)
_dz_gemm_tuned = _tuned(_dz_gemm_kernel, _DZ_CONFIGS)


def _rows_bucket(num_rows: int) -> int:
    return max(num_rows - 1, 0).bit_length()


def _dot_fp32(hidden: torch.Tensor) -> bool:
    return hidden.dtype == torch.float32 or hidden.device.type != "cuda"


def _check(hidden: torch.Tensor, weight: torch.Tensor) -> None:
    assert hidden.stride(1) == 1 and weight.stride(1) == 1 and hidden.dtype == weight.dtype
    assert hidden.shape[1] == weight.shape[1]


def num_splits(num_rows: int, vocab_size: int) -> int:
    """Vocabulary splits of lse_gemm: >= _MIN_SPLITS, more when few row blocks would leave SMs idle."""
    num_m, num_n = triton.cdiv(num_rows, _SPLIT_M), triton.cdiv(vocab_size, _SPLIT_N)
    return max(1, min(num_n, max(_MIN_SPLITS, triton.cdiv(_TARGET_PROGRAMS, max(num_m, 1)))))


def lse_gemm(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: float) -> torch.Tensor:
    """(4, N) float32 state (max m, s, w, z_target) of z = hidden @ weight^T * inv_t over all V columns;
    z_target is NaN for a target outside [0, V)."""
    _check(hidden, weight)
    num_rows, hidden_size = hidden.shape
    vocab_size = weight.shape[0]
    state = torch.empty(4, num_rows, dtype=torch.float32, device=hidden.device)
    if num_rows == 0:
        return state
    splits = num_splits(num_rows, vocab_size)
    cols_per_split = triton.cdiv(triton.cdiv(vocab_size, _SPLIT_N), splits) * _SPLIT_N
    splits = triton.cdiv(vocab_size, cols_per_split)  # no empty split
    part = torch.empty(splits, 3, num_rows, dtype=torch.float32, device=hidden.device)
    args = (hidden, hidden.stride(0), weight, weight.stride(0), part,
            num_rows, vocab_size, hidden_size, cols_per_split, splits, inv_t, _rows_bucket(num_rows))
    if hidden.is_cuda:
        _lse_gemm_tuned[lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]) * splits,)](
            *args, DOT_FP32=_dot_fp32(hidden))
    else:
        _lse_gemm_kernel[(triton.cdiv(num_rows, _BLOCK_M) * splits,)](
            *args, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, DOT_FP32=_dot_fp32(hidden),
            num_warps=_NUM_WARPS, num_stages=_LSE_STAGES)
    m_i, s_i, w_i = part.unbind(1)  # (splits, N) each
    m = m_i.amax(0)
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    a = torch.exp(m_i - m_safe)
    state[0] = m
    state[1] = (a * s_i).sum(0)
    state[2] = (a * torch.where(s_i > 0, w_i + (m_i - m_safe) * s_i, 0.0)).sum(0)
    state[3] = target_logits(hidden, weight, targets, inv_t)
    return state


def target_logits(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, inv_t: float) -> torch.Tensor:
    """z_target = <hidden_i, weight[t_i]> * inv_t (N,), fp32 accumulation, NaN where t is outside [0, V).
    Kept out of the GEMM's epilogue: there it cost two more [BLOCK_M, BLOCK_N] reductions per tile and
    registers the epilogue is short of (255 registers with spills, against 189 without; sm_90 cubin)."""
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    if hidden.shape[0]:
        _target_logit_kernel[(hidden.shape[0],)](
            hidden, hidden.stride(0), weight, weight.stride(0), targets, out, weight.shape[0], hidden.shape[1], inv_t,
            BLOCK_D=min(1024, triton.next_power_of_2(hidden.shape[1])), num_warps=4,
        )
    return out


def dz_gemm(hidden: torch.Tensor, weight_chunk: torch.Tensor, col_start: int, targets: torch.Tensor, inv_t: float,
            lse: torch.Tensor, mean_z: torch.Tensor, grad_logp: torch.Tensor, grad_entropy: torch.Tensor | None,
            out: torch.Tensor) -> None:
    """out (N, C) in hidden's dtype = d loss / d raw logits of columns col_start .. col_start + C."""
    _check(hidden, weight_chunk)
    num_rows, hidden_size = hidden.shape
    num_cols = weight_chunk.shape[0]
    assert out.shape == (num_rows, num_cols) and out.stride(1) == 1
    if num_rows == 0 or num_cols == 0:
        return
    has_entropy = grad_entropy is not None
    args = (hidden, hidden.stride(0), weight_chunk, weight_chunk.stride(0), out, out.stride(0),
            targets, lse, mean_z, grad_logp, grad_entropy if has_entropy else grad_logp,
            num_rows, num_cols, hidden_size, col_start, inv_t, _rows_bucket(num_rows))
    flags = dict(HAS_GRAD_ENTROPY=has_entropy, GROUP_M=_GROUP_M, DOT_FP32=_dot_fp32(hidden))
    if hidden.is_cuda:
        _dz_gemm_tuned[lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(num_cols, meta["BLOCK_N"]),)](
            *args, **flags)
    else:
        _dz_gemm_kernel[(triton.cdiv(num_rows, _BLOCK_M) * triton.cdiv(num_cols, _BLOCK_N),)](
            *args, BLOCK_M=_BLOCK_M, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=_NUM_WARPS,
            num_stages=_DZ_STAGES, **flags)
