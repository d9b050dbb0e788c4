"""Shared test helpers: devices, backends, tolerances (DESIGN.md) and relative-error checks."""

from __future__ import annotations

import pytest
import torch

import fastformer
from fastformer import dispatch

# Relative error ||out - ref|| / ||ref|| against float64, from DESIGN.md.
ATTENTION_TOL = {torch.float32: (2e-3, 4e-3), torch.bfloat16: (2.5e-2, 5e-2),
                 torch.float16: (2.5e-2, 5e-2), torch.float64: (1e-10, 1e-10)}
ELEMENTWISE_TOL = {torch.float32: (1e-4, 1e-3), torch.bfloat16: (2e-2, 4e-2),
                   torch.float16: (2e-2, 4e-2), torch.float64: (1e-10, 1e-10)}
# Bias and weight gradients of the norms and bias_gelu in half precision.
PARAM_GRAD_TOL_HALF = 2e-1

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
BACKENDS = list(dispatch.BACKEND_NAMES)


def require_backend(backend: str, op, *args, **kwargs) -> None:
    """Skip, with the reasons, when ``backend`` cannot take ``op(*args, **kwargs)`` on this machine."""
    try:
        fastformer.explain(op, *args, backend=backend, **kwargs)
    except fastformer.BackendUnavailableError as error:
        pytest.skip(str(error))


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    denominator = expected.norm().item()
    numerator = (actual - expected).norm().item()
    return numerator / denominator if denominator > 0 else numerator


def assert_rel_close(actual, expected, tol, what=""):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    error = rel_error(actual, expected)
    assert error <= tol, f"{what}: relative error {error:.3g} > {tol:.3g}"
