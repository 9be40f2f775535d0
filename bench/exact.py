"""The exact mode's cost and effect: default vs `Transformer.set_batch_invariant(True)`, same model.

    python bench/exact.py                                   # CPU: SmolLM2-135M, the embedded default
    python bench/exact.py --prompts 8 --n 4 --max-tokens 128 --model-path /models/Qwen2.5-0.5B
    from bench.exact import measure; row = measure(model)   # from another bench (bench/gpu.py), any device

For each mode: a rollout on the engine (random prompts, `ignore_eos`, so both modes generate the same
tokens count), then the update's training forward + backward (`PolicyForward` over the packed
trajectories, token-budget micro-batches) at the rollout's weights, which also gives the mismatch
|behaviour - recomputed| log-prob (mean, max) and the fraction of tokens whose ratio leaves the
paper's clip range [0.8, 1.28]. Reports rollout tokens/s, update seconds and the on/off ratios;
the last line is one JSON object. Timings exclude a short warm-up rollout and update per mode.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/exact.py` the script's folder comes first on sys.path, where bench/kernels.py
    # would shadow the `kernels` package: run again as the module bench.exact, repo root on the path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.exact", *sys.argv[1:]], {**os.environ, "PYTHONPATH": _path})

import argparse
import contextlib
import json
import time

import torch

CLIP_LOW, CLIP_HIGH = 0.2, 0.28


class _NoTokenizer:
    """The engine only needs EOS ids when no tools run; the bench ignores EOS."""

    def __init__(self, eos_token_id: int):
        self.eos_token_id = eos_token_id
        self.eos_token_ids = [eos_token_id]

    def decode(self, ids: list[int]) -> str:
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_mode(model, exact: bool, prompts, params, n, micro_batch_tokens, engine_config, autocast_dtype) -> dict:
    from cir.engine import Engine
    from cir.rl.batching import pack
    from cir.rl.policy import PolicyForward

    device = next(model.parameters()).device
    model.set_batch_invariant(exact)
    engine = Engine(model, _NoTokenizer(model.config.eos_token_id or 0), engine_config)
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    policy = PolicyForward(model)

    def rollout(batch):
        model.eval()
        with amp:
            return engine.generate(batch, params, n=n)

    def update(trajs) -> tuple[float, torch.Tensor, torch.Tensor]:
        model.train()
        gaps, sampled = [], []
        for mb in pack(trajs, [1.0] * len(trajs), micro_batch_tokens):
            mb = mb.to(device)
            with amp:
                logp, entropy = policy(mb.input_ids, mb.cu_seqlens, mb.rows, mb.targets, mb.mask)
                (-(logp * mb.mask).sum() - 1e-3 * entropy.sum()).backward()
            gaps.append((logp.detach() - mb.old_logprobs).float())
            sampled.append(mb.mask > 0)
        model.zero_grad(set_to_none=True)
        _sync(device)
        return torch.cat(gaps), torch.cat(sampled)

    update(rollout(prompts[:1]))  # warm-up (allocations, kernel compiles), not timed
    _sync(device)
    t0 = time.perf_counter()
    trajs = rollout(prompts)
    _sync(device)
    t1 = time.perf_counter()
    gap, sampled = update(trajs)
    t2 = time.perf_counter()
    engine.release()
    ratio = torch.exp(gap[sampled])  # recomputed / behaviour probability
    outside = ((ratio > 1 + CLIP_HIGH) | (ratio < 1 - CLIP_LOW)).float()
    gap = gap[sampled].abs()
    num_generated = sum(len(t.response_ids) for t in trajs)
    return {"rollout_tokens_per_s": num_generated / (t1 - t0), "rollout_s": t1 - t0, "update_s": t2 - t1,
            "update_tokens": sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs),
            "logprob_gap_mean": gap.mean().item(), "logprob_gap_max": gap.max().item(),
            "outside_clip_frac": outside.mean().item(), "tokens_compared": int(sampled.sum())}


def measure(model, *, num_prompts: int = 4, n: int = 2, prompt_len: int = 48, max_tokens: int = 48,
            micro_batch_tokens: int = 4096, engine_config=None, autocast_dtype: torch.dtype | None = None,
            seed: int = 0) -> dict:
    """Default vs exact mode on `model` (a cir Transformer, any device): {"off": {...}, "on": {...},
    "rollout_slowdown": off tok/s / on tok/s, "update_slowdown": on s / off s}. Leaves the mode off."""
    from cir.engine import EngineConfig, SamplingParams

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(num_prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    engine_config = engine_config or EngineConfig(show_progress=False, kv_cache_memory_gb=0.5)
    rows = {}
    try:
        for name, exact in (("off", False), ("on", True)):
            rows[name] = _one_mode(model, exact, prompts, params, n, micro_batch_tokens, engine_config, autocast_dtype)
    finally:
        model.set_batch_invariant(False)
    rows["rollout_slowdown"] = rows["off"]["rollout_tokens_per_s"] / rows["on"]["rollout_tokens_per_s"]
    rows["update_slowdown"] = rows["on"]["update_s"] / rows["off"]["update_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--bf16", action="store_true", help="fp32 weights, bf16 autocast (CUDA)")
    args = parser.parse_args()
    from cir.model import default_model_path, from_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = from_pretrained(args.model_path or default_model_path(), dtype=torch.float32, device=device)
    rows = measure(model, num_prompts=args.prompts, n=args.n, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                   micro_batch_tokens=args.micro_batch_tokens, autocast_dtype=torch.bfloat16 if args.bf16 else None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{where}; {args.prompts} prompts x {args.n} samples, prompt {args.prompt_len} + {args.max_tokens} "
          f"tokens; {'bf16 autocast' if args.bf16 else 'fp32'}")
    print(f"{'mode':<8}{'rollout tok/s':>15}{'update s':>10}{'|gap| mean':>12}{'|gap| max':>11}{'outside clip':>14}")
    for name in ("off", "on"):
        r = rows[name]
        print(f"{name:<8}{r['rollout_tokens_per_s']:>15.1f}{r['update_s']:>10.2f}{r['logprob_gap_mean']:>12.2e}"
              f"{r['logprob_gap_max']:>11.2e}{r['outside_clip_frac']:>14.2%}")
    print(f"exact mode: rollout {rows['rollout_slowdown']:.2f}x slower, update {rows['update_slowdown']:.2f}x slower")
    print(json.dumps({"device": where, "bf16": args.bf16, **rows}))


if __name__ == "__main__":
    main()
