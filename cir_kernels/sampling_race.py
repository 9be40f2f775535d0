"""The exponential race of `cir_kernels.sample`, as Triton device functions of
cir_kernels/sampling_triton.py: Gumbel noise from Philox keyed by the row's seed and the token's
vocabulary index (so a draw does not depend on the block size or the split), the race over a block,
over a row's buffered tokens, the merge of a row's chunks, and the token's write-out.
"""
import triton
import triton.language as tl

from cir_kernels.sampling_select import key_to_float


@triton.jit
def gumbel(seed, start, BLOCK: tl.constexpr):
    """G_i = -log(-log U_i) for i in [start, start + BLOCK), start a multiple of 4: one Philox call
    gives four uniforms (counter i // 4, output i % 4)."""
    r0, r1, r2, r3 = tl.randint4x(seed, start // 4 + tl.arange(0, BLOCK // 4))
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK]).to(tl.int32, bitcast=True)
    u = tl.where(r < 0, ~r, r) * 4.6566127342e-10  # as tl.rand: uniform in [0, 1)
    return -tl.log(-tl.log(u))


@triton.jit
def gumbel_at(seed, index):
    """G_i at arbitrary indices i (the same stream as gumbel)."""
    r0, r1, r2, r3 = tl.randint4x(seed, index // 4)
    lane = index % 4
    r = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3))).to(tl.int32, bitcast=True)
    u = tl.where(r < 0, ~r, r) * 4.6566127342e-10
    return -tl.log(-tl.log(u))


@triton.jit
def race_fold(x, valid, start, seed, inv_t, threshold, best, best_index, BLOCK: tl.constexpr):
    """Fold a block x[start:start + BLOCK] into the running race: best x/T + G over x >= threshold."""
    score = tl.where(valid & (x >= threshold), x * inv_t + gumbel(seed, start, BLOCK), float("-inf"))
    block_best = tl.max(score, axis=0)
    best_index = tl.where(block_best > best, start + tl.argmax(score, axis=0), best_index)
    return tl.maximum(best, block_best), best_index


@triton.jit
def race_block(row_ptr, start, end, seed, inv_t, threshold, best, best_index, BLOCK: tl.constexpr):
    offs = start + tl.arange(0, BLOCK)
    valid = offs < end
    x = tl.load(row_ptr + offs, mask=valid, other=float("-inf")).to(tl.float32)
    return race_fold(x, valid, start, seed, inv_t, threshold, best, best_index, BLOCK)


@triton.jit
def race_threshold(theta, m, min_p, inv_t):
    """The race's floor: x >= it iff order_key(x) >= theta (the top-k / top-p cut) and p >= min_p * max p,
    i.e. x >= m + T log(min_p) (at most m: the max is always kept)."""
    return tl.maximum(key_to_float(theta), tl.minimum(m + tl.log(min_p) / inv_t, m))


@triton.jit
def store_race_part(part_f_ptr, part_i_ptr, row, num_splits, split, best, best_index):
    """A chunk's race result: best score in part_f slot 3, its index in part_i slot 1 (slots 0-2 of
    part_f: m, s, min x; slot 0 of part_i: argmax, written by the stats pass)."""
    base = row * num_splits + split
    tl.store(part_f_ptr + base * 4 + 3, best)
    tl.store(part_i_ptr + base * 2 + 1, best_index)


@triton.jit
def race_winner(part_f_ptr, part_i_ptr, row, num_splits, BLOCK_S: tl.constexpr):
    """The row's race merged over its chunks in chunk order: (best score, its index; the lowest
    chunk on ties)."""
    sp = tl.arange(0, BLOCK_S)
    ok = sp < num_splits
    pbest = tl.load(part_f_ptr + (row * num_splits + sp) * 4 + 3, mask=ok, other=float("-inf"), cache_modifier=".cg")
    best = tl.max(pbest, axis=0)
    first = tl.min(tl.where(ok & (pbest == best), sp, BLOCK_S), axis=0)
    return best, tl.load(part_i_ptr + (row * num_splits + first) * 2 + 1, cache_modifier=".cg")


@triton.jit
def write_token(row_ptr, tokens_ptr, logprobs_ptr, row, token, m, inv_t, log_s):
    """The row's token and its log-prob (x_token - m)/T - log s over the full vocabulary."""
    x_token = tl.load(row_ptr + token).to(tl.float32)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, (x_token - m) * inv_t - log_s)


@triton.jit
def race_buffer(buf_x, buf_i, num, seed, inv_t, threshold, V, BLOCK_V: tl.constexpr):
    """The exponential race over buffered tokens with x >= threshold: (best score, its index; the
    lowest index on ties, whatever the buffer's order)."""
    best = float("-inf")
    best_index = V
    for start in range(0, num, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        valid = offs < num
        x = tl.load(buf_x + offs, mask=valid, other=float("-inf"), cache_modifier=".cg")
        index = tl.load(buf_i + offs, mask=valid, other=0, cache_modifier=".cg")
        score = tl.where(valid & (x >= threshold), x * inv_t + gumbel_at(seed, index), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.min(tl.where(valid & (score == block_best), index, V), axis=0)
        tie = (block_best == best) & (block_best > float("-inf"))
        best_index = tl.where(block_best > best, block_index, tl.where(tie, tl.minimum(best_index, block_index),
                                                                        best_index))
        best = tl.maximum(best, block_best)
    return best, best_index
