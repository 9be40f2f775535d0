"""The Triton kernels of `cir_kernels.sample` (the launcher, its constants and the semantics are in
cir_kernels/sampling.py; the torch twin is cir_kernels/sampling_reference.py).
Row state between passes (strides 6 and 5 below): int64 (phase, lo, hi, count at lo, count at hi,
refine passes run), float32 (m, log s, mass at lo, mass at hi, target); phase 0 top-k, 1 top-p,
2 race, 3 token written.

Kernels. Every row is split into S = ceil(V / _MIN_CHUNK) chunks (at most _MAX_SPLITS), one program
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
     starting at [key(min x), key(m) + 1). Each refine launch does one of:
     a) pivot pass, while the bracket holds > _COMPACT_CAP tokens: W at 32 pivots in the bracket
        (a [block, 32] compare tile), half evenly spaced keys (the bracket shrinks >= 17x a pass, so
        8 passes reach one key), half evenly spaced values from a lower bound (see _pivots);
     b) compaction pass: the tokens of the bracket (all tokens >= lo when they fit, so that top-p
        after top-k settles too) go to a per-row buffer; the row's last program finishes the
        bisection on the buffer alone, with exact int64 mass sums (the buffer's order, set by
        atomics, does not change them). The same pass races over the tokens surely kept
        (key >= the buffered range) and the last program over the buffered ones with key >= theta:
        the token is written here. A filter settles when [lo, hi) holds one token or one key.
     The launcher runs _SPLIT_REFINE_PASSES such launches split over programs (what usual rows need),
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
import triton
import triton.language as tl

from cir_kernels.sampling_select import (_count_mass_ge, _key, _key_to_float, _narrow, _pivots, _search_buffer, _settle,
                                     _start_top_p)


@triton.jit
def _gumbel(seed, start, BLOCK: tl.constexpr):
    """G_i = -log(-log U_i) for i in [start, start + BLOCK), start a multiple of 4: one Philox call
    gives four uniforms (counter i // 4, output i % 4)."""
    r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + tl.arange(0, BLOCK // 4))
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK]).to(tl.int32, bitcast=True)
    u = tl.where(r < 0, ~r, r) * 4.6566127342e-10  # as tl.rand: uniform in [0, 1)
    return -tl.log(-tl.log(u))


@triton.jit
def _gumbel_at(seed, index):
    """G_i at arbitrary indices i (the same stream as _gumbel)."""
    r0, r1, r2, r3 = tl.randint4x(seed, index // 4)
    lane = index % 4
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3))).to(tl.int32, bitcast=True)
    u = tl.where(r < 0, ~r, r) * 4.6566127342e-10
    return -tl.log(-tl.log(u))


@triton.jit
def _race_fold(x, valid, start, seed, inv_t, threshold, best, best_index, BLOCK: tl.constexpr):
    """Fold a block x[start:start + BLOCK] into the running race: best x/T + G over x >= threshold."""
    score = tl.where(valid & (x >= threshold), x * inv_t + _gumbel(seed, start, BLOCK), float("-inf"))
    block_best = tl.max(score, axis=0)
    best_index = tl.where(block_best > best, start + tl.argmax(score, axis=0), best_index)
    return tl.maximum(best, block_best), best_index


@triton.jit
def _race_block(row_ptr, start, end, seed, inv_t, threshold, best, best_index, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    valid = offs < end
    x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    return _race_fold(x, valid, start, seed, inv_t, threshold, best, best_index, BLOCK)


@triton.jit
def _store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, passes, mass_lo, mass_hi, target):
    tl.store(state_i_ptr + row * 6 + 0, phase.to(tl.int64))
    tl.store(state_i_ptr + row * 6 + 1, lo)
    tl.store(state_i_ptr + row * 6 + 2, hi)
    tl.store(state_i_ptr + row * 6 + 3, count_lo)
    tl.store(state_i_ptr + row * 6 + 4, count_hi)
    tl.store(state_i_ptr + row * 6 + 5, passes)
    tl.store(state_f_ptr + row * 5 + 2, mass_lo)
    tl.store(state_f_ptr + row * 5 + 3, mass_hi)
    tl.store(state_f_ptr + row * 5 + 4, target)


@triton.jit
def _row_params(temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, row, V):
    temperature = tl.load(temperature_ptr + row)
    is_greedy = temperature <= 0.0
    inv_t = 1.0 / tl.where(is_greedy, 1.0, temperature)
    top_k = tl.load(top_k_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    min_p = tl.load(min_p_ptr + row)
    need_k = (top_k > 0) & (top_k < V)
    need_p = top_p < 1.0
    is_plain = (~is_greedy) & (~need_k) & (~need_p) & (min_p <= 0.0)
    return is_greedy, is_plain, inv_t, top_k, top_p, min_p, need_k, need_p


@triton.jit
def _is_last(counter_ptr, num_splits):
    """True in the last program of the row to finish (it also resets the counter for the next call).
    The barrier orders every thread's stores before the release of the atomic."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1)
    last = done == num_splits - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    return last


@triton.jit
def _race_threshold(theta, m, min_p, inv_t):
    """The race's floor: x >= it iff key(x) >= theta (the top-k / top-p cut) and p >= min_p * max p,
    i.e. x >= m + T log(min_p) (at most m: the max is always kept)."""
    return tl.maximum(_key_to_float(theta), tl.minimum(m + tl.log(min_p) / inv_t, m))


@triton.jit
def _store_race_part(part_f_ptr, part_i_ptr, row, num_splits, split, best, best_index):
    """A chunk's race result: best score in part_f slot 3, its index in part_i slot 1 (slots 0-2 of
    part_f: m, s, min x; slot 0 of part_i: argmax, written by the stats pass)."""
    base = row * num_splits + split
    tl.store(part_f_ptr + base * 4 + 3, best)
    tl.store(part_i_ptr + base * 2 + 1, best_index)


@triton.jit
def _race_winner(part_f_ptr, part_i_ptr, row, num_splits, BLOCK_S: tl.constexpr):
    """The row's race merged over its chunks in chunk order: (best score, its index; the lowest
    chunk on ties)."""
    sp = tl.arange(0, BLOCK_S)
    ok = sp < num_splits
    pbest = tl.load(part_f_ptr + (row * num_splits + sp) * 4 + 3, mask=ok, other=float("-inf"), cache_modifier=".cg")
    best = tl.max(pbest, axis=0)
    first = tl.min(tl.where(ok & (pbest == best), sp, BLOCK_S), axis=0)
    return best, tl.load(part_i_ptr + (row * num_splits + first) * 2 + 1, cache_modifier=".cg")


@triton.jit
def _write_token(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, inv_t, log_s):
    """The row's token and its log-prob (x_token - m)/T - log s over the full vocabulary."""
    x_token = tl.load(row_ptr + token).to(tl.float32)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, (x_token - m) * inv_t - log_s)


@triton.jit
def _race_buffer(buf_x, buf_i, num, seed, inv_t, threshold, V, BLOCK_V: tl.constexpr):
    """The exponential race over buffered tokens with x >= threshold: (best score, its index; the
    lowest index on ties, whatever the buffer's order)."""
    best = float("-inf")
    best_index = V
    for start in range(0, num, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < num
        x = tl.load(buf_x + offs, mask=valid, other=float("-inf"), cache_modifier=".cg")
        index = tl.load(buf_i + offs, mask=valid, other=0, cache_modifier=".cg")
        score = tl.where(valid & (x >= threshold), x * inv_t + _gumbel_at(seed, index), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.min(tl.where(valid & (score == block_best), index, V), axis=0)
        tie = (block_best == best) & (block_best > float("-inf"))
        best_index = tl.where(block_best > best, block_index, tl.where(tie, tl.minimum(best_index, block_index),
                                                                        best_index))
        best = tl.maximum(best, block_best)
    return best, best_index


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
    is_greedy, is_plain, inv_t, top_k, top_p, min_p, need_k, need_p = _row_params(
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
            best, best_index = _race_block(row_ptr, start, end, seed, inv_t, float("-inf"), best, best_index, BLOCK_V)
    base = row * num_splits + split
    tl.store(part_f_ptr + base * 4 + 0, m)
    tl.store(part_f_ptr + base * 4 + 1, s)
    tl.store(part_f_ptr + base * 4 + 2, x_min)
    tl.store(part_i_ptr + base * 2 + 0, argmax)
    _store_race_part(part_f_ptr, part_i_ptr, row, num_splits, split, best, best_index)

    # 2) the row's last program merges the chunks (in chunk order: ties go to the lowest index)
    if _is_last(counter_ptr + row, num_splits):
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
            _, token = _race_winner(part_f_ptr, part_i_ptr, row, num_splits, BLOCK_S)
        if is_greedy | is_plain:
            _write_token(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, inv_t, log_s)
        # search state of a filtered row: bracket [key(min x), key(m) + 1), W(lo) = all, W(hi) = 0
        lo = _key(tl.min(pmin, axis=0))
        hi_start = _key(m) + 1
        phase = tl.where(need_k, 0, tl.where(need_p, 1, 2))
        count_lo = lo * 0 + V
        phase, hi, count_hi, mass_hi, target = _settle(phase, lo, hi_start, count_lo, count_lo * 0, s, 0.0,
                                                       top_p * s, hi_start, top_p, need_p)
        phase = tl.where(is_greedy | is_plain, 3, phase)
        _store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, count_hi * 0, s, mass_hi,
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
            is_greedy, is_plain, inv_t, top_k, top_p, min_p, need_k, need_p = _row_params(
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
            hi_start = _key(m) + 1
            whole = count_lo <= cap  # every token >= lo fits the buffer: both filters can settle there
            if count_lo - count_hi <= cap:
                # A) compaction: tokens in [lo, region_hi) go to the row's buffer; the race runs over the
                # tokens surely kept (key >= region_hi > theta) when this filter is the last one
                region_hi = tl.where(whole, hi_start, hi)
                may_finish = (phase == 1) | (~need_p) | whole
                threshold = _race_threshold(region_hi, m, min_p, inv_t)
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
                        key = _key(x)
                        inside = valid & (key >= lo) & (key < region_hi)
                        num_inside = tl.sum(inside.to(tl.int32), axis=0)
                        if num_inside > 0:
                            slot = tl.atomic_add(cursor_ptr + row, num_inside, sem="relaxed") - 1  # _is_last orders
                            slot += tl.cumsum(inside.to(tl.int32), axis=0)
                            tl.store(buf_x_ptr + row * cap + slot, x, mask=inside)
                            tl.store(buf_i_ptr + row * cap + slot, offs, mask=inside)
                        if may_finish:
                            best, best_index = _race_fold(x, valid, start, seed, inv_t, threshold, best, best_index,
                                                          BLOCK_V)
                    _store_race_part(part_f_ptr, part_i_ptr, row, num_splits, split, best, best_index)
                if _is_last(counter_ptr + row, num_programs):
                    # the exact search over <= cap buffered tokens, in this one program (exact integer
                    # sums: the buffer's order, set by atomics, does not matter)
                    num = tl.atomic_xchg(cursor_ptr + row, 0)
                    buf = buf_x_ptr + row * cap
                    base_count = tl.where(whole, 0, count_hi)
                    base_mass = tl.where(whole, 0.0, mass_hi)
                    entry = phase
                    phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target = _search_buffer(
                        buf, num, base_count, base_mass, phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target,
                        m, inv_t, top_k, top_p, need_p & whole, hi_start, max_passes, NUM_PIVOTS, BLOCK_V)
                    # top-k settled but top-p needs tokens not buffered: back to full-row passes
                    escaped = (entry == 0) & need_p & (~whole)
                    hi, count_hi, mass_hi, target = _start_top_p(escaped, hi, count_hi, mass_hi, target, mass_lo,
                                                                 hi_start, top_p)
                    phase = tl.where(escaped, 1, phase)
                    phase, hi, count_hi, mass_hi, target = _settle(
                        phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target, hi_start, top_p, False)
                    if (phase == 2) & (~escaped):
                        # the race: buffered tokens with key >= theta, against the chunks' surely kept ones
                        threshold = _race_threshold(lo, m, min_p, inv_t)
                        best_b, index_b = _race_buffer(buf, buf_i_ptr + row * cap, num, seed, inv_t, threshold, V,
                                                       BLOCK_V)
                        best_a, index_a = _race_winner(part_f_ptr, part_i_ptr, row, num_splits, BLOCK_S)
                        best = tl.maximum(best_a, best_b)
                        token = tl.minimum(tl.where(best_a == best, index_a, V), tl.where(best_b == best, index_b, V))
                        _write_token(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, inv_t,
                                     tl.load(state_f_ptr + row * 5 + 1))
                        phase = phase * 0 + 3
                    _store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, passes, mass_lo,
                                 mass_hi, target)
            else:
                # B) pivot pass: this chunk's count and mass at NUM_PIVOTS pivots in (lo, hi)
                pivot, pivot_x = _pivots(phase, lo, hi, count_lo, mass_lo, target, m, inv_t, NUM_PIVOTS)
                j = tl.arange(0, NUM_PIVOTS)
                for split in range(first_split, stop_split):
                    begin = split * chunk
                    end = tl.minimum(begin + chunk, V)
                    count, mass = _count_mass_ge(row_ptr, begin, end, pivot_x, m, inv_t, NUM_PIVOTS, BLOCK_V, False, "")
                    base = (row * num_splits + split) * NUM_PIVOTS + j
                    tl.store(count_part_ptr + base, count)
                    tl.store(mass_part_ptr + base, mass)
                if _is_last(counter_ptr + row, num_programs):
                    sp = tl.arange(0, BLOCK_S)
                    at = (row * num_splits + sp[:, None]) * NUM_PIVOTS + j[None, :]
                    ok = (sp < num_splits)[:, None]
                    count = tl.sum(tl.load(count_part_ptr + at, mask=ok, other=0, cache_modifier=".cg"), axis=0)
                    mass = tl.sum(tl.load(mass_part_ptr + at, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
                    lo, hi, count_lo, count_hi, mass_lo, mass_hi = _narrow(phase, lo, hi, count_lo, count_hi, mass_lo,
                                                                           mass_hi, pivot, count.to(tl.int64), mass,
                                                                           top_k, target)
                    phase, hi, count_hi, mass_hi, target = _settle(
                        phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target, hi_start, top_p, need_p)
                    _store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, passes, mass_lo,
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
        threshold = _race_threshold(tl.load(state_i_ptr + row * 6 + 1), m, tl.load(min_p_ptr + row), inv_t)
        seed = tl.load(seed_ptr + row)
        begin = split * chunk
        end = tl.minimum(begin + chunk, V)
        best = float("-inf")
        best_index = begin
        for start in range(begin, end, BLOCK_V):
            best, best_index = _race_block(row_ptr, start, end, seed, inv_t, threshold, best, best_index, BLOCK_V)
        _store_race_part(part_f_ptr, part_i_ptr, row, num_splits, split, best, best_index)
        if _is_last(counter_ptr + row, num_splits):
            _, token = _race_winner(part_f_ptr, part_i_ptr, row, num_splits, BLOCK_S)
            _write_token(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, inv_t, tl.load(state_f_ptr + row * 5 + 1))
