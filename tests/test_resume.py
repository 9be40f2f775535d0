"""Resume is exact: a run killed with SIGKILL mid-step and resumed logs the same metrics afterwards
as a run that was never interrupted (same seed, CPU), each step once, also when the kill came after a
step's metrics were written but before its checkpoint was. Also: the checkpoint loads in transformers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_utils import tiny_model

from cir.model import save_pretrained
from cir.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
DETERMINISTIC = ("reward/mean", "accuracy", "tools/calls_per_response", "response/length_mean",
                 "train/grad_norm", "train/pg_loss", "train/clip_frac", "train/entropy", "train/lr",
                 "train/num_loss_tokens")


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with the real SmolLM2 tokenizer (fast, yet a real checkpoint directory)."""
    tok = load_tokenizer(smollm2_dir)
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_model(seed=0, vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_ids)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    save_pretrained(model, path, tokenizer=tok)
    return path


def train_cmd(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "cpu-small.yaml"),
            "--model.path", str(model_dir), "--train.output_dir", str(out), "--train.steps", "4",
            "--train.save_every", "1", "--train.keep_last", "2", "--train.prompts_per_step", "2",
            "--rollout.n", "3", "--rollout.max_response_tokens", "16", "--rollout.prompt_mode", "raw",
            "--engine.show_progress", "false",
            "--rl.filter_groups", "false",  # random weights have no signal: update anyway, so resume restores Adam
            *extra]


def metrics(out: Path) -> dict[int, dict]:
    rows = {}
    for line in open(out / "metrics.jsonl"):
        row = json.loads(line)
        assert row["step"] not in rows, f"step {row['step']} logged twice in {out / 'metrics.jsonl'}"
        rows[row["step"]] = {k: row[k] for k in DETERMINISTIC}
    return rows


def logged_steps(out: Path, name: str) -> list[int]:
    return [json.loads(line)["step"] for line in open(out / name)] if (out / name).exists() else []


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_metrics(small_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(small_model_dir, straight), check=True, env=env, capture_output=True, timeout=600)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(small_model_dir, killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while 3 not in logged_steps(killed, "metrics.jsonl"):  # step 3 logged: its checkpoint is being written
        assert proc.poll() is None, "the run ended before its third step"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: trainer, sandbox server, verifier workers
    proc.wait()
    assert not (killed / "checkpoints" / "step_000003").exists(), "killed too late: step 3's save had ended"
    subprocess.run(train_cmd(small_model_dir, killed, "--resume"), check=True, env=env, capture_output=True,
                   timeout=600)

    a, b = metrics(straight), metrics(killed)  # each step once
    assert sorted(b) == [1, 2, 3, 4]
    samples = logged_steps(killed, "samples.jsonl")
    assert samples == sorted(samples) and set(samples) == {1, 2, 3, 4}
    assert all(samples.count(s) == samples.count(1) for s in (2, 3, 4))
    for step in (3, 4):
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["step_000003", "step_000004"]  # keep_last 2, no .tmp left behind


def test_checkpoint_model_loads_in_transformers(small_model_dir, tmp_path):
    transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")
    out = tmp_path / "run"
    subprocess.run(train_cmd(small_model_dir, out, "--train.steps", "1"), check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=600)
    ckpt = out / "checkpoints" / "step_000001" / "model"
    ours = tiny_model(seed=0, vocab_size=load_tokenizer(small_model_dir).vocab_size)
    ours.load_state_dict({k: v for k, v in _load(ckpt).items()})
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids)).abs().max() < 1e-4
    assert (out / "config.yaml").exists() and (out / "samples.jsonl").exists()
    assert list(out.glob("*.png")), "train.py draws the curves at the end"


def _load(ckpt: Path) -> dict:
    from cir.model import from_pretrained

    return from_pretrained(ckpt).state_dict()
