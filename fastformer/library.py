"""The ops' autograd layer, in three wrappers around one forward and one backward per op.

- ``torch.library`` custom ops (schema, fake implementation, autograd registration): what
  ``torch.compile`` sees. Each op is one opaque node whose output shapes come from the fake
  implementation, so a model calling fastformer compiles with ``fullgraph=True`` whatever
  backend runs, and ``torch.library.opcheck`` checks them.
- ``torch.autograd.Function`` classes (``AttentionFunction``, ...): the eager path. A custom op
  call costs tens of microseconds of Python wrapping, as long as a whole attention kernel at
  fine-tuning sizes; the Function costs a few.
- A second ``torch.autograd.Function`` per op (``AttentionFunctionForTransforms``, ...), in the
  form torch.func's transforms take (vmap, grad, per-sample gradients): used while one is active.

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
# Imported now, not at the first call: forward-mode AD under torch.compile runs the torch backend's
# functions in the traced code (_pytorch_autograd_now), and Dynamo cannot trace an import.
from fastformer.torch_backend import attention as _torch_attention  # noqa: F401
from fastformer.torch_backend import gelu as _torch_gelu  # noqa: F401
from fastformer.torch_backend import layer_norm as _torch_layer_norm  # noqa: F401


def _implementation(backend: str, op: str):
    path = dispatch.implementation_module(backend, op)
    # sys.modules first: import_module costs microseconds, and this runs on every op call.
    return sys.modules.get(path) or importlib.import_module(path)


def _double_backward_message(label: str, backend: str) -> str:
    return (f"fastformer {label} (backend {backend!r}): this backward cannot be differentiated again "
            f"(double backward, create_graph=True); second derivatives need backend='torch' in eager mode")


def _first_order_backward(op: str, label: str, body, vmap_rule):
    """An op's backward ``body(..., backend)`` as autograd calls it from the op's Function.

    A backend module whose backward is composed of differentiable PyTorch ops says so
    (``DIFFERENTIABLE_BACKWARD = True``), and ``body`` runs as it is: autograd can differentiate
    it again (double backward, e.g. a gradient penalty), torch.func transforms go through its
    PyTorch ops. A kernel's backward is opaque: in a plain backward (no graph recorded) it runs as
    it is; where a graph is recorded (``create_graph=True``, torch.func's grad) or a torch.func
    transform is active, it runs as a Function of its own, whose inputs (the incoming gradients,
    the op's saved inputs) are what the gradients depend on: differentiating them again raises
    (where PyTorch's ``once_differentiable`` would silently drop the second-order terms), and
    under ``vmap`` its ``vmap_rule`` runs the kernels on the batch (per-sample gradients)."""

    def keep_backend(ctx, inputs, output):
        ctx.backend = inputs[-1]

    def refuse(ctx, *grads):
        raise RuntimeError(_double_backward_message(label, ctx.backend))

    backward_function = _function_for_transforms(f"{_camel(op)}Backward", body, keep_backend, refuse, vmap_rule)

    def run(*args):
        if getattr(_implementation(args[-1], op), "DIFFERENTIABLE_BACKWARD", False) or not (
                torch.is_grad_enabled() or dispatch.func_transforms_active()):
            return body(*args)
        return backward_function.apply(*args)
    return run


def _camel(name: str) -> str:
    return "".join(part.title() for part in name.split("_"))


# --------------------------------------------------------------------------------------------
# torch.func transforms (grad, vjp, jacrev, vmap, and their compositions such as per-sample
# gradients, vmap(grad(f))): each op has a second autograd.Function, of the form these transforms
# take (a forward without ctx, setup_context, a vmap rule), used only while a transform is active:
# that form costs about 20 microseconds more per call than the eager Function. A vmap rule runs
# the kernels once on the whole batch, the vmapped dim folded into the op's batch (attention) or
# rows (norms, bias_gelu); where that cannot give per-sample results (weights that differ per
# sample, as torch.func's model ensembling makes them; dropout under vmap's randomness="same") it
# runs the op once per sample. Forward-mode AD (jvp, jacfwd) is not among them: dispatch sends
# such calls to the torch backend (the "forward_ad" feature).
# --------------------------------------------------------------------------------------------
def _function_for_transforms(name: str, forward, save, grads, vmap_rule, non_differentiable=()):
    """An autograd.Function called ``name`` in the form torch.func takes: ``forward(*inputs)``,
    ``save(ctx, inputs, output)`` and ``grads(ctx, *grad_outputs)`` as an eager Function has them,
    the outputs at ``non_differentiable`` positions marked so, and ``vmap_rule(apply, info, in_dims,
    *inputs)``. (Each op's for transforms, and each kernel backward's, ``_first_order_backward``.)"""

    class ForTransforms(torch.autograd.Function):
        @staticmethod
        def forward(*inputs):
            return forward(*inputs)

        @staticmethod
        def setup_context(ctx, inputs, output):
            save(ctx, inputs, output)
            ctx.mark_non_differentiable(*(output[i] for i in non_differentiable))

        @staticmethod
        def backward(ctx, *grad_outputs):
            return grads(ctx, *grad_outputs)

        @staticmethod
        def vmap(info, in_dims, *inputs):
            return vmap_rule(ForTransforms.apply, info, in_dims, *inputs)

    ForTransforms.__name__ = ForTransforms.__qualname__ = name
    return ForTransforms


def _to_front(t: Tensor, dim: Optional[int], size: int) -> Tensor:
    """``t`` with its vmapped dim first; one without (the same for every sample) broadcast."""
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _fold(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    """(size, B, ...) as (size * B, ...): the vmapped dim folded into the first one."""
    return None if t is None else _to_front(t, dim, size).flatten(0, 1)


def _unfold(t: Tensor, size: int) -> Tensor:
    return t.unflatten(0, (size, t.shape[0] // size))


def _one_seed(seed: Optional[Tensor], dim: Optional[int]) -> Optional[Tensor]:
    """The seed of a folded call. Under vmap's randomness="different" each sample drew one; the
    first does for all, since the kernels' random streams differ by batch row (or row) already."""
    return seed if seed is None or dim is None else seed.select(dim, 0)


def _same_for_every_sample(seed: Optional[Tensor], dim: Optional[int]) -> bool:
    """Dropout with one seed for all samples (vmap's randomness="same"): every sample must then
    drop the same elements, which a folded call, drawing per batch row, would not."""
    return seed is not None and dim is None


def _vmap_by_samples(apply, info, in_dims, *args):
    """The op once per sample of the vmapped dim, the results stacked (PyTorch's own fallback for
    an op without a batching rule does the same)."""
    results = [apply(*(a if d is None else a.select(d, n) for a, d in zip(args, in_dims)))
               for n in range(info.batch_size)]
    if isinstance(results[0], Tensor):
        return torch.stack(results), 0
    stacked = tuple(None if outs[0] is None else torch.stack(outs) for outs in zip(*results))
    return stacked, tuple(None if t is None else 0 for t in stacked)


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
    old_strides = t.stride()
    strides = [0, 0, 0, 1]
    step = shape[3]
    for dim in sorted((0, 1, 2), key=lambda d: (old_strides[d], -d)):  # innermost first
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


def _pytorch_autograd_now() -> bool:
    """Whether a backend's ``eager_<forward>`` function, where it has one, runs under PyTorch's own
    autograd now: in eager mode (NATIVE_AUTOGRAD); under torch.compile only while forward-mode AD
    is on (torch.func.jvp inside the compiled function), as the custom ops carry no tangents: Dynamo
    traces PyTorch's ops, whose tangents are right, where the opaque op would give zeros."""
    if torch.compiler.is_compiling():
        return dispatch.forward_mode_ad()
    return NATIVE_AUTOGRAD


def draws_own_dropout(backend: str, op: str, forward_name: str) -> bool:
    """Whether ``op`` on ``backend`` runs its ``eager_<forward_name>`` function under PyTorch's
    autograd now, whose dropout draws from PyTorch's generator: then it needs no seed."""
    return _pytorch_autograd_now() and hasattr(_implementation(backend, op), "eager_" + forward_name)


def takes_mixed_dtypes(backend: str, op: str) -> bool:
    """Whether ``op``'s module on ``backend`` takes x and residual of different dtypes as they are
    (``MIXED_DTYPES = True``); otherwise the caller casts them to the promoted dtype first."""
    return getattr(_implementation(backend, op), "MIXED_DTYPES", False)


def _eager_or_compiled(function, function_for_transforms, op, public_op, forward_name):
    """The op while torch.compile traces (an opaque node); in eager mode, the backend's PyTorch
    forward where it has one (native autograd, see NATIVE_AUTOGRAD; under compile too while
    forward-mode AD is on, :func:`_pytorch_autograd_now`), else the autograd.Function, in the form
    torch.func takes while one of its transforms is active."""
    def call(*args):
        if _pytorch_autograd_now():
            name = public_op(*args) if callable(public_op) else public_op
            eager = getattr(_implementation(args[-1], name), "eager_" + forward_name, None)
            if eager is not None:
                if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
                    return eager(*args[:-1])
                # Under a profiler, PyTorch ops composing the forward show under the op's name.
                with torch.autograd.profiler.record_function(f"fastformer::{name}"):
                    return eager(*args[:-1])
        if torch.compiler.is_compiling():
            return op(*args)
        if dispatch.func_transforms_active():
            return function_for_transforms.apply(*args)
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


def _fold_attention_mask(attn_mask, dim, size, batch, per_sample):
    """attn_mask (4-d, broadcastable to (B, Hq, Lq, Lk)) for a call whose batch folds ``size``
    samples of ``batch``: one that is the same for every sample and broadcasts over the batch stays
    as it is, unless its gradient must come out per sample (``per_sample``)."""
    if attn_mask is None or dim is None and attn_mask.shape[0] == 1 and not per_sample:
        return attn_mask
    front = _to_front(attn_mask, dim, size)
    return front.expand(size, batch, *front.shape[2:]).flatten(0, 1)


def _attention_vmap(apply, info, in_dims, query, key, value, attn_mask, key_padding_mask, dropout_p,
                    is_causal, scale, seed, backend):
    """vmap of the forward: the vmapped dim folded into the batch dim, one call."""
    if _same_for_every_sample(seed, in_dims[8]):
        return _vmap_by_samples(apply, info, in_dims, query, key, value, attn_mask, key_padding_mask,
                                dropout_p, is_causal, scale, seed, backend)
    size = info.batch_size
    query, key, value = (_fold(t, d, size) for t, d in zip((query, key, value), in_dims[:3]))
    attn_mask = _fold_attention_mask(attn_mask, in_dims[3], size, query.shape[0] // size, False)
    out, lse = apply(query, key, value, attn_mask, _fold(key_padding_mask, in_dims[4], size), dropout_p,
                     is_causal, scale, _one_seed(seed, in_dims[8]), backend)
    if lse.dim() == 1:  # (the torch backend keeps none: an empty vector)
        return (_unfold(out, size), lse), (0, None)
    return (_unfold(out, size), _unfold(lse, size)), (0, 0)


def _attention_backward_vmap(apply, info, in_dims, grad_out, query, key, value, out, lse, attn_mask,
                             key_padding_mask, dropout_p, is_causal, scale, seed, mask_needs_grad, backend):
    """vmap of the backward, folded as the forward. A mask gradient comes out per sample, summed
    over the batch where the mask broadcasts over it."""
    args = (grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale,
            seed, mask_needs_grad, backend)
    if _same_for_every_sample(seed, in_dims[11]):
        return _vmap_by_samples(apply, info, in_dims, *args)
    size = info.batch_size
    grad_out, query, key, value, out = (_fold(t, d, size) for t, d in zip(args[:5], in_dims))
    if in_dims[5] is not None or lse.dim() > 1:
        lse = _fold(lse, in_dims[5], size)
    batch = query.shape[0] // size
    mask = _fold_attention_mask(attn_mask, in_dims[6], size, batch, mask_needs_grad)
    grad_q, grad_k, grad_v, grad_mask = apply(
        grad_out, query, key, value, out, lse, mask, _fold(key_padding_mask, in_dims[7], size), dropout_p,
        is_causal, scale, _one_seed(seed, in_dims[11]), mask_needs_grad, backend)
    grads = tuple(_unfold(g, size) for g in (grad_q, grad_k, grad_v))
    if not mask_needs_grad:
        return (*grads, None), (0, 0, 0, None)
    grad_mask = _unfold(grad_mask, size)
    if _to_front(attn_mask, in_dims[6], size).shape[1] == 1 < batch:
        grad_mask = grad_mask.sum(1, keepdim=True, dtype=torch.float32).to(grad_mask.dtype)
    return (*grads, grad_mask), (0, 0, 0, 0)


_attention_backward_first_order = _first_order_backward("attention", "attention", _attention_backward,
                                                        _attention_backward_vmap)


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        out, lse = _attention_forward(*inputs)
        _attention_save(ctx, inputs, (out, lse))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _attention_grads(ctx, grad_out, grad_lse, backward=_attention_backward_first_order)


AttentionFunctionForTransforms = _function_for_transforms(
    "AttentionFunctionForTransforms", _attention_forward, _attention_save,
    functools.partial(_attention_grads, backward=_attention_backward_first_order), _attention_vmap,
    non_differentiable=(1,))

attention = _eager_or_compiled(AttentionFunction, AttentionFunctionForTransforms, attention_fwd, "attention",
                               "attention_fwd")


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


def _residual_norm_vmap(apply, info, in_dims, x, residual, weight, bias, eps, dropout_p, rms, seed,
                        store_residual, backend):
    """vmap of the forward: the vmapped dim folded into the rows, one call, unless the weight or
    bias differ per sample."""
    args = (x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual, backend)
    if in_dims[2] is not None or in_dims[3] is not None or _same_for_every_sample(seed, in_dims[7]):
        return _vmap_by_samples(apply, info, in_dims, *args)
    size = info.batch_size
    x = _to_front(x, in_dims[0], size)
    residual = None if residual is None else _to_front(residual, in_dims[1], size)
    out, residual_out, mean, rstd = apply(x, residual, weight, bias, eps, dropout_p, rms,
                                          _one_seed(seed, in_dims[7]), store_residual, backend)
    mean = mean if rms else _unfold(mean, size)  # (empty in RMS mode)
    return ((out, residual_out, mean, _unfold(rstd, size)),
            (0, 0 if store_residual else None, None if rms else 0, 0))


def _residual_norm_backward_vmap(apply, info, in_dims, grad_out, grad_residual_out, normed, weight, bias,
                                 mean, rstd, dropout_p, rms, seed, has_residual, x_dtype, backend):
    """vmap of the backward, folded as the forward. The kernels sum the weight and bias gradients
    over all the rows they see; per sample, they are summed here from dy and xhat."""
    args = (grad_out, grad_residual_out, normed, weight, bias, mean, rstd, dropout_p, rms, seed, has_residual,
            x_dtype, backend)
    if in_dims[3] is not None or in_dims[4] is not None or _same_for_every_sample(seed, in_dims[9]):
        return _vmap_by_samples(apply, info, in_dims, *args)
    size = info.batch_size
    grad_out, normed = _to_front(grad_out, in_dims[0], size), _to_front(normed, in_dims[2], size)
    if grad_residual_out is not None:
        grad_residual_out = _to_front(grad_residual_out, in_dims[1], size)
    mean = mean if rms and in_dims[5] is None else _fold(mean, in_dims[5], size)  # (empty in RMS mode)
    rstd = _fold(rstd, in_dims[6], size)
    grad_x, grad_residual, grad_weight, grad_bias = apply(
        grad_out, grad_residual_out, normed, weight, bias, mean, rstd, dropout_p, rms,
        _one_seed(seed, in_dims[9]), has_residual, x_dtype, backend)
    rows = tuple(range(1, grad_out.dim() - 1))  # each sample's rows
    dy = grad_out.to(rstd.dtype)
    if grad_weight is not None:
        r = normed.to(rstd.dtype)
        xhat = r if rms else r - mean.view(grad_out.shape[:-1]).unsqueeze(-1)
        xhat = xhat * rstd.view(grad_out.shape[:-1]).unsqueeze(-1)
        grad_weight = (dy * xhat).sum(rows).to(grad_weight.dtype)
    if grad_bias is not None:
        grad_bias = dy.sum(rows).to(grad_bias.dtype)
    grads = (grad_x, grad_residual, grad_weight, grad_bias)
    return grads, tuple(None if g is None else 0 for g in grads)


_residual_norm_backward_first_order = _first_order_backward(
    "residual_layer_norm", "residual norm", _residual_norm_backward, _residual_norm_backward_vmap)


class ResidualNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        outputs = _residual_norm_forward(*inputs)
        _residual_norm_save(ctx, inputs, outputs)
        ctx.mark_non_differentiable(outputs[2], outputs[3])
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        return _residual_norm_grads(ctx, *grads, backward=_residual_norm_backward_first_order)


ResidualNormFunctionForTransforms = _function_for_transforms(
    "ResidualNormFunctionForTransforms", _residual_norm_forward, _residual_norm_save,
    functools.partial(_residual_norm_grads, backward=_residual_norm_backward_first_order), _residual_norm_vmap,
    non_differentiable=(2, 3))

residual_norm = _eager_or_compiled(ResidualNormFunction, ResidualNormFunctionForTransforms, residual_norm_fwd,
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


def _bias_gelu_vmap(apply, info, in_dims, x, bias, approximate, dropout_p, seed, backend):
    """vmap of the forward: the vmapped dim folded into the rows, one call, unless the bias differs
    per sample."""
    if in_dims[1] is not None or _same_for_every_sample(seed, in_dims[4]):
        return _vmap_by_samples(apply, info, in_dims, x, bias, approximate, dropout_p, seed, backend)
    x = _to_front(x, in_dims[0], info.batch_size)
    return apply(x, bias, approximate, dropout_p, _one_seed(seed, in_dims[4]), backend), 0


def _bias_gelu_backward_vmap(apply, info, in_dims, grad_out, x, bias, approximate, dropout_p, seed, backend):
    """vmap of the backward, folded as the forward; the bias gradient summed per sample here."""
    if in_dims[2] is not None or _same_for_every_sample(seed, in_dims[5]):
        return _vmap_by_samples(apply, info, in_dims, grad_out, x, bias, approximate, dropout_p, seed, backend)
    size = info.batch_size
    grad_x, grad_bias = apply(_to_front(grad_out, in_dims[0], size), _to_front(x, in_dims[1], size), bias,
                              approximate, dropout_p, _one_seed(seed, in_dims[5]), backend)
    if grad_bias is None:
        return (grad_x, None), (0, None)
    rows = tuple(range(1, grad_x.dim() - 1))
    return (grad_x, grad_x.sum(rows, dtype=torch.float32).to(grad_bias.dtype)), (0, 0)


_bias_gelu_backward_first_order = _first_order_backward("bias_gelu", "bias_gelu", _bias_gelu_backward,
                                                        _bias_gelu_backward_vmap)


class BiasGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        out = _bias_gelu_forward(*inputs)
        _bias_gelu_save(ctx, inputs, out)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _bias_gelu_grads(ctx, grad_out, backward=_bias_gelu_backward_first_order)


BiasGeluFunctionForTransforms = _function_for_transforms(
    "BiasGeluFunctionForTransforms", _bias_gelu_forward, _bias_gelu_save,
    functools.partial(_bias_gelu_grads, backward=_bias_gelu_backward_first_order), _bias_gelu_vmap)

bias_gelu = _eager_or_compiled(BiasGeluFunction, BiasGeluFunctionForTransforms, bias_gelu_fwd, "bias_gelu",
                               "bias_gelu_fwd")


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
