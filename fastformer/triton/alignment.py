"""Vector-width hints: what the launchers prove about row alignment, told to the compiler.

Triton specialises each integer argument on whether it is a multiple of 16 and each pointer on
whether it is 16-byte aligned. A row length or row stride that is a multiple of 8 but not of 16
(hidden size 200, head dim 56) or a multiple of 2 (head dim 50) therefore looks unaligned, and
every load of a row becomes one scalar access per element; in the attention kernels the tiles
then also go through registers instead of cp.async, without software pipelining. The launchers
compute ALIGN with :func:`vector_alignment`, the widest vector every row starts on, and the
kernels say so with :func:`tile` / :func:`row`: ``tl.multiple_of`` on the pointers and
``tl.max_constancy`` on the masks.

The hints attach to the ops that compute the pointers and masks, which is why these helpers take
the base pointer and the offsets and add them here: a hint on a function argument is dropped.
"""

from __future__ import annotations

import triton
import triton.language as tl

VECTOR_BYTES = 16  # the widest global access


def vector_alignment(extents, tensors) -> int:
    """The widest vector, in elements (a power of two, at most 16 bytes of the narrowest dtype),
    that every row of every tensor in ``tensors`` (rows along the leading dims, elements along the
    last) starts on, with every length in ``extents`` (where the row masks change) a multiple of
    it; 1 when a tensor's last dim is strided."""
    # The largest power of two dividing every value is the lowest set bit of their bitwise or
    # (one pass: this runs at every launch).
    bits = 0
    narrowest = VECTOR_BYTES
    for t in tensors:
        strides = t.stride()
        if strides[-1] != 1 and t.shape[-1] > 1:
            return 1
        element_size = t.element_size()
        narrowest = min(narrowest, element_size)
        bits |= t.data_ptr() // element_size  # an aligned row start: its address over the element size
        for stride in strides[:-1]:
            bits |= stride
    for extent in extents:
        bits |= extent
    widest = VECTOR_BYTES // narrowest
    return min(widest, bits & -bits) if bits else widest


@triton.jit
def tile(BASE, offsets, row_ok, col_ok, ALIGN: tl.constexpr, CONTIGUOUS_AXIS: tl.constexpr):
    """(pointers, mask) of the 2-D tile BASE + offsets, masked by row_ok & col_ok, whose
    contiguous axis (CONTIGUOUS_AXIS, 0 or 1) holds rows that start ALIGN elements aligned and
    whose col_ok changes only at multiples of ALIGN along that axis."""
    ptrs = BASE + offsets
    mask = row_ok & col_ok
    if ALIGN > 1:
        align_bytes: tl.constexpr = ALIGN * ptrs.dtype.element_ty.primitive_bitwidth // 8
        ptrs = tl.multiple_of(ptrs, [align_bytes, align_bytes])
        if CONTIGUOUS_AXIS == 1:
            mask = tl.max_constancy(mask, [1, ALIGN])
        else:
            mask = tl.max_constancy(mask, [ALIGN, 1])
    return ptrs, mask


@triton.jit
def row(BASE, cols, n, ALIGN: tl.constexpr):
    """(pointers, mask) of the row BASE + cols, cols < n, with BASE ALIGN elements aligned, cols
    starting at a multiple of ALIGN and n a multiple of ALIGN."""
    ptrs = BASE + cols
    mask = cols < n
    if ALIGN > 1:
        align_bytes: tl.constexpr = ALIGN * ptrs.dtype.element_ty.primitive_bitwidth // 8
        ptrs = tl.multiple_of(ptrs, [align_bytes])
        mask = tl.max_constancy(mask, [ALIGN])
    return ptrs, mask
