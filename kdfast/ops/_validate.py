"""Input checks shared by every public op: each failure names the argument and what was expected.

Mixed dtypes: an op may get some inputs in bf16/fp16 (a matmul's output) and others in float32 (a norm's or a
parameter). kdfast accepts that and computes in the widest floating dtype among the inputs, at least float32; see
``compute_dtype``. Inside a ``torch.autocast`` region the op's autocast rule (kdfast/ops/_autocast.py) casts the
inputs first.
"""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(name: str, value, layout: str, *, floating: bool = True) -> torch.Tensor:
    """Check that ``value`` is a tensor with one dimension per letter group of ``layout`` ("(B, K, D)")."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {layout}, got {type(value).__name__}")
    ndim = len([part for part in layout.strip("()").split(",") if part.strip()])
    if value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {tuple(value.shape)}")
    if floating and value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {value.dtype}")
    return value


def nonempty(name: str, value: torch.Tensor, layout: str) -> None:
    if value.numel() == 0:
        raise ValueError(f"{name} must have no zero-sized dimension {layout}, got shape {tuple(value.shape)}")


def same_size(what: str, **sizes: int) -> None:
    """Check that named sizes agree, e.g. ``same_size("batch size B", student=4, teacher=5)``."""
    values = set(sizes.values())
    if len(values) > 1:
        listed = ", ".join(f"{name} has {size}" for name, size in sizes.items())
        raise ValueError(f"{what} must match: {listed}")


def same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {t.device for t in tensors.values()}
    if len(devices) == 1 and (device := next(iter(devices))).type != "meta":
        return device  # the common case, without formatting the message (every eager call comes here)
    listed = ", ".join(f"{name} on {t.device}" for name, t in tensors.items())
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device: {listed}")
    device = devices.pop()
    if device.type == "meta":
        # Meta tensors hold no values: no backend computes on them (the reference fails inside autocast's dispatch).
        # torch.compile's fake tensors report their real device, so tracing never gets here.
        raise ValueError(f"kdfast ops need CPU or CUDA tensors, got {listed} (meta tensors hold no values)")
    return device


def finite(name: str, value: float, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite{' positive' if positive else ''} number, got {value}")
    return float(value)


def choice(name: str, value: str, options: tuple[str, ...]) -> str:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}")
    return value


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype an op computes in: the inputs' dtype, or for mixed inputs the widest, at least float32."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) == 1:
        return dtypes.pop()
    widest = torch.float32
    for dtype in dtypes:
        widest = torch.promote_types(widest, dtype)
    return widest


def cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` in ``dtype``; those already in it (the usual case) are passed through without a call."""
    return tuple(t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)
