"""Batch-invariant ops: a token's result has the same bits whatever else shares the call.

    from cir_kernels.batch_invariant import linear_invariant, attention_invariant
    y = linear_invariant(x, weight, bias)                        # (..., K) -> (..., N), like F.linear
    o = attention_invariant(q, k, v, key_lens)                   # (n, Hkv, M, D) rows over keys [0, key_lens)
    # log-probs by the same reduction in training and sampling: cir_kernels/batch_invariant_logprobs.py

Every op takes `backend=None | "triton" | "torch"` (None: Triton for CUDA tensors, torch otherwise); it
picks the matmul under the tiles: `bmm_triton` (cir_kernels/batch_invariant_triton.py) or its torch
twin `bmm_reference` / `mm_rows_reference` (cir_kernels/batch_invariant_reference.py). The rest of
the math here is plain torch on either path.

What an exact (batch-invariant) forward needs: the value computed for one row (a token) must not
depend on how many other rows are in the call, nor on where the row sits among them. Plain torch
breaks that in the matmuls: MKL picks another kernel and summation order below ~7 rows (measured:
F.linear of 1..3 rows of a 576 x 1536 SmolLM2 projection differ from the same rows inside a 200-row
call by up to 4e-5), cuBLAS picks kernels and split-K by shape. What these ops do instead:

- torch path (CPU) matmuls run in fixed-shape tiles: the rows padded to a multiple of ROW_TILE and
  handed to one `bmm` as (tiles, ROW_TILE, K) @ (K, N). For a fixed (ROW_TILE, K, N), MKL gives every
  row the same bits whatever its place in the tile and whatever the number of tiles
  (tests/test_exact_mode.py checks both on this machine's torch). Triton path (CUDA): `bmm_triton`
  (fixed tiles, one K order, no split-K) needs no padding.
- Attention is an online softmax over key tiles of KV_TILE keys at fixed positions (tile j holds
  keys [j KV_TILE, (j + 1) KV_TILE) of the sequence), taken in order from tile 0 for Q_TILE-row tiles
  of queries: scores and P [V, 1] as fixed-shape products per (row tile, key tile) (the ones column
  gives the tile's sum of p), then the running max / sum / output updated elementwise. A row skips
  (keeps its state bit for bit through) every tile it sees no key of, and keys it must not see get
  p = 0 exactly, so a query at position p gets the same bits whether its keys run to p + 1 (decode),
  to a chunk's end (chunked prefill) or to the whole sequence (training forward). Memory: one key
  tile's scores for the call's rows, O(rows x KV_TILE), never (rows x keys); the backward recomputes
  each tile's p (flash attention's), O(rows x KV_TILE) too.
- Log-probs (cir_kernels/batch_invariant_logprobs.py): the logits of `linear_invariant` (per ROW_TILE rows, the
  very logits the engine samples from) reduced by `cir_kernels.logprobs`' row kernel (the one
  `cir_kernels.linear_logprobs` runs) in fixed VOCAB_CHUNK column chunks, so the recorded behaviour log-prob
  of a sampled token and the training forward's log-prob of the same token are the same reduction of the same
  numbers.
Row reductions: a max is exact; a sum is a fixed-shape product (above) or `row_mean_invariant`
(torch's per-row mean on CPU; on CUDA torch splits a row's reduction by the tensor's shape).
Elementwise ops are per element already, except those whose vector and scalar-tail code differ in
torch's CPU kernels (measured: sigmoid, silu, rsqrt, exp2 differ in the tail; exp, log, sin, cos,
sqrt, division do not): the exact model path avoids the former (cir/model/transformer.py).

Operand shapes and layouts are fixed too: MKL's bits for a row changed with the row's place in the
tile for 5..11 columns (measured: P [V, 1] is therefore at least PV_MIN_COLS wide) and with an
operand given as a transposed view (so the attention's key-tile operands are always contiguous).

Backward: plain torch on the full tensors (gradients need not be bitwise, only the forward values);
attention's recomputes p per key tile (flash attention's backward, plain fp32 matmuls).
Costs (ROW_TILE padding, attention's tile loop): see bench/exact.py, bench/RESULTS.md and the README.
"""
from __future__ import annotations

import torch

from cir_kernels._checks import pick_backend
from cir_kernels.batch_invariant_reference import ROW_TILE, bmm_reference, mm_rows_reference
from cir_kernels.batch_invariant_triton import bmm_triton

__all__ = ["ROW_TILE", "attention_invariant", "causal_attention_invariant", "linear_invariant", "mm_rows_invariant",
           "paged_attention_invariant", "row_mean_invariant", "tile_bmm"]

# Attention tiles (query rows x keys). KV_TILE, SmolLM2 heads (9 q / 3 kv, D 64), 1 thread: a decode
# step of 8 sequences over 2048 keys 23.4 / 16.6 / 13.3 ms per layer for 32 / 64 / 128 keys; fwd + bwd
# of one 2048-token sequence 0.88 / 0.85 / 1.04 s (the causal skip is coarser with larger tiles).
Q_TILE, KV_TILE = 16, 64
PV_MIN_COLS = 16  # P [V, 1] widened with zero columns to at least this (tiny head_dim only, see above)


def tile_bmm(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype | None = None,
             backend: str | None = None) -> torch.Tensor:
    """a (B, m, k) @ b (B, k, n) where every call with this (m, k, n) must give each output element
    the same bits: `bmm_reference` (torch.bmm) or the fixed-tile `bmm_triton`. out_dtype float32 keeps
    the fp32 accumulator of bf16 / fp16 operands."""
    if pick_backend(backend, a) == "triton":
        return bmm_triton(a, b, out_dtype=out_dtype)
    return bmm_reference(a, b, out_dtype)


def mm_rows_invariant(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None,
                      backend: str | None = None) -> torch.Tensor:
    """x (M, K) @ weight.T (K, N) -> (M, N), each row's bits independent of M and of its row index."""
    if pick_backend(backend, x) == "triton":  # no padding: the kernel's rows are independent by construction
        return bmm_triton(x[None], weight.t()[None], out_dtype=out_dtype)[0]
    return mm_rows_reference(x, weight, out_dtype)


def row_mean_invariant(x: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """x (..., K) -> its mean over the last dim (..., 1) in float32, each row's bits independent of the
    other rows; differentiable. CPU: torch's mean (an inner reduction done row by row, the same way
    for any row count: checked in tests/test_exact_mode.py). CUDA: x @ ones through the fixed-tile
    kernel (torch's CUDA reductions pick how to split a row from the tensor's shape)."""
    backend = pick_backend(backend, x)
    if backend == "torch":
        return x.float().mean(-1, keepdim=True)
    flat = x.reshape(1, -1, x.shape[-1])
    total = _TileBmm.apply(flat, flat.new_ones(1, x.shape[-1], 1), backend)  # (1, rows, 1) fp32
    return (total / x.shape[-1]).view(*x.shape[:-1], 1)


class _LinearInvariant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_dtype, backend):
        out = mm_rows_invariant(x, weight, out_dtype, backend)
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
        return grad_x, grad_w, grad_b, None, None


def linear_invariant(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None, *, backend: str | None = None) -> torch.Tensor:
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
        out = _LinearInvariant.apply(x.reshape(-1, x.shape[-1]), weight, bias, out_dtype, backend)
    return out.view(*lead, weight.shape[0])


class _TileBmm(torch.autograd.Function):
    """tile_bmm with an fp32 result (whatever the operands' dtype), differentiable."""

    @staticmethod
    def forward(ctx, a, b, backend):
        ctx.save_for_backward(a, b)
        return tile_bmm(a, b, torch.float32, backend)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.to(a.dtype)
        grad_a = torch.bmm(grad, b.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_b = torch.bmm(a.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b, None


def _key_tile_t(k: torch.Tensor, j: int) -> torch.Tensor:
    """Key tile j of k (..., L, D), transposed: (B, D, KV_TILE) contiguous, B the leading dims' product
    (keys past L are zeros, masked). One copy, straight from k's layout (a paged-cache gather view)."""
    tile = k[..., j * KV_TILE:(j + 1) * KV_TILE, :]
    tile_t = tile.transpose(-1, -2).reshape(-1, k.shape[-1], tile.shape[-2])
    if tile_t.shape[-1] < KV_TILE:
        tile_t = torch.cat((tile_t, tile_t.new_zeros(*tile_t.shape[:2], KV_TILE - tile_t.shape[-1])), dim=-1)
    return tile_t.contiguous()


def _value_tile(v: torch.Tensor, j: int, extra_cols: int = 0) -> torch.Tensor:
    """Value tile j of v (..., L, D): (B, KV_TILE, D + extra_cols) contiguous, keys past L zeros; the
    extra columns (P [V, 1]) a column of ones, then zeros."""
    tile = v[..., j * KV_TILE:(j + 1) * KV_TILE, :]
    lead, num_keys = tile.shape[:-2], tile.shape[-2]
    if extra_cols:
        parts = [tile, tile.new_ones(*lead, num_keys, 1)]
        if extra_cols > 1:
            parts.append(tile.new_zeros(*lead, num_keys, extra_cols - 1))
        tile = torch.cat(parts, dim=-1)
    if num_keys < KV_TILE:
        tile = torch.cat((tile, tile.new_zeros(*lead, KV_TILE - num_keys, tile.shape[-1])), dim=-2)
    return tile.reshape(-1, KV_TILE, tile.shape[-1]).contiguous()


def _batched(x: torch.Tensor, num_row_tiles: int) -> torch.Tensor:
    """A key tile's (B, a, b) contiguous operand repeated for num_row_tiles row tiles: (num_row_tiles B,
    a, b), contiguous whatever the count (MKL's bits depend on the operand's layout: a transposed view
    measured 1 ulp off the contiguous copy)."""
    if num_row_tiles == 1:
        return x
    return x[None].expand(num_row_tiles, *x.shape).reshape(-1, *x.shape[1:])


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lens: torch.Tensor, scale: float,
                       first_row_tile: list[int], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The online softmax over key tiles (math in `_AttentionInvariant`). q (mt, B, Q_TILE, D),
    k / v (..., L, D) with B the leading dims' product, key_lens (mt, B, Q_TILE) -> (out (mt, B, Q_TILE, D)
    in q's dtype, lse (mt, B, Q_TILE) fp32). Every row takes the same ops for a given tile index
    whatever the call, which is all exactness needs."""
    num_row_tiles, batch, _, head_dim = q.shape
    # P [V, 1]: the weighted values and, in column D, the tile's sum of p, in the fixed order of one
    # fixed-shape product (a torch row sum picks its split from the shape on CUDA)
    extra_cols = max(1, PV_MIN_COLS - head_dim)
    key_pos = torch.arange(len(first_row_tile) * KV_TILE, device=q.device)
    m = total = acc = None  # running row max, sum of exp(s - m), sum of exp(s - m) v: (mt, B, Q_TILE[, D])
    for j, i0 in enumerate(first_row_tile):
        keys = slice(j * KV_TILE, (j + 1) * KV_TILE)
        # 1) scores of the row tiles i0.. that may see this key tile: one (Q_TILE, D) @ (D, KV_TILE) per row tile
        rows = num_row_tiles - i0
        s = tile_bmm(q[i0:].reshape(-1, Q_TILE, head_dim), _batched(_key_tile_t(k, j), rows), torch.float32, backend)
        s = s.view(rows, batch, Q_TILE, KV_TILE) * scale
        lens = key_lens[i0:]  # (rows, B, Q_TILE)
        s = s.masked_fill(key_pos[keys] >= lens[..., None], float("-inf"))
        # 2) the running max, p = exp(s - m): 0 where masked (m_safe: rows that have seen no key yet)
        m_new = s.amax(dim=-1) if j == 0 else torch.maximum(m[i0:], s.amax(dim=-1))
        m_safe = torch.where(m_new == float("-inf"), 0.0, m_new)
        p = torch.exp(s - m_safe[..., None])
        v1 = _batched(_value_tile(v, j, extra_cols), rows)
        pv = tile_bmm(p.to(v1.dtype).view(-1, Q_TILE, KV_TILE), v1, torch.float32, backend)
        pv = pv.view(rows, batch, Q_TILE, v1.shape[-1])
        if j == 0:  # every path starts each row here (tile 0 holds key 0)
            m, total, acc = m_new, pv[..., head_dim], pv[..., :head_dim]
            continue
        # 3) rescale the old partial sums by alpha = exp(m_old - m_new), add the tile's. A row with no
        # key in the tile has m_new = m_old, alpha = 1 and adds exact zeros: its total and max stay;
        # its output keeps its state untouched (not even a zero's sign changes)
        alpha = torch.exp(m[i0:] - m_safe)
        total[i0:] = total[i0:] * alpha + pv[..., head_dim]
        sees = lens > j * KV_TILE
        acc[i0:] = torch.where(sees[..., None], acc[i0:] * alpha[..., None] + pv[..., :head_dim], acc[i0:])
        m[i0:] = m_new
    # a row that sees a key has total > 0; a padded row sees none: 0 / 1, not 0 / 0
    out = acc / torch.where(total == 0, 1.0, total)[..., None]
    return out.to(q.dtype), m + torch.log(total)


class _AttentionInvariant(torch.autograd.Function):
    """softmax(q k^T scale) v over key tiles of KV_TILE keys at fixed positions (tile j holds keys
    [j KV_TILE, (j + 1) KV_TILE)), in order from tile 0, for Q_TILE-row tiles of queries:

        s = q k_j^T scale (masked: -inf),   m' = max(m, max_k s),   p = exp(s - m'),   alpha = exp(m - m')
        l' = alpha l + sum_k p,   acc' = alpha acc + p v_j,   m = m'        ...   out = acc / l

    from m = -inf, l = 0, acc = 0 (tile 0 sets them directly). The row sums and p v_j are one
    fixed-shape product P [V_j, 1], the rest elementwise: a row's bits depend on its query, its keys
    and values and their positions only.
    Memory: O(rows x KV_TILE) per tile, never the (rows x keys) scores. Backward (gradients need not be
    bitwise): flash attention's, the p of each tile recomputed from the saved lse = m + log l,
        dv_j = p^T do,   ds = p (do v_j^T - rowsum(do o)),   dq = ds k_j scale,   dk_j = ds^T q scale.
    """

    @staticmethod
    def forward(ctx, q, k, v, key_lens, scale: float, first_row_tile: tuple[int, ...], backend: str):
        with torch.autocast(q.device.type, enabled=False):
            out, lse = _attention_forward(q, k, v, key_lens, scale, list(first_row_tile), backend)
        ctx.save_for_backward(q, k, v, key_lens, out, lse)
        ctx.scale, ctx.first_row_tile = scale, first_row_tile
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, key_lens, out, lse = ctx.saved_tensors
        scale, num_keys = ctx.scale, k.shape[-2]
        with torch.autocast(q.device.type, enabled=False):
            q32, do = q.float(), grad_out.float()
            delta = (do * out.float()).sum(-1, keepdim=True)  # (mt, B, Q_TILE, 1)
            dq = torch.zeros_like(q32)
            num_key_tiles, batch, head_dim = len(ctx.first_row_tile), q.shape[1], q.shape[3]
            dk = torch.zeros(batch, num_key_tiles * KV_TILE, head_dim, device=k.device)
            dv = torch.zeros_like(dk)
            key_pos = torch.arange(num_key_tiles * KV_TILE, device=q.device)
            for j, i0 in enumerate(ctx.first_row_tile):
                keys = slice(j * KV_TILE, (j + 1) * KV_TILE)
                k_t, v_j = _key_tile_t(k, j).float(), _value_tile(v, j).float()  # (B, D, KV_TILE), (B, KV_TILE, D)
                visible = key_pos[keys] < key_lens[i0:, ..., None]
                s = torch.matmul(q32[i0:], k_t) * scale  # (rows, B, Q_TILE, KV_TILE)
                p = torch.where(visible, torch.exp(s - lse[i0:, ..., None]), 0.0)
                ds = p * (torch.matmul(do[i0:], v_j.transpose(1, 2)) - delta[i0:])
                dv[:, keys] += torch.einsum("mbqk,mbqd->bkd", p, do[i0:])
                dk[:, keys] += torch.einsum("mbqk,mbqd->bkd", ds, q32[i0:]) * scale
                dq[i0:] += torch.matmul(ds, k_t.transpose(1, 2)) * scale
        dk, dv = (g[:, :num_keys].reshape(t.shape).to(t.dtype) for g, t in ((dk, k), (dv, v)))
        return dq.to(q.dtype), dk, dv, None, None, None, None


def _attention_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lens: torch.Tensor, scale: float,
                    first_row: list[int] | None, backend: str | None) -> torch.Tensor:
    """q (B, M, D) over k, v (..., L, D) (any layout; B the product of the leading dims); row r sees
    keys [0, key_lens[b, r]) (key_lens (B, M) int, <= L). first_row[j]: no row before it sees a key of
    tile j (None: 0). -> (B, M, D), differentiable."""
    batch, num_rows, head_dim = q.shape
    num_tiles = -(-num_rows // Q_TILE)
    pad = num_tiles * Q_TILE - num_rows
    if pad:  # padded rows see no key: out 0, dropped
        q = torch.cat((q, q.new_zeros(batch, pad, head_dim)), dim=1)
        key_lens = torch.cat((key_lens, key_lens.new_zeros(batch, pad)), dim=1)
    q_t = q.reshape(batch, num_tiles, Q_TILE, head_dim).transpose(0, 1).contiguous()  # (mt, B, Q_TILE, D)
    lens_t = key_lens.reshape(batch, num_tiles, Q_TILE).transpose(0, 1).contiguous()  # (mt, B, Q_TILE)
    num_key_tiles = -(-k.shape[-2] // KV_TILE)
    first_row_tile = tuple(0 if first_row is None or j == 0 else min(first_row[j], num_rows - 1) // Q_TILE
                           for j in range(num_key_tiles))  # every row starts at tile 0
    out = _AttentionInvariant.apply(q_t, k, v, lens_t, scale, first_row_tile, pick_backend(backend, q))
    return out.transpose(0, 1).reshape(batch, num_tiles * Q_TILE, head_dim)[:, :num_rows]


def attention_invariant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_lens: torch.Tensor,
                        scale: float | None = None, *, backend: str | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v with a fixed reduction order over the keys; differentiable.

    q (n, Hkv, M, D): M query rows per kv head (GQA: the G heads of a group as G x more rows);
    k, v (n, Hkv, L, D), finite; key_lens (n, M) int: row r of item i sees keys [0, key_lens[i, r])
    (1 <= key_lens <= L for a real row). Returns (n, Hkv, M, D) in q's dtype. Row r's result depends
    only on q[r], the keys and values it sees, never on M, L or the other rows (the online softmax of
    `_AttentionInvariant`; memory O(M x KV_TILE) per kv head, not O(M x L)).
    """
    n, num_heads, num_rows, head_dim = q.shape
    num_keys = k.shape[2]
    if k.shape != (n, num_heads, num_keys, head_dim) or v.shape != k.shape:
        raise ValueError(f"attention_invariant: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if key_lens.shape != (n, num_rows) or key_lens.dtype.is_floating_point:
        raise ValueError(f"attention_invariant: key_lens must be int (n, M) = {(n, num_rows)}, "
                         f"got {key_lens.dtype} {tuple(key_lens.shape)}")
    scale = head_dim ** -0.5 if scale is None else scale
    lens = key_lens.to(torch.int64)[:, None].expand(n, num_heads, num_rows).reshape(n * num_heads, num_rows)
    out = _attention_rows(q.reshape(n * num_heads, num_rows, head_dim), k, v, lens, scale, None,
                          backend)  # k, v as they lie
    return out.view(n, num_heads, num_rows, head_dim)


def causal_attention_invariant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               scale: float | None = None, *, backend: str | None = None) -> torch.Tensor:
    """One sequence: q (n, Hq, D) are the last n of the L positions whose keys / values k, v (L, Hkv, D)
    are given; each query sees the keys up to its own position. -> (n, Hq, D); differentiable.
    Rows are ordered by position (query, then head of the group), so the rows that see key tile j are
    the rows from position j KV_TILE on: earlier row tiles skip it (half the causal work)."""
    num_q, num_q_heads, head_dim = q.shape
    num_keys, num_kv_heads = k.shape[0], k.shape[1]
    group = num_q_heads // num_kv_heads
    start = num_keys - num_q  # position of the first query
    scale = head_dim ** -0.5 if scale is None else scale
    q_rows = q.view(num_q, num_kv_heads, group, head_dim).permute(1, 0, 2, 3).reshape(num_kv_heads, -1, head_dim)
    lens = torch.arange(start + 1, num_keys + 1, device=q.device).repeat_interleave(group)  # (n G,)
    first_row = [max(0, j * KV_TILE - start) * group for j in range(-(-num_keys // KV_TILE))]
    out = _attention_rows(q_rows, k.transpose(0, 1), v.transpose(0, 1), lens[None].expand(num_kv_heads, -1), scale,
                          first_row, backend)  # (Hkv, n G, D)
    return out.view(num_kv_heads, num_q, group, head_dim).permute(1, 0, 2, 3).reshape(num_q, num_q_heads, head_dim)


def paged_attention_invariant(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan,
                              scale: float | None = None, *, backend: str | None = None) -> torch.Tensor:
    """`cir_kernels.paged_attention_reference`'s job (same cache layout; `plan` from `plan_reference` on
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
        lens = (torch.full((n,), length, device=q.device) if plan.decode_mask is None
                else plan.decode_mask.view(n, length).sum(-1))  # the mask is keys [0, seq_len)
        q_g = q[plan.decode_rows].reshape(n, num_kv_heads, group, head_dim)  # rows: the group's heads
        o = attention_invariant(q_g, k, v, lens[:, None].expand(n, group), scale, backend=backend)
        out[plan.decode_rows] = o.reshape(n, num_q_heads, head_dim)
    for start, end, slots, _ in plan.prefill:
        k = plan.gather(k_cache, slots, 1, "k1")[0].transpose(0, 1)  # (L, Hkv, D)
        v = plan.gather(v_cache, slots, 1, "v1")[0].transpose(0, 1)
        out[start:end] = causal_attention_invariant(q[start:end], k, v, scale, backend=backend)
    return out
