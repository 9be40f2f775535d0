"""Rotary position embeddings: inverse frequencies (default, "linear", "llama3" scaling) and their application.

Positions are explicit (one per packed token), so packed sequences, chunked prefill and paged decode
all index the same rotation. cos/sin are computed from `positions` once per forward, in float32, the
same way transformers does (`positions.float() * inv_freq`), then cast to the activations' dtype.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def check_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Normalise a rope_scaling dict (`rope_type` or legacy `type` key); None for the default rotary.

    Raises ValueError naming the rope type when it is not one this model implements.
    """
    if not rope_scaling:
        return None
    scaling = dict(rope_scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return None
    required = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
    missing = [k for k in required if k not in scaling]
    if missing:
        raise ValueError(f"rope scaling {rope_type!r} is missing {', '.join(missing)}: {rope_scaling}")
    return {"rope_type": rope_type, **scaling}


def rope_inv_freq(head_dim: int, rope_theta: float, rope_scaling: dict | None,
                  max_position_embeddings: int) -> Tensor:
    """Inverse frequencies (head_dim // 2,) float32 on CPU, as transformers computes them."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope_theta ** exponent)
    scaling = check_rope_scaling(rope_scaling)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between
    low_freq_factor, high_freq_factor = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling.get("original_max_position_embeddings") or max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """positions (T,) -> (cos, sin), each (T, 1, head_dim // 2): computed in float32, cast to `dtype`.

    inv_freq is a plain attribute, not a buffer, so `model.to(torch.bfloat16)` cannot round it and a
    model built on the meta device still has it; a copy per device is cached on first use.
    """

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict | None, max_position_embeddings: int):
        super().__init__()
        self.inv_freq = rope_inv_freq(head_dim, rope_theta, rope_scaling, max_position_embeddings)
        self._inv_freq_on: dict[torch.device, Tensor] = {}

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        inv_freq = self._inv_freq_on.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq_on[positions.device] = self.inv_freq.to(positions.device)
        freqs = positions[:, None, None].float() * inv_freq  # (T, 1, head_dim // 2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (T, H, D) by cos/sin (T, 1, D // 2), "rotate_half" convention (HF Llama / Qwen layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
