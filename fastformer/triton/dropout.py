"""Dropout keep-masks from Triton's counter-based Philox RNG, regenerated instead of stored.

A tensor is viewed as rows of its last dim, L long. Element (r, c) is kept when u >= p, where u is
word c % 4 of ``tl.rand4x(seed, g)`` with g = r * ceil(L / 4) + c // 4: one Philox-4x32-10 call
for every 4 consecutive elements of a row (each row's groups padded to 4, so that no group
straddles two rows), all four of its words used. The forward and backward kernels of an op
evaluate the same function, so the backward needs no stored mask, and :func:`dropout_keep_mask`
evaluates it for a whole tensor: the debug path that lets tests build a reference with exactly the
kernels' mask. The CUDA backend evaluates the same function (``csrc/common/philox.cuh``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastformer.validation import check_seed

# Group offsets are int32 while the tensor's elements fit, else int64. tl.rand4x runs Philox-4x32
# either way, with the counter (offset_lo, offset_hi, 0, 0), so both give the same mask; int32 is
# cheaper.
INT32_LIMIT = 2**31
WORDS = 4  # elements per Philox call


@triton.jit
def dropout_keep(seed, rows, col_start, row_length, dropout_p, WIDE_OFFSETS: tl.constexpr,
                 BLOCK_COLS: tl.constexpr, TRANSPOSED: tl.constexpr = False):
    """The keep-mask of a (rows, BLOCK_COLS) tile, or of its transpose (BLOCK_COLS, rows) with
    TRANSPOSED: rows holds the tile's row indices (1-D), its columns are col_start .. col_start +
    BLOCK_COLS - 1 with col_start a multiple of 4, and True marks the elements that survive dropout
    with probability 1 - dropout_p. One tl.rand4x call per group of 4 columns.

    The four words are interleaved with tl.join; the transpose is built in its own orientation
    (each word broadcast over its group, then each column's word selected), because Triton 3.2
    cannot lay out a joined tile that is then transposed (tt.join fails to infer its type), and
    the broadcast form in the untransposed orientation makes Triton 3.8 draw each group twice."""
    quads = col_start // 4 + tl.arange(0, BLOCK_COLS // 4)
    if TRANSPOSED:
        groups = quads[:, None] + rows[None, :] * ((row_length + 3) // 4)
    else:
        groups = rows[:, None] * ((row_length + 3) // 4) + quads[None, :]
    if not WIDE_OFFSETS:
        groups = groups.to(tl.int32)
    u0, u1, u2, u3 = tl.rand4x(seed, groups)
    if TRANSPOSED:
        word = (tl.arange(0, BLOCK_COLS) % 4)[:, None]  # the word each column (here: row) takes
        u = tl.where(word == 0, _spread(u0, BLOCK_COLS),
                     tl.where(word == 1, _spread(u1, BLOCK_COLS),
                              tl.where(word == 2, _spread(u2, BLOCK_COLS), _spread(u3, BLOCK_COLS))))
    else:
        # (rows, BLOCK_COLS / 4, 2, 2) with [.., k, l] = u_{2k + l}, flattened: column c takes u_{c % 4}
        u = tl.reshape(tl.join(tl.join(u0, u2), tl.join(u1, u3)), (rows.shape[0], BLOCK_COLS))
    return u >= dropout_p


@triton.jit
def _spread(word, BLOCK_COLS: tl.constexpr):
    """A (BLOCK_COLS / 4, rows) tile of one Philox word repeated over each group's 4 columns:
    (BLOCK_COLS, rows)."""
    rows: tl.constexpr = word.shape[1]
    return tl.reshape(tl.broadcast_to(word[:, None, :], (BLOCK_COLS // 4, 4, rows)), (BLOCK_COLS, rows))


@triton.jit
def _dropout_keep_mask_kernel(
    KEEP,  # out: (rows, row_length) bool contiguous, the keep-mask
    SEED,  # in: the seed, one int64
    rows, row_length, col_blocks, dropout_p,
    WIDE_OFFSETS: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """One program per (BLOCK_ROWS x BLOCK_COLS) tile, on a 1-D grid (no grid-axis limits)."""
    seed = tl.load(SEED)
    tile = tl.program_id(0).to(tl.int64)
    row_idx = (tile // col_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    col_start = (tile % col_blocks) * BLOCK_COLS
    cols = col_start + tl.arange(0, BLOCK_COLS)
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


def dropout_keep_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep-mask the kernels use for a tensor of ``shape`` (viewed as rows of its last dim)."""
    keep = torch.empty(shape, dtype=torch.bool, device=device)
    seed = torch.as_tensor(seed, dtype=torch.int64).reshape(()).to(keep.device)  # always loaded
    if keep.numel():
        row_length = keep.shape[-1] if keep.dim() else 1
        rows = keep.numel() // row_length
        block_cols = min(256, max(WORDS, triton.next_power_of_2(row_length)))
        block_rows = max(1, 1024 // block_cols)
        col_blocks = triton.cdiv(row_length, block_cols)
        _dropout_keep_mask_kernel[(triton.cdiv(rows, block_rows) * col_blocks,)](
            keep, seed, rows, row_length, col_blocks, dropout_p,
            WIDE_OFFSETS=wide_offsets(keep.numel()), BLOCK_ROWS=block_rows, BLOCK_COLS=block_cols)
    return keep
