"""fastformer.bias_gelu (and its fused dropout) on every backend against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastformer
import reference
from fastformer.functional import _draw_seed
from helpers import (BACKENDS, DEVICES, ELEMENTWISE_TOL, PARAM_GRAD_TOL_HALF, assert_rel_close, keep_mask_function,
                     require_backend)

SHAPES = [(1,), (37,), (5, 200), (2, 7, 768), (3, 1000), (67, 72)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(shape, dtype, device, with_bias=True, bias_dtype=None):
    x = (2.0 * torch.randn(shape, device=device, dtype=torch.float64)).to(dtype).requires_grad_()
    bias = None
    if with_bias:
        bias = torch.randn(shape[-1], device=device, dtype=torch.float64).to(bias_dtype or dtype)
        bias.requires_grad_()
    return x, bias


def plain_pytorch(x, bias, approximate):
    """What users run without fastformer, in x's dtype: the baseline for half-precision error."""
    return F.gelu(x if bias is None else x + bias.to(x.dtype), approximate=approximate)


def check_against_reference(x, bias, approximate, backend, dropout_p=0.0, keep=None):
    """Output and gradients against float64; with dropout, ``keep`` is the mask the call draws."""
    out = fastformer.bias_gelu(x, bias, approximate, dropout_p=dropout_p, backend=backend)
    expected = reference.gelu(x, bias, approximate)
    baseline = plain_pytorch(x, bias, approximate)
    if keep is not None:
        expected = expected * keep / (1.0 - dropout_p)
        baseline = baseline * (keep / (1.0 - dropout_p)).to(x.dtype)
    fwd_tol, grad_tol = ELEMENTWISE_TOL[x.dtype]
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_rel_close(out, expected, fwd_tol, "out", baseline)
    grad_out = torch.randn_like(expected)
    inputs = (x,) if bias is None else (x, bias)
    got = torch.autograd.grad(out, inputs, grad_out.to(x.dtype))
    want = torch.autograd.grad(expected, inputs, grad_out)
    baseline_grads = torch.autograd.grad(baseline, inputs, grad_out.to(x.dtype))
    assert_rel_close(got[0], want[0], grad_tol, "grad x", baseline_grads[0])
    if bias is not None:
        half = x.dtype in (torch.float16, torch.bfloat16)
        assert got[1].dtype == bias.dtype
        assert_rel_close(got[1], want[1], PARAM_GRAD_TOL_HALF if half else grad_tol, "grad bias",
                         baseline_grads[1].to(bias.dtype) if bias.dtype == x.dtype else None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64_reference(shape, approximate, with_bias, dtype, backend, device):
    x, bias = make_inputs(shape, dtype, device, with_bias)
    require_backend(backend, "bias_gelu", x, bias, approximate)
    check_against_reference(x, bias, approximate, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(5, 7, 200), (3, 77)], ids=str)
def test_dropout_matches_reference_with_the_same_mask(shape, approximate, with_bias, dtype, backend, device,
                                                      monkeypatch):
    """dropout(gelu(x + bias)): the mask that forward and backward regenerate from the call's seed
    is the one the backend's debug path returns for x viewed as (rows, N); dropped elements get
    zero output and zero gradient, kept ones gelu / (1 - p)."""
    p = 0.3
    x, bias = make_inputs(shape, dtype, device, with_bias)
    require_backend(backend, "bias_gelu", x, bias, approximate, dropout_p=p)
    keep_mask = keep_mask_function(backend, monkeypatch)
    torch.manual_seed(11)
    seed = _draw_seed(p, backend, device)
    keep = keep_mask(seed, (x.numel() // shape[-1], shape[-1]), p, device).view(shape)
    assert 0.6 < keep.float().mean().item() < 0.8
    torch.manual_seed(11)
    check_against_reference(x, bias, approximate, backend, dropout_p=p, keep=keep)
    torch.manual_seed(11)  # the dropped elements exactly (a few wrong bits could hide in a relative error)
    out = fastformer.bias_gelu(x, bias, approximate, dropout_p=p, backend=backend)
    (grad_x,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert not out[~keep].any() and not grad_x[~keep].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_draws_a_new_mask_per_call(backend, device):
    x, bias = make_inputs((16, 64), torch.float32, device)
    require_backend(backend, "bias_gelu", x, bias, dropout_p=0.5)
    first, second = (fastformer.bias_gelu(x, bias, dropout_p=0.5, backend=backend) for _ in range(2))
    assert not torch.equal(first == 0, second == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_bias_with_half_inputs(dtype, backend, device):
    x, bias = make_inputs((4, 96), dtype, device, bias_dtype=torch.float32)
    require_backend(backend, "bias_gelu", x, bias)
    check_against_reference(x, bias, "tanh", backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_same_as_pytorch_gelu_in_float32(approximate, backend, device):
    x, bias = make_inputs((6, 130), torch.float32, device)
    require_backend(backend, "bias_gelu", x, bias, approximate)
    torch.testing.assert_close(fastformer.bias_gelu(x, bias, approximate, backend=backend),
                               F.gelu(x + bias, approximate=approximate))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transposed", "row_strided", "expanded"])
def test_non_contiguous_input(layout, backend, device):
    if layout == "transposed":
        x = torch.randn(64, 48, device=device).t()  # (48, 64), strides (1, 48)
    elif layout == "row_strided":
        x = torch.randn(48, 100, device=device)[:, 10:74]  # (48, 64), row stride 100 (unaligned)
    else:
        x = torch.randn(1, 64, device=device).expand(48, 64)  # row stride 0
    x.requires_grad_()
    bias = torch.randn(64, device=device, requires_grad=True)
    require_backend(backend, "bias_gelu", x, bias)
    check_against_reference(x, bias, "none", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gradcheck_float64(approximate, dropout_p, backend):
    x, bias = make_inputs((3, 4, 11), torch.float64, "cpu")
    require_backend(backend, "bias_gelu", x, bias, approximate, dropout_p=dropout_p)

    def run(x, bias):
        torch.manual_seed(5)  # the same dropout mask at every evaluation
        return fastformer.bias_gelu(x, bias, approximate, dropout_p=dropout_p, backend=backend)

    assert torch.autograd.gradcheck(run, (x, bias))
