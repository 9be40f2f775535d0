"""The exact mode's cost and effect: default vs `Transformer.set_batch_invariant(True)`, same model.

    python bench/exact.py                                   # CPU: SmolLM2-135M, the embedded default
    python bench/exact.py --prompts 8 --n 4 --max-tokens 128 --model-path /models/Qwen2.5-0.5B
    from bench.exact import measure; row = measure(model)   # from another bench (bench/gpu.py), any device
    python bench/exact.py --attention-lengths 512,2048,8192 # exact-mode attention alone, one long sequence

For each mode: a rollout on the engine (random prompts, `ignore_eos`, so both modes generate the same
tokens count), then the update's training forward + backward (`PolicyForward` over the packed
trajectories, token-budget micro-batches) at the rollout's weights, which also gives the mismatch
|behaviour - recomputed| log-prob (mean, max) and the fraction of tokens whose ratio leaves the
paper's clip range [0.8, 1.28]. Reports rollout tokens/s, update seconds and the on/off ratios;
the last line is one JSON object. Timings exclude a short warm-up rollout and update per mode; the
modes run interleaved `--repeats` times and each figure is the best (wall clock; CPU process time
too, the steadier figure on a shared machine).

`--attention-lengths`: the exact mode's attention (`causal_attention_invariant`, SmolLM2's 9 query /
3 kv heads of 64) against SDPA on one causal sequence of each length: forward + backward CPU time, the
largest tensor any op creates, and the process's peak RSS (lengths ascending, so each peak is that
length's).
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
SDPA_MAX_LENGTH = 8192  # --attention-lengths: longest sequence SDPA is timed on (see attention_cost)


class _NoTokenizer:
    """The engine only needs EOS ids when no tools run; the bench ignores EOS."""

    def __init__(self, eos_token_id: int | list[int] | None):
        ids = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id or 0]
        self.eos_token_id, self.eos_token_ids = ids[0], list(ids)

    def decode(self, ids: list[int]) -> str:
        return ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Mode:
    """One mode's engine and its timed rollout + update (the model's mode is switched by `run`)."""

    def __init__(self, model, exact: bool, engine_config, autocast_dtype):
        from cir.engine import Engine
        from cir.rl.policy import PolicyForward

        self.model, self.exact = model, exact
        self.device = next(model.parameters()).device
        self.engine = Engine(model, _NoTokenizer(model.config.eos_token_id), engine_config)
        self.policy = PolicyForward(model)
        self.autocast_dtype = autocast_dtype
        self.best: dict | None = None

    def _amp(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _rollout(self, prompts, params, n):
        self.model.eval()
        with self._amp():
            return self.engine.generate(prompts, params, n=n)

    def _update(self, trajs, micro_batch_tokens) -> tuple[torch.Tensor, torch.Tensor]:
        from cir.rl.batching import pack

        self.model.train()
        gaps, sampled = [], []
        for mb in pack(trajs, [1.0] * len(trajs), micro_batch_tokens):
            mb = mb.to(self.device)
            with self._amp():
                logp, entropy = self.policy(mb.input_ids, mb.cu_seqlens, mb.rows, mb.targets, mb.mask)
                (-(logp * mb.mask).sum() - 1e-3 * entropy.sum()).backward()
            gaps.append((logp.detach() - mb.old_logprobs).float())
            sampled.append(mb.mask > 0)
        self.model.zero_grad(set_to_none=True)
        _sync(self.device)
        return torch.cat(gaps), torch.cat(sampled)

    def run(self, prompts, params, n, micro_batch_tokens, warmup: bool = False) -> None:
        """One timed rollout + update; keeps the fastest of the calls (wall time; CPU process time too)."""
        self.model.set_batch_invariant(self.exact)
        if warmup:  # allocations, kernel compiles: not timed
            self._update(self._rollout(prompts[:1], params, n), micro_batch_tokens)
            return
        _sync(self.device)
        t0, c0 = time.perf_counter(), time.process_time()
        trajs = self._rollout(prompts, params, n)
        _sync(self.device)
        t1, c1 = time.perf_counter(), time.process_time()
        gap, sampled = self._update(trajs, micro_batch_tokens)
        t2, c2 = time.perf_counter(), time.process_time()
        ratio = torch.exp(gap[sampled])  # recomputed / behaviour probability
        outside = ((ratio > 1 + CLIP_HIGH) | (ratio < 1 - CLIP_LOW)).float()
        gap = gap[sampled].abs()
        num_generated = sum(len(t.response_ids) for t in trajs)
        row = {"rollout_tokens_per_s": num_generated / (t1 - t0), "rollout_s": t1 - t0, "update_s": t2 - t1,
               "rollout_cpu_s": c1 - c0, "update_cpu_s": c2 - c1, "generated_tokens": num_generated,
               "update_tokens": sum(len(t.prompt_ids) + len(t.response_ids) for t in trajs),
               "logprob_gap_mean": gap.mean().item(), "logprob_gap_max": gap.max().item(),
               "outside_clip_frac": outside.mean().item(), "tokens_compared": int(sampled.sum())}
        if self.best is None:
            self.best = row
        else:  # the same work each time: keep each figure's best
            for key in ("rollout_s", "update_s", "rollout_cpu_s", "update_cpu_s"):
                self.best[key] = min(self.best[key], row[key])
            self.best["rollout_tokens_per_s"] = num_generated / self.best["rollout_s"]


def measure(model, *, num_prompts: int = 4, n: int = 2, prompt_len: int = 48, max_tokens: int = 48,
            micro_batch_tokens: int = 4096, engine_config=None, autocast_dtype: torch.dtype | None = None,
            repeats: int = 1, seed: int = 0) -> dict:
    """Default vs exact mode on `model` (a cir Transformer, any device), modes interleaved `repeats`
    times, best of each: {"off": {...}, "on": {...}, "rollout_slowdown": off tok/s / on tok/s,
    "update_slowdown": on s / off s (and *_cpu: the same from process CPU time)}. Leaves the mode off."""
    from cir.engine import EngineConfig, SamplingParams

    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=gen).tolist() for _ in range(num_prompts)]
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    engine_config = engine_config or EngineConfig(show_progress=False, kv_cache_memory_gb=0.5)
    modes = {"off": _Mode(model, False, engine_config, autocast_dtype),
             "on": _Mode(model, True, engine_config, autocast_dtype)}
    try:
        for mode in modes.values():
            mode.run(prompts, params, n, micro_batch_tokens, warmup=True)
        for _ in range(repeats):
            for mode in modes.values():
                mode.run(prompts, params, n, micro_batch_tokens)
    finally:
        model.set_batch_invariant(False)
        for mode in modes.values():
            mode.engine.release()
    off, on = modes["off"].best, modes["on"].best
    return {"off": off, "on": on, "repeats": repeats,
            "rollout_slowdown": on["rollout_s"] / off["rollout_s"], "update_slowdown": on["update_s"] / off["update_s"],
            "rollout_slowdown_cpu": on["rollout_cpu_s"] / off["rollout_cpu_s"],
            "update_slowdown_cpu": on["update_cpu_s"] / off["update_cpu_s"]}


def attention_cost(lengths: list[int], num_q_heads: int = 9, num_kv_heads: int = 3, head_dim: int = 64) -> list[dict]:
    """Exact-mode attention vs SDPA, forward + backward over one causal sequence per length (CPU)."""
    import resource

    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from cir_kernels.batch_invariant import causal_attention_invariant

    class Largest(TorchDispatchMode):
        nbytes = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.nbytes = max(self.nbytes, t.untyped_storage().nbytes())
            return out

    def sdpa(q, k, v):
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(0, 1)

    def inputs(length: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(length)
        return [torch.randn(length, h, head_dim, generator=gen).requires_grad_()
                for h in (num_q_heads, num_kv_heads, num_kv_heads)]

    def cpu_s(fn, length: int) -> float:
        leaves = inputs(length)
        c0 = time.process_time()
        fn(*leaves).sum().backward()
        return time.process_time() - c0

    lengths = sorted(lengths)
    rows = [{"length": n} for n in lengths]
    cpu_s(causal_attention_invariant, 64), cpu_s(sdpa, 64)  # warm-up
    for row in rows:  # exact mode first, lengths ascending: the peak RSS after each is that length's
        row["exact_cpu_s"] = cpu_s(causal_attention_invariant, row["length"])
        row["exact_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with Largest() as mode:
            causal_attention_invariant(*inputs(row["length"])).sum().backward()
        row["exact_largest_tensor_mb"] = mode.nbytes / 2**20
        print(json.dumps(row), flush=True)
    for row in rows:  # SDPA's CPU backward past 8k tokens was killed on the 23 GB test machine
        if row["length"] <= SDPA_MAX_LENGTH:
            row["sdpa_cpu_s"] = cpu_s(sdpa, row["length"])
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="HF model directory (default: embedded SmolLM2-135M)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--micro-batch-tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per mode, interleaved; best kept")
    parser.add_argument("--bf16", action="store_true", help="fp32 weights, bf16 autocast (CUDA)")
    parser.add_argument("--attention-lengths", default=None,
                        help="comma-separated sequence lengths: time the exact-mode attention alone, then exit")
    args = parser.parse_args()
    if args.attention_lengths:
        rows = attention_cost([int(n) for n in args.attention_lengths.split(",")])
        print(json.dumps({"device": f"CPU, {torch.get_num_threads()} thread(s)", "attention": rows}))
        return
    from cir.model import default_model_path, from_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = from_pretrained(args.model_path or default_model_path(), dtype=torch.float32, device=device)
    rows = measure(model, num_prompts=args.prompts, n=args.n, prompt_len=args.prompt_len, max_tokens=args.max_tokens,
                   micro_batch_tokens=args.micro_batch_tokens, autocast_dtype=torch.bfloat16 if args.bf16 else None,
                   repeats=args.repeats)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"{where}; {args.prompts} prompts x {args.n} samples, prompt {args.prompt_len} + {args.max_tokens} "
          f"tokens; {'bf16 autocast' if args.bf16 else 'fp32'}")
    print(f"{'mode':<6}{'rollout tok/s':>14}{'rollout s':>10}{'(cpu s)':>9}{'update s':>10}{'(cpu s)':>9}"
          f"{'|gap| mean':>12}{'|gap| max':>11}{'outside clip':>14}")
    for name in ("off", "on"):
        r = rows[name]
        print(f"{name:<6}{r['rollout_tokens_per_s']:>14.1f}{r['rollout_s']:>10.2f}{r['rollout_cpu_s']:>9.2f}"
              f"{r['update_s']:>10.2f}{r['update_cpu_s']:>9.2f}{r['logprob_gap_mean']:>12.2e}"
              f"{r['logprob_gap_max']:>11.2e}{r['outside_clip_frac']:>14.2%}")
    print(f"exact mode: rollout {rows['rollout_slowdown']:.2f}x the time (cpu {rows['rollout_slowdown_cpu']:.2f}x), "
          f"update {rows['update_slowdown']:.2f}x (cpu {rows['update_slowdown_cpu']:.2f}x); best of {args.repeats}")
    print(json.dumps({"device": where, "bf16": args.bf16, **rows}))


if __name__ == "__main__":
    main()
