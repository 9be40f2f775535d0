"""The decoder-only transformer (Llama / SmolLM2, Qwen2 / Qwen2.5, Qwen3), written by hand in torch.

Reads top to bottom: RMSNorm, Attention (GQA, optional q/k/v bias, optional Qwen3 q/k norm), MLP
(SwiGLU), Block, Transformer. Internally every forward works on packed tokens, hidden (T, D), with
one explicit position per token and an AttentionContext that says which tokens see which (see
attention.py): the plain [B, T] forward, the packed training forward and the engine's paged forward
share every line of the math. Module names follow Hugging Face's (minus the "model." prefix), so
checkpoint.py maps names one to one.

    model = Transformer(ModelConfig(...))
    logits = model(input_ids)                                   # (B, T) -> (B, T, V)
    hidden = model.forward_packed(input_ids, cu_seqlens)        # (T,) -> (T, D), after the final norm
    logits = model.compute_logits(hidden)

Exact mode, `model.set_batch_invariant(True)`: every op gives a token the same bits whatever else
runs in the call (decode step of any batch, prefill chunk of any size, packed training forward of
any micro-batch), so the engine's behaviour log-probs equal the training forward's exactly; the ops
are in cir_kernels/batch_invariant.py. Off by default (it costs speed, see bench/exact.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from cir.model.attention import AttentionContext, VarlenContext
from cir.model.config import ModelConfig
from cir.model.rope import RotaryEmbedding, apply_rotary
from cir_kernels.batch_invariant import linear_invariant, row_mean_invariant
from cir_kernels.batch_invariant_logprobs import linear_logprobs_invariant, logprobs_from_logits_invariant
from cir_kernels.linear_logprobs import linear_logprobs
from cir_kernels.logprobs import logprobs_from_logits


_SKINNY_ROWS = 64


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear; for 2..64 rows on CPU without autograd (decode steps), (W @ x^T)^T instead, with
    the rows padded to a multiple of 8 above 8.

    Same math, another summation order. MKL's time for these shapes is far from monotonic in the row
    count: a SmolLM2 decode step's 211 matmuls (2-core AMD EPYC, median of 3) took, at
        rows             2     4     8    12    13    15    16    28    32    64
        F.linear      53.3  49.4  46.4  49.7  55.7  61.7  55.6  72.6  77.4 119.2  ms
        (W @ x^T)^T   17.2  16.2  31.6  57.7  73.8  90.0  45.6  78.5  65.3 105.4
        same, padded     -     -     -  47.3  46.8  48.4     -  67.0  65.6 105.7
    The result is a transposed view (column-major); every torch op takes it as it is.
    """
    rows = x.shape[0] if x.dim() == 2 else 0
    if 1 < rows <= _SKINNY_ROWS and x.device.type == "cpu" and not torch.is_grad_enabled():
        padded = rows if rows <= 8 else -(-rows // 8) * 8
        if padded != rows:
            x = torch.cat((x, x.new_zeros(padded - rows, x.shape[1])))
        out = torch.mm(weight, x.t()) if bias is None else torch.addmm(bias[:, None], weight, x.t())
        return out.t()[:rows]
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) computing through `linear`."""

    batch_invariant = False

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_invariant:
            return linear_invariant(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, the statistics in float32 (as Llama / Qwen do), result in x's dtype.

    Exact mode divides by the sqrt: torch's CPU rsqrt rounds differently in its vector and scalar-tail
    code, so a row's bits would depend on where the tensor's length put it; and the mean of squares is
    `row_mean_invariant` (on CUDA torch splits a row's reduction by the tensor's shape)."""

    batch_invariant = False

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        if self.batch_invariant:
            x = x / torch.sqrt(row_mean_invariant(x.pow(2)) + self.eps)
        else:
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    batch_invariant = False  # exact mode: ctx.attend_invariant (a fixed order over the keys)

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        D, Dh = config.hidden_size, config.head_dim
        self.q_proj = Linear(D, self.num_heads * Dh, bias=config.attention_bias)
        self.k_proj = Linear(D, self.num_kv_heads * Dh, bias=config.attention_bias)
        self.v_proj = Linear(D, self.num_kv_heads * Dh, bias=config.attention_bias)
        self.o_proj = Linear(self.num_heads * Dh, D, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(Dh, config.rms_norm_eps)
            self.k_norm = RMSNorm(Dh, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext) -> Tensor:
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)  # (T, Hq, Dh)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, Dh)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)  # (T, Hkv, Dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attend = ctx.attend_invariant if self.batch_invariant else ctx.attend
        out = attend(self.layer_idx, q, k, v)  # (T, Hq, Dh)
        return self.o_proj(out.reshape(T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Exact mode writes silu as g / (1 + exp(-g)): torch's CPU
    silu, like rsqrt, rounds its scalar tail differently from its vector body."""

    batch_invariant = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate = self.gate_proj(x)
        act = gate / (1 + torch.exp(-gate)) if self.batch_invariant else F.silu(gate)
        return self.down_proj(act * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: AttentionContext) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Embedding -> blocks -> final norm; the LM head is applied by compute_logits (tied or not)."""

    batch_invariant = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else Linear(config.hidden_size, config.vocab_size, bias=False))
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                      config.max_position_embeddings)

    @property
    def lm_head_weight(self) -> Tensor:
        """(V, D): the output projection; the embedding matrix itself when tied."""
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def set_batch_invariant(self, enabled: bool = True) -> Transformer:
        """Switch the exact mode on or off for the whole model (engine and trainer share it)."""
        for module in self.modules():
            if hasattr(type(module), "batch_invariant"):
                module.batch_invariant = bool(enabled)
        return self

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) -> logits (..., V) (float32 in exact mode)."""
        if self.batch_invariant:  # float32: the very logits token_logprobs reduces
            return linear_invariant(hidden, self.lm_head_weight, out_dtype=torch.float32)
        return linear(hidden, self.lm_head_weight)

    def token_logprobs(self, hidden: Tensor, targets: Tensor, temperature: float = 1.0,
                       mask: Tensor | None = None, return_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """log_softmax(compute_logits(hidden) / temperature)[targets] (N,), float32, without the [N, V]
        logits: `cir_kernels.linear_logprobs`, or in exact mode its batch-invariant form. The training
        forward and the engine's recorded behaviour log-probs both come from here. Under autocast the
        hidden states and the head are cast to its dtype (as F.linear would be)."""
        weight = self.lm_head_weight
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        fn = linear_logprobs_invariant if self.batch_invariant else linear_logprobs
        return fn(hidden.to(dtype), weight.to(dtype), targets, temperature=temperature, mask=mask,
                  return_entropy=return_entropy)

    def logits_logprobs(self, logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
        """log_softmax(logits / temperature)[targets] (R,) float32 from `compute_logits`' output (R, V):
        what the engine records for the tokens it sampled from those logits. In exact mode the same
        bits as `token_logprobs` on the same hidden states (one LM-head GEMM, not two)."""
        if self.batch_invariant:
            return logprobs_from_logits_invariant(logits, targets, temperature)
        return logprobs_from_logits(logits, targets, temperature)

    def forward_hidden(self, input_ids: Tensor, positions: Tensor, ctx: AttentionContext) -> Tensor:
        """Packed tokens (T,) at `positions` (T,) -> final-norm hidden states (T, D)."""
        x = self.embed_tokens(input_ids)  # (T, D)
        # under autocast the residual stream stays fp32 while q / k leave their projections in the autocast
        # dtype: rotate them in it, so attention gets one dtype (flash-attn's; no fp32 q / k copies)
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        cos, sin = self.rotary(positions, dtype)  # (T, 1, Dh // 2) each
        use_checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if use_checkpointing:
                x = checkpoint(layer, x, cos, sin, ctx, use_reentrant=False)
            else:
                x = layer(x, cos, sin, ctx)
        return self.norm(x)

    def forward_packed(self, input_ids: Tensor, cu_seqlens: Tensor) -> Tensor:
        """Several sequences concatenated (T,), boundaries cu_seqlens (B + 1,) -> hidden (T, D).

        Each sequence starts at position 0 and attends causally to itself only.
        """
        if input_ids.dim() != 1:
            raise ValueError(f"forward_packed takes packed input_ids (T,), got shape {tuple(input_ids.shape)}")
        ctx = VarlenContext.from_cu_seqlens(cu_seqlens.to(device=input_ids.device, dtype=torch.int32))
        if sum(ctx.seq_lens) != input_ids.shape[0]:
            raise ValueError(f"cu_seqlens ends at {sum(ctx.seq_lens)} but there are {input_ids.shape[0]} tokens")
        seq_lens = torch.tensor(ctx.seq_lens, device=input_ids.device)
        starts = torch.repeat_interleave(ctx.cu_seqlens[:-1].long(), seq_lens,
                                         output_size=input_ids.shape[0])  # (T,): each token's sequence start
        positions = torch.arange(input_ids.shape[0], device=input_ids.device) - starts
        return self.forward_hidden(input_ids, positions, ctx)

    def forward(self, input_ids: Tensor) -> Tensor:
        """Plain causal forward: (B, T) -> logits (B, T, V)."""
        if input_ids.dim() != 2:
            raise ValueError(f"forward takes input_ids (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).repeat(B)
        ctx = VarlenContext.from_seq_lens([T] * B, device=input_ids.device)
        hidden = self.forward_hidden(input_ids.reshape(B * T), positions, ctx)
        return self.compute_logits(hidden).view(B, T, -1)
