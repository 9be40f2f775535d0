"""Engine-side configuration: how the KV pool and scheduler are sized, how to sample, how tools run.

Each dataclass validates itself in `__post_init__`; a bad value raises `ValueError` naming it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class EngineConfig:
    """Sizing of the paged KV cache and of one scheduler step."""

    block_size: int = 16
    """Tokens per KV block. 16 is what flash-attn's paged kernels and vLLM default to."""
    num_kv_blocks: int | None = None
    """Blocks in the pool. None: from `kv_cache_memory_gb` on CPU, from free GPU memory on CUDA."""
    kv_cache_memory_gb: float = 1.0
    """CPU only (when `num_kv_blocks` is None): bytes of host memory given to the KV pool."""
    gpu_memory_utilization: float = 0.5
    """CUDA only: fraction of the free memory (measured after a warm-up forward) given to the pool."""
    max_num_seqs: int = 256
    """Most sequences in the running batch at once."""
    max_num_batched_tokens: int = 4096
    """Per-step token budget: decode tokens plus prefill-chunk tokens."""
    max_model_len: int | None = None
    """Longest prompt + response; None: the model's `max_position_embeddings`."""
    enable_prefix_caching: bool = True
    """Reuse full KV blocks whose chained hash matches across prompts."""
    release_after_generate: bool = False
    """Free the KV pool when `generate` returns, so a training step can use the memory."""
    cuda_graphs: bool = True
    """CUDA only: decode steps replay CUDA graphs captured per bucketed batch size (cuda_graphs.py)."""
    cuda_graph_max_batch: int = 256
    """Largest decode batch run as a graph (capped at max_num_seqs); bigger steps run eagerly."""
    rollout_weight_copy: bool = True
    """Under autocast with weights in another dtype (fp32 masters, bf16 autocast): decode reads one
    persistent bf16 copy of the matmul weights, refreshed after each optimizer step (rollout_weights.py),
    instead of casting the weights again in every step."""
    seed: int = 0
    """Seed of the sampling generator; each `generate` call advances it."""
    show_progress: bool = True
    """Progress bar on rollouts of more than a few sequences (rank 0 only)."""

    def __post_init__(self) -> None:
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gb <= 0:
            raise ValueError(f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be >= 1, got {self.cuda_graph_max_batch}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")


@dataclass
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 1024
    """Most response tokens, interpreter feedback included."""
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end a sequence like EOS does."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")


@dataclass
class ToolConfig:
    """Code-integrated rollout: run closed ```python blocks and feed the output back."""

    executor: Any
    """Anything with `submit(code) -> concurrent.futures.Future[cir_sandbox.Result]`: a `cir_sandbox.Sandbox`."""
    max_calls: int = 2
    """Tool budget per trajectory (the paper: 2, raised to 3 and 4 during training)."""
    on_budget_spent: str = "continue"
    """A code block closed with the budget spent: "continue" generating without running it, or "stop"."""

    def __post_init__(self) -> None:
        if self.max_calls < 0:
            raise ValueError(f"max_calls must be >= 0, got {self.max_calls}")
        if self.on_budget_spent not in ("continue", "stop"):
            raise ValueError(f"on_budget_spent must be 'continue' or 'stop', got {self.on_budget_spent!r}")
        if not callable(getattr(self.executor, "submit", None)):
            raise ValueError(f"executor must have a submit(code) method, got {type(self.executor).__name__}")
