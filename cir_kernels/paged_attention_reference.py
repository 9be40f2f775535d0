"""Plain-torch paged attention: the CPU path of `cir_kernels.paged_attention` and the yardstick of its
Triton kernel.

    plan = plan_reference(cu_seqlens_q, block_tables, seq_lens, block_size)   # once per step
    out = paged_attention_reference(q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, plan=plan)

    store_kv_reference(k, v, k_cache, v_cache, slot_mapping)                  # the twin of `store_kv`

Same arguments and semantics as `cir_kernels.paged_attention` (see its docstring): gather each
sequence's K/V through its block table, then SDPA, causal with the cached-prefix offset. The gather
indices depend only on the block tables and lengths, so a model's layers share one plan per step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cir_kernels._checks import validate_paged_args


@dataclass
class ReferencePlan:
    """The CPU path's gather indices for one batch, shared by every layer (they depend only on the
    block tables and lengths). Build it once per step with `plan_reference`.

    Decode rows (q_len 1) are batched: each of the n sequences is padded to the longest history L
    and masked by length; prefill chunks go one sequence at a time, causal with the cached prefix.
    """

    decode_rows: torch.Tensor | None  # (n,) packed-token index of each decode query
    decode_slots: torch.Tensor | None  # (n * L,) flat cache slot of each (sequence, position)
    decode_len: int  # L
    decode_mask: torch.Tensor | None  # (n, 1, 1, L) bool; None when all n histories are L long
    prefill: list[tuple[int, int, torch.Tensor, torch.Tensor]]  # (q_start, q_end, slots (L,), mask (q_len, L))
    decode_only: bool = False  # every sequence decodes: the decode rows are all T queries, in order
    buffers: dict = field(default_factory=dict)  # reused gather outputs: no fresh pages per layer

    def gather(self, cache: torch.Tensor, slots: torch.Tensor, num_seqs: int, key: str) -> torch.Tensor:
        """Cache (nb, bs, Hkv, D) at flat slots (num_seqs * L,) -> (num_seqs, Hkv, L, D).

        The output lands in a buffer kept by the plan (one per key, K or V, and size) and reused by
        every layer: a fresh multi-MB tensor per layer page-faults on each allocation, which measured
        ~15x slower than the copy itself (glibc hands large blocks back to the OS; 2-core CPU).
        """
        flat = cache.flatten(0, 1)
        shape = (slots.shape[0], *flat.shape[1:])
        buf = self.buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != cache.dtype or buf.device != cache.device:
            buf = self.buffers[key] = torch.empty(shape, dtype=cache.dtype, device=cache.device)
        torch.index_select(flat, 0, slots, out=buf)
        return buf.view(num_seqs, -1, *flat.shape[1:]).transpose(1, 2)

    def grouped_decode_mask(self, group: int) -> torch.Tensor | None:
        """decode_mask for G query heads per kv head, (n, 1, G, L), built once per plan."""
        if self.decode_mask is None or group == 1:
            return self.decode_mask
        key = ("mask", group)
        if key not in self.buffers:
            n, length = self.decode_mask.shape[0], self.decode_mask.shape[-1]
            self.buffers[key] = self.decode_mask.expand(n, group, 1, length).reshape(n, 1, group, length)
        return self.buffers[key]


def _slots(tables: torch.Tensor, kv_len: int, block_size: int) -> torch.Tensor:
    """(n, nb) block ids -> (n, kv_len) int64 flat cache slots of positions 0..kv_len-1."""
    pos = torch.arange(kv_len, device=tables.device)
    return tables[:, pos // block_size].long() * block_size + pos % block_size


def plan_reference(cu_seqlens_q: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   block_size: int) -> ReferencePlan:
    """Gather indices of `paged_attention_reference` for one batch (reads the lengths on the host)."""
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    q_lens = [cu[b + 1] - cu[b] for b in range(len(lens))]
    for b, (q_len, kv_len) in enumerate(zip(q_lens, lens, strict=True)):
        if q_len < 0 or q_len > kv_len:
            raise ValueError(f"sequence {b}: q_len {q_len} must be in [0, seq_lens[b]={kv_len}]")
    device = block_tables.device
    decode = [b for b, q_len in enumerate(q_lens) if q_len == 1]
    rows = slots = mask = None
    kv_len = 0
    if decode:
        # positions past a sequence's end read its token 0: those slots hold stale data or (fresh
        # memory) NaN, which would survive the mask (0 * NaN = NaN); token 0 is always written.
        # A token-level index_select measured ~3x faster than block gather + masked_fill (2-core
        # CPU, B 8, 2k context).
        idx = torch.tensor(decode, device=device)
        rows = torch.tensor([cu[b] for b in decode], device=device)
        kv_len = max(lens[b] for b in decode)
        lens_b = seq_lens[idx]
        slots = _slots(block_tables[idx, : -(-kv_len // block_size)], kv_len, block_size)
        valid = torch.arange(kv_len, device=device) < lens_b[:, None]  # (n, L)
        slots = torch.where(valid, slots, slots[:, :1]).reshape(-1)
        if any(lens[b] != kv_len for b in decode):
            mask = valid[:, None, None, :]
    prefill = []
    for b, (q_len, kv_len_b) in enumerate(zip(q_lens, lens, strict=True)):
        if q_len <= 1:
            continue
        slots_b = _slots(block_tables[b : b + 1, : -(-kv_len_b // block_size)], kv_len_b, block_size)[0]
        q_pos = torch.arange(kv_len_b - q_len, kv_len_b, device=device)
        causal = torch.arange(kv_len_b, device=device)[None, :] <= q_pos[:, None]  # (q_len, L)
        prefill.append((cu[b], cu[b + 1], slots_b, causal))
    return ReferencePlan(rows, slots, kv_len, mask, prefill, decode_only=len(decode) == len(lens))


def _sdpa_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  scale: float) -> torch.Tensor:
    """GQA without repeating K/V: the G query heads of a kv head become G x more query rows.

    q (n, Hq, M, D), k/v (n, Hkv, L, D), mask (n, 1, M, L) bool or None -> (n, Hq, M, D).
    """
    n, num_q_heads, rows, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_q_heads // num_kv_heads
    q = q.reshape(n, num_kv_heads, group * rows, head_dim)
    if mask is not None and mask.shape[2] != group * rows:
        mask = mask.expand(n, group, rows, mask.shape[-1]).reshape(n, 1, group * rows, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # reshape, not view: on CUDA the flash / efficient backends return (n, Hkv, G * M, D) with the
    # heads innermost, i.e. not contiguous, and a view across the group split is then impossible.
    return out.reshape(n, num_q_heads, rows, head_dim)


def paged_attention_reference(
    q: torch.Tensor, cu_seqlens_q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
    max_seqlen_q: int | None = None, *, plan: ReferencePlan | None = None,
) -> torch.Tensor:
    """Plain-torch paged attention (the CPU path): gather each sequence's K/V, then SDPA.

    Decode sequences (q_len 1) are batched in one SDPA call; the rest go one by one. `plan` (from
    `plan_reference` on the same metadata) skips recomputing the gather indices: a model's layers
    all share one, which measured ~2.5x less attention time per SmolLM2 decode step (2-core CPU).
    """
    validate_paged_args(q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, max_seqlen_q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if plan is None:
        plan = plan_reference(cu_seqlens_q, block_tables, seq_lens, k_cache.shape[1])
    num_tokens, num_q_heads, head_dim = q.shape
    mask = plan.grouped_decode_mask(num_q_heads // k_cache.shape[2])
    if plan.decode_only and num_tokens > 0:  # a pure decode step: no gather of q, no scatter of out
        k = plan.gather(k_cache, plan.decode_slots, num_tokens, "k")
        v = plan.gather(v_cache, plan.decode_slots, num_tokens, "v")
        return _sdpa_grouped(q.unsqueeze(2), k, v, mask, scale).reshape(num_tokens, num_q_heads, head_dim)
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    if plan.decode_rows is not None:
        n = plan.decode_rows.shape[0]
        k, v = plan.gather(k_cache, plan.decode_slots, n, "k"), plan.gather(v_cache, plan.decode_slots, n, "v")
        o = _sdpa_grouped(q[plan.decode_rows].unsqueeze(2), k, v, mask, scale)
        out[plan.decode_rows] = o.squeeze(2)
    for start, end, slots, causal in plan.prefill:
        k, v = plan.gather(k_cache, slots, 1, "k1"), plan.gather(v_cache, slots, 1, "v1")
        q_b = q[start:end].transpose(0, 1).unsqueeze(0)  # (1, Hq, q_len, D)
        o = _sdpa_grouped(q_b, k, v, causal[None, None], scale)
        out[start:end] = o[0].transpose(0, 1)
    return out


def store_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    """Torch twin of `cir_kernels.store_kv` (arguments checked there): slot -1 skips the token."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, k, v = slot_mapping[valid], k[valid], v[valid]
    # index_copy_, not `cache[slots] = k`: 2.7 us vs 177 us for 16 tokens (2-core CPU, 4000 blocks)
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)
