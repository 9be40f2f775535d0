"""A stream of prompt groups rolled out across generate calls (`rollout.mode: partial`).

    stream = RolloutStream(groups, SamplingParams(max_tokens=4096), n=16, max_staleness=1)
    for version in range(steps):
        done = engine.generate_stream(stream, num_groups=128, tools=tools, version=version)  # 128 groups
        ...  # train on them; the weights change in place

The engine never drains: each call keeps the running batch full from `groups` (an iterator of
(prompt ids, prompt key); the key seeds the draws and names the group: `Trajectory.prompt_index`) and
returns as soon as `num_groups` groups have every sample finished, in the order they finished. What
is unfinished then (tokens, loss mask, behaviour log-probs, tool state, a sandbox call in flight) is
carried into the next call ahead of new prompts; its blocks are given back, so its KV is recomputed
under the next call's weights (the scheduler's preemption-by-recompute; prefix sharing applies).
Each token records the policy `version` of the call that sampled it (`Trajectory.versions`). A carried
sequence whose oldest token would be more than `max_staleness` versions old when next trained on is
restarted from its prompt (same draws' seeds, new weights) and counted.
"""
from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import numpy as np

from cir.engine.config import SamplingParams
from cir.engine.sequence import Sequence, restore_group


class RolloutStream:
    def __init__(self, groups: Iterator[tuple[list[int], int]], params: SamplingParams, n: int,
                 max_staleness: int | None = 1):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if max_staleness is not None and max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0 (or None: unbounded), got {max_staleness}")
        self.source = iter(groups)
        self.params, self.n, self.max_staleness = params, n, max_staleness
        self.groups: list[list[Sequence]] = []  # taken from the source and not returned yet, oldest first
        self.ready: list[list[Sequence]] = []  # every sample finished, in the order they finished
        self.bases: dict[Sequence, int] = {}  # each sequence's seed base (uint64), fixed when its group is taken
        self.futures: dict[Sequence, Future] = {}  # sandbox calls in flight, across calls
        self.exhausted = False
        self.num_groups_taken = self.num_restarted = 0
        self.stats: dict[str, float] = {}  # of the last call (Engine.generate_stream)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.groups)

    def take_up(self, version: int, max_model_len: int) -> tuple[list[tuple[Sequence, bool]], list[Sequence]]:
        """The start of a call at `version`: the carried sequences (and whether each enters the queues
        itself, i.e. is not a follower waiting for its leader's prompt), oldest group first, and the
        ones restarted for staleness (fresh sequences, taken up as new)."""
        carried, restarted = [], []
        self.groups, self.ready = self.ready + self.groups, []  # (finished groups not returned yet: checked too)
        for group in self.groups:
            attached = {f for s in group for f in s.followers}
            for i, seq in enumerate(group):
                versions = seq.token_versions() if seq.num_response_tokens else []
                if self.max_staleness is not None and versions and version - versions[0] > self.max_staleness:
                    fresh = Sequence(seq.token_ids[: seq.num_prompt_tokens], seq.params, group_id=seq.group_id,
                                     sample_idx=seq.sample_idx, seed_key=seq.seed_key, max_model_len=max_model_len)
                    self.bases[fresh] = self.bases.pop(seq)
                    self.futures.pop(seq, None)  # (a sandbox answer for it is ignored)
                    group[i] = fresh
                    restarted.append(fresh)
                    self.num_restarted += 1
                elif not seq.is_finished:
                    carried.append((seq, seq not in attached))
        return carried, restarted

    def next_group(self, max_model_len: int) -> list[Sequence] | None:
        """The next prompt group from the source (None when it ran out)."""
        if self.exhausted:
            return None
        try:
            prompt, key = next(self.source)
        except StopIteration:
            self.exhausted = True
            return None
        if not prompt or len(prompt) >= max_model_len:
            raise ValueError(f"prompt of key {key} has {len(prompt)} tokens; it must have 1 to "
                             f"{max_model_len - 1} (max_model_len {max_model_len})")
        group = [Sequence(prompt, self.params, group_id=key, sample_idx=j, seed_key=key, max_model_len=max_model_len)
                 for j in range(self.n)]
        self.groups.append(group)
        self.num_groups_taken += 1
        return group

    def collect_finished(self) -> None:
        """Move the groups whose samples all finished to `ready` (in the order found)."""
        done = [g for g in self.groups if all(s.is_finished for s in g)]
        if done:
            self.ready += done
            gone = {id(g) for g in done}
            self.groups = [g for g in self.groups if id(g) not in gone]

    def pop_ready(self, num_groups: int) -> list[list[Sequence]]:
        out, self.ready = self.ready[:num_groups], self.ready[num_groups:]
        for group in out:
            for seq in group:
                self.bases.pop(seq, None)
        return out

    def bases_of(self, seqs: list[Sequence]) -> np.ndarray:
        return np.array([self.bases[s] for s in seqs], dtype=np.uint64)

    # checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The stream between calls as plain data: every group taken and not returned (sequences, seed
        bases, followers), counters. A sandbox call in flight is waited for and its answer kept, so a
        restored stream resumes that sequence with the same feedback. The source's position is not
        here: it belongs to whoever made the source (cir/rl/partial.py saves it)."""
        def group_state(group: list[Sequence]) -> list[dict]:
            index = {s: i for i, s in enumerate(group)}
            out = []
            for seq in group:
                state = {"seq": seq.state(), "base": int(self.bases[seq]),
                         "followers": [index[f] for f in seq.followers]}
                if seq in self.futures:
                    try:
                        state["tool_result"] = self.futures[seq].result()
                    except Exception as e:  # the executor failed: the restored call fails the same way
                        state["tool_error"] = f"{type(e).__name__}: {e}"
                out.append(state)
            return out
        return {"groups": [group_state(g) for g in self.groups], "ready": [group_state(g) for g in self.ready],
                "exhausted": self.exhausted, "num_groups_taken": self.num_groups_taken,
                "num_restarted": self.num_restarted, "n": self.n}

    def load_state_dict(self, state: dict, new_decoder=None) -> None:
        """Continue from `state_dict()`'s groups (this stream's source must continue where that one's
        stopped); `new_decoder` makes tool decoders (tools.SegmentDecoder) for sequences that had one."""
        if state["n"] != self.n:
            raise ValueError(f"stream state has groups of {state['n']} samples, this stream {self.n}")

        def restore(saved: list[dict]) -> list[Sequence]:
            group = restore_group([s["seq"] for s in saved], [s["followers"] for s in saved], self.params,
                                  new_decoder)
            for seq, s in zip(group, saved, strict=True):
                self.bases[seq] = s["base"]
                if "tool_result" in s or "tool_error" in s:
                    future = Future()
                    if "tool_result" in s:
                        future.set_result(s["tool_result"])
                    else:
                        future.set_exception(RuntimeError(s["tool_error"]))
                    self.futures[seq] = future
            return group
        self.bases, self.futures = {}, {}
        self.groups = [restore(g) for g in state["groups"]]
        self.ready = [restore(g) for g in state["ready"]]
        self.exhausted = state["exhausted"]
        self.num_groups_taken, self.num_restarted = state["num_groups_taken"], state["num_restarted"]
