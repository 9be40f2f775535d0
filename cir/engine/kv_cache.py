"""The paged KV pool (one preallocated tensor, per-layer views) and the attention context over it.

Layout: `(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)`; layer l's K cache is
`pool[l, 0]`, in the per-layer layout flash-attn and `kernels.paged_attention` take.
Sizing: CPU from a configured number of bytes; CUDA from the memory left free after a warm-up
forward, times `gpu_memory_utilization`. `release()` hands the memory back for a training step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.paged_attention import paged_attention, store_kv


@dataclass
class PagedContext:
    """Attention metadata of one engine step (the model's AttentionContext for the paged cache)."""

    k_caches: list[torch.Tensor]  # per layer (num_blocks, block_size, Hkv, D)
    v_caches: list[torch.Tensor]
    slot_mapping: torch.Tensor  # (T,) int64: flat cache slot of each new token
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32
    block_tables: torch.Tensor  # (B, max_blocks) int32
    seq_lens: torch.Tensor  # (B,) int32: cached + new tokens of each sequence
    max_seqlen_q: int

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        dtype = k_cache.dtype  # under autocast q/k/v may come out in mixed dtypes
        store_kv(k.to(dtype), v.to(dtype), k_cache, v_cache, self.slot_mapping)
        return paged_attention(
            q.to(dtype), self.cu_seqlens_q, k_cache, v_cache, self.block_tables, self.seq_lens,
            max_seqlen_q=self.max_seqlen_q,
        )  # (T, Hq, D)


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.shape_per_block = (block_size, num_kv_heads, head_dim)
        self.num_layers = num_layers
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.pool: torch.Tensor | None = None

    @property
    def bytes_per_block(self) -> int:
        block_size, num_kv_heads, head_dim = self.shape_per_block
        return self.num_layers * 2 * block_size * num_kv_heads * head_dim * torch.finfo(self.dtype).bits // 8

    def blocks_for_memory(self, num_bytes: float) -> int:
        return int(num_bytes // self.bytes_per_block)

    def blocks_for_free_gpu_memory(self, utilization: float) -> int:
        free, _ = torch.cuda.mem_get_info(self.device)
        return self.blocks_for_memory(free * utilization)

    def allocate(self, num_blocks: int, dtype: torch.dtype | None = None) -> None:
        self.dtype = dtype or self.dtype
        if num_blocks < 1:
            raise RuntimeError(
                f"no memory left for the KV cache ({self.bytes_per_block} bytes per block); "
                f"set num_kv_blocks or free memory"
            )
        self.pool = torch.zeros(self.num_layers, 2, num_blocks, *self.shape_per_block,
                                dtype=self.dtype, device=self.device)

    @property
    def is_allocated(self) -> bool:
        return self.pool is not None

    @property
    def num_blocks(self) -> int:
        return 0 if self.pool is None else self.pool.shape[2]

    def release(self) -> None:
        self.pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy-on-write: duplicate whole blocks (all layers, K and V)."""
        if copies:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.pool[:, :, dst] = self.pool[:, :, src]

    def context(self, **metadata) -> PagedContext:
        return PagedContext(
            k_caches=[self.pool[l, 0] for l in range(self.num_layers)],
            v_caches=[self.pool[l, 1] for l in range(self.num_layers)],
            **metadata,
        )
