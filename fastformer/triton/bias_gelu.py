"""Bias + GELU (+ dropout) in Triton: one memory-bound kernel for the forward, one for the backward.

Forward:  h = x + bias;  y = gelu(h) * keep / (1 - p)      (exact erf or tanh approximation)
Backward: dh = dy * keep / (1 - p) * gelu'(h);  dx = dh;  dbias = sum of dh over every leading dim
h is recomputed from x and bias in the backward instead of being stored, and the dropout keep-mask
(keep = 1 without dropout) is regenerated from the seed (``fastformer/triton/dropout.py``: element
(row, col) of x viewed as (rows, N)), so the fused dropout stores nothing.

x is viewed as (rows, N) with a row stride (``reshape(-1, N)`` copies only when no such view
exists) and tiled in 2-D blocks of BLOCK_M rows x BLOCK_N columns; each program loads its slice of
bias once. The forward reads x once and writes y once. The backward reads dy and x once and writes
dx once; its programs each walk a group of row blocks and keep a float32 column sum of dh in
registers, written once per program to a (groups, N) float32 buffer that the launcher sums over
dim 0: a fixed reduction order, so the bias gradient is deterministic (no float atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastformer.triton import alignment, cdiv, interpreter_enabled, next_power_of_2, num_sms, on_device
from fastformer.triton.dropout import dropout_keep, seed_pointer, wide_offsets


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _gelu(h, APPROXIMATE_TANH: tl.constexpr):
    """gelu(h) in float32 (see _bias_gelu_fwd_kernel for the math)."""
    if APPROXIMATE_TANH:
        # 0.5 (1 + tanh(u)) = sigmoid(2u): saturates to 0 or 1 for large |u|, never inf / inf.
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # sqrt(2/pi) (h + 0.044715 h^3)
        y = h * tl.sigmoid(2.0 * u)
    else:
        y = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476))  # h Phi(h); 0.707.. = 1/sqrt(2)
    return y


@triton.jit
def _gelu_grad(h, APPROXIMATE_TANH: tl.constexpr):
    """gelu'(h) in float32 (see _bias_gelu_fwd_kernel for the math)."""
    if APPROXIMATE_TANH:
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        s = tl.sigmoid(2.0 * u)  # s = 0.5 (1 + t), 1 - t^2 = 4 s (1 - s), t = tanh(u)
        # 0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 h^2); 3 * 0.044715 = 0.134145.
        # s (1 - s) is exactly 0 in float32 once |h| > 20; clamping h there keeps 0 * inf (NaN)
        # out of the second term for huge |h| and changes nothing else.
        hc = tl.minimum(tl.maximum(h, -20.0), 20.0)
        g = s + 2.0 * hc * s * (1.0 - s) * 0.7978845608028654 * (1.0 + 0.134145 * hc * hc)
    else:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))  # Phi(h)
        pdf = 0.3989422804014327 * tl.exp(-0.5 * h * h)  # phi(h); 0.398.. = 1/sqrt(2 pi)
        g = cdf + h * pdf
    return g


@triton.jit
def _bias_gelu_fwd_kernel(
    X,  # in: (rows, N) input, row stride stride_x_row, unit column stride
    BIAS,  # in: (N,) contiguous, x's dtype or float32; not read unless HAS_BIAS
    OUT,  # out: (rows, N), row stride stride_out_row, unit column stride, x's dtype
    SEED,  # in: the dropout seed, one int64; not read unless HAS_DROPOUT
    rows, N,
    stride_x_row,  # elements between consecutive rows of X (may be 0 for a broadcast input)
    stride_out_row,  # elements between consecutive rows of OUT
    dropout_p,  # drop probability p (HAS_DROPOUT)
    APPROXIMATE_TANH: tl.constexpr,  # tanh approximation instead of the exact erf form
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,  # int64 Philox offsets (rows * N >= 2^31)
    ALIGN: tl.constexpr,  # every row starts ALIGN elements aligned, N a multiple of it (vectors)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile (a power of two)
):
    """out = gelu(x + bias) * keep / (1 - p) on one BLOCK_M x BLOCK_N tile; math in float32,
    rounded once.

    With h = x + bias, Phi the standard normal CDF and phi its density:
      erf:  gelu(h) = h Phi(h) = 0.5 h (1 + erf(h / sqrt(2)))
            gelu'(h) = Phi(h) + h phi(h),  phi(h) = exp(-h^2 / 2) / sqrt(2 pi)
      tanh: gelu(h) = 0.5 h (1 + tanh(u)),  u = sqrt(2/pi) (h + 0.044715 h^3)
            gelu'(h) = 0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 h^2),  t = tanh(u)
      computed with 0.5 (1 + t) = sigmoid(2u) and 1 - t^2 = 4 sigmoid(2u) (1 - sigmoid(2u)).
    keep: the dropout keep-mask of element (row, col) (dropout_keep; all ones without dropout).
    Backward (_bias_gelu_bwd_kernel): dh = dy keep / (1 - p) gelu'(h); dx = dh; dbias = sum over
    rows of dh.
    """
    row_block = tl.program_id(0)
    col_block = tl.program_id(1)
    rows_in_tile = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = (rows_in_tile < rows)[:, None]
    row_index = rows_in_tile.to(tl.int64)[:, None]  # int64: rows * stride may pass 2^31

    x_ptrs, mask = alignment.tile(X, row_index * stride_x_row + cols[None, :], row_ok, cols[None, :] < N,
                                  ALIGN, 1)
    h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias_ptrs, col_mask = alignment.row(BIAS, cols, N, ALIGN)
        h += tl.load(bias_ptrs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    y = _gelu(h, APPROXIMATE_TANH)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(SEED), rows_in_tile.to(tl.int64), col_block * BLOCK_N, N, dropout_p,
                            WIDE_OFFSETS, BLOCK_N)
        y = tl.where(keep, y / (1.0 - dropout_p), 0.0)
    out_ptrs, _ = alignment.tile(OUT, row_index * stride_out_row + cols[None, :], row_ok, cols[None, :] < N,
                                 ALIGN, 1)
    tl.store(out_ptrs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    GRAD_OUT,  # in: (rows, N) dy, row stride stride_dy_row, unit column stride
    X,  # in: (rows, N) input of the forward, row stride stride_x_row, unit column stride
    BIAS,  # in: (N,) contiguous, x's dtype or float32; not read unless HAS_BIAS
    GRAD_X,  # out: (rows, N) dx, row stride stride_dx_row, unit column stride, x's dtype
    GRAD_BIAS_PARTIAL,  # out: (num_programs(0), N) float32 contiguous, one row per row group;
                        # not written unless HAS_BIAS
    SEED,  # in: the dropout seed, one int64; not read unless HAS_DROPOUT
    rows, N,
    rows_per_program,  # rows of one row group, a multiple of BLOCK_M
    stride_dy_row,  # elements between consecutive rows of GRAD_OUT (0 for a broadcast dy)
    stride_x_row,  # elements between consecutive rows of X
    stride_dx_row,  # elements between consecutive rows of GRAD_X
    dropout_p,  # drop probability p (HAS_DROPOUT)
    APPROXIMATE_TANH: tl.constexpr,  # tanh approximation instead of the exact erf form
    HAS_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr,  # int64 Philox offsets (rows * N >= 2^31)
    ALIGN: tl.constexpr,  # every row starts ALIGN elements aligned, N a multiple of it (vectors)
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile (a power of two)
):
    """dx = dy keep / (1 - p) gelu'(x + bias) over one group of row blocks x BLOCK_N columns, and
    that group's partial bias gradient sum over its rows of dx, in float32.

    h = x + bias and the keep-mask are recomputed. Math as in _bias_gelu_fwd_kernel:
      erf:  gelu'(h) = Phi(h) + h phi(h)
      tanh: gelu'(h) = 0.5 (1 + t) + 0.5 h (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 h^2),  t = tanh(u)
    Padding lanes load dy = 0, so they add 0 to the bias sum.
    """
    group = tl.program_id(0)
    col_block = tl.program_id(1)
    cols = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    bias_ptrs, col_mask = alignment.row(BIAS, cols, N, ALIGN)
    if HAS_BIAS:
        bias = tl.load(bias_ptrs, mask=col_mask, other=0.0).to(tl.float32)
        grad_bias = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    first_row = group * rows_per_program
    for offset in range(0, rows_per_program, BLOCK_M):
        rows_in_tile = first_row + offset + tl.arange(0, BLOCK_M)
        row_ok = (rows_in_tile < rows)[:, None]
        row_index = rows_in_tile.to(tl.int64)[:, None]
        dy_ptrs, mask = alignment.tile(GRAD_OUT, row_index * stride_dy_row + cols[None, :], row_ok,
                                       cols[None, :] < N, ALIGN, 1)
        dy = tl.load(dy_ptrs, mask=mask, other=0.0)
        x_ptrs, _ = alignment.tile(X, row_index * stride_x_row + cols[None, :], row_ok, cols[None, :] < N,
                                   ALIGN, 1)
        h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            h += bias[None, :]
        dh = dy.to(tl.float32)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, rows_in_tile.to(tl.int64), col_block * BLOCK_N, N, dropout_p, WIDE_OFFSETS,
                                BLOCK_N)
            dh = tl.where(keep, dh / (1.0 - dropout_p), 0.0)
        dh *= _gelu_grad(h, APPROXIMATE_TANH)
        dx_ptrs, _ = alignment.tile(GRAD_X, row_index * stride_dx_row + cols[None, :], row_ok, cols[None, :] < N,
                                    ALIGN, 1)
        tl.store(dx_ptrs, dh.to(GRAD_X.dtype.element_ty), mask=mask)
        if HAS_BIAS:
            grad_bias += dh
    if HAS_BIAS:
        partial_ptrs, _ = alignment.row(GRAD_BIAS_PARTIAL + group.to(tl.int64) * N, cols, N, ALIGN)
        tl.store(partial_ptrs, tl.sum(grad_bias, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------
# launcher
# --------------------------------------------------------------------------------------------
# Elements per tile: ~4K on a GPU (16-byte vectors, a few per thread); small in the interpreter,
# which runs every program in Python: tests stay fast yet cover several tiles and masked edges.
_GPU_TILE, _GPU_MAX_BLOCK_N = 4096, 1024
_INTERPRETER_TILE, _INTERPRETER_MAX_BLOCK_N = 512, 128
# Backward with a bias: programs per SM of the one-wave grid. ptxas (sm_90, Triton 3.8) gives the
# heaviest variant (erf, bias) 167 registers a thread at 4 warps, so 3 programs fit on an SM: the
# grid runs in one wave (no tail) and writes only 3 * SMs * BLOCK_N partial sums; with dropout
# (Philox in the loop) 184, so 2 fit (benchmarks/compile_triton.py). To be re-tuned on a GPU. The
# interpreter uses 2 row groups, so tests cover the cross-group sum.
_GPU_BWD_PROGRAMS_PER_SM = 3
_GPU_BWD_PROGRAMS_PER_SM_DROPOUT = 2
_INTERPRETER_ROW_GROUPS = 2
_MIN_BLOCK_N = 16


def _block_n(n: int, max_block_n: int) -> int:
    """The widest power of two <= max_block_n that pads N by at most 1/8 (else the least padding)."""
    candidates = [b for b in (1024, 512, 256, 128, 64, 32, 16) if _MIN_BLOCK_N <= b <= max_block_n]
    for block in candidates:
        if cdiv(n, block) * block <= n + n // 8:
            return block
    return min(candidates, key=lambda block: (cdiv(n, block) * block, -block))


def _tiles(rows: int, n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a (rows, N) problem."""
    interpret = interpreter_enabled()
    tile = _INTERPRETER_TILE if interpret else _GPU_TILE
    block_n = _block_n(n, _INTERPRETER_MAX_BLOCK_N if interpret else _GPU_MAX_BLOCK_N)
    block_m = min(max(1, tile // block_n), next_power_of_2(rows))
    num_warps = max(1, min(8, block_m * block_n // 1024))  # 32 elements a thread: 4 x 16 bytes in bf16
    return block_m, block_n, num_warps


def _row_groups(rows: int, block_m: int, col_blocks: int, device: torch.device, has_bias: bool,
                has_dropout: bool) -> tuple[int, int]:
    """(groups, rows_per_program) of the backward grid (groups, col_blocks).

    Without a bias, one tile per program, as the forward. With one, one wave of programs, each
    walking a run of row blocks, so that few partial bias sums are written.
    """
    row_blocks = cdiv(rows, block_m)
    if not has_bias:
        return row_blocks, block_m
    if device.type == "cuda":
        per_sm = _GPU_BWD_PROGRAMS_PER_SM_DROPOUT if has_dropout else _GPU_BWD_PROGRAMS_PER_SM
        wanted = max(1, num_sms(device.index) * per_sm // col_blocks)
    else:
        wanted = _INTERPRETER_ROW_GROUPS
    blocks_per_program = cdiv(row_blocks, wanted)
    return cdiv(row_blocks, blocks_per_program), blocks_per_program * block_m


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (rows, N) with a row stride and unit column stride, copying only when needed."""
    t = t.reshape(-1, n)
    return t.contiguous() if n > 1 and t.stride(1) != 1 else t


def bias_gelu_fwd(x, bias, approximate, dropout_p, seed):
    """dropout(gelu(x + bias)): x (..., N) any strides; bias (N,) in x's dtype or float32, or None;
    seed: the 0-dim int64 seed on x's device (None without dropout).

    Returns a contiguous tensor of x's shape and dtype.
    """
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    n = x.shape[-1]
    x2 = _as_rows(x, n)
    rows = x2.shape[0]
    block_m, block_n, num_warps = _tiles(rows, n)
    grid = (cdiv(rows, block_m), cdiv(n, block_n))
    bias_arg = x2 if bias is None else bias.contiguous()  # never read without a bias
    with on_device(x):
        _bias_gelu_fwd_kernel[grid](
            x2, bias_arg, out, seed_pointer(seed, dropout_p, x2), rows, n, x2.stride(0), n, dropout_p,
            APPROXIMATE_TANH=approximate == "tanh", HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
            WIDE_OFFSETS=wide_offsets(x.numel()), ALIGN=alignment.vector_alignment((n,), (x2, bias_arg, out)),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out


def bias_gelu_bwd(grad_out, x, bias, approximate, dropout_p, seed):
    """Returns (grad_x, grad_bias or None): grad_x contiguous in x's dtype, grad_bias in bias's."""
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        grad_bias = None if bias is None else torch.zeros_like(bias, memory_format=torch.contiguous_format)
        return grad_x, grad_bias
    n = x.shape[-1]
    x2, dy2 = _as_rows(x, n), _as_rows(grad_out, n)
    rows = x2.shape[0]
    block_m, block_n, num_warps = _tiles(rows, n)
    col_blocks = cdiv(n, block_n)
    groups, rows_per_program = _row_groups(rows, block_m, col_blocks, x.device, bias is not None, dropout_p > 0.0)
    if bias is None:
        bias_arg = partial = x2  # never read or written without a bias
    else:
        bias_arg = bias.contiguous()
        partial = torch.empty((groups, n), dtype=torch.float32, device=x.device)
    with on_device(x):
        _bias_gelu_bwd_kernel[(groups, col_blocks)](
            dy2, x2, bias_arg, grad_x, partial, seed_pointer(seed, dropout_p, x2), rows, n, rows_per_program,
            dy2.stride(0), x2.stride(0), n, dropout_p,
            APPROXIMATE_TANH=approximate == "tanh", HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0,
            WIDE_OFFSETS=wide_offsets(x.numel()),
            ALIGN=alignment.vector_alignment((n,), (dy2, x2, bias_arg, grad_x, partial)),
            BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    grad_bias = None if bias is None else partial.sum(dim=0).to(bias.dtype)
    return grad_x, grad_bias
