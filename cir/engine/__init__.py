"""Generation engine: paged KV cache, continuous batching, prefix sharing, tool interleaving."""
from cir.engine.config import EngineConfig, SamplingParams, ToolConfig
from cir.engine.engine import Engine, Trajectory

__all__ = ["Engine", "EngineConfig", "SamplingParams", "ToolConfig", "Trajectory"]
