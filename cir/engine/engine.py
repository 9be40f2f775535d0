"""The generation engine: continuous batching on a paged KV cache, with code-integrated rollouts.

    engine = Engine(model, tokenizer, EngineConfig())
    trajs = engine.generate(prompt_ids, SamplingParams(temperature=1.0, max_tokens=4096), n=16,
                            tools=ToolConfig(executor=sandbox, max_calls=2))

It runs on the model's own parameters: an optimizer step on the model is seen by the next
`generate` with no sync. The n samples of a prompt share its KV blocks (the prompt is prefilled
once; each sample's first token is drawn from the same logits). A sequence that closes a
```python block leaves the batch, its code goes to the sandbox (`executor.submit`), the others keep
decoding; the feedback comes back as tokens with loss mask 0, prefilled as one chunk.

One engine step is three calls, each owned by one module:

    batch = scheduler.schedule()                    # what runs: prefill chunks, decode rows, block tables
    launched = runner.run(batch, ctx)               # its tokens and log-probs, left on the device
    tool_calls = scheduler.postprocess(batch, launched)  # every change to sequences, blocks, decode state

`generate` keeps the outer loop around them (submitting tool calls, collecting the sandbox's answers
as feedback, progress) and writes no sequence field. The host never holds the device up: step t + 1
is launched before step t's tokens are read (postprocess reads them, one step late; see scheduler.py).
While the running batch only decodes, postprocess is array arithmetic on its decode state
(decode_state.py) and the runner feeds the step (or its CUDA graph) from the same arrays. Under
autocast with fp32 masters the matmul weights are read from a persistent bf16 copy
(rollout_weights.py; `refresh_rollout_weights`).
"""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import time
from dataclasses import dataclass

import torch

from cir.engine.block_manager import BlockManager
from cir.engine.config import EngineConfig, SamplingParams, ToolConfig
from cir.engine.cuda_graphs import DecodeGraphs
from cir.engine.kv_cache import KVCache
from cir.engine.model_runner import CallContext, ModelRunner, seed_bases
from cir.engine.progress import GenerationProgress
from cir.engine.rollout_weights import RolloutWeights
from cir.engine.scheduler import ScheduledBatch, Scheduler, ToolCall
from cir.engine.sequence import Sequence
from cir.engine.stream import RolloutStream
from cir.engine.tools import InfraFailures, SegmentDecoder, check_table, fence_token_table, feedback_text, tool_outcome


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # per response token: 1 sampled, 0 interpreter feedback
    logprobs: list[float]  # behaviour log-probs per response token; 0.0 where masked
    num_tool_calls: int
    num_tool_successes: int
    finish_reason: str  # "eos" | "length" | "budget"
    text: str  # the response decoded, for display only
    prompt_index: int = 0
    sample_index: int = 0
    versions: list[int] | None = None  # rollout streams: the policy version that sampled each response token


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
        graphs = None
        if config.cuda_graphs and self.device.type == "cuda":
            graphs = DecodeGraphs(model, self.kv_cache, min(config.cuda_graph_max_batch, config.max_num_seqs),
                                  -(-self.max_model_len // config.block_size))
        self.runner = ModelRunner(model, self.kv_cache, seed=config.seed, graphs=graphs)
        self.eos_token_ids = set(getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
        self.stats: dict[str, float] = {}
        self._fence_table = None  # per token: may it close a code block (tools.fence_token_table)
        self.rollout_weights: RolloutWeights | None = None  # bf16 copies of fp32 masters, under autocast
        self.infra_failures = InfraFailures()  # tool calls the sandbox failed; too many in a row stop generate

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
        self.runner.release_graphs()
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
        self._ensure_pool()
        with self._rollout_weights():
            trajs = self._generate(prompts, params, n, tools, prompt_keys, progress)
        if self.config.release_after_generate:
            self.release()
        return trajs

    def _ensure_pool(self) -> None:
        dtype = self._compute_dtype()
        if not self.kv_cache.is_allocated or self.kv_cache.dtype != dtype:
            self.kv_cache.release()
            self.kv_cache.dtype = dtype
            self.kv_cache.allocate(self._num_blocks())

    def _scheduler(self, params: SamplingParams, tools: ToolConfig | None, version: int | None = None) -> Scheduler:
        block_manager = BlockManager(self.kv_cache.num_blocks, self.config.block_size,
                                     self.config.enable_prefix_caching)
        stop_ids = [] if params.ignore_eos else sorted(self.eos_token_ids | set(params.stop_token_ids))
        if tools is not None and self._fence_table is None:
            self._fence_table = fence_token_table(self.tokenizer)
        vocab = getattr(self.model.config, "vocab_size", None)
        return Scheduler(self.config, block_manager, stop_ids,
                         check_table(stop_ids, self._fence_table, tools is not None, (vocab or 0) + 1),
                         tools, lambda: SegmentDecoder(self.tokenizer), version)

    def _generate(self, prompts: list[list[int]], params: SamplingParams, n: int, tools: ToolConfig | None,
                  prompt_keys: list[int] | None, progress: GenerationProgress | None = None) -> list[Trajectory]:
        scheduler = self._scheduler(params, tools)
        groups = []
        for i, prompt in enumerate(prompts):
            key = i if prompt_keys is None else prompt_keys[i]
            groups.append([Sequence(prompt, params, group_id=i, sample_idx=j, seed_key=key, seed_slot=i * n + j,
                                    max_model_len=self.max_model_len) for j in range(n)])
            scheduler.add_group(groups[-1])
        seqs = [s for group in groups for s in group]
        ctx = self.runner.begin_call(seqs, -(-self.max_model_len // self.config.block_size), params)
        bar = progress if progress is not None else GenerationProgress("rollout", enabled=self.config.show_progress)
        bar.start(len(seqs), sum(s.max_response_tokens for s in seqs))
        self._seconds_waiting = 0.0
        self.infra_failures.num = 0
        try:
            num_steps = self._loop(scheduler, ctx, tools, bar, {})
        finally:
            scheduler.drop_decode()
        bar.close()
        self._set_stats(scheduler, num_steps)
        return [self._trajectory(seq) for seq in seqs]

    def _set_stats(self, scheduler: Scheduler, num_steps: int) -> None:
        self.stats = dict(num_steps=num_steps, num_generated_tokens=scheduler.num_generated_tokens,
                          num_preemptions=scheduler.num_preemptions,
                          num_prefix_cache_hit_tokens=scheduler.block_manager.num_cache_hits,
                          seconds_waiting_on_tools=self._seconds_waiting,
                          num_tool_infra_failures=self.infra_failures.num)

    # 3) rollout streams (rollout.mode: partial, see stream.py) -------------------------------------------
    def generate_stream(self, stream: RolloutStream, num_groups: int, tools: ToolConfig | None = None,
                        version: int = 0) -> list[list[Trajectory]]:
        """Roll the stream on until `num_groups` groups have all their samples finished (fewer only when
        the source ran out): those groups' trajectories, in the order they finished, each with the
        policy version of every token. The rest is carried into the next call."""
        if num_groups < 1:
            raise ValueError(f"num_groups must be >= 1, got {num_groups}")
        if stream.n > self.config.max_num_seqs:
            raise ValueError(f"n = {stream.n} samples of a prompt run together, but max_num_seqs is "
                             f"{self.config.max_num_seqs}")
        self._ensure_pool()
        with self._rollout_weights():
            groups = self._generate_stream(stream, num_groups, tools, version)
        if self.config.release_after_generate:
            self.release()
        return [[self._trajectory(seq, versions=True) for seq in group] for group in groups]

    def _generate_stream(self, stream: RolloutStream, num_groups: int, tools: ToolConfig | None,
                         version: int) -> list[list[Sequence]]:
        scheduler = self._scheduler(stream.params, tools, version)
        carried, restarted = stream.take_up(version, self.max_model_len)
        for slot, (seq, leader) in enumerate(carried):
            scheduler.carry_in(seq, slot, leader)
        ctx = self.runner.begin_call([], -(-self.max_model_len // self.config.block_size), stream.params,
                                     bases=stream.bases_of([seq for seq, _ in carried]))
        for seq in restarted:
            self._take_up(stream, scheduler, ctx, [seq])
        num_carried, occupancy = len(carried), []
        self._seconds_waiting = 0.0
        self.infra_failures.num = 0

        def between_steps() -> bool:
            """Keep the running batch full from the stream; whether enough groups are done."""
            live = len(ctx.seed_bases) - scheduler.num_finished - len(scheduler.paused)
            while live + stream.n <= self.config.max_num_seqs:
                group = stream.next_group(self.max_model_len)
                if group is None:
                    break
                self._take_up(stream, scheduler, ctx, group)
                live += stream.n
            if scheduler.num_finished != between_steps.seen:
                between_steps.seen = scheduler.num_finished
                stream.collect_finished()
            occupancy.append(len(scheduler.running))
            return len(stream.ready) >= num_groups
        between_steps.seen = -1

        try:
            num_steps = self._loop(scheduler, ctx, tools, None, stream.futures, between_steps)
            while scheduler.pending is not None:  # the last step's tokens: read them now
                calls = scheduler.postprocess(ScheduledBatch(), None)
                if calls:
                    self._submit(calls, tools, stream.futures)
        finally:
            scheduler.release_all()
        stream.collect_finished()
        self._set_stats(scheduler, num_steps)
        steps = max(len(occupancy) - 1, 1)
        stream.stats = dict(num_decode_steps=num_steps, num_carried_in=num_carried,
                            occupancy=sum(occupancy[1:]) / steps / self.config.max_num_seqs,
                            num_unfinished=sum(not s.is_finished for g in stream.groups for s in g),
                            num_restarted=len(restarted), num_groups_taken=stream.num_groups_taken)
        return stream.pop_ready(num_groups)

    def _take_up(self, stream: RolloutStream, scheduler: Scheduler, ctx: CallContext, group: list[Sequence]) -> None:
        """New sequences join the call: seed slots (by constructor order), seed bases, the queues."""
        first = len(ctx.seed_bases)
        fresh = [s for s in group if s not in stream.bases]
        if fresh:
            for seq, base in zip(fresh, seed_bases(self.runner.call_seed, [s.seed_key for s in fresh],
                                                   [s.sample_idx for s in fresh]).tolist(), strict=True):
                stream.bases[seq] = base
        scheduler.take_up(group, first)
        self.runner.extend_call(ctx, stream.bases_of(group))

    def _loop(self, scheduler: Scheduler, ctx: CallContext, tools: ToolConfig | None, bar,
              futures: dict[Sequence, cf.Future], between_steps=None) -> int:
        """Steps until every sequence ended (or `between_steps()` says stop): schedule -> run ->
        postprocess, around them the tool calls and the progress bar. The number of steps launched."""
        num_steps = 0
        while True:
            if between_steps is not None and between_steps():
                break
            if not scheduler.has_work:
                break
            if scheduler.paused:
                self._collect_tool_results(scheduler, futures, block=False)
                if not scheduler.has_work:  # feedback ended the last sequence
                    continue
            batch = scheduler.schedule()
            if batch.seqs:
                launched = self.runner.run(batch, ctx)
                num_steps += 1
            elif scheduler.pending is not None:  # nothing to overlap with: read the last step now
                launched = None
            elif scheduler.paused:
                self._collect_tool_results(scheduler, futures, block=True)
                continue
            else:
                raise RuntimeError("scheduler produced an empty step with no sequence waiting on a tool")
            calls = scheduler.postprocess(batch, launched)
            if calls:
                self._submit(calls, tools, futures)
            if bar is not None:
                bar.set_counts(scheduler.num_generated_tokens, scheduler.num_finished, scheduler.num_finished_tokens)
        return num_steps

    @staticmethod
    def _submit(calls: list[ToolCall], tools: ToolConfig, futures: dict[Sequence, cf.Future]) -> None:
        for call in calls:
            futures[call.seq] = tools.executor.submit(call.code)

    def _collect_tool_results(self, scheduler: Scheduler, futures: dict[Sequence, cf.Future], block: bool) -> None:
        """Feedback for each sequence whose sandbox call is done (`block`: wait for one first)."""
        if block:
            start = time.perf_counter()
            cf.wait([futures[s] for s in scheduler.paused], return_when=cf.FIRST_COMPLETED)
            self._seconds_waiting += time.perf_counter() - start
        for seq in [s for s in scheduler.paused if futures[s].done()]:
            outcome = tool_outcome(futures.pop(seq))  # never raises; a failed executor's error is the feedback
            self.infra_failures.record(outcome)  # counted; SandboxFailingError when they keep failing
            feedback = self.tokenizer.encode(feedback_text(outcome.text))
            scheduler.resume_from_tool(seq, feedback, outcome.ok)

    def _trajectory(self, seq: Sequence, versions: bool = False) -> Trajectory:
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
            versions=seq.token_versions() if versions else None,
        )
