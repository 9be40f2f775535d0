"""torchrun on CPU (gloo): DDP and FSDP2 updates keep ranks identical and equal a 1-rank run."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_utils import tiny_model

WORKER = Path(__file__).with_name("dist_worker.py")


def launch(out: Path, parallel: str, nproc: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent), "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER)]
    proc = subprocess.run(cmd + ["--parallel", parallel, "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{parallel} x{nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("dist")
    launch(out, "ddp", 1)
    return torch.load(out / "weights_ddp_w1_r0.pt")


def assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"{what}: weights differ by {worst:.2e}"


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank(parallel, reference, tmp_path):
    launch(tmp_path, parallel, 2)
    rank0 = torch.load(tmp_path / f"weights_{parallel}_w2_r0.pt")
    assert_same(rank0, reference, f"{parallel} 2 ranks vs 1 rank")
    if parallel == "ddp":  # replicated: both ranks hold a full copy
        assert_same(torch.load(tmp_path / "weights_ddp_w2_r1.pt"), rank0, "ddp rank 1 vs rank 0")
    initial = tiny_model(seed=0).state_dict()
    moved = max((rank0[k] - initial[k]).abs().max().item() for k in rank0)
    assert moved > 1e-3, "the updates did not change the weights: the comparison would be vacuous"
