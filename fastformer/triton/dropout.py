"""Dropout keep-masks from Triton's counter-based Philox RNG, regenerated instead of stored.

Element ``i`` of a tensor viewed as (rows, N) is kept when ``rand(seed, i) >= p`` with
``i = row * N + column``; the forward and backward kernels of an op evaluate the same expression,
so the backward needs no stored mask. :func:`dropout_keep_mask` evaluates it for a whole tensor:
the debug path that lets tests build a reference with exactly the kernels' mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Offsets are int32 while they fit, else int64. tl.rand runs Philox-4x32 either way, with the
# counter (offset_lo, offset_hi, 0, 0), so both give the same mask; int32 is cheaper. The CUDA
# backend evaluates the same function (csrc/common/philox.cuh).
INT32_LIMIT = 2**31


@triton.jit
def dropout_keep(seed, offsets, dropout_p, WIDE_OFFSETS: tl.constexpr):
    """True where the element at ``offsets`` survives dropout with probability 1 - dropout_p."""
    if not WIDE_OFFSETS:
        offsets = offsets.to(tl.int32)
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _dropout_keep_mask_kernel(
    KEEP,  # out: (numel,) bool, the keep-mask of the logical elements 0 .. numel-1
    numel, dropout_p, seed,
    WIDE_OFFSETS: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = dropout_keep(seed, offsets, dropout_p, WIDE_OFFSETS)
    tl.store(KEEP + offsets, keep, mask=offsets < numel)


def wide_offsets(numel: int) -> bool:
    return numel >= INT32_LIMIT


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep-mask the kernels use for a tensor of ``shape`` (viewed as rows of its last dim)."""
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    numel = keep.numel()
    if numel:
        block = 1024
        _dropout_keep_mask_kernel[(triton.cdiv(numel, block),)](
            keep, numel, dropout_p, int(seed.item()), WIDE_OFFSETS=wide_offsets(numel), BLOCK=block)
    return keep
