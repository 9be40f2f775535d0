"""Thresholds without sorting, as Triton device functions of cir_kernels/sampling_triton.py: the
order-preserving key of a float, pivot brackets (where to probe, how a bracket narrows, when it is
settled), and the exact search over a row's buffered tokens.

A bracket [lo, hi) of keys holds theta, the largest key K with W(K) = sum_{key_i >= K} w_i >= target
(w_i = 1 for top-k, exp((x_i - m)/T) for top-p): W(lo) >= target > W(hi). Counts are exact int64;
masses float32 over the row, exact int64 units of 2^-40 over the buffer.
"""
import triton
import triton.language as tl


@triton.jit
def order_key(x):
    """float32 -> int64 in [0, 2^32) with the same order (-0.0 counted as +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits < 0, -1 - bits, bits + 2147483648)


@triton.jit
def key_to_float(k):
    """Inverse of order_key: x >= key_to_float(K) <=> order_key(x) >= K."""
    bits = tl.where(k >= 2147483648, k - 2147483648, -1 - k)
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def pivots(phase, lo, hi, count_lo, mass_lo, target, m, inv_t, NUM_PIVOTS: tl.constexpr):
    """NUM_PIVOTS keys in [lo, hi) (hi - lo >= 2). Half evenly spaced keys over [lo, hi): the
    guaranteed shrink. Half evenly spaced values over [low, hi), what usually decides; for top-p,
    low = m + T log((W(lo) - target) / 2 / count(lo)): the count(lo) tokens above lo that lie below
    it weigh < W(lo) - target, so theta >= low (with it, top-p 0.95 on N(0, 3^2) logits at V = 152064
    settles in 2 refine passes instead of 3, measured in the interpreter). Returns keys and floats."""
    HALF: tl.constexpr = NUM_PIVOTS // 2
    j = tl.arange(0, NUM_PIVOTS)
    step = (j % HALF).to(tl.int64)
    by_key = lo + ((step + 1) * (hi - lo)) // (HALF + 1)
    gap = mass_lo - target
    low = tl.where((phase == 1) & (gap > 0), m + tl.log(tl.maximum(gap, 1e-30) * 0.5 / count_lo.to(tl.float32)) / inv_t,
                   float("-inf"))
    low_key = order_key(low)
    low_key = tl.where((low_key > lo) & (low_key < hi - 1), low_key, lo)
    a = tl.maximum(key_to_float(low_key), -3.0e38)
    b = key_to_float(hi - 1)
    v = a + step.to(tl.float32) * ((b * 0.5 - a * 0.5) * (2.0 / HALF))
    v = tl.where(v == v, v, b)
    by_value = tl.minimum(tl.maximum(order_key(v), lo + 1), hi - 1)
    by_value = tl.where(step == 0, low_key, by_value)
    pivot = tl.where(j < HALF, by_key, by_value)
    return pivot, key_to_float(pivot)


@triton.jit
def count_mass_ge(ptr, begin, end, pivot_x, m, inv_t,
                   NUM_PIVOTS: tl.constexpr, BLOCK_V: tl.constexpr, FIXED: tl.constexpr, CACHE: tl.constexpr):
    """Per pivot, the count and mass sum exp((x - m)/T) of ptr[begin:end] at or above it: a
    [BLOCK_V, NUM_PIVOTS] compare tile. FIXED: mass in int64 units of 2^-40 (exact, order-free sums)."""
    count = tl.zeros((NUM_PIVOTS,), tl.int32)
    mass = tl.zeros((NUM_PIVOTS,), tl.int64) if FIXED else tl.zeros((NUM_PIVOTS,), tl.float32)
    for start in range(begin, end, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < end
        x = tl.load(ptr + offs, mask=valid, other=float("-inf"), cache_modifier=CACHE).to(tl.float32)
        e = tl.exp((x - m) * inv_t)
        ge = valid[:, None] & (x[:, None] >= pivot_x[None, :])
        count += tl.sum(ge.to(tl.int32), axis=0)
        if FIXED:
            mass += tl.sum(tl.where(ge, (e * 1099511627776.0).to(tl.int64)[:, None], 0), axis=0)
        else:
            mass += tl.sum(tl.where(ge, e[:, None], 0.0), axis=0)
    return count, mass


@triton.jit
def narrow(phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, pivot, count, mass, top_k, target):
    """The new bracket: lo = the largest pivot still reaching the target, hi = the smallest not."""
    reached = tl.where(phase == 0, count >= top_k, mass >= target)
    new_lo = tl.max(tl.where(reached, pivot, lo), axis=0)
    at = reached & (pivot == new_lo)
    count_lo = tl.where(new_lo > lo, tl.max(tl.where(at, count, -1), axis=0), count_lo)
    mass_lo = tl.where(new_lo > lo, tl.max(tl.where(at, mass, -1.0), axis=0), mass_lo)
    new_hi = tl.min(tl.where(reached, hi, pivot), axis=0)
    at = (~reached) & (pivot == new_hi)
    count_hi = tl.where(new_hi < hi, tl.max(tl.where(at, count, -1), axis=0), count_hi)
    mass_hi = tl.where(new_hi < hi, tl.max(tl.where(at, mass, -1.0), axis=0), mass_hi)
    return new_lo, new_hi, count_lo, count_hi, mass_lo, mass_hi


@triton.jit
def start_top_p(start, hi, count_hi, mass_hi, target, mass_lo, hi_start, top_p):
    """Where start: top-p's bracket after top-k, [theta_k = lo, hi_start) with W(hi) = 0 and target
    top_p * (mass kept by top-k)."""
    hi = tl.where(start, hi_start, hi)
    count_hi = tl.where(start, 0, count_hi)
    mass_hi = tl.where(start, 0.0, mass_hi)
    target = tl.where(start, top_p * mass_lo, target)
    return hi, count_hi, mass_hi, target


@triton.jit
def settle(phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target, hi_start, top_p, may_start_p):
    """A filter is settled when [lo, hi) holds one key or one element: theta = lo. Top-k settled ->
    top-p starts on the bracket [theta_k, hi_start) with target top_p * (mass kept by top-k)."""
    done = (hi - lo <= 1) | (count_lo - count_hi <= 1)
    to_p = (phase == 0) & done & may_start_p
    hi, count_hi, mass_hi, target = start_top_p(to_p, hi, count_hi, mass_hi, target, mass_lo, hi_start, top_p)
    done = tl.where(to_p, (hi - lo <= 1) | (count_lo - count_hi <= 1), done)
    phase = tl.where(done & (phase < 2), 2, tl.where(to_p, 1, phase))
    return phase, hi, count_hi, mass_hi, target


@triton.jit
def search_buffer(buf, num, base_count, base_mass, phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target,
                   m, inv_t, top_k, top_p, may_start_p, hi_start, max_passes, NUM_PIVOTS: tl.constexpr,
                   BLOCK_V: tl.constexpr):
    """The bisection of a filter (then top-p when may_start_p) on the num buffered tokens alone:
    W = base (the tokens above the buffered range) + buffer sums, masses in exact int64 units of 2^-40."""
    for _it in range(max_passes):
        if phase < 2:
            pivot, pivot_x = pivots(phase, lo, hi, count_lo, mass_lo, target, m, inv_t, NUM_PIVOTS)
            count, fixed = count_mass_ge(buf, 0, num, pivot_x, m, inv_t, NUM_PIVOTS, BLOCK_V, True, ".cg")
            count = count.to(tl.int64) + base_count
            mass = base_mass + fixed.to(tl.float32) * (1.0 / 1099511627776.0)
            lo, hi, count_lo, count_hi, mass_lo, mass_hi = narrow(
                phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, pivot, count, mass, top_k, target)
            phase, hi, count_hi, mass_hi, target = settle(
                phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target, hi_start, top_p, may_start_p)
    return phase, lo, hi, count_lo, count_hi, mass_lo, mass_hi, target
