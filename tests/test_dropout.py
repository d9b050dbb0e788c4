"""Dropout masks. The torch backend's: its Bernoulli sampler, the eager dropout, and the eager ops
using it (they draw their masks inside the op, so the tests capture each mask as it is drawn, by
wrapping ``bernoulli_keep_mask``, and check the op against the float64 reference with it). The
Triton kernels' (which the CUDA kernels reproduce): the documented Philox function, checked against
an independent implementation, and its statistics.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fastformer
import reference
from fastformer.torch_backend import dropout as torch_dropout
from helpers import (BACKENDS, DEVICES, ELEMENTWISE_TOL, HostReads, assert_rel_close, attention_dtype,
                     check_p_rounded_to_a_multiple_of_2_to_the_minus_16, kernel_device, require_backend,
                     seeded_gradients)
from test_attention import assert_close_to_reference, make_qkv, padding_mask

PROBABILITIES = [1e-3, 0.1, 0.3, 0.5, 0.9]


def within_sigmas(count, trials, probability, sigmas=5.0):
    """Whether ``count`` successes in ``trials`` is within ``sigmas`` standard deviations of the mean."""
    spread = math.sqrt(trials * probability * (1.0 - probability))
    return abs(count - trials * probability) <= sigmas * spread + 1.0


@pytest.fixture
def captured_masks(monkeypatch):
    """Every keep-mask the torch backend's dropout draws, in order."""
    masks = []
    draw = torch_dropout.bernoulli_keep_mask

    def recording(*args, **kwargs):
        masks.append(draw(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(torch_dropout, "bernoulli_keep_mask", recording)
    return masks


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", PROBABILITIES)
def test_keep_mask_is_uniform_bits_against_the_threshold(p):
    """Element i is kept iff its 32 random bits, read as an unsigned fraction u in [0, 1), are >= p:
    recomputed here from the same generator state, independently of the implementation."""
    numel = 10_001  # odd: the last 64-bit word is half used
    generator = torch.Generator().manual_seed(1234)
    keep = torch_dropout.bernoulli_keep_mask((numel,), p, "cpu", generator)
    words = torch.empty((numel + 1) // 2, dtype=torch.int64)
    words.random_(-(2**63), None, generator=torch.Generator().manual_seed(1234))
    fractions = (words.view(torch.int32)[:numel].double() + 2**31) / 2**32
    assert torch.equal(keep, fractions >= p)


@pytest.mark.parametrize("p", PROBABILITIES)
def test_keep_mask_frequency(p):
    trials = 2_000_003
    keep = torch_dropout.bernoulli_keep_mask((trials,), p, "cpu")
    assert within_sigmas(int((~keep).sum()), trials, p)


def test_keep_mask_neighbours_are_independent():
    """The two elements drawn from one 64-bit word: P(both dropped) = p^2, P(one of each) = 2 p (1 - p)."""
    p, pairs = 0.3, 1_000_000
    keep = torch_dropout.bernoulli_keep_mask((pairs, 2), p, "cpu")
    dropped = ~keep
    assert within_sigmas(int((dropped[:, 0] & dropped[:, 1]).sum()), pairs, p * p)
    assert within_sigmas(int((dropped[:, 0] ^ dropped[:, 1]).sum()), pairs, 2 * p * (1 - p))


@pytest.mark.parametrize("shape", [(), (0, 5), (1,), (3, 7, 5)], ids=str)
def test_keep_mask_shapes_and_extremes(shape):
    assert torch_dropout.bernoulli_keep_mask(shape, 0.0, "cpu").all()
    assert not torch_dropout.bernoulli_keep_mask(shape, 1.0, "cpu").any()
    keep = torch_dropout.bernoulli_keep_mask(shape, 0.5, "cpu")
    assert keep.shape == shape and keep.dtype == torch.bool


def test_keep_mask_reproducible_from_the_default_generator_and_from_a_seed():
    torch.manual_seed(5)
    first = torch_dropout.bernoulli_keep_mask((64, 33), 0.5, "cpu")
    second = torch_dropout.bernoulli_keep_mask((64, 33), 0.5, "cpu")
    torch.manual_seed(5)
    assert torch.equal(first, torch_dropout.bernoulli_keep_mask((64, 33), 0.5, "cpu"))
    assert not torch.equal(first, second)
    seed = torch.tensor(2**62 - 3)
    assert torch.equal(torch_dropout.dropout_keep_mask(seed, (97, 3), 0.4, "cpu"),
                       torch_dropout.dropout_keep_mask(seed, (97, 3), 0.4, "cpu"))


# --------------------------------------------------------------------------------------------
# The eager dropout
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dropout_scales_kept_elements_and_its_gradient_is_the_scaled_mask(dtype, captured_masks):
    p = 0.3
    x = (torch.rand(37, 129, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    out = torch_dropout.dropout(x, p)
    (keep,) = captured_masks
    expected = x.detach().double() * keep / (1.0 - p)
    assert_rel_close(out, expected, ELEMENTWISE_TOL[dtype][0], "out")
    assert torch.equal(out != 0, keep)
    grad_out = torch.randn_like(x)
    (grad,) = torch.autograd.grad(out, x, grad_out)
    assert_rel_close(grad, grad_out.double() * keep / (1.0 - p), ELEMENTWISE_TOL[dtype][1], "grad")


def test_dropout_add_draws_like_dropout_and_adds(captured_masks):
    p = 0.2
    x, residual = torch.randn(2, 50, 33), torch.randn(2, 50, 33)
    torch.manual_seed(9)
    fused = torch_dropout.dropout_add(x, residual, p)
    torch.manual_seed(9)
    unfused = torch_dropout.dropout(x, p) + residual
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    assert torch.equal(captured_masks[0], captured_masks[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_and_eval_use_pytorchs_dropout(dtype, captured_masks):
    x = torch.randn(8, 64, dtype=dtype)
    assert not torch_dropout.uses_own_sampler(x)
    torch.manual_seed(3)
    got = torch_dropout.dropout(x, 0.4)
    torch.manual_seed(3)
    assert torch.equal(got, F.dropout(x, 0.4, training=True))
    assert torch_dropout.dropout(x, 0.4, training=False) is x
    assert not captured_masks


# --------------------------------------------------------------------------------------------
# The eager ops that use it (plain eager mode, backend="torch", on the CPU)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eager_attention_dropout_matches_reference_with_its_mask(dtype, captured_masks):
    p = 0.25
    q, k, v = make_qkv((2, 4, 2, 13, 21, 16, 12), dtype, "cpu")
    pad = padding_mask(2, 21, "cpu")
    out = fastformer.attention(q, k, v, dropout_p=p, is_causal=True, key_padding_mask=pad, backend="torch")
    (keep,) = captured_masks
    assert keep.shape == (2, 4, 13, 21)
    assert_close_to_reference(out, q, k, v, dtype, key_padding_mask=pad, is_causal=True, keep=keep, dropout_p=p)


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_eager_residual_layer_norm_dropout_matches_reference_with_its_mask(dtype, with_residual,
                                                                          captured_masks):
    p = 0.3
    x = torch.randn(3, 7, 200, dtype=dtype, requires_grad=True)
    residual = torch.randn(3, 7, 200, dtype=dtype, requires_grad=True) if with_residual else None
    weight = (1.0 + 0.5 * torch.randn(200, dtype=dtype)).requires_grad_()
    bias = torch.randn(200, dtype=dtype, requires_grad=True)
    out, residual_out = fastformer.residual_layer_norm(x, residual, weight, bias, 1e-5, p, backend="torch")
    (keep,) = captured_masks
    expected, expected_residual = reference.residual_norm(
        x, residual, weight, bias, 1e-5, keep=keep.view(x.shape), dropout_p=p)
    fwd_tol, grad_tol = ELEMENTWISE_TOL[dtype]
    assert_rel_close(out, expected, fwd_tol, "out")
    assert_rel_close(residual_out, expected_residual, fwd_tol, "residual_out")
    grad_out, grad_residual_out = torch.randn_like(expected), torch.randn_like(expected)
    inputs = [t for t in (x, residual, weight, bias) if t is not None]
    got = torch.autograd.grad((out, residual_out), inputs, (grad_out.to(dtype), grad_residual_out.to(dtype)))
    want = torch.autograd.grad((expected, expected_residual), inputs, (grad_out, grad_residual_out))
    for index, (grad, expected_grad) in enumerate(zip(got, want)):
        assert_rel_close(grad, expected_grad, grad_tol, f"grad {index}")


def test_encoder_layer_training_draws_its_masks_here(captured_masks):
    """FastTransformerEncoderLayer in training on the CPU: the attention, activation, dropout1 and
    dropout2 masks all come from the torch backend's sampler (each of the expected shape)."""
    layer = fastformer.FastTransformerEncoderLayer(32, 4, 64, dropout=0.1, activation="gelu",
                                                   batch_first=True).train()
    layer(torch.randn(2, 9, 32), src_key_padding_mask=padding_mask(2, 9, "cpu")).sum().backward()
    shapes = sorted(tuple(mask.shape) for mask in captured_masks)
    assert shapes == sorted([(2, 4, 9, 9), (2, 9, 64), (2, 9, 32), (2, 9, 32)])


# ----------------------------------------------------------------------------------------------
# the Triton kernels' keep-mask (also the CUDA kernels': tests/test_cuda_backend.py)
# ----------------------------------------------------------------------------------------------
def _triton_keep_mask():
    from fastformer import dispatch

    if dispatch.backend_unavailable_reasons("triton"):
        pytest.skip("triton cannot run here: " + "; ".join(dispatch.backend_unavailable_reasons("triton")))
    from fastformer.triton.dropout import dropout_keep_mask

    return dropout_keep_mask


@pytest.mark.parametrize("seed", [0, 12345, 2**33 + 5])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.99999])  # 0.99999: threshold 65535, nearly all dropped
def test_triton_keep_mask_is_the_documented_philox_function(seed, p):
    keep_mask = _triton_keep_mask()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in [(3, 7), (2, 5, 13), (6,), (1, 1), (33, 64), (2, 300)]:
        got = keep_mask(torch.tensor(seed), shape, p, device).cpu()
        assert torch.equal(got, reference.philox_keep_mask(seed, shape, p)), (shape, seed, p)


def test_triton_keep_mask_rounds_p_to_the_nearest_multiple_of_2_to_the_minus_16():
    keep_mask = _triton_keep_mask()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_p_rounded_to_a_multiple_of_2_to_the_minus_16(
        lambda seed, shape, p: keep_mask(torch.tensor(seed), shape, p, device))


@pytest.mark.parametrize("transposed_tiles", [False, True])
def test_triton_keep_mask_with_int64_offsets_is_the_same_function(monkeypatch, transposed_tiles):
    """Past 2^31 elements the kernels count Philox groups in int64 (the counter's high word);
    forced on a small tensor, the mask must not change."""
    keep_mask = _triton_keep_mask()
    from fastformer.triton import dropout as triton_dropout

    monkeypatch.setattr(triton_dropout, "wide_offsets", lambda numel: True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    got = keep_mask(torch.tensor(2**40 + 3), (9, 70), 0.25, device, transposed_tiles=transposed_tiles).cpu()
    assert torch.equal(got, reference.philox_keep_mask(2**40 + 3, (9, 70), 0.25))


@pytest.mark.parametrize("join_then_transpose", [True, False])
def test_triton_transposed_keep_tiles_give_the_mask(monkeypatch, join_then_transpose):
    """The dK/dV kernel's transposed tiles of the mask, built by either construction (the joined
    tile transposed, or the selects Triton 3.2 and 3.3 need), hold the documented mask."""
    keep_mask = _triton_keep_mask()
    from fastformer.triton import dropout as triton_dropout

    if join_then_transpose != triton_dropout._JOIN_THEN_TRANSPOSE:
        if not fastformer.triton.interpreter_enabled():
            pytest.skip(f"Triton {triton_dropout.triton.__version__} compiles the other construction")
        monkeypatch.setattr(triton_dropout, "_JOIN_THEN_TRANSPOSE", join_then_transpose)  # read at each call
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for shape in [(5, 45), (3, 2, 8), (37, 300)]:
        got = keep_mask(torch.tensor(99), shape, 0.4, device, transposed_tiles=True).cpu()
        assert torch.equal(got, reference.philox_keep_mask(99, shape, 0.4)), shape


def test_triton_keep_mask_rate_and_independence():
    """Eight neighbours of a row share one Philox call and use the two halves of each of its four
    words: the rate is p and pairs of neighbours, inside and across those groups (and the two halves
    of one word), are dropped together at rate p^2."""
    keep_mask = _triton_keep_mask()
    p, rows, length = 0.3, 400, 203
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dropped = ~keep_mask(torch.tensor(77), (rows, length), p, device).cpu()
    assert within_sigmas(int(dropped.sum()), rows * length, p)
    for offset in range(1, 9):  # column pairs (c, c + offset)
        both = dropped[:, :-offset] & dropped[:, offset:]
        assert within_sigmas(int(both.sum()), both.numel(), p * p), offset


# --------------------------------------------------------------------------------------------
# The kernels' seed: drawn on the data's device and loaded by the kernels, never read on the host,
# so that CUDA graphs (captured by hand or by torch.compile) draw fresh masks at every replay
# --------------------------------------------------------------------------------------------
def test_kernel_backends_draw_the_seed_on_the_datas_device():
    """Meta stands in for a GPU here: the seed of a kernel backend is drawn on the data's device
    (by that device's generator); the torch backend seeds a torch.Generator on the host with it."""
    from fastformer.functional import _draw_seed

    for backend in ("triton", "cuda"):
        assert _draw_seed(0.1, backend, "meta").device.type == "meta"
    seed = _draw_seed(0.1, "torch", "meta")
    assert seed.device.type == "cpu" and seed.dtype == torch.int64 and seed.dim() == 0
    assert _draw_seed(0.0, "triton", "meta") is None


def _encoder_layer_case(backend, device, dtype, d_model, length, dropout, requires_grad=True):
    """A FastTransformerEncoderLayer (4 heads, feed-forward 2 d_model, batch first), an input
    (2, length, d_model) and a padding mask keeping length and length // 2 + 1 keys; skips when
    ``backend`` cannot take its attention."""
    layer = fastformer.FastTransformerEncoderLayer(d_model, 4, 2 * d_model, dropout=dropout, batch_first=True,
                                                   device=device, dtype=dtype)
    x = torch.randn(2, length, d_model, device=device, dtype=dtype, requires_grad=requires_grad)
    kept = torch.tensor([length, length // 2 + 1], device=device)
    padding = torch.arange(length, device=device)[None, :] >= kept[:, None]
    heads = x.detach().view(2, length, 4, d_model // 4).transpose(1, 2)
    require_backend(backend, "attention", heads, heads, heads, dropout_p=dropout, key_padding_mask=padding)
    return layer, x, padding


def _dropout_inputs(backend, device, dtype=torch.float32, requires_grad=True):
    """Inputs of one attention call (with key padding) and one residual LayerNorm, both with
    dropout; skips when ``backend`` cannot take them."""
    q, k, v = make_qkv((2, 4, 2, 13, 21, 16, 16), dtype, device, requires_grad=requires_grad)
    pad = padding_mask(2, 21, device)
    x = torch.randn(6, 40, device=device, dtype=dtype, requires_grad=requires_grad)
    residual, weight = torch.randn(6, 40, device=device, dtype=dtype), torch.randn(40, device=device)
    require_backend(backend, "attention", q, k, v, dropout_p=0.3, key_padding_mask=pad)
    require_backend(backend, "residual_layer_norm", x, residual, weight, None, dropout_p=0.3)
    return (q, k, v, pad), (x, residual, weight)


def _ops_with_dropout(backend, attention_inputs, norm_inputs):
    """(attention output, normed, residual_out) with dropout 0.3."""
    q, k, v, pad = attention_inputs
    x, residual, weight = norm_inputs
    out = fastformer.attention(q, k, v, dropout_p=0.3, key_padding_mask=pad, backend=backend)
    normed, residual_out = fastformer.residual_layer_norm(x, residual, weight, None, dropout_p=0.3,
                                                          backend=backend)
    return out, normed, residual_out


def test_triton_dropout_reads_no_value_on_the_host():
    """Forward and backward of the Triton kernels with dropout: the seed is passed as a pointer,
    and nothing else is read on the host either (key padding ends are computed on the device)."""
    inputs = _dropout_inputs("triton", kernel_device("triton"))
    with HostReads() as reads:
        out, normed, residual_out = _ops_with_dropout("triton", *inputs)
        (out.sum() + normed.sum() + residual_out.sum()).backward()
    assert reads.count == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_masks_are_fresh_at_every_cuda_graph_replay(backend):
    """Captured in a CUDA graph, the ops draw new masks at each replay of the same inputs: the
    kernel backends' seed is drawn on the GPU and loaded by the kernels (one drawn on the host
    would be captured as a constant); the torch backend runs PyTorch's dropout in eager mode."""
    inputs = _dropout_inputs(backend, "cuda", torch.bfloat16, requires_grad=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and autotune outside the capture
        for _ in range(2):
            _ops_with_dropout(backend, *inputs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _ops_with_dropout(backend, *inputs)
    replays = []
    for _ in range(3):
        graph.replay()
        replays.append([t.clone() for t in outputs])
    torch.cuda.synchronize()
    for name, index in (("attention", 0), ("residual_layer_norm", 1)):
        first, second, third = (replay[index] for replay in replays)
        assert torch.isfinite(first).all(), name
        assert not torch.equal(first, second) and not torch.equal(second, third), name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_a_graphed_encoder_layer_trains_with_fresh_dropout_masks(backend):
    """torch.cuda.make_graphed_callables captures the forward and the backward of an encoder layer
    with dropout (the backward kernels load the seed the forward's draw wrote): each replay of the
    pair draws new masks, and its gradients are finite."""
    layer, x, padding = _encoder_layer_case(backend, "cuda", torch.bfloat16, 64, 16, 0.1)

    class WithPadding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, x, padding):
            return self.layer(x, src_key_padding_mask=padding)

    with fastformer.use_backend(backend):  # read while capturing; replays run no Python
        graphed = torch.cuda.make_graphed_callables(WithPadding(), (x, padding))
    outputs, input_grads = [], []
    weights = torch.randn(2, 16, 64, device="cuda")  # a sum of squares of a LayerNorm output is constant
    for _ in range(3):
        x.grad = None
        out = graphed(x, padding)
        (out.float() * weights).sum().backward()
        outputs.append(out.detach().clone())
        input_grads.append(x.grad.clone())
    torch.cuda.synchronize()
    assert all(torch.isfinite(g).all() for g in input_grads)
    assert not torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[1], outputs[2])
    assert not torch.equal(input_grads[1], input_grads[2])


@pytest.mark.gpu
def test_reduce_overhead_compiles_an_encoder_layer_with_dropout_into_cuda_graphs():
    """torch.compile(mode="reduce-overhead") keeps a fastformer encoder layer with dropout in
    CUDA graphs, and its training steps on the same input draw fresh masks. One kernel backend
    (the seed's device is the same for both; the CUDA graph test above runs each). Partitioning
    (inductor's default from torch 2.9) is turned off, so that a CPU op in the graph (as the
    seed's draw was when seeds were drawn on the CPU) skips CUDA graphs and is counted."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    backend = "triton"
    layer, x, padding = _encoder_layer_case(backend, "cuda", torch.bfloat16, 64, 16, 0.1, requires_grad=False)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(layer, mode="reduce-overhead")
    outputs = []
    partitioning = {"graph_partition": False} if hasattr(inductor_config, "graph_partition") else {}
    with fastformer.use_backend(backend), inductor_config.patch(**partitioning):
        for _ in range(4):
            out = compiled(x, src_key_padding_mask=padding)
            out.sum().backward()
            outputs.append(out.detach().clone())
    torch.cuda.synchronize()
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert not torch.equal(outputs[-1], outputs[-2])


def test_a_triton_launcher_with_dropout_and_no_seed_says_so():
    from fastformer.triton import layer_norm as triton_layer_norm

    x = torch.randn(3, 8)
    with pytest.raises(ValueError, match=r"dropout_p = 0.3 > 0 needs a seed, got None"):
        triton_layer_norm.residual_norm_fwd(x, None, None, None, 1e-5, 0.3, False, None, True)
    with pytest.raises(ValueError, match=r"seed must be on the data's device \(cpu\), got meta"):
        triton_layer_norm.residual_norm_fwd(x, None, None, None, 1e-5, 0.3, False,
                                            torch.empty((), dtype=torch.int64, device="meta"), True)


def test_the_torch_backends_seeded_dropout_refuses_cuda_graph_capture(monkeypatch):
    """Its masks come from a generator seeded on the host, which a graph replay would not redo:
    during capture on a GPU (simulated here) it raises instead of replaying one mask forever."""
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        torch_dropout.dropout_keep_mask(torch.tensor(5), (4, 8), 0.1, "cuda")
    keep = torch_dropout.dropout_keep_mask(torch.tensor(5), (4, 8), 0.1, "cpu")  # no GPU graph: fine
    assert keep.shape == (4, 8)


# --------------------------------------------------------------------------------------------
# Activation checkpointing: the recomputed forward draws the same masks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_activation_checkpointing_with_dropout_gives_the_same_gradients(reentrant, backend, device):
    """torch.utils.checkpoint recomputes the layer's forward in the backward after restoring the
    RNG states of the CPU and of the inputs' device: the seeds (drawn on the data's device) and
    PyTorch's own dropout then draw the same masks again, so the gradients are those of the run
    without checkpointing (with other masks they differ entirely: checked with
    preserve_rng_state=False). The loss weighs the outputs randomly: the sum of squares of a
    LayerNorm's output is a constant, whose gradients are rounding residue."""
    from torch.utils.checkpoint import checkpoint

    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    layer, x, padding = _encoder_layer_case(backend, device, dtype, 32, 9, 0.3)
    params = [x, *layer.parameters()]
    weights = torch.randn(2, 9, 32, device=device)
    with fastformer.use_backend(backend):
        plain = seeded_gradients(lambda: (layer(x, src_key_padding_mask=padding).float() * weights).sum(), params)
        recomputed = seeded_gradients(lambda: (checkpoint(lambda t: layer(t, src_key_padding_mask=padding), x,
                                                          use_reentrant=reentrant).float() * weights).sum(),
                                      params)
    # The same kernels on the same inputs: equal up to the order of atomic additions on a GPU.
    tol = 0.0 if device == "cpu" else 1e-2
    for name, got, expected in zip(["x"] + [n for n, _ in layer.named_parameters()], recomputed, plain):
        assert_rel_close(got.float(), expected.float(), tol, f"grad {name}")


# --------------------------------------------------------------------------------------------
# dropout_p = 1: everything dropped, as PyTorch's dropout does it
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_one_drops_everything(backend):
    """dropout_p = 1 (valid for nn.Dropout, SDPA and PyTorch's encoder layers) drops every
    element: attention and bias_gelu give zeros and zero gradients, a residual norm normalises the
    residual alone (residual_out = residual). No kernel sees p = 1 (its 1 / (1 - p) is inf)."""
    dtype = attention_dtype(backend)
    (q, k, v, pad), (x, residual, weight) = _dropout_inputs(backend, kernel_device(backend), dtype)
    residual.requires_grad_()
    bias = torch.randn(40, device=x.device, dtype=dtype)
    require_backend(backend, "bias_gelu", x, bias, dropout_p=0.3)
    out = fastformer.attention(q, k, v, dropout_p=1.0, key_padding_mask=pad, backend=backend)
    normed, residual_out = fastformer.residual_layer_norm(x, residual, weight, None, dropout_p=1.0, backend=backend)
    activated = fastformer.bias_gelu(x, bias, dropout_p=1.0, backend=backend)
    assert (out == 0).all() and (activated == 0).all()
    assert torch.equal(residual_out, residual)
    expected = F.layer_norm(residual.double(), (40,), weight.double())
    assert_rel_close(normed, expected, ELEMENTWISE_TOL[dtype][0], "normed")
    weights = torch.randn_like(normed)
    inputs = (q, k, v, x, residual)
    grads = torch.autograd.grad((out.sum() + (normed * weights).sum() + activated.sum()), inputs)
    for name, grad in zip("qkvx", grads):
        assert (grad == 0).all(), f"grad {name}"
    expected_grad = torch.autograd.grad((expected * weights).sum(), residual)[0]
    assert_rel_close(grads[4], expected_grad, ELEMENTWISE_TOL[dtype][1], "grad residual")
