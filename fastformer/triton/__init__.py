"""The "triton" backend: Triton kernels, one op per file (kernels -> launcher -> autograd glue).

Under ``TRITON_INTERPRET=1`` the kernels also accept CPU tensors and run in Triton's interpreter;
that is how they are tested on machines without a GPU. The kernels themselves land op by op;
:func:`op_table` declares what exists, as data for ``fastformer.dispatch``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supported_devices() -> frozenset:
    return frozenset({"cuda", "cpu"}) if interpreter_enabled() else frozenset({"cuda"})


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


def interpreter_breaks_on_numpy(triton_version: str, numpy_version: str) -> bool:
    """Triton's interpreter before 3.7 converts one-element arrays to Python ints, which NumPy 2.4
    made an error: every kernel looping up to a runtime bound fails (triton-lang/triton#9171)."""
    return _major_minor(triton_version) < (3, 7) and _major_minor(numpy_version) >= (2, 4)


def unavailable_reasons() -> list[str]:
    """Why Triton kernels cannot run on this machine at all (empty when they can)."""
    if importlib.util.find_spec("triton") is None:
        return ["the triton package is not installed (pip install triton)"]
    if not interpreter_enabled() and not torch.cuda.is_available():
        return ["no CUDA device is visible (set TRITON_INTERPRET=1 before importing fastformer to run "
                "the kernels on the CPU in Triton's interpreter)"]
    if interpreter_enabled():
        import numpy
        import triton

        if interpreter_breaks_on_numpy(triton.__version__, numpy.__version__):
            return [f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails with NumPy "
                    f"{numpy.__version__} (triton-lang/triton#9171): install numpy<2.4 or triton>=3.7"]
    return []


def op_table() -> dict:
    """op name -> (dispatch.Support, implementation module), for ``fastformer.dispatch``."""
    from fastformer.dispatch import Support

    devices = supported_devices()
    emulated = frozenset({"cpu"}) & devices  # the interpreter: tests only, never chosen automatically
    dtypes = frozenset({torch.float16, torch.bfloat16, torch.float32})
    common = dict(devices=devices, dtypes=dtypes, forced_only_devices=emulated,
                  min_compute_capability=MIN_COMPUTE_CAPABILITY)
    norm = Support(**common, features=frozenset({"dropout", "residual", "weight", "bias"}), max_hidden=MAX_HIDDEN)
    gelu = Support(**common, features=frozenset({"bias", "tanh", "erf", "dropout"}))
    attention = Support(**common, features=frozenset({"dropout", "causal", "bool_mask", "float_mask", "mask_grad",
                                                      "key_padding_mask", "gqa", "value_dim"}),
                        head_dims=(1, 256))
    return {
        "attention": (attention, "fastformer.triton.attention"),
        "residual_layer_norm": (norm, "fastformer.triton.layer_norm"),
        "residual_rms_norm": (norm, "fastformer.triton.layer_norm"),
        "bias_gelu": (gelu, "fastformer.triton.bias_gelu"),
    }


# One row of a norm lives in registers: 16384 float32 values is 64 KiB per program.
MAX_HIDDEN = 16384
# Triton supports NVIDIA GPUs of compute capability 8.0 and up (its README). Compiled for sm_75
# (T4) by benchmarks/compile_triton.py, the attention kernels get no tensor cores from Triton 3.6
# and 3.8 (tl.dot falls back to FMA below 8.0: triton-lang/triton#5066) and spill kilobytes a
# thread, and in bfloat16 Triton 3.2 fails to compile them. Older GPUs take the torch backend.
MIN_COMPUTE_CAPABILITY = (8, 0)


# --------------------------------------------------------------------------------------------
# helpers shared by the launchers
# --------------------------------------------------------------------------------------------
def on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current device): a device switch where ``t`` is
    on another GPU, nothing where it is on the current one (the usual case; a switch costs a few
    microseconds of host time at every launch) or on the CPU."""
    device = t.device
    if device.type != "cuda" or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


# The launchers' grid and block arithmetic, in plain Python: triton.cdiv and triton.next_power_of_2
# are constexpr functions since Triton 3.5, whose calls from host code cost about 2 microseconds
# each (a launch makes several), as much as a small kernel's launch.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative ``a`` and positive ``b``, as ``triton.cdiv``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The least power of two >= n, as ``triton.next_power_of_2`` (which gives 0 for 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
