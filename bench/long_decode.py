"""Decode at the paper's response lengths: 256 sequences at contexts of 1k-5k tokens, step time vs bound.

    python bench/long_decode.py                                   # CPU: tiny shape, 16 sequences, short contexts
    python bench/long_decode.py --shape qwen2.5-1.5b              # CUDA: 256 sequences at 1k, 2k, 3k, 4k, 5k
    python bench/long_decode.py --shape qwen2.5-7b --gpu-memory-utilization 0.5   # a pool that preempts

For each context C, `num_seqs` prompts of C tokens are prefilled, then decoded `--steps` tokens each
(ignore_eos). The KV pool is sized the way a rollout sizes it (from the memory left free after a
warm-up forward on CUDA, `gpu_memory_utilization`); when it cannot hold every sequence the scheduler
preempts (recompute) and the count is reported. The decode step time is (time of a run of S + 1
tokens - time of a run of 1 token) / S, so the prefill cancels out. Its bound is the bytes a step
must read, the weights once plus each sequence's K and V (at the mean context of the decode), over
the HBM bandwidth (the GPU's peak; on CPU a measured copy bandwidth): the fraction of that bound a
step reaches is the figure (issue #12: >= 40% at 4k on an H100/H200). Preemptions make the
measured step slower than a step of the same batch: a row with preemptions measures the pool, not
the kernels. bench/gpu.py calls `long_decode`; the last line printed is one JSON object.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/long_decode.py` bench/kernels.py would shadow the `kernels` package: run again as
    # the module bench.long_decode, repo root on the path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.long_decode", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": _path})

import argparse
import json
import time

import torch

HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bandwidth(device: torch.device) -> tuple[float, str]:
    """Bytes/s a step can read at best: the GPU's HBM peak, or on CPU a measured copy (read + write)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in HBM_BYTES_PER_S.items() if k in name), None)
        if peak is not None:
            return peak, f"{name} peak"
    src = torch.empty(64 * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best, "measured copy"


def _timed_generate(engine, prompts, max_tokens: int) -> float:
    from cir.engine import SamplingParams

    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    _sync(engine.device)
    start = time.perf_counter()
    engine.generate(prompts, params)
    _sync(engine.device)
    return time.perf_counter() - start


def long_decode(model, num_seqs: int = 256, contexts: tuple[int, ...] = (1024, 2048, 3072, 4096, 5120),
                steps: int = 32, gpu_memory_utilization: float = 0.9, kv_cache_memory_gb: float = 4.0,
                seed: int = 0) -> dict:
    """Decode-step time of `num_seqs` sequences at each context against the weights + KV bytes bound."""
    from bench.models import ByteTokenizer
    from cir.engine import Engine, EngineConfig

    mc = model.config
    param = next(model.parameters())
    device = param.device
    longest = max(contexts) + steps + 1
    if longest > mc.max_position_embeddings:
        raise ValueError(f"context {max(contexts)} + {steps} steps > max_position_embeddings "
                         f"{mc.max_position_embeddings}")
    engine = Engine(model, ByteTokenizer(), EngineConfig(
        max_num_seqs=num_seqs, max_model_len=longest, gpu_memory_utilization=gpu_memory_utilization,
        kv_cache_memory_gb=kv_cache_memory_gb, show_progress=False, seed=seed))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes_per_token = mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * param.element_size()
    bandwidth, bandwidth_source = peak_bandwidth(device)
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i, context in enumerate(contexts):
        prompts = torch.randint(1, 256, (num_seqs, context), generator=gen).tolist()
        _timed_generate(engine, [p[:8] for p in prompts[:2]], 2)  # warm-up (pool allocated, kernels built)
        # the first full-size prefill of a process pays one-time costs (seen: 194 vs 7 ms in a forked
        # child on CPU): time it twice at the first context, so the difference below is decode alone
        t_short = min(_timed_generate(engine, prompts, 1) for _ in range(2 if i == 0 else 1))
        preempted_short = engine.stats["num_preemptions"]
        t_long = _timed_generate(engine, prompts, steps + 1)
        step_s = max(t_long - t_short, 1e-9) / steps
        mean_context = context + steps / 2
        bytes_read = weight_bytes + num_seqs * mean_context * kv_bytes_per_token
        bound_s = bytes_read / bandwidth
        rows.append({
            "context": context, "num_seqs": num_seqs, "step_ms": 1e3 * step_s, "bound_ms": 1e3 * bound_s,
            "fraction_of_bound": bound_s / step_s, "tokens_per_s": num_seqs / step_s,
            "GB_read_per_step": bytes_read / 1e9,
            "kv_pool_tokens": engine.kv_cache.num_blocks * engine.config.block_size,
            "kv_tokens_needed": num_seqs * (context + steps + 1),
            "num_preemptions": engine.stats["num_preemptions"], "num_preemptions_prefill_only": preempted_short,
        })
    engine.release()
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(param.dtype).removeprefix("torch."), "weight_GB": weight_bytes / 1e9,
            "bandwidth_GB_per_s": bandwidth / 1e9, "bandwidth_source": bandwidth_source, "steps": steps, "rows": rows}


def print_table(result: dict) -> None:
    print(f"{result['device']}, {result['dtype']}, weights {result['weight_GB']:.2f} GB, bandwidth "
          f"{result['bandwidth_GB_per_s']:.0f} GB/s ({result['bandwidth_source']}), {result['steps']} decode steps")
    print(f"{'context':>8}{'seqs':>6}{'step ms':>10}{'bound ms':>10}{'of bound':>10}{'tok/s':>10}{'preempt':>9}")
    for r in result["rows"]:
        print(f"{r['context']:>8}{r['num_seqs']:>6}{r['step_ms']:>10.2f}{r['bound_ms']:>10.3f}"
              f"{r['fraction_of_bound']:>10.1%}{r['tokens_per_s']:>10.0f}{r['num_preemptions']:>9}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=None,
                        help="bench/models.py shape; default: tiny on CPU, qwen2.5-1.5b on CUDA")
    parser.add_argument("--num-seqs", type=int, default=None, help="default: 256 on CUDA, 16 on CPU")
    parser.add_argument("--contexts", type=int, nargs="+", default=None, help="default: 1024 ... 5120 on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="decode steps timed per context")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = parser.parse_args()
    from bench.models import random_model, tiny_shape

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    shape = args.shape or "qwen2.5-1.5b"
    model = random_model(shape if cuda else tiny_shape(shape), torch.bfloat16 if cuda else torch.float32, device)
    model.eval()
    result = long_decode(
        model, num_seqs=args.num_seqs or (256 if cuda else 16),
        contexts=tuple(args.contexts or ((1024, 2048, 3072, 4096, 5120) if cuda else (64, 128, 256))),
        steps=args.steps or (32 if cuda else 8), gpu_memory_utilization=args.gpu_memory_utilization,
        kv_cache_memory_gb=0.05)
    result["shape"] = shape if cuda else f"tiny {shape}"
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
