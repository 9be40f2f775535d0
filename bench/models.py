"""Random-weight models of published shapes, built directly on the device, for the benchmarks.

    model = random_model("qwen2.5-1.5b", torch.bfloat16, "cuda")     # no network, no checkpoint
    ref = hf_twin(model)                                              # transformers, same weights
    model = random_model(tiny_shape("qwen2.5-1.5b"), torch.float32, "cpu")   # smoke-test size

Nothing is downloaded or read from disk: the skeleton is built on the meta device and each tensor is
drawn on the target device in the target dtype (no float32 copy of a 7B model on the way). The
transformers twin is built on the same device and given the same tensors (no save and reload).
"""
from __future__ import annotations

import torch

from cir.model.config import ModelConfig
from cir.model.transformer import Transformer

SHAPES = {  # the fields of the published config.json files that the architecture uses
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=True,
                         attention_bias=True),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                       rope_theta=1e6, max_position_embeddings=32768, tie_word_embeddings=False,
                       attention_bias=True),
}
INIT_STD = 0.02  # the published models' initializer_range


def model_config(shape: str | ModelConfig, **overrides) -> ModelConfig:
    if isinstance(shape, ModelConfig):
        return shape
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; known: {', '.join(SHAPES)}")
    return ModelConfig(**{**SHAPES[shape], "eos_token_id": [0], **overrides})


def tiny_shape(shape: str, **overrides) -> ModelConfig:
    """The same family at smoke-test size (2 layers, 2 kv heads of 16 dims, the GQA ratio kept,
    vocab 512)."""
    base = SHAPES[shape]
    heads = 2 * (base["num_attention_heads"] // base["num_key_value_heads"])
    return model_config(shape, **{**dict(vocab_size=512, hidden_size=16 * heads, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=4096), **overrides})


def random_model(shape: str | ModelConfig, dtype: torch.dtype, device: torch.device | str,
                 seed: int = 0) -> Transformer:
    """A Transformer of `shape` with N(0, 0.02) weights (norms 1), built on `device` in `dtype`."""
    config = model_config(shape)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(config)
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            state[name] = torch.ones(param.shape, dtype=dtype, device=device)
        else:
            state[name] = torch.empty(param.shape, dtype=dtype, device=device).normal_(0, INIT_STD, generator=gen)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def hf_twin(model: Transformer, attn_implementation: str = "sdpa"):
    """The transformers model of the same architecture, device, dtype and weights (for comparisons)."""
    import transformers

    from cir.model.checkpoint import hf_name

    param = next(model.parameters())
    hf_config = model.config.to_hf_dict(str(param.dtype).removeprefix("torch."))
    config = transformers.AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    with torch.device(param.device):
        twin = transformers.AutoModelForCausalLM.from_config(config, dtype=param.dtype,
                                                             attn_implementation=attn_implementation)
    missing, unexpected = twin.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()}, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"transformers twin: missing {missing}, unexpected {unexpected}")
    return twin.eval()


class ByteTokenizer:
    """One token per UTF-8 byte, EOS = 256: a tokenizer for random-weight models (token ids are all
    that matter), with a plain chat template."""

    eos_token_id = 256
    eos_token_ids = [256]
    pad_token_id = None
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
        return text + ("<assistant>\n" if add_generation_prompt else "")


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
