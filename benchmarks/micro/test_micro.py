"""Micro-benchmarks for tracking regressions with pytest-benchmark.

    pytest benchmarks/micro --benchmark-only                       # time them
    pytest benchmarks/micro --benchmark-only --benchmark-autosave  # keep a run in .benchmarks/
    pytest benchmarks/micro --benchmark-only --benchmark-compare   # against the last saved run

One forward + backward step per op and backend that can run here (plus PyTorch's own way, as a
reference), on one fine-tuning-sized shape on CUDA (bfloat16) or a small one on the CPU
(float32). Each timed call ends with a CUDA synchronisation, so the times are wall-clock times of
whole steps, launch overhead included. The "overhead" groups time what fastformer itself adds to
a call (checks, dispatch, the autograd.Function) with kernels that compute nothing: functions
that only allocate the outputs (``null_backend.py``), and the Triton backend's own launchers with
every launch a no-op (their host arithmetic included); beside them, the least a bare
autograd.Function costs, and the same layer step of PyTorch's own layer.

They live outside tests/, so the normal test run does not collect them; without pytest-benchmark
the module is skipped.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

import fastformer  # noqa: E402
import null_backend  # noqa: E402  (beside this file)
from fastformer import dispatch  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BACKENDS = [name for name, reasons in fastformer.available_backends().items() if not reasons]


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def _rand(*shape, requires_grad=False):
    return torch.randn(*shape, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad)


def _usable(op, backend, *args, **kwargs):
    try:
        fastformer.explain(op, *args, backend=backend, **kwargs)
    except fastformer.BackendUnavailableError as exc:
        pytest.skip(f"backend {backend} cannot take this call: {exc}")


def _step(forward, inputs, grad_outputs):
    def run():
        outs = forward()
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, inputs, grad_outputs)
        _sync()
    return run


@pytest.fixture(scope="module")
def attention_inputs():
    B, H, L, D = (8, 12, 512, 64) if CUDA else (2, 4, 128, 64)
    torch.manual_seed(0)
    q, k, v = (_rand(B, L, H, D).transpose(1, 2).requires_grad_() for _ in range(3))
    lengths = torch.randint(L // 10, L + 1, (B,), device=DEVICE)
    padding = torch.arange(L, device=DEVICE)[None, :] >= lengths[:, None]
    return q, k, v, padding, _rand(B, H, L, D)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention(benchmark, attention_inputs, backend):
    q, k, v, padding, grad = attention_inputs
    _usable(fastformer.attention, backend, q, k, v, key_padding_mask=padding)
    benchmark.group = "attention fwd+bwd"
    benchmark(_step(lambda: fastformer.attention(q, k, v, key_padding_mask=padding, backend=backend),
                    (q, k, v), (grad,)))


def test_attention_sdpa(benchmark, attention_inputs):
    q, k, v, padding, grad = attention_inputs
    mask = ~padding[:, None, None, :]
    benchmark.group = "attention fwd+bwd"
    benchmark(_step(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), (grad,)))


@pytest.fixture(scope="module")
def norm_inputs():
    rows, hidden = (16384, 768) if CUDA else (2048, 256)
    torch.manual_seed(0)
    x, residual = _rand(rows, hidden, requires_grad=True), _rand(rows, hidden, requires_grad=True)
    weight, bias = _rand(hidden, requires_grad=True), _rand(hidden, requires_grad=True)
    return x, residual, weight, bias, _rand(rows, hidden), _rand(rows, hidden)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_layer_norm(benchmark, norm_inputs, backend):
    x, residual, weight, bias, g1, g2 = norm_inputs
    _usable(fastformer.residual_layer_norm, backend, x, residual, weight, bias)
    benchmark.group = "residual_layer_norm fwd+bwd"
    benchmark(_step(lambda: fastformer.residual_layer_norm(x, residual, weight, bias, backend=backend),
                    (x, residual, weight, bias), (g1, g2)))


def test_residual_layer_norm_eager(benchmark, norm_inputs):
    x, residual, weight, bias, g1, g2 = norm_inputs

    def forward():
        r = x + residual
        return F.layer_norm(r, (x.shape[-1],), weight, bias), r
    benchmark.group = "residual_layer_norm fwd+bwd"
    benchmark(_step(forward, (x, residual, weight, bias), (g1, g2)))


@pytest.fixture(scope="module")
def gelu_inputs():
    rows, width = (16384, 3072) if CUDA else (2048, 1024)
    torch.manual_seed(0)
    return _rand(rows, width, requires_grad=True), _rand(width, requires_grad=True), _rand(rows, width)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gelu(benchmark, gelu_inputs, backend):
    x, bias, grad = gelu_inputs
    _usable(fastformer.bias_gelu, backend, x, bias)
    benchmark.group = "bias_gelu fwd+bwd"
    benchmark(_step(lambda: fastformer.bias_gelu(x, bias, backend=backend), (x, bias), (grad,)))


def test_bias_gelu_eager(benchmark, gelu_inputs):
    x, bias, grad = gelu_inputs
    benchmark.group = "bias_gelu fwd+bwd"
    benchmark(_step(lambda: F.gelu(x + bias), (x, bias), (grad,)))


# --------------------------------------------------------------------------------------------
# What fastformer itself costs per call, apart from any kernel
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=["null kernels", "triton launchers"])
def overhead_kernels(request, monkeypatch):
    """The kernel backend "triton", made available on this machine's device, with kernels that
    compute nothing, so that what is left of a call is host work: fastformer's Python (checks,
    dispatch, dropout seeds) and PyTorch's autograd around it, on the path every kernel backend
    takes (autograd.Function, linear biases handed to bias_gelu).

    - "null kernels": ``null_backend``'s functions in place of the launchers; they only allocate
      the outputs.
    - "triton launchers": the Triton backend's own launchers (their grid, config and alignment
      arithmetic, allocations and argument lists), each launch (``kernel[grid](...)``) a no-op,
      with a fixed launch config (on a GPU, the autotuner's choice once made; Triton's own launch
      cost is not included).
    """
    everything = dispatch._OP_TABLES["torch"]["attention"][0]
    support = dataclasses.replace(everything, forced_only_devices=frozenset())
    if request.param == "null kernels":
        table = {op: (support, null_backend.__name__) for op in dispatch.OPS}
    else:
        pytest.importorskip("triton")
        from triton.runtime import interpreter, jit

        import fastformer.triton.attention as triton_attention
        table = {op: (support, module) for op, (_, module) in fastformer.triton.op_table().items()}
        for cls in (jit.KernelInterface, interpreter.InterpretedFunction):  # (Triton < 3.3: its own)
            if "__getitem__" in vars(cls):
                monkeypatch.setattr(cls, "__getitem__", lambda kernel, grid: lambda *args, **kwargs: None)
        monkeypatch.setattr(triton_attention, "_forced_config", 0)
    monkeypatch.setitem(dispatch._OP_TABLES, "triton", table)
    monkeypatch.setitem(dispatch._UNAVAILABLE, "triton", ())
    return "triton"


@pytest.fixture(scope="module")
def tiny_inputs():
    torch.manual_seed(0)
    q, k, v = (_rand(2, 2, 8, 16, requires_grad=True) for _ in range(3))
    x, residual = _rand(2, 8, 32, requires_grad=True), _rand(2, 8, 32, requires_grad=True)
    weight, bias = _rand(32, requires_grad=True), _rand(32, requires_grad=True)
    return (q, k, v, _rand(2, 2, 8, 16)), (x, residual, weight, bias, _rand(2, 8, 32), _rand(2, 8, 32))


class _NullAttentionFunction(torch.autograd.Function):
    """The floor: the least an autograd.Function around the null attention kernels costs."""

    @staticmethod
    def forward(ctx, query, key, value):
        ctx.save_for_backward(query, key, value)
        return null_backend.attention_fwd(query, key, value, None, None, 0.0, False, 1.0, None)[0]

    @staticmethod
    def backward(ctx, grad_out):
        return tuple(torch.empty_like(t) for t in ctx.saved_tensors)


def test_overhead_floor_autograd_function(benchmark, tiny_inputs):
    q, k, v, grad = tiny_inputs[0]
    benchmark.group = "overhead per call, fwd+bwd"
    benchmark(_step(lambda: _NullAttentionFunction.apply(q, k, v), (q, k, v), (grad,)))


def test_overhead_attention(benchmark, tiny_inputs, overhead_kernels):
    q, k, v, grad = tiny_inputs[0]
    benchmark.group = "overhead per call, fwd+bwd"
    benchmark(_step(lambda: fastformer.attention(q, k, v, backend=overhead_kernels), (q, k, v), (grad,)))


def test_overhead_residual_layer_norm(benchmark, tiny_inputs, overhead_kernels):
    x, residual, weight, bias, g1, g2 = tiny_inputs[1]
    benchmark.group = "overhead per call, fwd+bwd"
    benchmark(_step(lambda: fastformer.residual_layer_norm(x, residual, weight, bias, backend=overhead_kernels),
                    (x, residual, weight, bias), (g1, g2)))


def test_overhead_bias_gelu(benchmark, tiny_inputs, overhead_kernels):
    x, _, _, bias, grad, _ = tiny_inputs[1]
    benchmark.group = "overhead per call, fwd+bwd"
    benchmark(_step(lambda: fastformer.bias_gelu(x, bias, backend=overhead_kernels), (x, bias), (grad,)))


@pytest.fixture(scope="module")
def layer_inputs():
    torch.manual_seed(0)
    x = _rand(2, 8, 32, requires_grad=True)
    padding = torch.zeros(2, 8, dtype=torch.bool, device=DEVICE)
    padding[1, 5:] = True
    return x, padding, _rand(2, 8, 32)


def _layer(cls):
    torch.manual_seed(0)
    return cls(32, 4, 64, dropout=0.1, activation="gelu", batch_first=True, device=DEVICE, dtype=DTYPE)


def test_overhead_encoder_layer_step(benchmark, layer_inputs, overhead_kernels):
    """A FastTransformerEncoderLayer training step (dropout on, key padding) with kernels that
    compute nothing (either kind, see ``overhead_kernels``): its GEMMs and PyTorch ops at a tiny
    size, the host work around its 10 kernels."""
    x, padding, grad = layer_inputs
    layer = _layer(fastformer.FastTransformerEncoderLayer)
    benchmark.group = "overhead per layer step, fwd+bwd, tiny shape"

    def forward():
        with fastformer.use_backend(overhead_kernels):
            return layer(x, src_key_padding_mask=padding)
    benchmark(_step(forward, (x, *layer.parameters()), (grad,)))


def test_overhead_encoder_layer_step_torch(benchmark, layer_inputs):
    """The same step of nn.TransformerEncoderLayer, its kernels computing (tiny)."""
    x, padding, grad = layer_inputs
    layer = _layer(torch.nn.TransformerEncoderLayer)
    benchmark.group = "overhead per layer step, fwd+bwd, tiny shape"
    benchmark(_step(lambda: layer(x, src_key_padding_mask=padding), (x, *layer.parameters()), (grad,)))
