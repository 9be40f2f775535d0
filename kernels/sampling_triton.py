"""The Triton kernels of `kernels.sample` (the launcher, its constants and the semantics are in
kernels/sampling.py; the torch twin is kernels/sampling_reference.py).
Row state between passes (strides 6 and 4 below): int64 (phase, lo, hi, count at lo, count at hi,
refine passes run), float32 (m, log s, mass at lo, target); phase 0 top-k, 1 top-p, 2 race, 3 done.

Kernels. Every row is split into S = ceil(V / _MIN_CHUNK) chunks (at most _MAX_SPLITS), one program
per (row, chunk); S depends on V only, so a row's arithmetic, and hence its token, is the same
whatever the batch. A pass ends with the last program of a row (an atomic counter per row, reset by
that program) merging the row's S partial results; the next pass is the next launch.
  1) stats: m = max x, first argmax, s = sum_i exp((x_i - m)/T) (online rescaling), min x, and for a
     row without filters the exponential race over all tokens: token = argmax_i x_i/T + G_i,
     G_i = -log(-log U_i) (Gumbel-max), U_i = Philox(key = seed of the row, counter = i // 4, output
     i % 4). The draw does not depend on the block size or the split. Greedy and temperature-only
     rows are finished here: ONE read of the logits.
  2) refine (top-k / top-p rows), no sorting: the kept set is {key_i >= theta} for the order-preserving
     32-bit key of x, theta the largest key with W(theta) >= target, W(K) = sum_{key_i >= K} w_i
     (w_i = 1, target k for top-k; w_i = exp((x_i - m)/T), target top_p * kept top-k mass for top-p).
     Each pass evaluates W at P = _NUM_PIVOTS pivots inside the bracket [lo, hi) (W(lo) >= target >
     W(hi)): half evenly spaced in key space (the bracket shrinks >= (P/2 + 1)x: at most
     _REFINE_PASSES = 8 passes per filter for 32-bit keys), half evenly spaced in value, which is
     what usually decides (logits are smooth in value, not in their bits). A filter is settled when
     the bracket holds one element or one key: then theta = lo. Rows settled skip later passes.
     A token x_j is kept by top-p iff the mass strictly above it is < target: ties and the max stay.
  3) race (filtered and min-p rows): the exponential race over the kept tokens, key >= theta and
     x >= m + T log(min_p); the last program writes token and log-prob.
Memory traffic per row, R = V * itemsize: greedy / temperature-only R (+ 24 B per chunk of partials);
min-p only 2R; top-k or top-p (2 + n) R, n the passes until the bracket settles (typically 2-4 per
filter for LLM-like logits, at most 8 each) + (8 B * P per chunk) of partials per pass; 12 B written.
Compute per refine pass: P compares and 3 adds per element (the [block, P] tile); P = 32 at all
batch sizes because the pivots fix the summation order and so the token (batch invariance).
"""
import triton
import triton.language as tl


@triton.jit
def _key(x):
    """float32 -> int64 in [0, 2^32) with the same order (-0.0 counted as +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits < 0, -1 - bits, bits + 2147483648)


@triton.jit
def _key_to_float(k):
    """Inverse of _key: x >= _key_to_float(K) <=> _key(x) >= K."""
    bits = tl.where(k >= 2147483648, k - 2147483648, -1 - k)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _gumbel(seed, start, BLOCK: tl.constexpr):
    """G_i = -log(-log U_i) for i in [start, start + BLOCK), start a multiple of 4: one Philox call
    gives four uniforms (counter i // 4, output i % 4)."""
    r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + tl.arange(0, BLOCK // 4))
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK]).to(tl.int32, bitcast=True)
    u = tl.where(r < 0, ~r, r) * 4.6566127342e-10  # as tl.rand: uniform in [0, 1)
    return -tl.log(-tl.log(u))


@triton.jit
def _race_block(row_ptr, start, end, seed, inv_t, threshold, best, best_index, BLOCK: tl.constexpr):
    """Fold one block into the running race: the best x/T + G over tokens with x >= threshold."""
    offs = start + tl.arange(0, BLOCK)
    valid = offs < end
    x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    score = tl.where(valid & (x >= threshold), x * inv_t + _gumbel(seed, start, BLOCK), float("-inf"))
    block_best = tl.max(score, axis=0)
    best_index = tl.where(block_best > best, start + tl.argmax(score, axis=0), best_index)
    return tl.maximum(best, block_best), best_index


@triton.jit
def _settle(phase, lo, hi, count_lo, count_hi, mass_lo, target, hi_start, top_p, need_p):
    """A filter is settled when [lo, hi) holds one key or one element: theta = lo. Top-k settled ->
    top-p starts on the bracket [theta_k, hi_start) with target top_p * (mass kept by top-k)."""
    done = (hi - lo <= 1) | (count_lo - count_hi <= 1)
    to_p = (phase == 0) & done & need_p
    hi = tl.where(to_p, hi_start, hi)
    count_hi = tl.where(to_p, 0, count_hi)
    target = tl.where(to_p, top_p * mass_lo, target)
    done = tl.where(to_p, (hi - lo <= 1) | (count_lo - count_hi <= 1), done)
    phase = tl.where(done & (phase < 2), 2, tl.where(to_p, 1, phase))
    return phase, hi, count_hi, target


@triton.jit
def _store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, passes, mass_lo, target):
    tl.store(state_i_ptr + row * 6 + 0, phase.to(tl.int64))
    tl.store(state_i_ptr + row * 6 + 1, lo)
    tl.store(state_i_ptr + row * 6 + 2, hi)
    tl.store(state_i_ptr + row * 6 + 3, count_lo)
    tl.store(state_i_ptr + row * 6 + 4, count_hi)
    tl.store(state_i_ptr + row * 6 + 5, passes)
    tl.store(state_f_ptr + row * 4 + 2, mass_lo)
    tl.store(state_f_ptr + row * 4 + 3, target)


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
    The barrier orders every thread's partial stores before the release of the atomic."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1)
    last = done == num_splits - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    return last


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
    tl.store(part_f_ptr + base * 4 + 3, best)
    tl.store(part_i_ptr + base * 2 + 0, argmax)
    tl.store(part_i_ptr + base * 2 + 1, best_index)

    # 2) the row's last program merges the chunks (in chunk order: ties go to the lowest index)
    if _is_last(counter_ptr + row, num_splits):
        sp = tl.arange(0, BLOCK_S)
        ok = sp < num_splits
        pbase = (row * num_splits + sp) * 4
        pm = tl.load(part_f_ptr + pbase + 0, mask=ok, other=float("-inf"), cache_modifier=".cg")
        ps = tl.load(part_f_ptr + pbase + 1, mask=ok, other=0.0, cache_modifier=".cg")
        pmin = tl.load(part_f_ptr + pbase + 2, mask=ok, other=float("inf"), cache_modifier=".cg")
        pbest = tl.load(part_f_ptr + pbase + 3, mask=ok, other=float("-inf"), cache_modifier=".cg")
        m = tl.max(pm, axis=0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        s = tl.sum(ps * tl.exp((pm - m_safe) * inv_t), axis=0)
        log_s = tl.log(s)
        first_max = tl.min(tl.where(ok & (pm == m), sp, BLOCK_S), axis=0)
        argmax = tl.load(part_i_ptr + (row * num_splits + first_max) * 2, cache_modifier=".cg")
        best = tl.max(pbest, axis=0)
        first_best = tl.min(tl.where(ok & (pbest == best), sp, BLOCK_S), axis=0)
        token = tl.where(is_greedy, argmax, 0)
        if is_plain:
            token = tl.load(part_i_ptr + (row * num_splits + first_best) * 2 + 1, cache_modifier=".cg")
        if is_greedy | is_plain:
            x_token = tl.load(row_ptr + token).to(tl.float32)
            tl.store(tokens_ptr + row, token.to(tl.int64))
            tl.store(logprobs_ptr + row, (x_token - m) * inv_t - log_s)
        # search state of a filtered row: bracket [key(min x), key(m) + 1), W(lo) = all, W(hi) = 0
        lo = _key(tl.min(pmin, axis=0))
        hi_start = _key(m) + 1
        phase = tl.where(need_k, 0, tl.where(need_p, 1, 2))
        target = top_p * s
        count_lo = lo * 0 + V
        phase, hi, count_hi, target = _settle(phase, lo, hi_start, count_lo, count_lo * 0, s, target, hi_start,
                                              top_p, need_p)
        phase = tl.where(is_greedy | is_plain, 3, phase)
        _store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, count_hi * 0, s, target)
        tl.store(state_f_ptr + row * 4 + 0, m)
        tl.store(state_f_ptr + row * 4 + 1, log_s)


@triton.jit
def _refine_kernel(
    logits_ptr, logits_row_stride,
    temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr,
    count_part_ptr, mass_part_ptr, state_f_ptr, state_i_ptr, counter_ptr,
    V, chunk, num_splits,
    NUM_PIVOTS: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    phase = tl.load(state_i_ptr + row * 6)
    if phase < 2:
        row_ptr = logits_ptr + row * logits_row_stride
        is_greedy, is_plain, inv_t, top_k, top_p, min_p, need_k, need_p = _row_params(
            temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, row, V)
        lo = tl.load(state_i_ptr + row * 6 + 1)
        hi = tl.load(state_i_ptr + row * 6 + 2)
        m = tl.load(state_f_ptr + row * 4 + 0)

        # 1) pivots in (lo, hi): half evenly spaced keys (the guaranteed shrink), half evenly spaced values
        HALF: tl.constexpr = NUM_PIVOTS // 2
        j = tl.arange(0, NUM_PIVOTS)
        step = (j % HALF + 1).to(tl.int64)
        by_key = lo + (step * (hi - lo)) // (HALF + 1)
        a = tl.maximum(_key_to_float(lo), -3.0e38)
        b = _key_to_float(hi - 1)
        v = a + step.to(tl.float32) * ((b * 0.5 - a * 0.5) * (2.0 / (HALF + 1)))
        v = tl.where(v == v, v, b)
        by_value = tl.minimum(tl.maximum(_key(v), lo + 1), hi - 1)
        pivot = tl.where(j < HALF, by_key, by_value)  # int64 keys
        pivot_x = _key_to_float(pivot)

        # 2) this chunk's count and mass at or above each pivot: a [BLOCK_V, NUM_PIVOTS] compare tile
        begin = split * chunk
        end = tl.minimum(begin + chunk, V)
        count = tl.zeros((NUM_PIVOTS,), tl.int32)
        mass = tl.zeros((NUM_PIVOTS,), tl.float32)
        for start in range(begin, end, BLOCK_V):
            offs = start + tl.arange(0, BLOCK_V)
            valid = offs < end
            x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
            e = tl.exp((x - m) * inv_t)
            ge = valid[:, None] & (x[:, None] >= pivot_x[None, :])
            count += tl.sum(ge.to(tl.int32), axis=0)
            mass += tl.sum(tl.where(ge, e[:, None], 0.0), axis=0)
        base = (row * num_splits + split) * NUM_PIVOTS + j
        tl.store(count_part_ptr + base, count)
        tl.store(mass_part_ptr + base, mass)

        # 3) the last program: W at every pivot, the new bracket, settled or not
        if _is_last(counter_ptr + row, num_splits):
            sp = tl.arange(0, BLOCK_S)
            at = (row * num_splits + sp[:, None]) * NUM_PIVOTS + j[None, :]
            ok = (sp < num_splits)[:, None]
            count = tl.sum(tl.load(count_part_ptr + at, mask=ok, other=0, cache_modifier=".cg"), axis=0).to(tl.int64)
            mass = tl.sum(tl.load(mass_part_ptr + at, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
            target = tl.load(state_f_ptr + row * 4 + 3)
            reached = tl.where(phase == 0, count >= top_k, mass >= target)
            new_lo = tl.max(tl.where(reached, pivot, lo), axis=0)
            at_lo = reached & (pivot == new_lo)
            count_lo = tl.where(new_lo > lo, tl.max(tl.where(at_lo, count, -1), axis=0),
                                tl.load(state_i_ptr + row * 6 + 3))
            mass_lo = tl.where(new_lo > lo, tl.max(tl.where(at_lo, mass, -1.0), axis=0),
                               tl.load(state_f_ptr + row * 4 + 2))
            new_hi = tl.min(tl.where(reached, hi, pivot), axis=0)
            at_hi = (~reached) & (pivot == new_hi)
            count_hi = tl.where(new_hi < hi, tl.max(tl.where(at_hi, count, -1), axis=0),
                                tl.load(state_i_ptr + row * 6 + 4))
            phase, hi, count_hi, target = _settle(phase, new_lo, new_hi, count_lo, count_hi, mass_lo, target,
                                                  _key(m) + 1, top_p, need_p)
            _store_state(state_i_ptr, state_f_ptr, row, phase, new_lo, hi, count_lo, count_hi,
                         tl.load(state_i_ptr + row * 6 + 5) + 1, mass_lo, target)


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
        m = tl.load(state_f_ptr + row * 4 + 0)
        threshold = tl.maximum(_key_to_float(tl.load(state_i_ptr + row * 6 + 1)),
                               tl.minimum(m + tl.log(tl.load(min_p_ptr + row)) / inv_t, m))
        seed = tl.load(seed_ptr + row)
        begin = split * chunk
        end = tl.minimum(begin + chunk, V)
        best = float("-inf")
        best_index = begin
        for start in range(begin, end, BLOCK_V):
            best, best_index = _race_block(row_ptr, start, end, seed, inv_t, threshold, best, best_index, BLOCK_V)
        base = row * num_splits + split
        tl.store(part_f_ptr + base * 4 + 3, best)
        tl.store(part_i_ptr + base * 2 + 1, best_index)
        if _is_last(counter_ptr + row, num_splits):
            sp = tl.arange(0, BLOCK_S)
            ok = sp < num_splits
            pbest = tl.load(part_f_ptr + (row * num_splits + sp) * 4 + 3, mask=ok, other=float("-inf"),
                            cache_modifier=".cg")
            best = tl.max(pbest, axis=0)
            first_best = tl.min(tl.where(ok & (pbest == best), sp, BLOCK_S), axis=0)
            token = tl.load(part_i_ptr + (row * num_splits + first_best) * 2 + 1, cache_modifier=".cg")
            x_token = tl.load(row_ptr + token).to(tl.float32)
            tl.store(tokens_ptr + row, token.to(tl.int64))
            tl.store(logprobs_ptr + row, (x_token - m) * inv_t - tl.load(state_f_ptr + row * 4 + 1))
