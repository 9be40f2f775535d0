"""The engine's trajectories are bit-identical to the recorded ones (tests/engine_golden.py, which also
rewrites the record): tokens, loss masks, behaviour log-probs, finish reasons, tool counts and step
statistics, for fixed seeds across chunked prefill, preemption, prefix sharing, n > 1, tools, exact
mode, autocast and the padded CUDA-graph feed."""
import json

import engine_golden
import pytest

with open(engine_golden.PATH) as _f:
    GOLDEN = json.load(_f)


def test_the_record_covers_every_configuration():
    assert set(GOLDEN) == set(engine_golden.CASES)
    cases = GOLDEN.values()
    assert any(c["num_preemptions"] for c in cases) and any(c["num_prefix_cache_hit_tokens"] for c in cases)
    assert any(c["num_tool_calls"] for c in cases) and any(c["max_samples"] > 1 for c in cases)
    assert any(name.startswith(("exact", "random_exact")) for name in GOLDEN)


@pytest.mark.parametrize("name", list(engine_golden.CASES))
def test_trajectories_equal_the_record(name):
    assert engine_golden.run_case(name) == GOLDEN[name]
