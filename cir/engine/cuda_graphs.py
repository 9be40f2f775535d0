"""Decode steps as CUDA graphs: one graph per bucketed batch size, replayed on static buffers.

A decode step is a few hundred small kernel launches (per layer: norms, projections, rotary, the KV
write, paged attention); at small batch the GPU waits on the launches. A graph records them once and
replays them with one launch. What a replay needs:

- static inputs: every per-step tensor (token ids, positions, slot mapping, block tables, lengths)
  lives in a buffer allocated once; a step copies its values into the first B rows and pads the
  batch up to the bucket. A pad row is token 0 at position 0 with KV slot -1 (not written) and one
  visible key, cache block 0's first slot: its output is finite and thrown away. Every row of a
  decode step has one query, so `cu_seqlens_q` is the constant arange;
- static shapes: the block-table buffer is as wide as `max_model_len` needs, so the paged-attention
  launch (its KV split count comes from shapes only) is the same for every step of a bucket;
- no host sync inside: `max_seqlen_q` is 1 and the Triton kernels read lengths on the device;
- fixed addresses: a graph reads the KV pool and the parameters at the addresses they had at capture.
  An optimizer step updates parameters in place (seen by the next replay, no sync); a new pool
  (`Engine.release()` then reallocation), an FSDP unshard into fresh storage or another autocast
  dtype changes the `signature`, and the graphs are dropped and captured again, lazily, per bucket.

Logits and sampling stay outside the graph (one matmul and one kernel on the rows that sample).
`capture=False` runs the same static, padded path eagerly: how the CPU tests check the padding.
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from cir.engine.kv_cache import KVCache


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then multiples of 16 up to max_batch (and max_batch itself)."""
    buckets = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16))
    return buckets + [max_batch]


_unknown = itertools.count(1)


def _storage_address(tensor: torch.Tensor) -> int:
    try:
        return tensor.data_ptr()
    except RuntimeError:  # a tensor subclass without storage (e.g. a DTensor shard): assume it moved
        return -next(_unknown)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, kv_cache: KVCache, max_batch: int, max_blocks_per_seq: int,
                 capture: bool | None = None):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the KV cache is on {self.device}")
        self.buckets = batch_buckets(max_batch)
        self.max_batch = max_batch
        as_index = dict(device=self.device, dtype=torch.int64)
        self.input_ids = torch.zeros(max_batch, **as_index)
        self.positions = torch.zeros(max_batch, **as_index)
        self.slot_mapping = torch.full((max_batch,), -1, **as_index)
        self.cu_seqlens_q = torch.arange(max_batch + 1, dtype=torch.int32, device=self.device)
        self.block_tables = torch.zeros(max_batch, max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self.seq_lens = torch.ones(max_batch, dtype=torch.int32, device=self.device)
        self.cu_seqlens_k = torch.arange(max_batch + 1, dtype=torch.int32, device=self.device)  # flash_attn
        self.max_seqlen_k = max_blocks_per_seq * kv_cache.block_size  # static upper bound
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.signature: tuple | None = None

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest bucket holding batch_size rows; None when the batch is too large."""
        return next((b for b in self.buckets if b >= batch_size), None)

    def _signature(self) -> tuple:
        params = tuple(_storage_address(p) for p in self.model.parameters())
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None
        return self.kv_cache.pool.data_ptr(), self.kv_cache.pool.dtype, dtype, params

    def check(self) -> None:
        """Drop the captured graphs if the pool, the parameters' storage or autocast changed.
        Call once per generate, before the first step."""
        signature = self._signature()
        if signature != self.signature:
            self.reset()
            self.signature = signature

    def reset(self) -> None:
        """Forget every graph and give back their memory (the engine's `release()` calls this)."""
        self.graphs.clear()
        self.outputs.clear()
        self.pool = None
        self.signature = None
        if self.capture:
            torch.cuda.empty_cache()

    def _forward(self, bucket: int) -> torch.Tensor:
        ctx = self.kv_cache.context(
            slot_mapping=self.slot_mapping[:bucket], cu_seqlens_q=self.cu_seqlens_q[: bucket + 1],
            block_tables=self.block_tables[:bucket], seq_lens=self.seq_lens[:bucket], max_seqlen_q=1,
            cu_seqlens_k=self.cu_seqlens_k[: bucket + 1], max_seqlen_k=self.max_seqlen_k,
        )
        return self.model.forward_hidden(self.input_ids[:bucket], self.positions[:bucket], ctx)

    def _capture(self, bucket: int) -> None:
        # warm-up on a side stream first: Triton compiles, rotary caches its inv_freq on the device
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        autocast = torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda")
        with torch.cuda.graph(graph, pool=self.pool):
            # autocast's weight-cast cache would hold tensors from the capture: off while capturing
            with torch.autocast("cuda", dtype=dtype, enabled=autocast, cache_enabled=False):
                self.outputs[bucket] = self._forward(bucket)
        self.graphs[bucket] = graph

    @torch.no_grad()
    def run(self, input_ids: torch.Tensor, positions: np.ndarray, slots: np.ndarray, block_tables: np.ndarray,
            seq_lens: np.ndarray) -> torch.Tensor:
        """One decode step of B <= max_batch sequences (one token each) -> hidden states (B, D).
        input_ids (B,) on the device (the previous step's tokens need no trip to the host); the rest
        host arrays: positions and slots (B,), block tables (B, W) zero-padded, lengths (B,)."""
        batch_size = len(input_ids)
        bucket = self.bucket_for(batch_size)
        if bucket is None:
            raise ValueError(f"{batch_size} sequences > the largest graph bucket {self.max_batch}")
        width = block_tables.shape[1]
        if width > self.block_tables.shape[1]:
            raise ValueError(f"a block table of {width} blocks > the graphs' {self.block_tables.shape[1]}")
        pin = self.device.type == "cuda"

        def put(dst: torch.Tensor, values: np.ndarray, pad: int) -> None:
            src = torch.from_numpy(np.ascontiguousarray(values)).to(dst.dtype)
            dst[:batch_size].copy_(src.pin_memory() if pin else src, non_blocking=True)
            dst[batch_size:bucket].fill_(pad)

        self.input_ids[:batch_size].copy_(input_ids)
        self.input_ids[batch_size:bucket].fill_(0)
        put(self.positions, positions, 0)
        put(self.slot_mapping, slots, -1)
        put(self.seq_lens, seq_lens, 1)
        if self.kv_cache.attention_backend == "flash_attn":
            cumulative = np.arange(bucket + 1, dtype=np.int64)  # pad rows: one key each
            cumulative[1 : batch_size + 1] = np.cumsum(seq_lens)
            cumulative[batch_size + 1 :] += cumulative[batch_size] - batch_size
            src = torch.from_numpy(cumulative).to(torch.int32)
            self.cu_seqlens_k[: bucket + 1].copy_(src.pin_memory() if pin else src, non_blocking=True)
        put(self.block_tables[:, :width], block_tables, 0)
        if not self.capture:
            return self._forward(bucket)[:batch_size]
        if bucket not in self.graphs:
            self._capture(bucket)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:batch_size]
