"""Resume in rollout.mode partial is exact: the checkpoints carry the stream (carried sequences, the
prompt source's position, the problems in flight), so a run killed with SIGKILL and resumed logs the
same metrics as one never interrupted, with sequences carried across the checkpoint."""
import os
import signal
import subprocess
import time

import pytest
from test_resume import metrics, small_model_dir, train_cmd  # noqa: F401 (small_model_dir: a fixture)

PARTIAL = ("--rollout.mode", "partial", "--engine.max_num_seqs", "12",
           # chunked prefill (a 64-token budget): groups start decoding at different steps, so some are
           # unfinished when a step has its groups, and carried
           "--engine.max_num_batched_tokens", "64",
           # no sandbox: which groups finish first must not hang on its latency (see cir/rl/partial.py)
           "--rollout.tool_budget", "{0: 0}")
KEYS = ("rollout/decode_steps", "rollout/carried_in", "rollout/carried_out", "staleness/mean", "staleness/max")


def partial_metrics(out):
    import json

    rows = {}
    for line in open(out / "metrics.jsonl"):
        row = json.loads(line)
        rows[row["step"]] = {k: row[k] for k in KEYS}
    return rows


@pytest.mark.slow
def test_sigkill_then_resume_in_partial_mode_gives_the_same_metrics(small_model_dir, tmp_path):  # noqa: F811
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(small_model_dir, straight, *PARTIAL), check=True, env=env, capture_output=True,
                   timeout=600)
    carried = partial_metrics(straight)
    assert carried[3]["rollout/carried_in"] > 0 and carried[2]["rollout/carried_out"] > 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(small_model_dir, killed, *PARTIAL), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "step_000002").exists():
        assert proc.poll() is None, "the run ended before its second checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 not in metrics(killed), "killed too late to test a resume mid-run"
    resumed = subprocess.run(train_cmd(small_model_dir, killed, *PARTIAL, "--resume"), check=True, env=env,
                             capture_output=True, text=True, timeout=600)
    assert "resumed the rollout stream" in resumed.stdout

    a, b = metrics(straight), metrics(killed)
    pa, pb = partial_metrics(straight), partial_metrics(killed)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"
        assert pa[step] == pb[step], f"step {step}: {pa[step]} != {pb[step]}"
