"""Dropout for the torch backend: keep-masks regenerated from a seed, and the eager-mode dropout.

Both draw their masks with :func:`bernoulli_keep_mask`: 32 random bits per element, two elements
per full-range 64-bit draw of PyTorch's generator. On the CPU that is about twice as fast as
``bernoulli_``, which in ``torch.profiler`` took 26% of the CPU time of a training step of
``nn.TransformerEncoderLayer`` (B=8, L=128, E=256, dropout 0.1), second only to the matrix
products.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastformer.dispatch import func_transforms_active

_INT32_MIN = -(2**31)


def bernoulli_keep_mask(shape, dropout_p: float, device, generator: torch.Generator | None = None) -> Tensor:
    """Bool tensor of ``shape``, each element True (kept) with probability 1 - ``dropout_p``.

    Each element compares 32 uniform random bits ``u`` (read as an int32) with a threshold: it is
    dropped when ``u < round(p * 2^32) - 2^31``, so the drop probability is ``p`` rounded to a
    multiple of 2^-32. The bits come from ``generator`` (PyTorch's default one when None, so
    ``torch.manual_seed`` reproduces the mask).
    """
    numel = math.prod(shape)
    if dropout_p >= 1.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    # from = int64 min with no upper bound: uniform over all 2^64 values (both int32 halves uniform).
    words = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device)
    words.random_(-(2**63), None, generator=generator)
    bits = words.view(torch.int32)[:numel].view(shape)
    return bits >= round(dropout_p * 2**32) + _INT32_MIN


def dropout_keep_mask(seed: Tensor, shape, dropout_p: float, device) -> Tensor:
    """:func:`bernoulli_keep_mask` from a generator seeded with ``seed``: the same (seed, shape,
    dropout_p, device) always gives the same mask, so the backward regenerates the forward's.

    ``seed`` is the one-element int64 CPU tensor that fastformer draws from PyTorch's default
    generator per call, so ``torch.manual_seed`` makes dropout reproducible. Seeding a generator
    is host work that a CUDA graph cannot replay, so capturing this (the torch backend's op under
    ``torch.compile(mode="reduce-overhead")``, say) is refused with an error saying so.
    """
    if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "fastformer (torch backend): dropout regenerated from a seed cannot be captured in a CUDA graph "
            "(it seeds a torch.Generator on the host, which a replay would not redo); use the triton or "
            "cuda backend, whose kernels load the seed on the GPU, or capture without dropout")
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed.item()))
    return bernoulli_keep_mask(shape, dropout_p, device, generator)


# --------------------------------------------------------------------------------------------
# Eager mode (under PyTorch's autograd)
# --------------------------------------------------------------------------------------------
def uses_own_sampler(x: Tensor) -> bool:
    """Whether the eager dropout of ``x`` draws its mask with :func:`bernoulli_keep_mask` instead
    of calling ``F.dropout``.

    Only on the CPU (where ``F.dropout`` spends most of its time in ``bernoulli_``), in float32 /
    float64 (where the scaled mask ``keep / (1 - p)`` in x's dtype is as accurate as PyTorch's
    scalar scale), outside ``torch.compile`` (whose generated dropout is fused and faster),
    outside torch.func transforms (``F.dropout`` follows vmap's randomness modes; a mask drawn in
    place into a new tensor cannot) and outside ``torch.jit.trace`` (which cannot record the int32
    view of the random words). GPUs keep PyTorch's one-pass fused dropout kernel.
    """
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and not torch.compiler.is_compiling() and not func_transforms_active()
            and not torch.jit.is_tracing())


def scaled_keep_mask(x: Tensor, dropout_p: float) -> Tensor:
    """``keep / (1 - p)`` in x's dtype and shape: 0 where dropped, the rescale where kept."""
    keep = bernoulli_keep_mask(x.shape, dropout_p, x.device)
    return keep.to(x.dtype).mul_(1.0 / (1.0 - dropout_p))


def dropout(x: Tensor, dropout_p: float, training: bool = True) -> Tensor:
    """``torch.nn.functional.dropout(x, dropout_p, training)``, differentiable, with the mask drawn
    by :func:`bernoulli_keep_mask` where that is faster (see :func:`uses_own_sampler`)."""
    if not training or dropout_p == 0.0:
        return x
    if dropout_p >= 1.0 or not uses_own_sampler(x):
        return F.dropout(x, dropout_p, training=True)
    return x * scaled_keep_mask(x, dropout_p)


def dropout_add(x: Tensor, residual: Tensor, dropout_p: float, training: bool = True) -> Tensor:
    """``dropout(x) + residual`` (x and residual of one shape), in one pass where :func:`dropout`
    draws its own mask."""
    if training and 0.0 < dropout_p < 1.0 and uses_own_sampler(x) and residual.dtype == x.dtype:
        return torch.addcmul(residual, x, scaled_keep_mask(x, dropout_p))
    return dropout(x, dropout_p, training) + residual
