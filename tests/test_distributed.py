"""torchrun on CPU (gloo): DDP and FSDP2 updates keep ranks identical and equal a 1-rank run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_utils import tiny_model

WORKER = Path(__file__).with_name("dist_worker.py")


def launch(out: Path, parallel: str, nproc: int, agg: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER)]
    proc = subprocess.run(cmd + ["--parallel", parallel, "--agg", agg, "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{parallel} x{nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


AGG = {"ddp": "token_mean", "fsdp": "seq_mean_token_mean"}


def reference(out: Path, agg: str) -> dict:
    launch(out, "ddp", 1, agg)
    return torch.load(out / f"weights_ddp_{agg}_w1_r0.pt")


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"{what}: weights differ by {worst:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank(parallel, tmp_path):
    # each run: a rollout, then 2 updates x 2 mini-batches on data split 6 / 2 groups over the ranks
    agg = AGG[parallel]
    launch(tmp_path, parallel, 2, agg)
    rank0 = torch.load(tmp_path / f"weights_{parallel}_{agg}_w2_r0.pt")
    assert_same(rank0, reference(tmp_path, agg), f"{parallel} ({agg}) 2 ranks vs 1 rank")
    if parallel == "ddp":  # replicated: both ranks hold a full copy
        assert_same(torch.load(tmp_path / f"weights_ddp_{agg}_w2_r1.pt"), rank0, "ddp rank 1 vs rank 0")
    initial = tiny_model(seed=0).state_dict()
    moved = max((rank0[k] - initial[k]).abs().max().item() for k in rank0)
    assert moved > 1e-3, "the updates did not change the weights: the comparison would be vacuous"
