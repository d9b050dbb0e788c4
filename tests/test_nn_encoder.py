"""FastTransformerEncoderLayer against torch.nn.TransformerEncoderLayer (float64, CPU, dropout off)."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastformer
from fastformer import dispatch
from fastformer.nn.encoder import FastTransformerEncoderLayer
from fastformer.nn.multihead_attention import FastMultiheadAttention
from helpers import (ATTENTION_TOL, PARAM_GRAD_TOL_HALF, Copies, DEVICES, LoRALinear, ZeroFills, assert_rel_close,
                     attention_dtype, kernel_device, record_bias_gelu_biases, require_backend)

# PyTorch warns when a float causal mask meets a bool padding mask ("causal+padding"); so does
# FastMultiheadAttention, as PyTorch's MultiheadAttention.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched:UserWarning")

D_MODEL, NHEAD, D_FF, S, B = 200, 4, 300, 13, 3
F64 = torch.float64


def custom_activation(x):
    return torch.tanh(x) * x


ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "F.gelu": F.gelu, "GELU(tanh)": nn.GELU("tanh"),
               "callable": custom_activation}
MASKS = ["none", "bool", "float", "bool3d", "padding", "float_padding", "bool+padding",
         "float+float_padding", "causal", "causal+padding"]


def make_pair(norm_first=False, activation="relu", batch_first=False, bias=True, dropout=0.1,
              dtype=F64, **kwargs):
    """A PyTorch layer and a fastformer layer holding the same weights (biases made non-zero)."""
    ref = nn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, dropout, activation, 1e-5, batch_first,
                                     norm_first, bias, dtype=dtype, **kwargs)
    with torch.no_grad():
        for name, p in ref.named_parameters():  # PyTorch zero-inits some biases / ones the norms
            if name.endswith("bias") or name.startswith("norm"):
                p.add_(0.1 * torch.randn_like(p))
    fast = FastTransformerEncoderLayer(D_MODEL, NHEAD, D_FF, dropout, activation, 1e-5, batch_first,
                                       norm_first, bias, dtype=dtype, **kwargs)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def padding_mask(batch=B, seq=S, full_row=None):
    pad = torch.zeros(batch, seq, dtype=torch.bool)
    pad[min(1, batch - 1), seq - 4:] = True
    pad[min(2, batch - 1), 5:7] = True
    if full_row is not None:
        pad[full_row] = True
    return pad


def make_masks(kind, batch=B, seq=S, dtype=F64):
    """(src_mask, src_key_padding_mask, is_causal) in PyTorch's conventions, no fully masked row."""
    src_mask = padding = None
    is_causal = False
    forbid = torch.rand(seq, seq) < 0.3
    forbid.fill_diagonal_(False)
    if "bool3d" in kind:
        forbid3 = torch.rand(batch * NHEAD, seq, seq) < 0.3
        forbid3[:, torch.arange(seq), torch.arange(seq)] = False
        src_mask = forbid3
    elif kind.startswith("bool"):
        src_mask = forbid
    elif kind.startswith("float"):
        src_mask = torch.randn(seq, seq, dtype=dtype).masked_fill(forbid, float("-inf"))
    elif kind.startswith("causal"):
        src_mask = nn.Transformer.generate_square_subsequent_mask(seq, dtype=dtype)
        is_causal = True
    if "float_padding" in kind:
        padding = torch.zeros(batch, seq, dtype=dtype).masked_fill(padding_mask(batch, seq), float("-inf"))
        padding[0, 3] = -1.5  # a finite additive value too
    elif "padding" in kind:
        padding = padding_mask(batch, seq)
    return src_mask, padding, is_causal


def run(layer, x, masks, grad_out):
    x = x.detach().clone().requires_grad_()
    for p in layer.parameters():
        p.grad = None
    src_mask, padding, is_causal = masks
    out = layer(x, src_mask=src_mask, src_key_padding_mask=padding, is_causal=is_causal)
    out.backward(grad_out)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out, x.grad, grads


# float64: both sides agree to rounding (PyTorch's own default tolerance for float64 is 1e-7).
# Needs the float64-exact residual_layer_norm backward (statistics kept in the compute dtype).
FWD_TOL = dict(atol=1e-10, rtol=1e-10)
GRAD_TOL = dict(atol=1e-9, rtol=1e-7)


def assert_same(ref, fast, x, masks, atol=FWD_TOL["atol"], rtol=FWD_TOL["rtol"], grad_tol=GRAD_TOL):
    ref_out = ref(x, *masks[:2], is_causal=masks[2])
    grad_out = torch.randn_like(ref_out)
    expected = run(ref, x, masks, grad_out)
    actual = run(fast, x, masks, grad_out)
    torch.testing.assert_close(actual[0], expected[0], atol=atol, rtol=rtol, msg=lambda m: "out: " + m)
    torch.testing.assert_close(actual[1], expected[1], **grad_tol, msg=lambda m: "grad src: " + m)
    assert actual[2].keys() == expected[2].keys()
    for name in expected[2]:
        torch.testing.assert_close(actual[2][name], expected[2][name], **grad_tol,
                                   msg=lambda m, name=name: f"grad {name}: " + m)


# ------------------------------------------------------------------------------------------------
# Parity: outputs and gradients equal PyTorch's (dropout off: eval mode)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_matches_pytorch(norm_first, activation, mask_kind):
    ref, fast = make_pair(norm_first, ACTIVATIONS[activation])
    ref.eval(), fast.eval()
    x = torch.randn(S, B, D_MODEL, dtype=F64)
    assert_same(ref, fast, x, make_masks(mask_kind))


@pytest.mark.parametrize("mask_kind", ["none", "bool+padding", "float+float_padding", "causal+padding"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_matches_pytorch_layouts_and_bias(norm_first, activation, batch_first, bias, mask_kind):
    ref, fast = make_pair(norm_first, activation, batch_first, bias)
    ref.eval(), fast.eval()
    x = torch.randn((B, S, D_MODEL) if batch_first else (S, B, D_MODEL), dtype=F64)
    assert_same(ref, fast, x, make_masks(mask_kind))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "padding", "bool+padding", "causal"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_unbatched_input(norm_first, batch_first, mask_kind):
    ref, fast = make_pair(norm_first, "gelu", batch_first)
    ref.eval(), fast.eval()
    src_mask, padding, is_causal = make_masks(mask_kind, batch=1)
    if src_mask is not None and src_mask.dim() == 3:
        src_mask = src_mask[:NHEAD]
    if padding is not None:
        padding = padding[0].clone()
        padding[S - 3:] = True
    x = torch.randn(S, D_MODEL, dtype=F64)
    assert_same(ref, fast, x, (src_mask, padding, is_causal))


def test_train_mode_without_dropout_matches_pytorch():
    """dropout=0 in training mode: the training code path, still deterministic."""
    ref, fast = make_pair(True, "gelu", dropout=0.0)
    ref.train(), fast.train()
    x = torch.randn(S, B, D_MODEL, dtype=F64)
    assert_same(ref, fast, x, make_masks("bool+padding"))


@pytest.mark.parametrize("setting", ["dropout=1", "layer_norm_eps=0"])
def test_edge_settings_pytorch_accepts(setting):
    """Settings PyTorch's layer runs with run the same here (so optimize() can swap any layer in):
    dropout=1 in training drops everything (deterministic, so the outputs compare), and
    layer_norm_eps=0 normalises without an epsilon."""
    kwargs = dict(dropout=1.0) if setting == "dropout=1" else dict(dropout=0.0, layer_norm_eps=0.0)
    eps = kwargs.pop("layer_norm_eps", 1e-5)
    ref = nn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, activation="gelu", layer_norm_eps=eps, dtype=F64,
                                     **kwargs).train()
    fast = FastTransformerEncoderLayer(D_MODEL, NHEAD, D_FF, activation="gelu", layer_norm_eps=eps, dtype=F64,
                                       **kwargs).train()
    fast.load_state_dict(ref.state_dict())
    assert_same(ref, fast, torch.randn(S, B, D_MODEL, dtype=F64), make_masks("bool+padding"))


def test_float32_close_to_pytorch():
    ref, fast = make_pair(False, "gelu", dtype=torch.float32)
    ref.eval(), fast.eval()
    x = torch.randn(S, B, D_MODEL)
    tol = dict(atol=1e-4, rtol=1e-4)
    assert_same(ref, fast, x, make_masks("float+float_padding", dtype=torch.float32), grad_tol=tol, **tol)


def test_uses_fused_ops(monkeypatch):
    """attention, residual_layer_norm and (for GELU) bias_gelu actually run."""
    calls = {"attention": 0, "residual_layer_norm": 0, "bias_gelu": 0}
    for name in calls:
        original = getattr(fastformer.functional, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(fastformer.functional, name, spy)
        monkeypatch.setattr(fastformer, name, spy)
    for norm_first, activation, expected in [(False, "gelu", (1, 2, 1)), (True, "gelu", (1, 2, 1)),
                                             (False, "relu", (1, 2, 0))]:
        calls.update(dict.fromkeys(calls, 0))
        _, fast = make_pair(norm_first, activation)
        fast(torch.randn(S, B, D_MODEL, dtype=F64))
        assert tuple(calls.values()) == expected, (norm_first, activation, calls)


@pytest.mark.parametrize("backend, bias_fused", [(None, False), ("triton", True)])
def test_linear1_bias_goes_where_it_is_cheapest(backend, bias_fused, monkeypatch):
    """On the torch backend (the CPU's choice) linear1 keeps its bias in the GEMM; on a kernel
    backend (Triton: on the GPU, or in its interpreter without one) bias_gelu gets it. Same results either way."""
    biases = record_bias_gelu_biases(monkeypatch)
    device = kernel_device(backend)
    ref, fast = (layer.to(device) for layer in make_pair(False, "gelu", dtype=torch.float32, dropout=0.0))
    fast.fastformer_backend = backend
    if backend is not None:
        require_backend(backend, "bias_gelu", torch.randn(2, D_FF, device=device), fast.linear1.bias)
    x = torch.randn(S, B, D_MODEL, device=device)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-4, rtol=1e-4)
    assert len(biases) == 1 and (biases[0] is fast.linear1.bias) == bias_fused
    assert bias_fused or biases[0] is None


def test_under_autocast_linear1_bias_goes_by_the_gemm_output_dtype(monkeypatch):
    """Where linear1's bias goes is decided for the bias_gelu call the layer will make, on the
    GEMM's output: bfloat16 under autocast, although the layer's input is float32. Here a kernel
    backend (Triton, in its interpreter, made the automatic choice on the CPU) takes only bfloat16
    bias_gelu calls, so the bias must go to it; asked about float32, dispatch would say torch and
    the GEMM would keep the bias."""
    table = dict(dispatch._OP_TABLES["triton"])
    support, module = table["bias_gelu"]
    require_backend("triton", "bias_gelu", torch.randn(2, D_FF), torch.randn(D_FF))
    table["bias_gelu"] = (dataclasses.replace(support, dtypes=frozenset({torch.bfloat16}),
                                              forced_only_devices=frozenset()), module)
    monkeypatch.setitem(dispatch._OP_TABLES, "triton", table)
    biases = record_bias_gelu_biases(monkeypatch)
    _, fast = make_pair(False, "gelu", dtype=torch.float32, dropout=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fastformer.explain("bias_gelu", torch.randn(2, D_FF, dtype=torch.bfloat16),
                                  fast.linear1.bias).backend == "triton"
        fast(torch.randn(S, B, D_MODEL))
    assert len(biases) == 1 and biases[0] is fast.linear1.bias


class DoubledGELU(nn.GELU):
    def forward(self, x):
        return 2 * super().forward(x)


@pytest.mark.parametrize("backend", [None, "triton"])
@pytest.mark.parametrize("change", ["lora linear1", "gelu subclass", "rms norm2", "hooked norm1"])
def test_submodules_changed_after_construction_run_as_they_are(change, backend):
    """A LoRA adapter put in place of linear1, a GELU subclass, a norm swapped for another kind, a
    hook: the fused forward would skip them (it reads parameters, not modules), so the layer calls
    them as PyTorch's does. Triton (on the GPU, or in its interpreter) is the backend that fuses
    linear1's bias."""
    device = kernel_device(backend)
    ref, fast = make_pair(False, "gelu", dtype=torch.float32, dropout=0.0)
    fast.fastformer_backend = backend
    if backend is not None:
        require_backend(backend, "bias_gelu", torch.randn(2, D_FF, device=device), fast.linear1.bias.to(device))
    torch.manual_seed(1)
    calls = []
    for layer in (ref, fast):
        if change == "lora linear1":
            layer.linear1 = LoRALinear(layer.linear1)
        elif change == "gelu subclass":
            layer.activation = DoubledGELU()
        elif change == "rms norm2":
            layer.norm2 = nn.RMSNorm(D_MODEL, eps=1e-5)
        else:
            layer.norm1.register_forward_hook(lambda module, args, out: calls.append(out.sum().item()))
        if change != "hooked norm1":
            torch.manual_seed(1)  # the same new weights in both layers
    if change != "hooked norm1":
        fast.load_state_dict(ref.state_dict())
    ref, fast = ref.to(device), fast.to(device)
    x = torch.randn(S, B, D_MODEL, device=device)
    torch.testing.assert_close(fast(x), ref(x), atol=1e-4, rtol=1e-4)
    if change == "hooked norm1":
        assert len(calls) == 2 and calls[0] == pytest.approx(calls[1], rel=1e-4, abs=1e-3)


def test_self_attn_is_fast_and_shares_parameters():
    ref, fast = make_pair()
    assert isinstance(fast.self_attn, FastMultiheadAttention)
    assert fast.self_attn.batch_first == ref.self_attn.batch_first
    assert fast.self_attn.dropout == ref.self_attn.dropout
    names = [n for n, _ in fast.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()]
    assert all(p.device.type == "cpu" and p.dtype == F64 for p in fast.parameters())
    optimiser = torch.optim.SGD(fast.parameters(), lr=0.1)  # the parameters are live, trainable
    fast(torch.randn(S, B, D_MODEL, dtype=F64)).sum().backward()
    assert fast.self_attn.in_proj_weight.grad is not None
    optimiser.step()


def test_is_causal_needs_a_mask_as_pytorch():
    ref, fast = make_pair()
    x = torch.randn(S, B, D_MODEL, dtype=F64)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ref(x, is_causal=True)
    with pytest.raises(RuntimeError, match="(?i)need attn_mask"):
        fast(x, is_causal=True)  # FastMultiheadAttention's message: "... need attn_mask ..."


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("norm_first, activation, mask_kind", [
    (False, "gelu", "padding"), (True, "relu", "causal+padding"), (False, "GELU(tanh)", "float")], ids=str)
def test_parity_in_bfloat16_on_each_backend(norm_first, activation, mask_kind, backend):
    """In bfloat16, as models train, on each backend's device (the GPU for the kernels; Triton's
    interpreter without one; tests/test_cuda_emulated.py runs the CUDA kernels' case on the CPU)."""
    check_parity_in_bfloat16(norm_first, activation, mask_kind, backend, kernel_device(backend))


def check_parity_in_bfloat16(norm_first, activation, mask_kind, backend, device):
    """Output and gradients of the input and every parameter against
    PyTorch's layer in float64, within DESIGN.md's tolerances of its loosest op (attention's for
    the output and the input's gradient, the half-precision weight and bias gradients' for the
    parameters': with ReLU, PyTorch's own layer in bfloat16 is 6% off on linear1's) and at most
    BASELINE_MULTIPLE times the error of PyTorch's layer itself in bfloat16."""
    ref, fast = make_pair(norm_first, ACTIVATIONS[activation], True, dropout=0.0)
    ref, fast = ref.to(device), fast.to(device, torch.bfloat16)
    plain = copy.deepcopy(ref).to(torch.bfloat16)
    masks = make_masks(mask_kind)
    x = torch.randn(B, S, D_MODEL, dtype=F64)
    grad_out = torch.randn(B, S, D_MODEL, dtype=torch.bfloat16).double()
    results = {}
    for name, layer in (("float64", ref), ("fast", fast), ("plain", plain)):
        dtype = F64 if name == "float64" else torch.bfloat16
        these_masks = [None if m is None else m.to(device, dtype if m.is_floating_point() else m.dtype)
                       for m in masks[:2]]
        with fastformer.use_backend(backend if name == "fast" else None):
            results[name] = run(layer, x.to(device, dtype), (*these_masks, masks[2]), grad_out.to(device, dtype))
    (want_out, want_dx, want_grads), (out, dx, grads), (plain_out, plain_dx, plain_grads) = results.values()
    forward_tol, grad_tol = ATTENTION_TOL[torch.bfloat16]
    assert_rel_close(out, want_out, forward_tol, "out", baseline=plain_out)
    assert_rel_close(dx, want_dx, grad_tol, "grad src", baseline=plain_dx)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad.dtype == torch.bfloat16, name
        assert_rel_close(grad, want_grads[name], PARAM_GRAD_TOL_HALF, f"grad {name}", baseline=plain_grads[name])


# ------------------------------------------------------------------------------------------------
# state_dict, dropout, fully padded rows
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_state_dict_loads_both_ways(bias):
    ref, fast = make_pair(bias=bias)
    assert list(fast.state_dict()) == list(ref.state_dict())
    assert isinstance(fast, nn.TransformerEncoderLayer)
    other = nn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, bias=bias, dtype=F64)
    other.load_state_dict(fast.state_dict(), strict=True)
    back = FastTransformerEncoderLayer(D_MODEL, NHEAD, D_FF, bias=bias, dtype=F64)
    back.load_state_dict(other.state_dict(), strict=True)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=0, atol=0)
    if bias:
        assert "self_attn.in_proj_bias" in fast.state_dict()


def test_same_seed_same_init_as_pytorch():
    torch.manual_seed(1234)
    ref = nn.TransformerEncoderLayer(D_MODEL, NHEAD, D_FF, dtype=F64)
    torch.manual_seed(1234)
    fast = FastTransformerEncoderLayer(D_MODEL, NHEAD, D_FF, dtype=F64)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_train_mode_dropout(norm_first):
    _, fast = make_pair(norm_first, "gelu", dropout=0.1)
    fast.train()
    x = torch.randn(S, B, D_MODEL, dtype=F64, requires_grad=True)
    pad = padding_mask()
    out1 = fast(x, src_key_padding_mask=pad)
    out2 = fast(x, src_key_padding_mask=pad)
    assert not torch.equal(out1, out2)
    out1.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())
    fast.eval()
    torch.testing.assert_close(fast(x, src_key_padding_mask=pad), fast(x, src_key_padding_mask=pad))
    # seeded: reproducible
    fast.train()
    torch.manual_seed(7)
    a = fast(x, src_key_padding_mask=pad)
    torch.manual_seed(7)
    b = fast(x, src_key_padding_mask=pad)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


DROPOUT_MODULES = ["dropout", "dropout1", "dropout2"]


@pytest.mark.parametrize("layer_training", [True, False], ids=["layer_train", "layer_eval"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_each_dropout_follows_its_own_module_mode(norm_first, activation, layer_training):
    """As PyTorch's forward calls them, each nn.Dropout applies by its own train/eval mode, not
    the layer's: a module left in train() under an eval() layer (Monte Carlo dropout) drops, one
    put in eval() under a training layer does not. (Gradients on: PyTorch's inference fast path,
    which skips the dropout modules, is not taken.)"""
    ref, fast = make_pair(norm_first, activation, dropout=0.5)
    x = torch.randn(S, B, D_MODEL, dtype=F64)
    for active in [None, *DROPOUT_MODULES]:
        for layer in (ref, fast):
            layer.train(layer_training)
            layer.self_attn.eval()
            for name in DROPOUT_MODULES:
                getattr(layer, name).train(name == active)
        if active is None:  # no dropout anywhere: the two layers agree
            assert_rel_close(fast(x), ref(x), 1e-10, "out")
        for layer in (ref, fast):
            assert torch.equal(layer(x), layer(x)) == (active is None), (type(layer).__name__, active)

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_a_training_step_fills_no_zeros(norm_first, backend, device, monkeypatch):
    """Forward and backward of a training step (dropout, padding, GELU) allocate no zero-filled
    tensors: not the gradients of outputs that reach no loss (the attention's log-sum-exp, the
    norms' statistics, the residual streams of a post-norm layer's norms), which autograd
    fills with zeros unless told not to, nor the partial sums of the parameter gradients. On a
    GPU each would be a memset launch per layer and step. The torch backend also through the
    autograd.Function that kernel backends use."""
    from fastformer import library

    monkeypatch.setattr(library, "NATIVE_AUTOGRAD", False)
    assert _training_step(ZeroFills(), backend, device, norm_first=norm_first).fills == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
def test_a_kernel_backend_training_step_copies_no_tensor(batch_first, backend, device):
    """Forward and backward of a training step (dropout, padding, GELU) on a kernel backend copy
    no tensor, in either layout: q, k, v are views of the QKV projection, the attention output is
    laid out like the query so merging its heads for the output projection is a view (a
    (B, L, H, D) output of sequence-first inputs was copied to (L, B, H * D) there), and the
    gradients flow back through the same views."""
    assert _training_step(Copies(), backend, device, batch_first=batch_first).copies == []


def _training_step(mode, backend, device, norm_first=False, batch_first=True):
    """One training step (forward and backward; dropout, padding, GELU) of a fresh
    FastTransformerEncoderLayer on ``backend`` inside dispatch mode ``mode``, which it returns;
    skips when the backend cannot run here. Every parameter must get a finite gradient. In
    ``attention_dtype(backend)``."""
    dtype = attention_dtype(backend)
    _, fast = make_pair(norm_first, "gelu", batch_first=batch_first, dtype=dtype)
    fast = fast.to(device)
    x = torch.randn((B, S, D_MODEL) if batch_first else (S, B, D_MODEL), device=device, dtype=dtype,
                    requires_grad=True)
    padding = padding_mask().to(device)
    heads = torch.empty(B, NHEAD, S, D_MODEL // NHEAD, device=device, dtype=dtype)
    require_backend(backend, "attention", heads, heads, heads, dropout_p=0.1, key_padding_mask=padding)
    require_backend(backend, "residual_layer_norm", x, x, fast.norm1.weight, fast.norm1.bias)
    with fastformer.use_backend(backend), mode:
        fast(x, src_key_padding_mask=padding).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())
    return mode


@pytest.mark.parametrize("padding_dtype", ["bool", "float"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_fully_padded_sequence_is_finite(norm_first, padding_dtype):
    """A sequence whose keys are all padding: PyTorch gives NaN; fastformer's attention gives 0 for
    those rows, so the layer output is the layer with a zero attention (out_proj.bias only)."""
    ref, fast = make_pair(norm_first, "gelu")
    ref.eval(), fast.eval()
    pad = padding_mask(full_row=0)
    if padding_dtype == "float":
        pad = torch.zeros(pad.shape, dtype=F64).masked_fill(pad, float("-inf"))
    x = torch.randn(S, B, D_MODEL, dtype=F64, requires_grad=True)
    out = fast(x, src_key_padding_mask=pad)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())
    # Row 0: the attention contributes only out_proj(0) = out_proj.bias.
    with torch.no_grad():
        x0 = x[:, 0]
        sa = ref.self_attn.out_proj.bias.expand_as(x0)
        if norm_first:
            x1 = x0 + sa
            expected = x1 + ref._ff_block(ref.norm2(x1))
        else:
            x1 = ref.norm1(x0 + sa)
            expected = ref.norm2(x1 + ref._ff_block(x1))
        torch.testing.assert_close(out[:, 0], expected)
        # The other sequences are PyTorch's.
        torch.testing.assert_close(out[:, 1:], ref(x, src_key_padding_mask=pad)[:, 1:])


# ------------------------------------------------------------------------------------------------
# nn.TransformerEncoder
# ------------------------------------------------------------------------------------------------
def make_encoders(norm_first=False, batch_first=True, **kwargs):
    ref_layer, fast_layer = make_pair(norm_first, "gelu", batch_first)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "enable_nested_tensor is True, but ..." (PyTorch's own)
        ref = nn.TransformerEncoder(ref_layer, num_layers=2, **kwargs)
        fast = nn.TransformerEncoder(fast_layer, num_layers=2, **kwargs)
    with torch.no_grad():  # make the two layers different, identically in both encoders
        for p in ref.layers[1].parameters():
            p.add_(0.05 * torch.randn_like(p))
    fast.load_state_dict(ref.state_dict(), strict=True)
    assert all(isinstance(layer, FastTransformerEncoderLayer) for layer in fast.layers)
    assert fast.layers[0] is not fast.layers[1]
    return ref, fast


@pytest.mark.parametrize("mask_kind", ["none", "bool+padding", "causal+padding", "padding"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
@pytest.mark.parametrize("enable_nested_tensor", [True, False], ids=["nested_on", "nested_off"])
def test_transformer_encoder_matches_pytorch(enable_nested_tensor, norm_first, mask_kind):
    """With gradients: PyTorch's encoder hands its layers a float padding mask (canonicalised)."""
    ref, fast = make_encoders(norm_first, enable_nested_tensor=enable_nested_tensor)
    ref.eval(), fast.eval()
    src_mask, padding, is_causal = make_masks(mask_kind)
    x = torch.randn(B, S, D_MODEL, dtype=F64)
    grad_out = torch.randn(B, S, D_MODEL, dtype=F64)
    results = []
    for encoder in (ref, fast):
        xr = x.clone().requires_grad_()
        encoder.zero_grad()
        out = encoder(xr, mask=src_mask, src_key_padding_mask=padding, is_causal=is_causal or None)
        out.backward(grad_out)
        results.append((out, xr.grad, [p.grad for p in encoder.parameters()]))
    (ref_out, ref_dx, ref_dp), (out, dx, dp) = results
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dx, ref_dx, **GRAD_TOL)
    for a, b in zip(dp, ref_dp):
        torch.testing.assert_close(a, b, **GRAD_TOL)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post_norm", "pre_norm"])
def test_transformer_encoder_inference_nested_tensor_path(norm_first):
    """eval + no_grad + padding mask + batch_first: PyTorch's encoder feeds its layers a nested
    tensor (post-norm only); the fast layer takes it. Non-padded positions equal PyTorch's."""
    ref, fast = make_encoders(norm_first, enable_nested_tensor=True)
    ref.eval(), fast.eval()
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 9:] = True  # left-aligned padding, as the nested-tensor path wants
    pad[2, 4:] = True
    x = torch.randn(B, S, D_MODEL, dtype=F64)
    seen = []
    hook = fast.layers[0].register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0].is_nested),
                                                    with_kwargs=True)
    with torch.no_grad():
        expected = ref(x, src_key_padding_mask=pad)
        out = fast(x, src_key_padding_mask=pad)
    hook.remove()
    if not norm_first:
        assert seen == [True], "expected PyTorch's encoder to take its nested-tensor path"
    keep = ~pad
    torch.testing.assert_close(out[keep], expected[keep])


def test_tanh_gelu_in_inference_is_tanh_gelu():
    """eval + no_grad: PyTorch's layer takes its native fast path, which computes an
    ``nn.GELU(approximate="tanh")`` activation as the exact erf GELU (PyTorch 2.6-2.14). The fast
    layer computes what the module says, as PyTorch's own layer does with gradients on."""
    ref, fast = make_pair(False, nn.GELU("tanh"), batch_first=True)
    ref.eval(), fast.eval()
    x = 3 * torch.randn(B, S, D_MODEL, dtype=F64)  # pre-activations of a few units: tanh and erf differ
    expected = ref(x.clone().requires_grad_()).detach()  # gradients on: PyTorch's module-by-module path
    with torch.no_grad():
        out = fast(x)
    torch.testing.assert_close(out, expected)


def test_nested_tensor_input_directly():
    _, fast = make_pair(False, "gelu", batch_first=True)
    fast.eval()
    seqs = [torch.randn(n, D_MODEL, dtype=F64) for n in (S, 5, 9)]
    nested = torch.nested.nested_tensor(seqs)
    with torch.no_grad():
        out = fast(nested)
        assert out.is_nested
        for seq, got in zip(seqs, out.unbind()):
            torch.testing.assert_close(got, fast(seq.unsqueeze(0))[0])


def test_deepcopy_keeps_working():
    _, fast = make_pair(True, "gelu")
    clone = copy.deepcopy(fast)
    x = torch.randn(S, B, D_MODEL, dtype=F64)
    fast.eval(), clone.eval()
    torch.testing.assert_close(clone(x), fast(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_jit_trace(training):
    """torch.jit.trace, which users of PyTorch's layer may deploy with, traces the fused layer too
    (SDPA's GQA flag is a plain bool under tracing; the dropouts are PyTorch's, which the tracer
    records, not the CPU's own sampler with its int32 view). In eval mode the traced layer computes
    what the layer does; in training mode it draws fresh dropout masks at every call."""
    _, fast = make_pair(False, "gelu", dropout=0.3)
    fast.train(training)
    x = torch.randn(S, B, D_MODEL, dtype=F64)
    pad = padding_mask()
    traced = torch.jit.trace(fast, example_kwarg_inputs={"src": x, "src_key_padding_mask": pad},
                             check_trace=False)
    other = torch.randn(S, B, D_MODEL, dtype=F64)
    if training:
        assert not torch.equal(traced(src=other, src_key_padding_mask=pad),
                               traced(src=other, src_key_padding_mask=pad))
    else:
        torch.testing.assert_close(traced(src=other, src_key_padding_mask=pad),
                                   fast(other, src_key_padding_mask=pad))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_optimized_transformer_encoder_passes_bool_padding_to_the_layers(training, monkeypatch):
    """fastformer.optimize turns nn.TransformerEncoder into FastTransformerEncoder: a boolean
    padding mask reaches attention as key_padding_mask (PyTorch's encoder would hand the layers an
    additive float mask); results stay PyTorch's."""
    ref, _ = make_encoders(False, enable_nested_tensor=True)
    for layer in ref.layers:
        layer.dropout.p = layer.dropout1.p = layer.dropout2.p = layer.self_attn.dropout = 0.0
    fast = fastformer.optimize(copy.deepcopy(ref))
    assert type(fast) is fastformer.FastTransformerEncoder
    assert "" in fast.fastformer_report.replaced
    ref.train(training), fast.train(training)
    seen = []
    real = fastformer.functional.attention

    def spy(*args, **kwargs):
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        seen.append((kwargs.get("key_padding_mask") is not None, mask))
        return real(*args, **kwargs)
    monkeypatch.setattr(fastformer.functional, "attention", spy)
    pad = padding_mask()
    x = torch.randn(B, S, D_MODEL, dtype=F64)
    expected = ref(x, src_key_padding_mask=pad)
    out = fast(x, src_key_padding_mask=pad)
    assert seen and all(has_padding and attn_mask is None for has_padding, attn_mask in seen)
    keep = ~pad
    torch.testing.assert_close(out[keep], expected[keep])


def test_layers_run_under_autocast():
    """torch.autocast: bfloat16 sublayer outputs meet the float32 residual stream (promoted, as
    PyTorch's `x + sublayer(x)`); outputs close to PyTorch's layer under the same autocast."""
    ref, fast = make_pair(False, "gelu", batch_first=True, dtype=torch.float32, dropout=0.0)
    x = torch.randn(B, S, D_MODEL)
    pad = padding_mask()
    outputs = []
    for layer in (ref, fast):
        xr = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(xr, src_key_padding_mask=pad)
        out.float().sum().backward()
        outputs.append((out.float(), xr.grad))
    (expected, expected_grad), (out, grad) = outputs
    keep = ~pad
    assert torch.isfinite(grad).all()
    error = (out[keep] - expected[keep]).norm() / expected[keep].norm()
    assert error < 2.5e-2, f"relative error {error:.3g} under bfloat16 autocast"
