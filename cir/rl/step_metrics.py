"""A training step's metrics row (metrics.jsonl): rewards, tool use, lengths, the update's statistics,
timing and throughput, summed over ranks; the `signal/*` counts with the no-signal warning
(cir/rl/signal.py says why); and the held-out before -> after line printed at the end of a run.

    metrics = step_metrics(trajs, rewards, stats, timing, rollout_s, train_s, tool_budget=..., ...)
    metrics.update(signal_metrics(trajs, rewards, stats, step, rollout_config, ...))
"""
from __future__ import annotations

import torch

from cir.rl import distributed
from cir.rl.signal import COUNT_KEYS, no_signal_cause, rollout_counts


def step_metrics(trajs: list, rewards: torch.Tensor, stats: dict, timing: dict, rollout_s: float, train_s: float,
                 *, tool_budget: int, infra_failures: int, device: torch.device) -> dict:
    """The step's row, every count summed over ranks; `tool_budget`: the step's tool-call limit,
    `infra_failures`: calls the sandbox failed on this rank (0 when healthy)."""
    n_resp = len(trajs)
    local = [
        n_resp, float(rewards.sum()), float((rewards > 0).sum()),
        sum(t.num_tool_calls for t in trajs), sum(t.num_tool_successes for t in trajs),
        sum(len(t.response_ids) for t in trajs), sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs),
        sum(t.num_tool_calls > 0 for t in trajs),
        infra_failures,
    ]
    (n, r_sum, correct, calls, ok, resp_len, all_tokens, using, infra) = distributed.all_reduce_sum(local, device)
    n = max(n, 1.0)
    return {
        "reward/mean": r_sum / n, "accuracy": correct / n,
        "tools/calls_per_response": calls / n, "tools/success_rate": ok / max(calls, 1.0),
        "tools/infra_failures": infra,
        "tools/responses_using_tool": using / n, "tools/budget": tool_budget,
        "response/length_mean": resp_len / n,
        **{f"train/{k}": v for k, v in stats.items()},
        "time/rollout": rollout_s, "time/train": train_s, **timing,
        "throughput/rollout_tokens_per_s": resp_len / max(timing["time/generate"], 1e-9),
        "throughput/train_tokens_per_s": all_tokens / max(train_s, 1e-9),
    }


def signal_metrics(trajs: list, rewards: torch.Tensor, stats: dict, step: int, rollout_config, *, num_skipped: int,
                   tools_on: bool, device: torch.device) -> dict:
    """`signal/*` metrics; a warning with the likely cause when no group's rewards differ."""
    local = rollout_counts(trajs, rewards, num_skipped)
    counts = dict(zip(COUNT_KEYS, distributed.all_reduce_sum([local[k] for k in COUNT_KEYS], device), strict=True))
    if counts["groups_with_signal"] == 0:
        cfg = rollout_config
        cause = no_signal_cause(counts, cfg.max_response_tokens, tools_on=tools_on,
                                max_prompt_tokens=cfg.max_prompt_tokens)
        action = "update skipped" if stats.get("skipped") else "zero-advantage update (rl.filter_groups off)"
        which = f"all {int(counts['groups'])} groups have equal rewards" if counts["groups"] else "no groups"
        distributed.print0(f"warning: step {step}: no learning signal, {which}: {cause}; {action}")
    return {"signal/groups_with_signal": counts["groups_with_signal"], "signal/groups": counts["groups"],
            "signal/prompts_skipped": counts["prompts_skipped"]}


def held_out_change(before: dict, after: dict, num_problems: int, n: int) -> str:
    acc, tool = f"avg@{n}", "tools/responses_using_tool"
    return (f"held-out ({num_problems} problems x {n}): accuracy {before[acc]:.3f} -> {after[acc]:.3f}, "
            f"responses using the interpreter {before[tool]:.3f} -> {after[tool]:.3f}")
