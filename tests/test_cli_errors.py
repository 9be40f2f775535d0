"""One error convention for every command: a user's mistake exits with status 2 and ONE line
on stderr, `error: <what> (<file>:<line>)` plus a hint where one helps; --debug / CIR_DEBUG=1 shows the
traceback; a bug keeps its traceback. Each command is run once as a subprocess (the real entry point);
the other cases call the same `run_main(main, argv)` in-process, so no case loads the real model."""
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from engine_utils import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers

from cir import evaluate, generate, plot
from cir.errors import UserError, run_main
from cir.model import gguf, save_pretrained

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CIR_DEBUG": ""}


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=ENV,
                          input=stdin, cwd=ROOT)


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a command that failed on a user's mistake."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def run_inprocess(main, argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        run_main(main, argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.rstrip("\n")


def tiny_model_dir(path: Path, context: int = 16) -> Path:
    """A real model directory small enough to load in milliseconds: a word-level tokenizer, a tiny Llama."""
    vocab = {"<unk>": 0, "</s>": 1, "a": 2, "b": 3, "c": 4, "d": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    save_pretrained(tiny_model(vocab_size=len(vocab), eos_token_id=[1], max_position_embeddings=context), path)
    return path


# 1) a broken JSONL line: file, line and the column where the error is ------------------------------
def test_evaluate_broken_jsonl_line_is_one_line_with_file_line_column(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "What is 2+2?", "answer": "4"\n')
    line = one_line(run_cli("-m", "cir.evaluate", "--data", str(data), "--out", str(tmp_path / "out")))
    # the error is at column 42, where the object should go on (not "line 2 column 1")
    assert line == f"error: invalid JSON: Expecting ',' delimiter at column 42 (the end of the line) ({data}:2)"


def test_jsonl_error_mid_line_and_debug_traceback(tmp_path, capsys, monkeypatch):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "x", "answer": "4" "id": 3}\n')
    argv = ["--data", str(data), "--out", str(tmp_path / "out")]
    assert run_inprocess(evaluate.main, argv, capsys) == \
        f"error: invalid JSON: Expecting ',' delimiter at column 32 ({data}:1)"
    with pytest.raises(UserError, match="column 32"):  # --debug: the exception itself, traceback and all
        run_main(evaluate.main, argv + ["--debug"])
    monkeypatch.setenv("CIR_DEBUG", "1")
    with pytest.raises(UserError, match="column 32"):
        run_main(evaluate.main, argv)


def test_truncated_parquet_names_the_file(tmp_path, capsys):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"problem": ["a"] * 50, "answer": ["1"] * 50}), path)
    path.write_bytes(path.read_bytes()[:-40])  # cut off the footer
    line = run_inprocess(evaluate.main, ["--data", str(path), "--out", str(tmp_path / "out")], capsys)
    assert line.startswith("error: cannot read the parquet file (ArrowInvalid:") and line.endswith(f"({path})")


def test_evaluate_negative_temperature(tmp_path, capsys):
    line = run_inprocess(evaluate.main, ["--data", "x.jsonl", "--temperature", "-1"], capsys)
    assert line.startswith("error: temperature must be >= 0, got -1.0") and "--temperature" in line


def test_evaluate_prompt_longer_than_the_context(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m", context=16)
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"id": "long-1", "problem": " ".join("abcd" * 5), "answer": "1"}) + "\n")
    line = run_inprocess(evaluate.main, ["--data", str(data), "--model", str(model), "--prompt-mode", "raw",
                                         "--max-tool-calls", "0", "--n", "1", "--out", str(tmp_path / "out")], capsys)
    assert line.startswith("error: problem long-1: prompt of ") and "leaves no room to answer (max_model_len 16)" \
        in line and line.endswith("or use a model with a longer context")


# 2) cir_sandbox.run: its own copy of the convention (cir_sandbox/ imports nothing from cir/) ---------------
@pytest.mark.parametrize("case", ["missing", "directory", "binary", "timeout", "warm"])
def test_sandbox_run_mistakes(tmp_path, case):
    binary = tmp_path / "prog.bin"
    binary.write_bytes(b"\x7fELF\x02\x01\x00\x00print(1)")
    snippet = tmp_path / "ok.py"
    snippet.write_text("print(1)\n")
    args, expected = {
        "missing": ([str(tmp_path / "nope.py")], f"error: no such file: {tmp_path / 'nope.py'}"),
        "directory": ([str(tmp_path)], f"error: {tmp_path} is a directory, not a Python file"),
        "binary": ([str(binary)], f"error: {binary} is a binary file, not Python source"),
        "timeout": ([str(snippet), "--timeout", "0"], "error: --timeout must be > 0 seconds, got 0.0; "
                                                      "see python -m cir_sandbox.run --help"),
        "warm": ([str(snippet), "--warm", "math,nosuchmodule"], "error: --warm: no module named nosuchmodule"),
    }[case]
    assert one_line(run_cli("-m", "cir_sandbox.run", *args)) == expected


def test_sandbox_run_debug_shows_the_traceback(tmp_path):
    proc = run_cli("-m", "cir_sandbox.run", str(tmp_path / "nope.py"), "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "UsageError: no such file" in proc.stderr


# 3) cir.generate ----------------------------------------------------------------------------------
def test_generate_n_zero_is_one_line_before_any_model():
    assert one_line(run_cli("-m", "cir.generate", "--prompt", "hi", "--n", "0")) == \
        "error: --n must be >= 1, got 0; see python -m cir.generate --help"


def test_generate_prompt_longer_than_the_context(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m", context=16)
    line = run_inprocess(generate.main, ["--model", str(model), "--prompt", " ".join("abcd" * 5), "--no-chat",
                                         "--device", "cpu"], capsys)
    assert line == "error: the prompt is 20 tokens, the model's context 16: no room left to generate; " \
                   "shorten the prompt"


def test_generate_device_that_is_not_here(capsys):
    if torch.cuda.is_available():  # on a GPU machine: one index past the last device
        device = f"cuda:{torch.cuda.device_count()}"
        expected = f"error: --device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
    else:
        device = "cuda"
        expected = f"error: --device cuda: no CUDA device is available (torch {torch.__version__}); use --device cpu"
    assert run_inprocess(generate.main, ["--prompt", "hi", "--device", device], capsys) == expected


def test_model_path_missing_or_a_training_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert run_inprocess(generate.main, ["--prompt", "hi", "--model", str(missing), "--device", "cpu"], capsys) \
        == f"error: model directory not found: '{missing}'"
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_000002"
    tiny_model_dir(step / "model")
    assert run_inprocess(generate.main, ["--prompt", "hi", "--model", str(step), "--device", "cpu"], capsys) == \
        f"error: no tokenizer.json in '{step}'; it is a training checkpoint; its model is in {step / 'model'}"
    line = run_inprocess(evaluate.main, ["--data", str(ROOT / "cir" / "data" / "arith.jsonl"), "--model", str(run),
                                         "--max-tool-calls", "0", "--out", str(tmp_path / "out")], capsys)
    assert line == f"error: no tokenizer.json in '{run}'; it is a run directory; its latest model is in " \
                   f"{step / 'model'}"


# 4) train.py, cir.plot, cir.model.gguf -------------------------------------------------------------
def test_train_yaml_syntax_error_is_one_line_with_file_and_line(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train:\n  steps: 3\n  output_dir: [a\nrl:\n  clip_high: 0.3\n")
    line = one_line(run_cli(str(ROOT / "train.py"), "--config", str(config)))
    assert line.startswith("error: invalid YAML: ") and line.endswith(f"({config}:4)")


def test_train_bad_override_is_one_line(capsys):
    train_main = runpy.run_path(str(ROOT / "train.py"), run_name="train")["main"]  # a script, not a module
    assert run_inprocess(train_main, ["--train.keep_last", "0"], capsys) == \
        "error: train.keep_last must be >= 1, got 0"


def test_plot_and_gguf_missing_paths(tmp_path, capsys):
    line = one_line(run_cli("-m", "cir.plot", str(tmp_path / "no_run")))
    assert line == f"error: no metrics.jsonl in {tmp_path / 'no_run'}; no such directory"
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n[1]\n")
    assert run_inprocess(plot.main, [str(tmp_path)], capsys) == \
        f"error: expected a JSON object, got list ({tmp_path / 'metrics.jsonl'}:2)"
    assert run_inprocess(gguf.main, ["--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o")], capsys) == \
        f"error: GGUF file not found: '{tmp_path / 'x.gguf'}'"


def test_a_bug_keeps_its_traceback():
    def buggy(argv):
        raise KeyError("internal")

    with pytest.raises(KeyError):
        run_main(buggy, [])
