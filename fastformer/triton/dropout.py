"""Dropout keep-masks from Triton's counter-based Philox RNG, regenerated instead of stored.

A tensor is viewed as rows of its last dim, L long. Element (r, c) is kept when h >= t, where h is
16-bit half c % 2 (0: the low half) of word (c % 8) // 2 of Philox-4x32-10 with key (seed_lo,
seed_hi) and counter (g_lo, g_hi, 0, 0), g = r * ceil(L / 8) + c // 8 (:func:`_philox`), and t =
round(p * 2^16) (:func:`drop_threshold`): one call for every 8 consecutive elements of a row (each
row's groups padded to 8, so that no group straddles two rows), all 128 of its bits used. A 16-bit
uniform rounds p to the nearest multiple of 2^-16 (p = 0.1 drops with probability 0.100006;
FlashAttention compares 8 bits, which rounds it to a multiple of 1/256), and halves the
random-number work of a 32-bit uniform per element. The forward and backward kernels of an op
evaluate the same function, so the backward needs no stored mask, and :func:`dropout_keep_mask`
evaluates it for a whole tensor: the debug path that lets tests build a reference with exactly the
kernels' mask. The CUDA backend evaluates the same function (``csrc/common/philox.cuh``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastformer.triton import _major_minor, cdiv, next_power_of_2
from fastformer.validation import check_seed

# Past this many elements the groups' Philox counters take a high word (WIDE_OFFSETS).
INT32_LIMIT = 2**31
GROUP = 8  # elements per Philox call: the two 16-bit halves of each of its four words


@triton.jit
def _philox(seed, groups, WIDE_OFFSETS: tl.constexpr):
    """The four 32-bit words of Philox-4x32-10 for each group: key (seed_lo, seed_hi), counter
    (group_lo, group_hi, 0, 0), group_hi = 0 unless WIDE_OFFSETS. What tl.randint4x computes from
    Triton 3.4 on; before, it ran Philox-4x64 on int64 offsets (another mask past 2^31 elements),
    so the counter words are split here."""
    low = groups.to(tl.uint32)  # the low 32 bits (groups are never negative)
    zero = low * 0
    if WIDE_OFFSETS:
        high = (groups.to(tl.int64) >> 32).to(tl.uint32)
    else:
        high = zero
    return tl.philox(seed, low, high, zero, zero)


@triton.jit
def drop_threshold(dropout_p):
    """round(p * 2^16) as a uint32, computed in float32 (p * 2^16 is exact): an element whose
    16-bit uniform is below it is dropped, so p = 1 drops everything and p = 0 nothing."""
    return (tl.cast(dropout_p, tl.float32) * 65536.0 + 0.5).to(tl.uint32)


@triton.jit
def dropout_keep(seed, rows, col_start, row_length, dropout_p, WIDE_OFFSETS: tl.constexpr,
                 BLOCK_COLS: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """The keep-mask of a (rows, BLOCK_COLS) tile, or of its transpose (BLOCK_COLS, rows) with
    TRANSPOSED: rows holds the tile's row indices (1-D), its columns are col_start .. col_start +
    BLOCK_COLS - 1 with col_start a multiple of 8, and True marks the elements that survive dropout
    with probability 1 - dropout_p. One Philox call per group of 8 columns: the eight halves
    are interleaved with tl.join (a broadcast of each word over its group instead makes Triton 3.8
    draw each group twice), and the transpose is that tile transposed."""
    if TRANSPOSED and not _JOIN_THEN_TRANSPOSE:
        keep = _dropout_keep_transposed_by_selects(seed, rows, col_start, row_length, dropout_p, WIDE_OFFSETS,
                                                   BLOCK_COLS)
    else:
        octets = col_start // 8 + tl.arange(0, BLOCK_COLS // 8)
        groups = rows[:, None] * ((row_length + 7) // 8) + octets[None, :]
        u0, u1, u2, u3 = _philox(seed, groups, WIDE_OFFSETS)
        # (rows, BLOCK_COLS / 8, 2, 2) with [.., k, l] = u_{2k + l}, then the halves as the last
        # dim, flattened: column c takes half c % 2 of u_{(c % 8) // 2}
        words = tl.join(tl.join(u0, u2), tl.join(u1, u3))
        halves = tl.reshape(tl.join(words & 0xFFFF, words >> 16), (rows.shape[0], BLOCK_COLS))
        if TRANSPOSED:
            halves = tl.trans(halves)
        keep = halves >= drop_threshold(dropout_p)
    return keep


# Triton 3.2 and 3.3 cannot lay out a joined tile that is then transposed ("'tt.join' op failed to
# infer returned types"); there the transposed mask is built in its own orientation, each word
# broadcast over its group and each column's word and half selected. Same mask, but those Tritons
# compute each Philox call more than once (sm_90 PTX of the dK/dV kernel, 64 x 64 tiles: 2x with
# Triton 3.2, 8x with 3.3, as many calls as the groups of 4 used before); Triton 3.4 to 3.8 compile
# the joined form with each call once.
_JOIN_THEN_TRANSPOSE = tl.constexpr(_major_minor(triton.__version__) >= (3, 4))


@triton.jit
def _dropout_keep_transposed_by_selects(seed, rows, col_start, row_length, dropout_p, WIDE_OFFSETS: tl.constexpr,
                                        BLOCK_COLS: tl.constexpr):
    octets = col_start // 8 + tl.arange(0, BLOCK_COLS // 8)
    groups = octets[:, None] + rows[None, :] * ((row_length + 7) // 8)
    u0, u1, u2, u3 = _philox(seed, groups, WIDE_OFFSETS)
    column = tl.arange(0, BLOCK_COLS)[:, None]  # the tile's rows are the mask's columns
    word = (column % 8) // 2
    u = tl.where(word == 0, _spread(u0, BLOCK_COLS),
                 tl.where(word == 1, _spread(u1, BLOCK_COLS),
                          tl.where(word == 2, _spread(u2, BLOCK_COLS), _spread(u3, BLOCK_COLS))))
    halves = (u >> (16 * (column % 2)).to(tl.uint32)) & 0xFFFF
    return halves >= drop_threshold(dropout_p)


@triton.jit
def _spread(word, BLOCK_COLS: tl.constexpr):
    """A (BLOCK_COLS / 8, rows) tile of one Philox word repeated over each group's 8 columns:
    (BLOCK_COLS, rows)."""
    rows: tl.constexpr = word.shape[1]
    return tl.reshape(tl.broadcast_to(word[:, None, :], (BLOCK_COLS // 8, 8, rows)), (BLOCK_COLS, rows))


@triton.jit
def _dropout_keep_mask_kernel(
    KEEP,  # out: (rows, row_length) bool contiguous, the keep-mask
    SEED,  # in: the seed, one int64
    rows, row_length, col_blocks, dropout_p,
    WIDE_OFFSETS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr, TRANSPOSED: tl.constexpr,
):
    """One program per (BLOCK_ROWS x BLOCK_COLS) tile, on a 1-D grid (no grid-axis limits); with
    TRANSPOSED, each tile is drawn as the dK/dV kernel draws it, transposed, and stored back."""
    seed = tl.load(SEED)
    tile = tl.program_id(0).to(tl.int64)
    row_idx = (tile // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_start = (tile % col_blocks) * BLOCK_COLS
    cols = col_start + tl.arange(0, BLOCK_COLS)
    if TRANSPOSED:
        keep_t = dropout_keep(seed, row_idx, col_start, row_length, dropout_p, WIDE_OFFSETS, BLOCK_COLS,
                              TRANSPOSED=True)
        tl.store(KEEP + row_idx[None, :] * row_length + cols[:, None], keep_t,
                 mask=(row_idx[None, :] < rows) & (cols[:, None] < row_length))
    else:
        keep = dropout_keep(seed, row_idx, col_start, row_length, dropout_p, WIDE_OFFSETS, BLOCK_COLS)
        tl.store(KEEP + row_idx[:, None] * row_length + cols[None, :], keep,
                 mask=(row_idx[:, None] < rows) & (cols[None, :] < row_length))


def wide_offsets(numel: int) -> bool:
    return numel >= INT32_LIMIT


def seed_pointer(seed: torch.Tensor | None, dropout_p: float, placeholder: torch.Tensor) -> torch.Tensor:
    """What a kernel's SEED argument gets: the call's seed (a 0-dim int64 tensor on the data's
    device, which the kernel loads: no host read, and a CUDA graph replay reads the seed its own
    draw wrote), or ``placeholder`` (never read) without dropout."""
    if dropout_p == 0.0:
        return placeholder
    if seed is None:
        raise ValueError(f"fastformer (triton): dropout_p = {dropout_p} > 0 needs a seed, got None")
    check_seed("fastformer (triton)", seed, placeholder.device)
    return seed


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float, device, *,
                      transposed_tiles: bool = False) -> torch.Tensor:
    """The keep-mask the kernels use for a tensor of ``shape`` (viewed as rows of its last dim).
    ``transposed_tiles``: evaluated through the transposed tiles of the attention dK/dV kernel
    (the same mask, by another construction; for tests)."""
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(()).to(keep.device)  # always loaded
    if keep.numel():
        row_length = keep.shape[-1] if keep.dim() else 1
        rows = keep.numel() // row_length
        block_cols = min(256, max(GROUP, next_power_of_2(row_length)))
        block_rows = max(1, 1024 // block_cols)
        col_blocks = cdiv(row_length, block_cols)
        _dropout_keep_mask_kernel[(cdiv(rows, block_rows) * col_blocks,)](
            keep, seed, rows, row_length, col_blocks, dropout_p,
            WIDE_OFFSETS=wide_offsets(keep.numel()), BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols,
            TRANSPOSED=transposed_tiles)
    return keep
