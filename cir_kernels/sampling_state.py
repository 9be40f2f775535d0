"""A row's side of the kernels of cir_kernels/sampling_triton.py, as Triton device functions: its
sampling parameters, its state between passes (layout in sampling_triton.py's docstring), and the
per-row counter that tells the last program of a row to finish its pass.
"""
import triton
import triton.language as tl

# Row state between passes: int64 x 6, float32 x 5 a row (layout in cir_kernels/sampling_triton.py)
STATE_F, STATE_I = 5, 6


@triton.jit
def store_state(state_i_ptr, state_f_ptr, row, phase, lo, hi, count_lo, count_hi, passes, mass_lo, mass_hi, target):
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
def row_params(temperature_ptr, top_p_ptr, top_k_ptr, min_p_ptr, row, V):
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
def is_last(counter_ptr, num_splits):
    """True in the last program of the row to finish (it also resets the counter for the next call).
    The barrier orders every thread's stores before the release of the atomic."""
    tl.debug_barrier()
    done = tl.atomic_add(counter_ptr, 1)
    last = done == num_splits - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0)
    return last
