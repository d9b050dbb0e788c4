"""FastMultiheadAttention against torch.nn.MultiheadAttention: parity in float64 on the CPU (outputs,
weights, gradients of parameters, inputs and float masks), state_dict both ways, dropout, fully
masked rows, bad shapes, and the single packed QKV GEMM for self-attention."""

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastformer.functional
from fastformer.nn import FastMultiheadAttention
from helpers import ATTENTION_TOL, ZeroFills, assert_rel_close, graph_breaks, kernel_device

E, H, L, S, B = 200, 4, 13, 17, 3
KDIM, VDIM = 72, 56
DT = torch.float64

CONFIGS = {
    "plain": {},
    "batch_first": {"batch_first": True},
    "kdim_vdim": {"kdim": KDIM, "vdim": VDIM},
    "kdim_vdim_bf_nobias": {"kdim": KDIM, "vdim": VDIM, "batch_first": True, "bias": False},
    "no_bias": {"bias": False},
    "bias_kv": {"add_bias_kv": True},
    "zero_attn": {"add_zero_attn": True, "batch_first": True},
    "bias_kv_zero_attn": {"add_bias_kv": True, "add_zero_attn": True},
}
MASKS = ["none", "attn2d_bool", "attn2d_float", "attn3d_bool", "attn3d_float", "kpm_bool", "kpm_float",
         "attn_bool+kpm_bool", "attn_float+kpm_float", "attn_bool+kpm_float", "causal", "causal+kpm_bool"]
WEIGHTS = ["none", "avg", "per_head"]  # need_weights False / True averaged / True per head


def make_pair(**kwargs):
    """An nn.MultiheadAttention and a FastMultiheadAttention with the same (fresh random) weights."""
    ref = nn.MultiheadAttention(E, H, dtype=DT, **kwargs)
    with torch.no_grad():  # biases start at zero: make them random so they are tested too
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.1) if p.dim() == 1 or p.shape[0] == 1 else None
    fast = FastMultiheadAttention(E, H, dtype=DT, **kwargs)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def make_inputs(cfg, mode, batched):
    """(query, key, value) leaves; mode: 'self' (one tensor), 'kv' (key is value), 'cross'."""
    bf = cfg.get("batch_first", False) and batched
    kdim, vdim = cfg.get("kdim", E), cfg.get("vdim", E)

    def seq(length, dim):
        shape = ((B, length, dim) if bf else (length, B, dim)) if batched else (length, dim)
        return torch.randn(shape, dtype=DT, requires_grad=True)

    if mode == "self":
        x = seq(L, E)
        return x, x, x
    if mode == "kv":
        kv = seq(S, kdim)
        return seq(L, E), kv, kv
    return seq(L, E), seq(S, kdim), seq(S, vdim)


def make_masks(kind, batched, len_q, len_k, heads=H):
    """(attn_mask, key_padding_mask, is_causal) in nn.MultiheadAttention's conventions (bool True =
    masked), with no fully masked row: key 0 is never masked."""
    attn_mask = kpm = None
    is_causal = False
    batch = B if batched else 1
    parts = kind.split("+")
    for part in parts:
        if part.startswith("attn"):
            shape = (len_q, len_k) if part.startswith("attn2d") or part == "attn_bool" or part == "attn_float" \
                else (batch * heads, len_q, len_k)
            if not batched and len(shape) == 3:
                shape = (heads, len_q, len_k)
            blocked = torch.rand(shape) < 0.3
            blocked[..., 0] = False
            if part.endswith("bool"):
                attn_mask = blocked
            else:
                attn_mask = torch.randn(shape, dtype=DT).masked_fill(blocked, float("-inf")).requires_grad_()
        elif part.startswith("kpm"):
            shape = (batch, len_k) if batched else (len_k,)
            padded = torch.rand(shape) < 0.3
            padded[..., 0] = False
            kpm = padded if part.endswith("bool") else \
                torch.randn(shape, dtype=DT).masked_fill(padded, float("-inf")).requires_grad_()
        elif part == "causal":
            attn_mask = torch.ones(len_q, len_k, dtype=torch.bool).triu(1)
            is_causal = True
    return attn_mask, kpm, is_causal


def run(module, inputs, masks, need_weights, average, probe, weights_in_loss=True):
    q, k, v = inputs
    attn_mask, kpm, is_causal = masks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mismatched mask dtypes: deprecated in PyTorch, still supported
        out, weights = module(q, k, v, key_padding_mask=kpm, need_weights=need_weights, attn_mask=attn_mask,
                              average_attn_weights=average, is_causal=is_causal)
    loss = (out * probe[0]).sum()
    if weights is not None and weights_in_loss:
        loss = loss + (weights * probe[1][: weights.numel()].view(weights.shape)).sum()
    leaves = [t for t in {id(t): t for t in (q, k, v, attn_mask, kpm) if t is not None}.values()
              if t.requires_grad]
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, leaves + params, allow_unused=True)
    return out, weights, grads


def assert_parity(ref, fast, inputs, masks, need_weights, average, ref_need_weights=None):
    probe_out = torch.randn(1000 * E, dtype=DT)
    out_numel = inputs[0].numel()
    probe = (probe_out[:out_numel].view(inputs[0].shape[:-1] + (E,)), torch.randn(B * H * L * (S + 2), dtype=DT))
    want = run(ref, inputs, masks, need_weights if ref_need_weights is None else ref_need_weights, average, probe,
               weights_in_loss=need_weights)
    got = run(fast, inputs, masks, need_weights, average, probe)
    torch.testing.assert_close(got[0], want[0])
    if need_weights:
        torch.testing.assert_close(got[1], want[1])
    else:
        assert got[1] is None
    names = ["input/mask"] * (len(got[2]) - len(list(fast.parameters()))) + [n for n, _ in fast.named_parameters()]
    for name, g, w in zip(names, got[2], want[2]):
        if w is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, w, msg=lambda m: f"gradient of {name}: {m}")


def _case_ids():
    for (cname, cfg), mask, weights in itertools.product(CONFIGS.items(), MASKS, WEIGHTS):
        separate = "kdim" in cfg
        modes = ("cross",) if separate else ("self", "kv", "cross") if cname in ("plain", "bias_kv") else \
            ("self", "cross")
        for mode in modes:
            yield pytest.param(cfg, mode, mask, weights, id=f"{cname}-{mode}-{mask}-w_{weights}")


@pytest.mark.parametrize("cfg, mode, mask, weights", list(_case_ids()))
def test_parity_batched(cfg, mode, mask, weights):
    ref, fast = make_pair(**cfg)
    inputs = make_inputs(cfg, mode, batched=True)
    len_k = L if mode == "self" else S
    masks = make_masks(mask, True, L, len_k)
    need_weights = weights != "none"
    ref_need_weights = None
    if masks[2] and masks[1] is None and not need_weights and (cfg.get("add_bias_kv") or cfg.get("add_zero_attn")):
        # PyTorch's own paths disagree here: its SDPA path drops the mask and applies a top-left causal
        # mask to the appended keys too, its weights path uses the mask. We use the mask (documented).
        ref_need_weights = True
    assert_parity(ref, fast, inputs, masks, need_weights, weights == "avg", ref_need_weights)


UNBATCHED = ["none", "attn2d_bool", "attn3d_float", "kpm_bool", "kpm_float", "attn_float+kpm_bool", "causal"]


@pytest.mark.parametrize("cname", ["plain", "batch_first", "kdim_vdim", "bias_kv_zero_attn"])
@pytest.mark.parametrize("mask", UNBATCHED)
@pytest.mark.parametrize("weights", WEIGHTS)
def test_parity_unbatched(cname, mask, weights):
    cfg = CONFIGS[cname]
    mode = "cross" if "kdim" in cfg else "self"
    ref, fast = make_pair(**cfg)
    inputs = make_inputs(cfg, mode, batched=False)
    masks = make_masks(mask, False, L, S if mode == "cross" else L)
    need_weights = weights != "none"
    ref_need_weights = True if masks[2] and cfg.get("add_bias_kv") and not need_weights else None  # see above
    assert_parity(ref, fast, inputs, masks, need_weights, weights == "avg", ref_need_weights)


def test_parity_eval_mode_no_grad():
    """Eval mode under no_grad (where PyTorch may take its native fast path)."""
    ref, fast = make_pair(batch_first=True)
    ref.eval(), fast.eval()
    x = torch.randn(B, L, E, dtype=DT)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 5:] = True
    with torch.no_grad():
        want, _ = ref(x, x, x, key_padding_mask=pad, need_weights=False)
        got, _ = fast(x, x, x, key_padding_mask=pad, need_weights=False)
    # PyTorch's fast path may return zeros at padded query positions (nested tensors): compare the rest
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1, :5], want[1, :5])


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_nested_tensor_input_as_pytorch():
    """Ragged batches (nested tensors) on PyTorch's inference fast path: the same outputs, nested
    alike; outside that path, PyTorch's own error."""
    ref, fast = make_pair(batch_first=True)
    ref, fast = ref.float().eval(), fast.float().eval()
    x = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(6, E)])
    with torch.no_grad():
        want, _ = ref(x, x, x, need_weights=False)
        got, _ = fast(x, x, x, need_weights=False)
    assert got.is_nested
    for got_row, want_row in zip(got.unbind(), want.unbind()):
        torch.testing.assert_close(got_row, want_row)
    fast.train()
    with pytest.raises(AssertionError, match="NestedTensor"):
        fast(x, x, x, need_weights=False)


# --------------------------------------------------------------------------------------------
# parameters, initialisation, state_dict
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cname", list(CONFIGS))
def test_state_dict_round_trip_and_init(cname):
    cfg = CONFIGS[cname]
    torch.manual_seed(1234)
    ref = nn.MultiheadAttention(E, H, **cfg)
    torch.manual_seed(1234)
    fast = FastMultiheadAttention(E, H, **cfg)
    assert isinstance(fast, nn.MultiheadAttention)
    assert type(fast.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert list(fast.state_dict()) == list(ref.state_dict())
    for (name, a), b in zip(ref.state_dict().items(), fast.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m: f"init of {name}: {m}")  # same init

    fresh_fast = FastMultiheadAttention(E, H, **cfg)
    fresh_ref = nn.MultiheadAttention(E, H, **cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p))
    fresh_fast.load_state_dict(ref.state_dict(), strict=True)
    fresh_ref.load_state_dict(fresh_fast.state_dict(), strict=True)
    for (name, a), b, c in zip(ref.state_dict().items(), fresh_fast.state_dict().values(),
                               fresh_ref.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_constructor_signature_matches():
    import inspect
    assert inspect.signature(FastMultiheadAttention.__init__) == inspect.signature(nn.MultiheadAttention.__init__)
    assert list(inspect.signature(FastMultiheadAttention.forward).parameters) == \
        list(inspect.signature(nn.MultiheadAttention.forward).parameters)
    for name, p in inspect.signature(nn.MultiheadAttention.forward).parameters.items():
        assert inspect.signature(FastMultiheadAttention.forward).parameters[name].default == p.default, name


# --------------------------------------------------------------------------------------------
# the fused op computes the output; the QKV projection is one GEMM with strided views
# --------------------------------------------------------------------------------------------
def _count_linear(monkeypatch):
    calls = []
    real = F.linear

    def counting(x, weight, bias=None):
        calls.append(weight)
        return real(x, weight, bias)

    monkeypatch.setattr(F, "linear", counting)
    return calls


def _capture_attention(monkeypatch, factor=1.0):
    captured = []
    real = fastformer.functional.attention

    def wrapped(q, k, v, *args, **kwargs):
        captured.append((q, k, v, args, kwargs))
        return real(q, k, v, *args, **kwargs) * factor

    monkeypatch.setattr(fastformer.functional, "attention", wrapped)
    return captured


@pytest.mark.parametrize("batch_first", [False, True])
def test_self_attention_is_one_qkv_gemm_with_views(monkeypatch, batch_first):
    _, fast = make_pair(batch_first=batch_first)
    x = torch.randn((B, L, E) if batch_first else (L, B, E), dtype=DT)
    calls = _count_linear(monkeypatch)
    captured = _capture_attention(monkeypatch)
    fast(x, x, x, need_weights=False)
    assert len(calls) == 2, "one QKV GEMM + the output projection"
    assert calls[0] is fast.in_proj_weight and calls[1] is fast.out_proj.weight
    (q, k, v, _, _), = captured
    assert q.shape == k.shape == v.shape == (B, H, L, E // H)
    base = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == base and v.untyped_storage().data_ptr() == base, "not views"
    item = q.element_size()
    assert (k.data_ptr() - q.data_ptr()) == E * item and (v.data_ptr() - q.data_ptr()) == 2 * E * item


def test_cross_attention_gemm_counts(monkeypatch):
    _, fast = make_pair()
    q, kv, v = torch.randn(L, B, E, dtype=DT), torch.randn(S, B, E, dtype=DT), torch.randn(S, B, E, dtype=DT)
    calls = _count_linear(monkeypatch)
    fast(q, kv, kv, need_weights=False)
    assert len(calls) == 3, "key is value: q GEMM + one kv GEMM + out_proj"
    calls.clear()
    fast(q, kv, v, need_weights=False)
    assert len(calls) == 4


@pytest.mark.parametrize("inputs", ["self", "key_is_value", "separate"])
def test_a_training_step_fills_no_zeros(inputs, monkeypatch):
    """The gradients of the packed projections (QKV for self-attention, KV when key is value) and
    of the packed in_proj weight and bias are assembled by one op each (the backward of unbind or
    split), never from zero-filled gradients of the whole packed tensor (the backward of select
    or of slicing: one memset and one add per part on a GPU)."""
    from fastformer import library

    monkeypatch.setattr(library, "NATIVE_AUTOGRAD", False)  # the autograd.Function kernel backends use
    _, fast = make_pair()
    query = torch.randn(L, B, E, dtype=DT, requires_grad=True)
    key, value = (torch.randn(S, B, E, dtype=DT, requires_grad=True) for _ in range(2))
    key, value = {"self": (query, query), "key_is_value": (key, key), "separate": (key, value)}[inputs]
    with ZeroFills() as zero_fills:
        out, _ = fast(query, key, value, need_weights=False)
        out.square().sum().backward()
    assert zero_fills.fills == []
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())


def test_output_comes_from_fused_op(monkeypatch):
    ref, fast = make_pair()
    fast.out_proj.bias.data.zero_()
    x = torch.randn(L, B, E, dtype=DT)
    plain, _ = fast(x, x, x, need_weights=True)
    captured = _capture_attention(monkeypatch, factor=2.0)
    doubled, _ = fast(x, x, x, need_weights=True)
    assert len(captured) == 1
    torch.testing.assert_close(doubled, 2 * plain)


def test_bool_attn_mask_polarity_is_inverted(monkeypatch):
    _, fast = make_pair()
    x = torch.randn(L, B, E, dtype=DT)
    blocked = torch.rand(L, L) < 0.3
    captured = _capture_attention(monkeypatch)
    fast(x, x, x, attn_mask=blocked, need_weights=False)
    mask = captured[0][4]["attn_mask"]
    assert mask.dtype == torch.bool and torch.equal(mask.reshape(L, L), ~blocked)


# --------------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------------
def test_dropout_train_vs_eval(monkeypatch):
    ref, fast = make_pair()
    ref.dropout = fast.dropout = 0.5
    x = torch.randn(L, B, E, dtype=DT)
    captured = _capture_attention(monkeypatch)
    fast.train()
    a, _ = fast(x, x, x, need_weights=False)
    b, _ = fast(x, x, x, need_weights=False)
    assert torch.isfinite(a).all() and not torch.allclose(a, b)
    assert captured[0][4]["dropout_p"] == 0.5
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in fast.parameters())
    fast.eval(), ref.eval()
    c, _ = fast(x, x, x, need_weights=False)
    assert captured[-1][4]["dropout_p"] == 0.0
    torch.testing.assert_close(c, ref(x, x, x, need_weights=False)[0])


def test_dropout_changes_output_statistically_like_pytorch():
    """Train-mode dropout: the mean over many draws tends to the eval output (unbiased dropout)."""
    _, fast = make_pair(dropout=0.3)
    x = torch.randn(L, 1, E, dtype=DT)
    fast.train()
    with torch.no_grad():
        mean = sum(fast(x, x, x, need_weights=False)[0] for _ in range(200)) / 200
        fast.eval()
        exact = fast(x, x, x, need_weights=False)[0]
    assert (mean - exact).norm() / exact.norm() < 0.15


# --------------------------------------------------------------------------------------------
# fully masked rows: 0 and finite gradients, where PyTorch gives NaN
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("float_masks", [False, True])
def test_fully_masked_rows(need_weights, float_masks):
    ref, fast = make_pair()
    q, k, v = (torch.randn(L, B, E, dtype=DT, requires_grad=True),
               torch.randn(S, B, E, dtype=DT, requires_grad=True),
               torch.randn(S, B, E, dtype=DT, requires_grad=True))
    blocked = torch.zeros(L, S, dtype=torch.bool)
    blocked[3] = True  # query 3 sees nothing, in every batch item
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1] = True  # batch item 1 sees nothing
    if float_masks:
        attn_mask = torch.zeros(L, S, dtype=DT).masked_fill(blocked, float("-inf"))
        kpm = torch.zeros(B, S, dtype=DT).masked_fill(pad, float("-inf"))
    else:
        attn_mask, kpm = blocked, pad
    dead = torch.zeros(L, B, dtype=torch.bool)
    dead[3] = True
    dead[:, 1] = True
    out, weights = fast(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights,
                        average_attn_weights=False)
    with torch.no_grad():
        want, _ = ref(q, k, v, attn_mask=attn_mask, key_padding_mask=kpm, need_weights=need_weights,
                      average_attn_weights=False)
    if need_weights:  # PyTorch's explicit path: NaN (its SDPA path, need_weights=False, gives 0 here)
        assert torch.isnan(want[dead]).all(), "PyTorch gives NaN here (if it stops, update the docstring)"
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[dead], fast.out_proj.bias.expand(int(dead.sum()), E))
    torch.testing.assert_close(out[~dead], want[~dead])
    if need_weights:
        dead_bhl = dead.T[:, None, :].expand(B, H, L)
        assert (weights[dead_bhl] == 0).all()
        torch.testing.assert_close(weights.sum(-1)[~dead_bhl], torch.ones_like(weights.sum(-1)[~dead_bhl]))
    loss = out.sum() + (0.0 if weights is None else weights.square().sum())
    loss.backward()
    for t in (q, k, v, *fast.parameters()):
        assert torch.isfinite(t.grad).all()
    assert (q.grad[dead] == 0).all(), "dead query rows get zero gradient"


# --------------------------------------------------------------------------------------------
# bad shapes: same exception type as PyTorch, message naming the argument
# --------------------------------------------------------------------------------------------
def _bad_cases():
    q, kv = torch.randn(L, B, E, dtype=DT), torch.randn(S, B, E, dtype=DT)
    u = torch.randn(L, E, dtype=DT)
    return {
        "query_4d": ({}, (q[None], kv[None], kv[None]), {}, "query"),
        "query_embed_dim": ({}, (q[..., :-1], kv, kv), {}, "query"),
        "key_2d": ({}, (q, kv[0], kv), {}, "key"),
        "key_value_shapes": ({}, (q, kv, kv[:-1]), {}, "key"),
        "key_kdim": ({"kdim": KDIM, "vdim": VDIM}, (q, torch.randn(S, B, KDIM + 1, dtype=DT),
                                                     torch.randn(S, B, VDIM, dtype=DT)), {}, "key"),
        "value_vdim": ({"kdim": KDIM, "vdim": VDIM}, (q, torch.randn(S, B, KDIM, dtype=DT),
                                                       torch.randn(S, B, VDIM + 1, dtype=DT)), {}, "value"),
        "key_batch": ({}, (q, kv[:, :-1], kv[:, :-1]), {}, "batch"),
        "kpm_shape": ({}, (q, kv, kv), {"key_padding_mask": torch.zeros(B, S + 1, dtype=torch.bool)},
                      "key_padding_mask"),
        "kpm_3d": ({}, (q, kv, kv), {"key_padding_mask": torch.zeros(B, 1, S, dtype=torch.bool)},
                   "key_padding_mask"),
        "kpm_int": ({}, (q, kv, kv), {"key_padding_mask": torch.zeros(B, S, dtype=torch.int64)},
                    "key_padding_mask"),
        "attn_2d_shape": ({}, (q, kv, kv), {"attn_mask": torch.zeros(L, S + 1, dtype=torch.bool)}, "attn_mask"),
        "attn_3d_shape": ({}, (q, kv, kv), {"attn_mask": torch.zeros(B, L, S, dtype=torch.bool)}, "attn_mask"),
        "attn_4d": ({}, (q, kv, kv), {"attn_mask": torch.zeros(1, 1, L, S, dtype=torch.bool)}, "attn_mask"),
        "attn_int": ({}, (q, kv, kv), {"attn_mask": torch.zeros(L, S, dtype=torch.int32)}, "attn_mask"),
        "causal_without_mask": ({}, (q, kv, kv), {"is_causal": True}, "attn_mask"),
        "unbatched_attn_3d": ({}, (u, u, u), {"attn_mask": torch.zeros(H + 1, L, L, dtype=torch.bool)},
                              "attn_mask"),
        "unbatched_kpm_2d": ({}, (u, u, u), {"key_padding_mask": torch.zeros(1, L, dtype=torch.bool)},
                             "key_padding_mask"),
    }


@pytest.mark.parametrize("case", list(_bad_cases()))
def test_bad_shapes_raise_like_pytorch(case):
    cfg, args, kwargs, name = _bad_cases()[case]
    ref, fast = make_pair(**cfg)
    with pytest.raises(Exception) as want:
        ref(*args, **kwargs)
    with pytest.raises(Exception) as got:
        fast(*args, **kwargs)
    assert got.type is want.type, f"PyTorch raises {want.type.__name__}: {want.value}; we raise {got.value!r}"
    assert name in str(got.value)


def test_mismatched_mask_dtypes_warn_like_pytorch():
    ref, fast = make_pair()
    x = torch.randn(L, B, E, dtype=DT)
    kwargs = {"attn_mask": torch.zeros(L, L, dtype=torch.bool), "key_padding_mask": torch.zeros(B, L, dtype=DT)}
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        ref(x, x, x, **kwargs)
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        fast(x, x, x, **kwargs)
    # Compiled, the warning is left out: its call would break the graph (at every layer).
    assert graph_breaks(fast, x, x, x, **kwargs) == {}


# (config, inputs, mask): self- and cross-attention, the layouts, padding, causal, a float mask
# (whose gradient the kernels compute), appended bias_k / zero keys.
HALF_CASES = [("plain", "self", "kpm_bool"), ("batch_first", "self", "causal+kpm_bool"),
              ("kdim_vdim", "cross", "attn2d_float"), ("bias_kv_zero_attn", "self", "kpm_bool"),
              ("plain", "kv", "none")]


def _copies(tensors, device, dtype):
    """``tensors`` (None kept) on ``device``, floating ones in ``dtype``, as new leaves; a tensor
    passed more than once (self-attention's query, key and value) stays one tensor."""
    copies = {}

    def copy_of(t):
        if t is None:
            return None
        if id(t) not in copies:
            moved = t.detach().to(device, dtype if t.is_floating_point() else t.dtype)
            copies[id(t)] = moved.requires_grad_(t.requires_grad)
        return copies[id(t)]

    return tuple(copy_of(t) for t in tensors)


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("cname, mode, mask", HALF_CASES, ids=["-".join(case) for case in HALF_CASES])
def test_parity_in_bfloat16_on_each_backend(cname, mode, mask, backend):
    """In bfloat16, as models train, on each backend's device (the GPU for the kernels; Triton's
    interpreter without one; tests/test_cuda_emulated.py runs the CUDA kernels' case on the CPU)."""
    check_parity_in_bfloat16(cname, mode, mask, backend, kernel_device(backend))


def check_parity_in_bfloat16(cname, mode, mask, backend, device):
    """The output and the gradients of inputs, float masks and parameters against
    nn.MultiheadAttention in float64, within DESIGN.md's attention tolerances and at most
    BASELINE_MULTIPLE times the error of nn.MultiheadAttention itself in bfloat16 (whose
    projections round as ours do)."""
    cfg = CONFIGS[cname]
    ref, fast = make_pair(**cfg)
    fast = fast.to(device, torch.bfloat16)
    fast.fastformer_backend = backend
    ref = ref.to(device)
    plain = copy.deepcopy(ref).to(torch.bfloat16)
    inputs = make_inputs(cfg, mode, batched=True)
    masks = make_masks(mask, True, L, L if mode == "self" else S)
    probe = torch.randn(inputs[0].shape[:-1] + (E,), dtype=torch.bfloat16).double()  # d loss / d out
    results = {}
    for name, module in (("float64", ref), ("fast", fast), ("plain", plain)):
        dtype = DT if name == "float64" else torch.bfloat16
        *these_inputs, attn_mask, kpm = _copies((*inputs, *masks[:2]), device, dtype)
        results[name] = run(module, these_inputs, (attn_mask, kpm, masks[2]), False, False,
                            (probe.to(device, dtype),))
    want, got, baseline = results["float64"], results["fast"], results["plain"]
    forward_tol, grad_tol = ATTENTION_TOL[torch.bfloat16]
    assert_rel_close(got[0], want[0], forward_tol, "out", baseline=baseline[0])
    names = ["input/mask"] * (len(got[2]) - len(list(fast.parameters()))) + [n for n, _ in fast.named_parameters()]
    for name, g, w, b in zip(names, got[2], want[2], baseline[2]):
        assert g is not None and g.dtype == torch.bfloat16, name
        assert_rel_close(g, w, grad_tol, f"gradient of {name}", baseline=b)
