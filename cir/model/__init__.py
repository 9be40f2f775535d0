"""The model: a hand-written Llama / Qwen2 / Qwen3 transformer and Hugging Face checkpoint io.

    from cir.model import from_pretrained, save_pretrained, default_model_path
    model = from_pretrained(default_model_path())      # the embedded SmolLM2-135M-Instruct
"""
from cir.model.checkpoint import from_pretrained, save_pretrained
from cir.model.config import ModelConfig
from cir.model.transformer import Transformer


def default_model_path() -> str:
    """The converted SmolLM2-135M-Instruct HF directory (created from the GGUF on first use)."""
    from cir.model.gguf import default_model_path as build

    return build()


__all__ = ["ModelConfig", "Transformer", "default_model_path", "from_pretrained", "save_pretrained"]
