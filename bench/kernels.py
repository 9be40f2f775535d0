"""Benchmark of kernels/: fused masked log-probs and sampling against plain torch baselines.

    python bench/kernels.py            # CUDA: Qwen2.5-7B shapes; CPU: the torch reference's memory
    python bench/kernels.py --quick    # smaller shapes (a smoke run)
    (it re-runs itself as `python -m bench.kernels`, so that its name does not shadow `kernels`)

CUDA (bf16 hidden/weight, D = 3584, V = 152064):
  log-probs fwd+bwd, N = 4096 .. 32768: `linear_logprobs` vs the baseline full logits -> float ->
  log_softmax -> gather; time = triton.testing.do_bench median (20/80 % quantiles), memory = peak
  torch.cuda allocation during one fwd+bwd minus the allocation before it (inputs excluded, the two
  gradients included in both; "-grads %" compares what is left without them); "unfused" is
  `linear_logprobs(fused=False)`, cuBLAS into fp32 chunks + Triton row kernels (the earlier path).
  sampling, B = 1 .. 512, fp32 logits, V = 152064: `sample` vs sort + cumsum + exponential race.
CPU (float32, N = 8192, V = 49152, D = 576): each variant runs in its own process; its peak extra
  memory = the process's peak resident set (VmHWM, reset through /proc/self/clear_refs once the
  inputs exist) minus its resident set at that moment, over one fwd+bwd; time = the second of two runs,
  on --threads torch threads (default 1).
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__" and not __package__:
    # As `python bench/kernels.py` this file would shadow the `kernels` package it measures (the
    # script's folder comes first on sys.path): run it again as the module bench.kernels.
    _path = os.pathsep.join(p for p in (REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.kernels", *sys.argv[1:]], {**os.environ, "PYTHONPATH": _path})

import torch  # noqa: E402

from kernels import linear_logprobs, sample  # noqa: E402

MIB = 1 << 20


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()  # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def sort_sample(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The usual sort-based sampler (vLLM v0 / gpt-fast style), no host sync."""
    z = logits.float() / temperature
    logprobs_all = torch.log_softmax(z, dim=-1)
    sorted_z, order = z.sort(dim=-1, descending=True)
    if top_k > 0:
        sorted_z[:, top_k:] = float("-inf")
    probs = sorted_z.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p
    probs = probs.masked_fill(drop, 0.0)
    choice = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)
    tokens = order.gather(1, choice).squeeze(1)
    return tokens, logprobs_all.gather(1, tokens[:, None]).squeeze(1)


# ---------------------------------------------------------------- CPU: memory of the torch reference
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def cpu_child(variant: str, n: int, v: int, d: int, chunk: int | None, threads: int) -> dict:
    """One fwd+bwd of `variant` in this (fresh) process: peak extra RSS and time."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hidden = torch.randn(n, d, requires_grad=True)
    weight = (torch.randn(v, d) * 0.05).requires_grad_()
    targets = torch.randint(0, v, (n,))
    grad = torch.randn(n)

    def step() -> None:
        hidden.grad = weight.grad = None
        if variant == "naive":
            logp = naive_logprobs(hidden, weight, targets)
        else:
            logp = linear_logprobs(hidden, weight, targets, chunk_size=chunk)
        (logp * grad).sum().backward()

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _status_kib("VmRSS")
    step()
    peak_extra = (_status_kib("VmHWM") - before) * 1024
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    grads = (n * d + v * d) * 4
    return {"variant": variant, "chunk": chunk, "peak_extra_bytes": peak_extra, "grad_bytes": grads, "seconds": seconds,
            "threads": threads}


def cpu_bench(quick: bool, threads: int) -> dict:
    n, v, d = (2048, 12288, 256) if quick else (8192, 49152, 576)
    rows = []
    for variant, chunk in (("naive", None), ("reference", 256), ("reference", None), ("reference", 4096)):
        cmd = [sys.executable, "-m", "bench.kernels", "--child", variant, "--n", str(n), "--v", str(v), "--d", str(d),
               "--threads", str(threads)]
        if chunk is not None:
            cmd += ["--chunk", str(chunk)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    naive = rows[0]
    print(f"linear_logprobs fwd+bwd, CPU float32, N={n} V={v} D={d}, {threads} thread(s)"
          " (peak RSS over the inputs, each variant in its own process)")
    print(f"{'variant':<12}{'chunk':>8}{'peak extra MiB':>16}{'minus grads MiB':>17}{'% of naive':>12}{'time s':>9}")
    for r in rows:
        extra, beyond = r["peak_extra_bytes"], r["peak_extra_bytes"] - r["grad_bytes"]
        r["ratio_vs_naive"] = extra / naive["peak_extra_bytes"]
        r["ratio_vs_naive_minus_grads"] = beyond / (naive["peak_extra_bytes"] - naive["grad_bytes"])
        chunk = r["chunk"] or ("auto" if r["variant"] != "naive" else "-")
        print(f"{r['variant']:<12}{chunk!s:>8}{extra / MIB:>16.0f}{beyond / MIB:>17.0f}"
              f"{100 * r['ratio_vs_naive']:>11.1f}%{r['seconds']:>9.2f}")
    return {"n": n, "v": v, "d": d, "threads": threads, "rows": rows}


# ---------------------------------------------------------------- CUDA: Qwen2.5-7B shapes
def _cuda_measure(fn, grad_to_none: list[torch.Tensor] | None = None) -> tuple[float | None, float | None]:
    """(median ms, peak extra MiB) of fn on CUDA, or (None, None) when it runs out of memory."""
    import triton.testing

    try:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()  # warm-up + memory
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / MIB
        ms = triton.testing.do_bench(fn, grad_to_none=grad_to_none, quantiles=[0.5, 0.2, 0.8])[0]
        return ms, peak
    except torch.OutOfMemoryError:
        return None, None


def cuda_bench(quick: bool) -> dict:
    device, d, v = "cuda", 3584, 152064
    results: dict = {"device": torch.cuda.get_device_name(), "logprobs": [], "sampling": []}
    print(f"linear_logprobs fwd+bwd, bf16, D={d} V={v} ({results['device']})")
    print(f"{'N':>6}{'torch ms':>10}{'kernel ms':>11}{'torch MiB':>11}{'kernel MiB':>12}{'mem %':>7}{'-grads %':>9}"
          f"{'speedup':>9}{'unfused ms':>12}{'unfused MiB':>13}")
    for n in (1024, 4096) if quick else (4096, 8192, 16384, 32768):
        hidden = torch.randn(n, d, device=device, dtype=torch.bfloat16, requires_grad=True)
        weight = (torch.randn(v, d, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
        targets = torch.randint(0, v, (n,), device=device)
        grad = torch.randn(n, device=device)

        def run(f):
            return lambda: (f(hidden, weight, targets) * grad).sum().backward()

        t_ms, t_mib = _cuda_measure(run(naive_logprobs), [hidden, weight])
        k_ms, k_mib = _cuda_measure(run(linear_logprobs), [hidden, weight])
        # the path before the fused GEMMs: cuBLAS into fp32 chunks + the Triton row kernels
        u_ms, u_mib = _cuda_measure(run(lambda h, w, t: linear_logprobs(h, w, t, fused=False)), [hidden, weight])
        grad_mib = (hidden.numel() + weight.numel()) * hidden.element_size() / MIB  # both paths must hold them
        row = {"n": n, "torch_ms": t_ms, "kernel_ms": k_ms, "torch_mib": t_mib, "kernel_mib": k_mib,
               "unfused_ms": u_ms, "unfused_mib": u_mib, "grad_mib": grad_mib}
        results["logprobs"].append(row)
        pct = f"{100 * k_mib / t_mib:.1f}" if t_mib and k_mib else "-"
        pct_minus = f"{100 * (k_mib - grad_mib) / (t_mib - grad_mib):.1f}" if t_mib and k_mib else "-"
        speed = f"{t_ms / k_ms:.2f}x" if t_ms and k_ms else "-"
        fmt = lambda x: "OOM" if x is None else f"{x:.1f}"  # noqa: E731
        print(f"{n:>6}{fmt(t_ms):>10}{fmt(k_ms):>11}{fmt(t_mib):>11}{fmt(k_mib):>12}{pct:>7}{pct_minus:>9}{speed:>9}"
              f"{fmt(u_ms):>12}{fmt(u_mib):>13}")
        del hidden, weight

    print(f"sampling, fp32 logits, V={v}: (temperature 1, top_p 0.95) and (+ top_k 50)")
    print(f"{'B':>5}{'filters':>10}{'sort ms':>9}{'kernel ms':>11}{'speedup':>9}{'kernel GB/s':>13}")
    for b in (1, 64, 256) if quick else (1, 16, 64, 256, 512):
        logits = torch.randn(b, v, device=device) * 3
        for top_k in (0, 50):
            s_ms, _ = _cuda_measure(lambda: sort_sample(logits, 1.0, 0.95, top_k))
            k_ms, _ = _cuda_measure(lambda: sample(logits, 1.0, top_p=0.95, top_k=top_k))
            gbps = b * v * 4 / (k_ms * 1e-3) / 1e9
            results["sampling"].append({"b": b, "top_k": top_k, "sort_ms": s_ms, "kernel_ms": k_ms, "read_gbps": gbps})
            print(f"{b:>5}{'p' if not top_k else 'p+k':>10}{s_ms:>9.3f}{k_ms:>11.3f}{s_ms / k_ms:>8.2f}x{gbps:>13.0f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--child", choices=["naive", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=8192, help=argparse.SUPPRESS)
    parser.add_argument("--v", type=int, default=49152, help=argparse.SUPPRESS)
    parser.add_argument("--d", type=int, default=576, help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads per variant (1: on a shared machine, OpenMP barriers stall"
                        " many-small-op code far more than one big GEMM, which distorts the comparison)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(cpu_child(args.child, args.n, args.v, args.d, args.chunk, args.threads)))
        return
    if torch.cuda.is_available():
        summary = {"bench": "kernels", "device": "cuda", **cuda_bench(args.quick)}
    else:
        summary = {"bench": "kernels", "device": "cpu", **cpu_bench(args.quick, args.threads)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
