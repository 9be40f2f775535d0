"""The default torch thread count against OMP_NUM_THREADS=1 with a second busy process on the machine.

    python bench/threads.py                  # cir.generate tokens/s, then the main job (python train.py)
    python bench/threads.py --skip-train     # cir.generate only (a minute)

Each measurement runs as its own process while one extra process spins (`while True: pass`), the
situation of a shared machine: "default" leaves the thread count to the program (cir/threads.py),
"OMP=1" sets OMP_NUM_THREADS=1, "torch default" (--torch-default, cir.generate only: it is slow)
passes --threads with the CPU count, which is what torch picks by itself. The load average is
printed with each row (other people's jobs count too). Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Write a long story about a robot who learns to count."


def _env(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    if mode == "OMP=1":
        env["OMP_NUM_THREADS"] = "1"
    return env


def _run(command: list[str], mode: str) -> tuple[float, str, tuple[float, float]]:
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=_env(mode), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return seconds, result.stdout + result.stderr, (load_before, os.getloadavg()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--torch-default", action="store_true",
                        help="also run cir.generate with torch's own thread count (the CPU count)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args()
    modes = ["default", "OMP=1"] + (["torch default"] if args.torch_default else [])
    cpus = len(os.sched_getaffinity(0))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    rows = []
    try:
        time.sleep(2)
        for mode in modes:
            extra = ["--threads", str(cpus)] if mode == "torch default" else []
            seconds, out, load = _run([sys.executable, "-m", "cir.generate", "--prompt", PROMPT, "--no-progress",
                                       "--max-new-tokens", str(args.max_new_tokens), *extra], mode)
            rate = float(re.search(r"\(([\d.]+) tokens/s\)", out).group(1))
            threads = re.search(r"threads: (\d+)", out).group(1)
            rows.append({"job": "cir.generate", "mode": mode, "threads": int(threads), "tokens_per_s": rate,
                         "seconds": round(seconds, 1), "load_before": load[0], "load_after": load[1]})
            print(rows[-1], flush=True)
        if not args.skip_train:
            for mode in ("default", "OMP=1"):
                extra = []
                tag = mode.replace(" ", "_").replace("=", "")
                seconds, out, load = _run([sys.executable, "train.py", "--train.output_dir", f"runs/bench_{tag}",
                                           "--train.overwrite", "true", "--engine.show_progress", "false", *extra],
                                          mode)
                threads = re.search(r"threads: (\d+)", out).group(1)
                held = re.search(r"held-out \(32 problems x 4\): accuracy ([\d.]+) -> ([\d.]+)", out)
                rows.append({"job": "train.py", "mode": mode, "threads": int(threads), "seconds": round(seconds, 1),
                             "held_out_after": float(held.group(2)) if held else None,
                             "load_before": load[0], "load_after": load[1]})
                print(rows[-1], flush=True)
    finally:
        busy.kill()
    print(f"\n{'job':<14}{'mode':<15}{'threads':>8}{'tok/s':>8}{'seconds':>9}{'load':>12}")
    for r in rows:
        print(f"{r['job']:<14}{r['mode']:<15}{r['threads']:>8}{r.get('tokens_per_s', ''):>8}{r['seconds']:>9}"
              f"{r['load_before']:>6.2f}{r['load_after']:>6.2f}")
    print(json.dumps({"cpus": cpus, "busy_processes": 1, "rows": rows}))


if __name__ == "__main__":
    main()
