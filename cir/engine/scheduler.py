"""Scheduler: decides which tokens of which sequences one model step computes.

One rule covers prefill, decode and feedback: a scheduled sequence computes its next
`min(num_uncomputed_tokens, budget left)` tokens, and it samples when that reaches its end. A decode
step is 1 token; a prompt, a recompute after preemption, or a fence token + interpreter feedback are
chunks under the per-step token budget (chunked prefill). Running sequences go first, so decode is
never starved by new prompts. When blocks run out, the most recently admitted running sequence is
preempted: its blocks are freed and it is recomputed later (never a crash).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cir.engine.block_manager import BlockManager
from cir.engine.config import EngineConfig
from cir.engine.decode_state import DecodeState
from cir.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed this step, per sequence
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies (src, dst)
    is_plain_decode: bool = True  # one token per sequence, each its last: every sequence samples once
    leaders: list[Sequence] = field(default_factory=list)  # sequences with followers (sample for them)
    decode: DecodeState | None = None  # a plain decode step of exactly the running batch: its arrays

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step, so its logits are sampled."""
        seq = self.seqs[i]
        return seq.num_cached_tokens + self.num_tokens[i] == len(seq)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.paused: list[Sequence] = []  # waiting for the sandbox, blocks kept
        self.num_preemptions = 0
        # the running batch's arrays while it only decodes; dropped (`drop_decode`) whenever `running` changes
        self.decode: DecodeState | None = None

    def add(self, seq: Sequence, front: bool = False) -> None:
        seq.status = SequenceStatus.WAITING
        if front:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.paused)

    def _num_seqs(self, seq: Sequence) -> int:
        return 1 + len(seq.followers)

    def preempt(self, seq: Sequence) -> None:
        self.drop_decode()
        self.block_manager.free(seq)
        self.running.remove(seq)
        self.num_preemptions += 1
        self.add(seq, front=True)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
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
        if self.decode is not None:
            self.decode.sync()
            self.decode = None

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

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq in self.running:
            self.drop_decode()  # (before the block manager resets the sequence)
            self.running.remove(seq)
        elif seq in self.paused:
            self.paused.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

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
        if seq in self.running:
            self.drop_decode()
            self.running.remove(seq)
        else:  # preempted while its last token was on the device: it recomputes after the tool
            self.waiting.remove(seq)
        self.paused.append(seq)
        seq.status = SequenceStatus.TOOL

    def resume_from_tool(self, seq: Sequence) -> None:
        """Back from the sandbox (feedback appended): compute the fence token and feedback next."""
        self.paused.remove(seq)
        self.add(seq, front=True)
