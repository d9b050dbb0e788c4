"""Bias + GELU composed from PyTorch ops, computed in float32 (at least) and rounded once.

Forward:  h = x + bias;  y = gelu(h)
    erf:  gelu(h) = h * Phi(h) = 0.5 h (1 + erf(h / sqrt 2))
    tanh: gelu(h) = 0.5 h (1 + tanh(u)),  u = sqrt(2/pi) (h + 0.044715 h^3)
Backward: dh = dy * gelu'(h) (aten.gelu_backward);  dx = dh;  dbias = sum over leading dims of dh.
h is recomputed from x and bias in the backward instead of being stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The backward below is composed of differentiable PyTorch ops: autograd can differentiate it
# again (double backward; fastformer.library reads this).
DIFFERENTIABLE_BACKWARD = True


def _pre_activation(x, bias):
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    return h if bias is None else h + bias.to(h.dtype)


def bias_gelu_fwd(x, bias, approximate):
    return F.gelu(_pre_activation(x, bias), approximate=approximate).to(x.dtype)


# Composed of differentiable PyTorch ops: in eager mode it runs under PyTorch's autograd.
eager_bias_gelu_fwd = bias_gelu_fwd


def bias_gelu_bwd(grad_out, x, bias, approximate):
    """Returns (grad_x, grad_bias or None)."""
    h = _pre_activation(x, bias)
    grad_h = torch.ops.aten.gelu_backward(grad_out.to(h.dtype), h, approximate=approximate)
    grad_bias = None if bias is None else grad_h.reshape(-1, h.shape[-1]).sum(dim=0).to(bias.dtype)
    return grad_h.to(x.dtype), grad_bias
