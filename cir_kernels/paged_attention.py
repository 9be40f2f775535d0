"""Paged attention over a block-table KV cache: one varlen kernel for mixed prefill + decode batches.

    out = paged_attention(q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens)

Sequence b owns queries q[cu[b]:cu[b+1]] (q_len_b of them) and a KV history of seq_lens[b] tokens
stored in blocks block_tables[b, 0..] of a cache shaped (num_blocks, block_size, Hkv, D). Query i of
sequence b sits at position p = seq_lens[b] - q_len_b + i and attends to cache positions 0..p. The
queries' own K/V are already in the cache (`store_kv` writes them first). Decode is q_len 1; a
prefill chunk after a cached prefix is many queries; one launch serves any mix. GQA: Hq = G * Hkv.

backend None: CUDA -> the Triton kernels (cir_kernels/paged_attention_triton.py, which has the math
and the memory traffic); CPU -> `paged_attention_reference` (plain torch SDPA,
cir_kernels/paged_attention_reference.py). `backend="triton"` forces the kernels (tests run them on
CPU under TRITON_INTERPRET=1), `"torch"` the twin. Forward only: no autograd.

"""
import torch

from cir_kernels._checks import check_store_kv_args, pick_backend, validate_paged_args
from cir_kernels.paged_attention_reference import paged_attention_reference, store_kv_reference
from cir_kernels.paged_attention_triton import paged_attention_triton, store_kv_triton


def paged_attention(
    q: torch.Tensor, cu_seqlens_q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float | None = None,
    max_seqlen_q: int | None = None, *, backend: str | None = None, num_splits: int | None = None,
) -> torch.Tensor:
    """Varlen causal attention of q (T, Hq, D) over a paged KV cache -> (T, Hq, D).

    Pass max_seqlen_q (any upper bound of the q_lens; a smaller value silently drops queries) to
    avoid a host sync, which CUDA-graph capture requires. num_splits overrides
    the flash-decoding KV split count (Triton only). backend: None (CUDA -> "triton", else "torch").
    Rows with no visible key (seq_lens[b] < q_len_b, e.g. padding) give 0 on the Triton path.
    """
    validate_paged_args(q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, max_seqlen_q)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if pick_backend(backend, q) == "torch":
        return paged_attention_reference(q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens,
                                         scale, max_seqlen_q)
    return paged_attention_triton(q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens,
                                  scale, max_seqlen_q, num_splits)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, *, backend: str | None = None) -> None:
    """Write k/v (T, Hkv, D) into the cache at flat slots slot_mapping (T,) int64; slot -1 skips.

    Slot s is block s // block_size, offset s % block_size. The Triton path needs no host sync.
    """
    check_store_kv_args(k, v, k_cache, v_cache, slot_mapping)
    if k.shape[0] == 0:
        return
    if pick_backend(backend, k) == "torch":
        store_kv_reference(k, v, k_cache, v_cache, slot_mapping)
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k/v must be contiguous in the last dim, got {k.stride()} and {v.stride()}")
    store_kv_triton(k, v, k_cache, v_cache, slot_mapping)


