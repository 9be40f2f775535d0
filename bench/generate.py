"""Rollout throughput: our engine vs transformers' `generate`, side by side in one run.

    python bench/generate.py                          # CPU: SmolLM2-135M (the embedded default)
    python bench/generate.py --prompts 16 --n 1 --queue-prompts 0 --max-tokens 128
    python bench/generate.py --config qwen2-1.5b      # CUDA: random-weight Qwen2 in bf16
    python bench/generate.py --config qwen2-7b

Reports (1) generated tokens/s of both, same prompts and sampling settings, repetitions interleaved,
and their ratio, in two workloads: "batch", every sequence at once (prompts x n of them), and
"queue", an RL rollout of --queue-prompts x n sequences of which at most --concurrency run at once
(ours: max_num_seqs; transformers: consecutive batches of that many, each until its longest row
ends); (2) with tools on (the real sandbox), tool calls/s and tokens/s; (3) the fraction of
generated tokens the paper's reference rollout would have thrown away: it generates each round to
EOS / the length limit and cuts after the first closed python block, so every token sampled past
that fence is wasted (measured here by generating without stopping on the same prompts);
(4) on CUDA, decode-step time against the HBM roofline: (weight bytes + KV bytes read) / bandwidth.
Useful tokens only: tokens after a row's EOS (transformers pads finished rows) are not counted.
Each result is printed as soon as it is measured; --budget-s bounds the run: a phase that would
start past the budget is skipped and says so. The CUDA configs are random-weight models built on the
GPU (bench/models.py), with the transformers twin given the same tensors (no save and reload); the
tokenizer is the embedded default's when it is at hand, else bytes (token ids are all that matter).
The last line is one JSON object.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/generate.py` the script's folder comes first on sys.path, where bench/kernels.py
    # would shadow the `kernels` package: run again as the module bench.generate, repo root on the path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.generate", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": _path})

import argparse
import json
import statistics
import time

import torch

from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.engine.tools import find_closed_code

QUESTIONS = [
    "What is {a} * {b}? Use python to compute it.", "Compute the sum of the integers from {a} to {b} with python.",
    "Is {b}{a} a prime number? Check it with python code.", "What is the gcd of {a}{b} and {b}{a}? Write python.",
]
GPU_CONFIGS = {"qwen2-1.5b": "qwen2.5-1.5b", "qwen2-7b": "qwen2.5-7b"}  # random weights: bench/models.py
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


def say(*args) -> None:
    print(*args, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args) -> tuple:
    from bench.models import ByteTokenizer, model_config, random_model
    from cir.tokenizer import load_tokenizer

    if args.config == "smollm2":
        from cir.model import default_model_path, from_pretrained

        path = default_model_path()
        return from_pretrained(path), load_tokenizer(path)
    # a random-weight model: the embedded default's tokenizer only when it is already converted
    # (fetching it may wait on a network that GPU nodes do not have), else bytes: ids are all that matter
    from cir.model.gguf import MODEL_NAME, cache_dir

    tok_dir = cache_dir() / MODEL_NAME
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(tok_dir)
    else:
        say(f"# no converted tokenizer in {tok_dir}: byte tokenizer")
        tokenizer = ByteTokenizer()
    config = model_config(GPU_CONFIGS[args.config], eos_token_id=list(tokenizer.eos_token_ids))
    config.vocab_size = max(config.vocab_size, tokenizer.vocab_size)
    return random_model(config, torch.bfloat16, "cuda"), tokenizer


def prompts_for(tokenizer, count: int) -> list[list[int]]:
    out = []
    for i in range(count):
        text = QUESTIONS[i % len(QUESTIONS)].format(a=12 + 7 * i, b=31 + 3 * i)
        out.append(tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": text}])))
    return out


def useful_tokens(row: list[int], eos: set[int]) -> int:
    for i, t in enumerate(row):
        if t in eos:
            return i + 1
    return len(row)


def run_ours(engine, prompts, params, n, tools=None) -> tuple[float, int, list]:
    sync(engine.device)
    start = time.perf_counter()
    trajs = engine.generate(prompts, params, n=n, tools=tools)
    sync(engine.device)
    return time.perf_counter() - start, sum(len(t.response_ids) for t in trajs), trajs


def run_hf(ref, tokenizer, prompts, args, eos) -> tuple[float, int]:
    """transformers' generate over prompts x n sequences, `args.concurrency` rows per call."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sequences = [p for p in prompts for _ in range(args.n)]
    seconds = tokens = 0
    for first in range(0, len(sequences), args.concurrency):
        batch = sequences[first : first + args.concurrency]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=ref.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=ref.device)
        sync(ref.device)
        start = time.perf_counter()
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=attention, max_new_tokens=args.max_tokens, do_sample=True,
                               temperature=args.temperature, top_p=1.0, top_k=0, pad_token_id=pad,
                               eos_token_id=sorted(eos))
        sync(ref.device)
        seconds += time.perf_counter() - start
        tokens += sum(useful_tokens(r, eos) for r in out[:, width:].tolist())
    return seconds, tokens


def wasted_fraction(trajs, tokenizer) -> tuple[float, int]:
    """Tokens generated past the first closed python block (what the reference rollout discards)."""
    wasted = total = 0
    for traj in trajs:
        total += len(traj.response_ids)
        found = find_closed_code(traj.text)
        if found is None:
            continue
        kept_text = traj.text[: found[1]]
        kept = 0
        while kept < len(traj.response_ids) and len(tokenizer.decode(traj.response_ids[:kept])) < len(kept_text):
            kept += 1
        wasted += len(traj.response_ids) - kept
    return wasted / max(total, 1), wasted


def decode_roofline(engine, model, batch: int, context: int) -> dict:
    """One decode step of `batch` sequences at `context` tokens vs the bytes it must read."""
    params = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    prompts = [[1 + (i % 100)] * context for i in range(batch)]
    engine.generate(prompts, SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    t_long, _, _ = run_ours(engine, prompts, params, 1)
    t_short, _, _ = run_ours(engine, prompts, SamplingParams(temperature=1.0, max_tokens=1), 1)
    step_s = max(t_long - t_short, 1e-9) / 7  # the prefill cancels out
    mc = model.config
    param = next(model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = batch * context * mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * param.element_size()
    name = torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else "cpu"
    peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
    achieved = (weight_bytes + kv_bytes) / step_s
    return {"batch": batch, "context": context, "step_ms": step_s * 1e3, "GB_per_s": achieved / 1e9,
            "roofline_fraction": achieved / peak if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smollm2", choices=["smollm2", *GPU_CONFIGS])
    parser.add_argument("--prompts", type=int, default=8, help="prompts of the batch workload")
    parser.add_argument("--n", type=int, default=2, help="samples per prompt")
    parser.add_argument("--concurrency", type=int, default=16, help="most sequences running at once")
    parser.add_argument("--queue-prompts", type=int, default=32, help="prompts of the queue workload (0: skip)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-hf", action="store_true", help="ours only (no transformers installed)")
    parser.add_argument("--budget-s", type=float, default=300.0, help="phases that would start later are skipped")
    args = parser.parse_args()
    if args.prompts * args.n > args.concurrency:
        parser.error(f"the batch workload ({args.prompts} x {args.n}) must fit --concurrency {args.concurrency}")
    deadline = time.perf_counter() + args.budget_s

    def in_budget(what: str) -> bool:
        if time.perf_counter() < deadline:
            return True
        say(f"# budget of {args.budget_s:.0f}s spent: skipping {what}")
        return False

    torch.manual_seed(0)
    say(f"# building {args.config} ...")
    model, tokenizer = build(args)
    device = next(model.parameters()).device
    engine = Engine(model, tokenizer, EngineConfig(kv_cache_memory_gb=1.0, show_progress=False,
                                                   max_num_seqs=args.concurrency))
    prompts = prompts_for(tokenizer, max(args.prompts, args.queue_prompts))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    eos = set(tokenizer.eos_token_ids)
    ref = None
    if not args.skip_hf:
        if args.config == "smollm2":
            import transformers

            from cir.model import default_model_path
            ref = transformers.AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()
        else:
            from bench.models import hf_twin
            ref = hf_twin(model)

    # 1) ours vs transformers, per workload, repetitions interleaved
    say(f"# {args.config} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}: <= {args.max_tokens} "
        f"new tokens, temperature {args.temperature}, at most {args.concurrency} sequences at once")
    run_ours(engine, prompts[:1], SamplingParams(max_tokens=4), 1)
    workloads = [("batch", prompts[: args.prompts])]
    if args.queue_prompts:
        workloads.append(("queue", prompts[: args.queue_prompts]))
    results = {}
    batch_trajs = []
    say(f"{'workload':<10}{'sequences':>10}{'ours tok/s':>12}{'hf tok/s':>12}{'ratio':>8}")
    for name, workload in workloads:
        ours, hf = [], []
        for rep in range(args.repeats):
            if rep and not in_budget(f"{name} repetition {rep + 1}"):
                break
            seconds, tokens, trajs = run_ours(engine, workload, params, args.n)
            ours.append(tokens / seconds)
            if ref is not None and in_budget(f"transformers on {name}"):
                seconds, tokens = run_hf(ref, tokenizer, workload, args, eos)
                hf.append(tokens / seconds)
        r = results[name] = dict(sequences=len(workload) * args.n, ours=statistics.median(ours),
                                 transformers=statistics.median(hf) if hf else None, repeats=len(ours))
        r["ratio"] = r["ours"] / r["transformers"] if r["transformers"] else None
        hf_rate = f"{r['transformers']:.1f}" if r["transformers"] else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] else "-"
        say(f"{name:<10}{r['sequences']:>10}{r['ours']:>12.1f}{hf_rate:>12}{ratio:>8}")
        if name == "batch":
            batch_trajs = trajs
        if not in_budget("the remaining workloads"):
            break
    waste, num_wasted = wasted_fraction(batch_trajs, tokenizer)
    say(f"paper-style rollout would discard {waste:.1%} of generated tokens ({num_wasted})")

    # 2) with the sandbox in the loop
    tools_rate = calls_rate = None
    if in_budget("the tools run"):
        from cir_sandbox import Sandbox

        with Sandbox(workers=4, timeout=10.0) as box:
            seconds, tokens, tool_trajs = run_ours(engine, prompts[: args.prompts], params, args.n,
                                                   ToolConfig(box, max_calls=2))
        calls = sum(t.num_tool_calls for t in tool_trajs)
        tools_rate, calls_rate = tokens / seconds, calls / seconds
        say(f"batch + tools: {tools_rate:.1f} tokens/s; tool calls: {calls} in {seconds:.1f}s = {calls_rate:.1f}/s")

    # 3) decode roofline (CUDA): its own engine, room for the largest batch
    roofline = []
    if device.type == "cuda":
        engine.release()
        wide = Engine(model, tokenizer, EngineConfig(show_progress=False, max_num_seqs=128))
        for b in (1, 32, 128):
            if not in_budget(f"the decode roofline at batch {b}"):
                break
            r = decode_roofline(wide, model, b, 1024)
            roofline.append(r)
            say(f"decode b={r['batch']} ctx={r['context']}: {r['step_ms']:.2f} ms/step, {r['GB_per_s']:.0f} GB/s, "
                f"{(r['roofline_fraction'] or 0):.0%} of HBM roofline")
    print(json.dumps({
        "config": args.config, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
        "workloads": results, "tools_tokens_per_s": tools_rate, "tool_calls_per_s": calls_rate,
        "paper_rollout_waste_fraction": waste, "roofline": roofline,
    }), flush=True)


if __name__ == "__main__":
    main()
