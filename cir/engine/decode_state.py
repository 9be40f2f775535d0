"""The running batch of a plain decode step as numpy arrays, carried from one step to the next.

In a plain decode step every running sequence computes one token (the one the previous step sampled)
and samples the next. While nothing joins or leaves the running batch, the next step's numbers follow
from this one's: each position, KV slot and length + 1, the same seed bases and limits, a block table
that gains a block where a sequence crosses into a new block. So the scheduler builds this state from
the sequences once (after the running batch changed) and advances it in the steps after, without a
Python walk over the sequences: the model runner takes the step's inputs and seeds from its arrays,
and per step only the token lists are touched (a placeholder appended, then filled, by C-level `map`s
in Scheduler.postprocess).

While the state is alive it is the truth for what it holds: the sequences' `num_cached_tokens`, loss
masks and behaviour log-probs are written back only when it is dropped (`Scheduler.drop_decode`,
whenever the running batch changes, before anything else reads them). Read steps' log-probs wait in
`logprob_log` until then. Only the scheduler changes a state; the runner reads it.

Invariant the scheduler relies on when it advances a state: the block a sequence writes in is its own.
A partially filled block is shared only by `BlockManager.share` (at a group's prefill, a step that is
not plain decode), and the step that builds a state checks every sequence (copy-on-write), so from
then on a sequence either writes in the block it wrote in last step or, at a block boundary, in a
fresh one (`filled`).
"""
from __future__ import annotations

from itertools import chain
from operator import attrgetter

import numpy as np
import torch

from cir.engine.sequence import Sequence

_num_cached, _max_num_tokens, _num_prompt = (attrgetter(f) for f in ("num_cached_tokens", "max_num_tokens",
                                                                     "num_prompt_tokens"))
_seed_slot, _block_table, _token_ids = (attrgetter(f) for f in ("seed_slot", "block_table", "token_ids"))


def block_table_array(tables: list[list[int]]) -> np.ndarray:
    """(B, longest) int32, zero-padded."""
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    array = np.zeros((len(tables), int(lengths.max(initial=0))), dtype=np.int32)
    array[np.arange(array.shape[1]) < lengths[:, None]] = np.fromiter(
        chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum()))
    return array


class DecodeState:
    def __init__(self, seqs: list[Sequence], block_size: int):
        """Gathered from the sequences at schedule time (before the step computes anything)."""
        num, bs = len(seqs), block_size
        self.seqs = seqs  # the running batch in order (the step's `batch.seqs`; never changed)
        self.block_size = bs
        self.rows = np.arange(num)
        self.starts = np.fromiter(map(_num_cached, seqs), dtype=np.int64, count=num)  # positions computed
        self.seq_lens = (self.starts + 1).astype(np.int32)
        limits = np.fromiter(map(_max_num_tokens, seqs), dtype=np.int64, count=num)
        self.limits = limits
        self.steps_to_end = int((limits - 1 - self.starts).min())  # until the first sequence's last token
        self.slots = np.fromiter(map(_seed_slot, seqs), dtype=np.int64, count=num)
        tables = list(map(_block_table, seqs))
        self.tables = block_table_array(tables)  # (B, W) int32
        self.table_lens = np.fromiter(map(len, tables), dtype=np.int64, count=num)
        self.slot_mapping = self.tables[self.rows, self.starts // bs].astype(np.int64) * bs + self.starts % bs
        self.filled = np.zeros(0, dtype=np.int64)  # sequences whose last block filled up in the last step
        self.seed_positions = 1 - np.fromiter(map(_num_prompt, seqs), dtype=np.int64, count=num)  # + starts
        self.token_lists = list(map(_token_ids, seqs))  # the sequences' own lists (the scheduler changes them)
        self.logprob_log: list[torch.Tensor] = []  # (B,) behaviour log-probs of each step read
        self.num_steps = 0  # steps launched on this state; from 1 on, the previous step's token rows are 0..B-1
        self.alive = True

    def __len__(self) -> int:
        return len(self.seqs)

    def add_blocks(self, index: np.ndarray, block_ids: list[int]) -> None:
        """Sequences `index` got one more block each (`BlockManager.append_blocks`); their next token
        is the new block's first."""
        lens = self.table_lens[index]
        if int(lens.max()) >= self.tables.shape[1]:
            self.tables = np.pad(self.tables, ((0, 0), (0, 1)))
        ids = np.asarray(block_ids, dtype=np.int64)
        self.tables[index, lens] = ids
        self.table_lens[index] = lens + 1
        self.slot_mapping[index] = ids * self.block_size

    def advance(self) -> np.ndarray:
        """After the step: each sequence's token has its K/V cached (and the token it sampled waits
        as a placeholder). The indices of the sequences whose token was their last (length limit),
        usually none."""
        self.starts += 1  # (the step's inputs were copied or used by now)
        self.seq_lens += 1
        self.slot_mapping += 1
        self.filled = np.flatnonzero(self.starts % self.block_size == 0)
        self.num_steps += 1
        self.steps_to_end -= 1
        if self.steps_to_end > 0:
            return self.filled[:0]
        return np.flatnonzero(self.starts + 1 >= self.limits)

    def log_read(self, logprobs: torch.Tensor) -> bool:
        """A step launched on this state was read: keep its log-probs for the write-back. False once
        dropped (the reader records them itself)."""
        if self.alive:
            self.logprob_log.append(logprobs)
        return self.alive
