"""Mutation check of the Triton kernels: apply hand-written plausible bugs, one at a time, to a copy of
the repository and confirm that the kernel tests fail on each.

    python tests/mutation_check.py                   # every mutant; a markdown table, then one JSON line
    python tests/mutation_check.py --only sampler,paged    # the mutants whose names start with these

Each mutant is a string replacement in one file of cir_kernels/ (it must occur exactly once); the copy
lives in a temporary directory and the tests run there (`python -m pytest -x`, its own PYTHONPATH), so
the working tree is never touched. The unmutated copy runs first (each test list must pass); a mutant
is caught when pytest fails; the first failing test is reported. Exit status 1 when a mutant survives.
Not part of the normal test run (an hour on a loaded 2-core machine: the interpreter runs a mutant's
kernel tests until the first failure).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the Triton-path tests, cheapest catchers first (pytest runs them in this order and stops at a failure)
SAMPLER_TESTS = [f"tests/test_kernels_sampling.py::{name}" for name in (
    "test_temperature_rows_have_stated_power", "test_filtered_rows_have_stated_power",
    "test_mixed_rows_have_stated_power", "test_split_rows_have_stated_power", "test_greedy_and_mixed_rows",
    "test_same_seed_same_tokens_and_rows_independent", "test_triton_draw_does_not_depend_on_block_size",
    "test_split_thresholds_are_exact", "test_passes_a_row_does_not_need_change_nothing")]
LOGPROB_TESTS = ["tests/test_kernels_logprobs.py"]
PAGED_TESTS = ["tests/test_paged_attention.py"]
BMM_TESTS = ["tests/test_exact_mode.py::test_triton_bmm_rows_and_batches_are_invariant",
             "tests/test_exact_mode.py::test_cuda_path_under_the_interpreter",
             "tests/test_exact_mode.py::test_attention_over_many_key_tiles_same_bits_in_every_path"]

# (name, file, old, new, what the bug is, tests)
MUTANTS = [
    ("sampler-race-no-temperature", "sampling_race.py",
     'score = tl.where(valid & (x >= threshold), x * inv_t + gumbel(seed, start, BLOCK), float("-inf"))',
     'score = tl.where(valid & (x >= threshold), x + gumbel(seed, start, BLOCK), float("-inf"))',
     "the race ignores the temperature (`x * inv_t + gumbel` -> `x + gumbel`)", SAMPLER_TESTS),
    ("sampler-buffer-race-no-temperature", "sampling_race.py",
     "x * inv_t + gumbel_at(seed, index)", "x + gumbel_at(seed, index)",
     "the race over buffered tokens ignores the temperature", SAMPLER_TESTS),
    ("sampler-temperature-10pct", "sampling_state.py",
     "inv_t = 1.0 / tl.where(is_greedy, 1.0, temperature)", "inv_t = 1.0 / tl.where(is_greedy, 1.0, 1.1 * temperature)",
     "temperature off by 10% (stats and refine passes)", SAMPLER_TESTS),
    ("sampler-logprob-no-temperature", "sampling_race.py",
     "(x_token - m) * inv_t - log_s", "(x_token - m) - log_s",
     "the returned log-prob without the temperature", SAMPLER_TESTS),
    ("sampler-gumbel-is-exponential", "sampling_race.py",
     "    return -tl.log(-tl.log(u))\n\n\n@triton.jit\ndef gumbel_at",
     "    return -tl.log(u)\n\n\n@triton.jit\ndef gumbel_at",
     "the noise is -log U instead of Gumbel's -log(-log U)", SAMPLER_TESTS),
    ("sampler-top-k-off-by-one", "sampling_select.py",
     "reached = tl.where(phase == 0, count >= top_k, mass >= target)",
     "reached = tl.where(phase == 0, count >= top_k + 1, mass >= target)",
     "top-k keeps k - 1 tokens", SAMPLER_TESTS),
    ("sampler-top-p-mass-3pct", "sampling_triton.py",
     "top_p * s, hi_start, top_p, need_p)", "top_p * s * 0.97, hi_start, top_p, need_p)",
     "the top-p target mass 3% low (rows without top-k)", SAMPLER_TESTS),
    ("sampler-top-p-after-top-k-mass", "sampling_select.py",
     "target = tl.where(start, top_p * mass_lo, target)", "target = tl.where(start, top_p * mass_lo * 1.03, target)",
     "top-p after top-k: target mass 3% high", SAMPLER_TESTS),
    ("sampler-min-p-halved", "sampling_race.py",
     "tl.minimum(m + tl.log(min_p) / inv_t, m)", "tl.minimum(m + tl.log(0.5 * min_p) / inv_t, m)",
     "min-p halved in the race's floor", SAMPLER_TESTS),
    ("sampler-row-reads-row-0-top-k", "sampling_state.py",
     "top_k = tl.load(top_k_ptr + row)", "top_k = tl.load(top_k_ptr)",
     "every row reads row 0's top_k", SAMPLER_TESTS),
    ("sampler-merge-loses-chunk", "sampling_race.py",
     "    ok = sp < num_splits\n    pbest", "    ok = sp < num_splits - 1\n    pbest",
     "the merge of a row's race drops its last chunk", SAMPLER_TESTS),
    ("sampler-split-sum-no-temperature", "sampling_triton.py",
     "s = tl.sum(ps * tl.exp((pm - m_safe) * inv_t), axis=0)", "s = tl.sum(ps * tl.exp(pm - m_safe), axis=0)",
     "chunks' sums merged without the temperature", SAMPLER_TESTS),
    ("logprobs-rescale-drops-w-term", "logprobs_triton.py",
     "w = a * tl.where(s > 0.0, w + (m - m_safe) * s, 0.0)", "w = a * tl.where(s > 0.0, w, 0.0)",
     "online entropy term not shifted when the max moves", LOGPROB_TESTS),
    ("logprobs-forward-no-temperature", "logprobs_triton.py",
     '.to(tl.float32) * inv_t\n        m_new', '.to(tl.float32)\n        m_new',
     "row kernel reads logits without 1 / T", LOGPROB_TESTS),
    ("logprobs-grad-entropy-sign", "logprobs_triton.py",
     "dz -= tl.load(grad_entropy_ptr + row)", "dz += tl.load(grad_entropy_ptr + row)",
     "entropy gradient with the wrong sign", LOGPROB_TESTS),
    ("logprobs-grad-no-temperature", "logprobs_triton.py",
     "tl.store(out_ptr + row * out_row_stride + offs, (dz * inv_t)",
     "tl.store(out_ptr + row * out_row_stride + offs, (dz)",
     "logit gradient without the 1 / T chain factor", LOGPROB_TESTS),
    ("linear-lse-gemm-padding-counted", "linear_logprobs_triton.py",
     'z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))', "z = acc * inv_t",
     "the forward GEMM counts padding columns (z = 0) in the log-sum-exp", LOGPROB_TESTS),
    ("linear-lse-merge-drops-shift", "linear_logprobs_triton.py",
     "w_i + (m_i - m_safe) * s_i", "w_i",
     "vocabulary splits merged without shifting w", LOGPROB_TESTS),
    ("linear-dz-target-offset", "linear_logprobs_triton.py",
     "is_t = (cols[None, :] + col_start) == t[:, None]", "is_t = cols[None, :] == t[:, None]",
     "dz GEMM marks the target without the chunk's column offset", LOGPROB_TESTS),
    ("linear-dz-group-order", "linear_logprobs_triton.py",
     "pid_m = first_m + (pid % group_size)", "pid_m = first_m + (pid % GROUP_M)",
     "dz GEMM's grouped tile order wrong for a short last group", LOGPROB_TESTS),
    ("linear-target-logit-no-temperature", "linear_logprobs_triton.py",
     "tl.sum(acc, axis=0) * inv_t", "tl.sum(acc, axis=0)",
     "the target's logit without 1 / T", LOGPROB_TESTS),
    ("paged-causal-off-by-one", "paged_attention_triton.py",
     "visible = (offs_n[None, :] <= q_pos[:, None])", "visible = (offs_n[None, :] < q_pos[:, None])",
     "a query does not see its own key", PAGED_TESTS),
    ("paged-scale-not-base-2", "paged_attention_triton.py",
     "scale * math.log2(math.e),", "scale,",
     "softmax in base 2 without the log2(e) factor", PAGED_TESTS),
    ("paged-combine-base-e", "paged_attention_triton.py",
     "w = tl.exp2(lse - m)", "w = tl.exp(lse - m)",
     "split combine weights in base e for base-2 lse", PAGED_TESTS),
    ("paged-split-length-floor", "paged_attention_triton.py",
     "split_len = tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), MIN_SPLIT_LEN)",
     "split_len = tl.maximum(seq_len // NUM_SPLITS, MIN_SPLIT_LEN)",
     "KV split length rounded down: the tail tokens are dropped", PAGED_TESTS),
    ("paged-gqa-head", "paged_attention_triton.py",
     "head = kv_head * GROUP + offs_m % GROUP", "head = kv_head + offs_m % GROUP",
     "wrong query head for a kv head (GQA)", PAGED_TESTS),
    ("paged-store-kv-skips-no-token", "paged_attention_triton.py",
     "    if slot < 0:\n        return\n", "    if slot < 1:\n        return\n",
     "store_kv skips slot 0 too", PAGED_TESTS),
    ("bmm-last-k-dropped", "batch_invariant_triton.py",
     "mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)",
     "mask=(rows[:, None] < M) & (k[None, :] < K - 1), other=0.0)",
     "the last K column of a dropped", BMM_TESTS),
    ("bmm-batch-stride-ignored", "batch_invariant_triton.py",
     "b_base = b_ptr + batch * b_stride_b", "b_base = b_ptr",
     "every batch reads b's first matrix", BMM_TESTS),
]


def _copy_repo(dst: Path) -> None:
    for name in ("cir", "cir_kernels", "cir_sandbox", "tests"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pytest.ini", "setup.py"):
        shutil.copy2(ROOT / name, dst / name)


def run_mutant(file: str | None, old: str, new: str, tests: list[str], timeout: float) -> tuple[bool, str, float]:
    """(caught, first failing test or why not, seconds). file None: the unmutated copy (the baseline)."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        dst = Path(tmp)
        _copy_repo(dst)
        if file is not None:
            path = dst / "cir_kernels" / file
            source = path.read_text()
            if source.count(old) != 1:
                raise SystemExit(f"error: mutant text occurs {source.count(old)} times in cir_kernels/{file}: {old!r}")
            path.write_text(source.replace(old, new))
        env = {**os.environ, "PYTHONPATH": str(dst), "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
        start = time.time()
        try:
            result = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                    cwd=dst, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:.0f} s", time.time() - start
        seconds = time.time() - start
        if result.returncode == 0:
            return False, "every test passed", seconds
        failed = re.search(r"^(?:FAILED|ERROR) (.+?)(?: - |$)", result.stdout, re.M)
        return True, failed.group(1) if failed else f"pytest exit {result.returncode}", seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated name prefixes of the mutants to run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per mutant")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test list")
    args = parser.parse_args()
    selected = [m for m in MUTANTS if m[0].startswith(tuple(args.only.split(",")))]
    if not args.no_baseline:  # a failure is a catch only if the tests pass on the code as it is
        for tests in {tuple(m[5]) for m in selected}:
            caught, by, _ = run_mutant(None, "", "", list(tests), args.timeout)
            if caught:
                raise SystemExit(f"error: the unmutated tests fail ({by}): fix them first")
    rows = []
    print("| mutant | file | bug | caught by | s |\n|---|---|---|---|---|", flush=True)
    for name, file, old, new, what, tests in selected:
        caught, by, seconds = run_mutant(file, old, new, tests, args.timeout)
        rows.append({"mutant": name, "file": file, "caught": caught, "by": by, "seconds": round(seconds, 1)})
        print(f"| {name} | cir_kernels/{file} | {what} | {'`' + by + '`' if caught else 'NOT CAUGHT: ' + by} "
              f"| {seconds:.0f} |", flush=True)
    survivors = [r["mutant"] for r in rows if not r["caught"]]
    print(json.dumps({"mutants": len(rows), "caught": len(rows) - len(survivors), "survivors": survivors}))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
