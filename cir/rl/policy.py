"""The training forward as one module (what DDP / FSDP2 wrap): packed tokens -> log-probs of targets.

The LM head is applied inside `cir_kernels.linear_logprobs`, chunk by chunk, so the [N, V] logits never
exist; rows with mask 0 (interpreter feedback) get log-prob 0, entropy 0 and no gradient.

With `positions` and `seq_lens` (host list) given, as `cir.rl.batching` provides them, the forward
reads nothing back from the device: no host synchronisation per micro-batch.
"""
from __future__ import annotations

import torch
from torch import nn

from cir.model.attention import VarlenContext
from cir_kernels import linear_logprobs
from cir_kernels.batch_invariant_logprobs import linear_logprobs_invariant


class PolicyForward(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, cu_seqlens: torch.Tensor, rows: torch.Tensor,
                targets: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0,
                positions: torch.Tensor | None = None, seq_lens: list[int] | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logprobs [N], entropy [N]) of `targets` at packed positions `rows`."""
        if positions is None or seq_lens is None:
            hidden = self.model.forward_packed(input_ids, cu_seqlens)  # (T, D); reads cu_seqlens back
        else:
            ctx = VarlenContext(cu_seqlens.to(device=input_ids.device, dtype=torch.int32), max(seq_lens, default=0),
                                list(seq_lens))
            hidden = self.model.forward_hidden(input_ids, positions, ctx)  # (T, D)
        hidden = hidden.index_select(0, rows)  # (N, D); backward an index_add (rows are unique), not a sort
        weight = self.model.lm_head_weight
        device_type = hidden.device.type
        # one dtype for the kernel: autocast's (as F.linear would cast) else the weight's (.to is a no-op
        # where it matches); no CPU target-range check (a host read per micro-batch; ids come from the vocabulary)
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        # exact mode (Transformer.set_batch_invariant): the reduction the engine's behaviour log-probs use
        logprobs = linear_logprobs_invariant if getattr(self.model, "batch_invariant", False) else linear_logprobs
        return logprobs(hidden.to(dtype), weight.to(dtype), targets, temperature=temperature, mask=mask,
                        return_entropy=True, check_targets=False)
