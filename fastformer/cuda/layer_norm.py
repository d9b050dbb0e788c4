"""Fused residual + dropout + LayerNorm / RMSNorm on the CUDA backend.

The kernels are ``csrc/layer_norm/`` (one warp per row up to 512-1024 values, one block per row
beyond, 16-byte accesses when aligned, float32 statistics, Philox dropout identical to the Triton
backend's); they are the ops ``torch.ops.fastformer.cuda_residual_norm_fwd`` / ``_bwd``. This
module is the launcher with the Triton launcher's contract (``fastformer/triton/layer_norm.py``);
the autograd layer is shared (``fastformer/library.py``).
"""

from __future__ import annotations

import torch

from fastformer import cuda

# The widest row a kernel keeps in registers (csrc/layer_norm/residual_norm.h: kMaxHidden).
MAX_HIDDEN = 16384
DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})
# x and residual may have different dtypes (a 16-bit sublayer output meeting a float32 residual
# stream under autocast): the kernels read a 16-bit x next to a float32 stream and write grad_x
# back in x's dtype, with no cast kernel. Other pairs (a residual narrower than the stream type)
# get the residual cast here.
MIXED_DTYPES = True


def support():
    """What the kernels take, for ``fastformer.dispatch`` (both norms)."""
    from fastformer.dispatch import Support

    return Support(devices=frozenset({"cuda"}), dtypes=DTYPES,
                   features=frozenset({"dropout", "residual", "weight", "bias"}),
                   max_hidden=MAX_HIDDEN)


def _columns_contiguous(t):
    """The kernels take a row stride and contiguous columns."""
    return t if t is None or t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _param(t):
    return None if t is None else t.contiguous()


def residual_norm_fwd(x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual):
    """Returns (out, residual_out or empty, mean or empty, rstd); x and residual are (rows, N),
    out and residual_out in the dtype of x + residual."""
    if residual is not None and residual.dtype != x.dtype:
        stream_dtype = torch.promote_types(x.dtype, residual.dtype)
        # The kernels' stream type is the residual's; x is it, or 16-bit next to float32.
        residual = residual.to(stream_dtype)
    seed = cuda.seed_argument("residual_norm (cuda)", seed, x)
    return cuda.kernel_ops().cuda_residual_norm_fwd(
        _columns_contiguous(x), _columns_contiguous(residual), _param(weight), _param(bias),
        float(eps), float(dropout_p), bool(rms), seed, bool(store_residual))


def residual_norm_bwd(grad_out, grad_residual_out, normed, weight, bias, mean, rstd, dropout_p, rms,
                      seed, has_residual, *, x_dtype=None):
    """Returns (grad_x, grad_residual or None, grad_weight or None, grad_bias or None).

    ``mean`` is not read: the kernel recomputes the centring from ``normed`` exactly as the
    forward did (more accurate than a stored float32 mean for rows with a large mean). grad_x
    comes in ``x_dtype`` (default: normed's), grad_residual in normed's dtype.
    """
    seed = cuda.seed_argument("residual_norm (cuda)", seed, normed)
    grad_x, grad_residual, grad_weight, grad_bias = cuda.kernel_ops().cuda_residual_norm_bwd(
        _columns_contiguous(grad_out), _columns_contiguous(grad_residual_out),
        _columns_contiguous(normed), _param(weight), _param(bias), rstd.contiguous(),
        float(dropout_p), bool(rms), seed, bool(has_residual), x_dtype)
    return (grad_x, grad_residual if has_residual else None,
            grad_weight if weight is not None else None, grad_bias if bias is not None else None)
