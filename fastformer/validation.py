"""Input checks shared by the public ops. Each error names the argument and what was seen."""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_of(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def type_name(value) -> str:
    """``str`` for builtins, the qualified name otherwise: NumPy's bool is not "bool"."""
    cls = type(value)
    return cls.__name__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def check_tensor(op: str, name: str, t, *, ndim: int | None = None, min_ndim: int | None = None,
                 layout: str = "") -> None:
    """A floating-point tensor, with ``ndim`` dims exactly or at least ``min_ndim``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type_name(t)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {shape_of(t)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{op}: {name} must have at least {min_ndim} dim(s), got shape {shape_of(t)}")


def check_same_device(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {reference_name} is on "
                             f"{reference.device}; all tensors must be on one device")


def check_same_dtype(op: str, reference_name: str, reference: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != reference.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but {reference_name} has dtype "
                            f"{reference.dtype}; they must match")


def check_vector(op: str, name: str, t, size: int, dtype: torch.dtype, device, *,
                 sum_dtype: torch.dtype | None = None) -> None:
    """weight / bias: None, or a 1-D float tensor of ``size``, in the input's dtype or float32 (or
    ``sum_dtype``, that of ``x + residual`` when they differ)."""
    if t is None:
        return
    check_tensor(op, name, t)
    if t.dim() != 1 or t.shape[0] != size:
        raise ValueError(f"{op}: {name} must have shape ({size},) to match the last dim of x, "
                         f"got shape {shape_of(t)}")
    if t.dtype not in (dtype, sum_dtype, torch.float32):
        of_sum = f", that of x + residual ({sum_dtype})" if sum_dtype not in (None, dtype) else ""
        raise TypeError(f"{op}: {name} must have the dtype of x ({dtype}){of_sum} or float32, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")


def check_seed(op: str, seed, device: torch.device) -> None:
    """A kernel's dropout seed: one int64 on the data's ``device``, which the kernel loads."""
    if not isinstance(seed, torch.Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        seen = f"{seed.dtype} of shape {shape_of(seed)}" if isinstance(seed, torch.Tensor) else type_name(seed)
        raise TypeError(f"{op}: seed must be a one-element int64 tensor, got {seen}")
    if seed.device != device:
        raise ValueError(f"{op}: seed must be on the data's device ({device}), got {seed.device}")


def is_real_number(value) -> bool:
    """A Python or NumPy int or float (numbers.Real), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_probability(op: str, name: str, p) -> float:
    if not is_real_number(p):
        raise TypeError(f"{op}: {name} must be a float in [0, 1], got {type_name(p)} {p!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{op}: {name} must be in [0, 1], got {p}")
    return float(p)


def _as_finite_float(op: str, name: str, value, what: str) -> float:
    # Comparisons rather than math.isfinite, so that torch.compile(dynamic=True) traces them on
    # symbolic floats; NaN fails both. An int too large for a float passes them, not float().
    if value < math.inf and value > -math.inf:
        try:
            return float(value)
        except OverflowError:  # an int too large for a float (and perhaps to print in full)
            raise ValueError(f"{op}: {name} must be a {what}, got an int of {value.bit_length()} bits") from None
    raise ValueError(f"{op}: {name} must be a {what}, got {value}")


def check_non_negative(op: str, name: str, value) -> float:
    if not is_real_number(value):
        raise TypeError(f"{op}: {name} must be a non-negative float, got {type_name(value)} {value!r}")
    if not value >= 0.0:
        raise ValueError(f"{op}: {name} must be a non-negative finite float, got {value}")
    return _as_finite_float(op, name, value, "non-negative finite float")


def check_finite(op: str, name: str, value) -> float:
    if not is_real_number(value):
        raise TypeError(f"{op}: {name} must be a float or None, got {type_name(value)} {value!r}")
    return _as_finite_float(op, name, value, "finite float")


def check_bool(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type_name(value)} {value!r}")
    return value


def broadcast_mask_4d(op: str, name: str, mask, target: tuple[int, int, int, int], dtype: torch.dtype,
                      device) -> torch.Tensor | None:
    """Check that ``mask`` is bool or float and broadcastable to ``target``; view it as 4-D.

    The result keeps size-1 dims (no copy); backends broadcast them.
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor or None, got {type_name(mask)}")
    if mask.dtype != torch.bool and mask.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be bool (True = may attend) or a floating-point additive "
                        f"mask, got dtype {mask.dtype}")
    if mask.device != device:
        raise ValueError(f"{op}: {name} is on {mask.device} but query is on {device}")
    if mask.dim() > 4 or mask.dim() == 0 or any(
            size not in (1, want) for size, want in zip(reversed(mask.shape), reversed(target))):
        # Formatted only here: under torch.compile with symbolic sizes, str() of one cannot be traced.
        expected = "(B, Hq, Lq, Lk) = (" + ", ".join(map(str, target)) + ")"
        raise ValueError(f"{op}: {name} of shape {shape_of(mask)} is not broadcastable to {expected}")
    return mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
