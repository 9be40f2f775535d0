"""Token sampling in one Triton kernel: temperature, top-k, top-p, min-p, greedy, per row, no host sync.

    from kernels import sample
    tokens, logprobs = sample(logits, temperature=t, top_p=0.95, generator=seeds)   # (B,), (B,)

Semantics (shared with `kernels.sample_reference`), for a row x of logits and T = temperature:
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

Kernel, one program per row, every pass streams the row from memory (fp32 math for any input dtype):
  1) max m, first argmax, s = sum_i exp((x_i - m)/T)                            (online rescaling)
  2) top-k and top-p thresholds without sorting: a radix select on the order-preserving 32-bit key of
     each logit, 4 bits per pass (8 passes). Each pass sums the weight w_i (1 for top-k,
     exp((x_i - m)/T) for top-p) of the keys sharing the prefix found so far, per value of the next
     digit; the digit kept is the largest whose suffix sum still reaches the target. The result is
     the exact largest key K with sum_{key_i >= K} w_i >= target (target k, resp. top_p * kept mass).
  3) exponential race: argmax over kept i of x_i/T + G_i, G_i = -log(-log U_i) (Gumbel-max, the
     log of p_i / E_i with E_i ~ Exp(1)). U_i = Philox(key = seed of the row, counter = i): rows have
     independent streams and the draw does not depend on the block size.
Memory traffic per row: (2 + 8 [top-k] + 8 [top-p]) reads of V * itemsize bytes, 12 bytes written;
rows with only temperature / min-p read the row twice, greedy rows once. V up to 2^31 - 1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._checks import check_tensor, pick_backend
from kernels.sampling_reference import Generator, prepare_sampling, sample_reference

# Block sizes: not yet tuned on a GPU (owed). A [RADIX_BLOCK_V, 16] bucket tile of 256 x 16 fp32 is
# 16 registers per thread at 8 warps; streaming passes use 2048-wide blocks like Liger's row kernels.
_BLOCK_V = 2048
_RADIX_BLOCK_V = 256
_NUM_WARPS = 8


@triton.jit
def _ordered_key(x):
    """float32 -> int64 in [0, 2^32) with the same order (-0.0 counted as +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits < 0, -1 - bits, bits + 2147483648)


@triton.jit
def _radix_select(row_ptr, V, m, inv_t, target, BY_MASS: tl.constexpr, BLOCK_V: tl.constexpr):
    """Largest key K with W(K) = sum_{key_i >= K} w_i >= target, w_i = exp((x_i - m)/T) if BY_MASS else 1.

    Returns (K, mass of the keys >= K). 8 passes over the row, 4 bits of the key each.
    """
    digits = tl.arange(0, 16)
    prefix = (m * 0.0).to(tl.int64)  # high digits found so far
    above_w = m * 0.0  # weight of keys whose high digits exceed the prefix
    above_mass = m * 0.0
    kept_mass = m * 0.0
    for p in tl.static_range(8):
        shift = 28 - 4 * p
        bucket_w = tl.zeros((16,), tl.float32)
        bucket_mass = tl.zeros((16,), tl.float32)
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < V
            x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
            key = _ordered_key(x)
            hit = valid & ((key >> (shift + 4)) == prefix)
            in_bucket = hit[:, None] & (((key >> shift) & 15).to(tl.int32)[:, None] == digits[None, :])
            e = tl.exp((x - m) * inv_t)
            bucket_mass += tl.sum(tl.where(in_bucket, e[:, None], 0.0), axis=0)
            if not BY_MASS:
                bucket_w += tl.sum(in_bucket.to(tl.float32), axis=0)
        if BY_MASS:
            bucket_w = bucket_mass
        # suffix[b] = sum_{b' >= b} bucket_w[b']
        suffix = tl.sum(tl.where(digits[None, :] >= digits[:, None], bucket_w[None, :], 0.0), axis=1)
        digit = tl.max(tl.where(above_w + suffix >= target, digits, 0), axis=0)
        above_w += tl.sum(tl.where(digits > digit, bucket_w, 0.0), axis=0)
        above_mass += tl.sum(tl.where(digits > digit, bucket_mass, 0.0), axis=0)
        kept_mass = above_mass + tl.sum(tl.where(digits == digit, bucket_mass, 0.0), axis=0)
        prefix = prefix * 16 + digit.to(tl.int64)
    return prefix, kept_mass


@triton.jit
def _sample_kernel(
    logits_ptr, logits_row_stride,
    temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, seed_ptr,
    tokens_ptr, logprobs_ptr,
    V,
    BLOCK_V: tl.constexpr, RADIX_BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    temperature = tl.load(temperature_ptr + row)
    is_greedy = temperature <= 0.0
    inv_t = 1.0 / tl.where(is_greedy, 1.0, temperature)

    # 1) m = max x, first argmax, s = sum exp((x - m)/T), rescaled online block by block
    m = float("-inf")
    s = 0.0
    argmax = 0
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        argmax = tl.where(block_max > m, start + tl.argmax(x, axis=0), argmax)
        m_new = tl.maximum(m, block_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp((m - m_safe) * inv_t) + tl.sum(tl.exp((x - m_safe) * inv_t), axis=0)
        m = m_new
    log_s = tl.log(s)

    token = argmax
    if not is_greedy:
        # 2) thresholds: key >= threshold and x >= x_min
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        min_p = tl.load(min_p_ptr + row)
        threshold = (m * 0.0).to(tl.int64)
        kept_mass = s
        if (top_k > 0) & (top_k < V):
            threshold, kept_mass = _radix_select(row_ptr, V, m, inv_t, top_k.to(tl.float32), False, RADIX_BLOCK_V)
        if top_p < 1.0:
            threshold_p, _ = _radix_select(row_ptr, V, m, inv_t, top_p * kept_mass, True, RADIX_BLOCK_V)
            threshold = tl.maximum(threshold, threshold_p)
        threshold = tl.minimum(threshold, _ordered_key(m))  # the max always survives
        x_min = tl.minimum(m + tl.log(min_p) / inv_t, m)  # min_p = 0 -> -inf

        # 3) exponential race over the kept tokens
        seed = tl.load(seed_ptr + row)
        best = float("-inf")
        for start in range(0, V, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < V
            x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
            keep = valid & (_ordered_key(x) >= threshold) & (x >= x_min)
            gumbel = -tl.log(-tl.log(tl.rand(seed, offs)))
            score = tl.where(keep, x * inv_t + gumbel, float("-inf"))
            block_best = tl.max(score, axis=0)
            token = tl.where(block_best > best, start + tl.argmax(score, axis=0), token)
            best = tl.maximum(best, block_best)

    x_token = tl.load(row_ptr + token).to(tl.float32)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, (x_token - m) * inv_t - log_s)


def row_seeds(generator: Generator, num_rows: int, device: torch.device) -> torch.Tensor:
    """Per-row Philox keys [num_rows] int64 on `device`, without a host sync.

    None: drawn from torch's default generator of `device`. torch.Generator: drawn from it (it must
    live on `device`). int seed: row r gets key (r << 32) + (seed mod 2^32), so a seed fixes every
    row's stream. Tensor: used as given, one key per row (e.g. a sequence id mixed with its step).
    """
    if isinstance(generator, torch.Tensor):
        check_tensor("generator", generator, ndim=1, integer=True, device=device)
        if generator.shape[0] != num_rows:
            raise ValueError(f"generator (per-row seeds) must have shape [{num_rows}], got {tuple(generator.shape)}")
        return generator.to(torch.int64).contiguous()
    if isinstance(generator, int) and not isinstance(generator, bool):
        rows = torch.arange(num_rows, dtype=torch.int64, device=device)
        return (rows << 32) + (generator % 2**32)
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None and generator.device != device:
            raise ValueError(f"generator lives on {generator.device}, logits on {device}")
        return torch.randint(0, 2**62, (num_rows,), dtype=torch.int64, device=device, generator=generator)
    raise ValueError(f"generator must be a torch.Generator, an int seed or a tensor of seeds, got {generator!r}")


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launcher: per-row parameters already checked and shaped [B] by `prepare_sampling`."""
    num_rows, vocab_size = logits.shape
    assert logits.stride(1) == 1 and seeds.shape == (num_rows,)
    tokens = torch.empty(num_rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
    if num_rows == 0:
        return tokens, logprobs
    block_v = min(_BLOCK_V, triton.next_power_of_2(vocab_size))
    radix_block_v = min(_RADIX_BLOCK_V, block_v)
    _sample_kernel[(num_rows,)](
        logits, logits.stride(0),
        temperature, top_p, top_k, min_p, seeds,
        tokens, logprobs,
        vocab_size,
        BLOCK_V=block_v, RADIX_BLOCK_V=radix_block_v, num_warps=_NUM_WARPS,
    )
    return tokens, logprobs


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
    generator: None (torch's default RNG), a torch.Generator, an int seed, or a [B] int tensor of
    per-row seeds. A given seed always gives the same tokens on the same path.
    backend: None = Triton on CUDA, torch reference on CPU; "triton" forces the kernel (on CPU only
    under TRITON_INTERPRET=1); "torch" forces `sample_reference`.
    Returns tokens (B,) int64 and logprobs (B,) float32: see the module docstring for their meaning.
    """
    if pick_backend(backend, logits) == "torch":
        return sample_reference(logits, temperature, top_p, top_k, min_p, generator)
    temperature, top_p, top_k, min_p = prepare_sampling(logits, temperature, top_p, top_k, min_p)
    seeds = row_seeds(generator, logits.shape[0], logits.device)
    return sample_triton(logits, temperature, top_p, top_k, min_p, seeds)
