"""Prompt batches for the RL steps: an endless, seeded, resumable stream split across ranks.

Each epoch visits every problem once in an order shuffled by (seed, epoch). The epochs are laid
end to end and cut into global batches of `batch_size` prompts, so a batch may span two epochs and
no problem is dropped. Rank r of W takes the r-th contiguous 1/W of each global batch; all ranks
compute the same order from the seed, with no communication.

The position in the stream (epoch, index within it) is the whole state: `state_dict()` after step
k and `load_state_dict()` in a fresh loader continue with exactly the batches of step k + 1.

    loader = PromptLoader(problems, batch_size=128, seed=0, rank=rank, world_size=world_size)
    for step, batch in zip(range(num_steps), loader): ...      # batch: list[Problem], this rank's
"""
import random
from collections.abc import Sequence
from typing import Any

from cir.data.problems import Problem


class PromptLoader:
    """Endless iterator of this rank's share of each global prompt batch.

    batch_size: prompts per step over all ranks; must divide evenly by world_size.
    shuffle: False keeps file order in every epoch.
    """

    def __init__(self, problems: Sequence[Problem], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True) -> None:
        if not problems:
            raise ValueError("PromptLoader needs at least one problem")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} does not split evenly over {world_size} ranks")
        self.problems = list(problems)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # index of the next problem within the epoch's order
        self._order_epoch = -1
        self._order: list[int] = []

    @property
    def num_problems(self) -> int:
        return len(self.problems)

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._order_epoch:
            order = list(range(self.num_problems))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._order, self._order_epoch = order, epoch
        return self._order

    def next_global_batch(self) -> list[Problem]:
        """The next `batch_size` problems of the stream (all ranks' shares)."""
        batch = []
        while len(batch) < self.batch_size:
            order = self._epoch_order(self.epoch)
            take = min(self.batch_size - len(batch), self.num_problems - self.position)
            batch += [self.problems[i] for i in order[self.position : self.position + take]]
            self.position += take
            if self.position == self.num_problems:
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    def __iter__(self) -> "PromptLoader":
        return self

    def __next__(self) -> list[Problem]:
        per_rank = self.batch_size // self.world_size
        batch = self.next_global_batch()
        return batch[self.rank * per_rank : (self.rank + 1) * per_rank]

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_problems": self.num_problems, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; the problem set, seed and shuffle must be the same."""
        for key in ("num_problems", "seed", "shuffle"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_problems:
            raise ValueError(f"loader state out of range: epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
