"""Evaluation metrics over n samples per problem: avg@n and the unbiased pass@k (Chen et al., 2021).

pass@k for one problem with c correct among n samples is the chance that k samples drawn without
replacement from the n contain a correct one: 1 - C(n - c, k) / C(n, k), computed as the product
1 - prod_{i = n - c + 1}^{n} (1 - k / i), which stays exact-ish for large n.

    pass_at_k(n=16, c=3, k=4)                 # one problem
    avg_at_n([3, 16, 0], n=16)                # mean accuracy over problems
    pass_at_k_curve([3, 16, 0], n=16)         # mean pass@k for k = 1..n
"""
from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c are correct."""
    if not (n >= 1 and 0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"need n >= 1, 0 <= c <= n, 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _check_counts(num_correct: Sequence[int], n: int) -> None:
    if not num_correct:
        raise ValueError("need at least one problem")
    bad = [c for c in num_correct if not 0 <= c <= n]
    if bad:
        raise ValueError(f"correct counts must lie in [0, {n}], got {bad[:5]}")


def avg_at_n(num_correct: Sequence[int], n: int) -> float:
    """avg@n: the mean over problems of the fraction of its n samples that are correct."""
    _check_counts(num_correct, n)
    return sum(c / n for c in num_correct) / len(num_correct)


def mean_pass_at_k(num_correct: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over problems."""
    _check_counts(num_correct, n)
    return sum(pass_at_k(n, c, k) for c in num_correct) / len(num_correct)


def pass_at_k_curve(num_correct: Sequence[int], n: int) -> list[float]:
    """[mean pass@1, ..., mean pass@n] over problems."""
    return [mean_pass_at_k(num_correct, n, k) for k in range(1, n + 1)]
