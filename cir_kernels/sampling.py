"""Token sampling in Triton: temperature, top-k, top-p, min-p, greedy, per row, no sort, no host sync.

    from cir_kernels import sample
    tokens, logprobs = sample(logits, temperature=t, top_p=0.95, generator=seeds)   # (B,), (B,)

Semantics (shared with `cir_kernels.sample_reference`), for a row x of logits and T = temperature:
- T == 0: greedy, the lowest index among the maxima of x. Filters are ignored.
- T > 0: p = softmax(x / T). Keep the k largest (top_k > 0), then the shortest prefix (in decreasing
  order) holding a fraction top_p of the kept mass (top-p on the renormalised top-k distribution),
  then tokens with p >= min_p * max(p). Ties at a threshold are all kept, so a row may keep more than
  k tokens. Draw from p restricted to the kept set and renormalised.
- Returned log-prob: log_softmax(x / T)[token] over the FULL vocabulary, i.e. before filtering. That is
  what the trainer recomputes from the same parameters, so it is the behaviour log-prob of an
  untruncated policy at that temperature. With truncation the token was actually drawn with
  probability p / kept_mass > p: the returned value underestimates it by log(kept_mass). Greedy rows
  return log_softmax(x)[token] (temperature 1).

backend None: CUDA -> the Triton kernels (cir_kernels/sampling_triton.py has them, their launcher,
the math and the memory traffic); CPU -> `sample_reference` (cir_kernels/sampling_reference.py).
How the kernels work: a row is split over ceil(V / MIN_CHUNK) programs whatever the batch; pass 1
finds max, log-sum-exp and (temperature-only rows) the exponential race in ONE read; top-k / top-p
thresholds are bracketed by 32 pivots a pass (no sort) until the bracket fits a buffer that one
program settles exactly, racing in the same pass.
"""
from __future__ import annotations

import torch

from cir_kernels._checks import Generator, pick_backend, prepare_sampling
from cir_kernels.sampling_reference import sample_reference
from cir_kernels.sampling_triton import row_seeds, sample_triton


def _may_filter(value: float | torch.Tensor, is_on, prepared: torch.Tensor) -> bool:
    """Whether some row may use a filter: exact for numbers and host tensors, True for device tensors
    (reading them would synchronise)."""
    if isinstance(value, torch.Tensor) and value.is_cuda:
        return True
    return bool(is_on(prepared).any())


def sample(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_p: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    min_p: float | torch.Tensor = 0.0,
    generator: Generator = None,
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row of `logits` (B, V), fp32 / bf16 / fp16, last dim contiguous.

    temperature, top_p, top_k, min_p: a number or a [B] tensor each (per-row settings; a batch may
    mix greedy and sampled rows). temperature >= 0 (0 = greedy), top_p in (0, 1] (1 = off),
    top_k >= 0 (0 = off), min_p in [0, 1] (0 = off). Values inside CUDA tensors are not checked
    (checking would synchronise); out-of-range ones there are clamped into a non-empty kept set.
    Passing numbers (not CUDA tensors) for the filters a batch does not use skips their passes.
    generator: None (torch's default RNG), a torch.Generator, an int seed, or a [B] int tensor of
    per-row seeds. A given seed always gives the same tokens on the same path, whatever the batch.
    backend: None = Triton on CUDA, torch reference on CPU; "triton" forces the kernel (on CPU only
    under TRITON_INTERPRET=1); "torch" forces `sample_reference`.
    Returns tokens (B,) int64 and logprobs (B,) float32: see the module docstring for their meaning.
    """
    if pick_backend(backend, logits) == "torch":
        return sample_reference(logits, temperature, top_p, top_k, min_p, generator)
    raw = (temperature, top_p, top_k, min_p)
    temperature, top_p, top_k, min_p = prepare_sampling(logits, temperature, top_p, top_k, min_p)
    seeds = row_seeds(generator, logits.shape[0], logits.device)
    vocab_size = logits.shape[1]
    all_greedy = not _may_filter(raw[0], lambda t: t > 0, temperature)
    may_filter = (
        not all_greedy and _may_filter(raw[2], lambda k: (k > 0) & (k < vocab_size), top_k),
        not all_greedy and _may_filter(raw[1], lambda p: p < 1, top_p),
        not all_greedy and _may_filter(raw[3], lambda p: p > 0, min_p),
    )
    return sample_triton(logits, temperature, top_p, top_k, min_p, seeds, may_filter=may_filter)
