"""bench/rollout_tail.py --smoke runs in CI: its JSON lines are complete and sane (partial rollouts keep
the running batch fuller and need fewer decode steps per trained group than sync steps)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_prints_sane_figures():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout_tail.py"), "--smoke"], check=True,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    *_, sync_line, partial_line, last = out.stdout.strip().splitlines()
    sync, partial, summary = json.loads(sync_line), json.loads(partial_line), json.loads(last)
    assert (sync["mode"], partial["mode"], summary["bench"]) == ("sync", "partial", "rollout_tail")
    for r in (sync, partial):
        assert r["groups_trained"] == 8 * r["steps_counted"]  # every step trains its groups
        assert 0 < r["occupancy"] <= 1 and r["modelled_gpu_s_per_group"] > 0
        assert abs(r["tokens_per_decode_step"] - 32 * r["occupancy"]) < 1e-6
    assert partial["occupancy"] > sync["occupancy"]
    assert summary["decode_steps_per_group_ratio"] > 1 and summary["modelled_gpu_time_ratio"] > 1
