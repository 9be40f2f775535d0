"""A launched step whose sampled tokens are still on the device (the scheduler reads it one step later).

Its owners each got a -1 placeholder at the end of `token_ids`; `Scheduler.postprocess` of the next
step reads the tokens (`host`) and fills them. Nothing here touches a sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cir.engine.decode_state import DecodeState
from cir.engine.sequence import Sequence


@dataclass
class StepOutput:
    """What `ModelRunner.run` returns: row i of `tokens` / `logprobs` was sampled for `owners[i]`."""

    owners: list[Sequence]
    tokens: torch.Tensor  # (R,) int64, on the device
    logprobs: torch.Tensor  # (R,) float32, on the device


@dataclass
class LaunchedStep:
    """Row i of `tokens` belongs to `owners[i]`."""

    owners: list[Sequence]
    slots: np.ndarray  # (R,) the owners' seed slots (where the next step's inputs find their rows)
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

    def read(self) -> tuple[np.ndarray, torch.Tensor]:
        """Wait for the tokens: (R,) int64 array and the (R,) float32 log-probs on the host."""
        if self.copied is None:
            return self.tokens.numpy(), self.logprobs
        self.copied.synchronize()
        return self.host[0].numpy(), self.host[1]
