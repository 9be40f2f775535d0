"""The generation engine: continuous batching on a paged KV cache, with code-integrated rollouts.

    engine = Engine(model, tokenizer, EngineConfig())
    trajs = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_tokens=4096), n=16,
                            tools=ToolConfig(executor=sandbox, max_calls=2))

It runs on the model's own parameters: an optimizer step on the model is seen by the next
`generate` with no sync. The n samples of a prompt share its KV blocks (the prompt is prefilled
once; each sample's first token is drawn from the same logits). A sequence that closes a
```python block leaves the batch, its code goes to the sandbox (`executor.submit`), the others keep
decoding; the feedback comes back as tokens with loss mask 0, prefilled as one chunk.

The host never holds the device up: step t + 1 is launched before step t's tokens are read (they
stay on the device as step t + 1's inputs; on the host each is a -1 placeholder until read). So EOS
and closed code blocks are seen one step late: a sequence that ended or paused at step t was also
computed in step t + 1, and the token it got there is dropped (its blocks are freed when it ends).
The length limit needs no token, so a sequence at its limit leaves the batch at once. While the
running batch only decodes, a step's host work is numpy on its arrays (decode_state.py) plus two
C-level maps over the token lists (placeholder, fill); only tokens that may stop a sequence (EOS, a
backtick) are looked at one by one. Under autocast with fp32 masters the matmul
weights are read from a persistent bf16 copy (rollout_weights.py; `refresh_rollout_weights`).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import time
from dataclasses import dataclass
from operator import attrgetter

import numpy as np
import torch

from cir.engine.block_manager import BlockManager
from cir.engine.config import EngineConfig, SamplingParams, ToolConfig
from cir.engine.cuda_graphs import DecodeGraphs
from cir.engine.kv_cache import KVCache
from cir.engine.launched_step import LaunchedStep
from cir.engine.model_runner import ModelRunner, seed_bases
from cir.engine.progress import GenerationProgress
from cir.engine.rollout_weights import RolloutWeights
from cir.engine.scheduler import Scheduler
from cir.engine.sequence import Sequence, SequenceStatus
from cir.engine.tools import (SegmentDecoder, check_table, feedback_text, fence_token_table, find_closed_code,
                               scan_start_hint)
from cir_sandbox import format_feedback


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # per response token: 1 sampled, 0 interpreter feedback
    logprobs: list[float]  # behaviour log-probs per response token; 0.0 where masked
    num_tool_calls: int
    num_tool_successes: int
    finish_reason: str  # "eos" | "length" | "budget" | "error"
    text: str  # the response decoded, for display only
    prompt_index: int = 0
    sample_index: int = 0


_seed_slot = attrgetter("seed_slot")


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config = config or EngineConfig()
        mc = model.config
        param = next(model.parameters())
        self.device = param.device
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.kv_cache = KVCache(mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim,
                                config.block_size, param.dtype, param.device)
        self.runner = ModelRunner(model, self.kv_cache, seed=config.seed)
        if config.cuda_graphs and self.device.type == "cuda":
            self.runner.graphs = DecodeGraphs(model, self.kv_cache,
                                              min(config.cuda_graph_max_batch, config.max_num_seqs),
                                              -(-self.max_model_len // config.block_size))
        self.eos_token_ids = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        self.stats: dict[str, float] = {}
        self._fence_table = None  # per token: may it close a code block (tools.fence_token_table)
        self._must_check: set[Sequence] = set()
        self._pending: LaunchedStep | None = None
        self._num_dropped = 0  # sequences ended or paused while the current step ran
        self.rollout_weights: RolloutWeights | None = None  # bf16 copies of fp32 masters, under autocast

    # 1) the KV pool --------------------------------------------------------------------------------
    def _num_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            self._warmup()
            return self.kv_cache.blocks_for_free_gpu_memory(self.config.gpu_memory_utilization)
        return self.kv_cache.blocks_for_memory(self.config.kv_cache_memory_gb * 2**30)

    def _compute_dtype(self) -> torch.dtype:
        """The KV cache dtype: autocast's when generate runs under it (bf16 math on fp32 weights)."""
        if torch.is_autocast_enabled(self.device.type):
            return torch.get_autocast_dtype(self.device.type)
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def _warmup(self) -> None:
        """A forward at the step token budget, so free memory is measured after activations peak."""
        num_tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        cu = torch.tensor([0, num_tokens], dtype=torch.int32, device=self.device)
        self.model.compute_logits(self.model.forward_packed(ids, cu)[-256:])
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()

    def refresh_rollout_weights(self) -> None:
        """Copy the masters into the rollout copies in place; the trainer calls it after each optimizer
        step. A no-op when no copy exists (no autocast rollout yet, or parameters in the autocast dtype)."""
        if self.rollout_weights is not None:
            self.rollout_weights.refresh()

    def _rollout_weights(self) -> contextlib.AbstractContextManager:
        """The bf16 copies swapped in for this rollout when autocast would cast fp32 weights, else nothing."""
        dtype = RolloutWeights.wanted(self.model, self.device) if self.config.rollout_weight_copy else None
        if dtype is None:
            return contextlib.nullcontext()
        if self.rollout_weights is None or self.rollout_weights.dtype != dtype:
            self.rollout_weights = RolloutWeights(self.model, dtype)
        return self.rollout_weights.swapped()

    def release(self) -> None:
        """Give the KV pool's memory back (e.g. to the training step); the next generate reallocates.
        Captured CUDA graphs go too (they point into the pool); they are captured again on use."""
        if self.runner.graphs is not None:
            self.runner.graphs.reset()
        self.kv_cache.release()

    # 2) generation ---------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams, n: int = 1,
                 tools: ToolConfig | None = None, prompt_keys: list[int] | None = None,
                 progress: GenerationProgress | None = None) -> list[Trajectory]:
        """Trajectories in prompt-major order: prompt 0's n samples, then prompt 1's, ...

        Each draw is seeded by (this call's seed, prompt key, sample index, position), so the tokens
        do not depend on batching, preemption or sandbox timing. `prompt_keys` (default: the
        prompts' positions) lets ranks that split one global batch use global indices, so every
        prompt gets its own random stream and the samples do not depend on the number of ranks.
        `progress` (default: a "rollout" line when `config.show_progress`) is told the sampled tokens
        and the finished sequences (progress.py).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > self.config.max_num_seqs:
            raise ValueError(f"n = {n} samples of a prompt run together, but max_num_seqs is "
                             f"{self.config.max_num_seqs}")
        if prompt_keys is not None and len(prompt_keys) != len(prompts):
            raise ValueError(f"{len(prompt_keys)} prompt_keys for {len(prompts)} prompts")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ValueError(f"prompt {i} is empty")
            if len(prompt) >= self.max_model_len:
                raise ValueError(f"prompt {i} has {len(prompt)} tokens; max_model_len is {self.max_model_len}")
        dtype = self._compute_dtype()
        if not self.kv_cache.is_allocated or self.kv_cache.dtype != dtype:
            self.kv_cache.release()
            self.kv_cache.dtype = dtype
            self.kv_cache.allocate(self._num_blocks())
        self.runner.new_call()
        with self._rollout_weights():
            trajs = self._generate(prompts, params, n, tools, prompt_keys, progress)
        if self.config.release_after_generate:
            self.release()
        return trajs

    def _generate(self, prompts: list[list[int]], params: SamplingParams, n: int, tools: ToolConfig | None,
                  prompt_keys: list[int] | None, progress: GenerationProgress | None = None) -> list[Trajectory]:
        if self.runner.graphs is not None:
            self.runner.graphs.check()  # a new pool or new parameter storage: capture again
        block_manager = BlockManager(self.kv_cache.num_blocks, self.config.block_size,
                                     self.config.enable_prefix_caching)
        scheduler = Scheduler(self.config, block_manager)
        groups = []
        for i, prompt in enumerate(prompts):
            key = i if prompt_keys is None else prompt_keys[i]
            group = [Sequence(prompt, params, group_id=i, sample_idx=j, seed_key=key) for j in range(n)]
            group[0].followers = group[1:]
            scheduler.add(group[0])
            groups.append(group)
        if tools is not None:
            for seq in (s for group in groups for s in group):
                seq.decoder = SegmentDecoder(self.tokenizer)
        seqs = [s for group in groups for s in group]
        for slot, seq in enumerate(seqs):
            seq.max_response_tokens = min(params.max_tokens, self.max_model_len - seq.num_prompt_tokens)
            seq.max_num_tokens = seq.num_prompt_tokens + seq.max_response_tokens
            seq.seed_slot = slot
        self.runner.seed_bases = seed_bases(self.runner.call_seed, [s.seed_key for s in seqs],
                                            [s.sample_idx for s in seqs])
        self.runner.shared_params = params
        self.runner.begin_call(seqs, -(-self.max_model_len // self.config.block_size))
        bar = progress if progress is not None else GenerationProgress("rollout", enabled=self.config.show_progress)
        bar.start(len(seqs), sum(s.max_response_tokens for s in seqs))
        self._seconds_waiting = 0.0
        self._stop_ids = [] if params.ignore_eos else sorted(self.eos_token_ids | set(params.stop_token_ids))
        if tools is not None and self._fence_table is None:
            self._fence_table = fence_token_table(self.tokenizer)
        vocab = getattr(self.model.config, "vocab_size", None)
        self._check_table = check_table(self._stop_ids, self._fence_table, tools is not None, (vocab or 0) + 1)
        self._check_unclipped = bool(vocab)  # every sampled id indexes the table
        self._must_check: set[Sequence] = set()
        self._row_of_slot = np.full(len(seqs), -1, dtype=np.int64)  # scratch of _read_pending
        self._pending: LaunchedStep | None = None
        self.runner.on_launch = lambda: self._read_pending(scheduler, tools, bar)
        try:
            num_steps, num_generated = self._loop(scheduler, tools, bar)
            scheduler.drop_decode()
        finally:
            self.runner.on_launch = self.runner.prev_tokens = self.runner.prev_slots = self._pending = None
            self.runner.seed_bases = self.runner.shared_params = self.runner.table_rows = None
        bar.close()
        self.stats = dict(num_steps=num_steps, num_generated_tokens=num_generated,
                          num_preemptions=scheduler.num_preemptions,
                          num_prefix_cache_hit_tokens=block_manager.num_cache_hits,
                          seconds_waiting_on_tools=self._seconds_waiting)
        return [self._trajectory(seq) for group in groups for seq in group]

    def _loop(self, scheduler: Scheduler, tools: ToolConfig | None, bar) -> tuple[int, int]:
        """Steps until every sequence ended: (steps, tokens kept). Step t + 1 is launched before step
        t's tokens are read (`runner.on_launch` -> `_read_pending`), so stops are seen one step late."""
        bm = scheduler.block_manager
        bs, caching, running = bm.block_size, bm.enable_prefix_caching, SequenceStatus.RUNNING
        num_steps = num_generated = 0
        while scheduler.has_work or self._pending is not None:
            self._collect_tool_results(scheduler, bar, block=False)
            if not scheduler.has_work and self._pending is None:  # feedback ended the last sequence
                break
            batch = scheduler.schedule()
            if not batch.seqs:
                if self._pending is not None:  # nothing to overlap with: read the last step now
                    self._read_pending(scheduler, tools, bar)
                    continue
                if scheduler.paused:
                    self._collect_tool_results(scheduler, bar, block=True)
                    continue
                raise RuntimeError("scheduler produced an empty step with no sequence waiting on a tool")
            # 1) launch: placeholders gather the previous step's tokens on the device
            pending = self._pending
            if pending is None:
                self.runner.prev_tokens = self.runner.prev_slots = None
            else:
                self.runner.prev_tokens, self.runner.prev_slots = pending.tokens, pending.slots
            self._num_dropped = 0
            owners, logits = self.runner.forward(batch)
            self._read_pending(scheduler, tools, bar)  # a no-op: forward's on_launch read it
            num_steps += 1
            tokens, logprobs = self.runner.sample(owners, logits, batch.decode)
            ended, state = [], batch.decode
            if state is not None and state.alive and not self._num_dropped:
                # 2) the common step, a plain decode of the running batch: array updates, C-level maps
                ended = [state.seqs[i] for i in state.mark_computed().tolist()]
                if caching and len(state.filled):  # blocks that just filled get their prefix hash
                    for i, end in zip(state.filled.tolist(), state.starts[state.filled].tolist(), strict=True):
                        bm.hash_full_blocks(state.seqs[i], end - 1, end)
                slots = state.slots
            else:
                if state is not None:  # a sequence ended or paused while the step ran
                    scheduler.drop_decode()
                    state = None
                # 2') K/V written; sequences that ended or paused at the previous step drop out of this one
                for seq, num_tokens in zip(batch.seqs, batch.num_tokens, strict=True):
                    if seq.status is running:
                        start = seq.num_cached_tokens
                        seq.num_cached_tokens = start + num_tokens
                        if caching and (start + num_tokens) // bs > start // bs:
                            bm.hash_full_blocks(seq, start)
                for seq in batch.leaders:
                    if seq.followers and seq.status is running:
                        for follower in seq.followers:  # the leader finished its prompt: samples share it
                            bm.share(seq, follower)
                            follower.status = running
                            scheduler.add_running(follower)
                        seq.followers = []
                # 3') each running owner gets a placeholder for its token, filled one step later
                kept = [i for i, seq in enumerate(owners) if seq.status is running]
                if len(kept) < len(owners):
                    index = torch.tensor(kept, dtype=torch.int64, device=tokens.device)
                    owners, tokens, logprobs = [owners[i] for i in kept], tokens[index], logprobs[index]
                for seq in owners:
                    seq.token_ids.append(-1)
                    if len(seq.token_ids) - seq.num_prompt_tokens >= seq.max_response_tokens:
                        ended.append(seq)
                slots = np.fromiter(map(_seed_slot, owners), dtype=np.int64, count=len(owners))
            if ended:  # known without the token: out of the next step, blocks back now
                scheduler.retire(ended)
            self._pending = LaunchedStep.launch(owners, slots, tokens, logprobs, ended, state)
            num_generated += len(owners)
            bar.add_tokens(len(owners))
        return num_steps, num_generated

    def _read_pending(self, scheduler: Scheduler, tools: ToolConfig | None, bar) -> None:
        """Read the pending step's tokens back (the one host sync), fill the placeholders, then end,
        pause or go on with each sequence whose token may stop it."""
        step, self._pending = self._pending, None
        if step is None:
            return
        ids, tokens = step.read()  # fills the placeholders
        table = self._check_table
        check = table[ids] if self._check_unclipped else table[np.minimum(ids, len(table) - 1)]
        rows = np.flatnonzero(check).tolist()
        extra = step.ended + list(self._must_check)  # (ended and paused ones leave _must_check)
        if extra:  # their rows in this step, if they have one (by seed slot: no walk over the owners)
            row_of = self._row_of_slot
            row_of[step.slots] = np.arange(len(step.slots))
            found = row_of[np.fromiter(map(_seed_slot, extra), dtype=np.int64, count=len(extra))]
            row_of[step.slots] = -1
            rows = sorted(set(rows).union(found[found >= 0].tolist()))
        for i in rows:
            self._on_sampled(step.owners[i], tokens[i], scheduler, tools, bar)

    def _on_sampled(self, seq: Sequence, token: int, scheduler: Scheduler, tools: ToolConfig | None,
                    bar) -> None:
        """A sequence whose new token may end or pause it: EOS, the length limit, a closed code block."""
        if token in self._stop_ids:
            return self._finish(seq, "eos", scheduler, bar)
        if len(seq.token_ids) - seq.num_prompt_tokens >= seq.max_response_tokens:
            return self._finish(seq, "length", scheduler, bar)
        if tools is None:
            return
        decoder = seq.decoder
        new = decoder.extend(seq.token_ids[seq.segment_start + len(decoder.ids):])
        if decoder.is_holding_back:
            self._must_check.add(seq)
        else:
            self._must_check.discard(seq)
        if not new:
            return
        found = find_closed_code(decoder.text, seq.scan_offset)
        if found is None:
            seq.scan_offset = scan_start_hint(decoder.text, seq.scan_offset)
            return
        code, end = found
        if seq.num_tool_calls < tools.max_calls:
            seq.num_tool_calls += 1
            seq.pending_tool = tools.executor.submit(code)
            self._must_check.discard(seq)
            self._num_dropped += 1
            scheduler.pause_for_tool(seq)
        elif tools.on_budget_spent == "stop":
            self._finish(seq, "budget", scheduler, bar)
        else:
            seq.scan_offset = end  # budget spent: the block stays as text, generation goes on

    def _collect_tool_results(self, scheduler: Scheduler, bar, block: bool) -> None:
        if not scheduler.paused:
            return
        if block:
            start = time.perf_counter()
            cf.wait([s.pending_tool for s in scheduler.paused], return_when=cf.FIRST_COMPLETED)
            self._seconds_waiting += time.perf_counter() - start
        for seq in [s for s in scheduler.paused if s.pending_tool.done()]:
            future, seq.pending_tool = seq.pending_tool, None
            try:
                result = future.result()
            except Exception:  # the executor itself failed: end this trajectory, not the rollout
                self._finish(seq, "error", scheduler, bar)
                continue
            seq.num_tool_successes += result.status == "ok"
            feedback = self.tokenizer.encode(feedback_text(format_feedback(result)))
            room = seq.max_response_tokens - seq.num_response_tokens
            seq.append_feedback(feedback[:room])
            scheduler.resume_from_tool(seq)
            if len(feedback) >= room:
                self._finish(seq, "length", scheduler, bar)
            else:
                seq.decoder = SegmentDecoder(self.tokenizer)
                seq.segment_start = len(seq.token_ids)

    def _finish(self, seq: Sequence, reason: str, scheduler: Scheduler, bar) -> None:
        self._must_check.discard(seq)
        self._num_dropped += 1
        if seq in scheduler.waiting:
            scheduler.waiting.remove(seq)
        scheduler.finish(seq, reason)
        bar.update(1, seq.num_response_tokens)

    def _trajectory(self, seq: Sequence) -> Trajectory:
        return Trajectory(
            prompt_ids=seq.token_ids[: seq.num_prompt_tokens],
            response_ids=seq.response_ids,
            loss_mask=seq.loss_mask,
            logprobs=seq.logprobs,
            num_tool_calls=seq.num_tool_calls,
            num_tool_successes=seq.num_tool_successes,
            finish_reason=seq.finish_reason,
            text=self.tokenizer.decode(seq.response_ids),
            prompt_index=seq.group_id,
            sample_index=seq.sample_idx,
        )
