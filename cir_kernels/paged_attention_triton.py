"""Triton kernels of `cir_kernels.paged_attention` and `store_kv`, and their launchers (the public API
and the semantics are in cir_kernels/paged_attention.py; the torch twin is
cir_kernels/paged_attention_reference.py).

Math, per (sequence, kv head, query tile, KV split). Rows of a tile are (query token, head of the
group) pairs, so the G query heads that share a kv head read each K/V tile once. Online softmax in
base 2 (s = q.k * scale * log2 e), over BLOCK_N cache tokens at a time gathered through the table:
    m' = max(m, max_n s_n);  l' = l * 2^(m - m') + sum_n 2^(s_n - m');  acc' = acc * 2^(m - m') + P V
    o = acc / l,  lse = m + log2 l                     (fp32 throughout; l = 0 -> o = 0, lse = -inf)
Flash-decoding: when sequences x kv heads x tiles is too few to fill the GPU, the KV range is cut
into NUM_SPLITS pieces (NUM_SPLITS from static shapes; sequence b's pieces are max(ceil(L_b / S),
256) tokens long, from L_b read on the device, so padded block tables do not idle the splits);
each writes (o_s, lse_s) in fp32, then a combine kernel computes
    o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.

Memory traffic it expects (e = bytes per element, L_b = seq_lens[b], tiles_b = query tiles of b):
    read  <= sum_b tiles_b * L_b * Hkv * D * 2e       K and V: once per tile, up to its last causal
                                                      position (decode: tiles_b = 1, exactly L_b)
         + T * Hq * D * e                             q
    write  T * Hq * D * e                             out
    (+ splits > 1: S * T * Hq * (D + 1) * 4 written and read again by the combine step)
Block-table and length reads are negligible. Decode at long context is bandwidth bound:
time ~= KV bytes / HBM bandwidth, which is what bench/paged_attention.py reports.
"""
import math

import torch
import triton
import triton.language as tl

# Tile sizes, not yet tuned on a GPU: bench/paged_attention.py is the tool to tune them.
# BLOCK_N = KV tokens per inner step (independent of the cache's block size).
_BLOCK_N = 64
_BLOCK_M_PREFILL = 64  # rows (= query tokens x group heads) per tile when a sequence has > 1 query
_MIN_TOKENS_PER_SPLIT = 256  # a KV split shorter than this costs more in combine than it saves
_MAX_SPLITS = 32


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    cu_seqlens_q_ptr, block_tables_ptr, seq_lens_ptr,
    scale_log2,
    q_stride_t, q_stride_h,
    cache_stride_block, cache_stride_tok, cache_stride_head,
    out_stride_split, out_stride_t, out_stride_h,
    lse_stride_split, lse_stride_t,
    block_tables_stride_b,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr, MIN_SPLIT_LEN: tl.constexpr, DOT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) // NUM_SPLITS
    split = (tl.program_id(1) % NUM_SPLITS).to(tl.int64)
    tile = tl.program_id(2)
    TOKENS_PER_TILE: tl.constexpr = BLOCK_M // GROUP

    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    tile_start = tile * TOKENS_PER_TILE
    if tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # 1) the tile's rows: (query token, head in group) pairs and their absolute positions
    offs_m = tl.arange(0, BLOCK_M)
    tok = tile_start + offs_m // GROUP
    head = kv_head * GROUP + offs_m % GROUP
    row_valid = (offs_m < TOKENS_PER_TILE * GROUP) & (tok < q_len)
    q_pos = tl.where(row_valid, seq_len - q_len + tok, -1)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    q_off = (q_start + tok).to(tl.int64) * q_stride_t + head * q_stride_h
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :],
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if DOT_FP32:
        q = q.to(tl.float32)

    # 2) this split's KV range, cut at the tile's last causal position. The split length comes from
    #    this sequence's own length (read on the device), so a block table padded wide for a CUDA
    #    graph still spreads the real work over the splits; short sequences use fewer splits.
    kv_end = seq_len - q_len + tl.minimum(tile_start + TOKENS_PER_TILE, q_len)
    split_len = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), MIN_SPLIT_LEN)
    split_len = tl.cdiv(split_len, BLOCK_N) * BLOCK_N
    n_start = (split * split_len).to(tl.int32)
    n_end = tl.minimum(n_start + split_len, kv_end)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * block_tables_stride_b
    for n in range(n_start, n_end, BLOCK_N):
        # 3) gather BLOCK_N cache tokens through the block table (int64 offsets into the cache)
        offs_n = n + tl.arange(0, BLOCK_N)
        n_valid = offs_n < n_end
        block_id = tl.load(table + offs_n // BLOCK_SIZE, mask=n_valid, other=0).to(tl.int64)
        kv_off = (block_id * cache_stride_block + (offs_n % BLOCK_SIZE) * cache_stride_tok
                  + kv_head * cache_stride_head)
        kv_mask = n_valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        # 4) online softmax update
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") if DOT_FP32 else tl.dot(q, tl.trans(k))
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        s = tl.where(visible, s * scale_log2, float("-inf"))  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # 5) normalise; rows that saw no key (empty split, padded row) give o = 0 and lse = -inf
    has_keys = l_i > 0.0
    o = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    out_off = (q_start + tok).to(tl.int64) * out_stride_t + head * out_stride_h
    out_mask = row_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + out_off[:, None] + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + split * out_stride_split + out_off[:, None] + offs_d[None, :],
                 o, mask=out_mask)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        lse_off = split * lse_stride_split + (q_start + tok).to(tl.int64) * lse_stride_t + head
        tl.store(lse_ptr + lse_off, lse, mask=row_valid)


@triton.jit
def _combine_splits_kernel(
    partial_ptr, lse_ptr, out_ptr,
    partial_stride_split, partial_stride_t, partial_stride_h,
    lse_stride_split, lse_stride_t,
    out_stride_t, out_stride_h,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_valid = offs_s < NUM_SPLITS
    lse = tl.load(lse_ptr + offs_s * lse_stride_split + t * lse_stride_t + h,
                  mask=s_valid, other=float("-inf"))  # (BLOCK_S,)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    w_sum = tl.sum(w, axis=0)
    o_mask = (lse > float("-inf"))[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(partial_ptr + offs_s[:, None] * partial_stride_split + t * partial_stride_t
                + h * partial_stride_h + offs_d[None, :], mask=o_mask, other=0.0)
    o = tl.sum(o * w[:, None], axis=0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    tl.store(out_ptr + t * out_stride_t + h * out_stride_h + offs_d,
             o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    k_stride_t, k_stride_h, v_stride_t, v_stride_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + t)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src_k = t * k_stride_t + offs_h[:, None] * k_stride_h + offs_d[None, :]
    src_v = t * v_stride_t + offs_h[:, None] * v_stride_h + offs_d[None, :]
    dst = slot * (NUM_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(k_cache_ptr + dst, tl.load(k_ptr + src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(v_ptr + src_v, mask=mask), mask=mask)


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: a few splits, so tests exercise the combine step
    return torch.cuda.get_device_properties(device).multi_processor_count


def paged_attention_triton(q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens,
                           scale: float, max_seqlen_q: int | None, num_splits: int | None) -> torch.Tensor:
    """Launcher: arguments already checked by `paged_attention` (scale resolved)."""
    num_tokens, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    num_seqs = seq_lens.shape[0]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())  # host sync
    if max_seqlen_q == 0:
        return out.zero_()
    # 1) tile shape: decode-only -> one token x G heads per tile; otherwise bigger query tiles
    block_m = max(16, triton.next_power_of_2(group))
    if max_seqlen_q > 1:
        block_m = max(block_m, _BLOCK_M_PREFILL)
    num_tiles = triton.cdiv(max_seqlen_q, block_m // group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = _BLOCK_N if block_d <= 128 else _BLOCK_N // 2
    # 2) KV splits from static shapes only (no host sync, CUDA-graph safe): fill ~2 waves of SMs
    max_context = block_tables.shape[1] * block_size
    num_splits_forced = num_splits is not None
    if num_splits is None:
        num_programs = num_seqs * num_kv_heads * num_tiles
        num_splits = min(triton.cdiv(2 * _num_sms(q.device), num_programs),
                         triton.cdiv(max_context, _MIN_TOKENS_PER_SPLIT), _MAX_SPLITS)
    num_splits = max(1, num_splits)
    # a forced split count (tests, tuning) splits any length; the heuristic keeps splits >= 256 tokens
    min_split_len = 1 if num_splits_forced else _MIN_TOKENS_PER_SPLIT
    if num_splits == 1:
        partial, lse = out, out  # lse unused
        partial_stride_split, lse_strides = 0, (0, 0)
    else:
        partial = torch.empty((num_splits, num_tokens, num_q_heads, head_dim),
                              dtype=torch.float32, device=q.device)
        lse = torch.full((num_splits, num_tokens, num_q_heads), float("-inf"),
                         dtype=torch.float32, device=q.device)
        partial_stride_split, lse_strides = partial.stride(0), lse.stride()[:2]
    _paged_attention_kernel[(num_seqs, num_kv_heads * num_splits, num_tiles)](
        q, k_cache, v_cache, partial, lse,
        cu_seqlens_q, block_tables, seq_lens,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        partial_stride_split, partial.stride(-3), partial.stride(-2),
        lse_strides[0], lse_strides[1],
        block_tables.stride(0),
        HEAD_DIM=head_dim, GROUP=group, BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        NUM_SPLITS=num_splits, MIN_SPLIT_LEN=min_split_len,
        DOT_FP32=(q.dtype == torch.float32 or q.device.type != "cuda"),
        num_warps=4,
    )
    if num_splits > 1:
        _combine_splits_kernel[(num_tokens, num_q_heads)](
            partial, lse, out,
            partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out


def store_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """Launcher: arguments already checked by `store_kv` (k, v contiguous in the last dim); no host sync."""
    num_heads, head_dim = k.shape[1:]
    _store_kv_kernel[(k.shape[0],)](
        k, v, k_cache, v_cache, slot_mapping.contiguous(),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )
