"""The paged KV pool (one preallocated tensor, per-layer views) and the attention context over it.

Layout: `(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)`; layer l's K cache is
`pool[l, 0]`, in the per-layer layout flash-attn and `cir_kernels.paged_attention` take.
Sizing: CPU from a configured number of bytes; CUDA from the memory left free after a warm-up
forward, times `gpu_memory_utilization`. `release()` hands the memory back for a training step.

Attention over the pool, per step (`attention_backend`):
- "flash_attn": flash-attn >= 2.6 installed, CUDA, fp16/bf16, and pages of a multiple of 256 tokens
  (flash-attn 2's paged layout): `flash_attn_varlen_func` with `block_table`, any prefill/decode mix;
- "triton": other CUDA cases: `cir_kernels.paged_attention`, any block size;
- "torch": CPU: `cir_kernels.paged_attention_reference` with one gather plan shared by all layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cir_kernels.batch_invariant import paged_attention_invariant
from cir_kernels.paged_attention import paged_attention, store_kv
from cir_kernels.paged_attention_reference import ReferencePlan, paged_attention_reference, plan_reference

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # CPU machines, or CUDA without the `gpu` extra
    flash_attn_varlen_func = None

FLASH_ATTN_PAGE_MULTIPLE = 256


def attention_backend(device: torch.device, dtype: torch.dtype, block_size: int) -> str:
    """Which paged attention a step on `device` with a `dtype` cache of `block_size` pages uses."""
    if device.type != "cuda":
        return "torch"
    if (flash_attn_varlen_func is not None and dtype in (torch.float16, torch.bfloat16)
            and block_size % FLASH_ATTN_PAGE_MULTIPLE == 0):
        return "flash_attn"
    return "triton"


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
    backend: str = "torch"  # see attention_backend
    cu_seqlens_k: torch.Tensor | None = None  # (B + 1,) int32: flash_attn only
    max_seqlen_k: int = 0  # flash_attn only: any upper bound of seq_lens
    plan: ReferencePlan | None = field(default=None, repr=False)  # torch: gather indices, all layers

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        dtype = k_cache.dtype  # under autocast q/k/v may come out in mixed dtypes
        store_kv(k.to(dtype), v.to(dtype), k_cache, v_cache, self.slot_mapping)
        if self.backend == "flash_attn":
            # causal masks align to the end of each sequence's keys: a chunk after a cached prefix
            # and a decode token see exactly their history
            return flash_attn_varlen_func(
                q.to(dtype), k_cache, v_cache, self.cu_seqlens_q, self.cu_seqlens_k,
                self.max_seqlen_q, self.max_seqlen_k, causal=True, block_table=self.block_tables,
            )  # (T, Hq, D)
        args = (q.to(dtype), self.cu_seqlens_q, k_cache, v_cache, self.block_tables, self.seq_lens)
        if self.backend == "triton":
            return paged_attention(*args, max_seqlen_q=self.max_seqlen_q, backend="triton")
        if self.plan is None:
            self.plan = plan_reference(self.cu_seqlens_q, self.block_tables, self.seq_lens, k_cache.shape[1])
        return paged_attention_reference(*args, max_seqlen_q=self.max_seqlen_q, plan=self.plan)

    def attend_invariant(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Exact mode (any device): the keys reduced in the fixed order of the training forward."""
        k_cache, v_cache = self.k_caches[layer_idx], self.v_caches[layer_idx]
        store_kv(k.to(k_cache.dtype), v.to(k_cache.dtype), k_cache, v_cache, self.slot_mapping)
        if self.plan is None:
            self.plan = plan_reference(self.cu_seqlens_q, self.block_tables, self.seq_lens, k_cache.shape[1])
        return paged_attention_invariant(q.to(k_cache.dtype), k_cache, v_cache, self.plan)


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.shape_per_block = (block_size, num_kv_heads, head_dim)
        self.num_layers = num_layers
        self.block_size = block_size
        self.dtype = dtype
        self.device = torch.device(device)
        self.pool: torch.Tensor | None = None
        self.backend: str | None = None  # force "flash_attn" / "triton" / "torch"; None: attention_backend

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

    @property
    def attention_backend(self) -> str:
        if self.backend not in (None, "flash_attn", "triton", "torch"):
            raise ValueError(f"KVCache.backend must be None, 'flash_attn', 'triton' or 'torch', got {self.backend!r}")
        return self.backend or attention_backend(self.device, self.dtype, self.block_size)

    def context(self, **metadata) -> PagedContext:
        """The attention context of one step. With flash_attn, `cu_seqlens_k` and `max_seqlen_k` are
        also needed (the cumulative and the largest `seq_lens`)."""
        backend = self.attention_backend
        if backend == "flash_attn" and metadata.get("cu_seqlens_k") is None:
            raise ValueError("the flash_attn backend needs cu_seqlens_k and max_seqlen_k")
        return PagedContext(
            k_caches=[self.pool[layer, 0] for layer in range(self.num_layers)],
            v_caches=[self.pool[layer, 1] for layer in range(self.num_layers)],
            backend=backend,
            **metadata,
        )
