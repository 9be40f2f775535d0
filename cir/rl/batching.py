"""Packing trajectories into token-budget micro-batches for the training forward.

A micro-batch concatenates whole trajectories (prompt + response) up to `max_tokens` tokens (a
longer trajectory goes alone). Only response positions are scored: hidden state t predicts token
t + 1, so a trajectory with P prompt and R response tokens contributes rows P-1 .. P+R-2, whose
targets are exactly its response ids (token in, token out: no re-tokenisation anywhere).

Everything the training step needs on the host (sequence lengths, loss-token counts) is computed
here from the Python lists, so the micro-batch loop never reads a device tensor back.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # (T,) all tokens, packed
    cu_seqlens: torch.Tensor  # (B + 1,) int32
    rows: torch.Tensor  # (N,) int64: packed positions whose next token is a response token
    targets: torch.Tensor  # (N,) response ids
    mask: torch.Tensor  # (N,) float: 1 sampled, 0 interpreter feedback
    old_logprobs: torch.Tensor  # (N,) behaviour log-probs
    advantages: torch.Tensor  # (N,) the trajectory's advantage on each of its tokens
    seq_ids: torch.Tensor  # (N,) index of the trajectory within the micro-batch
    num_tokens: int
    positions: torch.Tensor | None = None  # (T,) int64: each token's position within its sequence
    seq_lens: list[int] = field(default_factory=list)  # host copy of the B sequence lengths
    num_loss_tokens: int = 0  # host count of mask == 1
    num_seqs: int = 0  # B, the trajectories packed here (an upper bound of seq_ids + 1)

    def to(self, device: torch.device) -> MicroBatch:
        """On the device; host tensors go through pinned memory on CUDA so the copies never block."""
        pin = torch.device(device).type == "cuda"
        moved = {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def pack(trajectories: list, advantages: list[float], max_tokens: int) -> list[MicroBatch]:
    """First-fit decreasing: the longest trajectory first, each into the first micro-batch with room.

    Deterministic (a stable sort by length), one trajectory never splits, and the micro-batches
    come out close to `max_tokens` (in-order greedy left each one part-empty wherever a long
    trajectory followed short ones). Within a micro-batch trajectories keep their given order.
    """
    if len(trajectories) != len(advantages):
        raise ValueError(f"{len(trajectories)} trajectories but {len(advantages)} advantages")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajectories]
    groups: list[list[int]] = []
    used: list[int] = []
    for i in sorted(range(len(trajectories)), key=lambda i: -lengths[i]):
        slot = next((g for g in range(len(groups)) if used[g] + lengths[i] <= max_tokens), None)
        if slot is None:
            groups.append([])
            used.append(0)
            slot = len(groups) - 1
        groups[slot].append(i)
        used[slot] += lengths[i]
    return [_build([trajectories[i] for i in sorted(idx)], [advantages[i] for i in sorted(idx)]) for idx in groups]


def _build(trajectories: list, advantages: list[float]) -> MicroBatch:
    ids, cu, rows, targets, mask, old, adv, seq_ids = [], [0], [], [], [], [], [], []
    for s, (traj, a) in enumerate(zip(trajectories, advantages)):
        start = cu[-1]
        num_prompt, num_response = len(traj.prompt_ids), len(traj.response_ids)
        ids += traj.prompt_ids + traj.response_ids
        cu.append(start + num_prompt + num_response)
        rows += range(start + num_prompt - 1, start + num_prompt + num_response - 1)
        targets += traj.response_ids
        mask += traj.loss_mask
        old += traj.logprobs
        adv += [a] * num_response
        seq_ids += [s] * num_response
    seq_lens = [end - start for start, end in zip(cu[:-1], cu[1:])]
    positions = [p for n in seq_lens for p in range(n)]
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        rows=torch.tensor(rows, dtype=torch.int64),
        targets=torch.tensor(targets, dtype=torch.int64),
        mask=torch.tensor(mask, dtype=torch.float32),
        old_logprobs=torch.tensor(old, dtype=torch.float32),
        advantages=torch.tensor(adv, dtype=torch.float32),
        seq_ids=torch.tensor(seq_ids, dtype=torch.int64),
        num_tokens=len(ids),
        positions=torch.tensor(positions, dtype=torch.int64),
        seq_lens=seq_lens,
        num_loss_tokens=int(sum(1 for m in mask if m)),
        num_seqs=len(trajectories),
    )
