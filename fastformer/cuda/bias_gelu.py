"""Bias + GELU + dropout on the CUDA backend: the ops ``torch.ops.fastformer.cuda_bias_gelu_fwd`` /
``_bwd`` (kernels in ``csrc/gelu/``), behind the Triton launcher's contract
(``fastformer/triton/bias_gelu.py``); the autograd layer is shared (``fastformer/library.py``).

Forward:  h = x + bias;  y = dropout(gelu(h)),  dropout(g) = keep ? g / (1 - p) : 0
Backward: dh = (keep ? dy / (1 - p) : 0) * gelu'(h);  dx = dh;  dbias = sum over rows of dh

x is viewed as (rows, N) with a row stride and contiguous columns (copied only when no such view
exists). keep is the Philox mask of that view (``fastformer/triton/dropout.py``, bit-identical to the
Triton backend's), computed from the seed in both kernels, never stored; the kernels load the seed
from the device. The bias gradient is summed from per-row-group partial sums (deterministic).
"""

from __future__ import annotations

import torch

from fastformer import cuda

DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})


def support():
    """What the kernels take, for ``fastformer.dispatch``."""
    from fastformer.dispatch import Support

    return Support(devices=frozenset({"cuda"}), dtypes=DTYPES,
                   features=frozenset({"bias", "tanh", "erf", "dropout"}))


def _row_length(x: torch.Tensor) -> int:
    """N, the last dim of x, which the kernels view as (rows, N)."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"bias_gelu (cuda): x must have a last dim of at least 1, got shape {tuple(x.shape)}")
    return x.shape[-1]


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (rows, N) with a row stride and unit column stride, copying only when needed."""
    t = t.reshape(-1, n)
    return t.contiguous() if n > 1 and t.stride(1) != 1 else t


def bias_gelu_fwd(x, bias, approximate, dropout_p, seed):
    """dropout(gelu(x + bias)): x (..., N) any strides; bias (N,) in x's dtype or float32, or None;
    dropout_p in [0, 1); seed the 0-dim int64 seed on x's device (None without dropout).

    Returns a contiguous tensor of x's shape and dtype.
    """
    n = _row_length(x)
    seed = cuda.seed_argument("bias_gelu (cuda)", seed, x)
    out = cuda.kernel_ops().cuda_bias_gelu_fwd(
        _as_rows(x, n), None if bias is None else bias.contiguous(), approximate, float(dropout_p), seed)
    return out.view(x.shape)


def bias_gelu_bwd(grad_out, x, bias, approximate, dropout_p, seed):
    """Returns (grad_x, grad_bias or None): grad_x contiguous in x's dtype, grad_bias in bias's.

    dropout_p and seed are the forward's: the kernel draws the same mask again.
    """
    if grad_out.shape != x.shape:
        raise ValueError(f"bias_gelu (cuda): grad_out must have x's shape {tuple(x.shape)}, "
                         f"got {tuple(grad_out.shape)}")
    n = _row_length(x)
    seed = cuda.seed_argument("bias_gelu (cuda)", seed, x)
    grad_x, grad_bias = cuda.kernel_ops().cuda_bias_gelu_bwd(
        _as_rows(grad_out, n), _as_rows(x, n), None if bias is None else bias.contiguous(),
        approximate, float(dropout_p), seed)
    return grad_x.view(x.shape), grad_bias if bias is not None else None
