"""The hand-written transformer against transformers' own, on tiny random checkpoints of each family.

Checkpoints are created and saved by transformers itself (so its config layout, `rope_parameters`,
and tensor names are the ones tested), plus one hand-written classic-layout config.json.
"""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

from cir.model import ModelConfig, Transformer, from_pretrained
from cir.model.attention import VarlenContext

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=256, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
FAMILIES = {
    # Llama (SmolLM2-like): tied, GQA 3:1, odd sizes, llama3 rope scaling that bites at T > 16
    "llama_tied_gqa_llama3": LlamaConfig(**COMMON, hidden_size=48, intermediate_size=72, num_attention_heads=3,
                                         num_key_value_heads=1, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    # Llama untied, no GQA, bias on q/k/v/o, linear rope scaling
    "llama_bias_linear": LlamaConfig(**COMMON, hidden_size=40, intermediate_size=56, num_attention_heads=5,
                                     num_key_value_heads=5, attention_bias=True,
                                     rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0}),
    # Qwen2: q/k/v bias, untied, GQA 2:1
    "qwen2_bias_untied": Qwen2Config(**COMMON, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                     num_key_value_heads=2, tie_word_embeddings=False),
    # Qwen3: q/k RMSNorm, head_dim not hidden / heads, tied, GQA 3:1
    "qwen3_qknorm": Qwen3Config(**COMMON, hidden_size=36, intermediate_size=64, num_attention_heads=6, head_dim=10,
                                num_key_value_heads=2, tie_word_embeddings=True),
}
# Classic layout, as published Qwen2.5 checkpoints write it: rope_theta / rope_scaling with the legacy
# "type" key, a sliding window that is configured but not in use, torch_dtype.
CLASSIC_QWEN2 = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 48,
    "intermediate_size": 80, "num_hidden_layers": 2, "num_attention_heads": 6, "num_key_value_heads": 2,
    "hidden_act": "silu", "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "linear", "factor": 2.0}, "sliding_window": 4096, "use_sliding_window": False,
    "max_window_layers": 21, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 5,
    "eos_token_id": 7, "use_cache": True,
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """transformers initialises norms to 1 and biases to 0, which would hide a mapping mistake."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.15 * noise)


def make_checkpoint(hf_config, directory, classic: dict | None = None):
    """Save a random transformers model to `directory`; return it (float32, eval)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf_config).eval()
    randomize_(model)
    model.save_pretrained(directory)
    if classic is not None:
        (directory / "config.json").write_text(json.dumps(classic))
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="module", params=[*FAMILIES, "qwen2_classic_layout"])
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    if request.param == "qwen2_classic_layout":
        theirs = make_checkpoint(Qwen2Config(**{k: v for k, v in CLASSIC_QWEN2.items() if k != "rope_scaling"}),
                                 directory, classic=CLASSIC_QWEN2)
    else:
        theirs = make_checkpoint(FAMILIES[request.param], directory)
    return request.param, directory, theirs


def test_logits_match_transformers(family):
    name, directory, theirs = family
    ours = from_pretrained(directory)
    ids = torch.randint(0, VOCAB, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs(input_ids=ids, use_cache=False).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert expected.abs().max() > 0.5, "degenerate test model"
    assert (got - expected).abs().max().item() < 1e-4, name


def test_packed_equals_per_sequence(family):
    _, directory, _ = family
    model = from_pretrained(directory)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (5, 23, 1, 12)]
    cu_seqlens = torch.tensor([0, 5, 28, 29, 41], dtype=torch.int32)
    with torch.no_grad():
        packed = model.compute_logits(model.forward_packed(torch.cat(seqs), cu_seqlens))
        single = torch.cat([model(s[None])[0] for s in seqs])
    assert (packed - single).abs().max().item() < 1e-5


def test_config_layouts_agree(family):
    name, directory, theirs = family
    ours = ModelConfig.from_file(directory / "config.json")
    assert ours.num_hidden_layers == 2 and ours.vocab_size == VOCAB
    assert ours.tie_word_embeddings == theirs.config.tie_word_embeddings
    # our written (classic) layout reads back to the same config
    assert ModelConfig.from_hf_dict(ours.to_hf_dict()) == ours


def test_classic_and_rope_parameters_layouts_read_the_same():
    classic = ModelConfig.from_hf_dict(CLASSIC_QWEN2)
    new = dict(CLASSIC_QWEN2)
    del new["rope_theta"], new["rope_scaling"]
    new["rope_parameters"] = {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 2.0}
    assert ModelConfig.from_hf_dict(new) == classic
    assert classic.rope_scaling == {"rope_type": "linear", "factor": 2.0} and classic.rope_theta == 1e6
    assert classic.attention_bias and not classic.attention_out_bias and classic.eos_token_id == [7]


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(**{**dict(model_type="qwen2", vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2), **overrides})
    model = Transformer(config)
    randomize_(model)
    return model


def test_gradient_checkpointing_same_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(3))
    cu_seqlens = torch.tensor([0, 12, 30], dtype=torch.int32)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        hidden = model.forward_packed(ids, cu_seqlens)
        torch.nn.functional.cross_entropy(model.compute_logits(hidden), ids.roll(-1)).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bf16_forward_close_to_fp32():
    model = tiny_model(model_type="qwen3", tie_word_embeddings=True).eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        reference = model(ids)
        got = model.to(torch.bfloat16)(ids)
    assert got.dtype == torch.bfloat16
    err = (got.float() - reference).abs().max().item()
    assert err < 0.05 * reference.abs().max().item(), err
    # rotary frequencies are not rounded to bf16 by .to(dtype)
    assert model.rotary.inv_freq.dtype == torch.float32


def test_uniform_and_ragged_attention_paths_agree():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(24, 4, 8, generator=gen)
    k, v = torch.randn(24, 2, 8, generator=gen), torch.randn(24, 2, 8, generator=gen)
    uniform = VarlenContext.from_seq_lens([12, 12]).attend(0, q, k, v)
    ctx = VarlenContext.from_seq_lens([12, 12])
    ctx.seq_lens = [12, 12, 0]  # forces the per-sequence loop; an empty sequence is allowed
    torch.testing.assert_close(ctx.attend(0, q, k, v), uniform)


def test_forward_rejects_wrong_shapes():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"input_ids \(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="cu_seqlens ends at 4 but there are 5 tokens"):
        model.forward_packed(torch.zeros(5, dtype=torch.long), torch.tensor([0, 4], dtype=torch.int32))
