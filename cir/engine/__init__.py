"""Generation engine: paged KV cache, continuous batching, prefix sharing, tool interleaving."""
from cir.engine.config import EngineConfig, SamplingParams, ToolConfig
from cir.engine.engine import Engine, Trajectory
from cir.engine.stream import RolloutStream

__all__ = ["Engine", "EngineConfig", "RolloutStream", "SamplingParams", "ToolConfig", "Trajectory"]
