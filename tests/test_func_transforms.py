"""torch.func transforms through the ops on every backend: vmap, grad, per-sample gradients
(vmap(grad(f)), as differentially private training computes them), jacrev, model ensembling
(weights that differ per sample), dropout under vmap's randomness modes, and forward-mode AD
(jvp, which only the torch backend takes), against float64 references sample by sample."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from torch.func import functional_call, grad, jacrev, jvp, vmap

import fastformer
import reference
from fastformer import dispatch
from helpers import (ATTENTION_TOL, BACKENDS, DEVICES, ELEMENTWISE_TOL, PARAM_GRAD_TOL_HALF, assert_rel_close,
                     kernel_device, require_backend)

SAMPLES = 3  # the vmapped dim
# The torch backend's SDPA on the CPU has no batching rule: PyTorch runs it sample by sample, and
# says so.
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


def _rand(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, device=device, dtype=dtype)


# Each case: (fastformer function, float64 reference function, inputs, their in_dims, tolerances).
# Both functions take the same positional tensors (one sample's) and return a tuple of outputs.
def _attention_case(device, dtype, backend):
    batch, heads_q, heads_k, len_q, len_k, dim = 2, 4, 2, 5, 7, 12
    q = _rand(SAMPLES, batch, heads_q, len_q, dim, device=device, dtype=dtype)
    # Keys and values vmapped along dim 1, shared by every sample: broadcast by vmap.
    k = _rand(batch, SAMPLES, heads_k, len_k, dim, device=device, dtype=dtype)
    v = _rand(batch, heads_k, len_k, dim, device=device, dtype=dtype)
    # A learned bias shared by the samples and broadcast over batch and heads: its per-sample
    # gradient sums over them.
    bias = _rand(1, 1, len_q, len_k, device=device, dtype=dtype)
    lengths = torch.tensor([[7, 3], [1, 6], [5, 7]], device=device)
    padding = torch.arange(len_k, device=device) >= lengths[..., None]  # (SAMPLES, batch, len_k)

    def fast(q, k, v, bias, padding):
        return (fastformer.attention(q, k, v, bias, is_causal=True, key_padding_mask=padding, backend=backend),)

    def ref(q, k, v, bias, padding):
        return (reference.attention(q, k, v, bias, key_padding_mask=padding, is_causal=True),)

    return fast, ref, (q, k, v, bias, padding), (0, 1, None, None, 0), ATTENTION_TOL[dtype]


def _residual_layer_norm_case(device, dtype, backend):
    x = _rand(SAMPLES, 3, 4, 24, device=device, dtype=dtype)
    residual = _rand(SAMPLES, 3, 4, 24, device=device, dtype=dtype)
    weight, bias = _rand(24, device=device, dtype=dtype), _rand(24, device=device, dtype=dtype)

    def fast(x, residual, weight, bias):
        return fastformer.residual_layer_norm(x, residual, weight, bias, backend=backend)

    def ref(x, residual, weight, bias):
        return reference.residual_norm(x, residual, weight, bias, 1e-5)

    return fast, ref, (x, residual, weight, bias), (0, 0, None, None), ELEMENTWISE_TOL[dtype]


def _residual_rms_norm_case(device, dtype, backend):
    x, weight = _rand(SAMPLES, 5, 40, device=device, dtype=dtype), _rand(40, device=device, dtype=dtype)

    def fast(x, weight):
        return fastformer.residual_rms_norm(x, None, weight, backend=backend)[:1]

    def ref(x, weight):
        return reference.residual_norm(x, None, weight, None, 1e-6, rms=True)[:1]

    return fast, ref, (x, weight), (0, None), ELEMENTWISE_TOL[dtype]


def _bias_gelu_case(device, dtype, backend):
    x, bias = _rand(SAMPLES, 2, 3, 36, device=device, dtype=dtype), _rand(36, device=device, dtype=dtype)

    def fast(x, bias):
        return (fastformer.bias_gelu(x, bias, approximate="tanh", backend=backend),)

    def ref(x, bias):
        return (reference.gelu(x, bias, approximate="tanh"),)

    return fast, ref, (x, bias), (0, None), ELEMENTWISE_TOL[dtype]


CASES = {"attention": _attention_case, "residual_layer_norm": _residual_layer_norm_case,
         "residual_rms_norm": _residual_rms_norm_case, "bias_gelu": _bias_gelu_case}
# The inputs whose gradients sum over rows (or batch and heads): weights and biases, the learned
# attention bias; in half precision they have DESIGN.md's looser tolerance.
SUMMED_OVER_ROWS = {"attention": {3}, "residual_layer_norm": {2, 3}, "residual_rms_norm": {1}, "bias_gelu": {1}}
PUBLIC_OPS = {"attention": fastformer.attention, "residual_layer_norm": fastformer.residual_layer_norm,
              "residual_rms_norm": fastformer.residual_rms_norm, "bias_gelu": fastformer.bias_gelu}


def _case(op, device, dtype, backend):
    if device == "cpu" and backend == "cuda":
        pytest.skip("the cuda backend runs on CUDA devices")
    fast, ref, inputs, in_dims, tol = CASES[op](device, dtype, backend)
    first_sample = [t if d is None else t.select(d, 0) for t, d in zip(inputs, in_dims)]
    if op == "attention":
        require_backend(backend, PUBLIC_OPS[op], *first_sample[:4], key_padding_mask=first_sample[4],
                        is_causal=True)
    elif op == "residual_rms_norm":
        require_backend(backend, PUBLIC_OPS[op], first_sample[0], None, first_sample[1])
    else:
        require_backend(backend, PUBLIC_OPS[op], *first_sample)
    return fast, ref, inputs, in_dims, tol


def _sample(inputs, in_dims, n):
    return [t if d is None else t.select(d, n) for t, d in zip(inputs, in_dims)]


def _differentiable(inputs):
    return tuple(i for i, t in enumerate(inputs) if t.is_floating_point())


def _probes(outputs):
    """A fixed random cotangent per output (the same for every sample)."""
    return [torch.randn(o.shape[1:], device=o.device, dtype=o.dtype) for o in outputs]


def _loss(function, probes):
    def loss(*inputs):
        return sum((out * probe).sum() for out, probe in zip(function(*inputs), probes))
    return loss


def _reference_grads(ref, probes, sample, argnums):
    leaves = [t.double().requires_grad_() if i in argnums else t for i, t in enumerate(sample)]
    loss = sum((out * probe.double()).sum() for out, probe in zip(ref(*leaves), probes))
    return torch.autograd.grad(loss, [leaves[i] for i in argnums])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", CASES)
def test_vmap_matches_each_sample(op, device, backend, dtype):
    fast, ref, inputs, in_dims, (tol, _) = _case(op, device, dtype, backend)
    outputs = vmap(fast, in_dims=in_dims)(*inputs)
    for n in range(SAMPLES):
        for i, (out, expected) in enumerate(zip(outputs, ref(*_sample(inputs, in_dims, n)))):
            assert out.dtype == dtype
            assert_rel_close(out[n], expected, tol, f"sample {n} output {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", CASES)
def test_vmap_of_empty_rows_keeps_each_samples_shape(op, device, backend):
    """No rows (an empty batch): every output keeps the shape one sample's call gives it."""
    if device == "cpu" and backend == "cuda":
        pytest.skip("the cuda backend runs on CUDA devices")
    weight = _rand(16, device=device, dtype=torch.float16)
    x = _rand(SAMPLES, 2, 3, 0, 16, device=device, dtype=torch.float16)  # attention: (B, H, L, D), L = 0
    calls = {"attention": lambda x: (fastformer.attention(x, x, x, backend=backend),),
             "residual_layer_norm": lambda x: fastformer.residual_layer_norm(x, x, weight, weight, backend=backend),
             "residual_rms_norm": lambda x: fastformer.residual_rms_norm(x, None, weight, backend=backend),
             "bias_gelu": lambda x: (fastformer.bias_gelu(x, weight, backend=backend),)}
    one = x[0]
    explain_args = {"attention": (one, one, one), "residual_layer_norm": (one, one, weight, weight),
                    "residual_rms_norm": (one, None, weight), "bias_gelu": (one, weight)}[op]
    require_backend(backend, PUBLIC_OPS[op], *explain_args)
    batched, single = vmap(calls[op])(x), calls[op](x[0])
    assert [tuple(t.shape) for t in batched] == [(SAMPLES, *t.shape) for t in single]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", CASES)
def test_per_sample_gradients(op, device, backend, dtype):
    """vmap(grad(loss)): every input's gradient per sample, the shared ones (weights, biases, a
    learned attention bias) included: the kernels' sums over rows or batch must not mix samples."""
    fast, ref, inputs, in_dims, (_, tol) = _case(op, device, dtype, backend)
    argnums = _differentiable(inputs)
    probes = _probes(vmap(fast, in_dims=in_dims)(*inputs))
    grads = vmap(grad(_loss(fast, probes), argnums=argnums), in_dims=in_dims)(*inputs)
    for n in range(SAMPLES):
        expected = _reference_grads(ref, probes, _sample(inputs, in_dims, n), argnums)
        for i, got, want in zip(argnums, grads, expected):
            assert got.shape == (SAMPLES, *want.shape)
            summed = dtype == torch.float16 and i in SUMMED_OVER_ROWS[op]
            assert_rel_close(got[n], want, PARAM_GRAD_TOL_HALF if summed else tol, f"sample {n} grad of input {i}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", CASES)
def test_grad_and_jacrev(op, device, backend):
    """grad alone, and jacrev (vmap over the backward's incoming gradients only)."""
    fast, ref, inputs, in_dims, (_, tol) = _case(op, device, torch.float32, backend)
    sample = _sample(inputs, in_dims, 0)
    argnums = _differentiable(sample)
    probes = [torch.randn_like(o) for o in fast(*sample)]
    got = grad(_loss(fast, probes), argnums=argnums)(*sample)
    for i, g, want in zip(argnums, got, _reference_grads(ref, probes, sample, argnums)):
        assert_rel_close(g, want, tol, f"grad of input {i}")

    def first_output(x):
        return fast(x, *sample[1:])[0].flatten()[:6]

    leaf = sample[0].double().requires_grad_()
    expected = torch.autograd.functional.jacobian(lambda x: ref(x, *sample[1:])[0].flatten()[:6], leaf)
    assert_rel_close(jacrev(first_output)(sample[0]), expected, tol, "jacobian")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_model_ensembling(device, backend):
    """torch.func's ensembling: the same module vmapped over stacked weights (each sample its own),
    and per-sample gradients of those weights."""
    if device == "cpu" and backend == "cuda":
        pytest.skip("the cuda backend runs on CUDA devices")
    x = _rand(2, 5, 16, device=device)
    heads = x.view(2, 5, 2, 8).transpose(1, 2)
    require_backend(backend, fastformer.attention, heads, heads, heads, key_padding_mask=x[..., 0] > 0)
    require_backend(backend, fastformer.residual_layer_norm, x, x, None, None)
    models = [fastformer.FastTransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True,
                                                     activation="gelu").to(device) for _ in range(SAMPLES)]
    references = [torch.nn.TransformerEncoderLayer(16, 2, dim_feedforward=24, dropout=0.0, batch_first=True,
                                                   activation="gelu").to(device).double() for _ in range(SAMPLES)]
    for model, ref in zip(models, references):
        ref.load_state_dict(model.state_dict())
    params, buffers = torch.func.stack_module_state(models)
    padding = torch.tensor([[False] * 5, [False] * 3 + [True] * 2], device=device)

    def run(params, buffers, x):
        return functional_call(models[0], (params, buffers), (x,), {"src_key_padding_mask": padding})

    # (A random cotangent: the gradient of out.square().sum() through a final LayerNorm of unit
    # weight nearly cancels, leaving rounding noise.)
    probe = torch.randn(2, 5, 16, device=device)
    with fastformer.use_backend(backend):
        outputs = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
        grads = vmap(grad(lambda p, b, x: (run(p, b, x) * probe).sum()), in_dims=(0, 0, None))(params, buffers, x)
    for n, ref in enumerate(references):
        expected = ref(x.double(), src_key_padding_mask=padding)
        assert_rel_close(outputs[n], expected, ATTENTION_TOL[torch.float32][0], f"model {n} output")
        (expected * probe).sum().backward()
        for name, param in ref.named_parameters():
            assert_rel_close(grads[name][n], param.grad, ATTENTION_TOL[torch.float32][1], f"model {n} {name}")


def _with_dropout(op, backend, device):
    """(function of one input, SAMPLES identical samples of it) for op with dropout 0.5; the norms'
    function returns the residual stream dropout(x) + x.flip(-1)."""
    if op == "attention":
        q = torch.randn(1, 2, 6, 8, device=device).expand(SAMPLES, -1, -1, -1, -1)
        return lambda q: fastformer.attention(q, q, q, dropout_p=0.5, backend=backend), q
    x = torch.randn(4, 32, device=device).expand(SAMPLES, -1, -1)
    if op == "bias_gelu":
        return lambda x: fastformer.bias_gelu(x, None, dropout_p=0.5, backend=backend), x
    if op == "residual_rms_norm":
        return lambda x: fastformer.residual_rms_norm(x, x.flip(-1), None, dropout_p=0.5, backend=backend)[1], x
    return lambda x: fastformer.residual_layer_norm(x, x.flip(-1), None, None, dropout_p=0.5, backend=backend)[1], x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", CASES)
def test_dropout_follows_vmaps_randomness(op, backend, device):
    """randomness="error" raises PyTorch's error; "different" drops different elements in each
    sample, "same" the same ones; either way the backward regenerates the forward's mask (a
    dropped element passes no gradient)."""
    function, x = _with_dropout(op, backend, device)
    one = x[0]
    args = {"attention": (one, one, one), "residual_layer_norm": (one, one, None, None),
            "residual_rms_norm": (one, one, None), "bias_gelu": (one,)}[op]
    require_backend(backend, PUBLIC_OPS[op], *args, dropout_p=0.5)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(function)(x)
    def out_and_grad(x):
        out, vjp_fn = torch.func.vjp(function, x)
        return out, vjp_fn(torch.ones_like(out))[0]

    for randomness in ("different", "same"):
        out, grads = vmap(out_and_grad, randomness=randomness)(x)
        differ = [not torch.equal(out[0], out[n]) for n in range(1, SAMPLES)]
        assert all(differ) if randomness == "different" else not any(differ), randomness
        if op == "attention":
            continue  # (an attention output mixes kept and dropped probabilities)
        if op == "bias_gelu":
            assert torch.equal(grads != 0, out != 0)
        else:  # d residual_out / dx = keep / (1 - p) + 1 (the flipped residual)
            assert set(grads.unique().tolist()) <= {1.0, 3.0}
            assert torch.equal(grads == 3.0, out != x.flip(-1))


def _of_differentiable(function, sample, argnums, dtype=None):
    """``function`` of the inputs at ``argnums`` only, the others fixed to ``sample``'s (all cast
    to ``dtype`` if given): the form jvp takes."""
    def f(*differentiable):
        args = list(sample if dtype is None else [t.to(dtype) if t.is_floating_point() else t for t in sample])
        for i, t in zip(argnums, differentiable):
            args[i] = t
        return function(*args)
    return f


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", CASES)
def test_forward_mode_ad_runs_on_the_torch_backend(op, device):
    """jvp (and jacfwd): dispatch picks the torch backend, whose ops carry tangents (attention
    through SDPA's math, the only SDPA kernel with forward-mode formulas); a kernel backend
    forced refuses with the reason."""
    fast, ref, inputs, in_dims, (tol, _) = _case(op, device, torch.float32, None)
    sample = _sample(inputs, in_dims, 0)
    tangents = [torch.randn_like(t) if t.is_floating_point() else None for t in sample]
    argnums = _differentiable(sample)

    def restricted(function, dtype=None):
        return _of_differentiable(function, sample, argnums, dtype)

    primals = [sample[i] for i in argnums]
    out, tangent_out = jvp(restricted(fast), tuple(primals), tuple(tangents[i] for i in argnums))
    ref_out, ref_tangent = jvp(restricted(ref, torch.float64), tuple(p.double() for p in primals),
                               tuple(tangents[i].double() for i in argnums))
    for i in range(len(out)):
        assert_rel_close(out[i], ref_out[i], tol, f"output {i}")
        assert_rel_close(tangent_out[i], ref_tangent[i], tol, f"tangent {i}")
    for backend in ("triton", "cuda"):
        if dispatch.backend_unavailable_reasons(backend):
            continue
        forced = CASES[op](device, torch.float32, backend)[0]
        with pytest.raises(fastformer.BackendUnavailableError, match="forward-mode autodiff"):
            jvp(restricted(forced), tuple(primals), tuple(tangents[i] for i in argnums))


@pytest.mark.parametrize("op", CASES)
def test_forward_mode_ad_under_compile_is_right_or_raises(op):
    """jvp inside a compiled function: the tangents are right (PyTorch's ops traced in place of
    the opaque custom op, which carries none: it gave zeros, silently), or compiling raises where
    PyTorch cannot compile the jvp of its own op (F.layer_norm, torch 2.14)."""
    fast, ref, inputs, in_dims, (tol, _) = _case(op, "cpu", torch.float32, None)
    # Contiguous: a strided primal trips an internal assert of PyTorch's compiled jvp (torch 2.14,
    # SDPA alone too), after which every compiled jvp of the process fails.
    sample = tuple(t.contiguous() for t in _sample(inputs, in_dims, 0))
    argnums = _differentiable(sample)
    tangents = tuple(torch.randn_like(sample[i]) for i in argnums)

    def restricted(function, dtype=None):
        return _of_differentiable(function, sample, argnums, dtype)

    primals = tuple(sample[i] for i in argnums)
    _, ref_tangent = jvp(restricted(ref, torch.float64), tuple(p.double() for p in primals),
                         tuple(t.double() for t in tangents))
    compiled = torch.compile(lambda *p: jvp(restricted(fast), p, tangents)[1], backend="aot_eager",
                             fullgraph=True)
    try:
        tangent_out = compiled(*primals)
    except torch._dynamo.exc.TorchDynamoException:  # PyTorch cannot compile it: an error, not zeros
        return
    for i in range(len(tangent_out)):
        assert_rel_close(tangent_out[i], ref_tangent[i], tol, f"tangent {i}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("device", DEVICES)
def test_second_order_transforms_of_a_kernel_raise(device, backend):
    """grad(grad(f)) through a kernel's backward raises, as double backward does in eager mode."""
    if device == "cpu" and backend == "cuda":
        pytest.skip("the cuda backend runs on CUDA devices")
    x = _rand(3, 32, device=device, dtype=torch.float16)
    require_backend(backend, fastformer.bias_gelu, x)

    def f(x):
        return fastformer.bias_gelu(x, None, backend=backend).float().square().sum()

    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        grad(lambda x: grad(f)(x).sum())(x)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_sample_gradients_of_an_optimized_bert(backend):
    """Differentially private fine-tuning's per-sample gradients (vmap(grad) over the examples of
    a padded batch, which DP-SGD clips one by one) through an optimized BERT classifier,
    against each example's gradient through the original model (eager attention: transformers'
    own mask code branches on the mask's values, which vmap refuses)."""
    import transformers

    device = kernel_device(backend)

    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0)
    config._attn_implementation = "eager"
    original = transformers.BertForSequenceClassification(config).to(device)
    model = fastformer.optimize(copy.deepcopy(original), backend=backend)
    ids = torch.randint(1, 50, (SAMPLES, 9), device=device)
    mask = (torch.arange(9, device=device) < torch.tensor([[9], [5], [2]], device=device)).long()
    labels = torch.tensor([0, 1, 1], device=device)

    def loss(module):
        def per_example(params, ids, mask, label):
            return functional_call(module, params, (), {"input_ids": ids[None], "attention_mask": mask[None],
                                                        "labels": label[None]}).loss
        return per_example

    params = {name: p.detach() for name, p in model.named_parameters()}
    grads = vmap(grad(loss(model)), in_dims=(None, 0, 0, 0))(params, ids, mask, labels)
    original_params = {name: p.detach() for name, p in original.named_parameters()}
    for n in range(SAMPLES):
        expected = grad(loss(original))(original_params, ids[n], mask[n], labels[n])
        scale = max(g.norm() for g in expected.values())
        for name, want in expected.items():
            if want.norm() <= 1e-6 * scale:  # a key bias: softmax ignores it, its gradient is rounding
                assert (grads[name][n] - want).norm() <= 1e-4 * scale, name
            else:
                assert_rel_close(grads[name][n], want, ATTENTION_TOL[torch.float32][1], f"example {n} {name}")
