"""Golden trajectories of the engine: fixed seeds across the engine's configurations (chunked prefill,
preemption, prefix sharing, n > 1, tools, exact mode, autocast, the padded CUDA-graph feed run eagerly).

    PYTHONPATH=$PWD python tests/engine_golden.py          # print each case's digest
    PYTHONPATH=$PWD python tests/engine_golden.py --write  # rewrite tests/data/engine_golden.json

Each case's digest is the sha256 of its exact trajectories (tokens, loss masks, behaviour log-probs as
float hex, finish reasons, tool counts) and the engine's step statistics. The stored digests were
recorded from the engine before its step was reorganised as schedule -> run -> postprocess;
tests/test_engine_golden.py checks that every later engine gives the same bits.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys

import torch
# tests/ is on sys.path: the folder of a script run as a script, and pytest puts it there too
from engine_utils import ByteTokenizer, tiny_model
from test_engine_stress import stress_rollout

from cir.engine import Engine, EngineConfig, SamplingParams

PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "engine_golden.json")
TOK = ByteTokenizer()
STAT_KEYS = ("num_steps", "num_generated_tokens", "num_preemptions", "num_prefix_cache_hit_tokens")


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def digest(trajs, stats: dict) -> str:
    rows = [(t.prompt_index, t.sample_index, t.response_ids, t.loss_mask, [float(x).hex() for x in t.logprobs],
             t.finish_reason, t.num_tool_calls, t.num_tool_successes) for t in trajs]
    data = json.dumps([rows, [stats[k] for k in STAT_KEYS]], separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


def _engine(model, **config) -> Engine:
    config = {"block_size": 4, "num_kv_blocks": 256, "show_progress": False, **config}
    return Engine(model, TOK, EngineConfig(**config))


def random_model_case(seed: int, exact: bool = False, autocast: bool = False):
    """A tiny random model under a random schedule (the shapes of tests/test_decode_state.py)."""
    rng = random.Random(seed)
    n = rng.randint(1, 3)
    engine = _engine(tiny_model(seed=seed), num_kv_blocks=rng.choice([20, 28, 40, 200]),
                     max_num_seqs=rng.choice([4, 16]), max_num_batched_tokens=rng.choice([6, 16, 512]),
                     enable_prefix_caching=rng.random() < 0.7, seed=seed)
    if exact:
        engine.model.set_batch_invariant(True)
    shared = [rng.randrange(256) for _ in range(rng.choice([0, 9]))]  # a prefix shared across prompts
    prompts = [shared + [rng.randrange(256) for _ in range(rng.randint(1, 12))] for _ in range(rng.randint(1, 6))]
    params = SamplingParams(temperature=rng.choice([1.0, 0.7, 0.0]), top_p=rng.choice([1.0, 0.9]),
                            top_k=rng.choice([0, 20]), max_tokens=rng.randint(1, 40), ignore_eos=rng.random() < 0.3)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        trajs = engine.generate(prompts, params, n=n)
    return trajs, engine.stats


def tools_case(seed: int, padded_graphs: bool = False):
    """The scripted model with tool calls under a random schedule (tests/test_engine_stress.py), sampled."""
    trajs, stats, _ = stress_rollout(seed, 1.0, padded_graphs)
    return trajs, stats


def fixed_case(name: str):
    if name == "chunked_n3":
        engine = _engine(tiny_model(num_kv_heads=1), max_num_batched_tokens=24)
        trajs = engine.generate(_prompts([1, 5, 16, 17, 38], 0), SamplingParams(temperature=1.0, max_tokens=10), n=3)
    elif name == "preempt_prefix_n3":
        shared = _prompts([13], 0)[0]
        prompts = [shared + tail for tail in _prompts([3, 6, 9, 2], 2)]
        engine = _engine(tiny_model(seed=1), num_kv_blocks=14, max_num_batched_tokens=32)
        trajs = engine.generate(prompts, SamplingParams(temperature=1.0, max_tokens=14, ignore_eos=True), n=3)
    elif name == "tight_pool_budget_8":
        engine = _engine(tiny_model(seed=11), seed=5, num_kv_blocks=10, max_num_batched_tokens=8)
        trajs = engine.generate(_prompts([6, 13, 3, 21], 12), SamplingParams(temperature=1.0, max_tokens=12), n=3)
    elif name == "exact_n2":
        engine = _engine(tiny_model(seed=7), max_num_batched_tokens=16)
        engine.model.set_batch_invariant(True)
        trajs = engine.generate(_prompts([4, 11, 7], 8), SamplingParams(temperature=1.0, max_tokens=12), n=2)
    else:
        raise KeyError(name)
    return trajs, engine.stats


CASES = {
    **{name: (fixed_case, (name,)) for name in ("chunked_n3", "preempt_prefix_n3", "tight_pool_budget_8", "exact_n2")},
    **{f"random_{s}": (random_model_case, (s,)) for s in range(10)},
    **{f"random_exact_{s}": (random_model_case, (s, True)) for s in (20, 21)},
    **{f"random_autocast_{s}": (random_model_case, (s, False, True)) for s in (30,)},
    **{f"tools_{s}": (tools_case, (s,)) for s in range(14)},
    **{f"tools_graphs_{s}": (tools_case, (s, True)) for s in (0, 3, 6)},
}


def run_case(name: str) -> dict:
    """The case's digest and what it exercised (so the test can check the coverage claimed above)."""
    make, args = CASES[name]
    trajs, stats = make(*args)
    return {"sha256": digest(trajs, stats), "num_preemptions": stats["num_preemptions"],
            "num_prefix_cache_hit_tokens": stats["num_prefix_cache_hit_tokens"],
            "num_tool_calls": sum(t.num_tool_calls for t in trajs),
            "max_samples": 1 + max(t.sample_index for t in trajs)}


def main() -> None:
    digests = {name: run_case(name) for name in CASES}
    for name, value in digests.items():
        print(f"{name:<24}{json.dumps(value)}")
    if "--write" in sys.argv:
        with open(PATH, "w") as f:
            f.write("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in digests.items()) + "\n}")
            f.write("\n")
        print("wrote", PATH)


if __name__ == "__main__":
    main()
