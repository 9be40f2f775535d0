"""Benchmark of cir_kernels/: fused masked log-probs and sampling against plain torch baselines.

    python bench/kernels.py            # CUDA: Qwen2.5-7B shapes; CPU: the torch reference's memory
    python bench/kernels.py --quick    # smaller shapes (a smoke run)
    python bench/kernels.py --sampler-only   # the sampler section alone (CPU: ~5 min, most in the interpreter)
    (it re-runs itself as `python -m bench.kernels`, so that its name does not shadow `kernels`)

CUDA (bf16 hidden/weight, D = 3584, V = 152064):
  log-probs fwd+bwd, N = 4096 .. 32768: `linear_logprobs` vs the baseline full logits -> float ->
  log_softmax -> gather; time = triton.testing.do_bench median (20/80 % quantiles), memory = peak
  torch.cuda allocation during one fwd+bwd minus the allocation before it (inputs excluded, the two
  gradients included in both; "-grads %" compares what is left without them); "unfused" is
  `linear_logprobs(fused=False)`, cuBLAS into fp32 chunks + Triton row kernels (the earlier path).
  sampling, fp32 N(0, 3^2) logits, V = 152064, B = 1 .. 512: `sample` vs `sort_sample` (sort + cumsum +
  exponential race) for top-p 0.95, top-p 0.95 + top-k 50 and temperature only; the kernel with
  numbers as parameters (passes of unused filters skipped) and with CUDA tensors (the engine's
  call: every launch, rows exit early); refine passes per row; read GB/s, and for temperature only
  the % of a measured device copy's bandwidth (HBM read + write).
CPU (float32, N = 8192, V = 49152, D = 576): each variant runs in its own process; its peak extra
  memory = the process's peak resident set (VmHWM, reset through /proc/self/clear_refs once the
  inputs exist) minus its resident set at that moment, over one fwd+bwd; time = the second of two runs,
  on --threads torch threads (default 1).
  sampling: the torch path's time (`sample` on CPU = `sample_reference`, and `sort_sample`), and the
  Triton kernel under TRITON_INTERPRET=1 in a child process at V = 152064 (and on SmolLM2 logits when
  the model is converted): refine passes per row and whether the token is in the reference's kept set.
Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import functools
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
    os.execve(sys.executable, [sys.executable, "-m", "bench.kernels", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": _path})

import torch  # noqa: E402

from cir_kernels import linear_logprobs, sample  # noqa: E402

MIB = 1 << 20


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (hidden @ weight.t()).float()  # (N, V)
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def sort_sample(logits: torch.Tensor, temperature: float, top_p: float,
                top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _fwd_bwd(f, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor):
    """One fwd+bwd of `f(hidden, weight, targets)` against `grad`."""
    return lambda: (f(hidden, weight, targets) * grad).sum().backward()


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
        t_ms, t_mib = _cuda_measure(_fwd_bwd(naive_logprobs, hidden, weight, targets, grad), [hidden, weight])
        k_ms, k_mib = _cuda_measure(_fwd_bwd(linear_logprobs, hidden, weight, targets, grad), [hidden, weight])
        # the path before the fused GEMMs: cuBLAS into fp32 chunks + the Triton row kernels
        unfused = functools.partial(linear_logprobs, fused=False)
        u_ms, u_mib = _cuda_measure(_fwd_bwd(unfused, hidden, weight, targets, grad), [hidden, weight])
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

    results["sampling"] = sampler_cuda(quick)
    return results


# ---------------------------------------------------------------- sampler
SAMPLER_VOCAB = 152064
SAMPLER_CASES = (("top-p", 0.95, 0), ("top-p+k", 0.95, 50), ("temp-only", 1.0, 0))  # (name, top_p, top_k)


def race_sample(logits: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-only sampling in plain torch without a sort (gpt-fast): argmax p / Exp(1)."""
    logprobs_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    tokens = (logprobs_all.exp() / torch.empty_like(logprobs_all).exponential_()).argmax(dim=-1)
    return tokens, logprobs_all.gather(1, tokens[:, None]).squeeze(1)


def _refine_passes(logits: torch.Tensor, top_p: float, top_k: int) -> list[int]:
    from cir_kernels.sampling_triton import sample_triton
    from cir_kernels._checks import prepare_sampling

    params = prepare_sampling(logits, 1.0, top_p, top_k, 0.0)
    seeds = torch.arange(logits.shape[0], device=logits.device)
    may_filter = (top_k > 0, top_p < 1, False)
    return sample_triton(logits, *params, seeds, may_filter=may_filter, return_passes=True)[2].tolist()


def _copy_gbps() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy: the HBM bandwidth reached."""
    import triton.testing

    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def sampler_cuda(quick: bool) -> dict:
    v = SAMPLER_VOCAB
    copy = _copy_gbps()
    print(f"sampling, fp32 N(0, 3^2) logits, V={v}, temperature 1; device copy {copy:.0f} GB/s (read + write)")
    print(f"{'B':>5}{'case':>11}{'sort ms':>9}{'kernel ms':>11}{'speedup':>9}{'tensors ms':>12}{'passes':>9}"
          f"{'read GB/s':>11}{'% copy':>8}")
    rows = []
    for b in (1, 256) if quick else (1, 16, 64, 256, 512):
        logits = torch.randn(b, v, device="cuda") * 3
        seeds = torch.arange(b, device="cuda") * 7919 + 1  # per-row seeds, as the engine passes them
        for name, top_p, top_k in SAMPLER_CASES:
            s_ms, _ = _cuda_measure(functools.partial(sort_sample, logits, 1.0, top_p, top_k))
            k_ms, _ = _cuda_measure(functools.partial(sample, logits, 1.0, top_p=top_p, top_k=top_k, generator=seeds))
            t, p, mp = (torch.full((b,), x, device="cuda") for x in (1.0, top_p, 0.0))
            k = torch.full((b,), top_k, dtype=torch.int64, device="cuda")
            t_ms, _ = _cuda_measure(functools.partial(sample, logits, t, top_p=p, top_k=k, min_p=mp, generator=seeds))
            passes = _refine_passes(logits, top_p, top_k) if top_p < 1 or top_k else [0]
            gbps = b * v * 4 / (k_ms * 1e-3) / 1e9
            row = {"b": b, "case": name, "sort_ms": s_ms, "kernel_ms": k_ms, "speedup": s_ms / k_ms,
                   "tensor_params_ms": t_ms, "passes_mean": sum(passes) / len(passes), "passes_max": max(passes),
                   "read_gbps": gbps, "pct_of_copy": 100 * gbps / copy}
            if name == "temp-only":
                r_ms, _ = _cuda_measure(functools.partial(race_sample, logits, 1.0))
                row["torch_race_ms"] = r_ms
            rows.append(row)
            print(f"{b:>5}{name:>11}{s_ms:>9.3f}{k_ms:>11.3f}{s_ms / k_ms:>8.2f}x{t_ms:>12.3f}"
                  f"{row['passes_mean']:>9.2f}{gbps:>11.0f}{row['pct_of_copy']:>7.0f}%")
    return {"vocab": v, "copy_gbps": copy, "rows": rows}


def _median_seconds(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def sampler_interpret_child(quick: bool) -> dict:
    """In a TRITON_INTERPRET=1 process: the Triton sampler on full-size rows, checked against the
    reference's kept set; refine passes per row."""
    from cir_kernels.sampling_triton import sample_triton
    from cir_kernels._checks import prepare_sampling
    from cir_kernels.sampling_reference import keep_mask

    inputs = [("N(0, 3^2)", torch.randn(1, SAMPLER_VOCAB, generator=torch.Generator().manual_seed(0)) * 3)]
    model_dir = os.path.expanduser("~/.cache/cir/SmolLM2-135M-Instruct")
    if not quick and os.path.isdir(model_dir):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
        text = "Question: what is 17 * 23? Let's compute step by step. 17 * 23 = 17 * 20 + 17 * 3 = 340 + 51 = 391."
        with torch.no_grad():
            logits = model(**tok(text, return_tensors="pt")).logits[0]
        inputs.append(("SmolLM2", logits[[5, 20]].contiguous()))  # mid-question, mid-arithmetic
    rows = []
    for label, logits in inputs:
        for name, top_p, top_k in SAMPLER_CASES[:2]:
            params = prepare_sampling(logits, 1.0, top_p, top_k, 0.0)
            start = time.perf_counter()
            tokens, _, passes = sample_triton(logits, *params, torch.arange(logits.shape[0]) + 11,
                                              may_filter=(top_k > 0, True, False), return_passes=True)
            seconds = time.perf_counter() - start
            kept = keep_mask(logits, torch.logsumexp(logits, 1), params[1], params[2], params[3])
            rows.append({"logits": label, "vocab": logits.shape[1], "case": name, "passes": passes.tolist(),
                         "kept": kept.sum(1).tolist(), "token_kept": bool(kept.gather(1, tokens[:, None]).all()),
                         "interpreter_s": seconds})
    return {"rows": rows}


def sampler_cpu(quick: bool) -> dict:
    v = SAMPLER_VOCAB
    torch.manual_seed(0)
    print(f"sampling on CPU, fp32 N(0, 3^2) logits, V={v}, 1 thread: the torch path (the GPU figures are owed)")
    print(f"{'B':>5}{'case':>11}{'sample ms':>11}{'sort_sample ms':>16}")
    rows = []
    for b in (1,) if quick else (1, 16):
        logits = torch.randn(b, v) * 3
        for name, top_p, top_k in SAMPLER_CASES:
            ours = _median_seconds(functools.partial(sample, logits, 1.0, top_p=top_p, top_k=top_k)) * 1e3
            sort = _median_seconds(functools.partial(sort_sample, logits, 1.0, top_p, top_k)) * 1e3
            rows.append({"b": b, "case": name, "sample_ms": ours, "sort_sample_ms": sort})
            print(f"{b:>5}{name:>11}{ours:>11.2f}{sort:>16.2f}")
    cmd = [sys.executable, "-m", "bench.kernels", "--sampler-interpret"] + (["--quick"] if quick else [])
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=REPO_ROOT, env=env).stdout
    interpret = json.loads(out.strip().splitlines()[-1])
    print("Triton sampler under TRITON_INTERPRET=1: refine passes per row (the row is also read by the stats pass,"
          " and by the race pass unless the last refine pass was the buffer's, which races)")
    for r in interpret["rows"]:
        print(f"  {r['logits']:>10} V={r['vocab']:<7}{r['case']:>8}: passes {r['passes']}, kept {r['kept']},"
              f" token in kept set {r['token_kept']}, {r['interpreter_s']:.0f} s")
    return {"torch": rows, "interpret": interpret["rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes")
    parser.add_argument("--child", choices=["naive", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--sampler-only", action="store_true", help="only the sampler section")
    parser.add_argument("--sampler-interpret", action="store_true", help=argparse.SUPPRESS)
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
    if args.sampler_interpret:
        print(json.dumps(sampler_interpret_child(args.quick)))
        return
    if args.sampler_only:
        sampling = sampler_cuda(args.quick) if torch.cuda.is_available() else sampler_cpu(args.quick)
        summary = {"bench": "cir_kernels", "device": "cuda" if torch.cuda.is_available() else "cpu",
                   "sampling": sampling}
    elif torch.cuda.is_available():
        summary = {"bench": "cir_kernels", "device": "cuda", **cuda_bench(args.quick)}
    else:
        summary = {"bench": "cir_kernels", "device": "cpu", **cpu_bench(args.quick, args.threads),
                   "sampling": sampler_cpu(args.quick)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
