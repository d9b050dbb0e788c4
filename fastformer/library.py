"""The ops' autograd layer, in two wrappers around one forward and one backward per op.

- ``torch.library`` custom ops (schema, fake implementation, autograd registration): what
  ``torch.compile`` sees. Each op is one opaque node whose output shapes come from the fake
  implementation, so a model calling fastformer compiles with ``fullgraph=True`` whatever
  backend runs, and ``torch.library.opcheck`` checks them.
- ``torch.autograd.Function`` classes (``AttentionFunction``, ...): the eager path. A custom op
  call costs tens of microseconds of Python wrapping, as long as a whole attention kernel at
  fine-tuning sizes; the Function costs a few.

Both call the same ``_*_forward`` / ``_*_backward`` bodies, and those call the backend module that
``fastformer.dispatch`` chose (the ``backend`` argument), so every backend plugs in underneath.
Besides its forward and backward functions (``attention_fwd`` / ``attention_bwd``, ...) a backend
module may declare: ``eager_<forward>`` (e.g. ``eager_attention_fwd``: a forward composed of
PyTorch ops, run under PyTorch's autograd in eager mode), ``DIFFERENTIABLE_BACKWARD = True``
(its backward may be differentiated again) and, for the norms, ``MIXED_DTYPES = True`` (it takes
x and residual of different dtypes as they are).

Ops (all in namespace ``fastformer``):
    attention_fwd(q, k, v, attn_mask?, key_padding_mask?, dropout_p, is_causal, scale, seed?, backend)
        -> (out, lse)            out: (B, Hq, Lq, Dv) stored as (B, Lq, Hq, Dv), so that merging
                                 heads for the output projection is a free view (eager kernel
                                 backends: laid out like the query, attention_layout_like)
    attention_bwd(...)           -> (grad_q, grad_k, grad_v, grad_attn_mask or empty)
    residual_norm_fwd(x, residual?, weight?, bias?, eps, dropout_p, rms, seed?, store_residual, backend)
        -> (out, residual_out or empty, mean or empty, rstd)        x: (..., N); mean, rstd: (rows,)
                                 out, residual_out in the dtype of x + residual
    residual_norm_bwd(..., x_dtype, backend)
        -> (grad_x, grad_residual, grad_weight, grad_bias), absent = empty; grad_x in x_dtype
    bias_gelu_fwd(x, bias?, approximate, dropout_p, seed?, backend) -> out
    bias_gelu_bwd(...)           -> (grad_x, grad_bias or empty)

Custom ops cannot return None, so an absent tensor is returned as an empty one; the backward
formulas turn those back into None from flags they know, never from sizes.
"""

import functools
import hashlib
import importlib
import math
import sys
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastformer import dispatch


def _implementation(backend: str, op: str):
    path = dispatch.implementation_module(backend, op)
    # sys.modules first: import_module costs microseconds, and this runs on every op call.
    return sys.modules.get(path) or importlib.import_module(path)


class _RefuseDifferentiation(torch.autograd.Function):
    """Passes first-order gradients through; differentiating them again raises ``message``. What
    the gradients depend on (the incoming gradients, the op's saved inputs) rides along as inputs,
    so that the graph from the gradients back to the op's inputs runs through this node (PyTorch's
    ``once_differentiable`` detaches it instead, and ``torch.autograd.grad`` then only says that the
    inputs look unused)."""

    @staticmethod
    def forward(ctx, message, count, *tensors):
        ctx.message = message
        return tuple(t if t is None else t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def _first_order_unless_differentiable(op: str, label: Optional[str] = None):
    """Decorates an autograd.Function's backward. A backend module whose backward is composed of
    differentiable PyTorch ops says so (``DIFFERENTIABLE_BACKWARD = True``), and autograd can
    differentiate it again (double backward, e.g. a gradient penalty). A kernel's backward is
    opaque: there differentiating its gradients again raises, instead of silently treating them as
    constants (which drops the second-order terms). ``op`` names the backend module to ask,
    ``label`` the op in the error (default: ``op``)."""
    label = label or op

    def decorate(backward):
        @functools.wraps(backward)
        def run(ctx, *grads):
            # Grad mode is off in a plain backward (no create_graph): nothing to refuse.
            if not torch.is_grad_enabled() or getattr(_implementation(ctx.backend, op),
                                                      "DIFFERENTIABLE_BACKWARD", False):
                return backward(ctx, *grads)
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            # The gradients depend on the incoming ones and on the saved inputs (constant incoming
            # gradients, e.g. grad_outputs=ones, still leave the second-order terms through these).
            depends_on = [t for t in (*grads, *ctx.saved_tensors) if isinstance(t, Tensor) and t.requires_grad]
            if not depends_on:
                return outputs
            message = (f"fastformer {label} (backend {ctx.backend!r}): this backward cannot be differentiated "
                       f"again (double backward, create_graph=True); second derivatives need "
                       f"backend='torch' in eager mode")
            return _RefuseDifferentiation.apply(message, len(outputs), *outputs, *depends_on)
        return run
    return decorate


def _absent(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _or_absent(t: Optional[Tensor], like: Tensor) -> Tensor:
    return _absent(like) if t is None else t.contiguous()


def _empty(t: Tensor) -> Tensor:
    """A contiguous tensor of ``t``'s shape, dtype and device (what backward ops return)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _blhd(t: Tensor) -> Tensor:
    """(B, H, L, D) tensor whose memory is laid out as (B, L, H, D)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def attention_layout_like(t: Tensor, last_dim: Optional[int] = None) -> Tensor:
    """An empty (B, H, L, last_dim) tensor (default: ``t``'s shape) for the output or a gradient of
    attention input ``t`` (B, H, L, D): dense, its batch, head and sequence dims nested as in
    ``t``'s memory (the largest stride outermost; ties in dim order), the last dim innermost.

    For q, k, v split from a projection's output, (B, L, H, D) or, sequence-first, (L, B, H, D)
    memory, the output (laid out like the query) merges its heads for the output projection with a
    free view, where another layout is copied; and the gradients flow back through the views
    (transpose, view to (..., H * D)) into the projection without a copy, once per input. A
    contiguous (B, H, L, D) query gets a contiguous output, as SDPA returns it. The kernel
    backends (Triton, CUDA) lay out their outputs and gradients this way in eager mode; the custom
    op (torch.compile's path, whose fake kernel cannot know the runtime strides of its inputs)
    returns the output as (B, L, H, D) memory and the gradients contiguous."""
    shape = (*t.shape[:3], t.shape[3] if last_dim is None else last_dim)
    strides = [0, 0, 0, 1]
    step = shape[3]
    for dim in sorted(range(3), key=lambda d: (-t.stride(d), d))[::-1]:  # innermost first
        strides[dim] = step
        step *= max(shape[dim], 1)  # as PyTorch's contiguous strides
    return torch.empty_strided(shape, strides, dtype=t.dtype, device=t.device)


def attention_output_like(query: Tensor, dim_v: int, like_query: bool = True) -> Tensor:
    """An empty attention output (B, Hq, Lq, dim_v) for ``query``: laid out like the query
    (:func:`attention_layout_like`), or with ``like_query=False`` stored as (B, Lq, Hq, dim_v),
    the custom op's one layout."""
    if like_query:
        return attention_layout_like(query, dim_v)
    batch, heads, length, _ = query.shape
    return query.new_empty(batch, length, heads, dim_v).transpose(1, 2)


# Backends whose module has an ``eager_<forward>`` function (the torch backend, composed of PyTorch
# ops) run it under PyTorch's own autograd in eager mode: no recomputation, PyTorch's backward
# kernels (SDPA's among them) and PyTorch's dropout. False sends them through the autograd.Function
# like every kernel backend (their seed-regenerated dropout and explicit backward), as under
# torch.compile: a switch for tests and debugging.
NATIVE_AUTOGRAD = True


def draws_own_dropout(backend: str, op: str, forward_name: str) -> bool:
    """Whether ``op`` on ``backend`` runs its ``eager_<forward_name>`` function under PyTorch's
    autograd now, whose dropout draws from PyTorch's generator: then it needs no seed."""
    if not NATIVE_AUTOGRAD or torch.compiler.is_compiling():
        return False
    return hasattr(_implementation(backend, op), "eager_" + forward_name)


def takes_mixed_dtypes(backend: str, op: str) -> bool:
    """Whether ``op``'s module on ``backend`` takes x and residual of different dtypes as they are
    (``MIXED_DTYPES = True``); otherwise the caller casts them to the promoted dtype first."""
    return getattr(_implementation(backend, op), "MIXED_DTYPES", False)


def _eager_or_compiled(function, op, public_op, forward_name):
    """The op while torch.compile traces (an opaque node), the autograd.Function otherwise."""
    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if NATIVE_AUTOGRAD:
            name = public_op(*args) if callable(public_op) else public_op
            eager = getattr(_implementation(args[-1], name), "eager_" + forward_name, None)
            if eager is not None:
                if not torch.autograd._profiler_enabled():
                    return eager(*args[:-1])
                # Under a profiler, PyTorch ops composing the forward show under the op's name.
                with torch.autograd.profiler.record_function(f"fastformer::{name}"):
                    return eager(*args[:-1])
        return function.apply(*args)
    return call


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
def _attention_forward(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
                       seed, backend, out_like_query=True):
    out, lse = _implementation(backend, "attention").attention_fwd(
        query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed,
        out_like_query=out_like_query)
    return out, lse.contiguous()


def _attention_backward(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p,
                        is_causal, scale, seed, mask_needs_grad, backend):
    grad_q, grad_k, grad_v, grad_mask = _implementation(backend, "attention").attention_bwd(
        grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal,
        scale, seed, mask_needs_grad)
    return grad_q, grad_k, grad_v, grad_mask


def _skip_zero_gradients(ctx) -> None:
    """Gradients of outputs that reach no loss arrive as None, not as zero-filled tensors that
    autograd would otherwise allocate and fill on the device at every call: the log-sum-exp and
    the norm statistics (never differentiable), and a residual stream that nothing reads (that of
    each norm of a post-norm layer, which the norm's backward would then read back in full).
    The backward formulas take None as zero."""
    ctx.set_materialize_grads(False)


def _attention_save(ctx, inputs, output):
    query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, backend = inputs
    out, lse = output
    _skip_zero_gradients(ctx)
    ctx.save_for_backward(query, key, value, out, lse, attn_mask, key_padding_mask, seed)
    ctx.options = (dropout_p, is_causal, scale)
    ctx.backend = backend
    ctx.mask_needs_grad = bool(ctx.needs_input_grad[3])


def _attention_grads(ctx, grad_out, grad_lse, *, backward):
    query, key, value, out, lse, attn_mask, key_padding_mask, seed = ctx.saved_tensors
    dropout_p, is_causal, scale = ctx.options
    if grad_out is None:  # (not seen: the lse is not differentiable, so out has the gradient)
        grad_out = torch.zeros_like(out)
    grad_q, grad_k, grad_v, grad_mask = backward(
        grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal,
        scale, seed, ctx.mask_needs_grad, ctx.backend)
    grad_mask = grad_mask if ctx.mask_needs_grad else None
    return grad_q, grad_k, grad_v, grad_mask, None, None, None, None, None, None


@torch.library.custom_op("fastformer::attention_fwd", mutates_args=())
def attention_fwd(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float,
                  seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    out, lse = _attention_forward(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal,
                                  scale, seed, backend, out_like_query=False)
    return _blhd(out), lse  # the torch backend's comes in SDPA's layout


@attention_fwd.register_fake
def _(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, backend):
    out = attention_output_like(query, value.shape[-1], like_query=False)
    # The torch backend recomputes in the backward and keeps no log-sum-exp.
    lse_shape = (0,) if backend == "torch" else query.shape[:3]
    return out, query.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("fastformer::attention_bwd", mutates_args=())
def attention_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor, lse: Tensor,
                  attn_mask: Optional[Tensor], key_padding_mask: Optional[Tensor], dropout_p: float,
                  is_causal: bool, scale: float, seed: Optional[Tensor], mask_needs_grad: bool,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grad_q, grad_k, grad_v, grad_mask = _attention_backward(
        grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
        seed, mask_needs_grad, backend)
    return grad_q.contiguous(), grad_k.contiguous(), grad_v.contiguous(), _or_absent(grad_mask, query)


@attention_bwd.register_fake
def _(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
      seed, mask_needs_grad, backend):
    grad_mask = _empty(attn_mask) if mask_needs_grad else _absent(query)
    return _empty(query), _empty(key), _empty(value), grad_mask


attention_fwd.register_autograd(functools.partial(_attention_grads, backward=attention_bwd),
                                setup_context=_attention_save)


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _attention_forward(*inputs)
        _attention_save(ctx, inputs, (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    @_first_order_unless_differentiable("attention")
    def backward(ctx, grad_out, grad_lse):
        return _attention_grads(ctx, grad_out, grad_lse, backward=_attention_backward)


attention = _eager_or_compiled(AttentionFunction, attention_fwd, "attention", "attention_fwd")


# --------------------------------------------------------------------------------------------
# residual + dropout + LayerNorm / RMSNorm
# --------------------------------------------------------------------------------------------
def _norm_name(rms: bool) -> str:
    return "residual_rms_norm" if rms else "residual_layer_norm"


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """(..., N) -> (rows, N), the layout the norm kernels take (a view where the strides allow)."""
    return None if t is None else t.reshape(-1, t.shape[-1])


def _shaped(t: Tensor, shape) -> Tensor:
    """A contiguous (rows, N) result as ``shape``. Reshaped here, inside the op, where autograd
    does not track it (outside, each view costs a node forward and backward); detached, so that
    autograd does not take it for a view made inside a custom Function, which may not be
    modified in place."""
    return t if t.shape == shape else t.view(shape).detach()


def _residual_norm_forward(x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual, backend):
    out, residual_out, mean, rstd = _implementation(backend, _norm_name(rms)).residual_norm_fwd(
        _rows(x), _rows(residual), weight, bias, eps, dropout_p, rms, seed, store_residual)
    if store_residual:
        residual_out = _shaped(residual_out.contiguous(), x.shape)
    return _shaped(out.contiguous(), x.shape), residual_out, mean.contiguous(), rstd.contiguous()


def _residual_norm_backward(grad_out, grad_residual_out, normed, weight, bias, mean, rstd, dropout_p,
                            rms, seed, has_residual, x_dtype, backend):
    grad_x, grad_residual, grad_weight, grad_bias = _implementation(backend, _norm_name(rms)) \
        .residual_norm_bwd(_rows(grad_out), _rows(grad_residual_out), _rows(normed), weight, bias, mean,
                           rstd, dropout_p, rms, seed, has_residual, x_dtype=x_dtype)
    grad_x = _shaped(grad_x.contiguous(), normed.shape)
    if grad_residual is not None:
        grad_residual = _shaped(grad_residual.contiguous(), normed.shape)
    return grad_x, grad_residual, grad_weight, grad_bias


def _residual_norm_save(ctx, inputs, output):
    x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual, backend = inputs
    out, residual_out, mean, rstd = output
    normed = residual_out if store_residual else x
    _skip_zero_gradients(ctx)
    ctx.save_for_backward(normed, weight, bias, mean, rstd, seed)
    ctx.options = (dropout_p, rms, residual is not None, store_residual, x.dtype)
    ctx.backend = backend


def _residual_norm_grads(ctx, grad_out, grad_residual_out, grad_mean, grad_rstd, *, backward):
    """Without dropout, x and residual get one and the same gradient (that of ``residual_out =
    x + residual``): the kernel writes it once and both inputs receive that tensor, as with
    PyTorch's own ``x + residual`` (a fifth less memory traffic in the backward). Returning one
    tensor twice is a matter of this formula, not of the backward op's outputs (which may not
    alias), so torch.compile takes it too."""
    normed, weight, bias, mean, rstd, seed = ctx.saved_tensors
    dropout_p, rms, has_residual, store_residual, x_dtype = ctx.options
    if grad_out is None:  # only the residual stream reaches a loss
        grad_out = torch.zeros_like(normed)
    # (x and residual of different dtypes get their gradients in their own dtypes: two tensors.)
    shared = has_residual and dropout_p == 0.0 and x_dtype == normed.dtype
    grad_x, grad_residual, grad_weight, grad_bias = backward(
        grad_out, grad_residual_out if store_residual else None, normed, weight, bias, mean, rstd,
        dropout_p, rms, seed, has_residual and not shared, x_dtype, ctx.backend)
    if shared:
        grad_residual = grad_x
    return (grad_x, grad_residual if has_residual else None,
            grad_weight if weight is not None else None, grad_bias if bias is not None else None,
            None, None, None, None, None, None)


@torch.library.custom_op("fastformer::residual_norm_fwd", mutates_args=())
def residual_norm_fwd(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                      bias: Optional[Tensor], eps: float, dropout_p: float, rms: bool,
                      seed: Optional[Tensor], store_residual: bool,
                      backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _residual_norm_forward(x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual,
                                  backend)


@residual_norm_fwd.register_fake
def _(x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual, backend):
    rows = math.prod(x.shape[:-1])
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    stats = torch.promote_types(dtype, torch.float32)  # float64 for float64 inputs (torch backend)
    out = x.new_empty(x.shape, dtype=dtype)
    return (out, torch.empty_like(out) if store_residual else _absent(x),
            x.new_empty(0 if rms else rows, dtype=stats), x.new_empty(rows, dtype=stats))


@torch.library.custom_op("fastformer::residual_norm_bwd", mutates_args=())
def residual_norm_bwd(grad_out: Tensor, grad_residual_out: Optional[Tensor], normed: Tensor,
                      weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, rstd: Tensor,
                      dropout_p: float, rms: bool, seed: Optional[Tensor], has_residual: bool,
                      x_dtype: torch.dtype, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = _residual_norm_backward(grad_out, grad_residual_out, normed, weight, bias, mean, rstd,
                                    dropout_p, rms, seed, has_residual, x_dtype, backend)
    return grads[0], *(_or_absent(grad, normed) for grad in grads[1:])


@residual_norm_bwd.register_fake
def _(grad_out, grad_residual_out, normed, weight, bias, mean, rstd, dropout_p, rms, seed,
      has_residual, x_dtype, backend):
    def maybe(t):
        return _absent(normed) if t is None else _empty(t)
    grad_x = normed.new_empty(normed.shape, dtype=x_dtype)
    return grad_x, maybe(normed if has_residual else None), maybe(weight), maybe(bias)


residual_norm_fwd.register_autograd(functools.partial(_residual_norm_grads, backward=residual_norm_bwd),
                                    setup_context=_residual_norm_save)


class ResidualNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        outputs = _residual_norm_forward(*inputs)
        _residual_norm_save(ctx, inputs, outputs)
        ctx.mark_non_differentiable(outputs[2], outputs[3])
        return outputs

    @staticmethod
    @_first_order_unless_differentiable("residual_layer_norm", "residual norm")
    def backward(ctx, *grads):
        return _residual_norm_grads(ctx, *grads, backward=_residual_norm_backward)


residual_norm = _eager_or_compiled(ResidualNormFunction, residual_norm_fwd,
                                   lambda *args: _norm_name(args[6]), "residual_norm_fwd")


# --------------------------------------------------------------------------------------------
# bias + GELU
# --------------------------------------------------------------------------------------------
def _bias_gelu_forward(x, bias, approximate, dropout_p, seed, backend):
    return _implementation(backend, "bias_gelu").bias_gelu_fwd(x, bias, approximate, dropout_p, seed).contiguous()


def _bias_gelu_backward(grad_out, x, bias, approximate, dropout_p, seed, backend):
    grad_x, grad_bias = _implementation(backend, "bias_gelu").bias_gelu_bwd(grad_out, x, bias, approximate,
                                                                            dropout_p, seed)
    return grad_x.contiguous(), grad_bias


def _bias_gelu_save(ctx, inputs, output):
    x, bias, approximate, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, bias, seed)
    ctx.options = (approximate, dropout_p)
    ctx.backend = backend


def _bias_gelu_grads(ctx, grad_out, *, backward):
    x, bias, seed = ctx.saved_tensors
    approximate, dropout_p = ctx.options
    grad_x, grad_bias = backward(grad_out, x, bias, approximate, dropout_p, seed, ctx.backend)
    return grad_x, grad_bias if bias is not None else None, None, None, None, None


@torch.library.custom_op("fastformer::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd(x: Tensor, bias: Optional[Tensor], approximate: str, dropout_p: float, seed: Optional[Tensor],
                  backend: str) -> Tensor:
    return _bias_gelu_forward(x, bias, approximate, dropout_p, seed, backend)


@bias_gelu_fwd.register_fake
def _(x, bias, approximate, dropout_p, seed, backend):
    return _empty(x)


@torch.library.custom_op("fastformer::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd(grad_out: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str, dropout_p: float,
                  seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    grad_x, grad_bias = _bias_gelu_backward(grad_out, x, bias, approximate, dropout_p, seed, backend)
    return grad_x, _or_absent(grad_bias, x)


@bias_gelu_bwd.register_fake
def _(grad_out, x, bias, approximate, dropout_p, seed, backend):
    return _empty(x), _absent(x) if bias is None else _empty(bias)


bias_gelu_fwd.register_autograd(functools.partial(_bias_gelu_grads, backward=bias_gelu_bwd),
                                setup_context=_bias_gelu_save)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        out = _bias_gelu_forward(*inputs)
        _bias_gelu_save(ctx, inputs, out)
        return out

    @staticmethod
    @_first_order_unless_differentiable("bias_gelu")
    def backward(ctx, grad_out):
        return _bias_gelu_grads(ctx, grad_out, backward=_bias_gelu_backward)


bias_gelu = _eager_or_compiled(BiasGeluFunction, bias_gelu_fwd, "bias_gelu", "bias_gelu_fwd")


# --------------------------------------------------------------------------------------------
# torch.compile's caches
# --------------------------------------------------------------------------------------------
def _tag_compile_caches() -> str:
    """Put a digest of this file, which defines the ops' schemas, fake kernels and autograd
    formulas, into the key of PyTorch's compile caches (FX graph and AOTAutograd caches, on disk
    across processes), and return that tag.

    Those caches key a graph by its code, which names a custom op but holds neither its schema nor
    its autograd formula (pytorch/pytorch#144344): after an upgrade of fastformer changes either,
    a graph cached by the old version would run the old backward (wrong gradients, or an error
    when a schema changed). ``torch.compiler.config.cache_key_tag`` is the cache key's hook for
    such context; a tag the user set is kept in front of fastformer's."""
    tag = "fastformer-ops-" + hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]
    import torch.compiler.config as config  # (not an attribute of torch.compiler before it is imported)

    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag}+{tag}" if config.cache_key_tag else tag
    return tag


COMPILE_CACHE_TAG = _tag_compile_caches()
