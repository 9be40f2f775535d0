"""Evaluation core: n responses per problem on an engine, scored; avg@n, pass@k, tool statistics.

    from cir.eval import evaluate
    out = evaluate(engine, tokenizer, problems, n=16, params=SamplingParams(temperature=1.0, top_p=0.95,
                   max_tokens=16384), tools=ToolConfig(sandbox, max_calls=5), prompt_mode="raw")
    out["metrics"]["avg@16"], out["pass_at_k"], out["records"]

Three layers: `rollout_records` (generate + score, one record per problem), `summarize` (records ->
flat metrics and the pass@k curve), `evaluate` (both). The command line (`python -m cir.evaluate`)
and the trainer's held-out evaluation (`cir.rl.evaluation`) are built on these; this module knows
neither of them.
"""
from __future__ import annotations

import time
from collections import Counter

from cir.data.problems import Problem
from cir.data.prompts import build_prompt
from cir.engine import Engine, SamplingParams, ToolConfig
from cir.engine.progress import GenerationProgress
from cir.errors import UserError
from cir.eval_metrics import avg_at_n, pass_at_k_curve
from cir.rewards import extract_boxed, score_many


# 1) rollouts -> per-problem records ---------------------------------------------------------------
def _encode_prompts(engine: Engine, tokenizer, problems: list[Problem], prompt_mode: str,
                    max_prompt_tokens: int | None) -> tuple[list[list[int]], list[Problem]]:
    """Prompt ids of the problems that fit. Too long: skipped when `max_prompt_tokens` is given
    (the trainer's rule), else a UserError (a ValueError) naming the problem."""
    limit = engine.max_model_len - 1 if max_prompt_tokens is None else min(max_prompt_tokens, engine.max_model_len - 1)
    prompts, kept = [], []
    for p in problems:
        ids = tokenizer.encode(build_prompt(p, tokenizer, mode=prompt_mode))
        if len(ids) > limit:
            if max_prompt_tokens is None:
                raise UserError(f"problem {p.id}: prompt of {len(ids)} tokens leaves no room to answer "
                                f"(max_model_len {engine.max_model_len})",
                                hint="shorten or drop that problem, or use a model with a longer context")
            print(f"evaluate: skipping problem {p.id}: prompt of {len(ids)} tokens > {limit}", flush=True)
            continue
        prompts.append(ids)
        kept.append(p)
    return prompts, kept


def rollout_records(engine: Engine, tokenizer, problems: list[Problem], n: int, params: SamplingParams,
                    tools: ToolConfig | None = None, prompt_mode: str = "raw",
                    max_prompt_tokens: int | None = None, progress: GenerationProgress | None = None
                    ) -> tuple[list[dict], dict]:
    """Generate n responses per problem, score them; (one record per problem, timing metrics).
    `progress`: the generation's progress line (default: the engine's own, see Engine.generate)."""
    prompts, kept = _encode_prompts(engine, tokenizer, problems, prompt_mode, max_prompt_tokens)
    t0 = time.perf_counter()
    trajs = engine.generate(prompts, params, n=n, tools=tools, progress=progress) if prompts else []
    t1 = time.perf_counter()
    rewards = score_many([t.text for t in trajs], [p.answer for p in kept for _ in range(n)])
    t2 = time.perf_counter()
    records = []
    for i, p in enumerate(kept):
        group, group_rewards = trajs[i * n:(i + 1) * n], rewards[i * n:(i + 1) * n]
        records.append({
            "id": p.id, "problem": p.problem, "answer": p.answer,
            "num_correct": sum(r > 0 for r in group_rewards),
            "rewards": group_rewards,
            "predictions": [extract_boxed(t.text) for t in group],
            "num_tool_calls": [t.num_tool_calls for t in group],
            "num_tool_successes": [t.num_tool_successes for t in group],
            "num_response_tokens": [len(t.response_ids) for t in group],
            "finish_reasons": [t.finish_reason for t in group],
            "responses": [t.text for t in group],
        })
    num_tokens = sum(len(t.response_ids) for t in trajs)
    timing = {"time/generate": t1 - t0, "time/reward": t2 - t1,
              "time/sandbox_wait": engine.stats.get("seconds_waiting_on_tools", 0.0) if trajs else 0.0,
              "throughput/tokens_per_s": num_tokens / max(t1 - t0, 1e-9)}
    return records, timing


# 2) records -> metrics ---------------------------------------------------------------------------
def summarize(records: list[dict], n: int) -> dict:
    """{"metrics": flat scalars, "pass_at_k": [pass@1, ..., pass@n]} over per-problem records."""
    if not records:
        raise ValueError("no problems to summarize")
    counts = [r["num_correct"] for r in records]

    def flat(key: str) -> list:
        return [v for r in records for v in r[key]]

    calls, successes, lengths = flat("num_tool_calls"), flat("num_tool_successes"), flat("num_response_tokens")
    num_responses = len(calls)
    if num_responses != n * len(records):
        raise ValueError(f"expected {n} responses per problem, got {num_responses} for {len(records)} problems")
    curve = pass_at_k_curve(counts, n)
    metrics = {
        "num_problems": len(records), "n": n,
        f"avg@{n}": avg_at_n(counts, n), f"pass@{n}": curve[-1],
        "tools/calls_per_response": sum(calls) / num_responses,
        "tools/success_rate": sum(successes) / max(sum(calls), 1),
        "tools/responses_using_tool": sum(c > 0 for c in calls) / num_responses,
        "answer/boxed_rate": sum(p is not None for p in flat("predictions")) / num_responses,
        "response/length_mean": sum(lengths) / num_responses,
        **{f"finish/{reason}": count / num_responses
           for reason, count in sorted(Counter(flat("finish_reasons")).items())},
    }
    return {"metrics": metrics, "pass_at_k": curve}


def evaluate(engine: Engine, tokenizer, problems: list[Problem], n: int, params: SamplingParams,
             tools: ToolConfig | None = None, prompt_mode: str = "raw",
             progress: GenerationProgress | None = None) -> dict:
    """n responses per problem on `engine`: {"metrics", "pass_at_k", "records"} (see `summarize`)."""
    records, timing = rollout_records(engine, tokenizer, problems, n, params, tools, prompt_mode,
                                      progress=progress)
    summary = summarize(records, n)
    summary["metrics"].update(timing)
    summary["records"] = records
    return summary
