"""torchrun plumbing: process group, DDP / FSDP2 wrapping, unsharded generation, rank-0 helpers.

One process per GPU (gloo on CPU). FSDP2 (`fully_shard` on every block, then the root) when the
model does not fit replicated, DDP otherwise. For a rollout every FSDP module is unsharded in
place (the engine reads the full parameters with no copy) and resharded afterwards.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


def init() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); starts the process group when run under torchrun."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        return 0, 1, device
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def print0(*args, **kwargs) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_max(values: list[float], device: torch.device) -> list[float]:
    if not is_distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_gather_object(obj) -> list:
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def finish() -> None:
    """Clean exit under torchrun: barrier, destroy the group (workers can abort at exit otherwise)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def wrap(policy: nn.Module, blocks: list[nn.Module], parallel: str, device: torch.device,
         param_dtype: torch.dtype | None = None) -> nn.Module:
    """DDP or FSDP2 around the training forward module; the identity on one process.

    `param_dtype` (FSDP2 only; e.g. bf16 with fp32 masters under autocast): unsharded parameters are
    all-gathered in that dtype (`MixedPrecisionPolicy`, gradients reduced in fp32), so a rollout on
    the unsharded parameters reads bf16 weights and the engine builds no copy of its own."""
    if not is_distributed():
        return policy
    if parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {} if param_dtype is None else {
            "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)}
        for block in blocks:
            fully_shard(block, **kw)
        fully_shard(policy, **kw)
        return policy
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None)


def fsdp_modules(module: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in module.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(module: nn.Module) -> Iterator[None]:
    """Full parameters in place on every FSDP module (not just the root) for the engine."""
    modules = fsdp_modules(module) if is_distributed() else []
    for m in modules:
        m.set_reshard_after_forward(False)  # no all-gather per decode step
        m.unshard()
    try:
        yield
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)


@contextlib.contextmanager
def gradient_sync(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on all but the last micro-batch."""
    if not is_distributed() or enabled:
        yield
        return
    if hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
        return
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on CPU; under FSDP gathered to rank 0 (others get {}): all ranks call."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_distributed() or not fsdp_modules(module):  # replicated: every rank has it all
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)
