"""Rollout weights: one persistent low-precision copy of the matmul weights when the masters are fp32.

The paper's recipe keeps fp32 master weights and runs every forward under bf16 autocast. Autocast
casts a weight each time a matmul reads it (cached only inside one autocast region, and never inside
a CUDA-graph capture): for a 7B model 28 GB read and 14 GB written per decode step replayed. Instead,
the engine keeps one bf16 copy of each weight that autocast would cast (the weight and bias of every
`nn.Linear`), refreshes it in place once after each optimizer step (`refresh`, which the trainer
calls), and swaps the copies into the modules for the rollout only (`swapped`). Autocast leaves a
tensor already in its dtype as it is, so a decode step casts no weight, and the math is the same
bit for bit: autocast's cast and the copy round the same fp32 values the same way.

Parameters that something other than a Linear reads (a tied embedding / LM head: the embedding
lookup reads it in fp32) are not copied; their one cast stays autocast's (outside the graph, cached
per rollout). Nothing is built when autocast is off or the parameters already are in its dtype
(under FSDP2 with `MixedPrecisionPolicy(param_dtype=torch.bfloat16)` the unsharded parameters are
bf16 already). A master changed in place without a `refresh` (its version counter moved, or the
module holds another tensor, as after an FSDP unshard) is copied again at the next rollout, so a
rollout never reads stale weights; a `refresh` while the modules hold FSDP shards (another shape)
defers the copy to the next rollout.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def _linear_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, name) of every Linear weight / bias that no other module also holds."""
    owners: dict[int, list[tuple[nn.Module, str, bool]]] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((module, name, isinstance(module, nn.Linear)))
    return [(m, n) for holders in owners.values() if len(holders) == 1 for m, n, is_linear in holders if is_linear]


class RolloutWeights:
    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.entries: list[tuple[nn.Module, str]] = []
        self.masters: list[torch.Tensor] = []
        self.copies: list[torch.Tensor] = []
        self.versions: list[int] = []
        self.is_swapped = False
        for module, name in _linear_weights(model):
            master = module._parameters[name]
            if master is None or not master.is_floating_point() or master.dtype == dtype:
                continue
            self.entries.append((module, name))
            self.masters.append(master)
            self.copies.append(torch.empty_like(master, dtype=dtype, requires_grad=False))
            self.versions.append(-1)
        self.refresh()

    @staticmethod
    def wanted(model: nn.Module, device: torch.device) -> torch.dtype | None:
        """The copies' dtype when a rollout on `device` now would cast weights (autocast on, some Linear
        weight in another floating dtype); None when no copy is needed."""
        if not torch.is_autocast_enabled(device.type):
            return None
        dtype = torch.get_autocast_dtype(device.type)
        for module, name in _linear_weights(model):
            param = module._parameters[name]
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                return dtype
        return None

    def __len__(self) -> int:
        return len(self.copies)

    @property
    def num_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.copies)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy every master into its copy, in place (once after each optimizer step)."""
        if self.is_swapped:
            raise RuntimeError("RolloutWeights.refresh() during a rollout: the modules hold the copies")
        for i, (module, name) in enumerate(self.entries):
            self.masters[i] = module._parameters[name]
        if any(m.shape != c.shape for m, c in zip(self.masters, self.copies, strict=True)):
            # the modules hold shards now (FSDP2 resharded after the rollout): copy at the next
            # rollout, from the unsharded parameters
            self.versions = [-1] * len(self.masters)
            return
        if self.copies:
            torch._foreach_copy_(self.copies, [m.detach() for m in self.masters])
        self.versions = [m._version for m in self.masters]

    def is_stale(self) -> bool:
        """Whether a master moved or changed in place since the last refresh."""
        return any(module._parameters[name] is not master or master._version != version
                   for (module, name), master, version in zip(self.entries, self.masters, self.versions, strict=True))

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The copies stand in for the masters in their modules (refreshed first if stale)."""
        if self.is_stale():
            self.refresh()
        for (module, name), copy in zip(self.entries, self.copies, strict=True):
            module._parameters[name] = copy
        self.is_swapped = True
        try:
            yield
        finally:
            for (module, name), master in zip(self.entries, self.masters, strict=True):
                module._parameters[name] = master
            self.is_swapped = False
