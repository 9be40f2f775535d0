"""Checkpoint io: save_pretrained output loads in transformers unchanged; every broken checkpoint
raises an error that names the problem (file, tensor, shape, config field)."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from cir.model import ModelConfig, Transformer, from_pretrained, save_pretrained

VOCAB = 89
FAMILIES = {
    "qwen2_untied": dict(model_type="qwen2", tie_word_embeddings=False),
    "llama_tied_bias": dict(model_type="llama", tie_word_embeddings=True, attention_bias=True,
                            rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen3_tied": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=12),
}


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    config = ModelConfig(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=[2, 3]), **overrides})
    model = Transformer(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.2 * noise)
    return model.eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        out = model(ids) if isinstance(model, Transformer) else model(input_ids=ids, use_cache=False).logits
    return out


def assert_same_model(theirs, ours) -> None:
    """transformers' logits vs ours: equal up to float rounding (a few rows on CPU go through
    transformer.linear's (W @ x^T)^T, another summation order than F.linear's)."""
    torch.testing.assert_close(logits(theirs, IDS), logits(ours, IDS), rtol=0, atol=1e-5)


IDS = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_reloads_in_transformers_with_the_same_logits(family, tmp_path):
    ours = tiny_model(**FAMILIES[family])
    save_pretrained(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == json.loads((tmp_path / "config.json").read_text())["architectures"][0]
    assert_same_model(theirs, ours)
    assert torch.equal(logits(from_pretrained(tmp_path), IDS), logits(ours, IDS))


def test_sharded_save_round_trips(tmp_path):
    ours = tiny_model(**FAMILIES["qwen2_untied"])
    save_pretrained(ours, tmp_path, max_shard_bytes=8_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((tmp_path / s).exists() for s in shards)
    assert not (tmp_path / "model.safetensors").exists()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert_same_model(theirs, ours)
    assert torch.equal(logits(from_pretrained(tmp_path), IDS), logits(ours, IDS))
    # saving again unsharded into the same directory leaves no stale shards behind
    save_pretrained(ours, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_save_writes_configs_and_tokenizer(tmp_path):
    class FakeTokenizer:
        def save(self, path):
            (tmp_path / "tokenizer.json").write_text("{}")

    model = tiny_model(**FAMILIES["qwen3_tied"]).to(torch.bfloat16)
    save_pretrained(model, tmp_path, tokenizer=FakeTokenizer())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": [2, 3]}
    assert (tmp_path / "tokenizer.json").exists()
    # a loaded checkpoint keeps its own generation_config.json on the next save
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 3, "temperature": 0.7}))
    save_pretrained(from_pretrained(tmp_path), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "generation_config.json").read_text())["temperature"] == 0.7


def test_load_dtype_device_and_no_meta(tmp_path):
    save_pretrained(tiny_model(**FAMILIES["qwen2_untied"]), tmp_path)
    model = from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" and p.requires_grad for p in model.parameters())
    assert not model.training
    assert from_pretrained(tmp_path, dtype="auto").lm_head_weight.dtype == torch.float32


def test_tied_checkpoint_with_lm_head_weight_anyway_loads(tmp_path):
    ours = tiny_model(**FAMILIES["llama_tied_bias"])
    save_pretrained(ours, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tmp_path / "model.safetensors")
    assert torch.equal(logits(from_pretrained(tmp_path), IDS), logits(ours, IDS))


# ---- broken checkpoints: the error names the problem ------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    save_pretrained(tiny_model(**FAMILIES["qwen2_untied"]), tmp_path)
    return tmp_path


def rewrite_tensors(directory, edit) -> None:
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def test_truncated_safetensors(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"corrupt or truncated safetensors file {file}"):
        from_pretrained(saved)


def test_garbage_safetensors(saved):
    (saved / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="corrupt or truncated safetensors file .*model.safetensors"):
        from_pretrained(saved)


def test_missing_shard(tmp_path):
    save_pretrained(tiny_model(), tmp_path, max_shard_bytes=8_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]  # model-00002-of-0000N.safetensors
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=f"missing shard file .*{shard}"):
        from_pretrained(tmp_path)


def test_wrong_shape_tensor(saved):
    rewrite_tensors(saved, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(40, 31)}))
    with pytest.raises(ValueError, match=r"shape mismatch for tensor model.layers.1.mlp.up_proj.weight .*"
                                         r"expected \[40, 32\], got \[40, 31\]"):
        from_pretrained(saved)


def test_missing_tensor(saved):
    rewrite_tensors(saved, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) .*: model.layers.0.self_attn.k_proj.bias$"):
        from_pretrained(saved)


def test_unexpected_tensor(saved):
    rewrite_tensors(saved, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor\(s\) .*: model.layers.0.mlp.extra.weight$"):
        from_pretrained(saved)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=f"model config not found: {tmp_path / 'config.json'}"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(tiny_model().config.to_hf_dict()))
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index.json in"):
        from_pretrained(tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "mistral"}, "unsupported model_type 'mistral'"),
    ({"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 0}, "use_sliding_window=True"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "unsupported rope scaling type 'yarn'"),
    ({"rope_scaling": None, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "unsupported rope scaling type 'dynamic'"),
    ({"num_experts": 8}, "num_experts=8"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
])
def test_unsupported_config(saved, change, message):
    config = json.loads((saved / "config.json").read_text())
    config.update(change)
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        from_pretrained(saved)


def test_sliding_window_configured_but_unused_is_fine(saved):
    config = json.loads((saved / "config.json").read_text())
    config.update(use_sliding_window=False, sliding_window=4096, max_window_layers=28)
    (saved / "config.json").write_text(json.dumps(config))
    from_pretrained(saved)


def test_saving_again_drops_a_stale_manifest(tmp_path):
    from cir import manifest

    save_pretrained(tiny_model(seed=0), tmp_path)
    manifest.write(tmp_path, manifest.digest_files(tmp_path, manifest.list_files(tmp_path)))
    save_pretrained(tiny_model(seed=1), tmp_path)  # other weights: the old manifest would call them damaged
    assert not (tmp_path / manifest.MANIFEST).exists()
    assert torch.equal(logits(from_pretrained(tmp_path), IDS), logits(tiny_model(seed=1), IDS))
