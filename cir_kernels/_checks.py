"""Argument checks shared by the kernels.

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
