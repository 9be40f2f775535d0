"""Benchmark evaluation: avg@n, unbiased pass@k for k = 1..n, tool-call statistics, per-problem outputs.

    python -m cir.evaluate --model DIR --data AIME24.jsonl AIME25.jsonl amc23.jsonl --out runs/eval
    python -m cir.evaluate --model DIR --data MATH500.jsonl --greedy --out runs/eval-greedy
    python -m cir.evaluate --model runs/default/checkpoints/step_000010/model --data runs/default/held_out.jsonl
    python -m cir.evaluate --data arith.jsonl --n 4 --max-new-tokens 256 --limit 8   # embedded model

A checkpoint the trainer wrote is evaluated the way it was trained: prompt mode (raw, plain or
chat), n, temperature, top-p, response limit and code rounds come from the `cir.json` beside its
config.json, or from the run's config.yaml above it (cir/trained_settings.py); a flag given on the
command line wins. Any other model gets the paper's evaluation (DESIGN.md): avg@16 sampled at
temperature 1.0 and top-p 0.95, up to 16384 new tokens, up to 5 code rounds, the raw prompt for base
models; MATH500 is run greedy (`--greedy`: n = 1, temperature 0), so the paper's five numbers take the
first two commands above. Without --model the embedded SmolLM2-135M-Instruct is used, prompted through
its chat template. The first lines printed say which settings were used and where each came from.
Generation shows its progress on stderr (sequences, tokens, tokens/s, time left).

Per data file, in --out: `<name>.jsonl`, one line per problem (id, problem, answer, responses,
predicted boxed answers, rewards, tool calls and successes, response tokens, finish reasons); and
`summary.json` with every file's metrics and pass@k curve. A table is printed at the end.

The evaluation core lives in `cir.eval` (`evaluate(engine, tokenizer, problems, n, params, tools,
prompt_mode)`, for a notebook too); the trainer's held-out evaluation in `cir.rl.evaluation`
(`evaluate_problems(trainer, problems)`). This module is the command line around them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from cir.data.problems import load_problems
from cir.data.prompts import MODES
from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.engine.progress import GenerationProgress
from cir.errors import ArgumentParser, run_main
from cir.eval import evaluate, rollout_records, summarize  # noqa: F401  (the evaluation core, re-exported)
from cir.rl.evaluation import evaluate_problems  # noqa: F401  (the trainer's, re-exported)
from cir.threads import configure_threads
from cir.trained_settings import find_trained_settings

TABLE_KS = (1, 2, 4, 8, 16, 32, 64)  # pass@k columns of the printed table (plus k = n)


# the command --------------------------------------------------------------------------------------
def format_table(results: dict[str, dict]) -> str:
    """One row per data file: accuracy, pass@k at powers of two (and n), tools, length, finish."""
    n = max(s["metrics"]["n"] for s in results.values())

    def ok(m: dict) -> str:  # not applicable where no tool was called
        return f"{100 * m['tools/success_rate']:>6.0f}" if m["tools/calls_per_response"] else f"{'n/a':>6}"

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
            f"{m['tools/calls_per_response']:>7.2f}{ok(m)}"
            f"{100 * m['tools/responses_using_tool']:>6.0f}{100 * m['answer/boxed_rate']:>7.0f}"
            f"{m['response/length_mean']:>8.0f}{100 * m.get('finish/length', 0.0):>8.1f}")
    if len(results) > 1:
        mean = sum(s["metrics"][f"avg@{s['metrics']['n']}"] for s in results.values()) / len(results)
        lines.append(f"{'average':<22}{'':>10}{100 * mean:>8.1f}")
    lines.append("percent except calls (tool calls per response) and tokens (mean response tokens); "
                 "ok: tool calls that ran cleanly (n/a: none made); used: responses with a tool call; "
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


PAPER = {"n": 16, "temperature": 1.0, "top_p": 0.95, "max_new_tokens": 16384, "max_tool_calls": 5,
         "on_budget_spent": "continue", "sandbox_timeout": 10.0}  # the paper's evaluation (DESIGN.md)
TRAINED = {"prompt_mode": "prompt_mode", "n": "n", "temperature": "temperature", "top_p": "top_p",
           "max_new_tokens": "max_response_tokens", "max_tool_calls": "max_tool_calls",
           "on_budget_spent": "on_budget_spent", "sandbox_timeout": "sandbox_timeout"}  # flag -> cir.json key


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m cir.evaluate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model directory (default: the embedded model)")
    parser.add_argument("--data", nargs="+", required=True, help="problem sets: .jsonl, .json or verl .parquet")
    parser.add_argument("--n", type=int, default=None,
                        help="samples per problem (default: as trained, else 16; 1 with --greedy)")
    parser.add_argument("--greedy", action="store_true", help="one response per problem at temperature 0")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="response limit, tool output included (default: as trained, else 16384)")
    parser.add_argument("--temperature", type=float, default=None, help="default: as trained, else 1.0")
    parser.add_argument("--top-p", type=float, default=None, help="default: as trained, else 0.95")
    parser.add_argument("--max-tool-calls", type=int, default=None,
                        help="code rounds per response, 0: no tool (default: as trained, else 5)")
    parser.add_argument("--prompt-mode", choices=MODES, default=None,
                        help="default: as the checkpoint was trained; else raw with --model (base models, "
                             "the paper), chat for the embedded model")
    parser.add_argument("--out", default="runs/eval", help="directory for <name>.jsonl and summary.json")
    parser.add_argument("--limit", type=int, default=None, help="only the first K problems of each file")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                        help="CUDA: fraction of free memory given to the KV cache")
    parser.add_argument("--sandbox-workers", type=int, default=4)
    parser.add_argument("--sandbox-timeout", type=float, default=None,
                        help="seconds per code block (default: as trained, else 10)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: the usable CPUs less the sandbox workers; cir/threads.py)")
    args = parser.parse_args(argv)
    _resolve_settings(args, parser)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be >= 1, got {args.limit}")
    if args.max_tool_calls < 0:
        parser.error(f"--max-tool-calls must be >= 0, got {args.max_tool_calls}")
    if args.sandbox_workers < 1 or args.sandbox_timeout <= 0:
        parser.error("--sandbox-workers must be >= 1 and --sandbox-timeout > 0, got "
                     f"{args.sandbox_workers} and {args.sandbox_timeout}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; it names the directory for the results")
    if not 0 < args.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    try:  # temperature, top-p, max-new-tokens: checked where they are defined
        SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens)
    except ValueError as e:
        parser.error(f"{e} (from --temperature, --top-p, --max-new-tokens)")
    return args


def _resolve_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill each setting not given on the command line: from the checkpoint's training settings
    (--model), else the paper's defaults; `args.sources` says where each came from."""
    if args.greedy:
        if args.n not in (None, 1):
            parser.error(f"--greedy draws one response per problem; got --n {args.n}")
        args.n, args.temperature, args.top_p = 1, 0.0, 1.0
    given = {k for k in TRAINED if getattr(args, k, None) is not None}
    trained, where = find_trained_settings(args.model) if args.model else (None, None)
    args.on_budget_spent = None
    args.sources = {k: "--greedy" if args.greedy and k in ("n", "temperature", "top_p")
                    else f"--{k.replace('_', '-')}" for k in given}
    for key, field in TRAINED.items():
        if key in given:
            continue
        if trained is not None and trained.get(field) is not None:
            setattr(args, key, trained[field])
            args.sources[key] = where
        elif key == "prompt_mode":
            args.prompt_mode = "raw" if args.model else "chat"
            args.sources[key] = "default for --model (base models, the paper)" if args.model \
                else "default for the embedded instruct model"
        else:
            setattr(args, key, PAPER[key])
            args.sources[key] = "default (the paper)"


def describe_settings(args: argparse.Namespace) -> str:
    """The settings used, grouped by where they came from (the first lines the command prints)."""
    by_source: dict[str, list[str]] = {}
    for key in TRAINED:
        by_source.setdefault(args.sources[key], []).append(f"{key.replace('_', '-')} {getattr(args, key)}")
    return "\n".join(f"settings: {', '.join(values)} (from {source})" for source, values in by_source.items())


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    data = {name: load_problems(path)[: args.limit]
            for name, path in zip(_unique_names(args.data), args.data, strict=True)}
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(describe_settings(args), flush=True)
    results = {}
    with contextlib.ExitStack() as stack:
        # 1) the sandbox server first: a small process forked before the model takes memory
        tools = None
        if args.max_tool_calls > 0:
            from cir_sandbox import Sandbox

            sandbox = stack.enter_context(Sandbox(workers=args.sandbox_workers, timeout=args.sandbox_timeout))
            tools = ToolConfig(sandbox, max_calls=args.max_tool_calls, on_budget_spent=args.on_budget_spent)
        configure_threads(args.threads, reserved=args.sandbox_workers if tools is not None else 0, log=print)
        # 2) model, tokenizer, engine
        from cir.model import default_model_path, from_pretrained
        from cir.tokenizer import load_tokenizer

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
                 "float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
        model_path = args.model or default_model_path()
        print(f"loading {model_path}", flush=True)
        tokenizer = load_tokenizer(model_path)
        model = from_pretrained(model_path, dtype=dtype, device=device).eval()
        engine = Engine(model, tokenizer,
                        EngineConfig(seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization))
        # 3) one data file at a time
        for name, problems in data.items():
            print(f"{name}: {len(problems)} problems x {args.n} ({args.prompt_mode} prompt, temperature "
                  f"{args.temperature}, top-p {args.top_p}, {args.max_tool_calls} code rounds)", flush=True)
            summary = evaluate(engine, tokenizer, problems, args.n, params, tools, args.prompt_mode,
                               progress=GenerationProgress(name))
            with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for record in summary.pop("records"):
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
            results[name] = summary
            m = summary["metrics"]
            print(f"{name}: avg@{args.n} {100 * m[f'avg@{args.n}']:.1f} ({m['time/generate']:.0f}s generating, "
                  f"{m['throughput/tokens_per_s']:.0f} tokens/s)", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("data", "sources")}
    settings.update(model=model_path, data=dict(zip(data, args.data, strict=True)), settings_from=args.sources)
    (out / "summary.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    print(format_table(results))
    print(describe_settings(args))
    print(f"per-problem outputs and summary.json in {out}")


if __name__ == "__main__":
    run_main(main)
