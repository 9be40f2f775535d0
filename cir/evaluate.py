"""Benchmark evaluation: avg@n, unbiased pass@k for k = 1..n, tool-call statistics, per-problem outputs.

    python -m cir.evaluate --model DIR --data AIME24.jsonl AIME25.jsonl amc23.jsonl --out runs/eval
    python -m cir.evaluate --model DIR --data MATH500.jsonl --greedy --out runs/eval-greedy
    python -m cir.evaluate --data arith.jsonl --n 4 --max-new-tokens 256 --limit 8   # embedded model

The defaults are the paper's evaluation (DESIGN.md): avg@16 sampled at temperature 1.0 and top-p
0.95, up to 16384 new tokens, up to 5 code rounds; MATH500 is run greedy (`--greedy`: n = 1,
temperature 0), so the paper's five numbers take the two commands above. Without --model the
embedded SmolLM2-135M-Instruct is used, prompted through its chat template; with --model the
prompt mode defaults to the paper's raw prompt for base models.

Per data file, in --out: `<name>.jsonl`, one line per problem (id, problem, answer, responses,
predicted boxed answers, rewards, tool calls and successes, response tokens, finish reasons); and
`summary.json` with every file's metrics and pass@k curve. A table is printed at the end.

The same code serves the trainer (`evaluate_problems(trainer, problems)`, every K steps on a
held-out set, at the rollout's sampling settings and the current tool budget) and a notebook
(`evaluate(engine, tokenizer, problems, n, params, tools, prompt_mode)`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import Counter
from pathlib import Path

import torch

from cir.data.problems import Problem, load_problems
from cir.data.prompts import build_prompt
from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.eval_metrics import avg_at_n, pass_at_k_curve
from cir.rewards import extract_boxed, score_many

TABLE_KS = (1, 2, 4, 8, 16, 32, 64)  # pass@k columns of the printed table (plus k = n)


# 1) rollouts -> per-problem records ---------------------------------------------------------------
def _encode_prompts(engine: Engine, tokenizer, problems: list[Problem], prompt_mode: str,
                    max_prompt_tokens: int | None) -> tuple[list[list[int]], list[Problem]]:
    """Prompt ids of the problems that fit. Too long: skipped when `max_prompt_tokens` is given
    (the trainer's rule), else a ValueError naming the problem."""
    limit = engine.max_model_len - 1 if max_prompt_tokens is None else min(max_prompt_tokens, engine.max_model_len - 1)
    prompts, kept = [], []
    for p in problems:
        ids = tokenizer.encode(build_prompt(p, tokenizer, mode=prompt_mode))
        if len(ids) > limit:
            if max_prompt_tokens is None:
                raise ValueError(f"problem {p.id}: prompt of {len(ids)} tokens leaves no room to answer "
                                 f"(max_model_len {engine.max_model_len})")
            print(f"evaluate: skipping problem {p.id}: prompt of {len(ids)} tokens > {limit}", flush=True)
            continue
        prompts.append(ids)
        kept.append(p)
    return prompts, kept


def rollout_records(engine: Engine, tokenizer, problems: list[Problem], n: int, params: SamplingParams,
                    tools: ToolConfig | None = None, prompt_mode: str = "raw",
                    max_prompt_tokens: int | None = None) -> tuple[list[dict], dict]:
    """Generate n responses per problem, score them; (one record per problem, timing metrics)."""
    prompts, kept = _encode_prompts(engine, tokenizer, problems, prompt_mode, max_prompt_tokens)
    t0 = time.perf_counter()
    trajs = engine.generate(prompts, params, n=n, tools=tools) if prompts else []
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
             tools: ToolConfig | None = None, prompt_mode: str = "raw") -> dict:
    """n responses per problem on `engine`: {"metrics", "pass_at_k", "records"} (see `summarize`)."""
    records, timing = rollout_records(engine, tokenizer, problems, n, params, tools, prompt_mode)
    summary = summarize(records, n)
    summary["metrics"].update(timing)
    summary["records"] = records
    return summary


def evaluate_problems(trainer, problems: list[Problem]) -> dict:
    """The trainer's held-out evaluation: each rank its slice of the problems, at the rollout's
    sampling settings and the current tool budget; metrics over all ranks (every rank returns them).

    The engine's sampling generator is restored afterwards, so evaluating never changes the
    training rollouts (a resumed run matches an uninterrupted one with or without evaluation).
    """
    from cir.rl import distributed

    cfg = trainer.config.rollout
    mine = problems[distributed.rank()::distributed.world_size()]
    max_calls = trainer.budget.at(trainer.step)
    tools = ToolConfig(trainer.sandbox, max_calls=max_calls, on_budget_spent=cfg.on_budget_spent) \
        if max_calls > 0 and trainer.sandbox is not None else None
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_response_tokens)
    generator = trainer.engine.runner.generator
    rng_state, was_training = generator.get_state(), trainer.model.training
    trainer.model.eval()
    try:
        with distributed.unsharded(trainer.policy), trainer._autocast():  # every rank: unshard is collective
            records, timing = rollout_records(trainer.engine, trainer.tokenizer, mine, cfg.n, params, tools,
                                              cfg.prompt_mode, max_prompt_tokens=cfg.max_prompt_tokens)
    finally:
        trainer.model.train(was_training)
        generator.set_state(rng_state)
    slim = [{k: v for k, v in r.items() if k not in ("problem", "responses")} for r in records]
    gathered = [r for part in distributed.all_gather_object(slim) for r in part]
    if not gathered:
        return {"num_problems": 0}
    metrics = summarize(gathered, cfg.n)["metrics"]
    metrics.update(timing)  # this rank's seconds
    return metrics


# 3) the command ----------------------------------------------------------------------------------
def format_table(results: dict[str, dict]) -> str:
    """One row per data file: accuracy, pass@k at powers of two (and n), tools, length, finish."""
    n = max(s["metrics"]["n"] for s in results.values())
    ks = sorted({k for k in TABLE_KS if k <= n} | {n})
    head = (f"{'data':<22}{'probs':>6}{'n':>4}{'avg@n':>8}" + "".join(f"{f'pass@{k}':>9}" for k in ks)
            + f"{'calls':>7}{'ok':>6}{'used':>6}{'boxed':>7}{'tokens':>8}{'length':>8}")
    lines = [head, "-" * len(head)]
    for name, s in results.items():
        m, curve = s["metrics"], s["pass_at_k"]
        accuracy = m[f"avg@{m['n']}"]
        passes = "".join(f"{100 * curve[k - 1]:>9.1f}" if k <= len(curve) else f"{'':>9}" for k in ks)
        lines.append(
            f"{name[:21]:<22}{m['num_problems']:>6}{m['n']:>4}{100 * accuracy:>8.1f}{passes}"
            f"{m['tools/calls_per_response']:>7.2f}{100 * m['tools/success_rate']:>6.0f}"
            f"{100 * m['tools/responses_using_tool']:>6.0f}{100 * m['answer/boxed_rate']:>7.0f}"
            f"{m['response/length_mean']:>8.0f}{100 * m.get('finish/length', 0.0):>8.1f}")
    if len(results) > 1:
        mean = sum(s["metrics"][f"avg@{s['metrics']['n']}"] for s in results.values()) / len(results)
        lines.append(f"{'average':<22}{'':>10}{100 * mean:>8.1f}")
    lines.append("percent except calls (tool calls per response) and tokens (mean response tokens); "
                 "ok: tool calls that ran cleanly; used: responses with a tool call; "
                 "length: responses cut at the token limit")
    return "\n".join(lines)


def _unique_names(paths: list[str]) -> list[str]:
    names = []
    for path in paths:
        name, i = Path(path).stem, 2
        while name in names:
            name, i = f"{Path(path).stem}-{i}", i + 1
        names.append(name)
    return names


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model directory (default: the embedded model)")
    parser.add_argument("--data", nargs="+", required=True, help="problem sets: .jsonl, .json or verl .parquet")
    parser.add_argument("--n", type=int, default=None, help="samples per problem (default 16; 1 with --greedy)")
    parser.add_argument("--greedy", action="store_true", help="one response per problem at temperature 0")
    parser.add_argument("--max-new-tokens", type=int, default=16384, help="response limit, tool output included")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tool-calls", type=int, default=5, help="code rounds per response (0: no tool)")
    parser.add_argument("--prompt-mode", choices=("raw", "chat"), default=None,
                        help="default: raw with --model (base models, the paper), chat for the embedded model")
    parser.add_argument("--out", default="runs/eval", help="directory for <name>.jsonl and summary.json")
    parser.add_argument("--limit", type=int, default=None, help="only the first K problems of each file")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                        help="CUDA: fraction of free memory given to the KV cache")
    parser.add_argument("--sandbox-workers", type=int, default=4)
    parser.add_argument("--sandbox-timeout", type=float, default=10.0, help="seconds per code block")
    args = parser.parse_args(argv)
    if args.greedy:
        if args.n not in (None, 1):
            parser.error(f"--greedy draws one response per problem; got --n {args.n}")
        args.n, args.temperature, args.top_p = 1, 0.0, 1.0
    args.n = 16 if args.n is None else args.n
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.max_tool_calls < 0:
        parser.error(f"--max-tool-calls must be >= 0, got {args.max_tool_calls}")
    if args.prompt_mode is None:
        args.prompt_mode = "raw" if args.model else "chat"
    return args


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    data = {name: load_problems(path)[: args.limit] for name, path in zip(_unique_names(args.data), args.data)}
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    with contextlib.ExitStack() as stack:
        # 1) the sandbox server first: a small process forked before the model takes memory
        tools = None
        if args.max_tool_calls > 0:
            from sandbox import Sandbox

            sandbox = stack.enter_context(Sandbox(workers=args.sandbox_workers, timeout=args.sandbox_timeout))
            tools = ToolConfig(sandbox, max_calls=args.max_tool_calls)
        # 2) model, tokenizer, engine
        from cir.model import default_model_path, from_pretrained
        from cir.tokenizer import load_tokenizer

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        model_path = args.model or default_model_path()
        tokenizer = load_tokenizer(model_path)
        model = from_pretrained(model_path, dtype=dtype, device=device).eval()
        engine = Engine(model, tokenizer,
                        EngineConfig(seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization))
        # 3) one data file at a time
        for name, problems in data.items():
            print(f"{name}: {len(problems)} problems x {args.n} ({args.prompt_mode} prompt, temperature "
                  f"{args.temperature}, top-p {args.top_p}, {args.max_tool_calls} code rounds)", flush=True)
            summary = evaluate(engine, tokenizer, problems, args.n, params, tools, args.prompt_mode)
            with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for record in summary.pop("records"):
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            results[name] = summary
            m = summary["metrics"]
            print(f"{name}: avg@{args.n} {100 * m[f'avg@{args.n}']:.1f} ({m['time/generate']:.0f}s generating, "
                  f"{m['throughput/tokens_per_s']:.0f} tokens/s)", flush=True)
    settings = {k: v for k, v in vars(args).items() if k != "data"}
    settings.update(model=model_path, data=dict(zip(data, args.data)))
    (out / "summary.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(format_table(results))
    print(f"per-problem outputs and summary.json in {out}")


if __name__ == "__main__":
    main()
