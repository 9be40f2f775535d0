"""The Triton kernels of `cir_kernels.sample` and their launcher `sample_triton` (the semantics and the
public API are in cir_kernels/sampling.py; the torch twin is cir_kernels/sampling_reference.py; device
functions: the thresholds in cir_kernels/sampling_select.py, the race in cir_kernels/sampling_race.py,
a row's parameters, state and pass counter in cir_kernels/sampling_state.py).

    tokens, logprobs = sample_triton(logits, *prepare_sampling(logits, t, top_p, top_k, min_p), row_seeds(g, B, dev))

Row state between passes (strides 6 and 5 below): int64 (phase, lo, hi, count at lo, count at hi,
refine passes run), float32 (m, log s, mass at lo, mass at hi, target); phase 0 top-k, 1 top-p,
2 race, 3 token written.

Kernels. Every row is split into S = ceil(V / MIN_CHUNK) chunks (at most MAX_SPLITS), one program
per (row, chunk); S depends on V only, so a row's arithmetic, and hence its token, is the same
whatever the batch. A pass ends with the last program of a row (an atomic counter per row, reset by
that program) merging the row's S partial results; the next pass is the next launch.
  1) stats: m = max x, first argmax, s = sum_i exp((x_i - m)/T) (online rescaling), min x, and for a
     row without filters the exponential race over all tokens: token = argmax_i x_i/T + G_i,
     G_i = -log(-log U_i) (Gumbel-max), U_i = Philox(key = seed of the row, counter = i // 4, output
     i % 4). The draw does not depend on the block size or the split. Greedy and temperature-only
     rows are finished here: ONE read of the logits.
  2) refine (top-k / top-p rows), no sorting. The kept set is {key_i >= theta} for the order-
     preserving 32-bit key of x, theta the largest key with W(theta) >= target, W(K) =
     sum_{key_i >= K} w_i (w_i = 1 and target k for top-k; w_i = exp((x_i - m)/T) and target
     top_p * W_mass(theta_k) for top-p). A bracket [lo, hi) holds theta: W(lo) >= target > W(hi),
     starting at [order_key(min x), order_key(m) + 1). Each refine launch does one of:
     a) pivot pass, while the bracket holds > COMPACT_CAP tokens: W at 32 pivots in the bracket
        (a [block, 32] compare tile), half evenly spaced keys (the bracket shrinks >= 17x a pass, so
        8 passes reach one key), half evenly spaced values from a lower bound (see pivots);
     b) compaction pass: the tokens of the bracket (all tokens >= lo when they fit, so that top-p
        after top-k settles too) go to a per-row buffer; the row's last program finishes the
        bisection on the buffer alone, with exact int64 mass sums (the buffer's order, set by
        atomics, does not change them). The same pass races over the tokens surely kept
        (key >= the buffered range) and the last program over the buffered ones with key >= theta:
        the token is written here. A filter settles when [lo, hi) holds one token or one key.
     The launcher runs SPLIT_REFINE_PASSES such launches split over programs (what usual rows need),
     then one "solo" launch, one program per row, in which a row still open (ties, near-flat rows)
     loops over all the passes it may still need: 5 launches in all (6 when a batch may use both
     top-k and top-p), not 2 + 8 per filter.
     A token x_j is kept by top-p iff the mass strictly above it is < target: ties and the max stay.
  3) race, for rows settled by a pivot pass and min-p-only rows: the exponential race over key >=
     theta and x >= m + T log(min_p); the last program writes token and log-prob.
Memory traffic per row, R = V * itemsize: greedy / temperature-only: R (+ 24 B of partials per chunk);
min-p only: 2R; top-k and / or top-p: (2 + n) R, n pivot passes before the bracket fits the buffer
(measured in the interpreter at V = 152064 on N(0, 3^2) logits: n = 1 for top-p 0.95 and for
top-k 50 + top-p 0.95, i.e. 3 reads; more for ties or near-flat rows, at most 8 per filter, those
beyond the split passes read by one program), plus
256 B of pivot partials per chunk and pass and 8 B per buffered token; 12 B written.
Compute per pivot pass: 32 compares and ~3 adds per token, the same at every batch size (the pivots
fix the summation order and so the token).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cir_kernels._checks import Generator, check_row_seeds
from cir_kernels.sampling_race import (race_block, race_buffer, race_fold, race_threshold, race_winner, store_race_part,
                                       write_token)
from cir_kernels.sampling_select import (count_mass_ge, narrow, order_key, pivots, search_buffer, settle,
                                         start_top_p)
from cir_kernels.sampling_state import STATE_F, STATE_I, is_last, row_params, store_state

# Not yet tuned on a GPU (owed, see bench/kernels.py). Streaming passes (stats, race) read blocks of
# BLOCK_V logits; the refine pass a [RADIX_BLOCK_V, NUM_PIVOTS] compare tile (4096 = 32 per thread
# at 4 warps); a program owns >= MIN_CHUNK logits (V = 152064 -> 75 programs per row, so B = 1
# already spreads over half the SMs of an H100).
BLOCK_V = 1024
RADIX_BLOCK_V = 128
NUM_PIVOTS = 32
MIN_CHUNK = 2048
MAX_SPLITS = 128
REFINE_PASSES = 8  # per filter at most: (NUM_PIVOTS / 2 + 1)^8 = 17^8 > 2^32 keys
# Split refine launches; rows still open after them finish in one solo launch (one program a row).
# 2 = one pivot pass + the buffer, what top-p 0.95 and top-k 50 + top-p 0.95 take at V = 152064 on
# N(0, 3^2) logits (measured in the interpreter, bench/kernels.py --sampler-only).
SPLIT_REFINE_PASSES = 2
# A bracket holding <= COMPACT_CAP tokens is settled by one program from a buffer of 8 B a token
# (64 KiB a row: 16 MiB at B = 256); with 8192, one pivot pass then the buffer settle the cases above.
COMPACT_CAP = 8192
NUM_WARPS = 4

@triton.jit
def _stats_kernel(
    logits_ptr, logits_row_stride,
    temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, seed_ptr,
    part_f_ptr, part_i_ptr, state_f_ptr, state_i_ptr, counter_ptr,
    tokens_ptr, logprobs_ptr,
    V, chunk, num_splits,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_ptr = logits_ptr + row * logits_row_stride
    is_greedy, is_plain, inv_t, top_k, top_p, min_p, need_k, need_p = row_params(
        temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, row, V)
    seed = tl.load(seed_ptr + row)

    # 1) this chunk: max, first argmax, online sum of exp((x - m)/T), min, race over all tokens
    begin = split * chunk
    end = tl.minimum(begin + chunk, V)
    m = float("-inf")
    s = 0.0
    x_min = float("inf")
    argmax = begin
    best = float("-inf")
    best_index = begin
    for start in range(begin, end, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < end
        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
        block_max = tl.max(x, axis=0)
        argmax = tl.where(block_max > m, start + tl.argmax(x, axis=0), argmax)
        m_new = tl.maximum(m, block_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp((m - m_safe) * inv_t) + tl.sum(tl.exp((x - m_safe) * inv_t), axis=0)
        m = m_new
        x_min = tl.minimum(x_min, tl.min(tl.where(valid, x, float("inf")), axis=0))
        if is_plain:
            best, best_index = race_block(row_ptr, start, end, seed, inv_t, float("-inf"), best, best_index, BLOCK_V)
    base = row * num_splits + split
    tl.store(part_f_ptr + base * 4 + 0, m)
    tl.store(part_f_ptr + base * 4 + 1, s)
    tl.store(part_f_ptr + base * 4 + 2, x_min)
    tl.store(part_i_ptr + base * 2 + 0, argmax)
    store_race_part(part_f_ptr, part_i_ptr, row, num_splits, split, best, best_index)

    # 2) the row's last program merges the chunks (in chunk order: ties go to the lowest index)
    if is_last(counter_ptr + row, num_splits):
        sp = tl.arange(0, BLOCK_S)
        ok = sp < num_splits
        pbase = (row * num_splits + sp) * 4
        pm = tl.load(part_f_ptr + pbase + 0, mask=ok, other=float("-inf"), cache_modifier=".cg")
        ps = tl.load(part_f_ptr + pbase + 1, mask=ok, other=0.0, cache_modifier=".cg")
        pmin = tl.load(part_f_ptr + pbase + 2, mask=ok, other=float("inf"), cache_modifier=".cg")
        m = tl.max(pm, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(ps * tl.exp((pm - m_safe) * inv_t), axis=0)
        log_s = tl.log(s)
        first_max = tl.min(tl.where(ok & (pm == m), sp, BLOCK_S), axis=0)
        argmax = tl.load(part_i_ptr + (row * num_splits + first_max) * 2, cache_modifier=".cg")
        token = tl.where(is_greedy, argmax, 0)
        if is_plain:
            _, token = race_winner(part_f_ptr, part_i_ptr, row, num_splits, BLOCK_S)
        if is_greedy | is_plain:
            write_token(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, inv_t, log_s)
        # search state of a filtered row: bracket [order_key(min x), order_key(m) + 1), W(lo) = all, W(hi) = 0
        lo = order_key(tl.min(pmin, axis=0))
        hi_start = order_key(m) + 1
        phase = tl.where(need_k, 0, tl.where(need_p, 1, 2))
        count_lo = lo * 0 + V
        phase, hi, count_hi, mass_hi, target = settle(phase, lo, hi_start, count_lo, count_lo * 0, s, 0.0,
                                                       top_p * s, hi_start, top_p, need_p)
        phase = tl.where(is_greedy | is_plain, 3, phase)
        store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, count_hi * 0, s, mass_hi,
                     target)
        tl.store(state_f_ptr + row * 5 + 0, m)
        tl.store(state_f_ptr + row * 5 + 1, log_s)


@triton.jit
def _refine_kernel(
    logits_ptr, logits_row_stride,
    temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, seed_ptr,
    count_part_ptr, mass_part_ptr, part_f_ptr, part_i_ptr, buf_x_ptr, buf_i_ptr,
    state_f_ptr, state_i_ptr, counter_ptr, cursor_ptr, tokens_ptr, logprobs_ptr,
    V, chunk, num_splits, cap, max_passes, num_passes, chunks_per_program, num_programs,
    NUM_PIVOTS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # split launches: a program per chunk, one pass; the solo launch: a program per row walks every
    # chunk, pass after pass. Chunks and merges are the same either way, so are the sums and the token.
    row = tl.program_id(0).to(tl.int64)
    first_split = tl.program_id(1) * chunks_per_program
    stop_split = tl.minimum(first_split + chunks_per_program, num_splits)
    for _pass in range(num_passes):
        phase = tl.load(state_i_ptr + row * 6)
        if phase < 2:
            row_ptr = logits_ptr + row * logits_row_stride
            is_greedy, is_plain, inv_t, top_k, top_p, min_p, need_k, need_p = row_params(
                temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, row, V)
            lo = tl.load(state_i_ptr + row * 6 + 1)
            hi = tl.load(state_i_ptr + row * 6 + 2)
            count_lo = tl.load(state_i_ptr + row * 6 + 3)
            count_hi = tl.load(state_i_ptr + row * 6 + 4)
            passes = tl.load(state_i_ptr + row * 6 + 5) + 1
            m = tl.load(state_f_ptr + row * 5 + 0)
            mass_lo = tl.load(state_f_ptr + row * 5 + 2)
            mass_hi = tl.load(state_f_ptr + row * 5 + 3)
            target = tl.load(state_f_ptr + row * 5 + 4)
            hi_start = order_key(m) + 1
            whole = count_lo <= cap  # every token >= lo fits the buffer: both filters can settle there
            if count_lo - count_hi <= cap:
                # A) compaction: tokens in [lo, region_hi) go to the row's buffer; the race runs over the
                # tokens surely kept (key >= region_hi > theta) when this filter is the last one
                region_hi = tl.where(whole, hi_start, hi)
                may_finish = (phase == 1) | (~need_p) | whole
                threshold = race_threshold(region_hi, m, min_p, inv_t)
                seed = tl.load(seed_ptr + row)
                for split in range(first_split, stop_split):
                    begin = split * chunk
                    end = tl.minimum(begin + chunk, V)
                    best = float("-inf")
                    best_index = begin
                    for start in range(begin, end, BLOCK_V):
                        offs = start + tl.arange(0, BLOCK_V)
                        valid = offs < end
                        x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
                        x_key = order_key(x)
                        inside = valid & (x_key >= lo) & (x_key < region_hi)
                        num_inside = tl.sum(inside.to(tl.int32), axis=0)
                        if num_inside > 0:
                            slot = tl.atomic_add(cursor_ptr + row, num_inside, sem="relaxed") - 1  # is_last orders
                            slot += tl.cumsum(inside.to(tl.int32), axis=0)
                            tl.store(buf_x_ptr + row * cap + slot, x, mask=inside)
                            tl.store(buf_i_ptr + row * cap + slot, offs, mask=inside)
                        if may_finish:
                            best, best_index = race_fold(x, valid, start, seed, inv_t, threshold, best, best_index,
                                                          BLOCK_V)
                    store_race_part(part_f_ptr, part_i_ptr, row, num_splits, split, best, best_index)
                if is_last(counter_ptr + row, num_programs):
                    # the exact search over <= cap buffered tokens, in this one program (exact integer
                    # sums: the buffer's order, set by atomics, does not matter)
                    num = tl.atomic_xchg(cursor_ptr + row, 0)
                    buf = buf_x_ptr + row * cap
                    base_count = tl.where(whole, 0, count_hi)
                    base_mass = tl.where(whole, 0.0, mass_hi)
                    entry = phase
                    phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target = search_buffer(
                        buf, num, base_count, base_mass, phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target,
                        m, inv_t, top_k, top_p, need_p & whole, hi_start, max_passes, NUM_PIVOTS, BLOCK_V)
                    # top-k settled but top-p needs tokens not buffered: back to full-row passes
                    escaped = (entry == 0) & need_p & (~whole)
                    hi, count_hi, mass_hi, target = start_top_p(escaped, hi, count_hi, mass_hi, target, mass_lo,
                                                                 hi_start, top_p)
                    phase = tl.where(escaped, 1, phase)
                    phase, hi, count_hi, mass_hi, target = settle(
                        phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target, hi_start, top_p, False)
                    if (phase == 2) & (~escaped):
                        # the race: buffered tokens with key >= theta, against the chunks' surely kept ones
                        threshold = race_threshold(lo, m, min_p, inv_t)
                        best_b, index_b = race_buffer(buf, buf_i_ptr + row * cap, num, seed, inv_t, threshold, V,
                                                       BLOCK_V)
                        best_a, index_a = race_winner(part_f_ptr, part_i_ptr, row, num_splits, BLOCK_S)
                        best = tl.maximum(best_a, best_b)
                        token = tl.minimum(tl.where(best_a == best, index_a, V), tl.where(best_b == best, index_b, V))
                        write_token(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, inv_t,
                                     tl.load(state_f_ptr + row * 5 + 1))
                        phase = phase * 0 + 3
                    store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, passes, mass_lo,
                                 mass_hi, target)
            else:
                # B) pivot pass: this chunk's count and mass at NUM_PIVOTS pivots in (lo, hi)
                pivot, pivot_x = pivots(phase, lo, hi, count_lo, mass_lo, target, m, inv_t, NUM_PIVOTS)
                j = tl.arange(0, NUM_PIVOTS)
                for split in range(first_split, stop_split):
                    begin = split * chunk
                    end = tl.minimum(begin + chunk, V)
                    count, mass = count_mass_ge(row_ptr, begin, end, pivot_x, m, inv_t, NUM_PIVOTS, BLOCK_V, False, "")
                    base = (row * num_splits + split) * NUM_PIVOTS + j
                    tl.store(count_part_ptr + base, count)
                    tl.store(mass_part_ptr + base, mass)
                if is_last(counter_ptr + row, num_programs):
                    sp = tl.arange(0, BLOCK_S)
                    at = (row * num_splits + sp[:, None]) * NUM_PIVOTS + j[None, :]
                    ok = (sp < num_splits)[:, None]
                    count = tl.sum(tl.load(count_part_ptr + at, mask=ok, other=0, cache_modifier=".cg"), axis=0)
                    mass = tl.sum(tl.load(mass_part_ptr + at, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
                    lo, hi, count_lo, count_hi, mass_lo, mass_hi = narrow(phase, lo, hi, count_lo, count_hi, mass_lo,
                                                                           mass_hi, pivot, count.to(tl.int64), mass,
                                                                           top_k, target)
                    phase, hi, count_hi, mass_hi, target = settle(
                        phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target, hi_start, top_p, need_p)
                    store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, passes, mass_lo,
                                 mass_hi, target)
        tl.debug_barrier()  # solo: the next pass reads the state this one wrote


@triton.jit
def _race_kernel(
    logits_ptr, logits_row_stride,
    temperature_ptr, min_p_ptr, seed_ptr,
    part_f_ptr, part_i_ptr, state_f_ptr, state_i_ptr, counter_ptr,
    tokens_ptr, logprobs_ptr,
    V, chunk, num_splits,
    BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    phase = tl.load(state_i_ptr + row * 6)
    if phase < 3:  # phase 2 once the refine passes are done: theta = lo
        row_ptr = logits_ptr + row * logits_row_stride
        temperature = tl.load(temperature_ptr + row)
        inv_t = 1.0 / temperature
        m = tl.load(state_f_ptr + row * 5 + 0)
        threshold = race_threshold(tl.load(state_i_ptr + row * 6 + 1), m, tl.load(min_p_ptr + row), inv_t)
        seed = tl.load(seed_ptr + row)
        begin = split * chunk
        end = tl.minimum(begin + chunk, V)
        best = float("-inf")
        best_index = begin
        for start in range(begin, end, BLOCK_V):
            best, best_index = race_block(row_ptr, start, end, seed, inv_t, threshold, best, best_index, BLOCK_V)
        store_race_part(part_f_ptr, part_i_ptr, row, num_splits, split, best, best_index)
        if is_last(counter_ptr + row, num_splits):
            _, token = race_winner(part_f_ptr, part_i_ptr, row, num_splits, BLOCK_S)
            write_token(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, inv_t, tl.load(state_f_ptr + row * 5 + 1))


def row_seeds(generator: Generator, num_rows: int, device: torch.device) -> torch.Tensor:
    """Per-row Philox keys [num_rows] int64 on `device`, without a host sync.

    None: drawn from torch's default generator of `device`. torch.Generator: drawn from it (it must
    live on `device`). int seed: row r gets key (r << 32) + (seed mod 2^32), so a seed fixes every
    row's stream. Tensor: used as given, one key per row (e.g. a sequence id mixed with its step).
    """
    if isinstance(generator, torch.Tensor):
        check_row_seeds(generator, num_rows, device)
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
    splits = max(1, min(triton.cdiv(vocab_size, MIN_CHUNK), MAX_SPLITS))
    per_split = triton.cdiv(vocab_size, splits)
    block_v = max(4, min(BLOCK_V, triton.next_power_of_2(per_split)))  # 4 | block: Philox gives 4 at a time
    refine_block = min(RADIX_BLOCK_V, block_v)
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
    """Launcher of `cir_kernels.sample`: per-row parameters already checked and shaped [B] by
    `prepare_sampling`, seeds from `row_seeds`.

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
    state_f = torch.empty(num_rows, STATE_F, dtype=torch.float32, device=device)
    state_i = torch.empty(num_rows, STATE_I, dtype=torch.int64, device=device)
    counters = _counters(2 * num_rows, device)  # pass counters, then buffer cursors
    grid = (num_rows, splits)
    _stats_kernel[grid](
        logits, logits.stride(0), temperature, top_p, top_k, min_p, seeds,
        part_f, part_i, state_f, state_i, counters, tokens, logprobs,
        vocab_size, chunk, splits,
        BLOCK_V=block_v, BLOCK_S=block_s, num_warps=NUM_WARPS,
    )
    may_k, may_p, may_min_p = may_filter
    if may_k or may_p:
        cap = min(COMPACT_CAP, triton.cdiv(vocab_size, 16) * 16)
        count_part = torch.empty(num_rows, splits, NUM_PIVOTS, dtype=torch.int32, device=device)
        mass_part = torch.empty(num_rows, splits, NUM_PIVOTS, dtype=torch.float32, device=device)
        buf_x = torch.empty(num_rows, cap, dtype=torch.float32, device=device)
        buf_i = torch.empty(num_rows, cap, dtype=torch.int32, device=device)
        # the split passes that usually settle a row (a pivot pass, then the buffer; one more for
        # top-k then top-p), then one launch in which each row still open runs all it may need alone
        # (grid, passes per launch, chunks per program)
        plan = [(grid, 1, 1)] * (SPLIT_REFINE_PASSES + int(may_k and may_p))
        plan.append(((num_rows, 1), 2 * REFINE_PASSES, splits))
        for launch_grid, num_passes, chunks_per_program in plan:
            _refine_kernel[launch_grid](
                logits, logits.stride(0), temperature, top_p, top_k, min_p, seeds,
                count_part, mass_part, part_f, part_i, buf_x, buf_i,
                state_f, state_i, counters, counters[num_rows:], tokens, logprobs,
                vocab_size, chunk, splits, cap, 2 * REFINE_PASSES, num_passes, chunks_per_program,
                launch_grid[1], NUM_PIVOTS=NUM_PIVOTS, BLOCK_V=refine_block, BLOCK_S=block_s, num_warps=NUM_WARPS,
            )
    if may_k or may_p or may_min_p:
        _race_kernel[grid](
            logits, logits.stride(0), temperature, min_p, seeds,
            part_f, part_i, state_f, state_i, counters, tokens, logprobs,
            vocab_size, chunk, splits,
            BLOCK_V=block_v, BLOCK_S=block_s, num_warps=NUM_WARPS,
        )
    return (tokens, logprobs, state_i[:, 5]) if return_passes else (tokens, logprobs)
