"""Every GPU figure in one short run: one JSON object per part as it goes, then a summary line.

    python bench/gpu.py                         # CUDA, random-weight models of published shapes, <= 420 s
    python bench/gpu.py --budget-s 600 --parts rollout,sampler
    python bench/gpu.py --smoke                 # every part at tiny shapes on CPU, < 60 s (CI runs it)

Parts (the H200 run's table, then the figures added since):
    rollout          Qwen2.5-1.5B shape, 256 sequences x 256 tokens: ours with CUDA graphs, eager, and
                     transformers `generate` on the same weights (tokens/s)
    paged_attention  decode attention, 28 q / 4 kv heads, D 128, block 16, context 8k, B 1 / 32 / 256:
                     fraction of the HBM peak (bench/paged_attention.py)
    sampler          `cir_kernels.sample` vs a torch sort sampler, V 152064, top-p 0.95, B 1 and 256
    linear_logprobs  fwd + bwd vs the naive [N, V] path, D 3584, V 152064, N 4k..32k: time, peak memory
    rl_step          one RL step of the real trainer, 1.5B shape, bf16 params, 128 x 256 tokens:
                     rollout tokens/s, training tokens/s and MFU
    update           the policy update alone, fp32 masters + bf16 autocast and bf16 params: MFU, split
                     (bench/train.py --update's functions, 32k tokens, 16k-token micro-batches)
    decode_context   decode steps at contexts 1k-5k vs the weights + KV bytes bound (bench/generate.py)
    exact_mode       behaviour vs training log-prob mismatch (bf16, 12.8k tokens), and the cost of
                     `Transformer.set_batch_invariant(True)` when the model has it (bench/exact.py)
    decode_profile   where a 256-sequence decode step's time goes (bench/decode_profile.py)

Models are built directly on the device with random weights (bench/models.py): no network, no GGUF,
no checkpoint. Each part runs in a forked child with a time limit, min(its cap, the budget left);
a part that fails, runs out of time or is skipped says so in its JSON and the suite goes on. Parts'
own output goes to stderr; stdout carries only the JSON lines. MFU counts 6 x parameters x tokens
(attention FLOPs left out) against the bf16 dense peak.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/gpu.py` the script's folder comes first on sys.path, where bench/kernels.py
    # would shadow the `kernels` package: run again as the module bench.gpu, repo root on the path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.gpu", *sys.argv[1:]], {**os.environ, "PYTHONPATH": _path})

import argparse
import functools
import json
import multiprocessing
import tempfile
import time
import traceback
from importlib import metadata
from types import SimpleNamespace

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


class Ctx:
    """What a part needs to know: smoke or not, the device, the model shapes and dtypes to use."""

    def __init__(self, smoke: bool):
        self.smoke = smoke
        self.device = torch.device("cpu" if smoke else "cuda")
        self.dtype = torch.float32 if smoke else torch.bfloat16

    def model(self, shape: str, dtype: torch.dtype | None = None):
        from bench.models import random_model, tiny_shape

        return random_model(tiny_shape(shape) if self.smoke else shape, dtype or self.dtype, self.device)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def pick(self, smoke, gpu):
        return smoke if self.smoke else gpu

    def mfu(self, flops_per_s: float) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        return flops_per_s / peak if peak else None


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, min(vocab, 256), (n, length), generator=gen).tolist()


# ---- parts ----------------------------------------------------------------------------------------
def part_rollout(c: Ctx) -> dict:
    from bench.generate import run_hf, run_ours
    from bench.models import ByteTokenizer, hf_twin
    from cir.engine import Engine, EngineConfig, SamplingParams

    model = c.model("qwen2.5-1.5b")
    num_prompts, n, prompt_len, max_tokens = c.pick((2, 2, 8, 4), (16, 16, 128, 256))
    prompts = _prompts(num_prompts, prompt_len, model.config.vocab_size)
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    out = {"shape": "qwen2.5-1.5b", "sequences": num_prompts * n, "max_tokens": max_tokens}
    for name, graphs in (("graphs", True), ("eager", False)):
        if graphs and c.device.type != "cuda":
            out["graphs_tokens_per_s"] = None  # CUDA graphs are CUDA only
            continue
        engine = Engine(model, ByteTokenizer(), EngineConfig(max_num_seqs=num_prompts * n, cuda_graphs=graphs,
                                                             show_progress=False, kv_cache_memory_gb=0.25))
        run_ours(engine, prompts, SamplingParams(max_tokens=4, ignore_eos=True), n)  # warm-up, graph capture
        seconds, tokens, _ = run_ours(engine, prompts, params, n)
        out[f"{name}_tokens_per_s"] = tokens / seconds
        engine.release()
        del engine
    ref = hf_twin(model)
    args = SimpleNamespace(n=n, concurrency=num_prompts * n, max_tokens=max_tokens, temperature=1.0)
    if not c.smoke:
        run_hf(ref, ByteTokenizer(), prompts[:1], SimpleNamespace(**{**vars(args), "max_tokens": 2}), {0})  # warm-up
    never = {model.config.vocab_size}  # an EOS id outside the vocabulary: every row runs to the end
    seconds, tokens = run_hf(ref, ByteTokenizer(), prompts, args, never)
    out["transformers_tokens_per_s"] = tokens / seconds
    best = out.get("graphs_tokens_per_s") or out["eager_tokens_per_s"]
    out["speedup_vs_transformers"] = best / out["transformers_tokens_per_s"]
    return out


def part_paged_attention(c: Ctx) -> dict:
    from bench.paged_attention import measure_decode

    if c.smoke:
        rows = measure_decode([(2, 64)], (4, 2), 16, 16, torch.float32, c.device)
    else:
        rows = measure_decode([(1, 8192), (32, 8192), (256, 8192)], (28, 4), 128, 16, torch.bfloat16, c.device,
                              impls=("triton", "flash_attn"))
    return {"heads": c.pick("4q/2kv", "28q/4kv"), "block_size": 16, "rows": rows}


def _time_ms(c: Ctx, fn) -> float:
    from bench.paged_attention import time_ms

    return time_ms(fn, c.device)


def part_sampler(c: Ctx) -> dict:
    from bench.kernels import sort_sample
    from cir_kernels import sample

    vocab = c.pick(512, 152064)
    rows = []
    for batch in c.pick((1, 4), (1, 256)):
        logits = torch.randn(batch, vocab, device=c.device) * 3
        ours = _time_ms(c, functools.partial(sample, logits, 1.0, top_p=0.95))
        sort = _time_ms(c, functools.partial(sort_sample, logits, 1.0, 0.95, 0))
        rows.append({"batch": batch, "vocab": vocab, "sample_ms": ours, "torch_sort_ms": sort, "speedup": sort / ours})
    return {"top_p": 0.95, "rows": rows}


def _peak_mib(c: Ctx, fn) -> float | None:
    if c.device.type != "cuda":
        return None
    c.sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(c.device)
    before = torch.cuda.memory_allocated(c.device)
    fn()
    c.sync()
    return (torch.cuda.max_memory_allocated(c.device) - before) / 2**20


def _logprobs_step(f, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, grad: torch.Tensor):
    """One fwd+bwd of `f(hidden, weight, targets)` against `grad`, clearing the input grads first."""
    def run():
        hidden.grad = weight.grad = None
        (f(hidden, weight, targets) * grad).sum().backward()
    return run


def part_linear_logprobs(c: Ctx) -> dict:
    from bench.kernels import naive_logprobs
    from cir_kernels import linear_logprobs

    d, v = c.pick((32, 512), (3584, 152064))
    rows = []
    for num in c.pick((64,), (4096, 8192, 16384, 32768)):
        hidden = torch.randn(num, d, device=c.device, dtype=c.dtype, requires_grad=True)
        weight = (torch.randn(v, d, device=c.device) * 0.02).to(c.dtype).requires_grad_()
        targets = torch.randint(0, v, (num,), device=c.device)
        grad = torch.randn(num, device=c.device)
        row = {"n": num, "d": d, "v": v}
        for name, f in (("naive", naive_logprobs), ("kernel", linear_logprobs)):
            try:
                row[f"{name}_mib"] = _peak_mib(c, _logprobs_step(f, hidden, weight, targets, grad))
                row[f"{name}_ms"] = _time_ms(c, _logprobs_step(f, hidden, weight, targets, grad))
            except torch.OutOfMemoryError:
                row[f"{name}_mib"] = row[f"{name}_ms"] = None
        if row["naive_ms"] and row["kernel_ms"]:
            row["time_vs_naive"] = row["kernel_ms"] / row["naive_ms"]
        if row["naive_mib"] and row["kernel_mib"]:
            row["memory_vs_naive"] = row["kernel_mib"] / row["naive_mib"]
        rows.append(row)
        del hidden, weight
    return {"dtype": str(c.dtype).removeprefix("torch."), "rows": rows}


def _trainer(c: Ctx, model, out_dir: str, overrides: list[str]):
    from bench.models import ByteTokenizer
    from cir.config import load_config
    from cir.rl.trainer import Trainer

    data = os.path.join(out_dir, "data.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps({"problem": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n" for i in range(64))
    config = load_config(None, [
        "--train.data", data, "--train.output_dir", os.path.join(out_dir, "run"), "--train.save_every", "0",
        "--rollout.tool_budget", "{0: 0}", "--engine.show_progress", "false", *overrides])
    return Trainer(config, model=model, tokenizer=ByteTokenizer())


def part_rl_step(c: Ctx) -> dict:
    from bench.models import num_params

    prompts, n, tokens = c.pick((2, 2, 4), (8, 16, 256))
    model = c.model("qwen2.5-1.5b")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = _trainer(c, model, tmp, [
            "--train.prompts_per_step", str(prompts), "--rollout.n", str(n), "--rollout.max_response_tokens",
            str(tokens), "--model.dtype", "bfloat16" if c.dtype == torch.bfloat16 else "float32", "--train.steps", "2",
            "--rl.filter_groups", "false"])  # random weights earn no reward: train on the zero advantages anyway
        try:
            trainer.train_step()  # warm-up
            m = trainer.train_step()
        finally:
            trainer.close()
    train_tps = m["throughput/train_tokens_per_s"]
    return {"sequences": prompts * n, "max_response_tokens": tokens, "params": num_params(model),
            "rollout_tokens_per_s": m["throughput/rollout_tokens_per_s"], "train_tokens_per_s": train_tps,
            "train_mfu": c.mfu(6 * num_params(model) * train_tps), "seconds_rollout": m["time/rollout"],
            "seconds_train": m["time/train"], "update_skipped": bool(m.get("train/skipped", 0.0))}


def part_update(c: Ctx) -> dict:
    from bench.train import bench_update, model_config, trajectory_batch  # bench/train.py --update's own

    shape, tokens, micro = c.pick(("tiny", 1024, 512), ("qwen2.5-1.5b", 32768, 16384))
    trajs, rewards = trajectory_batch(tokens, model_config(shape).vocab_size, max_response=c.pick(128, 4096),
                                      prompt_range=c.pick((20, 100), (100, 400)))
    rows = [bench_update(shape, precision, False, micro, trajs, rewards, c.device, steps=1)
            for precision in ("fp32-autocast", "bf16")]
    return {"shape": shape, "micro_tokens": micro, "rows": rows}


def part_decode_context(c: Ctx) -> dict:
    """256 sequences at the paper's response lengths, KV pool from free memory: step time vs its bound."""
    from bench.long_decode import long_decode

    model = c.model("qwen2.5-1.5b")
    return {"shape": "qwen2.5-1.5b", **long_decode(model, num_seqs=c.pick(4, 256), contexts=c.pick((32,), (1024, 4096)),
                                                   steps=16, kv_cache_memory_gb=c.pick(0.05, 4.0))}


def part_exact_mode(c: Ctx) -> dict:
    from bench.exact import measure
    from cir.engine import EngineConfig
    from cir.model.transformer import Transformer

    if not hasattr(Transformer, "set_batch_invariant"):
        return {"skipped": "Transformer.set_batch_invariant does not exist"}
    model = c.model("qwen2.5-1.5b")
    prompts, n, prompt_len, tokens = c.pick((2, 2, 8, 8), (25, 2, 128, 256))
    rows = measure(model, num_prompts=prompts, n=n, prompt_len=prompt_len, max_tokens=tokens,
                   engine_config=EngineConfig(show_progress=False, kv_cache_memory_gb=0.25))
    return {"tokens": prompts * n * tokens, "mismatch_default": {k: rows["off"][k] for k in (
        "logprob_gap_mean", "logprob_gap_max", "outside_clip_frac")}, **rows}


def part_decode_profile(c: Ctx) -> dict:
    from bench.decode_profile import profile_decode, random_prompts
    from bench.models import ByteTokenizer
    from cir.engine import Engine, EngineConfig

    model = c.model("qwen2.5-1.5b")
    prompts, n, tokens = c.pick((2, 4, 3), (16, 16, 32))
    engine = Engine(model, ByteTokenizer(), EngineConfig(max_num_seqs=prompts * n, show_progress=False,
                                                         kv_cache_memory_gb=0.25))
    return profile_decode(engine, random_prompts(prompts, 64, model.config.vocab_size), n, tokens,
                          sync=c.sync if c.device.type == "cuda" else None, repeats=1)


PARTS = {  # name: (function, cap in seconds on GPU)
    "rollout": (part_rollout, 90), "paged_attention": (part_paged_attention, 30), "sampler": (part_sampler, 30),
    "linear_logprobs": (part_linear_logprobs, 60), "rl_step": (part_rl_step, 90), "update": (part_update, 60),
    "decode_context": (part_decode_context, 60), "exact_mode": (part_exact_mode, 60),
    "decode_profile": (part_decode_profile, 30),
}
SMOKE_CAP_S = 20
SMOKE_PREIMPORTS = ("transformers", "cir_kernels", "cir.engine", "cir.rl.trainer", "bench.models", "bench.generate",
                    "bench.decode_profile", "bench.exact", "bench.kernels", "bench.paged_attention", "bench.train")


# ---- the runner -----------------------------------------------------------------------------------
def _child(name: str, smoke: bool, conn) -> None:
    os.dup2(2, 1)  # the part's own prints go to stderr: stdout is for the JSON lines
    sys.stdout = sys.stderr
    try:
        conn.send({"result": PARTS[name][0](Ctx(smoke))})
    except BaseException as e:  # noqa: BLE001 -- reported, never raised: the suite goes on
        conn.send({"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]})
    finally:
        conn.close()


def run_part(name: str, smoke: bool, timeout: float) -> dict:
    """The part in a forked child, killed after `timeout` seconds; its JSON object."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(name, smoke, child), daemon=True)
    start = time.perf_counter()
    proc.start()
    child.close()
    message = None
    try:
        if parent.poll(timeout):
            message = parent.recv()
    except EOFError:  # the child died before it could answer
        pass
    proc.join(timeout=5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    out = {"part": name, "seconds": round(time.perf_counter() - start, 2)}
    if message is None:
        out["error"] = (f"timed out after {timeout:.0f}s" if proc.exitcode in (None, -9)
                        and time.perf_counter() - start >= timeout else f"died with exit code {proc.exitcode}")
    elif "error" in message:
        out.update(error=message["error"], traceback=message["traceback"])
    else:
        out.update(message["result"])
    return out


def versions() -> dict:
    out = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("triton", "transformers", "flash-attn"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=420.0, help="total wall time of all parts")
    parser.add_argument("--smoke", action="store_true", help="every part at tiny shapes on CPU (CI)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset, in this order")
    args = parser.parse_args()
    names = [p for p in args.parts.split(",") if p]
    unknown = [p for p in names if p not in PARTS]
    if unknown:
        parser.error(f"unknown parts {unknown}; known: {', '.join(PARTS)}")
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
        torch.set_num_threads(1)  # tiny shapes gain nothing from more; on a shared CPU threads spin (see conftest)
        for module in SMOKE_PREIMPORTS:  # imported once here, shared by the forked children
            __import__(module)
    elif not torch.backends.cuda.is_built():  # a build flag: no CUDA call
        parser.error(f"torch {torch.__version__} is built without CUDA: run with --smoke for the CPU version")
    # On CUDA the parent touches no CUDA API until every part has run: a CUDA driver initialised
    # before a fork is unusable in the child. A CUDA build on a machine without a GPU finds out in
    # the first part (each part then reports the error).
    start = time.perf_counter()
    status = {}
    for name in names:
        left = args.budget_s - (time.perf_counter() - start)
        cap = SMOKE_CAP_S if args.smoke else PARTS[name][1]
        if left < min(cap, 10):
            out = {"part": name, "skipped": f"budget spent ({left:.0f}s left)"}
        else:
            out = run_part(name, args.smoke, min(cap, left))
        status[name] = "error" if "error" in out else "skipped" if "skipped" in out else "ok"
        print(json.dumps(out, default=str), flush=True)
        print(f"# {name}: {status[name]} in {out.get('seconds', 0)}s", file=sys.stderr, flush=True)
    try:
        device = "cpu" if args.smoke else torch.cuda.get_device_name()
    except (RuntimeError, AssertionError) as e:
        device = f"no CUDA device ({e})"
    print(json.dumps({"summary": True, "device": device, "smoke": args.smoke, **versions(),
                      "budget_s": args.budget_s, "seconds": round(time.perf_counter() - start, 2), "parts": status}),
          flush=True)


if __name__ == "__main__":
    main()
