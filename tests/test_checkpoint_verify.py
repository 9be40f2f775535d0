"""A damaged checkpoint is never loaded: --resume skips it for the previous whole one with a warning
naming the damaged file, refuses in one line when none is whole, and `--model` on a damaged directory
is one error line naming the file. Tiny model + byte tokenizer, no tools, in-process."""
import json
import os
import shutil
from pathlib import Path

import pytest
from engine_utils import ByteTokenizer, tiny_model
from test_cli_errors import run_inprocess, tiny_model_dir

from cir import generate, manifest
from cir.config import load_config
from cir.errors import UserError
from cir.model import from_pretrained
from cir.rl import checkpoint
from cir.rl.trainer import Trainer

PROBLEMS = [{"problem": f"{i}+{i}", "answer": str(2 * i), "id": f"p{i}"} for i in range(4)]


class SavingByteTokenizer(ByteTokenizer):
    def save(self, path) -> None:
        Path(path, "byte_tokenizer.txt").write_text("one token per byte, EOS 256\n")


def train(tmp_path: Path, out: Path, steps: int, resume: bool = False) -> None:
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    cfg = load_config(None, [
        "--train.data", str(data), "--train.output_dir", str(out), "--train.steps", str(steps),
        "--train.prompts_per_step", "2", "--rollout.n", "2", "--rollout.max_response_tokens", "6",
        "--rollout.prompt_mode", "plain", "--rollout.tool_budget", "{0: 0}", "--train.save_every", "1",
        "--train.keep_last", "2", "--engine.num_kv_blocks", "64", "--engine.show_progress", "false"])
    trainer = Trainer(cfg, resume=resume, model=tiny_model(seed=0), tokenizer=SavingByteTokenizer())
    try:
        trainer.train()
    finally:
        trainer.close()


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 7] ^= 0x10  # in the last tensor's bytes: the safetensors header stays valid
    path.write_bytes(bytes(data))


DAMAGES = {
    "model/model.safetensors truncated": ("model/model.safetensors", truncate),
    "model/model.safetensors bit flip": ("model/model.safetensors", flip_a_bit),
    "rank_0.pt truncated": ("rank_0.pt", truncate),
    ".distcp truncated": ("train_state/__0_0.distcp", truncate),
    ".metadata truncated": ("train_state/.metadata", truncate),
    "config.json gone": ("model/config.json", os.unlink),
    "manifest gone": ("manifest.json", os.unlink),
}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """A run with checkpoints step_000001 and step_000002, each whole."""
    tmp = tmp_path_factory.mktemp("saved")
    train(tmp, tmp / "run", steps=2)
    return tmp / "run"


def test_a_checkpoint_has_manifests_written_last(saved_run):
    step = saved_run / "checkpoints" / "step_000002"
    outer = json.loads((step / "manifest.json").read_text())["files"]
    inner = json.loads((step / "model" / "manifest.json").read_text())["files"]
    assert {"rank_0.pt", "train_state/.metadata", "train_state/__0_0.distcp", "model/manifest.json"} <= set(outer)
    assert not any(name.startswith("model/") and name != "model/manifest.json" for name in outer)
    assert {"model.safetensors", "config.json", "byte_tokenizer.txt"} <= set(inner)
    on_disk = {p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file()}
    assert on_disk == set(outer) | {f"model/{n}" for n in inner} | {"manifest.json"}
    # written last: no file of the checkpoint is newer than its manifest
    assert max(p.stat().st_mtime_ns for p in step.rglob("*") if p.is_file()) == \
        (step / "manifest.json").stat().st_mtime_ns
    assert checkpoint.damage(step) is None


@pytest.mark.parametrize("case", DAMAGES)
def test_resume_skips_a_damaged_checkpoint_naming_the_file(saved_run, tmp_path, capsys, case):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    name, damage = DAMAGES[case]
    damage(out / "checkpoints" / "step_000002" / name)
    capsys.readouterr()
    train(tmp_path, out, steps=3, resume=True)
    printed = capsys.readouterr().out
    assert f"warning: checkpoint step_000002 is damaged, not resuming from it: " \
           f"{out / 'checkpoints' / 'step_000002' / name}: " in printed
    assert f"resumed from {out / 'checkpoints' / 'step_000001'} at step 1" in printed
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
    # the damaged one was replaced by the resumed run's own step 2, and that one is whole
    assert [p.name for p in checkpoint.checkpoints(out / "checkpoints")] == ["step_000002", "step_000003"]
    assert checkpoint.damage(out / "checkpoints" / "step_000002") is None


def test_resume_refuses_when_no_checkpoint_is_whole(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    truncate(out / "checkpoints" / "step_000001" / "rank_0.pt")
    flip_a_bit(out / "checkpoints" / "step_000002" / "model" / "model.safetensors")
    with pytest.raises(UserError) as info:
        train(tmp_path, out, steps=3, resume=True)
    bad = out / "checkpoints" / "step_000002" / "model" / "model.safetensors"
    assert str(info.value) == (
        f"no whole checkpoint under {out / 'checkpoints'}: the newest, step_000002, has a damaged file {bad}: "
        "content differs from the manifest (SHA-256 of bytes from 0); start over with --train.overwrite true, "
        "or restore the file")


def test_model_flag_on_a_damaged_model_dir_is_one_line(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m")
    manifest.write(model, manifest.digest_files(model, manifest.list_files(model)))
    from_pretrained(model)  # whole: loads
    flip_a_bit(model / "model.safetensors")
    line = run_inprocess(generate.main, ["--prompt", "a b", "--model", str(model), "--device", "cpu"], capsys)
    assert line == f"error: damaged file {model / 'model.safetensors'}: content differs from the manifest " \
                   "(SHA-256 of bytes from 0)"
    # without a manifest, a truncated safetensors file is still caught by its header
    (model / "manifest.json").unlink()
    truncate(model / "model.safetensors")
    line = run_inprocess(generate.main, ["--prompt", "a b", "--model", str(model), "--device", "cpu"], capsys)
    assert line.startswith(f"error: corrupt or truncated safetensors file {model / 'model.safetensors'}")
