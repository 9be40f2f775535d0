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
    assert trainer_golden.run_case(name) == GOLDEN[name]
