"""The public ops: validate the inputs, choose a backend, call the custom op.

Each op has a ``_prepare_*`` function that checks and normalises the arguments and describes the
call for dispatch; the op itself and :func:`explain` share it, so ``explain`` answers exactly what
a call would do.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from fastformer import dispatch, library, masks
from fastformer import validation as check

__all__ = ["attention", "residual_layer_norm", "residual_rms_norm", "bias_gelu", "explain"]


def _draw_seed(dropout_p: float, backend: str, device: torch.device | str) -> torch.Tensor | None:
    """The dropout seed a call on ``backend`` with data on ``device`` draws: a 0-dim int64 tensor
    from PyTorch's default generator of the device :func:`dispatch.seed_device` names (so
    torch.manual_seed reproduces it)."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=dispatch.seed_device(backend, torch.device(device)))


def _seed_for(dropout_p: float, backend: str, op: str, forward_name: str,
              device: torch.device) -> torch.Tensor | None:
    """The call's dropout seed; None when it runs PyTorch's own dropout (nothing to regenerate)."""
    if dropout_p == 0.0 or library.draws_own_dropout(backend, op, forward_name):
        return None
    return _draw_seed(dropout_p, backend, device)


def _needs(**flags: bool) -> frozenset:
    """The features a call needs: those flagged, and forward-mode autodiff when it is on (only
    PyTorch's own ops carry tangents; the kernels' autograd.Functions define no jvp)."""
    flags["forward_ad"] = dispatch.forward_mode_ad()
    return frozenset(name for name, on in flags.items() if on)


def _drops_some(dropout_p: float) -> bool:
    """Whether a call runs a dropout kernel: dropout_p == 1 drops everything without one."""
    return 0.0 < dropout_p < 1.0


def _everything_dropped(result: torch.Tensor) -> torch.Tensor:
    """dropout with p = 1, as PyTorch's: the result times zero (zero gradients; NaN stays NaN)."""
    return result * 0.0


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
def _prepare_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       *, key_padding_mask=None):
    op = "attention"
    layout = "(batch, heads, seq_len, head_dim)"
    check.check_tensor(op, "query", query, ndim=4, layout=layout)
    check.check_tensor(op, "key", key, ndim=4, layout=layout)
    check.check_tensor(op, "value", value, ndim=4, layout=layout)
    check.check_same_device(op, "query", query, key=key, value=value)
    check.check_same_dtype(op, "query", query, key=key, value=value)
    batch, heads_q, len_q, head_dim = query.shape
    _, heads_k, len_k, _ = key.shape
    problem = None
    if key.shape[0] != batch or value.shape[0] != batch:
        problem = "batch sizes differ"
    elif value.shape[1] != heads_k:
        problem = "key and value must have the same number of heads"
    elif value.shape[2] != len_k:
        problem = "key and value must have the same sequence length"
    elif key.shape[3] != head_dim:
        problem = "query and key must have the same head dim"
    elif head_dim == 0 or value.shape[3] == 0:
        problem = "head dims must be >= 1"
    elif heads_k == 0 and heads_q != 0 or heads_k != 0 and heads_q % heads_k != 0:
        problem = f"query heads (Hq={heads_q}) must be a multiple of key/value heads (Hk={heads_k})"
    if problem is not None:
        raise ValueError(f"{op}: {problem}: query {check.shape_of(query)}, key {check.shape_of(key)}, "
                         f"value {check.shape_of(value)}")
    mask = check.broadcast_mask_4d(op, "attn_mask", attn_mask, (batch, heads_q, len_q, len_k),
                                   query.dtype, query.device)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"{op}: key_padding_mask must be a torch.Tensor or None, "
                            f"got {check.type_name(key_padding_mask)}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"{op}: key_padding_mask must be a bool tensor (True = padding), "
                            f"got dtype {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (batch, len_k):
            raise ValueError(f"{op}: key_padding_mask must have shape (B, Lk) = ({batch}, {len_k}), "
                             f"got {check.shape_of(key_padding_mask)}")
        check.check_same_device(op, "query", query, key_padding_mask=key_padding_mask)
    dropout_p = check.check_probability(op, "dropout_p", dropout_p)
    is_causal = check.check_bool(op, "is_causal", is_causal)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else check.check_finite(op, "scale", scale)
    float_mask = mask is not None and mask.dtype != torch.bool
    needs = _needs(
        dropout=_drops_some(dropout_p),
        causal=is_causal,
        bool_mask=mask is not None and mask.dtype == torch.bool,
        float_mask=float_mask,
        mask_grad=float_mask and mask.requires_grad and torch.is_grad_enabled(),
        key_padding_mask=key_padding_mask is not None,
        gqa=heads_q != heads_k,
        value_dim=value.shape[3] != head_dim,
    )
    # A kernel must hold both the query/key and the value head dims: check the larger.
    call = dispatch.Call(op, query.device, query.dtype, needs, head_dim=max(head_dim, value.shape[3]))
    args = (query, key, value, mask, key_padding_mask, dropout_p, is_causal, float(scale))
    return call, args


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *,
              key_padding_mask=None, backend=None):
    """Scaled dot-product attention with the semantics of ``torch.nn.functional.scaled_dot_product_attention``.

    Args:
        query: (B, Hq, Lq, D); key: (B, Hk, Lk, D); value: (B, Hk, Lk, Dv); Hq % Hk == 0 (GQA/MQA).
            Any strides (e.g. views of a (B, L, H, D) projection).
        attn_mask: bool (True = may attend) or additive float, broadcastable to (B, Hq, Lq, Lk).
        dropout_p: dropout probability on the attention weights (applied whenever > 0, as SDPA).
        is_causal: top-left aligned causal mask (query i attends keys j <= i), as SDPA.
        scale: softmax scale, default 1/sqrt(D).
        key_padding_mask: bool (B, Lk), True = padding (as ``nn.MultiheadAttention``).
        backend: "cuda", "triton", "torch" or None (fastest that supports the call).

    Returns (B, Hq, Lq, Dv). A query row with no key left to attend to returns 0 and gets zero
    gradients, never NaN.
    """
    query, key, value = _autocast_attention_inputs(query, key, value)
    call, args = _prepare_attention(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                    key_padding_mask=key_padding_mask)
    query, key, value, mask, key_padding_mask, dropout_p, is_causal, scale = args
    if mask is not None and mask.dtype != torch.bool:
        mask = masks.float_mask_in(mask, query.dtype)
    if dropout_p == 1.0:
        return _everything_dropped(attention(query, key, value, mask, 0.0, is_causal, scale,
                                             key_padding_mask=key_padding_mask, backend=backend))
    chosen = dispatch.select_backend(call, backend).backend
    seed = _seed_for(dropout_p, chosen, "attention", "attention_fwd", query.device)
    out, _ = library.attention(query, key, value, mask, key_padding_mask, dropout_p, is_causal, scale,
                               seed, chosen)
    return out


def _autocast_attention_inputs(query, key, value):
    """query, key and value as SDPA sees them under autocast: floating-point ones other than
    float64 cast to autocast's dtype for their device (SDPA runs in lower precision there), so that
    the output dtype does not depend on the backend or on torch.compile. (Other types pass: the
    checks name the argument.)"""
    return tuple(t.to(_autocast_dtype(t)) if isinstance(t, torch.Tensor) else t for t in (query, key, value))


# --------------------------------------------------------------------------------------------
# residual + dropout + LayerNorm / RMSNorm
# --------------------------------------------------------------------------------------------
def _prepare_residual_norm(op, x, residual, weight, bias, eps, dropout_p, rms):
    check.check_tensor(op, "x", x, min_ndim=1)
    hidden = x.shape[-1]
    if hidden == 0:
        raise ValueError(f"{op}: the last dim of x (the normalised size) must be >= 1, "
                         f"got shape {check.shape_of(x)}")
    sum_dtype = x.dtype
    if residual is not None:
        check.check_tensor(op, "residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have the shape of x {check.shape_of(x)}, "
                             f"got {check.shape_of(residual)}")
        check.check_same_device(op, "x", x, residual=residual)
        sum_dtype = torch.promote_types(x.dtype, residual.dtype)
    check.check_vector(op, "weight", weight, hidden, x.dtype, x.device, sum_dtype=sum_dtype)
    check.check_vector(op, "bias", bias, hidden, x.dtype, x.device, sum_dtype=sum_dtype)
    if sum_dtype != x.dtype:
        # As `x + residual` would: PyTorch's type promotion (a bfloat16 sublayer output under
        # autocast meets a float32 residual stream); x and residual are promoted in the kernel
        # (see _promote). Parameters in x's own dtype follow (the kernels take the promoted dtype
        # or float32).
        weight, bias = (t if t is None or t.dtype in (sum_dtype, torch.float32) else t.to(sum_dtype)
                        for t in (weight, bias))
    eps = check.check_non_negative(op, "eps", eps)
    dropout_p = check.check_probability(op, "dropout_p", dropout_p)
    needs = _needs(dropout=_drops_some(dropout_p), residual=residual is not None, weight=weight is not None,
                   bias=bias is not None)
    call = dispatch.Call(op, x.device, sum_dtype, needs, hidden=hidden)
    store_residual = residual is not None or _drops_some(dropout_p)
    return call, (x, residual, weight, bias, eps, dropout_p, rms), store_residual


def _promote(args, call: dispatch.Call, backend: str):
    """The op's arguments for ``backend``: x and residual of different dtypes cast to the dtype of
    ``x + residual`` (the call's dtype; differentiable casts), unless the backend's module says its
    kernels take them as they are (``MIXED_DTYPES = True``: promoted as they are read, gradients
    written in each input's dtype, no cast kernel either way)."""
    x, residual = args[0], args[1]
    if residual is None or residual.dtype == x.dtype or library.takes_mixed_dtypes(backend, call.op):
        return args
    return (x.to(call.dtype), residual.to(call.dtype), *args[2:])


def _residual_norm(op, x, residual, weight, bias, eps, dropout_p, rms, backend):
    call, args, store_residual = _prepare_residual_norm(op, x, residual, weight, bias, eps, dropout_p, rms)
    if args[5] == 1.0:
        return _residual_norm(op, _everything_dropped(x), residual, weight, bias, eps, 0.0, rms, backend)
    chosen = dispatch.select_backend(call, backend).backend
    args = _promote(args, call, chosen)
    seed = _seed_for(args[5], chosen, op, "residual_norm_fwd", x.device)
    out, residual_out, _, _ = library.residual_norm(*args, seed, store_residual, chosen)
    # Without residual and dropout the residual stream is x itself: return it, don't copy it.
    return out, residual_out if store_residual else x


def residual_layer_norm(x, residual, weight, bias, eps=1e-5, dropout_p=0.0, *, backend=None):
    """``residual_out = dropout(x) + residual``; ``out = layer_norm(residual_out) * weight + bias``.

    x: (..., N); residual: same shape, or None; weight, bias: (N,) in x's dtype or float32, or
    None. Statistics in float32 whatever the input dtype (float64 for float64). Returns (out,
    residual_out), both in x's dtype; when residual has another dtype (e.g. a bfloat16 sublayer
    output under autocast and a float32 residual stream), both are first promoted as
    ``x + residual`` would be.
    """
    return _residual_norm("residual_layer_norm", x, residual, weight, bias, eps, dropout_p, False, backend)


def residual_rms_norm(x, residual, weight, eps=1e-6, dropout_p=0.0, *, backend=None):
    """As :func:`residual_layer_norm` with RMSNorm: ``out = r * rsqrt(mean(r^2) + eps) * weight``."""
    return _residual_norm("residual_rms_norm", x, residual, weight, None, eps, dropout_p, True, backend)


# --------------------------------------------------------------------------------------------
# bias + GELU
# --------------------------------------------------------------------------------------------
def _prepare_bias_gelu(x, bias=None, approximate="none", *, dropout_p=0.0):
    op = "bias_gelu"
    check.check_tensor(op, "x", x, min_ndim=1)
    hidden = x.shape[-1]
    if hidden == 0:
        raise ValueError(f"{op}: the last dim of x must be >= 1, got shape {check.shape_of(x)}")
    check.check_vector(op, "bias", bias, hidden, x.dtype, x.device)
    if not isinstance(approximate, str):
        raise TypeError(f"{op}: approximate must be 'none' or 'tanh', got {check.type_name(approximate)}")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"{op}: approximate must be 'none' or 'tanh', got {approximate!r}")
    dropout_p = check.check_probability(op, "dropout_p", dropout_p)
    call = _bias_gelu_call(x, hidden, bias is not None, approximate, _drops_some(dropout_p))
    return call, (x, bias, approximate, dropout_p)


def _bias_gelu_call(x, hidden, has_bias, approximate, has_dropout=False, dtype=None):
    needs = _needs(bias=has_bias, tanh=approximate == "tanh", erf=approximate == "none", dropout=has_dropout)
    return dispatch.Call("bias_gelu", x.device, dtype or x.dtype, needs, hidden=hidden)


def bias_gelu(x, bias=None, approximate="none", *, dropout_p=0.0, backend=None):
    """``gelu(x + bias)``; approximate is "none" (erf) or "tanh", as ``torch.nn.functional.gelu``.

    x: (..., N); bias: (N,) in x's dtype or float32, or None. Returns x's shape and dtype.
    ``dropout_p`` > 0: ``dropout(gelu(x + bias), dropout_p)`` in the same pass (the activation
    dropout of a Transformer's feed-forward block, as ``nn.TransformerEncoderLayer`` applies it),
    its mask regenerated in the backward instead of stored.
    """
    call, args = _prepare_bias_gelu(x, bias, approximate, dropout_p=dropout_p)
    if args[3] == 1.0:
        return _everything_dropped(bias_gelu(x, bias, approximate, backend=backend))
    chosen = dispatch.select_backend(call, backend).backend
    seed = _seed_for(args[3], chosen, "bias_gelu", "bias_gelu_fwd", x.device)
    return library.bias_gelu(*args, seed, chosen)


def keeps_bias_in_gemm(x, hidden, approximate="none", backend=None, has_dropout=False) -> bool:
    """Whether a ``linear -> GELU`` should keep the linear's bias in its GEMM rather than hand it to
    :func:`bias_gelu`: when dispatch sends that bias_gelu call (on the GEMM's output: x's device,
    the dtype ``F.linear(x, weight)`` returns, ``hidden`` features, with a bias) to the torch
    backend, which computes PyTorch's GELU — fusing the bias there saves nothing and costs a pass,
    while the GEMM adds it for free (``addmm``)."""
    call = _bias_gelu_call(x, hidden, True, approximate, has_dropout, dtype=_autocast_dtype(x))
    return dispatch.select_backend(call, backend).backend == "torch"


def _autocast_dtype(x):
    """The dtype autocast runs a lower-precision op on ``x`` in (``F.linear(x, weight)``, SDPA):
    autocast's where it is on for x's device (it casts floating-point inputs other than float64),
    else x's."""
    device = x.device.type
    # (meta has no autocast to ask about; torch.amp.is_autocast_available breaks torch.compile's
    # tracing in torch 2.6 and 2.11)
    if x.is_floating_point() and x.dtype != torch.float64 and device != "meta" and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


# --------------------------------------------------------------------------------------------
# explain: which backend a call would use, and why the others were passed over
# --------------------------------------------------------------------------------------------
def _prepare_layer_norm_call(x, residual, weight, bias, eps=1e-5, dropout_p=0.0):
    return _prepare_residual_norm("residual_layer_norm", x, residual, weight, bias, eps, dropout_p, False)[0]


def _prepare_rms_norm_call(x, residual, weight, eps=1e-6, dropout_p=0.0):
    return _prepare_residual_norm("residual_rms_norm", x, residual, weight, None, eps, dropout_p, True)[0]


_CALL_DESCRIBERS: dict[str, Callable[..., dispatch.Call]] = {
    "attention": lambda query, key, value, *a, **k: _prepare_attention(
        *_autocast_attention_inputs(query, key, value), *a, **k)[0],
    "residual_layer_norm": _prepare_layer_norm_call,
    "residual_rms_norm": _prepare_rms_norm_call,
    "bias_gelu": lambda *a, **k: _prepare_bias_gelu(*a, **k)[0],
}


def explain(op, *args, backend=None, **kwargs) -> dispatch.Selection:
    """The backend that ``op(*args, **kwargs)`` would run on, and why the others were passed over.

    ``op`` is a public op or its name, e.g. ``fastformer.explain(fastformer.attention, q, k, v,
    key_padding_mask=pad)``. ``print()`` the result for a readable report. Runs nothing.
    """
    name = op if isinstance(op, str) else getattr(op, "__name__", None)
    if name not in _CALL_DESCRIBERS:
        raise ValueError(f"explain: op must be one of {sorted(_CALL_DESCRIBERS)}, got {op!r}")
    return dispatch.select_backend(_CALL_DESCRIBERS[name](*args, **kwargs), backend)
