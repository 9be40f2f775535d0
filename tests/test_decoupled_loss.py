"""The decoupled PPO objective (cir/rl/loss.py, AReaL arXiv 2505.24298): equal to the plain loss, bit for
bit, when every token was sampled by the current version (proximal == behaviour); otherwise equal to a
per-token reference written from the paper's formula with Python floats."""
import math

import pytest
import torch

from cir.rl.loss import AGG_MODES, policy_loss


def tokens(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(n, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) < 0.8
    seq_ids = torch.arange(n) // 10
    return logp, old, adv, mask, seq_ids


@pytest.mark.parametrize("agg", AGG_MODES)
def test_current_version_everywhere_is_the_plain_loss_bit_for_bit(agg):
    logp, old, adv, mask, seq_ids = tokens()
    plain, st = policy_loss(logp, old, adv, mask, agg=agg, seq_ids=seq_ids)
    (grad,) = torch.autograd.grad(plain, logp)
    decoupled, st2 = policy_loss(logp, old, adv, mask, agg=agg, seq_ids=seq_ids, proximal_logprobs=old.clone(),
                                 weight_cap=5.0)
    (grad2,) = torch.autograd.grad(decoupled, logp)
    assert torch.equal(plain, decoupled) and torch.equal(grad, grad2)
    assert st2["is_trunc_frac"] == 0 and st2["is_weight_mean"] == 1 and torch.equal(st["clip_frac"], st2["clip_frac"])


def test_stale_tokens_follow_the_papers_formula():
    logp, old, adv, mask, _ = tokens(seed=1)
    g = torch.Generator().manual_seed(2)
    prox = old + torch.randn(old.shape, generator=g, dtype=torch.float64) * 1.0  # some weights > cap
    cap, lo, hi = 2.0, 0.2, 0.28
    loss, st = policy_loss(logp, old, adv, mask, clip_low=lo, clip_high=hi, proximal_logprobs=prox, weight_cap=cap)
    (grad,) = torch.autograd.grad(loss, logp)
    ref, ref_grad, truncated = 0.0, [], 0
    count = int(mask.sum())
    for lp, mu, px, a, m in zip(logp.tolist(), old.tolist(), prox.tolist(), adv.tolist(), mask.tolist(), strict=True):
        if not m:
            ref_grad.append(0.0)
            continue
        r, w = math.exp(lp - px), math.exp(px - mu)
        truncated += w > cap
        w = min(w, cap)
        unclipped, clipped = -a * r, -a * min(max(r, 1 - lo), 1 + hi)
        ref += w * max(unclipped, clipped) / count
        # d/dlp: only the unclipped branch carries a gradient (d r / d lp = r)
        ref_grad.append(w * -a * r / count if unclipped >= clipped else 0.0)
    assert truncated > 0
    assert abs(loss.item() - ref) < 1e-12
    assert torch.allclose(grad, torch.tensor(ref_grad, dtype=torch.float64), atol=1e-12)
    assert abs(st["is_trunc_frac"].item() - truncated / count) < 1e-6


def test_bad_weight_cap_is_a_clear_error():
    logp, old, adv, mask, _ = tokens()
    with pytest.raises(ValueError, match="weight_cap"):
        policy_loss(logp, old, adv, mask, proximal_logprobs=old, weight_cap=0.5)
