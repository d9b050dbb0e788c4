"""Residual + dropout + LayerNorm / RMSNorm composed from PyTorch ops, in float32 statistics
(float64 for float64 inputs).

Forward, on rows of size N (x and residual are (..., N); the backward gets them as (rows, N)):
    r   = dropout(x) + residual            (residual_out, rounded to the input dtype)
    LN:  y = (r - mean(r)) * rstd * weight + bias,   rstd = 1 / sqrt(var(r) + eps)
    RMS: y = r * rstd * weight,                      rstd = 1 / sqrt(mean(r^2) + eps)
r is rounded to the input dtype (that is residual_out) before it is normalised in float32, so the
backward, which recomputes xhat from the stored residual_out, sees exactly what the forward saw.

Backward, with xhat the normalised r (recomputed from r and rstd) and g = dy * weight:
    LN:  dr = rstd * (g - mean(g) - xhat * mean(g * xhat))
    RMS: dr = rstd * (g - xhat * mean(g * xhat))
    dr += d(residual_out);  dx = dr * keep / (1 - p);  dresidual = dr
    dweight = sum_rows(dy * xhat);  dbias = sum_rows(dy)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastformer.torch_backend.dropout import dropout, dropout_add, dropout_keep_mask

# The backward below is made of PyTorch ops but reads the forward's mean and rstd, which are not
# differentiable outputs: differentiating it again would miss their terms, so fastformer.library
# refuses double backward through it (eager mode runs the forward under PyTorch's autograd, which
# has exact second derivatives).
DIFFERENTIABLE_BACKWARD = False
# x and residual may have different dtypes: promoted here, as x + residual would be.
MIXED_DTYPES = True


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _centred(r):
    """(r - mean(r), mean(r)) per row, shifted by the row's first element before the mean.

    With mean 1e3 and spread 1e-2 in float32 a plain mean is off by up to ~3e-5 (0.3% of the
    spread) and E[r^2] - E[r]^2 loses every digit; differences of nearby floats are exact, so the
    shifted mean is accurate.
    """
    shift = r[:, :1]
    shifted = r - shift
    shifted_mean = shifted.mean(dim=-1, keepdim=True)
    return shifted - shifted_mean, (shift + shifted_mean).view(-1)


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def _dropped(x, dropout_p, seed, dtype, native_dropout=False):
    """dropout(x) in ``dtype``, with the keep-mask regenerated from ``seed`` (or one drawn now)."""
    x = x.to(dtype)
    if dropout_p == 0.0:
        return x
    if native_dropout:
        return dropout(x, dropout_p)
    keep = dropout_keep_mask(seed, x.shape, dropout_p, x.device)
    return x * keep / (1.0 - dropout_p)


def residual_norm_fwd(x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual, *,
                      native_dropout=False):
    """Returns (out, residual_out or empty, mean or empty, rstd), mean/rstd of shape (rows,) in
    float32 (float64 for float64 inputs: the backward reuses rstd, and float32 would cost half
    the digits of float64 gradients).

    ``native_dropout``: a mask drawn now under autograd (``torch_backend.dropout.dropout``)
    instead of the one regenerated from ``seed`` (for :func:`eager_residual_norm_fwd`, where
    autograd keeps the mask).
    """
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    dtype = _compute_dtype(out_dtype)
    r = _dropped(x, dropout_p, seed, dtype, native_dropout)
    if residual is not None:
        r = r + residual.to(dtype)
    residual_out = r.to(out_dtype) if store_residual else x.new_empty(0)
    r = r.to(out_dtype).to(dtype)  # normalise what is stored (a no-op in float32 and float64)
    if rms:
        rstd = torch.rsqrt(r.square().mean(dim=-1) + eps)
        y = r * rstd[..., None]
        rstd = rstd.reshape(-1)
        mean = r.new_empty(0)
        if weight is not None:
            y = y * weight.to(dtype)
    else:
        # LayerNorm is shift-invariant: normalising r - r[..., :1] gives the same result, and keeps
        # its digits when the rows have a large mean (see _centred); PyTorch's fused kernel does
        # the rest. The shift is detached: its exact gradient is 0, and under autograd (eager
        # mode) tracking it would cost a row reduction and a full-size slice backward.
        shift = r[..., :1].detach()
        y, mean, rstd = torch.native_layer_norm(r - shift, [r.shape[-1]], _cast(weight, dtype),
                                                _cast(bias, dtype), eps)
        mean, rstd = mean.reshape(-1) + shift.reshape(-1), rstd.reshape(-1)
    return y.to(out_dtype), residual_out, mean.to(dtype), rstd.to(dtype)


def eager_residual_norm_fwd(x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual):
    """The forward under PyTorch's autograd (eager mode), with a dropout mask drawn now.

    In float32 / float64 the fewest ops (dropout and add, fused on the CPU, and layer_norm, whose
    backward autograd records), and mean / rstd come back empty: nothing reads them in eager mode. In half
    precision the sum is formed in float32 and rounded once, as the other backends do.
    """
    if x.dtype not in (torch.float32, torch.float64) or (residual is not None and residual.dtype != x.dtype):
        return residual_norm_fwd(x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual,
                                 native_dropout=True)
    r = dropout(x, dropout_p) if residual is None else dropout_add(x, residual, dropout_p)
    weight, bias = _cast(weight, x.dtype), _cast(bias, x.dtype)
    if rms:
        y = r * torch.rsqrt(r.square().mean(dim=-1, keepdim=True) + eps)
        y = y if weight is None else y * weight
    else:  # shifted as in residual_norm_fwd (large means keep their digits)
        y = F.layer_norm(r - r[..., :1].detach(), (r.shape[-1],), weight, bias, eps)
    empty = x.new_empty(0)
    return y, r if store_residual else empty, empty, empty


def residual_norm_bwd(grad_out, grad_residual_out, normed, weight, bias, mean, rstd, dropout_p, rms,
                      seed, has_residual, *, x_dtype=None):
    """Returns (grad_x, grad_residual or None, grad_weight or None, grad_bias or None).

    ``normed`` is the tensor that was normalised: residual_out, or x itself when it was not stored
    (no residual, no dropout), in the dtype of x + residual, which grad_residual takes too;
    grad_x comes in ``x_dtype`` (default: normed's).
    """
    dtype = _compute_dtype(normed.dtype)
    r, dy, rstd = normed.to(dtype), grad_out.to(dtype), rstd.to(dtype)[:, None]
    xhat = r * rstd if rms else _centred(r)[0] * rstd
    g = dy if weight is None else dy * weight.to(dtype)
    dr = rstd * (g - xhat * (g * xhat).mean(dim=-1, keepdim=True))
    if not rms:
        dr = dr - rstd * g.mean(dim=-1, keepdim=True)
    grad_weight = None if weight is None else (dy * xhat).sum(dim=0)
    grad_bias = None if bias is None else dy.sum(dim=0)
    if grad_residual_out is not None:
        dr = dr + grad_residual_out.to(dtype)
    grad_x = _dropped(dr, dropout_p, seed, dtype)
    # copy=True: without dropout grad_x is dr itself, and op outputs may not alias each other.
    grad_residual = dr.to(normed.dtype, copy=True) if has_residual else None
    grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
    grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_x.to(x_dtype or normed.dtype), grad_residual, grad_weight, grad_bias
