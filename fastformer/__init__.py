"""fastformer: fused GPU kernels for fast Transformer fine-tuning.

Public ops (see each docstring): :func:`attention`, :func:`residual_layer_norm`,
:func:`residual_rms_norm`, :func:`bias_gelu`. Backends: "cuda", "triton", "torch"; choose with the
``backend=`` argument, :func:`use_backend` or ``FASTFORMER_BACKEND``; :func:`explain` says which
backend a call would use and why. ``python -m fastformer.info`` describes this machine.
"""

from importlib import metadata as _metadata

from fastformer import dispatch as _dispatch
from fastformer import library as _library  # registers torch.ops.fastformer.*
from fastformer.dispatch import BackendUnavailableError, use_backend
from fastformer.functional import attention, bias_gelu, explain, residual_layer_norm, residual_rms_norm
from fastformer.nn import FastMultiheadAttention, FastTransformerEncoder, FastTransformerEncoderLayer
from fastformer.optimize import OptimizeReport, optimize

try:
    __version__ = _metadata.version("fastformer")
except _metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"


_dispatch.probe()


def available_backends() -> dict:
    """Backend name -> list of reasons it cannot run on this machine (empty list: available)."""
    return {name: list(_dispatch.backend_unavailable_reasons(name)) for name in _dispatch.BACKEND_NAMES}


__all__ = [
    "BackendUnavailableError",
    "FastMultiheadAttention",
    "FastTransformerEncoder",
    "FastTransformerEncoderLayer",
    "OptimizeReport",
    "attention",
    "available_backends",
    "bias_gelu",
    "explain",
    "optimize",
    "residual_layer_norm",
    "residual_rms_norm",
    "use_backend",
]
