"""The ops as torch.library custom ops: opcheck, and torch.compile(fullgraph=True) through a model."""

from __future__ import annotations

import collections
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastformer
from fastformer import dispatch, library
from helpers import (BACKENDS, DEVICES, assert_rel_close, attention_dtype, kernel_device, require_available,
                     require_backend)

SEED = torch.tensor(1234)


def _leaves(device, dtype=torch.float32):
    """``leaf(*shape)``: a random tensor on ``device`` that requires grad."""
    return lambda *shape, dtype=dtype: torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)


def _seed(backend, device):
    """The dropout seed as fastformer draws it: on the data's device for the kernels, which load it
    there, on the host for the torch backend, which seeds a torch.Generator with it."""
    return SEED if backend == "torch" else SEED.to(device)


def _attention_samples(backend, device):
    t = _leaves(device, attention_dtype(backend))

    def qkv(batch, heads_q, heads_k, len_q, len_k, dim, dim_v):
        return t(batch, heads_q, len_q, dim), t(batch, heads_k, len_k, dim), t(batch, heads_k, len_k, dim_v)

    padding = torch.zeros(2, 6, dtype=torch.bool, device=device)
    padding[0, 3:] = True
    padding[1, :] = True  # a fully padded batch row
    # A learned bias, broadcast over the batch: its gradient is summed over it.
    bias, seed = t(1, 4, 5, 6), _seed(backend, device)
    return [
        (*qkv(2, 4, 2, 5, 6, 8, 8), bias, padding, 0.0, True, 0.3, None, backend),
        (*qkv(2, 4, 4, 5, 6, 8, 4), torch.rand(2, 1, 5, 6, device=device) > 0.5, None, 0.2, False, 0.5, seed,
         backend),
        (*qkv(1, 2, 1, 3, 1, 16, 16), None, None, 0.0, False, 0.25, None, backend),
    ]


def _residual_norm_samples(backend, device):
    t = _leaves(device)

    # Rows of 10 values and of 40: kernels take rows of a multiple of 4 or 8 values in vectors.
    x, residual, weight, bias, seed = t(6, 10), t(6, 10), t(10), t(10), _seed(backend, device)
    wide_residual, wide_weight, wide_bias = t(6, 40), t(40), t(40)
    return [
        (x, residual, weight, bias, 1e-5, 0.1, False, seed, True, backend),
        (x, None, None, None, 1e-5, 0.0, False, None, False, backend),
        (t(6, 40), wide_residual, wide_weight, None, 1e-6, 0.0, True, None, True, backend),
        (t(6, 40, dtype=torch.bfloat16), None, wide_weight, None, 1e-6, 0.3, True, seed, True, backend),
        # autocast: a bfloat16 sublayer output meets the float32 residual stream
        (t(6, 40, dtype=torch.bfloat16), wide_residual, wide_weight, wide_bias, 1e-5, 0.1, False, seed, True,
         backend),
    ]


def _bias_gelu_samples(backend, device):
    t = _leaves(device)

    x = t(3, 5, 7)
    return [(x, t(7), "tanh", 0.0, None, backend),
            (x, None, "none", 0.0, None, backend),
            (x, t(7), "none", 0.3, _seed(backend, device), backend)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op, samples, public_op", [
    (library.attention_fwd, _attention_samples, "attention"),
    (library.residual_norm_fwd, _residual_norm_samples, "residual_layer_norm"),
    (library.bias_gelu_fwd, _bias_gelu_samples, "bias_gelu"),
], ids=["attention", "residual_norm", "bias_gelu"])
def test_opcheck(op, samples, public_op, backend, device):
    """Schema, fake implementation, autograd registration and AOT tracing, per backend and device."""
    cases = samples(backend, device)
    reasons = dispatch.not_supported_reasons(backend, dispatch.Call(public_op, torch.device(device),
                                                                    cases[0][0].dtype))
    if reasons:
        pytest.skip(f"{backend} cannot run {public_op} on {device} here: " + "; ".join(reasons))
    for args in cases:
        torch.library.opcheck(op, args)


def test_ops_are_registered_under_torch_ops():
    for name in ("attention_fwd", "attention_bwd", "residual_norm_fwd", "residual_norm_bwd",
                 "bias_gelu_fwd", "bias_gelu_bwd"):
        assert hasattr(torch.ops.fastformer, name)


def test_eager_torch_backend_ops_are_named_under_a_profiler():
    """In eager mode the torch backend runs plain PyTorch ops (no custom op); under a profiler they
    are grouped under fastformer::<op> ranges, so time shares can be attributed to the ops."""
    x, padding = _inputs()
    layer = TinyEncoderLayer(dropout_p=0.1)
    with torch.profiler.profile() as profiler:
        layer(x, padding).sum().backward()
    names = {event.name for event in profiler.events()}
    assert {"fastformer::attention", "fastformer::residual_layer_norm", "fastformer::residual_rms_norm",
            "fastformer::bias_gelu"} <= names


class TinyEncoderLayer(torch.nn.Module):
    """Calls every public op the way an encoder layer does (packed QKV, pre- and post-norm)."""

    def __init__(self, dim=48, heads=4, dropout_p=0.0):
        super().__init__()
        self.heads, self.dropout_p = heads, dropout_p
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.norm1 = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, 4 * dim, bias=False)
        self.fc1_bias = torch.nn.Parameter(torch.randn(4 * dim) * 0.1)
        self.fc2 = torch.nn.Linear(4 * dim, dim)
        self.norm2_weight = torch.nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x, padding):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        attended = fastformer.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                        key_padding_mask=padding, dropout_p=self.dropout_p)
        attended = self.out(attended.transpose(1, 2).reshape(batch, length, dim))
        h, residual = fastformer.residual_layer_norm(attended, x, self.norm1.weight, self.norm1.bias,
                                                     dropout_p=self.dropout_p)
        h = self.fc2(fastformer.bias_gelu(self.fc1(h), self.fc1_bias, "tanh"))
        out, _ = fastformer.residual_rms_norm(h, residual, self.norm2_weight, dropout_p=self.dropout_p)
        return out


def _inputs():
    x = torch.randn(3, 11, 48)
    padding = torch.zeros(3, 11, dtype=torch.bool)
    padding[0, 6:] = True
    padding[2, 1:] = True
    return x, padding


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = TinyEncoderLayer()
    x, padding = _inputs()
    eager = model(x, padding)
    eager_grads = torch.autograd.grad(eager.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x, padding)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager)
    for grad, expected in zip(grads, eager_grads):
        torch.testing.assert_close(grad, expected)


def test_compile_fullgraph_with_dynamic_shapes():
    """dynamic=True: sizes and Python floats (eps and scale left at their defaults included) are
    symbolic, and the argument checks must trace on them; a second length reuses the graph."""
    torch._dynamo.reset()
    model = TinyEncoderLayer()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for length in (11, 7):
        x, padding = _inputs()
        x, padding = x[:, :length], padding[:, :length]
        torch.testing.assert_close(compiled(x, padding), model(x, padding))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=str)
def test_compile_fullgraph_with_dynamic_shapes_and_a_mask(mask_dtype):
    """An attn_mask under symbolic sizes (dynamic=True, or any second shape): its checks trace too
    (an error message formatted from the sizes on every call did not)."""
    torch._dynamo.reset()

    def attend(q, k, v, mask):
        return fastformer.attention(q, k, v, attn_mask=mask)

    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    for length in (5, 7):
        q, k, v = (torch.randn(2, 2, length, 8) for _ in range(3))
        mask = torch.rand(length, length) > 0.3 if mask_dtype == torch.bool else torch.randn(length, length)
        torch.testing.assert_close(compiled(q, k, v, mask), attend(q, k, v, mask))


def _padded_batch(batch, length, width):
    x = torch.randn(batch, length, width)
    padding = torch.arange(length) >= torch.randint(1, length + 1, (batch, 1))
    return x, padding


def test_torch_export_of_an_optimized_encoder_with_dynamic_shapes(tmp_path):
    """torch.export (the path to AOTInductor, ExecuTorch and ONNX): the ops are nodes of the graph,
    with the backend chosen at export; the program runs at other batch sizes and lengths, and again
    after torch.export.save / load."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    encoder = fastformer.optimize(torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval())
    batch, length = torch.export.Dim("batch", min=2, max=64), torch.export.Dim("length", min=2, max=512)
    x, padding = _padded_batch(3, 9, 32)
    program = torch.export.export(encoder, (x,), {"src_key_padding_mask": padding},
                                  dynamic_shapes={"src": {0: batch, 1: length},
                                                  "src_key_padding_mask": {0: batch, 1: length}})
    ops = [node for node in program.graph.nodes if str(node.target).startswith("fastformer.")]
    assert sorted(str(node.target) for node in ops) == ["fastformer.attention_fwd.default"] * 2 + [
        "fastformer.residual_norm_fwd.default"] * 4
    assert {node.args[-1] for node in ops} == {fastformer.explain("attention", *(x.unsqueeze(1),) * 3).backend}
    torch.export.save(program, tmp_path / "encoder.pt2")
    loaded = torch.export.load(tmp_path / "encoder.pt2")
    for shape in [(2, 5), (5, 17)]:
        x, padding = _padded_batch(*shape, 32)
        with torch.no_grad():
            expected = encoder(x, src_key_padding_mask=padding)
            for exported in (program, loaded):
                torch.testing.assert_close(exported.module()(x, src_key_padding_mask=padding), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_compile_fullgraph_where_a_backend_refuses_the_dtype(dtype):
    """A dtype that some backend does not take (float64: the torch backend's alone) traces too:
    choosing the backend reads the reasons' names joined beforehand (iterating a capability's
    frozenset while tracing made torch 2.6's dynamo fail building its guards)."""
    q, x = torch.randn(2, 2, 5, 8, dtype=dtype), torch.randn(4, 16, dtype=dtype)

    def step(q, x):
        return (fastformer.attention(q, q, q), fastformer.residual_layer_norm(x, x, None, None)[0],
                fastformer.bias_gelu(x))

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="eager", fullgraph=True)
    for got, want in zip(compiled(q, x), step(q, x)):
        torch.testing.assert_close(got, want)


# The kernel backends' functions each op calls, forward and backward (fastformer.<backend>.<module>).
KERNEL_FUNCTIONS = {"attention": ("attention_fwd", "attention_bwd"),
                    "layer_norm": ("residual_norm_fwd", "residual_norm_bwd"),
                    "bias_gelu": ("bias_gelu_fwd", "bias_gelu_bwd")}


def _count_kernel_calls(backend, monkeypatch) -> collections.Counter:
    """Counts, by function name, the calls of ``backend``'s launchers from now on."""
    calls = collections.Counter()
    for module_name, names in KERNEL_FUNCTIONS.items():
        module = importlib.import_module(f"fastformer.{backend}.{module_name}")
        for name in names:
            def counted(*args, _real=getattr(module, name), _name=name, **kwargs):
                calls[_name] += 1
                return _real(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)
    return calls


# Compiled against eager, both in bfloat16: Inductor rounds where it fuses, so results may differ by
# about a bfloat16 ulp in places (on the CPU, torch backend: the same output, gradients up to 3.3e-3).
COMPILED_VS_EAGER_BF16_TOL = 2e-2


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_compile_fullgraph_runs_the_forced_backends_kernels(backend, monkeypatch):
    """On the GPU; Triton also in its interpreter, and tests/test_cuda_emulated.py runs the CUDA
    kernels' case on the CPU."""
    check_compile_fullgraph_runs_the_forced_backends_kernels(backend, kernel_device(backend), monkeypatch)


def check_compile_fullgraph_runs_the_forced_backends_kernels(backend, device, monkeypatch):
    """Inductor, in bfloat16, with a kernel backend forced while tracing: the compiled model's ops
    are opaque nodes that call that backend's kernels, forward and backward, and give eager's
    outputs and gradients up to bfloat16 rounding (Inductor fuses the linear layers' bias adds and
    casts its own way)."""
    calls = _count_kernel_calls(backend, monkeypatch)
    torch._dynamo.reset()
    model = TinyEncoderLayer().to(device, torch.bfloat16)
    x, padding = _inputs()
    x, padding = x.to(device, torch.bfloat16), padding.to(device)
    with fastformer.use_backend(backend):
        eager = model(x, padding)
        eager_grads = torch.autograd.grad(eager.float().square().sum(), list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True)
        calls.clear()
        out = compiled(x, padding)
        grads = torch.autograd.grad(out.float().square().sum(), list(model.parameters()))
    assert calls == {"attention_fwd": 1, "attention_bwd": 1, "residual_norm_fwd": 2, "residual_norm_bwd": 2,
                     "bias_gelu_fwd": 1, "bias_gelu_bwd": 1}, calls
    assert_rel_close(out, eager, COMPILED_VS_EAGER_BF16_TOL, "out")
    for (name, _), grad, expected in zip(model.named_parameters(), grads, eager_grads):
        assert_rel_close(grad, expected, COMPILED_VS_EAGER_BF16_TOL, f"grad {name}")


@pytest.mark.parametrize("device, backend", [("cpu", None), pytest.param("cuda", "triton", marks=pytest.mark.gpu),
                                             pytest.param("cuda", "cuda", marks=pytest.mark.gpu)])
def test_compile_fullgraph_with_dropout_draws_a_fresh_mask_each_step(device, backend):
    require_available(backend)  # (None, dispatch's choice, always runs)
    torch._dynamo.reset()
    model = TinyEncoderLayer(dropout_p=0.2).to(device, attention_dtype(backend))
    x, padding = _inputs()
    x, padding = x.to(device, attention_dtype(backend)), padding.to(device)
    with fastformer.use_backend(backend):
        compiled = torch.compile(model, fullgraph=True)
        first, second = compiled(x, padding), compiled(x, padding)
    assert torch.isfinite(first).all()
    assert not torch.equal(first, second)  # the seed is a graph input, not a baked-in constant
    first.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "float", "causal+padding", "dead rows", "dropout"])
def test_torch_backend_explicit_backward(mask_kind, dtype):
    """In eager mode the torch backend runs under PyTorch's autograd; inside the custom op
    (torch.compile) its explicit backward runs instead: check that one against float64."""
    import reference
    from fastformer.functional import _draw_seed
    from fastformer.torch_backend.dropout import dropout_keep_mask
    from helpers import ATTENTION_TOL, assert_rel_close

    batch, heads_q, heads_k, len_q, len_k, dim = 2, 4, 2, 9, 13, 16
    q = torch.randn(batch, heads_q, len_q, dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, heads_k, len_k, dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, heads_k, len_k, dim, dtype=dtype, requires_grad=True)
    mask = padding = seed = keep = None
    causal, p = False, 0.0
    if mask_kind == "float":
        mask = torch.randn(1, heads_q, len_q, len_k, dtype=dtype, requires_grad=True)
    if mask_kind in ("causal+padding", "dead rows"):
        causal = True
        padding = torch.zeros(batch, len_k, dtype=torch.bool)
        padding[0, 7:] = True
        if mask_kind == "dead rows":
            padding[1, :3] = True  # queries 0..2 of batch row 1 see no key
    if mask_kind == "dropout":
        p = 0.3
        seed = _draw_seed(p, "torch", "cpu")
        keep = dropout_keep_mask(seed, (batch, heads_q, len_q, len_k), p, "cpu")
    out, _ = library.AttentionFunction.apply(q, k, v, mask, padding, p, causal, dim**-0.5, seed, "torch")
    expected = reference.attention(q, k, v, attn_mask=mask, key_padding_mask=padding, is_causal=causal,
                                   keep=keep, dropout_p=p)
    inputs = [t for t in (q, k, v, mask) if t is not None]
    grad_out = torch.randn_like(expected)
    got = torch.autograd.grad(out, inputs, grad_out.to(dtype))
    want = torch.autograd.grad(expected, inputs, grad_out)
    fwd_tol, grad_tol = ATTENTION_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    for name, grad, expected_grad in zip("qkvm", got, want):
        assert_rel_close(grad, expected_grad, grad_tol, f"grad {name}")


# --------------------------------------------------------------------------------------------
# double backward (create_graph=True, e.g. a gradient penalty)
# --------------------------------------------------------------------------------------------
def _double_backward_case(op, dtype):
    """(public function of the inputs, inputs) on small random inputs."""
    def rand(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    if op == "attention":
        pad = torch.tensor([[False] * 5 + [True] * 2, [False] * 7])
        return (lambda q, k, v, backend: fastformer.attention(q, k, v, key_padding_mask=pad, is_causal=True,
                                                              backend=backend),
                (rand(2, 2, 5, 4), rand(2, 1, 7, 4), rand(2, 1, 7, 3)))
    if op == "residual_layer_norm":
        return (lambda x, residual, weight, bias, backend: torch.cat(fastformer.residual_layer_norm(
            x, residual, weight, bias, backend=backend), dim=-1), (rand(3, 6), rand(3, 6), rand(6), rand(6)))
    return (lambda x, bias, backend: fastformer.bias_gelu(x, bias, approximate="tanh", backend=backend),
            (rand(3, 5), rand(5)))


# How each path handles second derivatives: "exact" (checked by gradgradcheck) or "refused"
# (fastformer raises). The attention case has Dv != D, which sends SDPA to its math kernel: SDPA's
# fused kernels cannot be differentiated twice (next test).
DOUBLE_BACKWARD = {
    ("torch", True): dict.fromkeys(["attention", "residual_layer_norm", "bias_gelu"], "exact"),
    # the autograd.Function path: the torch backend's explicit backward
    ("torch", False): {"attention": "exact", "residual_layer_norm": "refused", "bias_gelu": "exact"},
    ("triton", True): dict.fromkeys(["attention", "residual_layer_norm", "bias_gelu"], "refused"),
    ("cuda", True): dict.fromkeys(["attention", "residual_layer_norm", "bias_gelu"], "refused"),
}


def test_double_backward_of_attention_in_sdpa_math_mode():
    """Dv == D: PyTorch's fused SDPA kernel would run, whose backward cannot be differentiated
    again (PyTorch's own error); inside sdpa_kernel(MATH), as the README says, it is exact."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pad = torch.tensor([[False] * 4 + [True], [False] * 5])
    with sdpa_kernel([SDPBackend.MATH]):
        assert torch.autograd.gradgradcheck(
            lambda q, k, v: fastformer.attention(q, k, v, key_padding_mask=pad, is_causal=True, backend="torch"),
            (q, k, v))


@pytest.mark.parametrize("op", ["attention", "residual_layer_norm", "bias_gelu"])
@pytest.mark.parametrize("backend, native", DOUBLE_BACKWARD, ids=lambda v: str(v))
def test_double_backward_is_exact_or_refused(backend, native, op, monkeypatch):
    """Second derivatives (create_graph=True, e.g. a gradient penalty) are exact, or raise: never
    silently missing the second-order terms, as a kernel's opaque backward would."""
    monkeypatch.setattr(library, "NATIVE_AUTOGRAD", native)
    exact = DOUBLE_BACKWARD[backend, native][op] == "exact"
    fn, inputs = _double_backward_case(op, torch.float64 if exact else torch.float32)
    require_backend(backend, op, *inputs)
    if exact:
        assert torch.autograd.gradgradcheck(lambda *args: fn(*args, backend=backend), inputs)
        return

    def penalised_loss(constant_grad_outputs):
        out = fn(*inputs, backend=backend)
        # First order: fine. The gradients flowing in depend on the inputs through out (a square),
        # or not at all (constant): the gradients out still do, through the saved inputs.
        if constant_grad_outputs:
            grads = torch.autograd.grad(out, inputs, torch.randn_like(out), create_graph=True)
        else:
            grads = torch.autograd.grad(out.square().sum(), inputs, create_graph=True)
        return out.sum() + sum(g.square().sum() for g in grads)

    for constant_grad_outputs in (False, True):
        with pytest.raises(RuntimeError, match="cannot be differentiated again"):
            torch.autograd.grad(penalised_loss(constant_grad_outputs), inputs)
        with pytest.raises(RuntimeError, match="cannot be differentiated again"):
            penalised_loss(constant_grad_outputs).backward()


_COMPILE_AND_COUNT = """
import json, torch, fastformer
from torch._dynamo.utils import counters
x, r = (torch.randn(8, 32, requires_grad=True) for _ in range(2))
step = torch.compile(lambda x, r: fastformer.residual_layer_norm(x, r, None, None)[0].square().sum(), fullgraph=True)
step(x, r).backward()
hits = counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]
print(json.dumps({"hits": hits, "tag": torch.compiler.config.cache_key_tag}))
"""


def test_compile_caches_are_keyed_on_the_op_definitions(tmp_path):
    """PyTorch's on-disk compile caches do not key on a custom op's autograd formula or schema
    (pytorch/pytorch#144344): a graph cached with one fastformer must not be reused by another
    whose fastformer/library.py differs (it would run the old backward). Three processes share a
    cache folder: the same package twice (the second hits the cache: the check can see hits), then
    a copy whose library.py differs by a comment (no hit). A user's own cache tag is kept."""
    package = Path(fastformer.__file__).parent
    copies = {}
    for name, edit in (("same", ""), ("changed", "\n# a changed op definition\n")):
        copies[name] = tmp_path / name
        shutil.copytree(package, copies[name] / "fastformer", ignore=shutil.ignore_patterns("_C*", "__pycache__"))
        library_file = copies[name] / "fastformer" / "library.py"
        library_file.write_text(library_file.read_text() + edit)

    def compile_with(name):
        env = dict(os.environ, PYTHONPATH=str(copies[name]), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"),
                   TORCH_COMPILE_CACHE_KEY_TAG="users-tag")
        env.pop("TRITON_INTERPRET", None)
        result = subprocess.run([sys.executable, "-c", _COMPILE_AND_COUNT], capture_output=True, text=True,
                                env=env, cwd=tmp_path, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    first = compile_with("same")
    assert first["tag"] == "users-tag+" + library.COMPILE_CACHE_TAG
    assert compile_with("same")["hits"] > 0
    changed = compile_with("changed")
    assert changed["hits"] == 0 and changed["tag"] != first["tag"]
