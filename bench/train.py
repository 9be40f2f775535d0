"""One RL step, timed: training tokens/s, the split of a step's time, MFU on GPU.

    python bench/train.py                                   # CPU: SmolLM2-135M, the embedded default
    python bench/train.py --steps 3 --prompts 4 --n 4 --max-tokens 256
    torchrun --nproc_per_node=8 bench/train.py --config configs/cir-qwen2.5-math-7b.yaml --model.path ...

Runs the real trainer (engine rollouts, sandbox calls, rewards, the policy update) for a few steps
and reports, per step after the first (warm-up): seconds in generation / waiting on the sandbox /
reward / training, rollout tokens/s, training tokens/s and, on CUDA, the training MFU
(6 x parameters x tokens / time / peak bf16 FLOP/s). The last line is one JSON object.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and not __package__:
    # As `python bench/train.py` the script's folder comes first on sys.path, where bench/kernels.py
    # would shadow the `kernels` package: run again as the module bench.train, repo root on the path.
    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = os.pathsep.join(p for p in (_root, os.environ.get("PYTHONPATH")) if p)
    os.execve(sys.executable, [sys.executable, "-m", "bench.train", *sys.argv[1:]], {**os.environ, "PYTHONPATH": _path})

import argparse
import json
import statistics
import tempfile

import torch

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: configs/default.yaml)")
    parser.add_argument("--steps", type=int, default=3, help="steps to run; the first is warm-up")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=192)
    args, overrides = parser.parse_known_args()
    from cir.config import load_config
    from cir.rl.trainer import Trainer

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tempfile.mkdtemp(prefix="cir-bench-train-")
    config = load_config(args.config or os.path.join(root, "configs", "default.yaml"), [
        "--train.steps", str(args.steps), "--train.prompts_per_step", str(args.prompts), "--rollout.n", str(args.n),
        "--rollout.max_response_tokens", str(args.max_tokens), "--train.save_every", "0",
        "--train.output_dir", out, "--engine.show_progress", "false", *overrides,
    ])
    trainer = Trainer(config)
    rows = []
    try:
        for _ in range(args.steps):
            rows.append(trainer.train_step())
    finally:
        trainer.close()
    timed = rows[1:] or rows
    keys = ["time/generate", "time/sandbox_wait", "time/reward", "time/train", "time/rollout"]
    split = {k: statistics.mean(r[k] for r in timed) for k in keys}
    rollout_tps = statistics.mean(r["throughput/rollout_tokens_per_s"] for r in timed)
    train_tps = statistics.mean(r["throughput/train_tokens_per_s"] for r in timed)
    device = trainer.device
    num_params = sum(p.numel() for p in trainer.model.parameters())
    mfu = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        mfu = 6 * num_params * train_tps / peak if peak else None
    step_s = split["time/rollout"] + split["time/train"]
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{where}, {num_params / 1e6:.0f}M parameters, {args.prompts} prompts x {args.n} samples, "
          f"<= {args.max_tokens} tokens, mean of {len(timed)} step(s) after warm-up")
    print(f"{'part':<22}{'seconds':>10}{'share':>9}")
    for name, key in [("generation", "time/generate"), ("  of which sandbox wait", "time/sandbox_wait"),
                      ("reward", "time/reward"), ("training", "time/train")]:
        print(f"{name:<22}{split[key]:>10.2f}{split[key] / step_s:>9.0%}")
    print(f"rollout {rollout_tps:.1f} tokens/s, training {train_tps:.1f} tokens/s"
          + (f", MFU {mfu:.1%}" if mfu is not None else ""))
    print(json.dumps({"device": where, "params": num_params, "split_s": split, "step_s": step_s,
                      "rollout_tokens_per_s": rollout_tps, "train_tokens_per_s": train_tps, "mfu": mfu}))
    os._exit(0)


if __name__ == "__main__":
    main()
