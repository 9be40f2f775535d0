"""The scheduler's part in rollout streams (cir/engine/stream.py): sequences joining a call that runs
already, carried in from an earlier call, and every block given back when a call ends unfinished.
A mixin of `Scheduler` (scheduler.py), kept apart so each file stays one subject."""
from __future__ import annotations

from cir.engine.sequence import Sequence, SequenceStatus


class StreamScheduling:
    def take_up(self, group: list[Sequence], first_slot: int) -> None:
        """New sequences join a call that runs already (rollout streams): seed slots from `first_slot`."""
        for i, seq in enumerate(group):
            seq.seed_slot = first_slot + i
        self.add_group(group)

    def carry_in(self, seq: Sequence, slot: int, leader: bool) -> None:
        """A sequence an earlier call left unfinished (`release_all`), with no blocks: it recomputes its
        KV under this call's weights. `leader`: it enters the queues (else a follower still waiting for
        its leader's prompt). Paused at the sandbox, it stays paused."""
        seq.seed_slot = slot
        self._grow_slots(slot)
        if self.version is not None:
            seq.version_marks.append((seq.num_response_tokens, self.version))
        if seq.decoder is not None and seq.decoder.is_holding_back:
            self._must_check.add(seq)
        if not leader:
            return
        if seq.status is SequenceStatus.TOOL:
            self.paused.append(seq)
        else:
            self.add(seq)

    def release_all(self) -> None:
        """The call ends with sequences unfinished (rollout streams): read nothing more, give every block
        back; running ones wait (at the front, in order) to be carried into the next call."""
        self.pending = None  # (read already, unless the call failed)
        self.drop_decode()
        for seq in [*self.running, *self.waiting, *self.paused]:
            self.block_manager.free(seq)
        for seq in reversed(self.running):
            self.add(seq, front=True)
        self.running = []
