"""ScheduledBatch: what one engine step computes, as `Scheduler.schedule()` (scheduler.py) hands it to
`ModelRunner.run` (model_runner.py) and back to `Scheduler.postprocess`."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cir.engine.decode_state import DecodeState
from cir.engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens computed this step, per sequence
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write block copies (src, dst)
    is_plain_decode: bool = True  # one token per sequence, each its last: every sequence samples once
    leaders: list[Sequence] = field(default_factory=list)  # sequences with followers (sample for them)
    decode: DecodeState | None = None  # a plain decode step of exactly the running batch: its arrays
    prev_tokens: torch.Tensor | None = None  # (R,) the unread step's tokens, on the device (placeholders' values)
    prev_slots: np.ndarray | None = None  # (R,) the seed slots of prev_tokens' rows

    def __len__(self) -> int:
        return len(self.seqs)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step, so its logits are sampled."""
        seq = self.seqs[i]
        return seq.num_cached_tokens + self.num_tokens[i] == len(seq)
