"""Fused residual + dropout + LayerNorm / RMSNorm in Triton: one kernel per pass.

Read top-down: the forward kernel, the backward kernel, then the launchers
(``residual_norm_fwd`` / ``residual_norm_bwd``, the interface every backend implements; the
autograd layer is shared, in ``fastformer/library.py``).

Each input is read once and each output written once: a row of N values lives in registers, so
the statistics take no second pass over memory. Statistics are float32 whatever the input dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastformer.triton import MAX_HIDDEN, cdiv, interpreter_enabled, next_power_of_2, num_sms, on_device
from fastformer.triton.alignment import row as aligned_row
from fastformer.triton.alignment import tile
from fastformer.triton.alignment import vector_alignment
from fastformer.triton.dropout import dropout_keep, seed_pointer, wide_offsets

# x and residual may have different dtypes (a bfloat16 sublayer output and a float32 residual
# stream under autocast): promoted as they are loaded, each gradient stored in its input's dtype.
MIXED_DTYPES = True


@triton.jit
def _centred(r, cols, inside, N):
    """r - mean(r) along each row of the tile, shifted by the row's first element before the mean
    is taken.

    With mean 1e3 and spread 1e-2 in float32 a plain mean is off by up to ~3e-5 (0.3% of the
    spread) and E[r^2] - E[r]^2 loses every digit; differences of nearby floats are exact, so
    the shifted sum is accurate. Also returns the rows' means.
    """
    shift = tl.sum(tl.where(cols[None, :] == 0, r, 0.0), axis=1)  # exactly r[:, 0]
    shifted = tl.where(inside, r - shift[:, None], 0.0)
    mean_shifted = tl.sum(shifted, axis=1) / N
    return tl.where(inside, shifted - mean_shifted[:, None], 0.0), shift + mean_shifted


@triton.jit
def _row_tile(BASE, row_ids, stride, cols, rows, N, ALIGN: tl.constexpr):
    """(pointers, mask) of rows ``row_ids`` (BLOCK_M,) of a (rows, N) tensor with row stride
    ``stride``, columns ``cols``: every row starts ALIGN elements aligned, N a multiple of ALIGN."""
    return tile(BASE, row_ids[:, None] * stride + cols[None, :], (row_ids < rows)[:, None], (cols < N)[None, :],
                ALIGN, 1)


@triton.jit
def _residual_norm_fwd_kernel(
    X,             # in: x (rows, N), row stride stride_x, columns contiguous
    RESIDUAL,      # in: residual (rows, N), row stride stride_residual; unused without HAS_RESIDUAL
    WEIGHT, BIAS,  # in: (N,) in OUT's dtype or float32; unused without HAS_WEIGHT / HAS_BIAS
    OUT,           # out: (rows, N) contiguous, in the dtype of x + residual
    RESIDUAL_OUT,  # out: (rows, N) contiguous, OUT's dtype; unused without STORE_RESIDUAL
    MEAN, RSTD,    # out: (rows,) float32; MEAN unused with IS_RMS
    SEED,          # in: the dropout seed, one int64; unused without HAS_DROPOUT
    stride_x, stride_residual,
    rows, N, eps, dropout_p,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, STORE_RESIDUAL: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per BLOCK_M rows, each row whole in the tile. Per row:

        r = dropout(x) + residual               dropout(x) = x * keep / (1 - p)
        residual_out = r, rounded to OUT's dtype  (and r is that rounded value from here on)
        LayerNorm: y = (r - mean(r)) * rstd * weight + bias,  rstd = 1 / sqrt(var(r) + eps)
        RMSNorm:   y = r * rstd * weight,                     rstd = 1 / sqrt(mean(r^2) + eps)
    """
    row_ids = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    x_ptrs, inside = _row_tile(X, row_ids, stride_x, cols, rows, N, ALIGN)
    r = tl.load(x_ptrs, mask=inside, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(SEED), row_ids, 0, N, dropout_p, WIDE_OFFSETS, BLOCK_N)
        r = tl.where(keep, r / (1.0 - dropout_p), 0.0)
    if HAS_RESIDUAL:
        residual_ptrs, _ = _row_tile(RESIDUAL, row_ids, stride_residual, cols, rows, N, ALIGN)
        r += tl.load(residual_ptrs, mask=inside, other=0.0).to(tl.float32)
    if STORE_RESIDUAL:
        rounded = r.to(RESIDUAL_OUT.dtype.element_ty)
        residual_out_ptrs, _ = _row_tile(RESIDUAL_OUT, row_ids, N, cols, rows, N, ALIGN)
        tl.store(residual_out_ptrs, rounded, mask=inside)
        r = rounded.to(tl.float32)  # normalise exactly what is stored, as the backward will
    if IS_RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(r * r, axis=1) / N + eps)
        xhat = r * rstd[:, None]
    else:
        centred, mean = _centred(r, cols, inside, N)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N + eps)
        xhat = centred * rstd[:, None]
        tl.store(MEAN + row_ids, mean, mask=row_ids < rows)
    tl.store(RSTD + row_ids, rstd, mask=row_ids < rows)
    y = xhat
    if HAS_WEIGHT:
        weight_ptrs, col_mask = aligned_row(WEIGHT, cols, N, ALIGN)
        y = y * tl.load(weight_ptrs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        bias_ptrs, col_mask = aligned_row(BIAS, cols, N, ALIGN)
        y = y + tl.load(bias_ptrs, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs, _ = _row_tile(OUT, row_ids, N, cols, rows, N, ALIGN)
    tl.store(out_ptrs, y.to(OUT.dtype.element_ty), mask=inside)


@triton.jit
def _residual_norm_bwd_kernel(
    GRAD_OUT,           # in: d out (rows, N), row stride stride_grad_out
    GRAD_RESIDUAL_OUT,  # in: d residual_out (rows, N), row stride stride_grad_residual_out
    NORMED,             # in: what was normalised (residual_out, or x), row stride stride_normed
    WEIGHT,             # in: (N,); unused without HAS_WEIGHT
    RSTD,               # in: (rows,) float32 from the forward
    GRAD_X,             # out: (rows, N) contiguous, x's dtype
    GRAD_RESIDUAL,      # out: (rows, N) contiguous, NORMED's dtype; unused without HAS_RESIDUAL
    PARTIAL_GRAD_WEIGHT, PARTIAL_GRAD_BIAS,  # out: (programs, N) float32 partial sums over rows
    SEED,               # in: the dropout seed, one int64; unused without HAS_DROPOUT
    stride_grad_out, stride_grad_residual_out, stride_normed,
    rows, N, rows_per_program, dropout_p,
    IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr, HAS_GRAD_RESIDUAL_OUT: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    WIDE_OFFSETS: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Each program takes ``rows_per_program`` consecutive rows (a multiple of BLOCK_M), BLOCK_M
    at a time. With xhat recomputed from r and rstd, and g = dy * weight, per row:

        LayerNorm: dr = rstd * (g - mean(g) - xhat * mean(g * xhat))
        RMSNorm:   dr = rstd * (g - xhat * mean(g * xhat))
        dr += d residual_out;  d residual = dr;  dx = dr * keep / (1 - p)
        d weight = sum over rows of dy * xhat,  d bias = sum over rows of dy

    d weight and d bias are summed in registers over the program's rows and written as one
    partial row per program; the launcher sums the partials (no atomics: run-to-run identical).
    Rows past the end load dy = 0 and rstd = 0, so they add 0 to the sums.
    """
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    # Every row starts ALIGN elements aligned and N is a multiple of ALIGN (vector loads).
    weight_ptrs, col_mask = aligned_row(WEIGHT, cols, N, ALIGN)
    weight = tl.full((BLOCK_N,), 1.0, tl.float32)
    if HAS_WEIGHT:
        weight = tl.load(weight_ptrs, mask=col_mask, other=0.0).to(tl.float32)
    grad_weight = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    grad_bias = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    first = program.to(tl.int64) * rows_per_program
    for offset in range(0, rows_per_program, BLOCK_M):
        # Skipping the tiles past the end (rather than masking them) also keeps ptxas from
        # holding more registers (sm_90, N = 4096 with a residual: 128 -> 170).
        if first + offset < rows:
            row_ids = first + offset + tl.arange(0, BLOCK_M)
            normed_ptrs, inside = _row_tile(NORMED, row_ids, stride_normed, cols, rows, N, ALIGN)
            r = tl.load(normed_ptrs, mask=inside, other=0.0).to(tl.float32)
            grad_out_ptrs, _ = _row_tile(GRAD_OUT, row_ids, stride_grad_out, cols, rows, N, ALIGN)
            dy = tl.load(grad_out_ptrs, mask=inside, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row_ids, mask=row_ids < rows, other=0.0)[:, None]
            if IS_RMS:
                xhat = r * rstd
            else:
                centred, _ = _centred(r, cols, inside, N)
                xhat = centred * rstd
            g = dy * weight[None, :]
            dr = g - xhat * (tl.sum(g * xhat, axis=1) / N)[:, None]
            if not IS_RMS:
                dr -= (tl.sum(g, axis=1) / N)[:, None]
            dr *= rstd
            if HAS_GRAD_RESIDUAL_OUT:
                extra_ptrs, _ = _row_tile(GRAD_RESIDUAL_OUT, row_ids, stride_grad_residual_out, cols, rows, N, ALIGN)
                dr += tl.load(extra_ptrs, mask=inside, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                grad_residual_ptrs, _ = _row_tile(GRAD_RESIDUAL, row_ids, N, cols, rows, N, ALIGN)
                tl.store(grad_residual_ptrs, dr.to(GRAD_RESIDUAL.dtype.element_ty), mask=inside)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, row_ids, 0, N, dropout_p, WIDE_OFFSETS, BLOCK_N)
                dr = tl.where(keep, dr / (1.0 - dropout_p), 0.0)
            grad_x_ptrs, _ = _row_tile(GRAD_X, row_ids, N, cols, rows, N, ALIGN)
            tl.store(grad_x_ptrs, dr.to(GRAD_X.dtype.element_ty), mask=inside)
            grad_weight += dy * xhat
            grad_bias += dy
    if HAS_WEIGHT:
        partial_ptrs, _ = aligned_row(PARTIAL_GRAD_WEIGHT + program * N, cols, N, ALIGN)
        tl.store(partial_ptrs, tl.sum(grad_weight, axis=0), mask=col_mask)
    if HAS_BIAS:
        partial_ptrs, _ = aligned_row(PARTIAL_GRAD_BIAS + program * N, cols, N, ALIGN)
        tl.store(partial_ptrs, tl.sum(grad_bias, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _columns_contiguous(t):
    """Kernels take a row stride and contiguous columns (weight and bias: contiguous vectors)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _alignment(n: int, *tensors) -> int:
    """ALIGN of the kernels: the vector width every row of the given tensors starts on."""
    return vector_alignment((n,), [t for t in tensors if t is not None and t.numel() > 0])


# Elements of a program's tile: on a GPU short rows share one (N = 200: 8 rows of 256), so that a
# program keeps several 16-byte loads a thread in flight and the grid is not thousands of tiny
# programs; a row of 2048 or more is a tile alone. The interpreter takes smaller tiles, so that
# tests still cover several rows a tile, rows past the end and programs walking several tiles.
_GPU_TILE, _INTERPRETER_TILE = 2048, 1024
# Backward: programs per SM of its one-wave grid, each walking a run of tiles and writing one
# partial row of the weight and bias gradients. ptxas (sm_90, Triton 3.6) gives the 8-warp
# programs of 2048-element tiles 80-118 registers a thread and those of 4096-element rows 128,
# so 2 fit on an SM. The interpreter runs 4 programs.
_GPU_BWD_PROGRAMS_PER_SM, _INTERPRETER_BWD_PROGRAMS = 2, 4


def _launch_config(n: int, rows: int) -> dict:
    block_n = max(16, next_power_of_2(n))  # at least 16: dropout draws 4 columns at a time
    if block_n > next_power_of_2(MAX_HIDDEN):
        raise ValueError(f"residual norm (triton): hidden size {n} exceeds {MAX_HIDDEN}")
    tile = _INTERPRETER_TILE if interpreter_enabled() else _GPU_TILE
    block_m = max(1, min(tile // block_n, next_power_of_2(rows)))
    elements = block_m * block_n
    num_warps = 4 if elements <= 1024 else 8 if elements <= 4096 else 16
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


def _backward_grid(rows: int, block_m: int, device: torch.device) -> tuple[int, int]:
    """(programs, rows_per_program) of the backward: enough programs to fill the GPU once, each
    taking a run of whole tiles; rows_per_program is a multiple of block_m."""
    tiles = cdiv(rows, block_m)
    if tiles == 0:
        return 1, block_m  # no rows: one program writes the zero partial sums
    if interpreter_enabled() or device.type != "cuda":
        wanted = _INTERPRETER_BWD_PROGRAMS
    else:
        wanted = _GPU_BWD_PROGRAMS_PER_SM * num_sms(device.index)
    tiles_per_program = cdiv(tiles, min(tiles, wanted))
    return cdiv(tiles, tiles_per_program), tiles_per_program * block_m


def residual_norm_fwd(x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual):
    """Returns (out, residual_out or empty, mean or empty, rstd); x and residual are (rows, N),
    out and residual_out in the dtype of x + residual."""
    x, residual = _columns_contiguous(x), _columns_contiguous(residual)
    weight, bias = _columns_contiguous(weight), _columns_contiguous(bias)
    rows, n = x.shape
    dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty((rows, n), dtype=dtype, device=x.device)
    residual_out = torch.empty_like(out) if store_residual else x.new_empty(0)
    mean = x.new_empty(0 if rms else rows, dtype=torch.float32)
    rstd = x.new_empty(rows, dtype=torch.float32)
    if rows == 0:
        return out, residual_out, mean, rstd
    config = _launch_config(n, rows)
    with on_device(x):
        _residual_norm_fwd_kernel[(cdiv(rows, config["BLOCK_M"]),)](
            x, x if residual is None else residual, x if weight is None else weight,
            x if bias is None else bias, out, out if not store_residual else residual_out,
            rstd if rms else mean, rstd, seed_pointer(seed, dropout_p, x),
            x.stride(0), 0 if residual is None else residual.stride(0),
            rows, n, eps, dropout_p,
            IS_RMS=rms, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None, HAS_DROPOUT=dropout_p > 0.0, STORE_RESIDUAL=store_residual,
            WIDE_OFFSETS=wide_offsets(rows * n),
            ALIGN=_alignment(n, x, residual, weight, bias, out, residual_out), **config)
    return out, residual_out, mean, rstd


def residual_norm_bwd(grad_out, grad_residual_out, normed, weight, bias, mean, rstd, dropout_p, rms,
                      seed, has_residual, *, x_dtype=None):
    """Returns (grad_x, grad_residual or None, grad_weight or None, grad_bias or None); grad_x in
    ``x_dtype`` (default: normed's), grad_residual in normed's dtype (that of x + residual)."""
    grad_out, grad_residual_out = _columns_contiguous(grad_out), _columns_contiguous(grad_residual_out)
    normed, weight = _columns_contiguous(normed), _columns_contiguous(weight)
    rows, n = normed.shape
    grad_x = torch.empty((rows, n), dtype=x_dtype or normed.dtype, device=normed.device)
    grad_residual = torch.empty((rows, n), dtype=normed.dtype, device=normed.device) if has_residual else None
    config = _launch_config(n, rows)
    programs, rows_per_program = _backward_grid(rows, config["BLOCK_M"], normed.device)
    # Every program writes its whole partial row (zeros if it had no rows): no fill needed,
    # unless no program runs. (One buffer and one sum for both would make the two gradients views
    # of one tensor, which a custom op may not return.)
    new_partials = torch.empty if rows > 0 else torch.zeros
    partial_weight = new_partials((programs, n), dtype=torch.float32, device=normed.device) \
        if weight is not None else None
    partial_bias = new_partials((programs, n), dtype=torch.float32, device=normed.device) \
        if bias is not None else None
    if rows > 0:
        with on_device(normed):
            _residual_norm_bwd_kernel[(programs,)](
                grad_out, grad_out if grad_residual_out is None else grad_residual_out, normed,
                normed if weight is None else weight, rstd, grad_x,
                grad_x if grad_residual is None else grad_residual,
                grad_x if partial_weight is None else partial_weight,
                grad_x if partial_bias is None else partial_bias, seed_pointer(seed, dropout_p, normed),
                grad_out.stride(0), 0 if grad_residual_out is None else grad_residual_out.stride(0),
                normed.stride(0), rows, n, rows_per_program, dropout_p,
                IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                HAS_RESIDUAL=has_residual, HAS_GRAD_RESIDUAL_OUT=grad_residual_out is not None,
                HAS_DROPOUT=dropout_p > 0.0, WIDE_OFFSETS=wide_offsets(rows * n),
                ALIGN=_alignment(n, grad_out, grad_residual_out, normed, weight, grad_x, grad_residual,
                                 partial_weight, partial_bias),
                **config)
    grad_weight = None if weight is None else partial_weight.sum(dim=0).to(weight.dtype)
    grad_bias = None if bias is None else partial_bias.sum(dim=0).to(bias.dtype)
    return grad_x, grad_residual, grad_weight, grad_bias
