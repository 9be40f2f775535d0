"""Evaluation metrics: the unbiased pass@k estimator and avg@n against direct computation."""
import itertools
import math

import pytest

from cir.eval_metrics import avg_at_n, mean_pass_at_k, pass_at_k, pass_at_k_curve


@pytest.mark.parametrize("n, c, k", [(5, 2, 1), (5, 2, 2), (5, 2, 3), (5, 2, 4), (6, 0, 2), (6, 6, 1), (16, 3, 8)])
def test_pass_at_k_matches_the_combinatorial_formula(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k))


def test_pass_at_k_by_enumerating_subsets():
    outcomes = [True, False, False, True, False]
    subsets = list(itertools.combinations(outcomes, 3))
    assert pass_at_k(5, 2, 3) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))


def test_pass_at_1_is_accuracy_and_edges():
    assert pass_at_k(16, 4, 1) == pytest.approx(0.25)
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_avg_and_curves():
    counts = [4, 16, 0]
    assert avg_at_n(counts, 16) == pytest.approx((0.25 + 1 + 0) / 3)
    assert mean_pass_at_k(counts, 16, 1) == pytest.approx(avg_at_n(counts, 16))
    curve = pass_at_k_curve(counts, 16)
    assert len(curve) == 16 and curve == sorted(curve) and curve[-1] == pytest.approx(2 / 3)


@pytest.mark.parametrize("args", [(0, 0, 1), (4, 5, 1), (4, 2, 0), (4, 2, 5), (4, -1, 1)])
def test_pass_at_k_rejects_bad_counts(args):
    with pytest.raises(ValueError, match=f"n={args[0]}"):
        pass_at_k(*args)


def test_avg_rejects_bad_counts():
    with pytest.raises(ValueError, match="17"):
        avg_at_n([3, 17], 16)
    with pytest.raises(ValueError, match="at least one problem"):
        avg_at_n([], 16)
