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

How (cir_kernels/sampling_triton.py has the math and the memory traffic): a row is split over
ceil(V / _MIN_CHUNK) programs whatever the batch; pass 1 finds max, log-sum-exp and (temperature-only
rows) the exponential race in ONE read; top-k / top-p thresholds are bracketed by 32 pivots a pass
(no sort) until the bracket fits a buffer that one program settles exactly, racing in the same pass.
"""
from __future__ import annotations

import torch
import triton

from cir_kernels._checks import check_tensor, pick_backend
from cir_kernels.sampling_reference import Generator, prepare_sampling, sample_reference
from cir_kernels.sampling_triton import _race_kernel, _refine_kernel, _stats_kernel

# Not yet tuned on a GPU (owed, see bench/kernels.py). Streaming passes (stats, race) read blocks of
# _BLOCK_V logits; the refine pass a [_RADIX_BLOCK_V, _NUM_PIVOTS] compare tile (4096 = 32 per thread
# at 4 warps); a program owns >= _MIN_CHUNK logits (V = 152064 -> 75 programs per row, so B = 1
# already spreads over half the SMs of an H100).
_BLOCK_V = 1024
_RADIX_BLOCK_V = 128
_NUM_PIVOTS = 32
_MIN_CHUNK = 2048
_MAX_SPLITS = 128
_REFINE_PASSES = 8  # per filter at most: (_NUM_PIVOTS / 2 + 1)^8 = 17^8 > 2^32 keys
# Split refine launches; rows still open after them finish in one solo launch (one program a row).
# 2 = one pivot pass + the buffer, what top-p 0.95 and top-k 50 + top-p 0.95 take at V = 152064 on
# N(0, 3^2) logits (measured in the interpreter, bench/kernels.py --sampler-only).
_SPLIT_REFINE_PASSES = 2
# A bracket holding <= _COMPACT_CAP tokens is settled by one program from a buffer of 8 B a token
# (64 KiB a row: 16 MiB at B = 256); with 8192, one pivot pass then the buffer settle the cases above.
_COMPACT_CAP = 8192
_NUM_WARPS = 4

# Row state between passes (layout in cir_kernels/sampling_triton.py)
_STATE_F, _STATE_I = 5, 6


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


def split_plan(vocab_size: int) -> tuple[int, int, int, int]:
    """(programs per row, logits per program, streaming block, refine block): a function of V alone,
    so that a row's arithmetic, and its token, do not depend on the batch."""
    splits = max(1, min(triton.cdiv(vocab_size, _MIN_CHUNK), _MAX_SPLITS))
    per_split = triton.cdiv(vocab_size, splits)
    block_v = max(4, min(_BLOCK_V, triton.next_power_of_2(per_split)))  # 4 | block: Philox gives 4 at a time
    refine_block = min(_RADIX_BLOCK_V, block_v)
    chunk = triton.cdiv(per_split, block_v) * block_v
    return triton.cdiv(vocab_size, chunk), chunk, block_v, refine_block


# Per-row pass counters, zero between calls (each pass's last program resets its row's counter), kept
# per (device, stream) on CUDA so that a call costs no memset launch; fresh on CPU (the interpreter),
# where an interrupted call could leave them dirty.
_COUNTERS: dict[tuple, torch.Tensor] = {}


def _counters(num_rows: int, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.zeros(num_rows, dtype=torch.int32, device=device)
    key = (str(device), torch.cuda.current_stream(device).cuda_stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < num_rows:
        counters = torch.zeros(max(num_rows, 256), dtype=torch.int32, device=device)
        _COUNTERS[key] = counters
    return counters


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    *,
    may_filter: tuple[bool, bool, bool] = (True, True, True),
    return_passes: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Launcher: per-row parameters already checked and shaped [B] by `prepare_sampling`.

    may_filter = (top-k, top-p, min-p): whether some row may use that filter. A False skips its
    launches (refine passes, race); True is always correct (rows that do not filter exit at once).
    return_passes: also return each row's number of refine passes (B,) int64 (what bench reports).
    """
    num_rows, vocab_size = logits.shape
    assert logits.stride(1) == 1 and seeds.shape == (num_rows,)
    device = logits.device
    tokens = torch.empty(num_rows, dtype=torch.int64, device=device)
    logprobs = torch.empty(num_rows, dtype=torch.float32, device=device)
    if num_rows == 0:
        return (tokens, logprobs, tokens.clone()) if return_passes else (tokens, logprobs)
    splits, chunk, block_v, refine_block = split_plan(vocab_size)
    block_s = triton.next_power_of_2(splits)
    part_f = torch.empty(num_rows, splits, 4, dtype=torch.float32, device=device)
    part_i = torch.empty(num_rows, splits, 2, dtype=torch.int32, device=device)
    state_f = torch.empty(num_rows, _STATE_F, dtype=torch.float32, device=device)
    state_i = torch.empty(num_rows, _STATE_I, dtype=torch.int64, device=device)
    counters = _counters(2 * num_rows, device)  # pass counters, then buffer cursors
    grid = (num_rows, splits)
    _stats_kernel[grid](
        logits, logits.stride(0), temperature, top_p, top_k, min_p, seeds,
        part_f, part_i, state_f, state_i, counters, tokens, logprobs,
        vocab_size, chunk, splits,
        BLOCK_V=block_v, BLOCK_S=block_s, num_warps=_NUM_WARPS,
    )
    may_k, may_p, may_min_p = may_filter
    if may_k or may_p:
        cap = min(_COMPACT_CAP, triton.cdiv(vocab_size, 16) * 16)
        count_part = torch.empty(num_rows, splits, _NUM_PIVOTS, dtype=torch.int32, device=device)
        mass_part = torch.empty(num_rows, splits, _NUM_PIVOTS, dtype=torch.float32, device=device)
        buf_x = torch.empty(num_rows, cap, dtype=torch.float32, device=device)
        buf_i = torch.empty(num_rows, cap, dtype=torch.int32, device=device)
        # the split passes that usually settle a row (a pivot pass, then the buffer; one more for
        # top-k then top-p), then one launch in which each row still open runs all it may need alone
        # (grid, passes per launch, chunks per program)
        plan = [(grid, 1, 1)] * (_SPLIT_REFINE_PASSES + int(may_k and may_p))
        plan.append(((num_rows, 1), 2 * _REFINE_PASSES, splits))
        for launch_grid, num_passes, chunks_per_program in plan:
            _refine_kernel[launch_grid](
                logits, logits.stride(0), temperature, top_p, top_k, min_p, seeds,
                count_part, mass_part, part_f, part_i, buf_x, buf_i,
                state_f, state_i, counters, counters[num_rows:], tokens, logprobs,
                vocab_size, chunk, splits, cap, 2 * _REFINE_PASSES, num_passes, chunks_per_program,
                launch_grid[1], NUM_PIVOTS=_NUM_PIVOTS, BLOCK_V=refine_block, BLOCK_S=block_s, num_warps=_NUM_WARPS,
            )
    if may_k or may_p or may_min_p:
        _race_kernel[grid](
            logits, logits.stride(0), temperature, min_p, seeds,
            part_f, part_i, state_f, state_i, counters, tokens, logprobs,
            vocab_size, chunk, splits,
            BLOCK_V=block_v, BLOCK_S=block_s, num_warps=_NUM_WARPS,
        )
    return (tokens, logprobs, state_i[:, 5]) if return_passes else (tokens, logprobs)


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
