"""Sync mode's trainer steps are bit-identical to the record kept by tests/trainer_golden.py (recorded
before partial rollouts existed): per-step metrics and final parameters, one and two mini-batches,
group filtering, the KL term, RLOO and tools on."""
import json

import pytest
import trainer_golden

with open(trainer_golden.PATH) as _f:
    GOLDEN = json.load(_f)


def test_the_record_covers_every_case():
    assert set(GOLDEN) == set(trainer_golden.CASES)


@pytest.mark.parametrize("name", list(trainer_golden.CASES))
def test_sync_steps_equal_the_record(name):
    got, want = trainer_golden.run_case(name), GOLDEN[name]
    assert len(got["metrics"]) == len(want["metrics"])
    for step, (row, recorded) in enumerate(zip(got["metrics"], want["metrics"], strict=True), 1):
        differ = {k: (row.get(k), v) for k, v in recorded.items() if row.get(k) != v}
        assert not differ, f"step {step}: metrics differ from the record (got, recorded): {differ}"
    assert got["weights_sha256"] == want["weights_sha256"], "final parameters differ from the record"
