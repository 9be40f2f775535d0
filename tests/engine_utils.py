"""Shared pieces for the engine tests: a byte tokenizer, tiny random models, a scripted model."""
from __future__ import annotations

import torch

from cir.model.config import ModelConfig
from cir.model.transformer import Transformer


class ByteTokenizer:
    """One token per UTF-8 byte, plus EOS = 256."""

    eos_token_id = 256
    eos_token_ids = [256]
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_model(seed: int = 0, num_kv_heads: int = 2, vocab_size: int = 257, **overrides) -> Transformer:
    torch.manual_seed(seed)
    fields = dict(
        model_type="llama", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=num_kv_heads, head_dim=16,
        rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=512,
        tie_word_embeddings=False, attention_bias=False, qk_norm=False,
        bos_token_id=None, eos_token_id=[256], pad_token_id=None,
    )
    fields.update(overrides)
    model = Transformer(ModelConfig(**fields))
    with torch.no_grad():
        for p in model.parameters():  # larger than default init, so logits are far from uniform
            p.normal_(0, 0.3) if p.dim() > 1 else p.fill_(1.0)
    return model


class _ScriptedConfig:
    num_hidden_layers = 1
    num_key_value_heads = 1
    head_dim = 16
    max_position_embeddings = 4096


class ScriptedModel(torch.nn.Module):
    """Emits a fixed token script per sequence, reading through the real paged KV cache.

    The script key is the first prompt token (mod 16). Layer 0 stores a one-hot of it as the value of
    position 0 (zero elsewhere); uniform attention over the cache reads it back at any position,
    so the model knows which script it follows. At position p it predicts script[p + 1]: the full
    expected token list, interpreter feedback included (its own predictions inside forced
    feedback are never used).
    """

    def __init__(self, scripts: dict[int, list[int]], eos_token_id: int, vocab_size: int = 257):
        super().__init__()
        self.config = _ScriptedConfig()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.scripts = scripts
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size

    def forward_hidden(self, input_ids, positions, ctx):
        T, D = input_ids.shape[0], self.config.head_dim
        q = torch.zeros(T, 1, D)
        k = torch.zeros(T, 1, D)
        v = torch.nn.functional.one_hot(input_ids % D, D).float().unsqueeze(1) * (positions == 0).view(T, 1, 1)
        out = ctx.attend(0, q, k, v)  # (T, 1, D): one-hot(key) / (position + 1)
        key = out[:, 0].argmax(-1).float()
        return torch.stack([key, positions.float()], dim=-1)  # (T, 2)

    def compute_logits(self, hidden):
        logits = torch.full((hidden.shape[0], self.vocab_size), -30.0)
        for row, (key, pos) in enumerate(hidden.long().tolist()):
            script = self.scripts[key]
            token = script[pos + 1] if pos + 1 < len(script) else self.eos_token_id
            logits[row, token] = 30.0
        return logits
