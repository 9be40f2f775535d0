"""The clipped policy-gradient loss on packed token tensors.

All inputs are flat [N] over the tokens of a micro-batch of packed sequences; `mask` is the loss
mask (1 on sampled tokens, 0 on prompt and interpreter-output tokens). Per token, with
ratio = exp(logp - old_logp) and advantage A:

    pg   = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))     (PPO, asymmetric clip)
    pg   = min(pg, -A * dual_clip)   where A < 0                              (dual clip, optional)
    loss = pg + kl_coef * KL(ref) - entropy_coef * entropy

Aggregation over the masked tokens:
- "token_mean": sum(loss * mask) / num_tokens. Pass `num_tokens` = the masked tokens of the whole
  mini-batch (all micro-batches, all ranks) and the per-micro-batch losses sum to the mini-batch
  loss, so gradient accumulation (and DDP's gradient averaging, times world size) gives the
  gradient of one big batch. Without it the micro-batch's own count is used.
- "seq_mean_token_mean": mean over sequences of each sequence's token mean.
- "seq_mean_token_sum": mean over sequences of each sequence's token sum.
  Both need `seq_ids` [N] (the sequence index of each token); the global normaliser is `num_seqs`,
  counting sequences with at least one masked token.

Decoupled objective (AReaL, arXiv 2505.24298, eq. 5), for tokens sampled by an older policy version
(rollout.mode: partial): with the behaviour log-prob mu (recorded at sampling), the proximal log-prob
prox (the policy at the start of this update) and the current one logp,

    ratio = exp(logp - prox)                          (clipped against the proximal policy, as above)
    w     = min(exp(prox - mu), weight_cap)           (importance weight behaviour -> proximal, no grad)
    pg    = w * max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))

so the trust region is around the policy being updated, and the staleness is corrected by w (truncated
at `weight_cap`: a token far off-policy cannot dominate). Where prox == mu (every token sampled by the
current version, the sync mode) w is exactly 1 and this is the plain loss, bit for bit.

KL to a reference policy, per token with d = ref_logp - logp: "k1" -d, "k2" d^2 / 2,
"k3" exp(d) - d - 1 (unbiased, non-negative estimate of KL(pi || ref) from samples of pi).
The log-ratio is clamped to [-20, 20] before exp, so one stale token can't overflow.
"""
import torch

AGG_MODES = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
KL_TYPES = ("k1", "k2", "k3")
MAX_LOG_RATIO = 20.0


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || ref) from the log-probs of tokens sampled from pi."""
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")
    d = (ref_logprobs - logprobs).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
    if kl_type == "k1":
        return -d
    if kl_type == "k2":
        return 0.5 * d * d
    return torch.exp(d) - d - 1


def _aggregate(values: torch.Tensor, mask: torch.Tensor, agg: str, seq_ids: torch.Tensor | None,
               num_tokens: float | None, num_seqs: float | None, num_seq_ids: int | None) -> torch.Tensor:
    masked = torch.where(mask, values, torch.zeros_like(values))
    if agg == "token_mean":
        denom = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
        return masked.sum() / denom
    if num_seq_ids is None:  # reads the largest id back from the device: pass it to stay sync-free
        num_seq_ids = int(seq_ids.max()) + 1 if seq_ids.numel() else 0
    num_ids = num_seq_ids
    zeros = torch.zeros(num_ids, dtype=values.dtype, device=values.device)
    seq_sum = zeros.index_add(0, seq_ids, masked)  # (S,)
    seq_len = zeros.index_add(0, seq_ids, mask.to(values.dtype))  # (S,)
    per_seq = seq_sum if agg == "seq_mean_token_sum" else seq_sum / seq_len.clamp(min=1)
    denom = num_seqs if num_seqs is not None else (seq_len > 0).sum().clamp(min=1)
    return per_seq.sum() / denom


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token_mean",
    seq_ids: torch.Tensor | None = None,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_type: str = "k3",
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    num_seq_ids: int | None = None,
    proximal_logprobs: torch.Tensor | None = None,
    weight_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped policy loss (scalar) and detached statistics over the masked tokens.

    logprobs: [N] current policy, with grad; old_logprobs: [N] behaviour policy; advantages: [N]
    per token; mask: [N] bool / 0-1; entropy: [N] per-token entropy of the current policy (with
    grad when entropy_coef > 0). Stats (means over this call's masked tokens): clip_frac (tokens
    whose clipped branch is active), dual_clip_frac, approx_kl (k3 of old vs current), ratio_mean,
    ratio_max, pg_loss, kl (to ref), entropy, num_masked_tokens.
    num_seq_ids: a host bound on seq_ids (all < num_seq_ids) for the seq-mean modes; without it the
    bound is read from the device (one host synchronisation). Nothing else here synchronises.
    proximal_logprobs: [N] the policy at the start of the update, no grad (the decoupled objective, see
    the module docstring; None: the plain loss); weight_cap: the truncation of the behaviour ->
    proximal weight (None: untruncated). Extra stats then: is_weight_mean, is_trunc_frac.
    """
    # 1) check arguments
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if agg != "token_mean" and seq_ids is None:
        raise ValueError(f"agg={agg!r} needs seq_ids (the sequence index of each token)")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got clip_low={clip_low}, clip_high={clip_high}")
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    named = {"old_logprobs": old_logprobs, "advantages": advantages, "mask": mask, "seq_ids": seq_ids,
             "ref_logprobs": ref_logprobs, "entropy": entropy, "proximal_logprobs": proximal_logprobs}
    for name, t in named.items():
        if t is not None and t.shape != logprobs.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != logprobs shape {tuple(logprobs.shape)}")
    if logprobs.dim() != 1:
        raise ValueError(f"expected flat [N] token tensors, got shape {tuple(logprobs.shape)}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("kl_coef != 0 needs ref_logprobs")
    if entropy_coef != 0.0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy")
    if weight_cap is not None and weight_cap < 1:
        raise ValueError(f"weight_cap must be >= 1, got {weight_cap}")
    mask = mask.bool()
    advantages = advantages.to(logprobs.dtype)

    # 2) clipped surrogate, per token (against the proximal policy in the decoupled objective)
    anchor = old_logprobs if proximal_logprobs is None else proximal_logprobs.detach()
    log_ratio = torch.where(mask, logprobs - anchor, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio.clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO))  # (N,)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    is_clipped = pg_clipped > pg_unclipped
    is_dual_clipped = torch.zeros_like(mask)
    if dual_clip is not None:
        pg_dual = -advantages * dual_clip
        is_dual_clipped = (advantages < 0) & (pg > pg_dual)
        pg = torch.where(advantages < 0, torch.minimum(pg, pg_dual), pg)
    weight = is_truncated = None
    if proximal_logprobs is not None:  # importance weight behaviour -> proximal, truncated
        log_w = torch.where(mask, anchor - old_logprobs, torch.zeros_like(anchor)).clamp(-MAX_LOG_RATIO, MAX_LOG_RATIO)
        weight = torch.exp(log_w)
        if weight_cap is not None:
            is_truncated = weight > weight_cap
            weight = weight.clamp(max=weight_cap)
        pg = weight * pg

    # 3) optional KL to the reference and entropy bonus
    loss = pg
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, kl_type)
        if kl_coef != 0.0:
            loss = loss + kl_coef * kl
    if entropy is not None and entropy_coef != 0.0:
        loss = loss - entropy_coef * entropy

    total = _aggregate(loss, mask, agg, seq_ids, num_tokens, num_seqs, num_seq_ids)

    # 4) statistics over this call's masked tokens
    with torch.no_grad():
        count = mask.sum()

        def mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x.float(), 0.0).sum() / count.clamp(min=1)
        stats = {
            "clip_frac": mean(is_clipped),
            "dual_clip_frac": mean(is_dual_clipped),
            "approx_kl": mean(ratio - 1 - log_ratio),
            "ratio_mean": mean(ratio),
            "ratio_max": torch.where(mask, ratio, 0.0).amax() if ratio.numel() else ratio.new_zeros(()),
            "pg_loss": mean(pg),
            "num_masked_tokens": count,
        }
        if kl is not None:
            stats["kl"] = mean(kl)
        if weight is not None:
            stats["is_weight_mean"] = mean(weight)
            stats["is_trunc_frac"] = mean(is_truncated) if is_truncated is not None else mean(weight * 0)
        if entropy is not None:
            stats["entropy"] = mean(entropy)
        stats = {k: v.detach() for k, v in stats.items()}
    return total, stats
