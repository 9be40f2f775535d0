"""ModelConfig: the architecture of a Llama / Qwen2 / Qwen3 decoder, read from a Hugging Face config.json.

Both layouts found in the wild are read: the classic one (`rope_theta`, `rope_scaling`), as in published
Qwen2.5 checkpoints, and the `rope_parameters` block that transformers 5 writes. Anything the
hand-written transformer cannot reproduce (unknown model_type, sliding window actually in use, MoE,
partial rotary, an activation other than SiLU, MLP bias...) is rejected with a ValueError naming it.

    cfg = ModelConfig.from_file("path/to/config.json")
    cfg.to_hf_dict()          # what save_pretrained writes back
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from cir.model.rope import check_rope_scaling

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# HF keys that turn on a feature this model does not implement, with the value that means "off".
_OFF_VALUES: dict[str, tuple] = {
    "mlp_bias": (False, None),
    "num_experts": (0, None),
    "num_local_experts": (0, None),
    "n_routed_experts": (0, None),
    "moe_intermediate_size": (0, None),
    "partial_rotary_factor": (1, 1.0, None),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "use_mrope": (False, None),
}


@dataclass
class ModelConfig:
    """Decoder-only transformer architecture (the fields of HF config.json that the model uses)."""

    model_type: str = "llama"
    """"llama" (incl. SmolLM2), "qwen2" (Qwen2 / Qwen2.5 / Qwen2.5-Math) or "qwen3"."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    """None: same as num_attention_heads (no grouped-query attention)."""
    head_dim: int | None = None
    """None: hidden_size // num_attention_heads."""
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    """None / {"rope_type": "default"}, "linear" (factor) or "llama3" (factor, low/high_freq_factor,
    original_max_position_embeddings)."""
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    """Bias on q/k/v projections (always on for qwen2; for llama/qwen3 also on o_proj)."""
    qk_norm: bool = False
    """Per-head RMSNorm on q and k before rotary (Qwen3)."""
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    """The dtype the checkpoint was saved in ("bfloat16", "float32", ...), informational."""
    attention_out_bias: bool = field(init=False)
    """Derived: bias on o_proj (llama / qwen3 with attention_bias; never qwen2)."""

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {self.model_type!r}; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.model_type == "qwen2":
            self.attention_bias = True
        if self.model_type == "qwen3":
            self.qk_norm = True
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        self.rope_scaling = check_rope_scaling(self.rope_scaling)
        self.attention_out_bias = self.attention_bias and self.model_type != "qwen2"

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    # ---- HF config.json <-> ModelConfig ---------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face config dict; raise ValueError naming any unsupported feature in use."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        _reject_unsupported(d)
        rope_theta, rope_scaling = _read_rope(d)
        eos = d.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim") if model_type != "qwen2" else None,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            pad_token_id=d.get("pad_token_id"),
            torch_dtype=d.get("torch_dtype") or d.get("dtype"),
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ModelConfig:
        """Read config.json (a file, or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model config not found: {path}")
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_hf_dict(d)
        except KeyError as e:
            raise ValueError(f"{path}: missing required field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def to_hf_dict(self, torch_dtype: str | None = None) -> dict[str, Any]:
        """The config.json transformers (4.x and 5.x) and vLLM load unchanged (classic rope layout)."""
        eos = self.eos_token_id[0] if len(self.eos_token_id) == 1 else (list(self.eos_token_id) or None)
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": torch_dtype or self.torch_dtype or "float32",
            "use_cache": True,
        }
        if self.model_type == "qwen2":
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
            del d["head_dim"]  # qwen2 derives it; assert it is derivable
            assert self.head_dim * self.num_attention_heads == self.hidden_size
        else:
            d["attention_bias"] = self.attention_bias
        if self.model_type == "qwen3":
            d.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_hidden_layers)
        return d


def _reject_unsupported(d: dict[str, Any]) -> None:
    problems = []
    act = d.get("hidden_act", d.get("hidden_activation", "silu"))
    if act != "silu":
        problems.append(f"hidden_act={act!r} (only 'silu')")
    for key, off in _OFF_VALUES.items():
        if key in d and d[key] not in off:
            problems.append(f"{key}={d[key]!r}")
    if d.get("use_sliding_window") and d.get("sliding_window"):
        num_layers = d.get("num_hidden_layers", 0)
        # transformers: layers with index >= max_window_layers use the window
        if d.get("max_window_layers", 0) < num_layers:
            problems.append(f"use_sliding_window=True (sliding_window={d['sliding_window']}, "
                            f"max_window_layers={d.get('max_window_layers')})")
    layer_types = d.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        problems.append(f"layer_types={sorted(set(layer_types))} (only full_attention)")
    if (d.get("model_type") == "qwen2" and "head_dim" in d
            and d["head_dim"] * d["num_attention_heads"] != d["hidden_size"]):
        problems.append(f"head_dim={d['head_dim']} (qwen2 requires hidden_size / num_attention_heads)")
    if problems:
        raise ValueError("unsupported config: " + "; ".join(problems))


def _read_rope(d: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either layout; rope_scaling None means the default rotary."""
    params = d.get("rope_parameters")
    if params:
        if all(isinstance(v, dict) for v in params.values()):  # nested per layer type
            if set(params) != {"full_attention"}:
                raise ValueError(f"unsupported config: per-layer-type rope_parameters {sorted(params)}")
            params = params["full_attention"]
        params = dict(params)
        theta = params.pop("rope_theta", d.get("rope_theta", 10000.0))
        partial = params.pop("partial_rotary_factor", 1.0)
        if partial not in (1, 1.0, None):
            raise ValueError(f"unsupported config: partial_rotary_factor={partial!r}")
        return float(theta), (params or None)
    return float(d.get("rope_theta", 10000.0)), d.get("rope_scaling")
