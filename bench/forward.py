"""Forward throughput (tokens/s) of cir's hand-written transformer vs transformers, same weights, one run.

    python bench/forward.py                       # CPU: SmolLM2-135M (cir.model.default_model_path()), fp32
    python bench/forward.py --model DIR --shapes 1x128,4x256 --reps 7
    OMP_NUM_THREADS=1 python bench/forward.py          # steadier on a shared machine
    python bench/forward.py                       # on CUDA: a random-weight Qwen2.5-1.5B-shaped model, bf16
    python bench/forward.py --device cpu          # the CPU part on a GPU machine

Both models run the plain causal forward over a (B, T) batch and return logits for every position
(transformers with use_cache=False and SDPA attention), under inference_mode. Repetitions alternate
between the two (the order flips every repetition) so that load from other work on the machine hits
both alike; the ratio is the median of per-repetition time ratios. Warm-up passes are not timed.
Throughput comes with achieved GFLOP/s (CPU) or MFU against the bf16 dense peak (CUDA), counting
2 * (matmul parameters) per token plus causal attention (2 * 2 * T^2 / 2 * heads * head_dim per layer).
On CUDA (`--device auto` when a GPU is present) only the GPU part runs, on a model built directly on
the GPU with random weights and its transformers twin given the same tensors (bench/models.py): no
checkpoint, no CPU build, no save and reload (which took minutes for 1.5B parameters).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/forward.py` the script's folder comes first on sys.path, where bench/kernels.py
    # would shadow the `kernels` package: run again as the module bench.forward, repo root on the path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.forward", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": _path})

import argparse
import json
import platform
import statistics
import time

import torch

from bench.models import hf_twin, random_model

GPU_SHAPES = [(1, 2048), (4, 2048), (8, 1024)]  # logits of 8k tokens x 152k vocab: 2.5 GB each
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def forward_flops(config, batch: int, length: int) -> float:
    D, L = config.hidden_size, config.num_hidden_layers
    Dh, Hq, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    per_layer = D * Dh * (2 * Hq + 2 * Hkv) + 3 * D * config.intermediate_size
    matmul_params = L * per_layer + config.vocab_size * D
    attention = L * 2 * 2 * (length * length / 2) * Hq * Dh
    return batch * (2 * matmul_params * length + attention)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def compare(path: str, label: str, dtype: torch.dtype, device: torch.device, shapes: list[tuple[int, int]],
            reps: int, warmup: int) -> list[dict]:
    """A checkpoint directory, loaded by both."""
    from transformers import AutoModelForCausalLM

    from cir.model import from_pretrained

    ours = from_pretrained(path, dtype=dtype, device=device)
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return compare_models(ours, theirs, label, shapes, reps, warmup)


def compare_random(shape: str, dtype: torch.dtype, device: torch.device, shapes: list[tuple[int, int]],
                   reps: int, warmup: int) -> list[dict]:
    """A random-weight model of a published shape, built on `device`, and its transformers twin."""
    ours = random_model(shape, dtype, device)
    return compare_models(ours, hf_twin(ours), f"{shape}(random)", shapes, reps, warmup)


def compare_models(ours, theirs, label: str, shapes: list[tuple[int, int]], reps: int, warmup: int) -> list[dict]:
    param = next(ours.parameters())
    dtype, device = param.dtype, param.device
    rows = []
    for batch, length in shapes:
        ids = torch.randint(0, ours.config.vocab_size, (batch, length), device=device)
        run_ours = lambda ids=ids: ours(ids)  # noqa: E731
        run_theirs = lambda ids=ids: theirs(input_ids=ids, use_cache=False).logits  # noqa: E731
        with torch.inference_mode():
            diff = (run_ours().float() - run_theirs().float()).abs().max().item()
            for _ in range(warmup):
                run_ours(), run_theirs()
            t_ours, t_theirs = [], []
            for rep in range(reps):
                pair = [(run_ours, t_ours), (run_theirs, t_theirs)]
                for fn, times in (pair if rep % 2 == 0 else pair[::-1]):
                    times.append(time_once(fn, device))
        flops = forward_flops(ours.config, batch, length)
        tokens = batch * length
        row = dict(model=label, dtype=str(dtype).removeprefix("torch."), batch=batch, length=length,
                   ours_tok_s=tokens / statistics.median(t_ours), hf_tok_s=tokens / statistics.median(t_theirs),
                   ratio=statistics.median(b / a for a, b in zip(t_ours, t_theirs, strict=True)),
                   ours_gflop_s=flops / statistics.median(t_ours) / 1e9, max_abs_logit_diff=diff)
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
            row["ours_mfu"] = row["ours_gflop_s"] * 1e9 / peak if peak else None
            row["hf_mfu"] = flops * row["hf_tok_s"] / tokens / peak if peak else None
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF checkpoint directory (default: the converted SmolLM2-135M)")
    parser.add_argument("--shapes", default="1x32,1x128,4x128,1x512", help="comma-separated BxT (CPU)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU part alone when CUDA is available, else the CPU part")
    args = parser.parse_args()
    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        rows = compare_random("qwen2.5-1.5b", torch.bfloat16, torch.device("cuda"), GPU_SHAPES, args.reps, args.warmup)
    else:
        path, label = args.model, args.model and os.path.basename(os.path.normpath(args.model))
        if path is None:
            try:
                from cir.model import default_model_path
                path, label = default_model_path(), "SmolLM2-135M-Instruct"
            except (ImportError, RuntimeError, OSError) as e:  # no GGUF package reachable (e.g. offline GPU node)
                print(f"# default model unavailable ({e}); using random SmolLM2-135M-shaped weights")
        if path is None:
            rows = compare_random("smollm2-135m", torch.float32, torch.device("cpu"), shapes, args.reps, args.warmup)
        else:
            rows = compare(path, label, torch.float32, torch.device("cpu"), shapes, args.reps, args.warmup)

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(f"# cpu={platform.machine()} threads={torch.get_num_threads()} torch={torch.__version__} gpu={gpu}")
    print(f"{'model':<28} {'dtype':<9} {'BxT':<8} {'ours tok/s':>11} {'hf tok/s':>10} {'ratio':>6} "
          f"{'GFLOP/s':>8} {'mfu ours/hf':>12} {'max|dlogit|':>11}")
    for r in rows:
        mfu = f"{r['ours_mfu']:.1%}/{r['hf_mfu']:.1%}" if r.get("ours_mfu") is not None else "-"
        shape = f"{r['batch']}x{r['length']}"
        print(f"{r['model']:<28} {r['dtype']:<9} {shape:<8} {r['ours_tok_s']:>11.0f} "
              f"{r['hf_tok_s']:>10.0f} {r['ratio']:>5.2f}x {r['ours_gflop_s']:>8.1f} {mfu:>12} "
              f"{r['max_abs_logit_diff']:>11.2e}")
    ratios = [r["ratio"] for r in rows]
    print(json.dumps({"bench": "forward", "device": device, "threads": torch.get_num_threads(),
                      "min_ratio": min(ratios), "geomean_ratio": statistics.geometric_mean(ratios), "rows": rows}))


if __name__ == "__main__":
    main()
