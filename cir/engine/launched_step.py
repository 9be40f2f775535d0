"""A launched step whose sampled tokens are still on the device (the engine reads it one step later).

Its owners each got a -1 placeholder at the end of `token_ids`; reading the step fills them and
appends each owner's loss mask (1) and behaviour log-prob (kept by the decode state while it is alive,
see decode_state.py), with C-level `map`s over the owners' own lists (no Python frame per sequence).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter, setitem

import numpy as np
import torch

from cir.engine.decode_state import DecodeState, consume
from cir.engine.sequence import Sequence

_token_ids, _loss_mask, _logprobs = attrgetter("token_ids"), attrgetter("loss_mask"), attrgetter("logprobs")


@dataclass
class LaunchedStep:
    """Row i of `tokens` belongs to `owners[i]`."""

    owners: list[Sequence]
    slots: np.ndarray  # (R,) the owners' seed slots (ModelRunner.pending_rows)
    tokens: torch.Tensor  # (R,) int64, on the device: the next step's inputs
    logprobs: torch.Tensor  # (R,) float32
    ended: list[Sequence]  # owners whose token is their last (length limit), already out of the batch
    decode: DecodeState | None = None  # the owners' arrays and lists, when the step decoded the running batch
    host: tuple[torch.Tensor, torch.Tensor] | None = None  # CUDA: pinned copies of tokens, logprobs
    copied: torch.cuda.Event | None = None  # recorded after the copies, before the next step's kernels

    @classmethod
    def launch(cls, owners, slots, tokens, logprobs, ended, decode=None) -> LaunchedStep:
        """On CUDA the copies to the host are queued right behind the sampler, so reading them waits
        for this step only, not for the next one launched after it."""
        step = cls(owners, slots, tokens, logprobs, ended, decode)
        if tokens.device.type == "cuda":
            step.host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in (tokens, logprobs))
            step.host[0].copy_(tokens, non_blocking=True)
            step.host[1].copy_(logprobs, non_blocking=True)
            step.copied = torch.cuda.Event()
            step.copied.record()
        return step

    def read(self) -> tuple[np.ndarray, list[int]]:
        """Wait for the tokens, fill the owners' placeholders, record their loss masks and log-probs
        (in the decode state while it is alive): the tokens as an (R,) int64 array and as a list."""
        if self.copied is None:
            tokens, logprobs = self.tokens.numpy(), self.logprobs
        else:
            self.copied.synchronize()
            tokens, logprobs = self.host[0].numpy(), self.host[1]
        token_list = tokens.tolist()
        if self.decode is not None:
            consume(map(setitem, self.decode.token_lists, repeat(-1), token_list))
            if self.decode.log_read(logprobs):
                return tokens, token_list
        else:
            consume(map(setitem, map(_token_ids, self.owners), repeat(-1), token_list))
        consume(map(list.append, map(_loss_mask, self.owners), repeat(1)))
        consume(map(list.append, map(_logprobs, self.owners), logprobs.tolist()))
        return tokens, token_list
