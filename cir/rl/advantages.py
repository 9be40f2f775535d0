"""Advantages from the rewards of G prompt groups of n samples each: one number per response.

Every token of a response gets its response's advantage (outcome reward, gamma = 1).

- "reinforce_pp_baseline" (default, the paper's): REINFORCE++ with a group-mean baseline, as
  OpenRLHF's `reinforce_baseline` estimator:
      a_ij = r_ij - mean_j(r_ij)                       (group baseline)
      A_ij = (a_ij - mean(a)) / (std(a) + eps)         (whole-batch statistics, population std)
  OpenRLHF takes the whole-batch mean / std over response tokens, which weights each response by
  its length; pass `token_counts` to do the same, else every response counts once. The batch is
  everything passed in: in a multi-rank run pass the gathered rewards of all ranks.
- "grpo": A_ij = (r_ij - mean_j r_ij) / (std_j r_ij + eps), Bessel-corrected group std as GRPO;
  `std_normalize=False` keeps only the centring (Dr. GRPO).
- "rloo": A_ij = r_ij - mean_{k != j} r_ik (leave-one-out baseline) = n / (n - 1) * (r_ij - mean_j);
  `std_normalize=True` adds the whole-batch normalisation above.

A group whose rewards are all equal has zero advantage under every method; `groups_with_signal`
finds the others, for the option of filtering them out.
"""
import torch

METHODS = ("reinforce_pp_baseline", "grpo", "rloo")
_DEFAULT_STD_NORMALIZE = {"reinforce_pp_baseline": True, "grpo": True, "rloo": False}


def _batch_normalize(a: torch.Tensor, weights: torch.Tensor | None, eps: float) -> torch.Tensor:
    w = torch.ones_like(a) if weights is None else weights.to(a.dtype)
    total = w.sum().clamp(min=1e-12)
    mean = (a * w).sum() / total
    var = ((a - mean) ** 2 * w).sum() / total
    return (a - mean) / (var.sqrt() + eps)


def advantages(rewards: torch.Tensor, method: str = "reinforce_pp_baseline", std_normalize: bool | None = None,
               eps: float = 1e-6, token_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Per-response advantages [G, n] from rewards [G, n] (G prompts, n samples each).

    std_normalize: None takes the method's default (True for reinforce_pp_baseline and grpo,
        False for rloo); the std is the whole batch's for reinforce_pp_baseline / rloo, the
        group's for grpo.
    token_counts: [G, n] response lengths (loss tokens); weights the whole-batch mean / std by
        tokens as OpenRLHF does. Unused by grpo.
    """
    if method not in METHODS:
        raise ValueError(f"advantage method must be one of {METHODS}, got {method!r}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, n], got shape {tuple(rewards.shape)}")
    num_groups, n = rewards.shape
    if num_groups == 0 or n < 2:
        raise ValueError(f"group baselines need G >= 1 groups of n >= 2 samples, got shape {tuple(rewards.shape)}")
    if token_counts is not None and token_counts.shape != rewards.shape:
        raise ValueError(f"token_counts shape {tuple(token_counts.shape)} != rewards shape {tuple(rewards.shape)}")
    if std_normalize is None:
        std_normalize = _DEFAULT_STD_NORMALIZE[method]
    r = rewards.float()
    centred = r - r.mean(dim=1, keepdim=True)  # (G, n)
    if method == "grpo":
        if not std_normalize:
            return centred
        return centred / (r.std(dim=1, keepdim=True) + eps)
    a = centred if method == "reinforce_pp_baseline" else centred * (n / (n - 1))  # rloo
    return _batch_normalize(a, token_counts, eps) if std_normalize else a


def groups_with_signal(rewards: torch.Tensor) -> torch.Tensor:
    """BoolTensor[G]: True for groups whose rewards are not all equal (they carry a gradient)."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, n], got shape {tuple(rewards.shape)}")
    return (rewards != rewards[:, :1]).any(dim=1)
