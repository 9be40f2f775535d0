"""A run directory belongs to one run, checkpoint rotation keeps the checkpoint
just written, and samples.jsonl says which rollouts were right. Tiny model + byte tokenizer, no tools."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from engine_utils import ByteTokenizer, tiny_model

from cir.config import load_config
from cir.errors import UserError
from cir.rl import checkpoint, run_dir
from cir.rl.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = [{"problem": f"{i}+{i}", "answer": str(2 * i), "id": f"p{i}"} for i in range(4)]


class SavingByteTokenizer(ByteTokenizer):
    """The byte tokenizer with the save() a checkpoint calls (it has no files of its own)."""

    def save(self, path) -> None:
        Path(path, "byte_tokenizer.txt").write_text("one token per byte, EOS 256\n")


def config(tmp_path: Path, out: Path, steps: int, *extra: str):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    # the cpu-small settings: save at the last step, keep 1 checkpoint
    return load_config(None, [
        "--train.data", str(data), "--train.output_dir", str(out), "--train.steps", str(steps),
        "--train.prompts_per_step", "2", "--rollout.n", "2", "--rollout.max_response_tokens", "6",
        "--rollout.prompt_mode", "plain", "--rollout.tool_budget", "{0: 0}", "--train.save_every", "2",
        "--train.keep_last", "1", "--engine.num_kv_blocks", "64", "--engine.show_progress", "false",
        "--train.log_samples", "4", *extra])


def train(cfg, resume: bool = False) -> Trainer:
    trainer = Trainer(cfg, resume=resume, model=tiny_model(seed=0), tokenizer=SavingByteTokenizer())
    try:
        trainer.train()
    finally:
        trainer.close()
    return trainer


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]


def checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir())


def test_a_used_run_dir_is_refused_then_overwritten_or_resumed(tmp_path):
    first = tmp_path / "D"
    train(config(tmp_path, first, steps=2))
    assert steps_logged(first) == [1, 2] and checkpoint_names(first) == ["step_000002"]

    # the scenario: a 1-step run into a copy of D, without --resume
    copy = tmp_path / "D-copy"
    shutil.copytree(first, copy)
    with pytest.raises(UserError) as info:
        Trainer(config(tmp_path, copy, steps=1), model=tiny_model(seed=0), tokenizer=SavingByteTokenizer())
    message = str(info.value)
    assert "\n" not in message and f"{copy} holds another run" in message
    assert "1 checkpoint (last step_000002)" in message and "metrics.jsonl" in message
    assert "--resume" in message and "--train.overwrite true" in message
    assert steps_logged(copy) == [1, 2] and checkpoint_names(copy) == ["step_000002"]  # untouched

    # --train.overwrite true: the old run's files go first, so the new checkpoint is the only one
    (copy / "notes.txt").write_text("mine")
    train(config(tmp_path, copy, 1, "--train.overwrite", "true"))
    assert steps_logged(copy) == [1] and checkpoint_names(copy) == ["step_000001"]
    assert (copy / "notes.txt").read_text() == "mine"  # only what a run writes is deleted
    assert checkpoint.latest(copy / "checkpoints").name == "step_000001"

    # --resume continues the run that is there; with --train.overwrite it is a contradiction
    train(config(tmp_path, first, steps=3), resume=True)
    assert steps_logged(first) == [1, 2, 3] and checkpoint_names(first) == ["step_000003"]
    with pytest.raises(UserError, match="choose one"):
        Trainer(config(tmp_path, first, 4, "--train.overwrite", "true"), resume=True, model=tiny_model(),
                tokenizer=SavingByteTokenizer())


def test_samples_say_which_rollouts_were_right(tmp_path):
    out = tmp_path / "run"
    train(config(tmp_path, out, 1, "--train.save_every", "0"))
    rows = [json.loads(line) for line in open(out / "samples.jsonl")]
    answers = {p["id"]: p["answer"] for p in PROBLEMS}
    assert len(rows) == 4
    for row in rows:
        assert row["problem_id"] in answers and row["answer"] == answers[row["problem_id"]]
        assert row["problem"] == next(p["problem"] for p in PROBLEMS if p["id"] == row["problem_id"])
        assert row["reward"] in (-1.0, 1.0)
        assert row["finish_reason"] in ("eos", "length") and row["num_tool_calls"] == 0
        assert row["num_tool_successes"] == 0 and "extracted_answer" in row and isinstance(row["text"], str)
    # the same trajectories' rewards, as the metrics saw them
    reward_mean = json.loads(open(out / "metrics.jsonl").readline())["reward/mean"]
    assert sum(r["reward"] for r in rows) / len(rows) == pytest.approx(reward_mean)


def fake_checkpoints(root: Path, *steps: int) -> None:
    for step in steps:
        (root / f"step_{step:06d}").mkdir(parents=True)


@pytest.mark.parametrize("keep_last, survivors", [(1, [3]), (2, [2, 3]), (3, [1, 2, 3])])
def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path, keep_last, survivors):
    # step_000002 / step_000003 sort after the new step_000001 (another run's): they must not win
    fake_checkpoints(tmp_path, 1, 2, 3)
    deleted = checkpoint.rotate(tmp_path, tmp_path / "step_000001", keep_last)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step_000001"]
    assert sorted(p.name for p in deleted) == ["step_000002", "step_000003"]
    # the usual case: the newest keep_last by step number, the one just written among them
    shutil.rmtree(tmp_path)
    fake_checkpoints(tmp_path, 1, 2, 3)
    (tmp_path / "step_000004.tmp").mkdir()  # a save killed midway is not a checkpoint
    checkpoint.rotate(tmp_path, tmp_path / "step_000003", keep_last)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == [f"step_{s:06d}" for s in survivors]


def test_what_counts_as_another_run(tmp_path):
    assert run_dir.previous_run(tmp_path / "missing") is None
    (tmp_path / "config.yaml").write_text("train: {}\n")
    (tmp_path / "metrics.jsonl").write_text("")  # a run killed before its first step
    assert run_dir.previous_run(tmp_path) is None
    run_dir.claim(tmp_path, resume=False, overwrite=False)
    fake_checkpoints(tmp_path / "checkpoints", 3)
    (tmp_path / "checkpoints" / "step_000004.tmp").mkdir()  # a save killed midway is not a checkpoint
    (tmp_path / "eval.jsonl").write_text('{"step": 5}\n')  # evaluation appends: it would mix too
    assert run_dir.previous_run(tmp_path) == "1 checkpoint (last step_000003), eval.jsonl"
    with pytest.raises(UserError, match="is a file, not a directory"):
        run_dir.claim(tmp_path / "config.yaml", resume=True, overwrite=False)


def test_train_py_refuses_a_used_run_dir_in_one_line(tmp_path):
    """Before the sandbox or the model: the check costs only the imports."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "cpu-small.yaml"),
                           "--train.output_dir", str(tmp_path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {tmp_path} holds another run (metrics.jsonl); continue it with --resume, start over with "
        "--train.overwrite true (deletes its checkpoints and metrics), or choose another --train.output_dir"]


def rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in open(out / name)]


def test_a_resumed_run_logs_each_step_once(tmp_path):
    """A kill after step 3's rows were written but before its checkpoint was (here: step 3's checkpoint
    removed, and a row cut off mid-write): the resume at step 2 redoes step 3, and every file holds each
    step once."""
    out = tmp_path / "run"
    held = ("--train.held_out", "1", "--train.eval_every", "1", "--train.eval_data", f"[{tmp_path / 'p.jsonl'}]")
    train(config(tmp_path, out, 3, "--train.keep_last", "2", *held))
    assert checkpoint_names(out) == ["step_000002", "step_000003"]
    shutil.rmtree(out / "checkpoints" / "step_000003")
    before = {name: rows(out, name) for name in ("metrics.jsonl", "samples.jsonl", "eval.jsonl")}
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward/mean": ')  # SIGKILL during a write: no newline
    assert [r["step"] for r in before["eval.jsonl"]] == [0, 1, 2, 3, 3]  # before RL, one per step, after RL

    train(config(tmp_path, out, 4, "--train.keep_last", "2", *held), resume=True)
    assert steps_logged(out) == [1, 2, 3, 4]
    assert rows(out, "metrics.jsonl")[:2] == before["metrics.jsonl"][:2]  # rows of kept steps untouched
    samples = [r["step"] for r in rows(out, "samples.jsonl")]
    assert samples == sorted(samples) and all(samples.count(s) == 4 for s in (1, 2, 3, 4))
    evals = rows(out, "eval.jsonl")
    held_out = [(r["step"], r["when"]) for r in evals if "held_out" in r]
    assert held_out == [(0, "before RL"), (2, "at step 2 (resumed)"), (4, "after RL")]
    scheduled = [r["step"] for r in evals if "held_out" not in r]
    assert scheduled == [1, 2, 3, 4]
    assert not list(out.glob("*.tmp"))

    # resumed at its last checkpoint, twice: still each step once, and the evaluations at step 4 once
    for _ in range(2):
        train(config(tmp_path, out, 4, "--train.keep_last", "2", *held), resume=True)
        assert steps_logged(out) == [1, 2, 3, 4]
        evals = rows(out, "eval.jsonl")
        held_out = [(r["step"], r["when"]) for r in evals if "held_out" in r]
        assert held_out == [(0, "before RL"), (2, "at step 2 (resumed)"), (4, "at step 4 (resumed)"),
                            (4, "after RL")]
        assert [r["step"] for r in evals if "held_out" not in r] == [1, 2, 3, 4]


def test_drop_records_after(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 2}\n{"st')
    (tmp_path / "eval.jsonl").write_text('{"step": 0, "when": "before RL"}\n{"step": 2, "x": 1}\n'
                                         '{"step": 2, "when": "at step 2 (resumed)"}\n{"step": 3}\n')
    assert run_dir.drop_records_after(tmp_path, 2) == {"metrics.jsonl": 2, "eval.jsonl": 2}
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n{"step": 2}\n'
    assert (tmp_path / "eval.jsonl").read_text() == '{"step": 0, "when": "before RL"}\n{"step": 2, "x": 1}\n'
    assert run_dir.drop_records_after(tmp_path, 0) == {"metrics.jsonl": 3, "eval.jsonl": 2}  # nothing resumed
    assert (tmp_path / "metrics.jsonl").read_text() == (tmp_path / "eval.jsonl").read_text() == ""
