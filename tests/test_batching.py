"""cir.rl.batching: first-fit-decreasing packing and the vectorised micro-batch tensors, against a plain
per-token construction of the same tensors."""
import random

import pytest
import torch

from cir.engine import Trajectory
from cir.rl.batching import first_fit_decreasing, pack


def _trajectories(seed: int, num: int) -> tuple[list[Trajectory], list[float]]:
    rng = random.Random(seed)
    trajs = []
    for _ in range(num):
        num_prompt, num_response = rng.randint(1, 30), rng.choice([0, 1, rng.randint(2, 40)])
        mask = [rng.random() > 0.2 for _ in range(num_response)]
        trajs.append(Trajectory(prompt_ids=[rng.randrange(1000) for _ in range(num_prompt)],
                                response_ids=[rng.randrange(1000) for _ in range(num_response)],
                                loss_mask=[int(m) for m in mask], logprobs=[-rng.random() if m else 0.0 for m in mask],
                                num_tool_calls=0, num_tool_successes=0, finish_reason="eos", text=""))
    return trajs, [rng.uniform(-1, 1) for _ in range(num)]


def _reference(trajs: list[Trajectory], adv: list[float]) -> dict[str, list]:
    """Token by token, as the packing is defined (hidden state t predicts token t + 1)."""
    out = {k: [] for k in ("input_ids", "positions", "rows", "targets", "mask", "old_logprobs", "advantages",
                           "seq_ids")}
    cu = [0]
    for s, (t, a) in enumerate(zip(trajs, adv, strict=True)):
        start, num_prompt = cu[-1], len(t.prompt_ids)
        out["input_ids"] += t.prompt_ids + t.response_ids
        out["positions"] += list(range(num_prompt + len(t.response_ids)))
        out["rows"] += [start + num_prompt - 1 + j for j in range(len(t.response_ids))]
        out["targets"] += t.response_ids
        out["mask"] += [float(m) for m in t.loss_mask]
        out["old_logprobs"] += t.logprobs
        out["advantages"] += [a] * len(t.response_ids)
        out["seq_ids"] += [s] * len(t.response_ids)
        cu.append(start + num_prompt + len(t.response_ids))
    out["cu_seqlens"] = cu
    return out


@pytest.mark.parametrize("seed", range(3))
def test_micro_batches_match_a_per_token_construction(seed):
    trajs, adv = _trajectories(seed, 25)
    budget = 60
    lengths = [len(t.prompt_ids) + len(t.response_ids) for t in trajs]
    groups = first_fit_decreasing(lengths, budget)
    micro = pack(trajs, adv, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(trajs)))  # each trajectory exactly once
    assert len(micro) == len(groups)
    for mb, chosen in zip(micro, groups, strict=True):
        ref = _reference([trajs[i] for i in chosen], [adv[i] for i in chosen])
        for key, want in ref.items():
            got = getattr(mb, key).tolist()
            assert got == (pytest.approx(want) if key in ("old_logprobs", "advantages") else want), key
        assert mb.seq_lens == [lengths[i] for i in chosen] and mb.num_seqs == len(chosen)
        assert mb.num_tokens == sum(lengths[i] for i in chosen)
        assert mb.num_loss_tokens == int(sum(ref["mask"]))
        assert mb.num_tokens <= budget or len(chosen) == 1  # a longer trajectory goes alone


def test_first_fit_decreasing_fills_micro_batches():
    """Lengths 6, 5, 4, 3, 2 with budget 10: in-order greedy opens 3 micro-batches, FFD fills 2."""
    trajs = [Trajectory(prompt_ids=[1] * (n - 1), response_ids=[2], loss_mask=[1], logprobs=[0.0],
                        num_tool_calls=0, num_tool_successes=0, finish_reason="eos", text="") for n in (6, 5, 4, 3, 2)]
    micro = pack(trajs, [0.0] * 5, 10)
    assert sorted(mb.num_tokens for mb in micro) == [10, 10]
    assert torch.equal(micro[0].cu_seqlens, torch.tensor([0, 6, 10], dtype=torch.int32))  # 6 + 4, order kept
    with pytest.raises(ValueError, match="max_tokens"):
        pack(trajs, [0.0] * 5, 0)
