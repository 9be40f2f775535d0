"""The sampler's statistical tests: their decision rule, false-alarm rate and power, from the math.

A test draws n tokens (one per row; rows have their own seeds, so their draws are independent) from
a distribution p0 over the vocabulary, maps them to bins (groups of tokens with equal probability),
and rejects "the kernel samples p0" when
  (A) a token of probability 0 is drawn                      P(A | p0) = 0
  (B) Pearson's X^2 over the bins of p0's support (bins expected < 5 pooled) exceeds the
      chi-square quantile at alpha_B                         P(B | p0) ~ alpha_B (chi-square limit)
  (C) a bin likely to be drawn (P(count 0) <= alpha / (2 k) each) is never drawn
                                                             P(C | p0) = sum_j (1 - p0_j)^n = alpha_C
with alpha_B = alpha - alpha_C: the false-alarm rate is <= alpha = 1e-4.
Power against a bug that samples p1 instead is at least the largest of
  P(A | p1) = 1 - (1 - p1(outside p0's support))^n,
  P(C | p1) = 1 if p1 gives 0 to a bin of (C), else max_j (1 - p1_j)^n over those bins,
  P(B | p1) = ncx2.sf(threshold, df, lambda),  lambda = n sum_bins (p1_j - p0_j)^2 / p0_j
(the noncentral chi-square limit of X^2 under p1, restricted to p0's support). `test_kernels_sampling`
computes both numbers for each test and asserts them (false alarm <= 1e-4, power >= 0.999 against
the bugs it names), and `test_false_alarm_rates_hold` checks alpha by simulating the rule on p0.
"""
from __future__ import annotations

import numpy as np
from scipy.stats import chi2, ncx2

ALPHA = 1e-4


def exact_distribution(logits, temperature: float, top_k: int = 0, top_p: float = 1.0,
                       min_p: float = 0.0) -> np.ndarray:
    """The sampler's target distribution (cir_kernels/sampling.py), in float64 with Python sorting:
    softmax(x / T), top-k (ties at the k-th value kept), top-p on the renormalised top-k set (the
    shortest prefix reaching top_p of its mass; ties kept), min-p, renormalised. T = 0: the argmax."""
    x = np.asarray(logits, dtype=np.float64)
    if temperature == 0:
        q = np.zeros_like(x)
        q[int(np.argmax(x))] = 1.0
        return q
    p = np.exp((x - x.max()) / temperature)
    p /= p.sum()
    values = np.sort(p)[::-1]
    keep = np.ones_like(p, dtype=bool)
    if 0 < top_k < len(p):
        keep &= p >= values[top_k - 1]
    if top_p < 1.0:
        kept_sorted = np.sort(p[keep])[::-1]
        last = min(int(np.searchsorted(np.cumsum(kept_sorted), top_p * kept_sorted.sum())), len(kept_sorted) - 1)
        keep &= p >= kept_sorted[last]
    keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def bin_of_tokens(p: np.ndarray, decimals: int = 12) -> np.ndarray:
    """Token -> bin: tokens of equal probability (to `decimals` digits) share a bin."""
    _, inverse = np.unique(np.round(p, decimals), return_inverse=True)
    return inverse


class CountTest:
    """The rule above for n draws of p0 (a token distribution), tokens grouped by `bins` (token -> bin)."""

    def __init__(self, p0: np.ndarray, n: int, bins: np.ndarray | None = None, alpha: float = ALPHA):
        self.bins = bin_of_tokens(p0) if bins is None else np.asarray(bins)
        self.n = n
        self.p0 = np.bincount(self.bins, weights=p0)  # per bin
        support = self.p0 > 0
        self.zero_rule = support & ((1 - self.p0) ** n <= alpha / (2 * support.sum()))
        self.alpha_zero = float(((1 - self.p0[self.zero_rule]) ** n).sum())
        # pool the sparse bins of the support into one (X^2's chi-square limit needs expected >= 5)
        sparse = support & (self.p0 * n < 5)
        self.pool = np.where(support, np.arange(len(self.p0)), -1)
        if sparse.sum() > 1 or (sparse.any() and self.p0[sparse].sum() * n < 5):
            self.pool[sparse] = np.flatnonzero(sparse)[0]
        self.cells = np.unique(self.pool[support])
        self.df = len(self.cells) - 1
        self.alpha_chi = alpha - self.alpha_zero
        self.threshold = float(chi2.isf(self.alpha_chi, self.df)) if self.df > 0 else float("inf")
        self.false_alarm = self.alpha_zero + (self.alpha_chi if self.df > 0 else 0.0)

    def _cells(self, per_bin: np.ndarray) -> np.ndarray:
        return np.array([per_bin[self.pool == c].sum() for c in self.cells])

    def statistic(self, counts: np.ndarray) -> float:
        observed, expected = self._cells(counts), self._cells(self.p0) * self.n
        return float(((observed - expected) ** 2 / expected).sum())

    def rejection(self, tokens) -> str | None:
        """Why the draws reject p0, or None."""
        counts = np.bincount(self.bins[np.asarray(tokens)], minlength=len(self.p0)).astype(np.float64)
        if counts[self.p0 == 0].sum() > 0:
            return f"drew tokens of probability 0: bin counts {counts}, p0 {self.p0}"
        if (counts[self.zero_rule] == 0).any():
            return f"a likely bin was never drawn: bin counts {counts}, expected {self.p0 * self.n}"
        if self.df > 0 and self.statistic(counts) > self.threshold:
            return (f"X^2 = {self.statistic(counts):.1f} > {self.threshold:.1f} (df {self.df}): bin counts "
                    f"{counts}, expected {self.p0 * self.n}")
        return None

    def power(self, p1_tokens: np.ndarray) -> float:
        """Lower bound of P(reject) when the kernel samples p1 (a token distribution) instead."""
        p1 = np.bincount(self.bins, weights=p1_tokens, minlength=len(self.p0))
        outside = float(p1[self.p0 == 0].sum())
        power_a = 1 - (1 - outside) ** self.n
        zero_p1 = p1[self.zero_rule]
        power_c = 1.0 if (zero_p1 == 0).any() else float(((1 - zero_p1) ** self.n).max(initial=0.0))
        power_b = 0.0
        if self.df > 0 and outside < 1:
            q1 = self._cells(p1) / (1 - outside)
            q0 = self._cells(self.p0)
            lam = self.n * float(((q1 - q0) ** 2 / q0).sum())
            power_b = float(ncx2.sf(self.threshold, self.df, lam))
        return max(power_a, power_b, power_c)

    def simulated_false_alarm(self, trials: int, seed: int = 0) -> float:
        """The rule's rejection rate on `trials` multinomial samples of p0 (numpy, no kernel)."""
        rng = np.random.default_rng(seed)
        counts = rng.multinomial(self.n, self.p0 / self.p0.sum(), size=trials).astype(np.float64)
        reject = (counts[:, self.zero_rule] == 0).any(1)
        if self.df > 0:
            observed = np.stack([counts[:, self.pool == c].sum(1) for c in self.cells], 1)
            expected = self._cells(self.p0) * self.n
            reject |= ((observed - expected) ** 2 / expected).sum(1) > self.threshold
        return float(reject.mean())
