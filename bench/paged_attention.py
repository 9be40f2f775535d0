"""Benchmark paged-attention decode: Triton kernel vs torch reference (vs flash-attn when installed).

    python bench/paged_attention.py                  # CUDA: Qwen2.5-7B heads, bf16; CPU: small config
    python bench/paged_attention.py --block-size 16

Decode only (one query per sequence, every sequence at the same context length). Reports the median
time of triton.testing.do_bench on CUDA; on CPU the best of 10 perf_counter runs (the machine is
shared, and the minimum is what survives other people's load). The achieved bandwidth
= KV bytes read / time (the kernel's expected traffic, see cir_kernels/paged_attention.py) and, on
CUDA, its fraction of the HBM peak. Prints a table, then one JSON line.
"""
import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/paged_attention.py` the script's folder comes first on sys.path, where bench/kernels.py
    # would shadow the `kernels` package: run again as the module bench.paged_attention, repo root on the path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.paged_attention", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": _path})

import argparse
import functools
import json
import time

import torch

from cir_kernels.paged_attention import paged_attention
from cir_kernels.paged_attention_reference import paged_attention_reference

# HBM peak, bytes/s, from the vendors' data sheets (matched on the device name).
HBM_PEAK = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12,
            "H100": 3.35e12, "A100-SXM4-80GB": 2.039e12, "A100 80GB PCIe": 1.935e12, "A100": 1.555e12,
            "L40S": 0.864e12, "A10": 0.6e12, "RTX 4090": 1.008e12}


def hbm_peak(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in HBM_PEAK.items() if key in name), None)


def make_decode_batch(num_seqs, context, num_q_heads, num_kv_heads, head_dim, block_size, dtype, device):
    """num_seqs sequences of `context` cached tokens in shuffled blocks, one query each."""
    blocks_per_seq = -(-context // block_size)
    num_blocks = num_seqs * blocks_per_seq
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.randperm(num_blocks, device=device).view(num_seqs, blocks_per_seq).int()
    q = torch.randn(num_seqs, num_q_heads, head_dim, dtype=dtype, device=device)
    cu = torch.arange(num_seqs + 1, dtype=torch.int32, device=device)
    seq_lens = torch.full((num_seqs,), context, dtype=torch.int32, device=device)
    return q, cu, k_cache, v_cache, block_tables, seq_lens


def time_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(10):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def flash_attn_fn(args):
    try:
        from flash_attn import flash_attn_with_kvcache
    except ImportError:
        return None
    q, _, k_cache, v_cache, block_tables, seq_lens = args
    if k_cache.shape[1] % 256:
        return None  # flash-attn's paged path wants page sizes divisible by 256
    return lambda: flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=seq_lens,
                                           block_table=block_tables, causal=True)


def measure_decode(grid: list[tuple[int, int]], heads: tuple[int, int], head_dim: int, block_size: int,
                   dtype: torch.dtype, device: torch.device,
                   impls: tuple[str, ...] = ("torch", "triton", "flash_attn")) -> list[dict]:
    """One row per (batch, context) of `grid` and implementation: ms, KV GB/s, fraction of HBM peak."""
    peak = hbm_peak(device) if device.type == "cuda" else None
    rows = []
    for num_seqs, context in grid:
        args = make_decode_batch(num_seqs, context, *heads, head_dim, block_size, dtype, device)
        kv_bytes = num_seqs * context * heads[1] * head_dim * 2 * dtype.itemsize
        fns = {"torch": functools.partial(paged_attention_reference, *args, max_seqlen_q=1)}
        if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
            fns["triton"] = functools.partial(paged_attention, *args, max_seqlen_q=1, backend="triton")
        if device.type == "cuda" and (fa := flash_attn_fn(args)) is not None:
            fns["flash_attn"] = fa
        for impl, fn in fns.items():
            if impl not in impls:
                continue
            ms = time_ms(fn, device)
            gbps = kv_bytes / ms / 1e6
            rows.append({"impl": impl, "batch": num_seqs, "context": context, "ms": round(ms, 4),
                         "GB/s": round(gbps, 1),
                         "peak_frac": round(gbps * 1e9 / peak, 3) if peak else None})
        del args, fns, fn  # the partials hold the KV cache too
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    opts = parser.parse_args()
    device = torch.device(opts.device)
    if device.type == "cuda":  # Qwen2.5-7B attention: 28 q heads, 4 kv heads, head_dim 128
        heads, head_dim, dtype = (28, 4), 128, torch.bfloat16
        grid = [(b, c) for b in (1, 32, 256) for c in (1024, 4096, 8192)]
        peak = hbm_peak(device)
    else:
        heads, head_dim, dtype = (14, 2), 64, torch.float32
        grid = [(b, c) for b in (1, 8, 32) for c in (512, 2048)]
        peak = None
    rows = measure_decode(grid, heads, head_dim, opts.block_size, dtype, device)
    print(f"paged-attention decode on {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
          f" ({torch.get_num_threads()} threads), heads {heads[0]}q/{heads[1]}kv, D {head_dim}, {dtype},"
          f" block_size {opts.block_size}")
    print(f"{'impl':<11}{'batch':>6}{'context':>9}{'ms':>11}{'GB/s':>9}{'of peak':>9}")
    for r in rows:
        frac = f"{r['peak_frac']:.0%}" if r["peak_frac"] is not None else "-"
        print(f"{r['impl']:<11}{r['batch']:>6}{r['context']:>9}{r['ms']:>11.4f}{r['GB/s']:>9.1f}{frac:>9}")
    print(json.dumps({"bench": "paged_attention", "device": str(device), "dtype": str(dtype),
                      "num_q_heads": heads[0], "num_kv_heads": heads[1], "head_dim": head_dim,
                      "block_size": opts.block_size, "hbm_peak_bytes_s": peak, "rows": rows}))


if __name__ == "__main__":
    main()
