"""The long tail of a rollout: sync steps (decode every sample to the end) vs partial rollouts (a stream).

    python bench/rollout_tail.py                 # 256 sequences, lognormal lengths (median 1200, sigma 0.83, cap 4096)
    python bench/rollout_tail.py --smoke         # tiny shapes, < 60 s on CPU (CI: tests/test_bench_rollout_tail.py)
    python bench/rollout_tail.py --median 800 --sigma 1.0 --cap 8192 --steps 6

K RL steps of `--groups` prompt groups x `--n` samples per step (the paper's per-rank share: 16 x 16),
`--max-num-seqs` sequences running, with a scripted-length model on the real engine (scheduler,
paged KV, sampler, tool pauses): at each response position it stops (EOS) with the hazard of the length
distribution, so response lengths are drawn from it (lognormal, capped at `--cap` by the length limit);
at response position `--tool-at` every sequence writes a python block, which an instant executor
answers (the interpreter feedback enters the sequence as in a real rollout). The weights do not change,
so only the scheduling differs between the modes: in sync mode each step is one `Engine.generate` of
its groups; in partial mode each step is `Engine.generate_stream` for its groups, policy version = step
(`rollout.max_staleness` restarts applied as in training).

Figures per mode, over the steps after `--warmup` (partial mode starts from an empty stream):
decode steps per trained group, occupancy (sampled tokens / (decode steps x max_num_seqs): the mean
running batch over max_num_seqs), tokens per decode step, restarts, and a modelled GPU time per trained
group for the Qwen2.5-7B shape on an H100: each model step reads the bf16 weights once and the KV of
every running sequence's context ((weights + KV bytes) / 3.35 TB/s), plus the prefill and recompute
tokens at 2 x params FLOPs each / 989 TFLOP/s. A table, one JSON line per mode, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import Future

import numpy as np
import torch

from cir.engine import Engine, EngineConfig, SamplingParams, ToolConfig
from cir.engine.stream import RolloutStream
from cir_sandbox import Result

# Qwen2.5-7B: 7.62e9 parameters in bf16; 28 layers x 4 KV heads x 128 dims x (K, V) x 2 bytes per token
QWEN7B_PARAMS = 7.62e9
QWEN7B_KV_BYTES_PER_TOKEN = 28 * 4 * 128 * 2 * 2
H100_HBM_BYTES_PER_S = 3.35e12
H100_BF16_FLOPS = 989e12
EOS, FILLER = 256, ord("x")
BLOCK = list(b"```python\nprint(1)\n```")


class _Config:
    num_hidden_layers = 1
    num_key_value_heads = 1
    head_dim = 8

    def __init__(self, max_len: int):
        self.max_position_embeddings = max_len
        self.vocab_size = 257


class LengthModel(torch.nn.Module):
    """Stops each response with the hazard of a length distribution; writes a python block at response
    position `tool_at`. Counts what a real model's steps would read (KV tokens) and compute (prefill)."""

    def __init__(self, hazard: np.ndarray, prompt_len: int, tool_at: int, max_len: int):
        super().__init__()
        self.config = _Config(max_len)
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        logits = np.full((len(hazard) + 1, 257), -1e4, dtype=np.float32)
        with np.errstate(divide="ignore"):
            logits[:-1, EOS] = np.maximum(np.log(hazard), -1e4)
            logits[:-1, FILLER] = np.maximum(np.log1p(-np.minimum(hazard, 1 - 1e-12)), -1e4)
        logits[-1, EOS] = 0.0
        for i, token in enumerate(BLOCK):
            logits[tool_at + i] = -1e4
            logits[tool_at + i, token] = 0.0
        self.logits = torch.from_numpy(logits)  # (cap + 1, V): by the response index of the next token
        self.prompt_len = prompt_len
        self.num_model_steps = self.kv_tokens_read = self.prefill_tokens = 0

    def forward_hidden(self, input_ids, positions, ctx):
        q = ctx.cu_seqlens_q[1:] - ctx.cu_seqlens_q[:-1]
        self.num_model_steps += 1
        self.kv_tokens_read += int(ctx.seq_lens.sum())
        self.prefill_tokens += int(q[q > 1].sum())
        return positions.float().unsqueeze(1)  # (T, 1)

    def compute_logits(self, hidden):
        index = (hidden[:, 0].long() + 1 - self.prompt_len).clamp(0, len(self.logits) - 1)
        return self.logits[index]


class InstantExecutor:
    def submit(self, code: str) -> Future:
        future = Future()
        future.set_result(Result(status="ok", stdout="1"))
        return future


class ByteTokenizer:
    eos_token_id, eos_token_ids, vocab_size = EOS, [EOS], 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def lognormal_hazard(median: float, sigma: float, cap: int) -> np.ndarray:
    """h[r] = P(the response ends with token r | it reached r): lengths lognormal(median, sigma), >= 1."""
    r = np.arange(1, cap + 2, dtype=np.float64)
    survival = 0.5 * np.array([math.erfc((math.log(x) - math.log(median)) / (sigma * math.sqrt(2))) for x in r])
    return np.clip(1 - survival[1:] / np.maximum(survival[:-1], 1e-300), 0.0, 1.0)


def run_mode(mode: str, args, hazard: np.ndarray) -> dict:
    prompt_len, feedback_margin = 16, 64
    max_len = prompt_len + args.cap + feedback_margin
    model = LengthModel(hazard, prompt_len, args.tool_at, max_len)
    blocks_per_seq = -(-max_len // 16)
    engine = Engine(model, ByteTokenizer(), EngineConfig(
        block_size=16, num_kv_blocks=(args.max_num_seqs + args.n) * blocks_per_seq + 64,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        show_progress=False, seed=args.seed))
    params = SamplingParams(temperature=1.0, max_tokens=args.cap)
    tools = ToolConfig(InstantExecutor(), max_calls=1)
    g = torch.Generator().manual_seed(args.seed)

    def prompt(key: int) -> list[int]:
        return torch.randint(97, 123, (prompt_len,), generator=g).tolist()

    source = ((prompt(k), k) for k in range(10**9))
    stream = RolloutStream(source, params, n=args.n, max_staleness=args.max_staleness)
    rows, totals = [], dict(groups=0, decode_steps=0, tokens=0, kv=0, prefill=0, restarted=0, seconds=0.0)
    for step in range(args.steps):
        before = (model.num_model_steps, model.kv_tokens_read, model.prefill_tokens)
        t0 = time.perf_counter()
        if mode == "sync":
            trajs = engine.generate([prompt(0) for _ in range(args.groups)], params, n=args.n, tools=tools,
                                    prompt_keys=list(range(step * args.groups, (step + 1) * args.groups)))
            groups, restarted = args.groups, 0
        else:
            done = engine.generate_stream(stream, args.groups, tools=tools, version=step)
            trajs, groups, restarted = [t for g in done for t in g], len(done), stream.stats["num_restarted"]
        seconds = time.perf_counter() - t0
        steps = model.num_model_steps - before[0]
        tokens = engine.stats["num_generated_tokens"]
        row = dict(step=step, groups=groups, decode_steps=steps, tokens=tokens, kv=model.kv_tokens_read - before[1],
                   prefill=model.prefill_tokens - before[2], restarted=restarted, seconds=seconds,
                   mean_len=float(np.mean([len(t.response_ids) for t in trajs])) if trajs else 0.0)
        rows.append(row)
        if step >= args.warmup:
            for k in totals:
                totals[k] += row[k]
    weights_s = totals["decode_steps"] * 2 * QWEN7B_PARAMS / H100_HBM_BYTES_PER_S
    kv_s = totals["kv"] * QWEN7B_KV_BYTES_PER_TOKEN / H100_HBM_BYTES_PER_S
    prefill_s = totals["prefill"] * 2 * QWEN7B_PARAMS / H100_BF16_FLOPS
    groups = max(totals["groups"], 1)
    return {
        "mode": mode, "steps_counted": args.steps - args.warmup, "groups_trained": totals["groups"],
        "decode_steps_per_group": totals["decode_steps"] / groups,
        "occupancy": totals["tokens"] / max(totals["decode_steps"] * args.max_num_seqs, 1),
        "tokens_per_decode_step": totals["tokens"] / max(totals["decode_steps"], 1),
        "restarted": totals["restarted"],
        "modelled_gpu_s_per_group": (weights_s + kv_s + prefill_s) / groups,
        "modelled_split_s": {"weights": round(weights_s, 3), "kv": round(kv_s, 3), "prefill": round(prefill_s, 3)},
        "cpu_seconds": round(totals["seconds"], 2), "per_step": rows,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, < 60 s on CPU")
    p.add_argument("--steps", type=int, default=None, help="RL steps per mode (default 8, smoke 4)")
    p.add_argument("--warmup", type=int, default=None, help="first steps left out of the figures (default 2)")
    p.add_argument("--groups", type=int, default=None, help="prompt groups trained per step (default 16)")
    p.add_argument("--n", type=int, default=None, help="samples per group (default 16)")
    p.add_argument("--max-num-seqs", type=int, default=None, help="sequences running (default 256)")
    p.add_argument("--median", type=float, default=None, help="median response length (default 1200)")
    p.add_argument("--sigma", type=float, default=0.83, help="lognormal sigma of the lengths")
    p.add_argument("--cap", type=int, default=None, help="response length limit (default 4096)")
    p.add_argument("--tool-at", type=int, default=None, help="response position of the python block")
    p.add_argument("--max-staleness", type=int, default=2, help="rollout.max_staleness in partial mode (-1: none)")
    p.add_argument("--max-num-batched-tokens", type=int, default=16384)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    smoke = args.smoke
    for name, full, small in (("steps", 8, 4), ("warmup", 2, 1), ("groups", 16, 8), ("n", 16, 4),
                              ("max_num_seqs", 256, 32), ("median", 1200.0, 60.0), ("cap", 4096, 200),
                              ("tool_at", 200, 10)):
        if getattr(args, name) is None:
            setattr(args, name, small if smoke else full)
    args.max_staleness = None if args.max_staleness < 0 else args.max_staleness
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")
    torch.set_num_threads(1)
    hazard = lognormal_hazard(args.median, args.sigma, args.cap)
    results = [run_mode(mode, args, hazard) for mode in ("sync", "partial")]
    print(f"{'mode':8} {'groups':>6} {'steps/group':>11} {'occupancy':>9} {'tok/step':>8} {'restarts':>8} "
          f"{'GPU ms/group':>12} {'CPU s':>7}")
    for r in results:
        print(f"{r['mode']:8} {r['groups_trained']:6d} {r['decode_steps_per_group']:11.1f} {r['occupancy']:9.3f} "
              f"{r['tokens_per_decode_step']:8.1f} {r['restarted']:8d} {1e3 * r['modelled_gpu_s_per_group']:12.1f} "
              f"{r['cpu_seconds']:7.1f}")
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "per_step"}))
    sync, partial = results
    print(json.dumps({
        "bench": "rollout_tail", "smoke": smoke, "median": args.median, "sigma": args.sigma, "cap": args.cap,
        "max_num_seqs": args.max_num_seqs, "groups_per_step": args.groups, "n": args.n,
        "max_staleness": args.max_staleness,
        "occupancy": {"sync": round(sync["occupancy"], 4), "partial": round(partial["occupancy"], 4)},
        "decode_steps_per_group_ratio": sync["decode_steps_per_group"] / max(partial["decode_steps_per_group"], 1e-9),
        "modelled_gpu_time_ratio": sync["modelled_gpu_s_per_group"] / max(partial["modelled_gpu_s_per_group"], 1e-12),
    }))


if __name__ == "__main__":
    main()
