"""The tool-call budget schedule: lookups, YAML-style keys, validation."""
import pytest

from cir.rl import ToolBudget


def test_paper_schedule():
    budget = ToolBudget({0: 2, 100: 3, 200: 4})
    assert [budget.at(s) for s in (0, 1, 99, 100, 150, 199, 200, 10_000)] == [2, 2, 2, 3, 3, 3, 4, 4]
    assert budget.max_calls == 4


def test_yaml_string_keys_and_unsorted_order():
    budget = ToolBudget({"200": 4, "0": "2", "100": 3})
    assert budget == ToolBudget({0: 2, 100: 3, 200: 4})
    assert budget.to_dict() == {0: 2, 100: 3, 200: 4}


def test_parse_constant_and_mapping():
    assert ToolBudget.parse(5).at(123) == 5
    assert ToolBudget.parse("0").at(0) == 0
    assert ToolBudget.parse({0: 1, 10: 2}).at(10) == 2
    budget = ToolBudget({0: 1})
    assert ToolBudget.parse(budget) is budget
    assert repr(budget) == "ToolBudget({0: 1})"


@pytest.mark.parametrize("schedule, message", [
    ({}, "non-empty mapping"),
    ([2, 3], "non-empty mapping"),
    ({10: 2}, "must start at step 0"),
    ({0: 2, -5: 3}, "steps must be >= 0"),
    ({0: -1}, "must be >= 0 calls"),
    ({0: 2, "ten": 3}, "'ten'"),
    ({0: 2.5}, "2.5"),
    ({0: True}, "True"),
    ({0: 2, "0": 3}, "given twice"),
])
def test_validation_errors(schedule, message):
    with pytest.raises(ValueError, match=message):
        ToolBudget(schedule)


def test_negative_step_lookup():
    with pytest.raises(ValueError, match="-1"):
        ToolBudget({0: 2}).at(-1)
