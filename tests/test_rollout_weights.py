"""The persistent bf16 rollout copy of fp32 masters (cir/engine/rollout_weights.py), on CPU autocast.

Reference for "no cast": a TorchDispatchMode sees every aten op below autocast, so each weight cast
autocast makes is an `aten._to_copy` whose input is a master's storage. Reference for the values:
`master.to(bfloat16)`, and the engine without the copy (autocast casting the same fp32 values).
"""
import pytest
import torch
from engine_utils import tiny_model
from test_engine import make_engine, prompts_of
from torch.utils._python_dispatch import TorchDispatchMode

from cir.engine import SamplingParams
from cir.engine.rollout_weights import RolloutWeights


class WeightCasts(TorchDispatchMode):
    """Counts `_to_copy` calls whose input lives in one of `masters`' storage."""

    def __init__(self, masters):
        super().__init__()
        self.pointers = {m.data_ptr() for m in masters}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.pointers:
            self.count += 1
        return func(*args, **(kwargs or {}))


PARAMS = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)


def bf16_rollout(engine, prompts, casts=None):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if casts is None:
            return engine.generate(prompts, PARAMS, n=2)
        with casts:
            return engine.generate(prompts, PARAMS, n=2)


@pytest.mark.parametrize("copy", [True, False])
def test_no_weight_cast_in_a_decode_step(copy):
    model = tiny_model(seed=30)
    masters = [p for p in model.parameters() if p.dim() == 2]
    engine = make_engine(model, rollout_weight_copy=copy)
    casts = WeightCasts(masters)
    bf16_rollout(engine, prompts_of([5, 9], seed=31), casts)
    if copy:
        assert casts.count == 0, f"{casts.count} weight casts during the rollout"
        assert len(engine.rollout_weights) == len(masters) - 1  # every Linear; not the embedding
    else:  # the reference: autocast casts the weights (this check can fail)
        assert casts.count >= len(masters) - 1 and engine.rollout_weights is None
    assert all(p.dtype == torch.float32 for p in model.parameters())  # masters back in place


def test_same_tokens_and_logprobs_as_autocast_casting():
    model = tiny_model(seed=32)
    prompts = prompts_of([4, 11, 6], seed=33)
    with_copy = bf16_rollout(make_engine(model, seed=3), prompts)
    casting = bf16_rollout(make_engine(model, seed=3, rollout_weight_copy=False), prompts)
    assert [t.response_ids for t in with_copy] == [t.response_ids for t in casting]
    assert [t.logprobs for t in with_copy] == [t.logprobs for t in casting]  # bit for bit


def optimizer_step(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.tensor([prompts_of([7], seed=34)[0]])).logsumexp(-1).mean().backward()
    opt.step()


@pytest.mark.parametrize("explicit_refresh", [True, False])
def test_copy_follows_the_optimizer_step(explicit_refresh):
    model = tiny_model(seed=35)
    engine = make_engine(model, seed=4)
    prompts = prompts_of([6, 3], seed=36)
    before = bf16_rollout(engine, prompts)
    copies = list(engine.rollout_weights.copies)
    optimizer_step(model)
    if explicit_refresh:  # what the trainer does right after the step
        engine.refresh_rollout_weights()
        for master, copy in zip(engine.rollout_weights.masters, engine.rollout_weights.copies, strict=True):
            assert torch.equal(copy, master.detach().to(torch.bfloat16))
    # else: the masters' version counters moved, so the next rollout refreshes first
    after = bf16_rollout(engine, prompts)
    assert all(a is b for a, b in zip(engine.rollout_weights.copies, copies, strict=True))  # refreshed in place
    casting = make_engine(model, seed=4, rollout_weight_copy=False)
    bf16_rollout(casting, prompts)  # the same call seeds: its second call is compared
    fresh = bf16_rollout(casting, prompts)
    assert [t.response_ids for t in after] == [t.response_ids for t in fresh]
    assert [t.response_ids for t in after] != [t.response_ids for t in before]


def test_no_copy_without_autocast_or_for_bf16_parameters():
    model = tiny_model(seed=37)
    engine = make_engine(model)
    engine.generate(prompts_of([5]), PARAMS)  # fp32, no autocast
    assert engine.rollout_weights is None
    engine.refresh_rollout_weights()  # a no-op
    bf16 = tiny_model(seed=37).to(torch.bfloat16)
    engine = make_engine(bf16)
    bf16_rollout(engine, prompts_of([5]))
    assert engine.rollout_weights is None
    assert RolloutWeights.wanted(model, torch.device("cpu")) is None  # autocast off


def test_tied_embedding_is_not_copied():
    # the embedding lookup reads the tied matrix in fp32: swapping it would change the math
    model = tiny_model(seed=38, tie_word_embeddings=True)
    weights = RolloutWeights(model, torch.bfloat16)
    assert all(m is not model.embed_tokens.weight for m in weights.masters)
    assert len(weights) == sum(1 for p in model.parameters() if p.dim() == 2) - 1
    with pytest.raises(RuntimeError, match="during a rollout"), weights.swapped():
        weights.refresh()


def test_refresh_between_sharded_rollouts_defers_the_copy():
    # FSDP2 without a bf16 param_dtype: the trainer's refresh runs while the modules hold shards
    model = tiny_model(seed=39)
    engine = make_engine(model, seed=5)
    prompts = prompts_of([5], seed=40)
    bf16_rollout(engine, prompts)
    up = model.layers[0].mlp.up_proj
    full = up._parameters["weight"]
    up._parameters["weight"] = torch.nn.Parameter(full.detach()[:3].clone())  # "resharded"
    engine.refresh_rollout_weights()  # no copy from a shard, no error
    assert engine.rollout_weights.is_stale()
    with torch.no_grad():
        full.mul_(-1)  # the update that the shards carried
    up._parameters["weight"] = full  # "unsharded" again for the next rollout
    after = bf16_rollout(engine, prompts)
    weights = engine.rollout_weights
    copy = next(c for m, c in zip(weights.masters, weights.copies, strict=True) if m is full)
    assert torch.equal(copy, full.detach().to(torch.bfloat16))
    casting = make_engine(model, seed=5, rollout_weight_copy=False)
    bf16_rollout(casting, prompts)
    assert [t.response_ids for t in after] == [t.response_ids for t in bf16_rollout(casting, prompts)]
