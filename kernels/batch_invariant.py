"""Batch-invariant ops: a token's result has the same bits whatever else shares the call.

    from kernels.batch_invariant import linear_invariant, attention_invariant, linear_logprobs_invariant
    y = linear_invariant(x, weight, bias)                        # (..., K) -> (..., N), like F.linear
    o = attention_invariant(q, k, v, mask)                       # (n, Hkv, M, D) rows over (n, Hkv, L, D) keys
    logp = linear_logprobs_invariant(hidden, weight, targets, temperature, mask)
    logp = logprobs_from_logits_invariant(linear_invariant(hidden, weight, out_dtype=torch.float32), targets)

What an exact (batch-invariant) forward needs: the value computed for one row (a token) must not
depend on how many other rows are in the call, nor on where the row sits among them. Plain torch
breaks that in the matmuls: MKL picks another kernel and summation order below ~7 rows (measured:
F.linear of 1..3 rows of a 576 x 1536 SmolLM2 projection differ from the same rows inside a 200-row
call by up to 4e-5), cuBLAS picks kernels and split-K by shape. What these ops do instead:

- CPU matmuls run in fixed-shape tiles: the rows padded to a multiple of ROW_TILE and handed to one
  `bmm` as (tiles, ROW_TILE, K) @ (K, N). For a fixed (ROW_TILE, K, N), MKL gives every row the same
  bits whatever its place in the tile and whatever the number of tiles (tests/test_exact_mode.py
  checks both on this machine's torch). CUDA: `batch_invariant_triton.bmm_triton` (fixed tiles, one
  K order, no split-K) needs no padding.
- Attention reduces over the keys in a fixed order: scores and P [V, 1] in (Q_TILE x KV_TILE) tiles
  (fixed-shape bmm again; the ones column gives each block's sum of p), one global row max (a max is
  exact in any order), the block sums and P V tiles accumulated block after block from key 0. Keys a query must not see get p = 0 exactly,
  so blocks past its last key add exact zeros: a query at position p gets the same bits whether its
  keys are padded to p + 1 (decode), to a chunk's end (chunked prefill) or to the whole sequence
  (training forward).
- Log-probs: the logits of `linear_invariant` (per ROW_TILE rows, the very logits the engine samples
  from) reduced by `kernels.logprobs`' row kernel (the one `kernels.linear_logprobs` runs) in fixed
  VOCAB_CHUNK column chunks, so the recorded behaviour log-prob of a sampled token and the training
  forward's log-prob of the same token are the same reduction of the same numbers.
Row reductions: a max is exact; a sum is a fixed-shape product (above) or `row_mean_invariant`
(torch's per-row mean on CPU; on CUDA torch splits a row's reduction by the tensor's shape).
Elementwise ops are per element already, except those whose vector and scalar-tail code differ in
torch's CPU kernels (measured: sigmoid, silu, rsqrt, exp2 differ in the tail; exp, log, sin, cos,
sqrt, division do not): the exact model path avoids the former (cir/model/transformer.py).

Backward: plain torch on the full tensors (gradients need not be bitwise, only the forward values).
Costs (ROW_TILE padding, attention's explicit score tiles): see bench/exact.py and the README.
"""
from __future__ import annotations

import torch

from kernels._checks import check_temperature
from kernels.logprobs import finish_state, logits_grad, lse_update, new_state

# Rows per CPU matmul tile. 1024 x 576 @ 576 x 1536 (2-core CPU, 1 thread): one F.linear 18.4 ms;
# tiles of 8 / 16 / 32 / 64 rows: 35 / 24 / 21 / 20 ms. 32 keeps the update near a plain GEMM;
# the price is paid by small decode batches (a 2-row step computes 32 rows).
ROW_TILE = 32
Q_TILE, KV_TILE = 16, 32  # attention score tiles (query rows x keys)
VOCAB_CHUNK = 4096  # logit columns per step of the row kernel (and of the backward's recompute)


_TRITON_ON_CPU = False  # tests: run the CUDA path (Triton, TRITON_INTERPRET=1) on CPU tensors


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda or _TRITON_ON_CPU


def _tile_bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """a (B, m, k) @ b (B, k, n) where every call with this (m, k, n) must give each output element
    the same bits: torch.bmm on CPU, the fixed-tile Triton kernel on CUDA. out_dtype float32 keeps
    the fp32 accumulator of bf16 / fp16 operands (CPU: the operands upcast, their products exact).
    Autocast is off inside: the operands' dtypes are the caller's choice, the same in every path."""
    if _use_triton(a):
        from kernels.batch_invariant_triton import bmm_triton

        return bmm_triton(a, b, out_dtype=out_dtype)
    if out_dtype is not None and out_dtype != a.dtype:
        a, b = a.to(out_dtype), b.to(out_dtype)
    with torch.autocast(a.device.type, enabled=False):
        return torch.bmm(a, b)


def _mm_rows_invariant(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (M, K) @ weight.T (K, N) -> (M, N), each row's bits independent of M and of its row index."""
    rows, num_in = x.shape
    if _use_triton(x):  # no padding: the kernel's rows are independent by construction
        return _tile_bmm(x[None], weight.t()[None], out_dtype)[0]
    num_tiles = max(1, -(-rows // ROW_TILE))
    padded = num_tiles * ROW_TILE
    if padded != rows:
        x = torch.cat((x, x.new_zeros(padded - rows, num_in)))
    w_t = weight.t()[None].expand(num_tiles, num_in, weight.shape[0])  # stride-0 batch: no copy
    return _tile_bmm(x.contiguous().view(num_tiles, ROW_TILE, num_in), w_t, out_dtype).view(padded, -1)[:rows]


def row_mean_invariant(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> its mean over the last dim (..., 1) in float32, each row's bits independent of the
    other rows; differentiable. CPU: torch's mean (an inner reduction done row by row, the same way
    for any row count: checked in tests/test_exact_mode.py). CUDA: x @ ones through the fixed-tile
    kernel (torch's CUDA reductions pick how to split a row from the tensor's shape)."""
    if not _use_triton(x):
        return x.float().mean(-1, keepdim=True)
    flat = x.reshape(1, -1, x.shape[-1])
    total = _TileBmm.apply(flat, flat.new_ones(1, x.shape[-1], 1))  # (1, rows, 1) fp32
    return (total / x.shape[-1]).view(*x.shape[:-1], 1)


class _LinearInvariant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype):
        out = _mm_rows_invariant(x, weight, out_dtype)
        if bias is not None:
            out = out + bias  # separately: a fused addmm would round differently
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(x.dtype)
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.t() @ x if ctx.needs_input_grad[1] else None
        return grad_x, grad_w, grad_b, None


def linear_invariant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """F.linear (x (..., K), weight (N, K), bias (N,) or None) with batch-invariant rows; differentiable.

    Under autocast, x / weight / bias are cast to the autocast dtype first (as F.linear would be).
    out_dtype: the result's dtype (default x's); float32 keeps the accumulator of bf16 operands."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_invariant: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}")
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if x.dtype != weight.dtype:
        raise ValueError(f"linear_invariant: x is {x.dtype}, weight {weight.dtype}")
    lead = x.shape[:-1]
    with torch.autocast(device_type, enabled=False):
        out = _LinearInvariant.apply(x.reshape(-1, x.shape[-1]), weight, bias, out_dtype)
    return out.view(*lead, weight.shape[0])


class _TileBmm(torch.autograd.Function):
    """_tile_bmm with an fp32 result (whatever the operands' dtype), differentiable."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _tile_bmm(a, b, torch.float32)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        grad_a = torch.bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b = torch.bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b


def _pad_dim(x: torch.Tensor, dim: int, multiple: int, value: float | bool = 0) -> torch.Tensor:
    extra = -x.shape[dim] % multiple
    if extra == 0:
        return x.contiguous()
    pad_shape = list(x.shape)
    pad_shape[dim] = extra
    return torch.cat((x, x.new_full(pad_shape, value)), dim=dim)


def attention_invariant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with a fixed reduction order over the keys; differentiable.

    q (n, Hkv, M, D): M query rows per kv head (GQA: the G heads of a group as G x more rows);
    k, v (n, Hkv, L, D), finite; mask (n, 1, M, L) bool, True where a row may see a key (every real
    row must see at least one). Returns (n, Hkv, M, D) in q's dtype. Row r's result depends only on
    q[r], the keys and values it may see and their positions, never on M, L or the other rows.
    """
    n, num_heads, num_rows, head_dim = q.shape
    num_keys = k.shape[2]
    if k.shape != (n, num_heads, num_keys, head_dim) or v.shape != k.shape:
        raise ValueError(f"attention_invariant: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if mask.shape != (n, 1, num_rows, num_keys) or mask.dtype != torch.bool:
        raise ValueError(f"attention_invariant: mask must be bool (n, 1, M, L) = {(n, 1, num_rows, num_keys)}, "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    scale = head_dim ** -0.5 if scale is None else scale
    # 1) pad rows to Q_TILE and keys to KV_TILE (padded keys are masked out, padded rows dropped)
    q, k, v = _pad_dim(q, 2, Q_TILE), _pad_dim(k, 2, KV_TILE), _pad_dim(v, 2, KV_TILE)
    mask = _pad_dim(_pad_dim(mask, 3, KV_TILE, False), 2, Q_TILE, False)
    mt, lt = q.shape[2] // Q_TILE, k.shape[2] // KV_TILE
    tiles = (n, num_heads, mt, lt)
    # 2) scores, one fixed-shape (Q_TILE, D) @ (D, KV_TILE) product per (row tile, key tile)
    q_t = q.view(n, num_heads, mt, 1, Q_TILE, head_dim).expand(*tiles, Q_TILE, head_dim)
    k_t = k.view(n, num_heads, 1, lt, KV_TILE, head_dim).expand(*tiles, KV_TILE, head_dim)
    s = _TileBmm.apply(q_t.reshape(-1, Q_TILE, head_dim), k_t.reshape(-1, KV_TILE, head_dim).transpose(1, 2))
    s = s.view(*tiles, Q_TILE, KV_TILE) * scale  # fp32
    visible = mask.view(n, 1, mt, Q_TILE, lt, KV_TILE).transpose(3, 4)  # (n, 1, mt, lt, Q_TILE, KV_TILE)
    s = s.masked_fill(~visible, float("-inf"))
    # 3) one max per row over all its keys (exact in any order), p = exp(s - max): 0 where masked
    row_max = s.amax(dim=(3, 5), keepdim=True)
    row_max = torch.where(row_max == float("-inf"), 0.0, row_max).detach()
    p = torch.exp(s - row_max)  # (n, Hkv, mt, lt, Q_TILE, KV_TILE) fp32
    # 4) P [V, 1] per tile: the weighted values and, in the last column, the block's sum of p, both
    # in the fixed order of one fixed-shape product (a torch row sum picks its split from the shape
    # on CUDA); then the blocks accumulated in key order from block 0
    v1 = torch.cat((v, v.new_ones(n, num_heads, v.shape[2], 1)), dim=-1)  # (n, Hkv, L', D + 1)
    v_t = v1.view(n, num_heads, 1, lt, KV_TILE, head_dim + 1).expand(*tiles, KV_TILE, head_dim + 1)
    pv = _TileBmm.apply(p.to(v.dtype).reshape(-1, Q_TILE, KV_TILE), v_t.reshape(-1, KV_TILE, head_dim + 1))
    pv = pv.view(*tiles, Q_TILE, head_dim + 1)  # fp32
    block_sums, pv = pv[..., head_dim], pv[..., :head_dim]  # (n, Hkv, mt, lt, Q_TILE), (..., D)
    total, acc = block_sums[:, :, :, 0], pv[:, :, :, 0]
    for j in range(1, lt):
        total = total + block_sums[:, :, :, j]
        acc = acc + pv[:, :, :, j]
    # a real row's total is >= 1 (its max key gives exp(0)); padded rows see no key: 1, not 0 / 0
    out = (acc / total.clamp_min(1.0)[..., None]).to(q.dtype)  # (n, Hkv, mt, Q_TILE, D)
    return out.reshape(n, num_heads, mt * Q_TILE, head_dim)[:, :, :num_rows]


def causal_attention_invariant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """One sequence: q (n, Hq, D) are the last n of the L positions whose keys / values k, v (L, Hkv, D)
    are given; each query sees the keys up to its own position. -> (n, Hq, D); differentiable."""
    num_q, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[0], k.shape[1]
    group = num_q_heads // num_kv_heads
    q_pos = torch.arange(num_keys - num_q, num_keys, device=q.device)
    causal = torch.arange(num_keys, device=q.device)[None, :] <= q_pos[:, None]  # (n, L)
    mask = causal.repeat(group, 1)[None, None]  # (1, 1, G n, L): rows are (head of group, query)
    q_g = q.transpose(0, 1).reshape(1, num_kv_heads, group * num_q, head_dim)
    out = attention_invariant(q_g, k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, scale)
    return out.reshape(num_q_heads, num_q, head_dim).transpose(0, 1)


def paged_attention_invariant(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan,
                              scale: float | None = None) -> torch.Tensor:
    """`kernels.paged_attention_reference`'s job (same cache layout; `plan` from `plan_reference` on
    the step's metadata) through `attention_invariant`: decode rows batched, prefill chunks one by
    one, each query over its own keys 0..position. q (T, Hq, D) -> (T, Hq, D). Forward only."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    if plan.decode_rows is not None:
        n = plan.decode_rows.shape[0]
        k = plan.gather(k_cache, plan.decode_slots, n, "k")  # (n, Hkv, L, D)
        v = plan.gather(v_cache, plan.decode_slots, n, "v")
        length = k.shape[2]
        visible = (torch.ones(n, 1, 1, length, dtype=torch.bool, device=q.device) if plan.decode_mask is None
                   else plan.decode_mask)
        q_g = q[plan.decode_rows].reshape(n, num_kv_heads, group, head_dim)  # rows: the group's heads
        o = attention_invariant(q_g, k, v, visible.expand(n, 1, group, length), scale)
        out[plan.decode_rows] = o.reshape(n, num_q_heads, head_dim)
    for start, end, slots, _ in plan.prefill:
        k = plan.gather(k_cache, slots, 1, "k1")[0].transpose(0, 1)  # (L, Hkv, D)
        v = plan.gather(v_cache, slots, 1, "v1")[0].transpose(0, 1)
        out[start:end] = causal_attention_invariant(q[start:end], k, v, scale)
    return out


def _logit_rows(vocab_size: int, device: torch.device) -> int:
    """Rows of fp32 logits held at once by linear_logprobs_invariant: whole ROW_TILE tiles within
    256 MiB (CUDA) / 32 MiB (CPU), as `kernels.linear_logprobs` budgets its chunks. The count does not
    change any bits (a row's logits do not depend on the other rows of the call)."""
    budget = (256 << 20) if device.type == "cuda" else (32 << 20)
    return max(1, budget // (4 * vocab_size) // ROW_TILE) * ROW_TILE


def _rows_logprobs(z: torch.Tensor, targets: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, ...]:
    """`kernels.logprobs`' row kernel over logits z (R, V) in fixed VOCAB_CHUNK column chunks:
    (logp, entropy, lse, E_p[z]) per row, each row's bits independent of R."""
    backend = "triton" if _use_triton(z) else "torch"
    z = z.float()
    state = new_state(z.shape[0], z.device)  # (4, R)
    for col in range(0, z.shape[1], VOCAB_CHUNK):
        lse_update(z[:, col:col + VOCAB_CHUNK], col, targets, inv_t, state, backend)
    return finish_state(state)


class _LinearLogprobsInvariant(torch.autograd.Function):
    """Forward: per ROW_TILE rows, z = `linear_invariant`'s product (the logits the engine samples
    from), then the row kernel. Backward: linear_logprobs' math (`logits_grad` per vocabulary chunk,
    z recomputed with plain GEMMs: gradients need not be bitwise)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, inv_t: float):
        step = _logit_rows(weight.shape[0], hidden.device)
        outs = [_rows_logprobs(_mm_rows_invariant(hidden[r0:r0 + step], weight, torch.float32), targets[r0:r0 + step],
                               inv_t) for r0 in range(0, hidden.shape[0], step)]
        logp, entropy, lse, mean_z = (torch.cat(parts) for parts in zip(*outs))
        ctx.save_for_backward(hidden, weight, targets, lse, mean_z)
        ctx.inv_t = inv_t
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, mean_z = ctx.saved_tensors
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]
        if (grad_logp is None and grad_entropy is None) or not (needs_hidden or needs_weight):
            return None, None, None, None
        g_logp = grad_logp.float().contiguous() if grad_logp is not None else torch.zeros_like(lse)
        g_entropy = grad_entropy.float().contiguous() if grad_entropy is not None else None
        backend = "triton" if _use_triton(hidden) else "torch"
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if needs_hidden else None
        grad_w = torch.empty_like(weight) if needs_weight else None
        for col in range(0, weight.shape[0], VOCAB_CHUNK):
            w_c = weight[col:col + VOCAB_CHUNK]  # (C, D)
            z = (hidden @ w_c.t()).float()  # (N, C), recomputed
            logits_grad(z, col, targets, ctx.inv_t, lse, mean_z, g_logp, g_entropy, z, backend)  # dz, in place
            dz = z.to(hidden.dtype)
            if needs_weight:
                grad_w[col:col + VOCAB_CHUNK] = dz.t() @ hidden
            if needs_hidden:
                grad_h += (dz @ w_c).float()
        return None if grad_h is None else grad_h.to(hidden.dtype), grad_w, None, None


def logprobs_from_logits_invariant(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                                   return_entropy: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The engine's side of `linear_logprobs_invariant`: logits (R, V) = `linear_invariant(hidden,
    weight, out_dtype=torch.float32)` (what exact-mode sampling reads) -> log_softmax(logits / temperature)[targets] (R,) fp32,
    the same bits `linear_logprobs_invariant(hidden, weight, targets, temperature)` gives. No autograd."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logprobs_from_logits_invariant: logits {tuple(logits.shape)}, targets {tuple(targets.shape)}")
    logp, entropy, _, _ = _rows_logprobs(logits, targets.to(torch.int64), 1.0 / check_temperature(temperature))
    return (logp, entropy) if return_entropy else logp


def linear_logprobs_invariant(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
    mask: torch.Tensor | None = None, return_entropy: bool = False, *, check_targets: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`kernels.linear_logprobs` (same arguments, same values within float tolerance) whose value for
    a row does not depend on the other rows: masked rows are computed too (then zeroed), the logits of
    ROW_TILE rows at a time are `linear_invariant`'s (so the engine can sample from the very logits
    it records the log-prob of, `logprobs_from_logits_invariant`), reduced by `kernels.logprobs`' row
    kernel in fixed VOCAB_CHUNK column chunks. check_targets: as linear_logprobs
    (a target outside [0, V) is a ValueError on CPU; False skips the host read)."""
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
    logp, entropy = _LinearLogprobsInvariant.apply(hidden, weight, targets.to(torch.int64), inv_t)
    if mask is not None:
        if mask.shape != targets.shape:
            raise ValueError(f"mask has shape {tuple(mask.shape)}, targets {tuple(targets.shape)}")
        keep = mask != 0
        logp, entropy = torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0)
    return (logp, entropy) if return_entropy else logp
