"""Rewards: the last boxed answer of a response, and its equality with the reference (+1 / -1)."""
from cir.rewards.boxed import extract_boxed, strip_math_delimiters
from cir.rewards.math_equal import (
    CORRECT,
    INCORRECT,
    MathVerifier,
    configure,
    default_verifier,
    normalize_reference,
    score,
    score_many,
)

__all__ = [
    "CORRECT",
    "INCORRECT",
    "MathVerifier",
    "configure",
    "default_verifier",
    "extract_boxed",
    "normalize_reference",
    "score",
    "score_many",
    "strip_math_delimiters",
]
