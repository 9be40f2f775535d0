"""Scheduler: what one model step computes (`schedule`), and every change the step makes (`postprocess`).

An engine step is three calls: `Scheduler.schedule()` -> a batch; `ModelRunner.run(batch)` -> its
tokens and log-probs, on the device; `Scheduler.postprocess(batch, launched)` -> cached counts, prefix
hashes, followers sharing their leader's prompt, placeholders for the unread tokens and their fill one
step later, finishing, tool pauses (handed back to the engine to submit). Only the scheduler, the block
manager and sequence.py write a sequence's fields.

Scheduling: one rule covers prefill, decode and feedback: a scheduled sequence computes its next
`min(num_uncomputed_tokens, budget left)` tokens, and it samples when that reaches its end. A decode
step is 1 token; a prompt, a recompute after preemption, or a fence token + interpreter feedback are
chunks under the per-step token budget (chunked prefill). Running sequences go first, so decode is
never starved by new prompts. When blocks run out, the most recently admitted running sequence is
preempted: its blocks are freed and it is recomputed later (never a crash).

Postprocessing runs one step late for what needs the tokens: step t + 1 is launched before step t's
tokens are read (they stay on the device as step t + 1's inputs; on the host each is a -1 placeholder
until read). So EOS and closed code blocks are seen one step late: a sequence that ended or paused at
step t was also computed in step t + 1, and the token it got there is dropped. The length limit needs
no token, so a sequence at its limit leaves the batch at once. While the running batch only decodes
(`batch.decode` alive), the step's changes are array arithmetic on the decode state plus two C-level
maps over the token lists (placeholder, fill): the same changes as the per-sequence path, vectorised.
Only tokens that may stop a sequence (EOS, a backtick: `check_table`) are looked at one by one.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, setitem

import numpy as np
import torch

from cir.engine.block_manager import BlockManager
from cir.engine.config import EngineConfig, ToolConfig
from cir.engine.decode_state import DecodeState
from cir.engine.launched_step import LaunchedStep, StepOutput
from cir.engine.scheduled_batch import ScheduledBatch
from cir.engine.scheduler_stream import StreamScheduling
from cir.engine.sequence import Sequence, SequenceStatus, consume
from cir.engine.tools import find_closed_code, scan_start_hint

_seed_slot, _token_ids = attrgetter("seed_slot"), attrgetter("token_ids")
_loss_mask, _logprobs = attrgetter("loss_mask"), attrgetter("logprobs")


@dataclass
class ToolCall:
    """A sequence paused at a closed code block (postprocess hands these to the engine to submit)."""

    seq: Sequence
    code: str


class Scheduler(StreamScheduling):
    def __init__(self, config: EngineConfig, block_manager: BlockManager, stop_ids: list[int] = (),
                 check_table: np.ndarray | None = None, tools: ToolConfig | None = None,
                 new_decoder: Callable[[], object] | None = None, version: int | None = None):
        """`stop_ids` end a sequence; `check_table[min(id, len - 1)]` says whether a sampled token is
        looked at one by one (tools.check_table; None: every token); `new_decoder` makes a segment's
        decoder (tools.SegmentDecoder) when `tools` is set; `version`: the policy version sampling in
        this call, marked on each sequence taken up (rollout streams; None: not recorded)."""
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.paused: list[Sequence] = []  # waiting for the sandbox, blocks kept
        self.num_preemptions = 0
        # the running batch's arrays while it only decodes; dropped (`drop_decode`) whenever `running` changes
        self.decode: DecodeState | None = None
        self.stop_ids = set(stop_ids)
        self.check_table = np.ones(1, dtype=bool) if check_table is None else check_table
        self.tools, self.new_decoder, self.version = tools, new_decoder, version
        self.pending: LaunchedStep | None = None  # the launched step whose tokens are not read yet
        self.num_finished = self.num_generated_tokens = 0
        self.num_finished_tokens = 0  # response tokens of the finished sequences (progress estimates)
        self._must_check: set[Sequence] = set()  # decoders holding back half a character: check every token
        self._num_dropped = 0  # sequences ended or paused while reading the pending step
        self._row_of_slot = np.zeros(0, dtype=np.int64)  # scratch of _read_pending, by seed slot

    def add_group(self, group: list[Sequence]) -> None:
        """The n samples of a prompt: the first prefills it, the others share its blocks then."""
        leader = group[0]
        leader.followers = group[1:]
        for seq in group:
            if self.tools is not None:
                seq.decoder = self.new_decoder()
            if self.version is not None:
                seq.version_marks.append((0, self.version))
        self._grow_slots(max(s.seed_slot for s in group))
        self.add(leader)

    def _grow_slots(self, max_slot: int) -> None:
        if max_slot >= len(self._row_of_slot):
            self._row_of_slot = np.full(max(2 * len(self._row_of_slot), max_slot + 1), -1, dtype=np.int64)

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.paused) or self.pending is not None

    def _num_seqs(self, seq: Sequence) -> int:
        return 1 + len(seq.followers)

    def preempt(self, seq: Sequence) -> None:
        self.drop_decode()
        self.block_manager.free(seq)
        self.running.remove(seq)
        self.num_preemptions += 1
        self.add(seq, front=True)

    # 1) schedule ---------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        if self.pending is not None:
            batch.prev_tokens, batch.prev_slots = self.pending.tokens, self.pending.slots
        budget = self.config.max_num_batched_tokens
        if self.decode is not None and self._advance(batch, budget):
            budget -= len(batch.seqs)
        else:
            self.drop_decode()
            budget = self._schedule_running(batch, budget)
        admitted = self._admit(batch, budget) if self.waiting and budget > 0 else False
        if admitted:
            batch.decode = None  # (add_running dropped the state)
        elif self.decode is None and batch.is_plain_decode and batch.seqs and len(batch.seqs) == len(self.running):
            self.decode = batch.decode = DecodeState(batch.seqs, self.block_manager.block_size)
        return batch

    def drop_decode(self) -> None:
        """The running batch changes: write the decode state back into the sequences, forget it."""
        state = self.decode
        if state is not None:
            self.decode = None
            state.alive = False
            consume(map(setattr, state.seqs, repeat("num_cached_tokens"), state.starts.tolist()))
            if state.logprob_log:
                consume(map(list.extend, map(_logprobs, state.seqs), torch.stack(state.logprob_log).T.tolist()))
                consume(map(list.extend, map(_loss_mask, state.seqs), repeat([1] * len(state.logprob_log))))
                state.logprob_log = []

    def _advance(self, batch: ScheduledBatch, budget: int) -> bool:
        """The running batch decodes again, unchanged since the last step: the decode state's arrays
        say which sequences cross into a new block (no walk over the sequences). False when it does
        not fit (token budget, free blocks): the general path decides (and preempts)."""
        state, bm = self.decode, self.block_manager
        if len(state) > budget:
            return False
        need = state.filled  # they cross into a new block
        if len(need):
            if len(need) > bm.num_free_blocks or (state.table_lens[need] * bm.block_size != state.starts[need]).any():
                return False  # (the second: a table with room left, never seen; the general path is right)
            state.add_blocks(need, bm.append_blocks([state.seqs[i] for i in need.tolist()]))
        batch.seqs, batch.num_tokens, batch.decode = state.seqs, [1] * len(state), state
        return True

    def _schedule_running(self, batch: ScheduledBatch, budget: int) -> int:
        """Running sequences: decode tokens and the rest of chunked prefills; the budget left."""
        bm = self.block_manager
        bs, blocks, running = bm.block_size, bm.blocks, SequenceStatus.RUNNING
        seqs, counts = batch.seqs, batch.num_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not running:  # preempted by an earlier one this step
                continue
            start = seq.num_cached_tokens
            num_tokens = len(seq.token_ids) - start
            table = seq.block_table
            if num_tokens != 1 or seq.followers:
                num_tokens = min(num_tokens, budget)
                self._note(batch, seq, num_tokens)
            if start + num_tokens <= len(table) * bs and (start % bs == 0 or blocks[table[start // bs]].ref_count == 1):
                # fast path (most decode steps): the slots exist and the block written is not shared
                seqs.append(seq)
                counts.append(num_tokens)
                budget -= num_tokens
                continue
            while not bm.can_append(seq, num_tokens):
                if self._reclaim(seq, num_tokens):  # idle sequences' blocks go first
                    break
                # the most recently admitted one not scheduled yet: every sequence before `seq` in
                # `running` is scheduled (or was preempted and left), every one after it is not
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            batch.copies += bm.append_slots(seq, num_tokens)
            seqs.append(seq)
            counts.append(num_tokens)
            budget -= num_tokens
        return budget

    def _admit(self, batch: ScheduledBatch, budget: int) -> bool:
        """Waiting sequences (new prompts, returns from the sandbox, preempted ones) while they fit;
        whether any was admitted."""
        bm, admitted = self.block_manager, False
        num_running = len(self.running) + sum([len(s.followers) for s in self.running]) if self.waiting else 0
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if num_running + self._num_seqs(seq) > self.config.max_num_seqs and self.running:
                break
            if not seq.block_table:
                bm.match_prefix(seq)
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            if not bm.can_append(seq, num_tokens):
                if batch.seqs or self.running:
                    break  # blocks come back as running sequences finish
                if not self._reclaim(seq, num_tokens):
                    self._too_small(seq, num_tokens)
            self.waiting.popleft()
            self._note(batch, seq, num_tokens)
            batch.copies += bm.append_slots(seq, num_tokens)
            seq.status = SequenceStatus.RUNNING
            self.add_running(seq)
            num_running += self._num_seqs(seq)
            if batch.decode is not None:  # the batch's list is the decode state's: not to be changed
                batch.seqs, batch.decode = list(batch.seqs), None
            batch.seqs.append(seq)
            batch.num_tokens.append(num_tokens)
            budget -= num_tokens
            admitted = True
        return admitted

    @staticmethod
    def _note(batch: ScheduledBatch, seq: Sequence, num_tokens: int) -> None:
        """A sequence that makes the step other than plain decode (a chunk, or a leader)."""
        if num_tokens != 1 or seq.num_cached_tokens + 1 != len(seq.token_ids) or seq.followers:
            batch.is_plain_decode = False
        if seq.followers:
            batch.leaders.append(seq)

    def _reclaim(self, seq: Sequence, num_tokens: int) -> bool:
        """Free the blocks idle sequences hold (back from the sandbox but not yet admitted, or still
        waiting on it; they recompute later) until `seq` fits; whether it fits."""
        for other in [*reversed(self.waiting), *self.paused]:
            if self.block_manager.can_append(seq, num_tokens):
                break
            if other is not seq and other.block_table:
                self.block_manager.free(other)
        return self.block_manager.can_append(seq, num_tokens)

    def _too_small(self, seq: Sequence, num_tokens: int) -> None:
        needed = self.block_manager.num_blocks_needed(seq, num_tokens)
        raise RuntimeError(
            f"the KV pool ({len(self.block_manager.blocks)} blocks of {self.block_manager.block_size} "
            f"tokens) cannot hold one sequence: {needed} blocks needed for {len(seq)} tokens, "
            f"{self.block_manager.num_free_blocks} free; raise num_kv_blocks / kv_cache_memory_gb "
            f"or lower max_tokens"
        )

    def add_running(self, seq: Sequence) -> None:
        self.drop_decode()
        self.running.append(seq)

    # 2) postprocess -------------------------------------------------------------------------------------
    def postprocess(self, batch: ScheduledBatch, launched: StepOutput | None) -> list[ToolCall]:
        """After `ModelRunner.run(batch)` launched the step (None: nothing launched, only read): read
        the previous step's tokens and stop or pause who they end, then record this step: cached
        counts, prefix hashes, followers, placeholders, the length limit. The new tool calls."""
        calls = self._read_pending()
        if launched is None:
            return calls
        bm, owners, tokens, logprobs = self.block_manager, launched.owners, launched.tokens, launched.logprobs
        bs, caching, running = bm.block_size, bm.enable_prefix_caching, SequenceStatus.RUNNING
        ended, state = [], batch.decode
        if state is not None and state.alive and not self._num_dropped:
            # a plain decode of the running batch: the same changes as below, as array arithmetic
            ended = [state.seqs[i] for i in state.advance().tolist()]
            consume(map(list.append, state.token_lists, repeat(-1)))
            if caching and len(state.filled):  # blocks that just filled get their prefix hash
                for i, end in zip(state.filled.tolist(), state.starts[state.filled].tolist(), strict=True):
                    bm.hash_full_blocks(state.seqs[i], end - 1, end)
            slots = state.slots
        else:
            if state is not None:  # a sequence ended or paused while the step ran
                self.drop_decode()
                state = None
            # K/V written; sequences that ended or paused at the previous step drop out of this one
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
                        self.add_running(follower)
                    seq.followers = []
            # each running owner gets a placeholder for its token, filled one step later
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
            self.retire(ended)
        self.pending = LaunchedStep.launch(owners, slots, tokens, logprobs, ended, state)
        self.num_generated_tokens += len(owners)
        return calls

    def _read_pending(self) -> list[ToolCall]:
        """Read the pending step's tokens back (the one host sync), fill the placeholders, record loss
        masks and log-probs (in the decode state while it is alive), then end, pause or go on with
        each sequence whose token may stop it."""
        step, self.pending = self.pending, None
        self._num_dropped = 0
        calls: list[ToolCall] = []
        if step is None:
            return calls
        ids, logprobs = step.read()
        tokens = ids.tolist()
        if step.decode is not None:
            consume(map(setitem, step.decode.token_lists, repeat(-1), tokens))
            logged = step.decode.log_read(logprobs)
        else:
            consume(map(setitem, map(_token_ids, step.owners), repeat(-1), tokens))
            logged = False
        if not logged:
            consume(map(list.append, map(_loss_mask, step.owners), repeat(1)))
            consume(map(list.append, map(_logprobs, step.owners), logprobs.tolist()))
        table = self.check_table
        rows = np.flatnonzero(table[np.minimum(ids, len(table) - 1)]).tolist()
        extra = step.ended + list(self._must_check)  # (ended and paused ones leave _must_check)
        if extra:  # their rows in this step, if they have one (by seed slot: no walk over the owners)
            row_of = self._row_of_slot
            row_of[step.slots] = np.arange(len(step.slots))
            found = row_of[np.fromiter(map(_seed_slot, extra), dtype=np.int64, count=len(extra))]
            row_of[step.slots] = -1
            rows = sorted(set(rows).union(found[found >= 0].tolist()))
        for i in rows:
            self._on_sampled(step.owners[i], tokens[i], calls)
        return calls

    def _on_sampled(self, seq: Sequence, token: int, calls: list[ToolCall]) -> None:
        """A sequence whose new token may end or pause it: EOS, the length limit, a closed code block."""
        if token in self.stop_ids:
            return self.finish(seq, "eos")
        if len(seq.token_ids) - seq.num_prompt_tokens >= seq.max_response_tokens:
            return self.finish(seq, "length")
        tools = self.tools
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
            self.pause_for_tool(seq)
            calls.append(ToolCall(seq, code))
        elif tools.on_budget_spent == "stop":
            self.finish(seq, "budget")
        else:
            seq.scan_offset = end  # budget spent: the block stays as text, generation goes on

    # 3) leaving and coming back ---------------------------------------------------------------------------
    def finish(self, seq: Sequence, reason: str) -> None:
        self._must_check.discard(seq)
        self._num_dropped += 1
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.drop_decode()  # (before the block manager resets the sequence)
            self.running.remove(seq)
        elif seq in self.paused:
            self.paused.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.num_finished += 1
        self.num_finished_tokens += seq.num_response_tokens

    def retire(self, seqs: list[Sequence]) -> None:
        """Out of the running batch with their blocks freed, before `finish` (their last token is
        sampled but not read yet, so the reason is not known). One pass over `running` for all."""
        self.drop_decode()
        for seq in seqs:
            self.block_manager.free(seq)
        gone = set(seqs)
        self.running[:] = [seq for seq in self.running if seq not in gone]

    def pause_for_tool(self, seq: Sequence) -> None:
        """Leave the running batch (blocks kept) until the sandbox answers."""
        self._must_check.discard(seq)
        self._num_dropped += 1
        if seq in self.running:
            self.drop_decode()
            self.running.remove(seq)
        else:  # preempted while its last token was on the device: it recomputes after the tool
            self.waiting.remove(seq)
        self.paused.append(seq)
        seq.status = SequenceStatus.TOOL

    def resume_from_tool(self, seq: Sequence, feedback: list[int], ok: bool) -> None:
        """Back from the sandbox: the feedback tokens are appended (as many as fit) and, unless they
        reach the length limit, the fence token and feedback are computed next."""
        seq.num_tool_successes += ok
        room = seq.max_response_tokens - seq.num_response_tokens
        seq.append_feedback(feedback[:room])
        self.paused.remove(seq)
        self.add(seq, front=True)
        if len(feedback) >= room:
            self.finish(seq, "length")
        else:
            seq.decoder = self.new_decoder()
            seq.segment_start = len(seq.token_ids)
