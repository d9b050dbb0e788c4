"""Input validation of the public ops.

Every bad input must raise a ValueError or TypeError (never a RuntimeError from deep inside a
kernel) whose message names the argument and, where it helps, the shapes / dtypes / devices seen.
Valid edge inputs must not raise. Mismatched devices are made with the "meta" device, so these
tests run on a CPU-only machine.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

import fastformer

B, HQ, HK, LQ, LK, D = 2, 4, 2, 5, 7, 8  # Lq != Lk and Hq != Hk so that shapes in messages are distinct
N = 8  # hidden size of the norms / bias_gelu


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    # Validation must not depend on a backend forced by the environment of the test run.
    monkeypatch.delenv("FASTFORMER_BACKEND", raising=False)


def randn(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def esc(text: str) -> str:
    return re.escape(text)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def _attention_inputs():
    return {"query": randn(B, HQ, LQ, D), "key": randn(B, HK, LK, D), "value": randn(B, HK, LK, D)}


def call_attention(**overrides):
    kwargs = _attention_inputs()
    kwargs.update(overrides)
    query, key, value = kwargs.pop("query"), kwargs.pop("key"), kwargs.pop("value")
    return fastformer.attention(query, key, value, **kwargs)


Q_SHAPE, K_SHAPE = f"({B}, {HQ}, {LQ}, {D})", f"({B}, {HK}, {LK}, {D})"
TARGET = f"(B, Hq, Lq, Lk) = ({B}, {HQ}, {LQ}, {LK})"

ATTENTION_ERRORS = [
    # (id, overrides, error type, regex the message must match)
    ("query-3d", dict(query=randn(B, LQ, D)), ValueError, r"query must be 4-D.*" + esc(f"({B}, {LQ}, {D})")),
    ("key-5d", dict(key=randn(1, B, HK, LK, D)), ValueError,
     r"key must be 4-D.*" + esc(f"(1, {B}, {HK}, {LK}, {D})")),
    ("value-2d", dict(value=randn(LK, D)), ValueError, r"value must be 4-D.*" + esc(f"({LK}, {D})")),
    ("query-list", dict(query=[[1.0]]), TypeError, r"query must be a torch\.Tensor, got list"),
    ("key-float", dict(key=3.0), TypeError, r"key must be a torch\.Tensor, got float"),
    ("value-none", dict(value=None), TypeError, r"value must be a torch\.Tensor, got NoneType"),
    ("query-int", dict(query=torch.zeros(B, HQ, LQ, D, dtype=torch.int64)), TypeError,
     r"query must be a floating-point tensor.*torch\.int64"),
    ("key-int32", dict(key=torch.zeros(B, HK, LK, D, dtype=torch.int32)), TypeError,
     r"key must be a floating-point tensor.*torch\.int32"),
    ("value-bool", dict(value=torch.zeros(B, HK, LK, D, dtype=torch.bool)), TypeError,
     r"value must be a floating-point tensor.*torch\.bool"),
    ("key-dtype", dict(key=randn(B, HK, LK, D, dtype=torch.float64)), TypeError,
     r"key has dtype torch\.float64 but query has dtype torch\.float32"),
    ("value-dtype", dict(value=randn(B, HK, LK, D, dtype=torch.bfloat16)), TypeError,
     r"value has dtype torch\.bfloat16 but query has dtype torch\.float32"),
    ("key-device", dict(key=randn(B, HK, LK, D, device="meta")), ValueError, r"key is on meta but query is on cpu"),
    ("value-device", dict(value=randn(B, HK, LK, D, device="meta")), ValueError,
     r"value is on meta but query is on cpu"),
    ("batch", dict(key=randn(B + 1, HK, LK, D)), ValueError,
     r"batch sizes differ.*" + esc(f"query {Q_SHAPE}, key ({B + 1}, {HK}, {LK}, {D})")),
    ("value-batch", dict(value=randn(B + 1, HK, LK, D)), ValueError,
     r"batch sizes differ.*" + esc(f"value ({B + 1}, {HK}, {LK}, {D})")),
    ("kv-heads", dict(value=randn(B, HK + 1, LK, D)), ValueError,
     r"key and value must have the same number of heads.*" + esc(f"key {K_SHAPE}, value ({B}, {HK + 1}, {LK}, {D})")),
    ("kv-length", dict(value=randn(B, HK, LK + 1, D)), ValueError,
     r"key and value must have the same sequence length.*" + esc(f"value ({B}, {HK}, {LK + 1}, {D})")),
    ("qk-head-dim", dict(key=randn(B, HK, LK, D + 2)), ValueError,
     r"query and key must have the same head dim.*" + esc(f"query {Q_SHAPE}, key ({B}, {HK}, {LK}, {D + 2})")),
    ("gqa-not-multiple", dict(key=randn(B, 3, LK, D), value=randn(B, 3, LK, D)), ValueError,
     rf"Hq={HQ}\).*multiple.*Hk=3\)"),
    ("gqa-more-kv-heads", dict(key=randn(B, 2 * HQ, LK, D), value=randn(B, 2 * HQ, LK, D)), ValueError,
     rf"Hq={HQ}\).*Hk={2 * HQ}\)"),
    ("gqa-no-kv-heads", dict(key=randn(B, 0, LK, D), value=randn(B, 0, LK, D)), ValueError,
     rf"Hq={HQ}\).*multiple.*Hk=0\)"),
    # attn_mask
    ("mask-transposed", dict(attn_mask=torch.ones(LK, LQ, dtype=torch.bool)), ValueError,
     r"attn_mask of shape " + esc(f"({LK}, {LQ})") + r" is not broadcastable to " + esc(TARGET)),
    ("mask-wrong-batch", dict(attn_mask=torch.zeros(B + 1, 1, LQ, LK)), ValueError,
     r"attn_mask of shape " + esc(f"({B + 1}, 1, {LQ}, {LK})") + r" is not broadcastable"),
    ("mask-5d", dict(attn_mask=torch.ones(1, B, HQ, LQ, LK, dtype=torch.bool)), ValueError,
     r"attn_mask of shape " + esc(f"(1, {B}, {HQ}, {LQ}, {LK})") + r" is not broadcastable"),
    ("mask-0d", dict(attn_mask=torch.tensor(True)), ValueError, r"attn_mask of shape \(\) is not broadcastable"),
    ("mask-int", dict(attn_mask=torch.ones(LQ, LK, dtype=torch.int64)), TypeError,
     r"attn_mask must be bool.*torch\.int64"),
    ("mask-uint8", dict(attn_mask=torch.ones(LQ, LK, dtype=torch.uint8)), TypeError,
     r"attn_mask must be bool.*torch\.uint8"),
    ("mask-list", dict(attn_mask=[[True]]), TypeError, r"attn_mask must be a torch\.Tensor or None, got list"),
    ("mask-device", dict(attn_mask=torch.ones(LQ, LK, dtype=torch.bool, device="meta")), ValueError,
     r"attn_mask is on meta but query is on cpu"),
    # key_padding_mask
    ("kpm-float", dict(key_padding_mask=torch.zeros(B, LK)), TypeError,
     r"key_padding_mask must be a bool tensor.*torch\.float32"),
    ("kpm-int", dict(key_padding_mask=torch.zeros(B, LK, dtype=torch.int64)), TypeError,
     r"key_padding_mask must be a bool tensor.*torch\.int64"),
    ("kpm-shape-lq", dict(key_padding_mask=torch.zeros(B, LQ, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(B, Lk\) = " + esc(f"({B}, {LK}), got ({B}, {LQ})")),
    ("kpm-shape-3d", dict(key_padding_mask=torch.zeros(B, 1, LK, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(B, Lk\).*" + esc(f"got ({B}, 1, {LK})")),
    ("kpm-list", dict(key_padding_mask=[[False]]), TypeError, r"key_padding_mask must be a torch\.Tensor"),
    ("kpm-device", dict(key_padding_mask=torch.zeros(B, LK, dtype=torch.bool, device="meta")), ValueError,
     r"key_padding_mask is on meta but query is on cpu"),
    # dropout_p
    ("dropout-negative", dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\], got -0\.1"),
    ("dropout-above-one", dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\], got 1\.5"),
    ("dropout-int-two", dict(dropout_p=2), ValueError, r"dropout_p must be in \[0, 1\], got 2"),
    ("dropout-nan", dict(dropout_p=float("nan")), ValueError, r"dropout_p must be in \[0, 1\], got nan"),
    ("dropout-str", dict(dropout_p="0.1"), TypeError, r"dropout_p must be a float.*str"),
    ("dropout-bool", dict(dropout_p=True), TypeError, r"dropout_p must be a float.*bool"),
    ("dropout-none", dict(dropout_p=None), TypeError, r"dropout_p must be a float.*NoneType"),
    # is_causal
    ("causal-int", dict(is_causal=1), TypeError, r"is_causal must be a bool, got int"),
    ("causal-str", dict(is_causal="True"), TypeError, r"is_causal must be a bool, got str"),
    ("causal-none", dict(is_causal=None), TypeError, r"is_causal must be a bool, got NoneType"),
    # scale
    ("scale-nan", dict(scale=float("nan")), ValueError, r"scale must be a finite float, got nan"),
    ("scale-inf", dict(scale=float("inf")), ValueError, r"scale must be a finite float, got inf"),
    ("scale-neg-inf", dict(scale=float("-inf")), ValueError, r"scale must be a finite float, got -inf"),
    ("scale-str", dict(scale="a"), TypeError, r"scale must be a float or None, got str"),
    ("scale-huge-int", dict(scale=10**5000), ValueError, r"scale must be a finite float, got an int of 16610 bits"),
    # backend
    ("backend-unknown", dict(backend="nope"), ValueError, r"backend must be one of.*'nope'"),
    ("backend-empty", dict(backend=""), ValueError, r"backend must be one of.*''"),
    ("backend-list", dict(backend=["torch"]), ValueError, r"backend must be one of.*\['torch'\]"),
]


@pytest.mark.parametrize("overrides, error, match",
                         [pytest.param(o, e, m, id=i) for i, o, e, m in ATTENTION_ERRORS])
def test_attention_rejects(overrides, error, match):
    with pytest.raises(error, match=match) as info:
        call_attention(**overrides)
    assert type(info.value) in (ValueError, TypeError)  # not a subclass from deeper down
    assert str(info.value).split(":")[0].endswith("attention")  # names the op


@pytest.mark.parametrize("overrides, error, match",
                         [pytest.param(o, e, m, id=i) for i, o, e, m in ATTENTION_ERRORS
                          if not i.startswith("backend")])
def test_explain_validates_like_the_op(overrides, error, match):
    """explain() shares the op's checks, so it rejects the same inputs with the same error."""
    kwargs = _attention_inputs()
    kwargs.update(overrides)
    with pytest.raises(error, match=match):
        fastformer.explain(fastformer.attention, kwargs.pop("query"), kwargs.pop("key"),
                           kwargs.pop("value"), **kwargs)


# ----------------------------------------------------------------------------------------------
# residual_layer_norm / residual_rms_norm
# ----------------------------------------------------------------------------------------------
def _layer_norm(x, residual=None, weight=None, bias=None, **kwargs):
    return fastformer.residual_layer_norm(x, residual, weight, bias, **kwargs)


def _rms_norm(x, residual=None, weight=None, **kwargs):
    return fastformer.residual_rms_norm(x, residual, weight, **kwargs)


NORMS = {"residual_layer_norm": _layer_norm, "residual_rms_norm": _rms_norm}
X_SHAPE = (3, 5, N)

NORM_ERRORS = [
    ("x-list", dict(x=[1.0, 2.0]), TypeError, r"x must be a torch\.Tensor, got list"),
    ("x-none", dict(x=None), TypeError, r"x must be a torch\.Tensor, got NoneType"),
    ("x-int", dict(x=torch.zeros(X_SHAPE, dtype=torch.int64)), TypeError,
     r"x must be a floating-point tensor.*torch\.int64"),
    ("x-0d", dict(x=torch.tensor(1.0)), ValueError, r"x must have at least 1 dim.*\(\)"),
    ("x-last-dim-0", dict(x=randn(3, 0)), ValueError, r"last dim of x.*>= 1.*\(3, 0\)"),
    ("residual-shape", dict(residual=randn(3, 5, N + 1)), ValueError,
     r"residual must have the shape of x " + esc(f"(3, 5, {N}), got (3, 5, {N + 1})")),
    ("residual-transposed", dict(residual=randn(5, 3, N)), ValueError,
     r"residual must have the shape of x " + esc(f"(3, 5, {N}), got (5, 3, {N})")),
    ("residual-int", dict(residual=torch.zeros(X_SHAPE, dtype=torch.int32)), TypeError,
     r"residual must be a floating-point tensor.*torch\.int32"),
    ("residual-list", dict(residual=[1.0]), TypeError, r"residual must be a torch\.Tensor, got list"),
    ("residual-device", dict(residual=randn(*X_SHAPE, device="meta")), ValueError,
     r"residual is on meta but x is on cpu"),
    ("weight-size", dict(weight=randn(N + 1)), ValueError,
     r"weight must have shape " + esc(f"({N},)") + r".*got shape " + rf"\({N + 1},?\)"),
    ("weight-2d", dict(weight=randn(1, N)), ValueError,
     r"weight must have shape " + esc(f"({N},)") + r".*got shape " + esc(f"(1, {N})")),
    ("weight-0d", dict(weight=torch.tensor(1.0)), ValueError, r"weight must have shape .*got shape \(\)"),
    ("weight-int", dict(weight=torch.ones(N, dtype=torch.int64)), TypeError,
     r"weight must be a floating-point tensor.*torch\.int64"),
    ("weight-float16", dict(weight=randn(N, dtype=torch.float16)), TypeError,
     r"weight must have the dtype of x \(torch\.float32\) or float32, got torch\.float16"),
    ("weight-float64", dict(weight=randn(N, dtype=torch.float64)), TypeError,
     r"weight must have the dtype of x \(torch\.float32\) or float32, got torch\.float64"),
    ("weight-list", dict(weight=[1.0] * N), TypeError, r"weight must be a torch\.Tensor, got list"),
    ("weight-device", dict(weight=randn(N, device="meta")), ValueError, r"weight is on meta but x is on cpu"),
    ("eps-negative", dict(eps=-1e-5), ValueError, r"eps must be a non-negative finite float, got -1e-05"),
    ("eps-negative-zero-int", dict(eps=-1), ValueError, r"eps must be a non-negative finite float, got -1"),
    ("eps-nan", dict(eps=float("nan")), ValueError, r"eps must be a non-negative finite float, got nan"),
    ("eps-inf", dict(eps=float("inf")), ValueError, r"eps must be a non-negative finite float, got inf"),
    ("eps-huge-int", dict(eps=10**400), ValueError,
     r"eps must be a non-negative finite float, got an int of 1329 bits"),
    ("eps-str", dict(eps="1e-5"), TypeError, r"eps must be a non-negative float, got str"),
    ("eps-none", dict(eps=None), TypeError, r"eps must be a non-negative float, got NoneType"),
    ("dropout-negative", dict(dropout_p=-0.5), ValueError, r"dropout_p must be in \[0, 1\], got -0\.5"),
    ("dropout-above-one", dict(dropout_p=2), ValueError, r"dropout_p must be in \[0, 1\], got 2"),
    ("dropout-nan", dict(dropout_p=float("nan")), ValueError, r"dropout_p must be in \[0, 1\], got nan"),
    ("dropout-str", dict(dropout_p="0"), TypeError, r"dropout_p must be a float.*str"),
    ("dropout-bool", dict(dropout_p=False), TypeError, r"dropout_p must be a float.*bool"),
    ("backend-unknown", dict(backend="nope"), ValueError, r"backend must be one of.*'nope'"),
]

BIAS_ERRORS = [  # residual_layer_norm only (rms norm has no bias)
    ("bias-size", dict(bias=randn(N - 1)), ValueError,
     r"bias must have shape " + esc(f"({N},)") + r".*got shape " + rf"\({N - 1},?\)"),
    ("bias-2d", dict(bias=randn(N, 1)), ValueError, r"bias must have shape .*got shape " + esc(f"({N}, 1)")),
    ("bias-int", dict(bias=torch.zeros(N, dtype=torch.int64)), TypeError,
     r"bias must be a floating-point tensor.*torch\.int64"),
    ("bias-float16", dict(bias=randn(N, dtype=torch.float16)), TypeError,
     r"bias must have the dtype of x \(torch\.float32\) or float32, got torch\.float16"),
    ("bias-device", dict(bias=randn(N, device="meta")), ValueError, r"bias is on meta but x is on cpu"),
]


def _norm_cases():
    for op in NORMS:
        for case_id, overrides, error, match in NORM_ERRORS:
            yield pytest.param(op, overrides, error, match, id=f"{op}-{case_id}")
    for case_id, overrides, error, match in BIAS_ERRORS:
        yield pytest.param("residual_layer_norm", overrides, error, match, id=f"residual_layer_norm-{case_id}")


@pytest.mark.parametrize("op, overrides, error, match", list(_norm_cases()))
def test_norms_reject(op, overrides, error, match):
    kwargs = {"x": randn(*X_SHAPE), "residual": randn(*X_SHAPE), "weight": randn(N)}
    if op == "residual_layer_norm":
        kwargs["bias"] = randn(N)
    kwargs.update(overrides)
    with pytest.raises(error, match=match) as info:
        NORMS[op](**kwargs)
    assert type(info.value) in (ValueError, TypeError)
    if "backend" not in overrides:
        assert str(info.value).startswith(op)


def test_norm_weight_dtype_is_checked_against_low_precision_x():
    """Only x's dtype or float32: float16 weight with bfloat16 x is refused, and vice versa."""
    x = randn(*X_SHAPE, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"weight must have the dtype of x \(torch\.bfloat16\) or float32, "
                                        r"got torch\.float16"):
        fastformer.residual_layer_norm(x, None, randn(N, dtype=torch.float16), None)
    with pytest.raises(TypeError, match=r"bias must have the dtype of x \(torch\.bfloat16\) or float32"):
        fastformer.residual_layer_norm(x, None, None, randn(N, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# bias_gelu
# ----------------------------------------------------------------------------------------------
GELU_ERRORS = [
    ("x-int", dict(x=torch.zeros(3, N, dtype=torch.int64)), TypeError,
     r"x must be a floating-point tensor.*torch\.int64"),
    ("x-list", dict(x=[1.0]), TypeError, r"x must be a torch\.Tensor, got list"),
    ("x-0d", dict(x=torch.tensor(1.0)), ValueError, r"x must have at least 1 dim"),
    ("x-last-dim-0", dict(x=randn(3, 0), bias=None), ValueError, r"last dim of x.*\(3, 0\)"),
    ("bias-size", dict(bias=randn(N + 3)), ValueError,
     r"bias must have shape " + esc(f"({N},)") + r".*got shape " + rf"\({N + 3},?\)"),
    ("bias-2d", dict(bias=randn(3, N)), ValueError, r"bias must have shape .*got shape " + esc(f"(3, {N})")),
    ("bias-int", dict(bias=torch.zeros(N, dtype=torch.int64)), TypeError,
     r"bias must be a floating-point tensor.*torch\.int64"),
    ("bias-float16", dict(bias=randn(N, dtype=torch.float16)), TypeError,
     r"bias must have the dtype of x \(torch\.float32\) or float32, got torch\.float16"),
    ("bias-device", dict(bias=randn(N, device="meta")), ValueError, r"bias is on meta but x is on cpu"),
    ("approximate-unknown", dict(approximate="exact"), ValueError,
     r"approximate must be 'none' or 'tanh', got 'exact'"),
    ("approximate-case", dict(approximate="Tanh"), ValueError, r"approximate must be 'none' or 'tanh', got 'Tanh'"),
    ("approximate-none-object", dict(approximate=None), TypeError, r"approximate must be .*got NoneType"),
    ("approximate-bool", dict(approximate=True), TypeError, r"approximate must be .*got bool"),
    ("dropout-above-one", dict(dropout_p=1.01), ValueError, r"dropout_p must be in \[0, 1\], got 1.01"),
    ("dropout-negative", dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\], got -0.1"),
    ("dropout-str", dict(dropout_p="0.1"), TypeError, r"dropout_p must be a float in \[0, 1\], got str"),
    ("backend-unknown", dict(backend="nope"), ValueError, r"backend must be one of.*'nope'"),
]


@pytest.mark.parametrize("overrides, error, match", [pytest.param(o, e, m, id=i) for i, o, e, m in GELU_ERRORS])
def test_bias_gelu_rejects(overrides, error, match):
    kwargs = {"x": randn(3, N), "bias": randn(N)}
    kwargs.update(overrides)
    with pytest.raises(error, match=match) as info:
        fastformer.bias_gelu(kwargs.pop("x"), **kwargs)
    assert type(info.value) in (ValueError, TypeError)
    if "backend" not in overrides:
        assert str(info.value).startswith("bias_gelu")


# ----------------------------------------------------------------------------------------------
# valid edge inputs must not raise (and give the reference result)
# ----------------------------------------------------------------------------------------------
MASK_SHAPES = [(LK,), (LQ, LK), (1, LQ, LK), (B, 1, 1, LK), (B, HQ, LQ, LK), (1, 1, LQ, 1), (HQ, 1, LK)]


def _sdpa(query, key, value, attn_mask=None, **kwargs):
    """SDPA on repeated key/value heads (GQA), the mask viewed as 4-D (SDPA refuses 1-D masks)."""
    rep = query.shape[1] // key.shape[1]
    if attn_mask is not None:
        attn_mask = attn_mask.view((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    key, value = key.repeat_interleave(rep, dim=1), value.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_attention_accepts_broadcastable_masks(shape, mask_dtype):
    inputs = _attention_inputs()
    if mask_dtype == torch.bool:
        mask = torch.rand(shape) > 0.3
        mask[..., 0] = True  # every query row keeps a key: same result as SDPA
    else:
        mask = torch.randn(shape)
    out = fastformer.attention(**inputs, attn_mask=mask)
    assert out.shape == (B, HQ, LQ, D)
    torch.testing.assert_close(out, _sdpa(**inputs, attn_mask=mask), atol=1e-5, rtol=1e-4)
    # explain() accepts it as well
    assert fastformer.explain(fastformer.attention, **inputs, attn_mask=mask).backend in ("cuda", "triton", "torch")


def test_attention_accepts_float_mask_of_other_float_dtype():
    inputs = _attention_inputs()
    mask = torch.randn(LQ, LK, dtype=torch.float64)
    out = fastformer.attention(**inputs, attn_mask=mask)
    torch.testing.assert_close(out, _sdpa(**inputs, attn_mask=mask.float()), atol=1e-5, rtol=1e-4)


def test_attention_accepts_scale_int_dropout_and_flags():
    inputs = _attention_inputs()
    out = fastformer.attention(**inputs, scale=0.5)
    torch.testing.assert_close(out, _sdpa(**inputs, scale=0.5), atol=1e-5, rtol=1e-4)
    # dropout_p given as the int 0 is 0.0: deterministic, same result as no dropout
    out = fastformer.attention(**inputs, dropout_p=0)
    torch.testing.assert_close(out, _sdpa(**inputs), atol=1e-5, rtol=1e-4)
    out = fastformer.attention(**inputs, is_causal=True, scale=1)
    torch.testing.assert_close(out, _sdpa(**inputs, is_causal=True, scale=1.0), atol=1e-5, rtol=1e-4)
    padding = torch.zeros(B, LK, dtype=torch.bool)
    padding[:, -2:] = True
    out = fastformer.attention(**inputs, key_padding_mask=padding)
    torch.testing.assert_close(out, _sdpa(**inputs, attn_mask=~padding[:, None, None, :]), atol=1e-5, rtol=1e-4)


def test_numpy_scalars_are_numbers():
    """scale, dropout_p and eps computed with NumPy (np.float32 is not a Python float) work."""
    np = pytest.importorskip("numpy")
    inputs = _attention_inputs()
    out = fastformer.attention(**inputs, scale=np.float32(0.5), dropout_p=np.float64(0.0))
    torch.testing.assert_close(out, _sdpa(**inputs, scale=0.5), atol=1e-5, rtol=1e-4)
    x = torch.randn(4, 8)
    out, _ = fastformer.residual_layer_norm(x, None, None, None, eps=np.float32(1e-5))
    torch.testing.assert_close(out, F.layer_norm(x, (8,), eps=1e-5), atol=1e-5, rtol=1e-4)
    with pytest.raises(TypeError, match=r"scale must be a float or None, got numpy\.bool_? "):  # in full
        fastformer.attention(**inputs, scale=np.bool_(True))


def test_attention_accepts_non_contiguous_views_and_value_dim():
    projected = randn(B, LK, HK, 3 * D)  # (B, L, H, D) projection, viewed as (B, H, L, D)
    query = randn(B, LQ, HQ, D).transpose(1, 2)
    key = projected[..., :D].transpose(1, 2)
    value = projected[..., D:].transpose(1, 2)  # Dv = 2 D
    out = fastformer.attention(query, key, value)
    assert out.shape == (B, HQ, LQ, 2 * D)
    torch.testing.assert_close(out, _sdpa(query, key, value), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("op", NORMS)
def test_norms_accept_float32_params_with_bfloat16_x(op):
    x = randn(*X_SHAPE, dtype=torch.bfloat16)
    residual = randn(*X_SHAPE, dtype=torch.bfloat16)
    weight, bias = randn(N), randn(N)  # float32
    kwargs = {"bias": bias} if op == "residual_layer_norm" else {}
    out, residual_out = NORMS[op](x, residual, weight, dropout_p=0, **kwargs)
    assert out.dtype == residual_out.dtype == torch.bfloat16
    assert out.shape == residual_out.shape == X_SHAPE
    # also in x's own dtype, with no residual, and with the weight in bfloat16
    out, residual_out = NORMS[op](x, None, weight.bfloat16(), eps=1)
    assert out.shape == X_SHAPE


@pytest.mark.parametrize("op", NORMS)
def test_norms_promote_x_and_residual_of_different_dtypes(op):
    """A bfloat16 sublayer output meeting a float32 residual stream (autocast): both promoted, as
    ``x + residual`` would be; gradients reach each input in its own dtype."""
    x = randn(*X_SHAPE, dtype=torch.bfloat16).requires_grad_()
    residual = randn(*X_SHAPE).requires_grad_()
    weight = randn(N)
    out, residual_out = NORMS[op](x, residual, weight, dropout_p=0)
    assert out.dtype == residual_out.dtype == torch.float32
    expected_out, expected_residual = NORMS[op](x.float(), residual, weight, dropout_p=0)
    torch.testing.assert_close(residual_out, expected_residual)
    torch.testing.assert_close(out, expected_out)
    grad_x, grad_residual = torch.autograd.grad(out.sum() + residual_out.sum(), (x, residual))
    assert grad_x.dtype == torch.bfloat16 and grad_residual.dtype == torch.float32
    # parameters in x's own dtype are accepted too (and promoted along), as documented
    weight = randn(N, dtype=torch.bfloat16).requires_grad_()
    out, _ = NORMS[op](x, residual, weight, dropout_p=0)
    expected_out, _ = NORMS[op](x.float(), residual, weight.float(), dropout_p=0)
    torch.testing.assert_close(out, expected_out)
    assert torch.autograd.grad(out.sum(), weight)[0].dtype == torch.bfloat16
    # and in the dtype of x + residual, wider than float32 here; anything else is named
    residual64 = residual.double()
    out, _ = NORMS[op](x, residual64, weight.double(), dropout_p=0)
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match=r"weight must have the dtype of x \(torch.bfloat16\), that of x \+ "
                                        r"residual \(torch.float64\) or float32, got torch.float16"):
        NORMS[op](x, residual64, weight.half(), dropout_p=0)


def test_norms_accept_none_params_and_1d_x():
    x = randn(N)
    out, residual_out = fastformer.residual_layer_norm(x, None, None, None)
    torch.testing.assert_close(out, F.layer_norm(x, (N,)))
    assert residual_out.shape == (N,)
    out, _ = fastformer.residual_rms_norm(x, None, None, eps=1e-6)
    assert out.shape == (N,)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_accepts_valid_inputs(approximate):
    x = randn(2, 3, N, dtype=torch.bfloat16)
    bias = randn(N)  # float32 bias with bfloat16 x
    out = fastformer.bias_gelu(x, bias, approximate=approximate)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    x = randn(2, N)
    torch.testing.assert_close(fastformer.bias_gelu(x, None, approximate),
                               F.gelu(x, approximate=approximate))
