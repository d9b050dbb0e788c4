"""fastformer.residual_layer_norm / residual_rms_norm on every backend against float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastformer
import reference
from fastformer import dispatch
from fastformer.functional import _draw_seed
from helpers import Copies, ZeroFills, keep_mask_function
from helpers import BACKENDS, DEVICES, ELEMENTWISE_TOL, PARAM_GRAD_TOL_HALF, assert_rel_close, require_backend

HIDDEN = [1, 200, 384, 1000]
LEADING = [(), (7,), (3, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PARTS = ["residual+weight+bias", "weight+bias", "residual", "none", "residual+weight"]
NORMS = ["layer", "rms"]


def run_norm(norm, x, residual, weight, bias, eps, dropout_p=0.0, backend=None):
    if norm == "layer":
        return fastformer.residual_layer_norm(x, residual, weight, bias, eps, dropout_p, backend=backend)
    return fastformer.residual_rms_norm(x, residual, weight, eps, dropout_p, backend=backend)


def require(backend, norm, x, residual, weight, bias=None):
    if norm == "layer":
        require_backend(backend, "residual_layer_norm", x, residual, weight, bias)
    else:
        require_backend(backend, "residual_rms_norm", x, residual, weight)


def make_inputs(shape, parts, dtype, device, param_dtype=None, offset=0.0, spread=1.0):
    def tensor(*size, requires_grad=True, dt=dtype):
        t = torch.randn(*size, device=device, dtype=torch.float64) * spread + offset
        return t.to(dt).requires_grad_(requires_grad)

    hidden = shape[-1]
    param_dtype = param_dtype or dtype
    x = tensor(*shape)
    residual = tensor(*shape) if "residual" in parts else None
    weight = (1.0 + 0.5 * torch.randn(hidden, device=device, dtype=torch.float64)).to(param_dtype) \
        .requires_grad_() if "weight" in parts else None
    bias = torch.randn(hidden, device=device, dtype=torch.float64).to(param_dtype).requires_grad_() \
        if "bias" in parts else None
    return x, residual, weight, bias


def plain_pytorch(norm, x, residual, weight, bias, eps, keep, dropout_p):
    """What users run without fastformer, in x's dtype: the baseline for half-precision error."""
    r = x if keep is None else x * keep / (1.0 - dropout_p)
    if residual is not None:
        r = r + residual
    weight = None if weight is None else weight.to(x.dtype)
    if norm == "rms":
        return F.rms_norm(r, (r.shape[-1],), weight, eps), r
    return F.layer_norm(r, (r.shape[-1],), weight, None if bias is None else bias.to(x.dtype), eps), r


def check_against_reference(norm, inputs, dtype, backend, eps=1e-5, keep=None, dropout_p=0.0,
                            out_and_residual=None):
    x, residual, weight, bias = inputs
    rms = norm == "rms"
    if rms:
        bias = None
    if out_and_residual is None:
        out, residual_out = run_norm(norm, x, residual, weight, bias, eps, dropout_p, backend)
    else:
        out, residual_out = out_and_residual
    expected, expected_residual = reference.residual_norm(x, residual, weight, bias, eps, rms, keep, dropout_p)
    baseline, baseline_residual = plain_pytorch(norm, x, residual, weight, bias, eps, keep, dropout_p)
    fwd_tol, grad_tol = ELEMENTWISE_TOL[dtype]
    assert out.dtype == x.dtype and residual_out.dtype == x.dtype
    assert_rel_close(out, expected, fwd_tol, "out", baseline)
    assert_rel_close(residual_out, expected_residual, fwd_tol, "residual_out", baseline_residual)

    # The loss uses both outputs: the residual stream carries on to the next layer. The upstream
    # gradients are drawn in ``dtype``, so that the reference gets the same ones: else rounding them
    # is an error of the inputs that no kernel can avoid, and where the weight gradient cancels
    # (hidden 1: a sum of +-dy over the rows) it alone exceeded the tolerance, plain PyTorch's too.
    grad_out, grad_residual = (torch.randn_like(t).to(dtype).double() for t in (expected, expected_residual))
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    got = torch.autograd.grad((out, residual_out), inputs, (grad_out.to(dtype), grad_residual.to(dtype)))
    want = torch.autograd.grad((expected, expected_residual), inputs, (grad_out, grad_residual))
    baseline_grads = torch.autograd.grad((baseline, baseline_residual), inputs,
                                         (grad_out.to(dtype), grad_residual.to(dtype)))
    names = [n for n, t in zip(("x", "residual", "weight", "bias"), (x, residual, weight, bias)) if t is not None]
    for name, grad, expected_grad, baseline_grad in zip(names, got, want, baseline_grads):
        is_param = name in ("weight", "bias")
        tol = PARAM_GRAD_TOL_HALF if is_param and dtype in (torch.float16, torch.bfloat16) else grad_tol
        assert grad.dtype == {"x": x, "residual": residual, "weight": weight, "bias": bias}[name].dtype
        assert_rel_close(grad, expected_grad, tol, f"grad {name}", baseline_grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("parts", PARTS)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("norm", NORMS)
def test_matches_float64_reference(norm, hidden, parts, dtype, backend, device):
    leading = LEADING[hidden % len(LEADING)]
    inputs = make_inputs((*leading, hidden), parts, dtype, device)
    require(backend, norm, *inputs)
    check_against_reference(norm, inputs, dtype, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, hidden", [(37, 200), (130, 48), (3, 2048)])
@pytest.mark.parametrize("norm", NORMS)
def test_rows_that_tile_unevenly(norm, rows, hidden, backend, device, monkeypatch):
    """Row counts that split unevenly over a kernel's programs, which take several rows each
    (Triton: tiles of several short rows; a backward of a few programs, each walking its run of
    tiles, the last one a partial tile and runs past the end), with dropout: against float64 with
    the same mask."""
    p = 0.25
    inputs = make_inputs((rows, hidden), "residual+weight+bias", torch.float32, device)
    require(backend, norm, *inputs)
    keep_mask = keep_mask_function(backend, monkeypatch)
    torch.manual_seed(5)
    keep = keep_mask(_draw_seed(p, backend, device), (rows, hidden), p, device)
    torch.manual_seed(5)
    outputs = run_norm(norm, *inputs, 1e-5, p, backend)
    check_against_reference(norm, inputs, torch.float32, backend, keep=keep, dropout_p=p, out_and_residual=outputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_float32_parameters_with_half_inputs(norm, dtype, backend, device):
    """Mixed precision: activations in half, master weights in float32."""
    inputs = make_inputs((6, 256), "residual+weight+bias", dtype, device, param_dtype=torch.float32)
    require(backend, norm, *inputs)
    check_against_reference(norm, inputs, dtype, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_large_mean_small_spread_does_not_cancel(norm, backend, device):
    """Mean 1e3, std 1e-2 in float32: a one-pass E[x^2] - E[x]^2 variance would lose every digit."""
    inputs = make_inputs((16, 768), "weight+bias", torch.float32, device, offset=1e3, spread=1e-2)
    require(backend, norm, *inputs)
    check_against_reference(norm, inputs, torch.float32, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_dropout_matches_reference_with_the_same_mask(norm, dtype, backend, device, monkeypatch):
    """The mask that forward and backward regenerate is the one the backend's debug path returns."""
    p = 0.25
    inputs = make_inputs((4, 9, 200), "residual+weight+bias", dtype, device)
    x, residual, weight, bias = inputs
    require(backend, norm, *inputs)
    keep_mask = keep_mask_function(backend, monkeypatch)
    torch.manual_seed(11)
    seed = _draw_seed(p, backend, device)
    keep = keep_mask(seed, (36, 200), p, device).view(4, 9, 200)
    assert 0.7 < keep.float().mean().item() < 0.8
    torch.manual_seed(11)
    outputs = run_norm(norm, x, residual, weight, bias, 1e-5, p, backend)
    check_against_reference(norm, inputs, dtype, backend, keep=keep, dropout_p=p, out_and_residual=outputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_float64(norm, backend):
    x, residual, weight, bias = make_inputs((3, 4, 13), "residual+weight+bias", torch.float64, "cpu")
    require(backend, norm, x, residual, weight, bias)

    def run(x, residual, weight, bias):
        torch.manual_seed(5)  # the same dropout mask at every evaluation
        return run_norm(norm, x, residual, weight, bias if norm == "layer" else None, 1e-5, 0.2, backend)

    assert torch.autograd.gradcheck(run, (x, residual, weight, bias))


@pytest.mark.parametrize("norm", NORMS)
def test_float64_gradients_keep_float64_digits_through_the_explicit_backward(norm, monkeypatch):
    """The torch backend's explicit backward (torch.compile's path) reuses the forward's rstd:
    kept in float64 for float64 inputs, the gradients are exact to float64 rounding."""
    from fastformer import library

    monkeypatch.setattr(library, "NATIVE_AUTOGRAD", False)
    x, residual, weight, bias = make_inputs((7, 33), "residual+weight+bias", torch.float64, "cpu")
    bias = bias if norm == "layer" else None
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    outs = run_norm(norm, x, residual, weight, bias, 1e-5, backend="torch")
    expected = reference.residual_norm(x, residual, weight, bias, 1e-5, norm == "rms")
    grads = (torch.randn_like(outs[0]), torch.randn_like(outs[0]))
    for got, want in zip(torch.autograd.grad(outs, inputs, grads), torch.autograd.grad(expected, inputs, grads)):
        assert_rel_close(got, want, 1e-12, "gradient")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_residual_and_dropout_residual_out_is_x(backend, device):
    x = torch.randn(5, 64, device=device, requires_grad=True)
    require(backend, "layer", x, None, None, None)
    out, residual_out = fastformer.residual_layer_norm(x, None, None, None, backend=backend)
    assert residual_out is x  # no copy of the residual stream
    torch.testing.assert_close(out, torch.nn.functional.layer_norm(x, (64,)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autograd", ["default", "function"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_strided_inputs_and_an_output_scaled_in_place(norm, backend, autograd, device, monkeypatch):
    """(L, B, N) views of (B, L, N) tensors (the batch_first=False layout) go in; out comes back
    as a plain tensor that the caller may modify in place, and its gradient follows. "function"
    sends the torch backend through the autograd.Function that kernel backends use."""
    if autograd == "function":
        if backend != "torch":
            pytest.skip("only the torch backend has a native-autograd path")
        from fastformer import library

        monkeypatch.setattr(library, "NATIVE_AUTOGRAD", False)
    x, residual, weight, bias = make_inputs((3, 5, 48), "residual+weight+bias", torch.float32, device)
    x_view, residual_view = x.transpose(0, 1), residual.transpose(0, 1)
    require(backend, norm, x_view, residual_view, weight, bias)
    bias = bias if norm == "layer" else None
    out, residual_out = run_norm(norm, x_view, residual_view, weight, bias, 1e-5, backend=backend)
    out.mul_(2.0)
    expected, expected_residual = reference.residual_norm(x_view, residual_view, weight, bias, 1e-5,
                                                          norm == "rms")
    expected = expected * 2.0
    fwd_tol, grad_tol = ELEMENTWISE_TOL[torch.float32]
    assert out.shape == residual_out.shape == x_view.shape
    assert_rel_close(out, expected, fwd_tol, "out")
    assert_rel_close(residual_out, expected_residual, fwd_tol, "residual_out")
    grad_out, grad_residual = torch.randn_like(expected), torch.randn_like(expected)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    got = torch.autograd.grad((out, residual_out), inputs, (grad_out.float(), grad_residual.float()))
    want = torch.autograd.grad((expected, expected_residual), inputs, (grad_out, grad_residual))
    for name, grad, expected_grad in zip(("x", "residual", "weight", "bias"), got, want):
        assert_rel_close(grad, expected_grad, grad_tol, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["strided", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_weight_and_bias_of_any_strides(norm, dtype, layout, backend, device):
    """weight and bias as views: a column of a stacked (N, 2) parameter (stride 2; what vmap over
    per-sample parameters with in_dims=1 hands the op), or one value expanded to N (stride 0).
    Kernels that read them as contiguous vectors got O(1) errors, and read past a stride-0 one."""
    hidden = 200
    x, residual, _, _ = make_inputs((7, hidden), "residual", dtype, device)
    if layout == "strided":
        stacked = (1.0 + 0.5 * torch.randn(hidden, 2, device=device, dtype=torch.float64)).to(dtype)
        stacked.requires_grad_()
        weight, bias = stacked[:, 0], stacked[:, 1]
    else:
        scalars = torch.tensor([1.5, -0.25], device=device, dtype=torch.float64).to(dtype).requires_grad_()
        weight, bias = scalars[0].expand(hidden), scalars[1].expand(hidden)
    require(backend, norm, x, residual, weight, bias)
    check_against_reference(norm, (x, residual, weight, bias), dtype, backend)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_without_dropout_x_and_residual_share_one_gradient(norm, backend, device, monkeypatch):
    """Without dropout the kernel writes the gradient of residual_out once and x and residual both
    receive it, as with PyTorch's ``x + residual``; the leaves' .grad still end up as separate
    tensors, and a second backward accumulates into each."""
    from fastformer import library

    monkeypatch.setattr(library, "NATIVE_AUTOGRAD", False)  # the torch backend too
    x, residual, weight, _ = make_inputs((6, 40), "residual+weight", torch.float32, device)
    require(backend, norm, x, residual, weight, None)
    out, residual_out = run_norm(norm, x, residual, weight, None, 1e-5, backend=backend)
    expected, expected_residual = reference.residual_norm(x, residual, weight, None, 1e-5, norm == "rms")
    grads64 = (torch.randn_like(expected), torch.randn_like(expected))
    grads = tuple(g.float() for g in grads64)
    grad_x, grad_residual = torch.autograd.grad((out, residual_out), (x, residual), grads, retain_graph=True)
    assert grad_x.data_ptr() == grad_residual.data_ptr()
    want = torch.autograd.grad((expected, expected_residual), (x,), grads64)[0]
    assert_rel_close(grad_x, want, ELEMENTWISE_TOL[torch.float32][1], "grad x")
    torch.autograd.backward((out, residual_out), grads, retain_graph=True)
    torch.autograd.backward((out, residual_out), grads)
    assert x.grad.data_ptr() != residual.grad.data_ptr()
    assert_rel_close(x.grad, 2 * want, ELEMENTWISE_TOL[torch.float32][1], "x.grad")
    assert_rel_close(residual.grad, 2 * want, ELEMENTWISE_TOL[torch.float32][1], "residual.grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_no_rows(norm, backend, device):
    """Zero rows: empty outputs, and zero (not uninitialised) parameter gradients."""
    x, residual, weight, bias = make_inputs((2, 0, 40), "residual+weight+bias", torch.float32, device)
    bias = bias if norm == "layer" else None
    require(backend, norm, x, residual, weight, bias)
    torch.empty(1 << 16, device=device).fill_(float("nan"))  # (freed memory that empty() may hand out)
    out, residual_out = run_norm(norm, x, residual, weight, bias, 1e-5, backend=backend)
    assert out.shape == residual_out.shape == x.shape
    params = [t for t in (weight, bias) if t is not None]
    grads = torch.autograd.grad((out, residual_out), params, (torch.ones_like(out), torch.ones_like(out)))
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, params))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("read", ["out", "residual_out"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_a_loss_of_one_output(norm, backend, read, dropout_p, device, monkeypatch):
    """The loss reads one output only: the normalised one (the residual streams of a post-norm
    layer's norms go nowhere), or, rarer, the stream. The gradients are right, and the
    output that reaches no loss gets no zero-filled gradient (on a GPU: a memset, and for the
    stream a full read back in the backward), nor do the statistics. The torch backend also runs
    through the autograd.Function that kernel backends use."""
    from fastformer import library

    x, residual, weight, bias = make_inputs((3, 7, 200), "residual+weight+bias", torch.float32, device)
    bias = bias if norm == "layer" else None
    require(backend, norm, x, residual, weight, bias)
    monkeypatch.setattr(library, "NATIVE_AUTOGRAD", False)
    keep = None
    if dropout_p:
        torch.manual_seed(5)
        seed = _draw_seed(dropout_p, backend, device)
        keep = keep_mask_function(backend, monkeypatch)(seed, (21, 200), dropout_p, device).view(3, 7, 200)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    index = ("out", "residual_out").index(read)
    grad = torch.randn(3, 7, 200, device=device, dtype=torch.float64)
    torch.manual_seed(5)
    with ZeroFills() as zero_fills:
        outputs = run_norm(norm, x, residual, weight, bias, 1e-5, dropout_p, backend)
        got = torch.autograd.grad(outputs[index], inputs, grad.float(), allow_unused=True)
    expected = reference.residual_norm(x, residual, weight, bias, 1e-5, norm == "rms", keep, dropout_p)[index]
    want = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    for name, g, w in zip(("x", "residual", "weight", "bias"), got, want):
        if w is None:  # the stream does not depend on the parameters
            assert g is None or not g.any(), name
        else:
            assert_rel_close(g, w, ELEMENTWISE_TOL[torch.float32][1], f"grad {name}")
    if read == "out":
        assert zero_fills.fills == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_statistics_are_float32_for_half_inputs(norm, dtype, backend, device):
    """The op's saved statistics (mean, rstd) per row, 37 rows (tiles with rows past the end)."""
    rows, hidden = 37, 40
    x = torch.randn(rows, hidden, dtype=dtype, device=device) + 0.5
    rms = norm == "rms"
    require(backend, norm, x, None, None, None)
    _, _, mean, rstd = torch.ops.fastformer.residual_norm_fwd(x, None, None, None, 1e-5, 0.0, rms, None,
                                                              False, backend)
    assert rstd.dtype == torch.float32 and rstd.shape == (rows,)
    r = reference.residual_norm(x, None, None, None, 1e-5, rms)[1]
    centred = r - (0 if rms else r.mean(-1, keepdim=True))
    torch.testing.assert_close(rstd.double(), 1 / torch.sqrt((centred**2).mean(-1) + 1e-5), rtol=1e-5, atol=0)
    if not rms:
        assert mean.dtype == torch.float32 and mean.shape == (rows,)
        torch.testing.assert_close(mean.double(), r.mean(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows, hidden", [(8192, 4096), (32 * 512, 768), (1000, 16384)])
@pytest.mark.parametrize("norm", NORMS)
def test_real_sizes_on_gpu(norm, rows, hidden, backend, monkeypatch):
    """The benchmark shapes in bfloat16, with dropout, against the same-mask float64 reference."""
    p = 0.1
    inputs = make_inputs((rows, hidden), "residual+weight+bias", torch.bfloat16, "cuda",
                         param_dtype=torch.float32)
    x, residual, weight, bias = inputs
    require(backend, norm, *inputs)
    keep_mask = keep_mask_function(backend, monkeypatch)
    torch.manual_seed(3)
    seed = _draw_seed(p, backend, "cuda")
    keep = keep_mask(seed, (rows, hidden), p, "cuda")
    torch.manual_seed(3)
    outputs = run_norm(norm, x, residual, weight, bias, 1e-5, p, backend)
    check_against_reference(norm, inputs, torch.bfloat16, backend, keep=keep, dropout_p=p,
                            out_and_residual=outputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORMS)
def test_widest_rows(norm, backend, device):
    """16384 is the widest row the Triton and CUDA kernels keep in registers: it must still be exact."""
    inputs = make_inputs((2, 16384), "residual+weight+bias", torch.float32, device)
    require(backend, norm, *inputs)
    check_against_reference(norm, inputs, torch.float32, backend)


@pytest.mark.parametrize("norm", NORMS)
def test_rows_wider_than_a_backend_supports_fall_back_or_explain(norm):
    x = torch.randn(2, 16385)
    args = (x, None, None, None) if norm == "layer" else (x, None, None)
    op = f"residual_{norm}_norm"
    assert fastformer.explain(op, *args).backend == "torch"  # CPU tensors: the automatic choice
    if dispatch.backend_unavailable_reasons("triton"):
        pytest.skip("triton cannot run here at all")
    with pytest.raises(fastformer.BackendUnavailableError, match="hidden size 16385 not supported"):
        fastformer.explain(op, *args, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("norm", NORMS)
def test_half_x_meets_a_float32_residual_stream(norm, x_dtype, dropout_p, backend, device, monkeypatch):
    """Under autocast a half-precision sublayer output meets the float32 residual stream: both
    outputs in float32 (x + residual's dtype), each gradient in its input's dtype, all against
    float64 with the same dropout mask. The Triton and CUDA kernels take the two dtypes as they
    are (MIXED_DTYPES) and copy nothing: no cast of x forward, none of its gradient backward."""
    x, _, weight, bias = make_inputs((5, 37), "weight+bias", x_dtype, device, param_dtype=torch.float32)
    residual = torch.randn(5, 37, device=device, dtype=torch.float32, requires_grad=True)
    if norm == "rms":
        bias = None
    require(backend, norm, x.float(), residual, weight, bias)
    keep_mask = keep_mask_function(backend, monkeypatch)  # the torch backend: its kernel path too
    keep = None
    if dropout_p:
        torch.manual_seed(11)
        keep = keep_mask(_draw_seed(dropout_p, backend, device), x.shape, dropout_p, device)
    torch.manual_seed(11)
    with Copies() as copies:
        out, residual_out = run_norm(norm, x, residual, weight, bias, 1e-5, dropout_p, backend)
        grads = torch.autograd.grad((out, residual_out), (x, residual, weight),
                                    (torch.ones_like(out), torch.full_like(residual_out, 0.5)))
    assert out.dtype == residual_out.dtype == torch.float32
    assert [g.dtype for g in grads] == [x_dtype, torch.float32, torch.float32]
    want_out, want_residual = reference.residual_norm(x, residual, weight, bias, 1e-5, norm == "rms", keep, dropout_p)
    assert_rel_close(residual_out, want_residual, 1e-6, "residual_out")
    assert_rel_close(out, want_out, ELEMENTWISE_TOL[torch.float32][0], "out")
    want = torch.autograd.grad((want_out, want_residual), (x, residual, weight),
                               (torch.ones_like(want_out), torch.full_like(want_residual, 0.5)))
    for name, grad, expected in zip(("x", "residual", "weight"), grads, want):
        tol = ELEMENTWISE_TOL[x_dtype][1] if name == "x" else ELEMENTWISE_TOL[torch.float32][1]
        assert_rel_close(grad, expected, tol, f"grad {name}")
    if backend in ("triton", "cuda"):
        assert copies.copies == []
