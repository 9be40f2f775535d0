"""RL math against hand-computed cases: advantages (REINFORCE++ baseline, GRPO, RLOO) and the loss."""
import math

import pytest
import torch

from cir.rl import advantages, groups_with_signal, kl_penalty, policy_loss

REWARDS = torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.0, 1.0, 1.0, -1.0]])


def close(a: torch.Tensor, b, atol: float = 1e-5) -> None:
    b = torch.as_tensor(b, dtype=a.dtype)
    err = (a - b).abs()
    assert torch.allclose(a, b, atol=atol), f"max err {err.max():.3g}, mean err {err.mean():.3g}\n{a}\n{b}"


# -- advantages ------------------------------------------------------------------------------------

def test_reinforce_pp_baseline():
    # group means 0 and 0.5; centred values have batch mean 0 and population variance 7/8
    centred = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.5, 0.5, 0.5, -1.5]])
    close(advantages(REWARDS), centred / math.sqrt(7 / 8))
    close(advantages(REWARDS, std_normalize=False), centred)


def test_reinforce_pp_baseline_token_weighted_like_openrlhf():
    # centred [1, -1] weighted by 3 and 1 tokens: mean 0.5, variance (3 * 0.25 + 2.25) / 4 = 0.75
    out = advantages(torch.tensor([[1.0, -1.0]]), token_counts=torch.tensor([[3, 1]]))
    close(out, torch.tensor([[0.5, -1.5]]) / math.sqrt(0.75))


def test_grpo():
    # group stds (Bessel): sqrt(4/3) and 1
    close(advantages(REWARDS, "grpo"), [[x / math.sqrt(4 / 3) for x in (1, -1, -1, 1)], [0.5, 0.5, 0.5, -1.5]])
    close(advantages(REWARDS, "grpo", std_normalize=False), [[1, -1, -1, 1], [0.5, 0.5, 0.5, -1.5]])


def test_rloo():
    # r minus the mean of the other three samples
    close(advantages(REWARDS, "rloo"), [[4 / 3, -4 / 3, -4 / 3, 4 / 3], [2 / 3, 2 / 3, 2 / 3, -2.0]])
    normalized = advantages(REWARDS, "rloo", std_normalize=True)
    close(normalized.mean(), 0.0)
    close(normalized.std(unbiased=False), 1.0, atol=1e-4)


@pytest.mark.parametrize("method", ["reinforce_pp_baseline", "grpo", "rloo"])
def test_uniform_groups_get_zero_advantage(method):
    rewards = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [1.0, -1.0, -1.0]])
    out = advantages(rewards, method)
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    close(out[:2], torch.zeros(2, 3))
    assert (out[2, 0] > 0) and (out[2, 1:] < 0).all()


def test_groups_with_signal():
    rewards = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, -1.0], [-1.0, 1.0]])
    assert groups_with_signal(rewards).tolist() == [False, True, False, True]


def test_advantages_reject_bad_input():
    with pytest.raises(ValueError, match="'ppo'"):
        advantages(REWARDS, "ppo")
    with pytest.raises(ValueError, match=r"\[G, n\]"):
        advantages(torch.ones(4))
    with pytest.raises(ValueError, match="n >= 2"):
        advantages(torch.ones(3, 1))


# -- policy loss -----------------------------------------------------------------------------------

def one_token_loss(ratio: float, adv: float, **kwargs):
    old = torch.tensor([-1.0], dtype=torch.float64)
    logp = (old + math.log(ratio)).requires_grad_()
    loss, stats = policy_loss(logp, old, torch.tensor([adv], dtype=torch.float64), torch.ones(1, dtype=torch.bool),
                              **kwargs)
    loss.backward()
    return loss.item(), logp.grad.item(), stats


@pytest.mark.parametrize("ratio, adv, loss, grad, clipped", [
    (1.5, 1.0, -1.28, 0.0, 1.0),    # A > 0, ratio above 1 + clip_high: clipped, no gradient
    (0.5, 1.0, -0.5, -0.5, 0.0),    # A > 0, ratio below 1 - clip_low: not clipped (pessimistic)
    (0.5, -1.0, 0.8, 0.0, 1.0),     # A < 0, ratio below 1 - clip_low: clipped
    (1.5, -1.0, 1.5, 1.5, 0.0),     # A < 0, ratio above 1 + clip_high: not clipped
    (1.1, 2.0, -2.2, -2.2, 0.0),    # inside the trust region
    (1.25, 1.0, -1.25, -1.25, 0.0),  # inside for clip_high = 0.28, outside for a symmetric 0.2
])
def test_clip_low_high(ratio, adv, loss, grad, clipped):
    got_loss, got_grad, stats = one_token_loss(ratio, adv)
    assert got_loss == pytest.approx(loss) and got_grad == pytest.approx(grad)
    assert stats["clip_frac"].item() == clipped
    assert stats["ratio_mean"].item() == pytest.approx(ratio)
    assert stats["approx_kl"].item() == pytest.approx(ratio - 1 - math.log(ratio))


def test_symmetric_clip_differs_at_1_25():
    assert one_token_loss(1.25, 1.0, clip_high=0.2)[0] == pytest.approx(-1.2)


def test_dual_clip():
    loss, grad, stats = one_token_loss(5.0, -1.0, dual_clip=3.0)
    assert loss == pytest.approx(3.0) and grad == 0.0 and stats["dual_clip_frac"].item() == 1.0
    loss, grad, _ = one_token_loss(5.0, -1.0)
    assert loss == pytest.approx(5.0) and grad == pytest.approx(5.0)
    loss, grad, stats = one_token_loss(5.0, 1.0, dual_clip=3.0)    # positive advantage: untouched
    assert loss == pytest.approx(-1.28) and stats["dual_clip_frac"].item() == 0.0
    with pytest.raises(ValueError, match="dual_clip must be > 1"):
        one_token_loss(1.0, 1.0, dual_clip=0.5)


def constant_loss_case():
    """4 loss tokens with per-token loss 1, 2, 3, 4 (ratio 1, A = -loss); token 2 masked out."""
    old = torch.zeros(5)
    adv = -torch.tensor([1.0, 2.0, 99.0, 3.0, 4.0])
    mask = torch.tensor([1, 1, 0, 1, 1], dtype=torch.bool)
    seq_ids = torch.tensor([0, 0, 0, 0, 1])
    return old.clone().requires_grad_(), old, adv, mask, seq_ids


@pytest.mark.parametrize("agg, expected", [
    ("token_mean", (1 + 2 + 3 + 4) / 4),
    ("seq_mean_token_mean", ((1 + 2 + 3) / 3 + 4) / 2),
    ("seq_mean_token_sum", ((1 + 2 + 3) + 4) / 2),
])
def test_aggregation_modes_and_mask(agg, expected):
    logp, old, adv, mask, seq_ids = constant_loss_case()
    loss, stats = policy_loss(logp, old, adv, mask, agg=agg, seq_ids=seq_ids)
    assert loss.item() == pytest.approx(expected)
    assert stats["num_masked_tokens"].item() == 4
    loss.backward()
    assert logp.grad[2] == 0.0  # the masked token gets no gradient


def test_masked_tokens_can_hold_garbage():
    logp = torch.tensor([-1.0, 0.0], requires_grad=True)
    old = torch.tensor([-1.0, -float("inf")])          # e.g. a prompt token never sampled
    loss, stats = policy_loss(logp, old, torch.tensor([1.0, float("nan")]), torch.tensor([True, False]))
    loss.backward()
    assert loss.item() == pytest.approx(-1.0) and torch.isfinite(logp.grad).all()
    assert all(torch.isfinite(v).all() for v in stats.values())


def test_seq_modes_need_seq_ids():
    logp, old, adv, mask, _ = constant_loss_case()
    with pytest.raises(ValueError, match="needs seq_ids"):
        policy_loss(logp, old, adv, mask, agg="seq_mean_token_mean")


def random_batch(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    logp = old + (torch.rand(n, generator=g, dtype=torch.float64) - 0.5) * 0.8
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    mask = torch.rand(n, generator=g) > 0.3
    seq_ids = torch.repeat_interleave(torch.arange(4), torch.tensor([3, 4, 2, 3]))  # 12 tokens
    return logp, old, adv, mask, seq_ids


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_global_normaliser_makes_accumulation_equal_one_big_batch(agg):
    logp, old, adv, mask, seq_ids = random_batch(12)
    big = logp.clone().requires_grad_()
    loss, _ = policy_loss(big, old, adv, mask, agg=agg, seq_ids=seq_ids)
    loss.backward()

    # two micro-batches split at a sequence boundary, each sequence renumbered from 0
    num_tokens = mask.sum().item()
    num_seqs = sum(bool(mask[seq_ids == s].any()) for s in range(4))
    acc = logp.clone().requires_grad_()
    total = 0.0
    for lo, hi in ((0, 7), (7, 12)):
        ids = seq_ids[lo:hi] - seq_ids[lo]
        part, _ = policy_loss(acc[lo:hi], old[lo:hi], adv[lo:hi], mask[lo:hi], agg=agg, seq_ids=ids,
                              num_tokens=num_tokens, num_seqs=num_seqs)
        part.backward()
        total += part.item()
    assert total == pytest.approx(loss.item(), abs=1e-12)
    close(acc.grad, big.grad, atol=1e-12)


def test_kl_estimators():
    logp, ref = torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25]))
    d = math.log(0.5)  # ref - logp
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(-d)
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * d * d)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(0.5 - d - 1)
    with pytest.raises(ValueError, match="'k9'"):
        kl_penalty(logp, ref, "k9")


def test_kl_and_entropy_terms():
    logp = torch.log(torch.tensor([0.5], dtype=torch.float64)).requires_grad_()
    old = logp.detach().clone()
    ref = torch.log(torch.tensor([0.25], dtype=torch.float64))
    ent = torch.tensor([2.0], dtype=torch.float64)
    mask = torch.ones(1, dtype=torch.bool)
    base, _ = policy_loss(logp, old, torch.ones(1, dtype=torch.float64), mask)
    loss, stats = policy_loss(logp, old, torch.ones(1, dtype=torch.float64), mask, ref_logprobs=ref, kl_coef=0.1,
                              entropy=ent, entropy_coef=0.01)
    k3 = 0.5 - math.log(0.5) - 1
    assert loss.item() == pytest.approx(base.item() + 0.1 * k3 - 0.01 * 2.0)
    assert stats["kl"].item() == pytest.approx(k3) and stats["entropy"].item() == 2.0
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(logp, old, torch.ones(1), mask, kl_coef=0.1)


def test_gradcheck():
    logp, old, adv, mask, seq_ids = random_batch(12, seed=1)
    ratio = (logp - old).exp()
    assert ((ratio - 0.8).abs() > 1e-3).all() and ((ratio - 1.28).abs() > 1e-3).all()  # away from kinks
    ref = old - 0.1
    ent = torch.rand(12, dtype=torch.float64).requires_grad_()

    def f(lp, en):
        return policy_loss(lp, old, adv, mask, agg="seq_mean_token_mean", seq_ids=seq_ids, ref_logprobs=ref,
                           kl_coef=0.05, entropy=en, entropy_coef=0.01)[0]

    assert torch.autograd.gradcheck(f, (logp.clone().requires_grad_(), ent))


def test_loss_rejects_bad_input():
    logp, old, adv, mask, _ = constant_loss_case()
    with pytest.raises(ValueError, match="advantages shape"):
        policy_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="'sum'"):
        policy_loss(logp, old, adv, mask, agg="sum")
