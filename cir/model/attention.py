"""Attention backends: the seam between the transformer and whatever holds the keys and values.

The model computes q, k, v for the T tokens of a forward (rotary already applied) and hands them to an
AttentionContext passed in explicitly (no globals). This file has the stateless one:

    VarlenContext(cu_seqlens, max_seqlen)   causal attention within each packed sequence, none across

On CUDA (fp16/bf16) it calls flash_attn_varlen_func when flash-attn is installed, else torch's
varlen_attn (torch.nn.attention.varlen) where this torch has it. Otherwise torch SDPA:
one batched call when all sequences have the same length (the plain [B, T] forward), else one call
per sequence. Measured on the 2-core CPU, 6 sequences of 24..300 tokens (9 q / 3 kv heads, D=64):
loop 12 ms vs one call with a block-diagonal mask 54 ms (the mask only wins below ~100 tokens total).
The engine adds a PagedContext (writes k/v into the paged KV cache, attends over block tables).

Each context also has `attend_invariant`, the exact mode's attention (`Transformer.set_batch_invariant`):
`cir_kernels.batch_invariant`'s fixed-order reduction over the keys, so a query gets the same bits in
the packed training forward, a prefill chunk and a paged decode step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from cir_kernels.batch_invariant import causal_attention_invariant

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:  # CPU machines, or CUDA without the `gpu` extra
    flash_attn_varlen_func = None
try:  # torch's own varlen flash kernel (recent torch): one call per packed batch without flash-attn
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:
    torch_varlen_attn = None


class AttentionContext(Protocol):
    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q (T, Hq, D), k/v (T, Hkv, D) of this forward's tokens -> (T, Hq, D); scale D ** -0.5."""
        ...

    def attend_invariant(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`attend` with a batch-invariant reduction over the keys (exact mode)."""
        ...


@dataclass
class VarlenContext:
    """Packed sequences: token i of the batch belongs to sequence b where cu_seqlens[b] <= i < cu_seqlens[b+1]."""

    cu_seqlens: Tensor  # (B + 1,) int32, on the model's device
    max_seqlen: int
    seq_lens: list[int] | None = None  # host copy, filled from cu_seqlens when not given

    def __post_init__(self):
        if self.seq_lens is None:
            bounds = self.cu_seqlens.tolist()  # one host sync, once per forward
            self.seq_lens = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]

    @classmethod
    def from_seq_lens(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> VarlenContext:
        cu_seqlens = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.tensor(seq_lens, dtype=torch.int32).cumsum(0)
        return cls(cu_seqlens.to(device), max(seq_lens), list(seq_lens))

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Tensor) -> VarlenContext:
        ctx = cls(cu_seqlens, max_seqlen=0)
        ctx.max_seqlen = max(ctx.seq_lens, default=0)
        return ctx

    @property
    def is_uniform(self) -> bool:
        return all(n == self.seq_lens[0] for n in self.seq_lens)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        if flash_attn_varlen_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            return flash_attn_varlen_func(q, k, v, self.cu_seqlens, self.cu_seqlens,
                                          self.max_seqlen, self.max_seqlen, causal=True)
        global torch_varlen_attn
        if torch_varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            try:  # else the loop below: one SDPA launch per sequence and layer (owed: the GPU comparison)
                return torch_varlen_attn(q, k, v, self.cu_seqlens, self.cu_seqlens, self.max_seqlen, self.max_seqlen,
                                         window_size=(-1, 0), enable_gqa=k.shape[1] != q.shape[1])
            except RuntimeError:  # a torch built without its flash kernels: SDPA from now on
                torch_varlen_attn = None
        if self.is_uniform:
            return _sdpa_uniform(q, k, v, len(self.seq_lens))
        out = torch.empty_like(q)
        start = 0
        for n in self.seq_lens:
            out[start:start + n] = _sdpa_uniform(q[start:start + n], k[start:start + n], v[start:start + n], 1)
            start += n
        return out

    def attend_invariant(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # the paged cache's dtype: v's (a linear's output: autocast's dtype under autocast, else the
        # parameters'), where rotary left q, k in the wider dtype of its cos / sin
        q, k = q.to(v.dtype), k.to(v.dtype)
        outs, start = [], 0
        for n in self.seq_lens:
            outs.append(causal_attention_invariant(q[start:start + n], k[start:start + n], v[start:start + n]))
            start += n
        return torch.cat(outs) if outs else torch.empty_like(q)


def _sdpa_uniform(q: Tensor, k: Tensor, v: Tensor, num_seqs: int) -> Tensor:
    """Causal SDPA over `num_seqs` equal-length sequences packed in q/k/v (T, H, D)."""
    T, num_heads, head_dim = q.shape
    q, k, v = (x.view(num_seqs, T // num_seqs, x.shape[1], head_dim).transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != num_heads)
    return out.transpose(1, 2).reshape(T, num_heads, head_dim)
