"""Bias + GELU (+ dropout) composed from PyTorch ops, computed in float32 (at least) and rounded once.

Forward:  h = x + bias;  y = gelu(h) * keep / (1 - p)          (keep = 1 without dropout)
    erf:  gelu(h) = h * Phi(h) = 0.5 h (1 + erf(h / sqrt 2))
    tanh: gelu(h) = 0.5 h (1 + tanh(u)),  u = sqrt(2/pi) (h + 0.044715 h^3)
Backward: dh = dy * keep / (1 - p) * gelu'(h) (aten.gelu_backward);  dx = dh;
          dbias = sum over leading dims of dh.
h is recomputed from x and bias in the backward instead of being stored, and the keep-mask is
regenerated from the call's seed (``torch_backend.dropout.dropout_keep_mask``). In eager mode
(:func:`eager_bias_gelu_fwd`) PyTorch's autograd records the forward, dropout included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastformer.torch_backend.dropout import dropout, dropout_keep_mask

# The backward below is composed of differentiable PyTorch ops: autograd can differentiate it
# again (double backward; fastformer.library reads this).
DIFFERENTIABLE_BACKWARD = True


def _pre_activation(x, bias):
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    return h if bias is None else h + bias.to(h.dtype)


def _scaled_keep(seed, like, dropout_p):
    """keep / (1 - p) from the seed, in ``like``'s shape and dtype (None without dropout)."""
    if dropout_p == 0.0:
        return None
    return dropout_keep_mask(seed, like.shape, dropout_p, like.device).to(like.dtype) / (1.0 - dropout_p)


def bias_gelu_fwd(x, bias, approximate, dropout_p, seed):
    y = F.gelu(_pre_activation(x, bias), approximate=approximate)
    keep = _scaled_keep(seed, y, dropout_p)
    return (y if keep is None else y * keep).to(x.dtype)


def eager_bias_gelu_fwd(x, bias, approximate, dropout_p, seed):
    """The forward under PyTorch's autograd (eager mode), with a dropout mask drawn now (no seed)."""
    return dropout(F.gelu(_pre_activation(x, bias), approximate=approximate), dropout_p).to(x.dtype)


def bias_gelu_bwd(grad_out, x, bias, approximate, dropout_p, seed):
    """Returns (grad_x, grad_bias or None)."""
    h = _pre_activation(x, bias)
    grad_y = grad_out.to(h.dtype)
    keep = _scaled_keep(seed, h, dropout_p)
    grad_h = torch.ops.aten.gelu_backward(grad_y if keep is None else grad_y * keep, h, approximate=approximate)
    grad_bias = None if bias is None else grad_h.reshape(-1, h.shape[-1]).sum(dim=0).to(bias.dtype)
    return grad_h.to(x.dtype), grad_bias
