"""The decode state (cir/engine/decode_state.py): steps that advance the running batch's arrays give
the same trajectories, log-probs and statistics as the general path, which rebuilds every step from
the sequences (the state then lives one step: built, used for the bookkeeping, written back)."""
import random

import pytest
from engine_utils import ByteTokenizer, tiny_model

from cir.engine import Engine, EngineConfig, SamplingParams
from cir.engine import scheduler as scheduler_module


def run_case(seed: int) -> tuple[list, dict]:
    rng = random.Random(seed)
    n = rng.randint(1, 3)
    config = EngineConfig(block_size=4, num_kv_blocks=rng.choice([24, 40, 200]), max_num_seqs=rng.choice([4, 16]),
                          max_num_batched_tokens=rng.choice([6, 16, 512]), enable_prefix_caching=rng.random() < 0.7,
                          show_progress=False, seed=seed)
    engine = Engine(tiny_model(seed=seed), ByteTokenizer(), config)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
    params = SamplingParams(temperature=1.0, max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.3)
    trajs = engine.generate(prompts, params, n=n)
    return [(t.response_ids, t.loss_mask, t.logprobs, t.finish_reason) for t in trajs], engine.stats


@pytest.mark.parametrize("seed", range(12))
def test_advanced_steps_equal_the_general_path(seed, monkeypatch):
    fast = run_case(seed)
    monkeypatch.setattr(scheduler_module.Scheduler, "_advance", lambda self, batch, budget: False)
    assert run_case(seed) == fast


def test_a_decoding_batch_is_advanced_without_a_walk(monkeypatch):
    advance, advanced = scheduler_module.Scheduler._advance, []

    def counted(self, batch, budget):
        advanced.append(advance(self, batch, budget))
        return advanced[-1]

    monkeypatch.setattr(scheduler_module.Scheduler, "_advance", counted)
    engine = Engine(tiny_model(seed=1), ByteTokenizer(), EngineConfig(block_size=4, show_progress=False))
    trajs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True), n=2)
    assert [len(t.response_ids) for t in trajs] == [20] * 4
    # prefill, the step the state is built in, then every step advances it (the last ends the batch)
    assert sum(advanced) == engine.stats["num_steps"] - 2
