"""The tool-call budget schedule: how many interpreter calls a response may make at each step.

The paper raises the budget during training: 2 calls from step 0, 3 from step 100, 4 from step 200.

    budget = ToolBudget({0: 2, 100: 3, 200: 4})     # YAML keys may be strings: {"0": 2, "100": 3}
    budget.at(150)                                  # -> 3
    ToolBudget.parse(4).at(10**6)                   # a constant budget -> 4
"""
from bisect import bisect_right
from collections.abc import Mapping
from typing import Any


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"tool budget {what} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"tool budget {what} must be an integer, got {value!r}")


class ToolBudget:
    """Step -> maximum number of tool calls per response, piecewise constant from each start step."""

    def __init__(self, schedule: Mapping[int | str, int]) -> None:
        if not isinstance(schedule, Mapping) or not schedule:
            raise ValueError(f"tool budget schedule must be a non-empty mapping step -> calls, got {schedule!r}")
        pairs: dict[int, int] = {}
        for key, value in schedule.items():
            step, calls = _as_int(key, "step"), _as_int(value, f"at step {key!r}")
            if step < 0:
                raise ValueError(f"tool budget steps must be >= 0, got {key!r}")
            if calls < 0:
                raise ValueError(f"tool budget at step {key!r} must be >= 0 calls, got {value!r}")
            if step in pairs:
                raise ValueError(f"tool budget step {step} given twice")
            pairs[step] = calls
        if 0 not in pairs:
            raise ValueError(f"tool budget schedule must start at step 0, got steps {sorted(pairs)}")
        self._steps = sorted(pairs)
        self._calls = [pairs[s] for s in self._steps]

    @classmethod
    def parse(cls, value: "ToolBudget | Mapping[int | str, int] | int | str") -> "ToolBudget":
        """From a config value: a mapping, or one integer for a constant budget."""
        if isinstance(value, ToolBudget):
            return value
        if isinstance(value, Mapping):
            return cls(value)
        return cls({0: _as_int(value, "calls")})

    def at(self, step: int) -> int:
        """The budget in force at training step `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self._calls[bisect_right(self._steps, step) - 1]

    @property
    def max_calls(self) -> int:
        return max(self._calls)

    def to_dict(self) -> dict[int, int]:
        return dict(zip(self._steps, self._calls, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ToolBudget) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"ToolBudget({self.to_dict()})"
