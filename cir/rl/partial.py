"""`rollout.mode: partial`: RL steps cut from a continuous stream of rollouts.

    python train.py --rollout.mode partial                     # the embedded default run, partial rollouts
    torchrun --nproc_per_node=8 train.py --config configs/cir-qwen2.5-math-7b.yaml --rollout.mode partial

In sync mode every step decodes its prompts to the end: the running batch is full at first and nearly
empty at the end (response lengths are long-tailed). Here the engine never drains
(`Engine.generate_stream`, cir/engine/stream.py): it keeps the running batch full from this rank's
prompts in the data loader's order (`PromptSource`), and a step trains on the first groups whose samples
have all finished; the unfinished sequences are carried into the next step with their tokens, masks,
behaviour log-probs, policy versions and tool state. A step at policy version v (= the trainer's step)
trains on tokens sampled by versions v - rollout.max_staleness .. v (older carried sequences restart
from their prompt); the loss corrects for the lag with the decoupled objective (cir/rl/loss.py):
clip against the proximal policy (the weights at the start of the update: with one mini-batch the
detached current log-probs, with several a no-grad forward before the first optimizer step,
`proximal_logprobs`), importance weight proximal / behaviour truncated at rollout.is_weight_cap.

Dynamic sampling for free: with `rl.filter_groups` a step trains on exactly its share of
train.prompts_per_step groups that carry signal (rewards not all equal), topping up from the stream
at the same weights (no second pass over a drained batch); at most MAX_DRAW_FACTOR times its groups
are drawn, then it trains on what it has. Groups generated, kept and dropped are logged.

Checkpoints carry the stream: `state_dict()` holds the carried sequences (a sandbox call in flight is
waited for and its answer kept), the source's position and the problems of the groups in flight, so a
resumed run continues with the same sequences and the same prompts. Which groups finish first
depends on when the sandbox answers a paused sequence, so with tools on a partial run is reproducible
up to that timing (the tokens themselves are seeded per draw); with tools off it is exact.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from cir.data.loader import PromptLoader
from cir.data.problems import Problem
from cir.data.prompts import build_prompt
from cir.engine import SamplingParams, ToolConfig, Trajectory
from cir.engine.stream import RolloutStream
from cir.engine.tools import SegmentDecoder
from cir.rewards import score_many
from cir.rl import distributed
from cir.rl.advantages import groups_with_signal
from cir.rl.batching import first_fit_decreasing, pack

MAX_DRAW_FACTOR = 8  # dynamic sampling: at most this many times a step's groups generated for it


class PromptSource:
    """This rank's prompts in the loader's order, one at a time: (prompt ids, key). The key is the
    prompt's index in the global stream of batches (unique over the run: it seeds the samples and names
    the group). Prompts over `max_prompt_tokens` are skipped with a notice, as in sync mode."""

    def __init__(self, loader: PromptLoader, encode: Callable[[Problem], list[int]], max_prompt_tokens: int):
        self.loader, self.encode, self.max_prompt_tokens = loader, encode, max_prompt_tokens
        self.batch: list[Problem] = []  # this rank's share of the current global batch
        self.offset = 0  # problems of `batch` taken
        self.num_batches = 0  # batches fetched from the loader
        self.batch_start = loader.state_dict()  # the loader's position before `batch`
        self.problems: dict[int, Problem] = {}  # key -> problem, for the groups not trained yet

    def __iter__(self) -> PromptSource:
        return self

    def __next__(self) -> tuple[list[int], int]:
        while True:
            if self.offset == len(self.batch):
                self.batch_start = self.loader.state_dict()
                self.batch, self.offset = next(self.loader), 0
                self.num_batches += 1
            problem, i = self.batch[self.offset], self.offset
            self.offset += 1
            key = (self.num_batches - 1) * self.loader.batch_size + self.loader.rank * len(self.batch) + i
            ids = self.encode(problem)
            if len(ids) > self.max_prompt_tokens:
                print(f"rank {self.loader.rank}: skipping problem {problem.id}: prompt of {len(ids)} tokens > "
                      f"{self.max_prompt_tokens}", flush=True)
                continue
            self.problems[key] = problem
            return ids, key

    def state_dict(self) -> dict:
        return {"batch_start": self.batch_start, "offset": self.offset, "num_batches": self.num_batches,
                "problems": dict(self.problems)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state_dict()` was taken: the loader goes back to the current batch's start,
        fetches it again and skips what was taken."""
        self.loader.load_state_dict(state["batch_start"])
        self.batch_start, self.batch, self.offset = state["batch_start"], [], state["offset"]
        if state["num_batches"]:
            self.batch = next(self.loader)
        self.num_batches, self.problems = state["num_batches"], dict(state["problems"])


class PartialRollout:
    """The trainer's rollout in partial mode: `rollout(version)` -> trajectories (groups kept for
    training first, then the dropped ones), rewards [G, n] and this step's metrics."""

    def __init__(self, trainer):
        self.trainer = t = trainer
        cfg = t.config.rollout
        self.source = PromptSource(t.loader, lambda p: t.tokenizer.encode(build_prompt(p, t.tokenizer,
                                                                                       mode=cfg.prompt_mode)),
                                   cfg.max_prompt_tokens)
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_tokens)
        self.stream = RolloutStream(self.source, params, n=cfg.n, max_staleness=cfg.max_staleness)
        self.num_groups = t.config.train.prompts_per_step // t.world_size  # this rank's groups per step
        self.metrics: dict[str, float] = {}  # of the last rollout

    def rollout(self, version: int, tools: ToolConfig | None) -> tuple[list[Trajectory], torch.Tensor, dict]:
        """Groups from the stream at policy `version` until this rank has its share (with signal, under
        rl.filter_groups); the stream's statistics in `self.metrics`."""
        t, n = self.trainer, self.stream.n
        filtering = t.config.rl.filter_groups
        kept, dropped = [], []  # (group, rewards)
        decode_steps = occupied = carried_in = restarted = 0.0
        t0 = time.perf_counter()
        seconds_generating = sandbox_wait = 0.0
        while len(kept) < self.num_groups and len(kept) + len(dropped) < MAX_DRAW_FACTOR * self.num_groups:
            g0 = time.perf_counter()
            t.model.eval()
            with distributed.unsharded(t.policy), t._autocast():
                groups = t.engine.generate_stream(self.stream, self.num_groups - len(kept), tools, version)
            t.model.train()
            seconds_generating += time.perf_counter() - g0
            sandbox_wait += t.engine.stats.get("seconds_waiting_on_tools", 0.0)
            s = self.stream.stats
            if not decode_steps:
                carried_in = s["num_carried_in"]
            decode_steps += s["num_decode_steps"]
            occupied += s["occupancy"] * s["num_decode_steps"]
            restarted += s["num_restarted"]
            if not groups:  # the source ran out (a finite loader): train on what there is
                break
            answers = [self.source.problems[g[0].prompt_index].answer for g in groups for _ in range(n)]
            scores = torch.tensor(score_many([tr.text for g in groups for tr in g], answers)).view(len(groups), n)
            signal = groups_with_signal(scores)
            for group, rewards, has_signal in zip(groups, scores, signal.tolist(), strict=True):
                (kept if has_signal or not filtering else dropped).append((group, rewards))
        if filtering and len(kept) < self.num_groups:
            print(f"rank {t.rank}: step {t.step}: {len(kept)} of {self.num_groups} groups with signal after "
                  f"{len(kept) + len(dropped)} generated (at most {MAX_DRAW_FACTOR}x); training on those", flush=True)
        ordered = kept + dropped  # kept first: the mini-batch split (group index % mini_batches) sees them alone
        # prompt_index: the group's row in this step's rewards, as in sync mode (its key named the stream's group)
        trajs = [dataclasses.replace(tr, prompt_index=i) for i, (group, _) in enumerate(ordered) for tr in group]
        rewards = torch.stack([r for _, r in ordered]) if ordered else torch.zeros(0, n)
        t.rollout_problems = [self.source.problems.pop(g[0].prompt_index) for g, _ in ordered]
        self.metrics = self._stream_metrics(version, [tr for g, _ in kept for tr in g], len(kept), len(dropped),
                                            decode_steps, occupied, carried_in, restarted)
        timing = {"time/generate": seconds_generating, "time/reward": time.perf_counter() - t0 - seconds_generating,
                  "time/sandbox_wait": sandbox_wait}
        return trajs, rewards.float(), timing

    def _stream_metrics(self, version: int, trained: list[Trajectory], num_kept: int, num_dropped: int,
                        decode_steps: float, occupied: float, carried_in: float, restarted: float) -> dict:
        """`rollout/*` (per rank, averaged over ranks) and `staleness/*` (over the trained loss tokens)."""
        lags = [version - v for tr in trained for v, m in zip(tr.versions, tr.loss_mask, strict=True) if m]
        t = self.trainer
        local = [decode_steps, occupied, carried_in, self.stream.stats.get("num_unfinished", 0), restarted,
                 num_kept + num_dropped, num_kept, num_dropped, float(sum(lags)), float(len(lags))]
        (steps, occ, c_in, c_out, rest, gen, kept, drop, lag_sum, num_tokens) = distributed.all_reduce_sum(local,
                                                                                                    t.device)
        (lag_max,) = distributed.all_reduce_max([float(max(lags, default=0))], t.device)
        ranks = float(t.world_size)
        return {"rollout/decode_steps": steps / ranks, "rollout/occupancy": occ / max(steps, 1.0),
                "rollout/carried_in": c_in / ranks, "rollout/carried_out": c_out / ranks,
                "rollout/restarted": rest, "rollout/groups_generated": gen, "rollout/groups_kept": kept,
                "rollout/groups_dropped": drop, "rollout/groups_per_trained_group": gen / max(kept, 1.0),
                "rollout/decode_steps_per_trained_group": steps / ranks / max(kept / ranks, 1.0),
                "staleness/max": lag_max, "staleness/mean": lag_sum / max(num_tokens, 1.0)}

    @torch.no_grad()
    def proximal_logprobs(self, trajs: list[Trajectory], groups: list[int]) -> list[torch.Tensor | None] | None:
        """The proximal policy's log-probs (the weights at the start of the update) of the trained
        groups' tokens, one tensor per trajectory (None elsewhere): a no-grad forward before the first
        optimizer step. None with one mini-batch: the update's own log-probs, detached, are these then."""
        t = self.trainer
        if t.config.rl.mini_batches == 1:
            return None
        n, temperature = self.stream.n, t.config.rollout.temperature or 1.0
        index = [g * n + j for g in groups for j in range(n)]
        lengths = [len(trajs[i].prompt_ids) + len(trajs[i].response_ids) for i in index]
        parts = [[index[k] for k in part] for part in first_fit_decreasing(lengths, t.config.train.micro_batch_tokens)]
        (num_micro,) = distributed.all_reduce_max([len(parts)], t.device)  # FSDP: every rank runs as many
        out: list[torch.Tensor | None] = [None] * len(trajs)
        t.model.train()
        for k in range(int(num_micro)):
            part = parts[k] if k < len(parts) else []
            (mb,) = pack([trajs[i] for i in part] or [_Dummy()], [0.0] * max(len(part), 1), 2**62)
            mb = mb.to(t.device)
            with t._autocast():
                logprobs = t.policy(mb.input_ids, mb.cu_seqlens, mb.rows, mb.targets, mb.mask, temperature,
                                    mb.positions, mb.seq_lens)[0].detach().float()
            for i, lp in zip(part, logprobs.split([len(trajs[i].response_ids) for i in part] or [len(logprobs)]),
                             strict=False):
                out[i] = lp
        return out

    # checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "source": self.source.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state["source"])
        self.stream.load_state_dict(state["stream"], new_decoder=lambda: SegmentDecoder(self.trainer.tokenizer))
        num = sum(len(g) for g in self.stream.groups + self.stream.ready)
        distributed.print0(f"resumed the rollout stream: {num} groups in flight carried over")


class _Dummy:
    prompt_ids, response_ids, loss_mask, logprobs = [0], [0], [0], [0.0]
