"""The training forward as one module (what DDP / FSDP2 wrap): packed tokens -> log-probs of targets.

The LM head is applied inside `kernels.linear_logprobs`, chunk by chunk, so the [N, V] logits never
exist; rows with mask 0 (interpreter feedback) cost nothing and get no gradient.
"""
from __future__ import annotations

import torch
from torch import nn

from kernels import linear_logprobs


class PolicyForward(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, rows: torch.Tensor,
                targets: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs [N], entropy [N]) of `targets` at packed positions `rows`."""
        hidden = self.model.forward_packed(input_ids, cu_seqlens)[rows]  # (N, D)
        weight = self.model.lm_head_weight
        device_type = hidden.device.type
        # the fused kernel takes one dtype: autocast's (as F.linear would cast), else the weight's
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        return linear_logprobs(hidden.to(dtype), weight.to(dtype), targets, temperature=temperature, mask=mask,
                               return_entropy=True)
