"""Where one decode step's time goes at 256 running sequences: host work, the forward, sampling.

    python bench/decode_profile.py                    # CPU: tiny random model, the host work alone
    python bench/decode_profile.py --prompts 16 --n 16 --max-tokens 64 --top 25

The engine runs a code-integrated rollout (tools on, an executor that answers at once) of
--prompts x --n sequences, all running together; every decode step that has all of them is profiled.
The engine is timed from outside: its methods are wrapped by timers for the run and restored after
(nothing in the engine knows about this bench), each timer counting its *exclusive* time (a wrapped
call inside another is charged to its own part only). Names that no longer exist after a refactor
are skipped and listed under "missing"; their time shows up as host "other". The parts:

    schedule      Scheduler.schedule (block accounting included)
    inputs        ModelRunner.run: the step's host arrays and tensors, the attention context, the rows
                  to sample
    seeds         the per-draw seeds (sequence_seed) and the sampler's per-row parameter columns
    bookkeeping   Scheduler.postprocess: reading the sampled tokens back, _on_sampled, the decode
                  state's advance, share, finishing, writing a decode state back (drop_decode)
    stop_fence    incremental detokenisation and the closing-fence scan (the EOS check is inline
                  in _on_sampled: it counts as bookkeeping)
    tools         submitting tool calls and collecting sandbox results
    other         the rest of the step (the generate loop itself, and whatever is not wrapped)
    forward       the model's forward_hidden + compute_logits (on CUDA synchronised: device time)
    sampler       the sampling kernel (cir_kernels.sample)

host = every part but forward and sampler. On CPU with the tiny model the forward and the sampler
are small and the host work is what is measured; the same function runs on CUDA from bench/gpu.py,
where the device parts are synchronised: that undoes the engine's overlap of step t+1's launch with
step t's bookkeeping, so the parts add up to a serial step (an upper bound of the overlapped one).
Python function calls per step are counted in a second run (sys.setprofile 'call' events of the
engine's code, this file's timers excluded). Timers cost ~1 us per wrapped call: the step time of an
unwrapped run is reported too (`step_ms_unwrapped`), the difference is the profile's own overhead.
Prints a table, then one JSON line (`host_ms_per_step`, `python_calls_per_step`, `split_ms`).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/decode_profile.py` the script's folder comes first on sys.path, where bench/kernels.py
    # would shadow the `kernels` package: run again as the module bench.decode_profile, repo root on the path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.decode_profile", *sys.argv[1:]],
              {**os.environ, "PYTHONPATH": _path})

import argparse
import cProfile
import functools
import importlib
import inspect
import io
import json
import pstats
import time
from collections import defaultdict
from concurrent.futures import Future

import torch

HOST_PARTS = ("schedule", "inputs", "seeds", "bookkeeping", "stop_fence", "tools", "other")
DEVICE_PARTS = ("forward", "sampler")
# (part, "module:Owner.attr" or "module:function"), looked up where the engine looks them up.
TIMED = [
    ("schedule", "cir.engine.scheduler:Scheduler.schedule"),
    ("inputs", "cir.engine.model_runner:ModelRunner.run"),
    ("inputs", "cir.engine.model_runner:ModelRunner._step_inputs"),
    ("inputs", "cir.engine.model_runner:ModelRunner._decode_inputs"),
    ("inputs", "cir.engine.model_runner:ModelRunner._forward_eager"),
    ("inputs", "cir.engine.model_runner:ModelRunner._sampling_rows"),
    ("inputs", "cir.engine.model_runner:ModelRunner.forward"),
    ("inputs", "cir.engine.kv_cache:KVCache.context"),
    ("inputs", "cir.engine.kv_cache:KVCache.copy_blocks"),
    ("inputs", "cir.engine.model_runner:ModelRunner._to_device"),
    ("seeds", "cir.engine.model_runner:ModelRunner.sample"),
    ("seeds", "cir.engine.model_runner:sequence_seed"),
    ("seeds", "cir.engine.model_runner:sequence_seeds"),
    ("bookkeeping", "cir.engine.scheduler:Scheduler.postprocess"),
    ("bookkeeping", "cir.engine.scheduler:Scheduler._read_pending"),
    ("bookkeeping", "cir.engine.scheduler:Scheduler._on_sampled"),
    ("bookkeeping", "cir.engine.launched_step:LaunchedStep.read"),
    ("bookkeeping", "cir.engine.launched_step:LaunchedStep.launch"),
    ("bookkeeping", "cir.engine.decode_state:DecodeState.advance"),
    ("bookkeeping", "cir.engine.scheduler:Scheduler.drop_decode"),
    ("bookkeeping", "cir.engine.scheduler:Scheduler.finish"),
    ("bookkeeping", "cir.engine.scheduler:Scheduler.retire"),
    ("bookkeeping", "cir.engine.block_manager:BlockManager.share"),
    ("stop_fence", "cir.engine.tools:SegmentDecoder.push"),
    ("stop_fence", "cir.engine.tools:SegmentDecoder.extend"),
    ("stop_fence", "cir.engine.scheduler:find_closed_code"),
    ("stop_fence", "cir.engine.scheduler:scan_start_hint"),
    ("tools", "cir.engine.engine:Engine._collect_tool_results"),
    ("tools", "cir.engine.engine:Engine._submit"),
    ("forward", "cir.model.transformer:Transformer.forward_hidden"),
    ("forward", "cir.model.transformer:Transformer.compute_logits"),
    ("forward", "cir.engine.cuda_graphs:DecodeGraphs.run"),
    ("forward", "cir.engine.model_runner:ModelRunner.exact_logprobs"),
    ("sampler", "cir.engine.model_runner:sample"),
]
STEP_BOUNDARY = "cir.engine.scheduler:Scheduler.schedule"  # one call per engine step
GENERATE = "cir.engine.engine:Engine.generate"


def _resolve(spec: str):
    """(owner object, attribute name, raw attribute) of "module:Owner.attr", or None if missing."""
    module_name, _, path = spec.partition(":")
    try:
        owner = importlib.import_module(module_name)
    except ImportError:
        return None
    *owners, name = path.split(".")
    for part in owners:
        owner = getattr(owner, part, None)
        if owner is None:
            return None
    try:
        raw = inspect.getattr_static(owner, name)
    except AttributeError:
        return None
    func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    if not callable(func) or isinstance(raw, property):
        return None
    return owner, name, raw


class _Patches:
    """Attributes replaced for one run, restored on exit (even when the run fails)."""

    def __init__(self):
        self.saved: list[tuple[object, str, object]] = []

    def wrap(self, spec: str, make_wrapper) -> bool:
        found = _resolve(spec)
        if found is None:
            return False
        owner, name, raw = found
        if any(o is owner and n == name for o, n, _ in self.saved):
            return True  # already wrapped (e.g. the step boundary is also a timed part)
        func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
        wrapped = functools.wraps(func)(make_wrapper(func))
        if isinstance(raw, (staticmethod, classmethod)):
            wrapped = type(raw)(wrapped)
        self.saved.append((owner, name, raw))
        setattr(owner, name, wrapped)
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for owner, name, raw in reversed(self.saved):
            setattr(owner, name, raw)
        self.saved.clear()


class StepProfile:
    """Exclusive time per part, per engine step; a step runs from one schedule() call to the next."""

    def __init__(self, sync=None, num_seqs: int = 0):
        self.sync = sync  # called around device parts (torch.cuda.synchronize on CUDA)
        self.num_seqs = num_seqs  # a step is kept when it decodes exactly this many sequences
        self.stack: list[list] = []  # [part, start, seconds in wrapped children]
        self.parts: dict[str, float] = defaultdict(float)
        self.step_start: float | None = None
        self.step_is_full_decode = False
        self.steps: list[dict] = []  # per kept step: {"total": s, part: s, "calls": n}
        self.num_calls = 0  # Python 'call' events (when counting)

    def timed(self, part: str, func):
        device = part in DEVICE_PARTS

        def timer(*args, **kwargs):
            if device and self.sync is not None:
                self.sync()
            self.stack.append([part, time.perf_counter(), 0.0])
            try:
                return func(*args, **kwargs)
            finally:
                if device and self.sync is not None:
                    self.sync()
                part_, start, children = self.stack.pop()
                elapsed = time.perf_counter() - start
                self.parts[part_] += elapsed - children
                if self.stack:
                    self.stack[-1][2] += elapsed
        return timer

    def boundary(self, func, timed: bool = True):
        """Wraps Scheduler.schedule: closes the previous step, classifies the one it schedules (and
        times it as the "schedule" part when `timed`)."""
        if timed:
            func = self.timed("schedule", func)

        def schedule(*args, **kwargs):
            self.close_step()
            self.step_start = time.perf_counter()
            self.step_calls = self.num_calls
            batch = func(*args, **kwargs)
            num_tokens = list(getattr(batch, "num_tokens", []))
            self.step_is_full_decode = len(num_tokens) == self.num_seqs and all(n == 1 for n in num_tokens)
            return batch
        return schedule

    def close_step(self) -> None:
        if self.step_start is not None and self.step_is_full_decode:
            step = dict(self.parts)
            step["total"] = time.perf_counter() - self.step_start
            step["calls"] = self.num_calls - self.step_calls
            self.steps.append(step)
        self.parts = defaultdict(float)
        self.step_start = None

    def generate_wrapper(self, func):
        def generate(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            finally:
                self.close_step()  # the last step ends with generate
        return generate


class _InstantExecutor:
    """An executor that answers every snippet at once (the sandbox is not what is profiled)."""

    def submit(self, code: str) -> Future:
        from cir_sandbox import Result

        future = Future()
        future.set_result(Result(status="ok", stdout="0"))
        return future


def run_profiled(engine, prompts: list[list[int]], params, n: int, tools, mode: str,
                 sync=None) -> tuple[StepProfile, list[str]]:
    """One generate call under the profile. mode: "plain" (step boundaries + device parts only),
    "split" (every part), "calls" (step boundaries + a Python call counter)."""
    profile = StepProfile(sync=sync, num_seqs=len(prompts) * n)
    missing = []
    with _Patches() as patches:
        boundary = functools.partial(profile.boundary, timed=mode == "split")
        if not patches.wrap(STEP_BOUNDARY, boundary) or not patches.wrap(GENERATE, profile.generate_wrapper):
            raise RuntimeError(f"bench/decode_profile.py: {STEP_BOUNDARY} or {GENERATE} is gone; update STEP_BOUNDARY")
        for part, spec in TIMED:
            if mode == "calls" or (mode == "plain" and part not in DEVICE_PARTS):
                continue
            if not patches.wrap(spec, functools.partial(profile.timed, part)):
                missing.append(spec)
        if mode == "calls":
            here = __file__

            def count(frame, event, arg):
                if event == "call" and frame.f_code.co_filename != here:
                    profile.num_calls += 1
            sys.setprofile(count)
        try:
            engine.generate(prompts, params, n=n, tools=tools)
        finally:
            sys.setprofile(None)
    return profile, missing


def _mean(steps: list[dict], key: str) -> float:
    return sum(s.get(key, 0.0) for s in steps) / max(len(steps), 1)


def profile_decode(engine, prompts: list[list[int]], n: int, max_tokens: int, sync=None, top: int = 0,
                   repeats: int = 3) -> dict:
    """The decode-step profile of `engine` over len(prompts) x n sequences (see the module docstring).
    Each figure is the best (lowest) of `repeats` runs' per-step means: on a shared machine the minimum
    is what survives other people's load."""
    from cir.engine import SamplingParams, ToolConfig

    tools = ToolConfig(_InstantExecutor(), max_calls=2)
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens, ignore_eos=True)
    # warm-up
    engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True), n=n, tools=tools)
    runs = {"plain": [], "split": [], "calls": []}
    for _ in range(repeats):
        for mode in runs:
            profile, missing = run_profiled(engine, prompts, params, n, tools, mode, sync)
            if not profile.steps:
                raise RuntimeError(f"no decode step ran all {len(prompts) * n} sequences at once "
                                   f"(max_num_seqs is {engine.config.max_num_seqs})")
            runs[mode].append(profile.steps)
            if mode == "split":
                split_missing = missing

    def best(mode: str, key: str) -> float:
        return min(_mean(steps, key) for steps in runs[mode])

    ms = {part: 1e3 * best("split", part) for part in HOST_PARTS + DEVICE_PARTS if part != "other"}
    step_ms = 1e3 * best("split", "total")
    ms["other"] = max(step_ms - sum(ms.values()), 0.0)
    plain_host = min(_mean(steps, "total") - sum(_mean(steps, p) for p in DEVICE_PARTS) for steps in runs["plain"])
    result = {
        "num_seqs": len(prompts) * n, "num_steps": len(runs["split"][0]), "repeats": repeats, "step_ms": step_ms,
        "host_ms_per_step": sum(ms[p] for p in HOST_PARTS), "step_ms_unwrapped": 1e3 * best("plain", "total"),
        "host_ms_unwrapped": 1e3 * plain_host, "python_calls_per_step": best("calls", "calls"),
        "split_ms": ms, "missing": split_missing,
    }
    if top:
        result["top"] = _top_functions(engine, prompts, params, n, tools, top)
    return result


def _top_functions(engine, prompts, params, n, tools, top: int) -> list[dict]:
    """cProfile of a whole generate call: the functions with the most own time, per decode step."""
    profiler = cProfile.Profile()
    profiler.enable()
    engine.generate(prompts, params, n=n, tools=tools)
    profiler.disable()
    num_steps = max(engine.stats.get("num_steps", 1), 1)
    stats = pstats.Stats(profiler, stream=io.StringIO())
    rows = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        rows.append({"function": f"{os.path.relpath(file) if file.startswith('/') else file}:{line}({name})",
                     "calls_per_step": ncalls / num_steps, "own_ms_per_step": 1e3 * tottime / num_steps,
                     "cum_ms_per_step": 1e3 * cumtime / num_steps})
    return sorted(rows, key=lambda r: -r["own_ms_per_step"])[:top]


def tiny_model(vocab_size: int = 257, max_len: int = 1024):
    """A 2-layer random model whose forward costs little next to the host work of a step."""
    from cir.model.config import ModelConfig
    from cir.model.transformer import Transformer

    return Transformer(ModelConfig(
        model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=None, max_position_embeddings=max_len, tie_word_embeddings=False, attention_bias=False,
        qk_norm=False, bos_token_id=None, eos_token_id=[256], pad_token_id=None))


def random_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab_size, 256), (num_prompts, prompt_len), generator=g).tolist()


def print_table(result: dict) -> None:
    ms = result["split_ms"]
    print(f"decode step of {result['num_seqs']} sequences, best of {result['repeats']} runs' means over "
          f"{result['num_steps']} steps: {result['step_ms']:.2f} ms ({result['step_ms_unwrapped']:.2f} ms unwrapped)")
    print(f"{'part':<14}{'ms/step':>9}{'share':>8}")
    for part in HOST_PARTS + DEVICE_PARTS:
        print(f"{part:<14}{ms[part]:>9.3f}{ms[part] / result['step_ms']:>8.1%}")
    print(f"{'host':<14}{result['host_ms_per_step']:>9.3f}   ({result['host_ms_unwrapped']:.3f} unwrapped); "
          f"{result['python_calls_per_step']:.0f} Python calls per step")
    if result["missing"]:
        print("not found (time counted as other):", ", ".join(result["missing"]))
    for row in result.get("top", []):
        print(f"  {row['own_ms_per_step']:8.3f} ms {row['calls_per_step']:8.1f} calls  {row['function']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=16, help="samples per prompt (prompts x n sequences run at once)")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64, help="decode steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode; the best per-step mean is kept")
    parser.add_argument("--top", type=int, default=0, help="also list the N functions with the most own time")
    args = parser.parse_args()
    from bench.models import ByteTokenizer
    from cir.engine import Engine, EngineConfig

    torch.manual_seed(0)
    model = tiny_model(max_len=args.prompt_len + args.max_tokens + 16)
    num_seqs = args.prompts * args.n
    blocks_per_seq = -(-(args.prompt_len + args.max_tokens) // 16) + 1
    engine = Engine(model, ByteTokenizer(), EngineConfig(max_num_seqs=num_seqs, num_kv_blocks=num_seqs * blocks_per_seq,
                                                         block_size=16, show_progress=False))
    result = profile_decode(engine, random_prompts(args.prompts, args.prompt_len, model.config.vocab_size),
                            args.n, args.max_tokens, top=args.top, repeats=args.repeats)
    print(f"CPU, {torch.get_num_threads()} torch threads, tiny random model (2 layers, D 64, V 257)")
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
