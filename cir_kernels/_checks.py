"""Argument checks shared by the kernels, and the one backend picker.

Every kernel X follows one layout: `X.py` is the public API (checks from here, then `pick_backend`
and a call into one of the two paths), `X_triton.py` holds the Triton kernels and their launchers,
`X_reference.py` the plain-torch twin (which never imports the Triton file). A public function
checks its arguments; launchers and twins' internal pieces only assert.

    backend = pick_backend(backend, tensor)     # None -> "triton" for CUDA tensors, else "torch"

`backend="triton"` on CPU tensors runs the kernels through Triton's interpreter (TRITON_INTERPRET=1,
set by tests/conftest.py): that is how the tests reach the Triton path without a GPU.

Every check raises ValueError naming the argument and showing the bad value. Values inside CUDA
tensors are never inspected (that would synchronise the host with the device); values inside CPU
tensors and Python numbers are.
"""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = (None, "triton", "torch")


def check_backend(backend: str | None) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")


def pick_backend(backend: str | None, tensor: torch.Tensor) -> str:
    """None -> Triton for CUDA tensors, the torch reference otherwise."""
    check_backend(backend)
    if backend is None:
        return "triton" if tensor.is_cuda else "torch"
    return backend


def check_tensor(
    name: str,
    tensor: object,
    *,
    ndim: int,
    dtypes: tuple[torch.dtype, ...] | None = None,
    integer: bool = False,
    device: torch.device | None = None,
    last_dim_contiguous: bool = False,
    contiguous: bool = False,
) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if integer and (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool):
        raise ValueError(f"{name} must have an integer dtype, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")
    if last_dim_contiguous and tensor.dim() > 0 and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")
    return tensor


def _check_range(name: str, value: float, low: float, high: float, low_open: bool) -> None:
    below = value <= low if low_open else value < low
    if below or value > high or value != value:
        left = "(" if low_open else "["
        raise ValueError(f"{name} must lie in {left}{low}, {high}], got {value}")


def per_row(
    name: str,
    value: float | int | torch.Tensor,
    num_rows: int,
    device: torch.device,
    *,
    integer: bool,
    low: float,
    high: float,
    low_open: bool = False,
) -> torch.Tensor:
    """A per-row parameter as a contiguous [num_rows] tensor (int64 if integer else float32).

    A Python number is broadcast; a tensor must be [num_rows] (or 0-dim) on `device`.
    """
    dtype = torch.int64 if integer else torch.float32
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(num_rows)
        if value.dim() != 1 or value.shape[0] != num_rows:
            raise ValueError(f"{name} must be a number or a [{num_rows}] tensor, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device}, expected {device}")
        if integer and value.dtype.is_floating_point:
            raise ValueError(f"{name} must hold integers, got dtype {value.dtype}")
        if value.device.type != "cuda" and value.numel() > 0:
            below = value <= low if low_open else value < low
            bad = below | (value > high) | (value != value)
            if bool(bad.any()):
                _check_range(name, float(value[bad.nonzero()[0, 0]]), low, high, low_open)
        return value.to(dtype).contiguous()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if integer and not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    _check_range(name, float(value), low, high, low_open)
    return torch.full((num_rows,), value, dtype=dtype, device=device)


def check_temperature(temperature: float) -> float:
    """A scalar softmax temperature: a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number, got {type(temperature).__name__}")
    if not (0.0 < float(temperature) < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return float(temperature)


# ---------------------------------------------------------------- per kernel
_FLOAT_MAX = float(torch.finfo(torch.float32).max)

Generator = torch.Generator | int | torch.Tensor | None


def prepare_sampling(
    logits: torch.Tensor,
    temperature: float | torch.Tensor,
    top_p: float | torch.Tensor,
    top_k: int | torch.Tensor,
    min_p: float | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample`'s checks: per-row (temperature, top_p, min_p) float32 and top_k int64, [B] each."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    num_rows, vocab_size = logits.shape
    if vocab_size == 0:
        raise ValueError(f"logits must have at least one column, got shape {tuple(logits.shape)}")
    device = logits.device
    temperature = per_row("temperature", temperature, num_rows, device, integer=False, low=0.0, high=_FLOAT_MAX)
    top_p = per_row("top_p", top_p, num_rows, device, integer=False, low=0.0, high=1.0, low_open=True)
    top_k = per_row("top_k", top_k, num_rows, device, integer=True, low=0, high=2**62)
    min_p = per_row("min_p", min_p, num_rows, device, integer=False, low=0.0, high=1.0)
    return temperature, top_p, top_k, min_p


def check_row_seeds(generator: torch.Tensor, num_rows: int, device: torch.device) -> None:
    """A [num_rows] integer tensor of per-row seeds on `device`."""
    check_tensor("generator", generator, ndim=1, integer=True, device=device)
    if generator.shape[0] != num_rows:
        raise ValueError(f"generator (per-row seeds) must have shape [{num_rows}], got {tuple(generator.shape)}")


def check_logprobs_args(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> tuple[torch.Tensor, float]:
    """`logprobs_from_logits`' checks: (targets as contiguous int64, 1 / temperature)."""
    check_tensor("logits", logits, ndim=2, dtypes=FLOAT_DTYPES, last_dim_contiguous=True)
    check_tensor("targets", targets, ndim=1, integer=True, device=logits.device)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"targets has {targets.shape[0]} rows, logits {logits.shape[0]}")
    if logits.shape[1] == 0:
        raise ValueError(f"logits must have at least one column, got shape {tuple(logits.shape)}")
    inv_t = 1.0 / check_temperature(temperature)
    if not targets.is_cuda and targets.numel() > 0:
        bad = (targets < 0) | (targets >= logits.shape[1])
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, {logits.shape[1]}), got {int(targets[bad][0])}")
    return targets.to(torch.int64).contiguous(), inv_t


def check_linear_logprobs_args(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float,
    mask: torch.Tensor | None, chunk_size: int | None, check_targets: bool,
) -> tuple[torch.Tensor, float]:
    """`linear_logprobs`' checks: (targets as contiguous int64, 1 / temperature)."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(hidden.dtype,), device=hidden.device)
    check_tensor("targets", targets, ndim=1, integer=True, device=hidden.device)
    num_rows, vocab_size = hidden.shape[0], weight.shape[0]
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight is {tuple(weight.shape)}, expected [V, {hidden.shape[1]}] "
                         f"to match hidden {tuple(hidden.shape)}")
    if vocab_size == 0:
        raise ValueError(f"weight must have at least one row, got shape {tuple(weight.shape)}")
    if targets.shape[0] != num_rows:
        raise ValueError(f"targets has {targets.shape[0]} rows, hidden {num_rows}")
    inv_t = 1.0 / check_temperature(temperature)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if mask is not None:
        check_tensor("mask", mask, ndim=1, device=hidden.device)
        if mask.shape[0] != num_rows:
            raise ValueError(f"mask has {mask.shape[0]} rows, hidden {num_rows}")
    targets = targets.to(torch.int64).contiguous()
    if check_targets and not targets.is_cuda:
        kept_targets = targets if mask is None else targets[mask != 0]
        bad = (kept_targets < 0) | (kept_targets >= vocab_size)
        if bool(bad.any()):
            raise ValueError(f"targets must lie in [0, {vocab_size}), got {int(kept_targets[bad][0])}")
    return targets, inv_t


def validate_paged_args(q, cu_seqlens_q, k_cache, v_cache, block_tables, seq_lens, max_seqlen_q) -> None:
    """`paged_attention`'s checks (shapes, dtypes, devices, layouts; lengths are checked by the twin's plan)."""
    if q.dim() != 3:
        raise ValueError(f"q must be (T, Hq, D), got shape {tuple(q.shape)}")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must be (num_blocks, block_size, Hkv, D), got {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    if q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q dtype must be one of {FLOAT_DTYPES}, got {q.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dtype != q.dtype:
            raise ValueError(f"{name} dtype {cache.dtype} != q dtype {q.dtype}")
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {cache.stride()}")
        if cache.device != q.device:
            raise ValueError(f"{name} is on {cache.device}, q on {q.device}")
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads {num_q_heads} not a multiple of kv heads {num_kv_heads} (k_cache)")
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    for name, t, ndim in (("cu_seqlens_q", cu_seqlens_q, 1), ("block_tables", block_tables, 2),
                          ("seq_lens", seq_lens, 1)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
        if t.dim() != ndim or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {ndim}-d tensor, got shape {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")
    num_seqs = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.shape[0]} entries, want B + 1 = {num_seqs + 1}")
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows, want B = {num_seqs}")
    if max_seqlen_q is not None and max_seqlen_q < 0:
        raise ValueError(f"max_seqlen_q must be >= 0, got {max_seqlen_q}")


def check_store_kv_args(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """`store_kv`'s checks."""
    if k.dim() != 3 or v.shape != k.shape:
        raise ValueError(f"k and v must both be (T, Hkv, D), got {tuple(k.shape)} and {tuple(v.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape or k_cache.shape[2:] != k.shape[1:]:
        raise ValueError(f"k_cache/v_cache must be (num_blocks, block_size, {k.shape[1]}, {k.shape[2]}),"
                         f" got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not cache.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {cache.stride()}")
        if cache.dtype != k.dtype or v.dtype != k.dtype:
            raise ValueError(f"{name} dtype {cache.dtype}, k {k.dtype}, v {v.dtype}: must match")
    if slot_mapping.dtype != torch.int64 or slot_mapping.shape != (k.shape[0],):
        raise ValueError(f"slot_mapping must be int64 of shape ({k.shape[0]},), "
                         f"got {slot_mapping.dtype} {tuple(slot_mapping.shape)}")
