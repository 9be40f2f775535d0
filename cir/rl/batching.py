"""Packing trajectories into token-budget micro-batches for the training forward.

A micro-batch concatenates whole trajectories (prompt + response) up to `max_tokens` tokens (a
longer trajectory goes alone). Only response positions are scored: hidden state t predicts token
t + 1, so a trajectory with P prompt and R response tokens contributes rows P-1 .. P+R-2, whose
targets are exactly its response ids (token in, token out: no re-tokenisation anywhere).
"""
from __future__ import annotations

from dataclasses import dataclass

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

    def to(self, device: torch.device) -> MicroBatch:
        moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                 for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def pack(trajectories: list, advantages: list[float], max_tokens: int) -> list[MicroBatch]:
    """Greedy first-fit in the given order (keeps runs reproducible); one trajectory never splits."""
    if len(trajectories) != len(advantages):
        raise ValueError(f"{len(trajectories)} trajectories but {len(advantages)} advantages")
    groups: list[list[int]] = []
    used = 0
    for i, traj in enumerate(trajectories):
        length = len(traj.prompt_ids) + len(traj.response_ids)
        if not groups or used + length > max_tokens:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += length
    return [_build([trajectories[i] for i in idx], [advantages[i] for i in idx]) for idx in groups]


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
    )
