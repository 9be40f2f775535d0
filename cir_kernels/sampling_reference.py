"""Plain-torch token sampling: the CPU path of `cir_kernels.sample` and the yardstick of its Triton kernel.

    tokens, logprobs = sample_reference(logits, temperature=0.7, top_p=0.95, generator=1234)

Same signature and same filtering semantics as `cir_kernels.sample` (see its docstring), written the
obvious way: thresholds are read off a sorted copy of each row (skipped when no row filters); the
draw is one uniform per row through the inverse CDF: from torch's RNG, or hashed (SplitMix64) from
the row's own seed when per-row seeds are given.
Rows are processed in chunks of about 4M logits so temporaries stay small for any batch size.
The random streams are torch's, not the Triton kernel's Philox: for the same seed the two paths
pick different (identically distributed) tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cir_kernels._checks import Generator, check_row_seeds, prepare_sampling

# Rows per chunk = _CHUNK_ELEMENTS // V: ~16 MiB per fp32 temporary (V = 152064 -> 27 rows).
_CHUNK_ELEMENTS = 1 << 22


def keep_mask(
    z: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Which tokens survive top-k, then top-p on the renormalised top-k set, then min-p. [R, V] bool.

    z: (R, V) float32 logits / temperature; lse: (R,) their log-sum-exp. Ties at a threshold are kept.
    """
    vocab_size = z.shape[1]
    sorted_z = z.sort(dim=1, descending=True).values  # (R, V)
    # 1) top-k: keep z >= the k-th largest value
    k = torch.where((top_k > 0) & (top_k < vocab_size), top_k, torch.full_like(top_k, vocab_size))
    threshold_k = sorted_z.gather(1, (k - 1)[:, None])  # (R, 1)
    # 2) top-p: shortest prefix of the sorted row holding top_p of the top-k mass
    sorted_probs = torch.exp(sorted_z - lse[:, None])
    mass_k = (sorted_probs * (sorted_z >= threshold_k)).sum(1)
    cum = sorted_probs.cumsum(1)
    last = (cum < (top_p * mass_k)[:, None]).sum(1).clamp(max=vocab_size - 1)
    threshold_p = torch.where(top_p[:, None] < 1.0, sorted_z.gather(1, last[:, None]), threshold_k)
    # 3) min-p: p >= min_p * p_max  <=>  z >= z_max + log(min_p)
    threshold_min = sorted_z[:, :1] + torch.log(min_p)[:, None]
    return (z >= threshold_k) & (z >= threshold_p) & (z >= threshold_min)


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finaliser on int64 tensors (wrapping multiply; logical shifts by masking)."""
    x = x + _GOLDEN
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _MIX1
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _MIX2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def row_uniforms(generator: Generator, rows: slice, num_rows: int, device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row, (R, 1) float64: from torch's RNG, or hashed from per-row seeds
    (a row's draw then depends on its seed alone, not on which other rows share the batch)."""
    if isinstance(generator, torch.Tensor):
        bits = _splitmix64(generator[rows].to(torch.int64))
        return (((bits >> 11) & ((1 << 53) - 1)).to(torch.float64) / float(1 << 53))[:, None]
    return torch.rand(num_rows, 1, generator=generator, dtype=torch.float64, device=device)


_CDF_CHUNK = 256


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first index i with sum(weights[:i+1]) > u * sum(weights): weights (R, V) >= 0
    float32 with a positive sum, u (R, 1) float64 in [0, 1) -> (R,) int64. A zero weight is never
    chosen.

    Two levels, float64 where the sums are formed: chunk totals of 256 weights, a cumulative sum over
    the chunks, then a cumulative sum inside the chosen chunk. A float64 cumsum over the whole row
    took 3.5 ms for 16 x 49152 (2-core CPU; float32 0.3 ms, but its rounding, relative to the running
    total, would skew the draw of rare tokens).
    """
    num_rows, vocab_size = weights.shape
    pad = (-vocab_size) % _CDF_CHUNK
    chunks = F.pad(weights, (0, pad)).view(num_rows, -1, _CDF_CHUNK)  # (R, C, 256)
    chunk_cdf = chunks.sum(-1, dtype=torch.float64).cumsum(-1)  # (R, C)
    target = u * chunk_cdf[:, -1:]  # (R, 1)
    chunk = torch.searchsorted(chunk_cdf, target, right=True).clamp(max=chunk_cdf.shape[1] - 1)  # (R, 1)
    # the chunk holding the target has positive mass; rounding can still push it one past the
    # last positive chunk: step back to it
    has_mass = chunks.amax(-1) > 0  # (R, C)
    last = chunk_cdf.shape[1] - 1 - has_mass.flip(-1).to(torch.int8).argmax(-1, keepdim=True)
    chunk = torch.minimum(chunk, last)
    before = torch.where(chunk > 0, chunk_cdf.gather(1, (chunk - 1).clamp(min=0)), 0.0)
    inside = chunks.gather(1, chunk[:, :, None].expand(-1, -1, _CDF_CHUNK))[:, 0]  # (R, 256)
    inside_cdf = inside.double().cumsum(-1)
    index = torch.searchsorted(inside_cdf, target - before, right=True)  # (R, 1)
    last_in = _CDF_CHUNK - 1 - (inside > 0).flip(-1).to(torch.int8).argmax(-1, keepdim=True)
    return (chunk * _CDF_CHUNK + torch.minimum(index, last_in))[:, 0]


def sample_reference(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_p: float | torch.Tensor = 1.0,
    top_k: int | torch.Tensor = 0,
    min_p: float | torch.Tensor = 0.0,
    generator: Generator = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `cir_kernels.sample`: same arguments, same distribution, returns (tokens, logprobs)."""
    temperature, top_p, top_k, min_p = prepare_sampling(logits, temperature, top_p, top_k, min_p)
    num_rows, vocab_size = logits.shape
    device = logits.device
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator(device=device).manual_seed(generator)
    elif isinstance(generator, torch.Tensor):
        check_row_seeds(generator, num_rows, device)
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, an int seed or a tensor of seeds, got {generator!r}")

    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=device)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // vocab_size)
    with torch.no_grad():
        for start in range(0, num_rows, rows_per_chunk):
            rows = slice(start, min(start + rows_per_chunk, num_rows))
            x = logits[rows].float()  # (R, V)
            temp = temperature[rows]
            is_greedy = temp == 0
            # the CPU path may sync: skip the sort when no row filters, the draw when all are greedy,
            # the division when every row has temperature 1, the argmax when no row is greedy
            # (measured on SmolLM2, 16 rows x 49152: the sort alone was 15% of a decode step)
            if bool(is_greedy.all()):
                chosen = x.argmax(dim=1)
                z, lse = x, torch.logsumexp(x, dim=1)
            else:
                z = x / torch.where(is_greedy, 1.0, temp)[:, None] if bool((temp != 1).any()) else x
                m = z.amax(dim=1, keepdim=True)
                weights = (z - m).exp_()  # (R, V) unnormalised probabilities: the only exp pass
                lse = m[:, 0] + weights.sum(dim=1).log()
                filtered = (top_p[rows] < 1) | ((top_k[rows] > 0) & (top_k[rows] < vocab_size)) | (min_p[rows] > 0)
                if bool(filtered.any()):
                    weights *= keep_mask(z, lse, top_p[rows], top_k[rows], min_p[rows])
                # one uniform per row through the inverse CDF: V exponentials took 18.7 ms for
                # 16 x 49152 and torch.multinomial 35 ms (2-core CPU, loaded), 4x the whole draw
                chosen = inverse_cdf(weights, row_uniforms(generator, rows, weights.shape[0], device))
                if bool(is_greedy.any()):
                    chosen = torch.where(is_greedy, x.argmax(dim=1), chosen)
            tokens[rows] = chosen
            logprobs[rows] = z.gather(1, chosen[:, None]).squeeze(1) - lse
    return tokens, logprobs
