"""Learning signal of a rollout batch: how many groups carry a gradient, and why none did.

A group whose n rewards are all equal has advantage 0 under every estimator (advantages.py), so
a step where every group is like that teaches nothing. The trainer then skips the update (with
`rl.filter_groups`, the default) and warns with the likely cause, read off the rollout:

    counts = rollout_counts(trajs, rewards, num_skipped)  # this rank's; sum them over ranks
    cause = no_signal_cause(counts, max_response_tokens=256, tools_on=True, max_prompt_tokens=1024)

A step can also have no group at all: every prompt of it was skipped as too long. That is said as
such, never as "every response was correct" (which 0 correct of 0 responses would read as).
"""
from __future__ import annotations

import torch

from cir.rewards import extract_boxed
from cir.rl.advantages import groups_with_signal

COUNT_KEYS = ("groups", "groups_with_signal", "responses", "correct", "boxed", "tool_calls", "tool_outputs",
              "truncated", "prompts_skipped")


def rollout_counts(trajs: list, rewards: torch.Tensor, num_skipped: int = 0) -> dict[str, float]:
    """Counts over one rank's rollout (rewards [G, n], trajectories prompt-major; `num_skipped`: prompts
    of the step left out as too long); they add over ranks."""
    return {
        "groups": float(rewards.shape[0]),
        "groups_with_signal": float(groups_with_signal(rewards).sum()) if rewards.numel() else 0.0,
        "responses": float(len(trajs)),
        "correct": float((rewards > 0).sum()),
        "boxed": float(sum(extract_boxed(t.text) is not None for t in trajs)),
        "tool_calls": float(sum(t.num_tool_calls for t in trajs)),
        "tool_outputs": float(sum(t.num_tool_successes for t in trajs)),
        "truncated": float(sum(t.finish_reason == "length" for t in trajs)),
        "prompts_skipped": float(num_skipped),
    }


def no_signal_cause(counts: dict[str, float], max_response_tokens: int, tools_on: bool,
                    max_prompt_tokens: int | None = None) -> str:
    """The likeliest reason every group's rewards were equal, in words a user can act on."""
    if counts["groups"] == 0:
        skipped = int(counts.get("prompts_skipped", 0))
        if skipped:
            limit = f" = {max_prompt_tokens}" if max_prompt_tokens is not None else ""
            return (f"no prompt to train on: all {skipped} prompts of the step were skipped as longer than "
                    f"rollout.max_prompt_tokens{limit} (raise it, or shorten the problems)")
        return "no prompt to train on: the step had no prompts"
    n = max(counts["responses"], 1.0)
    if counts["correct"] == counts["responses"]:
        return "every response was correct (the problems are too easy to tell responses apart)"
    if counts["correct"] > 0:
        return ("each group was all right or all wrong (too few samples per prompt to differ: raise "
                "rollout.n)")
    causes = ["no response had a correct \\boxed{} answer"]
    if counts["truncated"] == counts["responses"]:
        causes.append(f"every response was cut at the response limit (rollout.max_response_tokens = "
                      f"{max_response_tokens}: too short)")
    elif counts["truncated"] / n >= 0.5:
        causes.append(f"{counts['truncated'] / n:.0%} of the responses were cut at rollout.max_response_tokens = "
                      f"{max_response_tokens}")
    if counts["boxed"] == 0:
        causes.append("none wrote a \\boxed{} answer at all")
    if tools_on and counts["tool_calls"] == 0:
        causes.append("no response called the interpreter (no tool output)")
    elif tools_on and counts["tool_outputs"] == 0:
        causes.append("no interpreter call ran cleanly (no tool output)")
    return "; ".join(causes) + ("" if len(causes) > 1 else
                                " (the model may be too weak for these problems: see train.warm_start)")
