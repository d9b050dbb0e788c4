"""Flash attention in Triton: the forward never materialises the Lq x Lk score matrix.

Read top-down: shared tile helpers, the forward kernel, the three backward kernels (preprocess,
dK/dV, dQ), then the launchers (``attention_fwd`` / ``attention_bwd``, the interface every backend
implements; the autograd layer is shared, in ``fastformer/library.py``).

Forward (FlashAttention-2): one program per (block of BLOCK_M query rows, batch, query head). Key
and value tiles of BLOCK_N rows stream through an online softmax; the program keeps the running
row max, row sum and a float32 output accumulator, and writes the output and the row's
log-sum-exp (lse, float32, (B, Hq, Lq)) for the backward. Backward: recompute the probabilities
from lse, a preprocess kernel for delta = rowsum(dO * O), one kernel over key blocks for dK, dV
(GQA: a program sums over the query heads of its key/value head) that also adds each block's
share of dQ into float32 sums with atomics, as FlashAttention-2 does by default. Under
``torch.use_deterministic_algorithms(True)`` the dQ shares come instead from a kernel over query
blocks that recomputes S and dP (two more products a score): then no atomics anywhere, and the
gradients are run-to-run identical.

What the kernels handle (everything the op table declares for "attention"):
- float16 / bfloat16 / float32 inputs, float32 accumulation; head dims 1..256, D != Dv, each padded
  to a power of two >= 16 (masked loads: 50 -> 64);
- any strides (all four of every tensor are passed, e.g. views of (B, L, H, D) projections); the
  launcher proves how far every row is aligned (ALIGN, ``fastformer.triton.alignment``) so that a
  head dim of 50 or 56 is still loaded in vectors and pipelined through cp.async;
- GQA / MQA: key/value head = query head // (Hq // Hk), K and V never repeated in memory;
- is_causal, top-left aligned (query i attends keys j <= i): key tiles above the diagonal are
  skipped (forward, dQ) and query tiles below it start the dK/dV loop;
- key_padding_mask: key tiles past each batch row's last unpadded key are skipped, and the
  forward reads the mask (one byte per key, nonzero = padding) inside key tiles only for batch
  rows with padding before that key end (right padding, the usual case, costs no work for the
  padding; any other pattern is exact too); the dK/dV kernel reads its keys' bytes once and,
  without causal or attn_mask, masks its scores by adding a per-key bias (0 or -inf); the dQ
  kernel (deterministic mode) reads them in every tile. No host synchronisation;
- attn_mask, bool (True = attend) or additive float, broadcastable to (B, Hq, Lq, Lk), loaded tile
  by tile with stride 0 on its broadcast dims; a float mask's gradient (dS, from the dK/dV
  kernel: stored for a full-shape mask, added up by atomics for a broadcast one);
- dropout from Philox, the scores viewed as B Hq Lq rows of Lk keys (``fastformer.triton.dropout``:
  one Philox call per 8 keys of a row), exactly ``dropout_keep_mask(seed, (B, Hq, Lq, Lk), p)``,
  regenerated in the backward;
- rows with no key left: output 0, lse = -inf, gradients 0 (never NaN);
- any batch and head count (past 65535, one flat grid axis: ``_program_block``), and int64 index arithmetic
  where the scores or a tensor's rows within one (batch, head) pass 2^31 elements (WIDE_OFFSETS).
Not handled (the op falls back to the torch backend): float64.

Under Triton's interpreter (DOT_IN_FP32) the tiles that feed tl.dot are upcast to float32 as
they are loaded: the interpreter multiplies the raw bits of bfloat16 operands (triton #11584). On
the GPU they stay in the input dtype: float16 / bfloat16 on the tensor cores; float32 to the
precision PyTorch gives float32 matmuls (DOT_PRECISION, ``_dot_precision``): TF32 where
``torch.backends.cuda.matmul.allow_tf32`` is set (``torch.set_float32_matmul_precision("high")``),
else float32 accuracy, as PyTorch's default "highest" asks, from three TF32 products ("tf32x3":
each operand split into a TF32 part and its remainder, the remainders' product dropped).

Launch configuration: under Triton's interpreter (CPU tests) a plain launch with small fixed
blocks; on the GPU ``triton.autotune`` over Hopper/Ampere-sized configs, keyed on the padded head
dims, the mask/causal/dropout switches and the sequence lengths rounded up to powers of two (so
that variable-length batches do not re-tune on every new length). Autotuning compiles and times
every config for each new key, which a test suite pays for without needing the fastest config:
FASTFORMER_TRITON_AUTOTUNE=0 (set by tests/conftest.py) runs each list's last, small config
instead, and ``use_config(i)`` runs config i of every list (the GPU tests go through them all).
The configs of a new tuning key are compiled on threads first (``_precompile``), so that the
autotuner's serial loop only times them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import inspect
import os
import threading

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from fastformer.library import attention_layout_like, attention_output_like
from fastformer.masks import broadcast_strides, mask_grad_buffer, mask_grad_from
from fastformer.triton import _major_minor, alignment, cdiv, interpreter_enabled, next_power_of_2, on_device
from fastformer.triton.dropout import dropout_keep, seed_pointer, wide_offsets

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * LOG2E)

# MASK_KIND values
NO_MASK, BOOL_MASK, FLOAT_MASK = 0, 1, 2
# MASK_GRAD values: how the dK/dV kernel writes dS, the gradient of a float attn_mask (ADD_KEYS: a
# mask broadcast over the query rows, each tile's dS summed over its queries before the adds)
NO_MASK_GRAD, STORE_MASK_GRAD, ADD_MASK_GRAD, ADD_KEYS_MASK_GRAD = 0, 1, 2, 3

# The largest head dim the kernels take (a tile of BLOCK x 256 float32 per operand).
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# tile helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _scores(qk, q_idx, k_idx, key_ok, MASK_TILE, stride_mask_q, stride_mask_k, PADDING_ROW, len_q, qk_scale,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KEY_PADDING: tl.constexpr):
    """Scores in the log2 domain, -inf where key k_idx is not attended by query q_idx.

    qk is a tile of q . k products; q_idx / k_idx are the query / key indices broadcast to its
    shape ([:, None] and [None, :], or transposed: the tile may be (queries, keys) or (keys,
    queries)), key_ok whether the keys exist (k_idx < key end) broadcast like k_idx. MASK_TILE points
    at the attn_mask of this (batch, query head); with HAS_KEY_PADDING the keys' bytes are read from
    PADDING_ROW, the key_padding_mask row of this batch row (nonzero = padding; a caller that holds
    them passes them in key_ok instead).
        s = (scale * q.k + attn_mask) * log2(e)
    """
    valid = (q_idx < len_q) & key_ok
    if IS_CAUSAL:
        valid = valid & (k_idx <= q_idx)
    if HAS_KEY_PADDING:  # one byte per key, loaded along the key axis only
        padded = tl.load(PADDING_ROW + k_idx, mask=key_ok, other=1)
        valid = valid & (padded == 0)
    s = qk * qk_scale
    if MASK_KIND == 1:  # bool, stored as uint8: nonzero = may attend
        allowed = tl.load(MASK_TILE + q_idx * stride_mask_q + k_idx * stride_mask_k, mask=valid, other=0)
        valid = valid & (allowed != 0)
    if MASK_KIND == 2:  # additive; -inf forbids the key, finite values stay finite (clamped to
        # +-2.35e38: |bias| * log2(e) overflows float32 above 2.36e38, e.g. bfloat16's finfo.min,
        # which Hugging Face fills its masks with, and the row would lose every key); NaN and +inf
        # pass through and make the row NaN, as in SDPA (tl.maximum would drop a NaN)
        bias = tl.load(MASK_TILE + q_idx * stride_mask_q + k_idx * stride_mask_k, mask=valid, other=0.0)
        bias = bias.to(tl.float32)
        clamped = tl.where(tl.abs(bias) < float("inf"), tl.minimum(tl.maximum(bias, -2.35e38), 2.35e38), bias)
        s += tl.where(bias == float("-inf"), float("-inf"), clamped * 1.4426950408889634)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _program_block(rows, heads, BLOCK: tl.constexpr, FLAT_GRID: tl.constexpr):
    """(first row of this program's block, head, batch index) of a launch over (row blocks, heads,
    batch): the grid's three axes, or with FLAT_GRID, one axis of cdiv(rows, BLOCK) * heads * batch
    programs in the same order (blocks fastest, then heads). Axes y and z stop at 65535 blocks, x
    holds 2^31 - 1: a batch of 65536 short sequences is legal. The flat decode costs registers
    (measured at compile time: up to a few dozen bytes spilled more in the d64 configurations), so
    only the launches past the limits take it."""
    if FLAT_GRID:
        pid = tl.program_id(0)
        blocks = tl.cdiv(rows, BLOCK)
        head_batch = pid // blocks
        start = (pid % blocks) * BLOCK
        head = (head_batch % heads).to(tl.int64)
        batch = (head_batch // heads).to(tl.int64)
    else:
        start = tl.program_id(0) * BLOCK
        head = tl.program_id(1).to(tl.int64)
        batch = tl.program_id(2).to(tl.int64)
    return start, head, batch


@triton.jit
def _indices(start, BLOCK: tl.constexpr, WIDE_OFFSETS: tl.constexpr):
    """start + arange(BLOCK): row (or key) indices, int64 where an index times a stride may pass
    2^31 within one (batch, head) (WIDE_OFFSETS: a 64k x 64k mask, ...), else int32."""
    indices = start + tl.arange(0, BLOCK)
    if WIDE_OFFSETS:
        indices = indices.to(tl.int64)
    return indices


@triton.jit
def _key_range(PADDING_ROW, len_k):
    """(key end, holes): one past the last unpadded key of a key_padding_mask row (0 if every key
    is padding), and whether any key before that end is padding. The key tiles from the end on
    hold padding only and are not visited, so right padding (the usual case) costs nothing; without
    holes the tiles before it need no padding mask either. Each program reads the row itself, 2048
    bytes at a time (one pass up to Lk = 2048): no device ops before the launch to find it. Called
    before the first tile load: after it, the forward kept 14 more registers a thread (168 -> 182
    at 64 x 64 tiles, sm_90, Triton 3.6), one CTA fewer per SM."""
    end = tl.full([], 0, tl.int32)
    unpadded = tl.full([], 0, tl.int32)
    for start in range(0, len_k, 2048):
        idx = start + tl.arange(0, 2048)
        padded = tl.load(PADDING_ROW + idx, mask=idx < len_k, other=1)
        end = tl.maximum(end, tl.max(tl.where(padded == 0, idx + 1, 0), axis=0))
        unpadded += tl.sum((padded == 0).to(tl.int32), axis=0)
    return end, unpadded < end


# Triton 3.8 alone leaves the result of a reduction a per-thread value to ptxas (_as_uniform);
# 3.2 to 3.7 and 3.9 compile it uniform, and the read-back there moves registers either way (up
# to +30 at 128 x 128 tiles with 3.9).
_READ_BACK_KEY_END = tl.constexpr(_major_minor(triton.__version__) == (3, 8))


@triton.jit
def _as_uniform(value, SCRATCH):
    """``value`` (int32, the same in every thread) read back through a global-memory word this
    program owns, so that ptxas knows it is the same in every thread of a warp.

    With Triton 3.8, a value that comes out of a cross-thread reduction (``_key_range``) is, to
    ptxas, a per-thread value: the loop bounds, tile offsets and masks computed from it then take
    per-thread registers and predicates instead of the uniform datapath (sm_75+). A load from one
    address for every thread is uniform. Measured at compile time (sm_90, bf16 head dim 64, key
    padding, forward; BLOCK_M x BLOCK_N, warps: registers without -> with this): 128x32 w4 194 ->
    155, 64x64 w4 137 -> 120, 64x32 w4 121 -> 93, 128x64 w4 238 -> 209 (benchmarks/results/
    tuning-log.md). The load is volatile so that the compiler does not forward the stored value;
    the barrier keeps any thread from overwriting the word (the caller's later store of its real
    contents) before every thread has read it."""
    tl.store(SCRATCH, value.to(SCRATCH.dtype.element_ty, bitcast=True))
    value = tl.load(SCRATCH, volatile=True).to(tl.int32, bitcast=True)
    tl.debug_barrier()
    return value


@triton.jit
def _unmasked_key_end(key_len, holes, start_m, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                      MASK_KIND: tl.constexpr, HAS_KEY_PADDING: tl.constexpr):
    """The key tiles of a block of query rows from start_m that end before this need no mask:
    whole tiles before the key end, at or below the causal diagonal of every row of the block,
    without an attn_mask or padding holes. (Rows past Lq come from zero queries there, and what
    they compute is not stored.)"""
    end = 0
    if MASK_KIND == 0:
        end = key_len // BLOCK_N * BLOCK_N
        if IS_CAUSAL:
            end = tl.minimum(end, (start_m + 1) // BLOCK_N * BLOCK_N)
        if HAS_KEY_PADDING:
            end = tl.where(holes, 0, end)
    return end


@triton.jit
def _load_tile(BASE, offsets, row_ok, head_ok, ALIGN: tl.constexpr, HEAD_AXIS: tl.constexpr,
               DOT_IN_FP32: tl.constexpr):
    """A tile of q, k, v or dO at BASE + offsets, (rows, head dim) or (head dim, rows) with
    HEAD_AXIS = 0, zero outside row_ok & head_ok; rows start ALIGN elements aligned (``_common``).
    Float32 under the interpreter, whose tl.dot wants it (module docstring)."""
    ptrs, mask = alignment.tile(BASE, offsets, row_ok, head_ok, ALIGN, HEAD_AXIS)
    tile = tl.load(ptrs, mask=mask, other=0.0)
    if DOT_IN_FP32:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _store_tile(BASE, offsets, row_ok, head_ok, values, ALIGN: tl.constexpr):
    """Stores a (rows, head dim) tile at BASE + offsets in the pointers' dtype (as ``_load_tile``)."""
    ptrs, mask = alignment.tile(BASE, offsets, row_ok, head_ok, ALIGN, 1)
    tl.store(ptrs, values.to(ptrs.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_kernel(
    Q,            # in: query (B, Hq, Lq, D), strides stride_q*
    K,            # in: key (B, Hk, Lk, D), strides stride_k*
    V,            # in: value (B, Hk, Lk, Dv), strides stride_v*
    MASK,         # in: attn_mask viewed as (B, Hq, Lq, Lk), stride 0 on broadcast dims; bool as
                  #     uint8 or additive float; unused when MASK_KIND == 0
    KEY_PADDING,  # in: key_padding_mask (B, Lk) as uint8, nonzero = padding, row stride stride_pb;
                  #     unused without HAS_KEY_PADDING
    OUT,          # out: (B, Hq, Lq, Dv) in the query dtype, strides stride_o*
    LSE,          # out: (B, Hq, Lq) float32 contiguous, natural log; -inf on rows with no key
    SEED,         # in: the dropout seed, one int64; unused without HAS_DROPOUT
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb,
    stride_ob, stride_oh, stride_om, stride_od,
    heads_q, group, len_q, len_k, dim, dim_v,
    bucket_q, bucket_k,  # unused: the sequence lengths rounded to powers of two, autotuning keys
    qk_scale,            # scale * log2(e)
    dropout_p,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KEY_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WIDE_OFFSETS: tl.constexpr, FLAT_GRID: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (block of BLOCK_M query rows, query head, batch). For each query row i:

        s_j = scale * q_i . k_j + mask_ij        (-inf where masked, causal j > i, or padding)
        m = max_j s_j;  l = sum_j exp(s_j - m);  lse = m + log(l)
        o_i = sum_j exp(s_j - lse) * keep_ij / (1 - p) * v_j        (keep = 1 without dropout)

    computed online over key tiles: with m' the new running max, l <- l exp(m - m') + sum exp(s - m')
    and acc <- acc exp(m - m') + exp(s - m') keep / (1 - p) @ v; o = acc / l at the end. A row
    whose scores are all -inf keeps m = -inf (its exponentials use 0 as the base: no NaN), l = 0,
    and writes o = 0, lse = -inf. Key tiles past the row block's last visible key are not visited,
    and the loop runs in two stages: first the tiles that need no mask (whole tiles before the key
    end and at or below the causal diagonal, with no attn_mask and no padding before the key end),
    scores straight from q . k, then the others through ``_scores``. Works in base 2 (exp2) with
    log2(e) folded into the scale.
    """
    start_m, h, b = _program_block(len_q, heads_q, BLOCK_M, FLAT_GRID)
    hk = h // group
    offs_m = _indices(start_m, BLOCK_M, WIDE_OFFSETS)
    offs_n = _indices(0, BLOCK_N, WIDE_OFFSETS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    PADDING_ROW = KEY_PADDING + b * stride_pb
    row_base = (b * heads_q + h) * len_q
    key_len = len_k
    holes = False
    if HAS_KEY_PADDING:
        key_len, holes = _key_range(PADDING_ROW, len_k)
        if _READ_BACK_KEY_END:
            # through the lse word of this block's first row (written at the end), holes as the sign
            packed = _as_uniform(tl.where(holes, -key_len - 1, key_len), LSE + row_base + start_m)
            holes = packed < 0
            key_len = tl.where(holes, -packed - 1, packed)
    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd, offs_m[:, None] * stride_qm,
                   offs_m[:, None] < len_q, offs_d[None, :] < dim, ALIGN, 1, DOT_IN_FP32)
    K_TILE = K + b * stride_kb + hk * stride_kh + offs_d[None, :] * stride_kd
    V_TILE = V + b * stride_vb + hk * stride_vh + offs_dv[None, :] * stride_vd
    MASK_TILE = MASK + b * stride_mb + h * stride_mh
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    end_n = key_len
    if IS_CAUSAL:
        end_n = tl.minimum(end_n, start_m + BLOCK_M)
    unmasked_end = _unmasked_key_end(key_len, holes, start_m, BLOCK_N, IS_CAUSAL, MASK_KIND, HAS_KEY_PADDING)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for stage in tl.static_range(2):  # 0: the tiles without a mask, 1: the others
        if stage == 0:
            lo, hi = 0, unmasked_end
        else:
            lo, hi = unmasked_end, end_n
        for start_n in range(lo, hi, BLOCK_N):
            idx_n = start_n + offs_n
            k = _load_tile(K_TILE, idx_n[:, None] * stride_kn, idx_n[:, None] < key_len, offs_d[None, :] < dim,
                           ALIGN, 1, DOT_IN_FP32)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if stage == 0:
                s = qk * qk_scale
            else:
                s = _scores(qk, offs_m[:, None], idx_n[None, :], idx_n[None, :] < key_len, MASK_TILE, stride_mm,
                            stride_mn, PADDING_ROW, len_q, qk_scale, IS_CAUSAL, MASK_KIND, HAS_KEY_PADDING)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            base = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: exp2(-inf - 0) = 0
            p = tl.math.exp2(s - base[:, None])
            alpha = tl.math.exp2(m_i - base)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            if HAS_DROPOUT:
                # the scores are rows (b Hq + h) Lq + i of Lk keys: row_base = (b Hq + h) Lq
                keep = dropout_keep(seed, row_base + offs_m, start_n, len_k, dropout_p, WIDE_OFFSETS, BLOCK_N)
                p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            v = _load_tile(V_TILE, idx_n[:, None] * stride_vn, idx_n[:, None] < key_len, offs_dv[None, :] < dim_v,
                           ALIGN, 1, DOT_IN_FP32)
            acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

    alive = l_i > 0.0
    out = acc / tl.where(alive, l_i, 1.0)[:, None]
    lse = tl.where(alive, (m_i + tl.math.log2(tl.where(alive, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(LSE + row_base + offs_m, lse, mask=offs_m < len_q)
    _store_tile(OUT + b * stride_ob + h * stride_oh + offs_dv[None, :] * stride_od, offs_m[:, None] * stride_om,
                offs_m[:, None] < len_q, offs_dv[None, :] < dim_v, out, ALIGN)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    OUT,       # in: forward output (B, Hq, Lq, Dv), strides stride_o*
    GRAD_OUT,  # in: dO (B, Hq, Lq, Dv), strides stride_g*
    DELTA,     # out: (B, Hq, Lq) float32 contiguous
    GRAD_Q_SUM,  # out with ZERO_GRAD_Q_SUM: the dK/dV kernel's float32 dQ sums (B, Hq, Lq, D), zeroed
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_sqb, stride_sqh, stride_sqm, stride_sqd,
    heads_q, len_q, dim, dim_v,
    ZERO_GRAD_Q_SUM: tl.constexpr, WIDE_OFFSETS: tl.constexpr, FLAT_GRID: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij (the softmax backward's row term, with
    P the probabilities and dP the gradient of the dropped-out probabilities times keep / (1-p)).
    With ZERO_GRAD_Q_SUM it also zeroes the rows' dQ sums (one launch fewer than a fill)."""
    start_m, h, b = _program_block(len_q, heads_q, BLOCK_M, FLAT_GRID)
    offs_m = _indices(start_m, BLOCK_M, WIDE_OFFSETS)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok, head_ok = offs_m[:, None] < len_q, offs_dv[None, :] < dim_v
    o = _load_tile(OUT + b * stride_ob + h * stride_oh + offs_dv[None, :] * stride_od, offs_m[:, None] * stride_om,
                   row_ok, head_ok, ALIGN, 1, False).to(tl.float32)
    do = _load_tile(GRAD_OUT + b * stride_gb + h * stride_gh + offs_dv[None, :] * stride_gd,
                    offs_m[:, None] * stride_gm, row_ok, head_ok, ALIGN, 1, False).to(tl.float32)
    tl.store(DELTA + (b * heads_q + h) * len_q + offs_m, tl.sum(o * do, axis=1), mask=offs_m < len_q)
    if ZERO_GRAD_Q_SUM:
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(GRAD_Q_SUM + b * stride_sqb + h * stride_sqh + offs_m[:, None] * stride_sqm
                 + offs_d[None, :] * stride_sqd, tl.zeros((BLOCK_M, BLOCK_D), tl.float32),
                 mask=row_ok & (offs_d[None, :] < dim))


@triton.jit
def _row_lse_log2(LSE_ROW, idx, len_q):
    """lse * log2(e) of the rows idx, +inf where lse = -inf (no key) or idx >= len_q: there
    P = exp2(s - lse * log2(e)) is exp2(-inf) = 0, never NaN."""
    lse = tl.load(LSE_ROW + idx, mask=idx < len_q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V,      # in: as in the forward (strides stride_q*, stride_k*, stride_v*)
    MASK,         # in: attn_mask as in the forward (strides stride_m*)
    KEY_PADDING,  # in: as in the forward
    GRAD_OUT,     # in: dO (B, Hq, Lq, Dv), strides stride_g*
    LSE, DELTA,   # in: (B, Hq, Lq) float32 contiguous
    GRAD_K,       # out: dK (B, Hk, Lk, D), key dtype, strides stride_dk*
    GRAD_V,       # out: dV (B, Hk, Lk, Dv), value dtype, strides stride_dv*
    GRAD_Q_SUM,   # in/out with ATOMIC_DQ: dQ summed in float32 (B, Hq, Lq, D), zeroed by the delta kernel
    GRAD_MASK,    # out with MASK_GRAD: dS (B, Hq, Lq, Lk), strides stride_dm*; STORE: in the mask's
                  #     dtype; ADD, ADD_KEYS: float32 atomic adds, stride 0 on the dims the mask broadcasts
    SEED,         # in: the dropout seed, as in the forward
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_sqb, stride_sqh, stride_sqm, stride_sqd,
    stride_dmb, stride_dmh, stride_dmm, stride_dmn,
    heads_q, heads_k, group, len_q, len_k, dim, dim_v,
    bucket_q, bucket_k,  # unused: autotuning keys
    qk_scale, scale, dropout_p,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KEY_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ATOMIC_DQ: tl.constexpr, MASK_GRAD: tl.constexpr, WIDE_OFFSETS: tl.constexpr,
    FLAT_GRID: tl.constexpr,
    DOT_IN_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (block of BLOCK_N keys, key/value head, batch); it loops over the `group`
    query heads sharing that key/value head and over their query blocks, transposed tiles (keys x
    queries):

        P = exp(s - lse)  (s as in the forward);  Pd = P * keep / (1 - p)
        dV = sum over heads of Pd^T dO
        dPd = dO V^T;  dP = dPd * keep / (1 - p);  dS = P * (dP - delta)
        dK = scale * sum over heads of dS^T Q
        with ATOMIC_DQ: GRAD_Q_SUM[query block] += scale * dS K  (float32 atomic adds)
        with MASK_GRAD: d attn_mask = dS  (the mask is added to the scaled scores; ADD_KEYS: a
                        per-key mask, dS summed over the block's queries)

    ATOMIC_DQ makes the backward five products a score (FlashAttention-2's default) instead of
    the seven of this kernel and the dQ kernel, which recomputes S and dP; the order of the adds
    then varies from run to run, so the launcher takes the dQ kernel when PyTorch is asked for
    deterministic algorithms. So do a broadcast mask's gradient sums (ADD, ADD_KEYS): there the
    launcher has the full dS stored instead and sums it afterwards.

    Causal: query blocks before the key block's first key are not visited; key blocks of padding
    keys only visit nothing and write zeros. Without causal or attn_mask, the scores need no mask
    but the keys' own, an additive bias (0, or -inf for keys past Lk and padding): one FFMA a score
    where ``_scores`` takes 3 to 6 operations.
    """
    start_n, hk, b = _program_block(len_k, heads_k, BLOCK_N, FLAT_GRID)
    offs_n = _indices(start_n, BLOCK_N, WIDE_OFFSETS)
    offs_m = _indices(0, BLOCK_M, WIDE_OFFSETS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if HAS_DROPOUT:
        seed = tl.load(SEED)

    # Keys past Lk and padding keys read as 0 (their gradients are 0 whatever they hold, NaN
    # included) and score -inf through key_bias; a block without a key to attend visits no query
    # head. That bound, which comes from loaded data, is on the outer loop: on the query loop it
    # cost up to 46 more registers a thread (ptxas, sm_90, bf16 head dim 64).
    PADDING_ROW = KEY_PADDING + b * stride_pb
    key_ok = offs_n < len_k
    if HAS_KEY_PADDING:
        key_ok = key_ok & (tl.load(PADDING_ROW + offs_n, mask=key_ok, other=1) == 0)
    key_bias = tl.where(key_ok, 0.0, float("-inf"))
    heads_visited = tl.where(tl.max(key_ok.to(tl.int32), axis=0) == 0, 0, group)
    k = _load_tile(K + b * stride_kb + hk * stride_kh + offs_d[None, :] * stride_kd, offs_n[:, None] * stride_kn,
                   key_ok[:, None], offs_d[None, :] < dim, ALIGN, 1, DOT_IN_FP32)
    v = _load_tile(V + b * stride_vb + hk * stride_vh + offs_dv[None, :] * stride_vd, offs_n[:, None] * stride_vn,
                   key_ok[:, None], offs_dv[None, :] < dim_v, ALIGN, 1, DOT_IN_FP32)
    begin_m = 0
    if IS_CAUSAL:
        begin_m = (start_n // BLOCK_M) * BLOCK_M  # rows i < start_n see none of these keys

    grad_k = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    grad_v = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    for g in range(0, heads_visited):
        h = hk * group + g
        Q_TILE = Q + b * stride_qb + h * stride_qh + offs_d[:, None] * stride_qd      # (D, M): Q^T
        DO_TILE = GRAD_OUT + b * stride_gb + h * stride_gh + offs_dv[None, :] * stride_gd  # (M, Dv)
        MASK_TILE = MASK + b * stride_mb + h * stride_mh
        row_base = (b * heads_q + h) * len_q
        for start_m in range(begin_m, len_q, BLOCK_M):
            idx_m = start_m + offs_m
            q_t = _load_tile(Q_TILE, idx_m[None, :] * stride_qm, idx_m[None, :] < len_q, offs_d[:, None] < dim,
                             ALIGN, 0, DOT_IN_FP32)
            qk_t = tl.dot(k, q_t, input_precision=DOT_PRECISION)
            if IS_CAUSAL or MASK_KIND != 0:
                s_t = _scores(qk_t, idx_m[None, :], offs_n[:, None], key_ok[:, None], MASK_TILE, stride_mm, stride_mn,
                              PADDING_ROW, len_q, qk_scale, IS_CAUSAL, MASK_KIND, False)
            else:  # rows past Lq need no mask: their lse reads as -inf, so P = 0 (_row_lse_log2)
                s_t = qk_t * qk_scale + key_bias[:, None]
            p_t = tl.math.exp2(s_t - _row_lse_log2(LSE + row_base, idx_m, len_q)[None, :])
            do = _load_tile(DO_TILE, idx_m[:, None] * stride_gm, idx_m[:, None] < len_q, offs_dv[None, :] < dim_v,
                            ALIGN, 1, DOT_IN_FP32)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dPd^T (N, M)
            if HAS_DROPOUT:
                keep_t = dropout_keep(seed, row_base + idx_m, start_n, len_k, dropout_p, WIDE_OFFSETS, BLOCK_N,
                                      TRANSPOSED=True)
                pd_t = tl.where(keep_t, p_t / (1.0 - dropout_p), 0.0)
                dp_t = tl.where(keep_t, dp_t / (1.0 - dropout_p), 0.0)
            else:
                pd_t = p_t
            grad_v += tl.dot(pd_t.to(do.dtype), do, input_precision=DOT_PRECISION)
            delta = tl.load(DELTA + row_base + idx_m, mask=idx_m < len_q, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            grad_k += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PRECISION)
            if ATOMIC_DQ:
                grad_q = tl.dot(tl.trans(ds_t.to(k.dtype)), k, input_precision=DOT_PRECISION) * scale
                tl.atomic_add(GRAD_Q_SUM + b * stride_sqb + h * stride_sqh + idx_m[:, None] * stride_sqm
                              + offs_d[None, :] * stride_sqd, grad_q,
                              mask=(idx_m[:, None] < len_q) & (offs_d[None, :] < dim), sem="relaxed")
            if MASK_GRAD != 0:
                grad_mask = GRAD_MASK + b * stride_dmb + h * stride_dmh + idx_m[None, :] * stride_dmm \
                    + offs_n[:, None] * stride_dmn
                in_bounds = (idx_m[None, :] < len_q) & (offs_n[:, None] < len_k)
                if MASK_GRAD == 1:
                    tl.store(grad_mask, ds_t.to(GRAD_MASK.dtype.element_ty), mask=in_bounds)
                elif MASK_GRAD == 2:
                    tl.atomic_add(grad_mask, ds_t, mask=in_bounds, sem="relaxed")
                else:  # one add a key, not BLOCK_M adds contending for the same word
                    key_sums = tl.sum(tl.where(in_bounds, ds_t, 0.0), axis=1)
                    tl.atomic_add(GRAD_MASK + b * stride_dmb + h * stride_dmh + offs_n * stride_dmn, key_sums,
                                  mask=offs_n < len_k, sem="relaxed")

    grad_k *= scale
    _store_tile(GRAD_K + b * stride_dkb + hk * stride_dkh + offs_d[None, :] * stride_dkd,
                offs_n[:, None] * stride_dkn, offs_n[:, None] < len_k, offs_d[None, :] < dim, grad_k, ALIGN)
    _store_tile(GRAD_V + b * stride_dvb + hk * stride_dvh + offs_dv[None, :] * stride_dvd,
                offs_n[:, None] * stride_dvn, offs_n[:, None] < len_k, offs_dv[None, :] < dim_v, grad_v, ALIGN)


@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V,      # in: as in the forward (strides stride_q*, stride_k*, stride_v*)
    MASK,         # in: attn_mask as in the forward (strides stride_m*)
    KEY_PADDING,  # in: as in the forward
    GRAD_OUT,     # in: dO (B, Hq, Lq, Dv), strides stride_g*
    LSE, DELTA,   # in: (B, Hq, Lq) float32 contiguous
    GRAD_Q,       # out: dQ (B, Hq, Lq, D), query dtype, strides stride_dq*
    SEED,         # in: the dropout seed, as in the forward
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_pb,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    heads_q, group, len_q, len_k, dim, dim_v,
    bucket_q, bucket_k,  # unused: autotuning keys
    qk_scale, scale, dropout_p,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_KEY_PADDING: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, WIDE_OFFSETS: tl.constexpr, FLAT_GRID: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program per (block of BLOCK_M query rows, query head, batch), visiting the key tiles
    the forward visits:

        P = exp(s - lse);  dP = (dO V^T) * keep / (1 - p);  dS = P * (dP - delta)
        dQ = scale * dS K
    """
    start_m, h, b = _program_block(len_q, heads_q, BLOCK_M, FLAT_GRID)
    hk = h // group
    offs_m = _indices(start_m, BLOCK_M, WIDE_OFFSETS)
    offs_n = _indices(0, BLOCK_N, WIDE_OFFSETS)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_base = (b * heads_q + h) * len_q
    if HAS_DROPOUT:
        seed = tl.load(SEED)
    PADDING_ROW = KEY_PADDING + b * stride_pb
    key_len = len_k
    if HAS_KEY_PADDING:
        key_len, _ = _key_range(PADDING_ROW, len_k)

    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_d[None, :] * stride_qd, offs_m[:, None] * stride_qm,
                   offs_m[:, None] < len_q, offs_d[None, :] < dim, ALIGN, 1, DOT_IN_FP32)
    do = _load_tile(GRAD_OUT + b * stride_gb + h * stride_gh + offs_dv[None, :] * stride_gd,
                    offs_m[:, None] * stride_gm, offs_m[:, None] < len_q, offs_dv[None, :] < dim_v, ALIGN, 1,
                    DOT_IN_FP32)
    lse_log2 = _row_lse_log2(LSE + row_base, offs_m, len_q)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < len_q, other=0.0)
    K_TILE = K + b * stride_kb + hk * stride_kh + offs_d[None, :] * stride_kd
    V_TILE = V + b * stride_vb + hk * stride_vh + offs_dv[None, :] * stride_vd
    MASK_TILE = MASK + b * stride_mb + h * stride_mh

    end_n = key_len
    if IS_CAUSAL:
        end_n = tl.minimum(end_n, start_m + BLOCK_M)

    grad_q = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, end_n, BLOCK_N):
        idx_n = start_n + offs_n
        k = _load_tile(K_TILE, idx_n[:, None] * stride_kn, idx_n[:, None] < key_len, offs_d[None, :] < dim,
                       ALIGN, 1, DOT_IN_FP32)
        v = _load_tile(V_TILE, idx_n[:, None] * stride_vn, idx_n[:, None] < key_len, offs_dv[None, :] < dim_v,
                       ALIGN, 1, DOT_IN_FP32)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = _scores(qk, offs_m[:, None], idx_n[None, :], idx_n[None, :] < key_len, MASK_TILE, stride_mm, stride_mn,
                    PADDING_ROW, len_q, qk_scale, IS_CAUSAL, MASK_KIND, HAS_KEY_PADDING)
        p = tl.math.exp2(s - lse_log2[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, row_base + offs_m, start_n, len_k, dropout_p, WIDE_OFFSETS, BLOCK_N)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        grad_q += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    grad_q *= scale
    _store_tile(GRAD_Q + b * stride_dqb + h * stride_dqh + offs_d[None, :] * stride_dqd,
                offs_m[:, None] * stride_dqm, offs_m[:, None] < len_q, offs_d[None, :] < dim, grad_q, ALIGN)


# --------------------------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------------------------
# Under the interpreter: small fixed tiles (fast on the CPU, and odd lengths cross tile edges).
_INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}

# On the GPU: (BLOCK_M, BLOCK_N, num_warps, num_stages) for Hopper / Ampere, by padded head dim
# (the larger of D and Dv). Configs that do not fit in shared memory (float32 inputs need about
# twice the bytes of 16-bit ones) are skipped by the autotuner. Each list ends with a
# single-stage config that fits in 99 KiB for every dtype with Triton 3.2 to 3.8: the least
# shared memory a block gets on the GPUs Triton supports (compute capability 8.6, 8.9 and 12.0:
# RTX 30xx-50xx, A10, L4, L40S), so that some config always runs (checked for sm_89 by
# tests/test_triton_compile.py). One exception: the dK/dV kernel with atomic dQ in float32 at
# head dims over 128 needs 116-128 KiB with Triton 3.6 and 3.8 even on 16 x 16 tiles;
# attention_bwd then takes the dQ kernel instead (``_atomic_dq_unfit``).
_GPU_CONFIGS = {
    "fwd": {
        64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 4, 4), (128, 32, 4, 4), (64, 64, 4, 3),
             (64, 64, 4, 4), (64, 32, 4, 3), (32, 32, 4, 1)],
        128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
              (64, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 1)],
        256: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 1),
              (16, 16, 4, 1)],
    },
    "dkdv": {  # (BLOCK_M: query rows streamed, BLOCK_N: keys held by the program)
        64: [(32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 3),
             (64, 64, 4, 2), (16, 32, 4, 1)],
        128: [(32, 128, 8, 2), (32, 128, 4, 2), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3),
              (64, 64, 8, 3), (16, 32, 4, 1), (16, 16, 4, 1)],
        256: [(32, 64, 4, 2), (32, 64, 8, 2), (16, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2), (16, 32, 4, 1),
              (16, 16, 2, 1)],
    },
    "dq": {  # (BLOCK_M: query rows held by the program, BLOCK_N: keys streamed)
        64: [(128, 32, 4, 3), (128, 64, 8, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3),
             (128, 128, 8, 2), (32, 16, 4, 1)],
        128: [(128, 32, 8, 2), (128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 3), (32, 16, 4, 1)],
        256: [(64, 32, 4, 2), (64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2), (32, 64, 4, 2), (32, 16, 4, 1),
              (16, 16, 4, 1)],
    },
}
_TUNING_KEY = ["bucket_q", "bucket_k", "group", "BLOCK_D", "BLOCK_DV", "IS_CAUSAL", "MASK_KIND",
               "HAS_KEY_PADDING", "HAS_DROPOUT", "ATOMIC_DQ", "MASK_GRAD", "ALIGN", "DOT_PRECISION"]
_KERNELS = {"fwd": _attention_fwd_kernel, "dkdv": _attention_bwd_dkdv_kernel, "dq": _attention_bwd_dq_kernel}


def _head_class(block_d: int, block_dv: int) -> int:
    """The config list a launch takes: its larger padded head dim, at least 64."""
    return max(64, block_d, block_dv)


def _configs(kind: str, head_class: int) -> list[tuple[int, int, int, int]]:
    return _GPU_CONFIGS[kind][head_class]


@functools.lru_cache(maxsize=None)
def _autotuned(kind: str, head_class: int):
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _configs(kind, head_class)]
    # The dK/dV kernel's atomic sums (dQ, a broadcast mask's gradient) must start at zero for each
    # timed run and the real one; so must a stored mask gradient, whose skipped tiles stay unwritten.
    reset = ["GRAD_Q_SUM", "GRAD_MASK"] if kind == "dkdv" else None
    # Only the key's names that are parameters of this kernel: Triton 3.9 refuses the others.
    key = [name for name in _TUNING_KEY if name in _KERNELS[kind].arg_names]
    return triton.autotune(configs=configs, key=key, reset_to_zero=reset)(_KERNELS[kind])


_forced_config: int | None = None


@contextlib.contextmanager
def use_config(index: int):
    """Launch config ``index`` of each list (modulo its length) instead of autotuning."""
    global _forced_config
    previous, _forced_config = _forced_config, index
    try:
        yield
    finally:
        _forced_config = previous


def _fixed_config_index() -> int | None:
    if _forced_config is not None:
        return _forced_config
    return -1 if os.environ.get("FASTFORMER_TRITON_AUTOTUNE", "1") == "0" else None


# Triton's autotuner compiles each config lazily inside its timing loop, one after the other, and
# on a first run compilation is most of an autotune (about 19 configs for a forward and backward,
# each 0.5-2 s). When a launch brings a new tuning key, its configs are first compiled on threads
# (the compiler's native passes and ptxas run outside the GIL); the autotuner then finds each in
# the kernel's cache and only times them. FASTFORMER_TRITON_COMPILE_WORKERS: threads (default: the
# usable cores less one, at most 8; 1 turns this off).
_precompiled: set = set()


def _compile_workers() -> int:
    chosen = os.environ.get("FASTFORMER_TRITON_COMPILE_WORKERS", "").strip()
    if chosen:
        if not chosen.isdigit():
            raise ValueError(f"FASTFORMER_TRITON_COMPILE_WORKERS must be a whole number of threads, got {chosen!r}")
        return max(1, int(chosen))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(8, cores - 1)


@functools.lru_cache(maxsize=None)
def _tuning_arg_positions(kind: str) -> tuple[int, ...]:
    """Where the tuning key's run-time arguments are in a launch's positional arguments (its
    compile-time ones are in the launch's meta)."""
    parameters = inspect.signature(_KERNELS[kind].fn).parameters  # (.fn: JIT and interpreted kernels alike)
    runtime = [name for name, parameter in parameters.items() if "constexpr" not in str(parameter.annotation)]
    return tuple(runtime.index(name) for name in _TUNING_KEY if name in runtime)


def _launch_key(kind: str, args: tuple, meta: dict) -> tuple:
    """What tells one launch's tuning apart: everything in the autotuner's own key (the values of
    the tuning key's arguments, the dtypes of the tensor arguments, which come first in every
    launch) and all the compile-time switches."""
    dtypes = []
    for arg in args:
        if not isinstance(arg, torch.Tensor):
            break
        dtypes.append(arg.dtype)
    return (kind, *dtypes, *(args[i] for i in _tuning_arg_positions(kind)), *meta.items())


def _precompile(tuner, key: tuple, args: tuple, meta: dict) -> None:
    """Compiles every config of ``tuner`` for this launch on threads, once per launch key."""
    if key in _precompiled:
        return
    _precompiled.add(key)
    configs = list(tuner.configs)
    workers = min(_compile_workers(), len(configs) - 1)
    if workers < 2:
        return

    def compile_config(config):
        with on_device(args[0]):  # a new thread starts on device 0
            try:
                tuner.fn.warmup(*args, grid=(1,), **meta, **config.all_kwargs())
            except Exception:  # noqa: BLE001 - the autotuner meets it again in its own loop and handles it
                pass

    compile_config(configs[0])  # here first: the kernel makes its per-device caches once
    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="fastformer-compile") as pool:
        list(pool.map(compile_config, configs[1:]))


# The config the autotuner chose, by launch key. Triton's Autotuner.run costs 22-42 microseconds a
# launch even when its cache has the answer (measured on the CPU with Triton 3.6 and 3.8: it
# rebuilds a dict of the launch's 40-60 arguments and scans its list of argument names for each),
# as long as a small kernel runs. Once it has chosen for a key, later launches with that key go to
# the kernel directly with the chosen config's kwargs, as the autotuner itself launches it on a
# cache hit (it would also call the Config's pre_hook: _autotuned's configs have none).
_chosen_configs: dict = {}
_tuning_lock = threading.Lock()


def _launch(kind: str, rows: int, heads: int, batch: int, args: tuple, meta: dict, interpret: bool):
    """Launch kernel ``kind`` over (cdiv(rows, BLOCK), heads, batch) programs (``_program_block``);
    BLOCK is BLOCK_M for the forward and dQ (query blocks), BLOCK_N for dK/dV (key blocks). Row
    blocks vary fastest, so programs reading the same K/V run together (L2 reuse)."""
    tiled = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"

    def grid(blocks):
        return _grid(rows, blocks[tiled], heads, batch, meta["FLAT_GRID"])

    if interpret:
        _KERNELS[kind][grid(_INTERPRETER_BLOCKS)](*args, **meta, **_INTERPRETER_BLOCKS, num_warps=4)
        return
    head_class = _head_class(meta["BLOCK_D"], meta["BLOCK_DV"])
    index = _fixed_config_index()
    if index is None:
        key = _launch_key(kind, args, meta)
        config = _chosen_configs.get(key)
        if config is None:
            tuner = _autotuned(kind, head_class)
            # One thread at a time: the autotuner keeps the launch's arguments and its choice on
            # itself (nargs, best_config), which another thread's launch would overwrite.
            with _tuning_lock:
                _precompile(tuner, key, args, meta)
                tuner[grid](*args, **meta)
                chosen = getattr(tuner, "best_config", None)  # (none where a run chose nothing: compile_triton.py's)
            if chosen is not None:
                _chosen_configs[key] = chosen
            return
        _KERNELS[kind][grid(config.kwargs)](*args, **meta, **config.all_kwargs())
        return
    configs = _configs(kind, head_class)
    block_m, block_n, num_warps, num_stages = configs[index % len(configs)]
    blocks = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    _KERNELS[kind][grid(blocks)](*args, **meta, **blocks, num_warps=num_warps, num_stages=num_stages)


GRID_YZ_LIMIT = 65535  # CUDA's limit on grid axes y and z; x holds 2^31 - 1


def _grid(rows: int, block: int, heads: int, batch: int, flat: bool) -> tuple[int, ...]:
    """The grid of a (row block, head, batch) launch, as ``_program_block`` decodes it."""
    if not flat:
        return (cdiv(rows, block), heads, batch)
    programs = cdiv(rows, block) * heads * batch
    if programs >= 2**31:  # billions of heads of tiny sequences
        raise ValueError(f"attention (triton): {programs} programs exceed the grid limit of 2^31 - 1")
    return (programs,)


def _head_block(dim: int) -> int:
    return max(16, next_power_of_2(dim))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _attn_mask(query, key, attn_mask):
    """(mask, mask kind): attn_mask expanded to (B, Hq, Lq, Lk) (a view, stride 0 on broadcast
    dims), bool viewed as uint8, float in the query dtype; or the query as an unused placeholder."""
    if attn_mask is None:
        return query, NO_MASK
    attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    if attn_mask.dtype == torch.bool:
        return attn_mask.view(torch.uint8), BOOL_MASK
    return attn_mask.to(query.dtype), FLOAT_MASK


def _key_padding(key_padding_mask):
    """The padding as uint8 (B, Lk) with unit key stride (a view where it has one), or None.

    The kernels find each batch row's key end (one past its last unpadded key) from it and skip
    the key tiles from there on, so right padding (the usual case) costs nothing, and test the
    padding byte of each key they visit, so any other pattern is exact too.
    """
    if key_padding_mask is None:
        return None
    padding = key_padding_mask.view(torch.uint8)
    return padding if padding.stride(-1) == 1 else padding.contiguous()


def _strides(t):
    return tuple(t.stride())


def _common(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, tiles):
    """What the forward and backward kernels share: (MASK, KEY_PADDING, the strides of the mask
    and the padding, the compile-time switches); placeholders (the query, zero strides)
    for what is absent. ``tiles``: the other (B, H, L, head dim) tensors the kernels read or write
    with strides of their own (the forward's output; the backward's output and dO); the kernels'
    ALIGN is the vector width every row of q, k, v and these starts on (fastformer.triton.alignment)."""
    batch, heads_q, len_q, dim = query.shape
    len_k, dim_v = key.shape[2], value.shape[-1]
    if dim > MAX_HEAD_DIM or dim_v > MAX_HEAD_DIM:
        raise ValueError(f"attention (triton): head dims up to {MAX_HEAD_DIM}, got {dim} and {dim_v}")
    mask, mask_kind = _attn_mask(query, key, attn_mask)
    padding = _key_padding(key_padding_mask)
    align = alignment.vector_alignment((dim, dim_v), (query, key, value, *tiles))
    addressed = (query, key, value, *tiles) if mask_kind == NO_MASK else (query, key, value, mask, *tiles)
    meta = dict(IS_CAUSAL=bool(is_causal), MASK_KIND=mask_kind, HAS_KEY_PADDING=padding is not None,
                HAS_DROPOUT=dropout_p > 0.0,
                WIDE_OFFSETS=wide_offsets(batch * heads_q * len_q * len_k) or _wide_rows(addressed),
                FLAT_GRID=max(batch, heads_q) > GRID_YZ_LIMIT,
                DOT_IN_FP32=interpreter_enabled(), DOT_PRECISION=_dot_precision(query.dtype), ALIGN=align,
                BLOCK_D=_head_block(dim), BLOCK_DV=_head_block(dim_v))
    mask_strides = _strides(mask) if mask_kind != NO_MASK else (0, 0, 0, 0)
    if padding is None:  # a placeholder, never read
        padding = query
    return mask, padding, (*mask_strides, padding.stride(0)), meta


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision. Float32 follows PyTorch's switch for float32 matmuls, read at each
    call: "tf32" where ``torch.backends.cuda.matmul.allow_tf32`` is set, else "tf32x3": float32
    accuracy (products within about 2^-21, as PyTorch's matmuls and SDPA's float32 kernels are by
    default) on the tensor cores, three TF32 products a dot. Plain float32 ("ieee") would fall
    back to FMA, several times slower, and Triton 3.2 fails to compile the dK/dV kernel with it.
    16-bit inputs run on the tensor cores either way; they get one fixed value, so that the flag
    adds no variants."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"


def _wide_rows(tensors) -> bool:
    """Whether the elements of some (B, H, L, D) tensor within one (batch, head) lie 2^31 or more
    apart, so that the kernels' row index times row stride (and head-dim index times its stride)
    needs int64: a 64k x 64k attn_mask, or a million-token projection."""
    for t in tensors:
        _, _, rows, cols = t.shape
        _, _, row_stride, col_stride = t.stride()
        if wide_offsets(1 + (rows - 1) * abs(row_stride) + (cols - 1) * abs(col_stride)):
            return True
    return False


def _bucket(length: int) -> int:
    return next_power_of_2(max(1, length))


def attention_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, *,
                  out_like_query=True):
    """Returns (out (B, Hq, Lq, Dv), lse (B, Hq, Lq) float32); out laid out like the query
    (``attention_layout_like``), or with ``out_like_query=False`` stored as (B, Lq, Hq, Dv)."""
    batch, heads_q, len_q, dim = query.shape
    heads_k, len_k, dim_v = key.shape[1], key.shape[2], value.shape[-1]
    out = attention_output_like(query, dim_v, out_like_query)
    lse = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=query.device)
    if out.numel() == 0 or len_k == 0:  # nothing to attend to
        return out.zero_(), lse.fill_(float("-inf"))
    mask, padding, mask_strides, meta = _common(query, key, value, attn_mask, key_padding_mask, dropout_p,
                                                is_causal, (out,))
    args = (query, key, value, mask, padding, out, lse, seed_pointer(seed, dropout_p, query),
            *_strides(query), *_strides(key), *_strides(value), *mask_strides, *_strides(out),
            heads_q, heads_q // heads_k, len_q, len_k, dim, dim_v, _bucket(len_q), _bucket(len_k),
            scale * LOG2E, float(dropout_p))
    with on_device(query):
        _launch("fwd", len_q, heads_q, batch, args, meta, interpreter_enabled())
    return out, lse


# (device, dtype, BLOCK_D, BLOCK_DV) of backward launches whose dK/dV kernel with atomic dQ fit no
# config in the GPU's shared memory (float32 at head dims over 128 on 99 KiB GPUs, see
# _GPU_CONFIGS): they take the dQ kernel, as in deterministic mode.
_atomic_dq_unfit: set = set()


def attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p,
                  is_causal, scale, seed, mask_needs_grad):
    """Returns (grad_query, grad_key, grad_value, grad_attn_mask): gradients in the input dtypes,
    each in its input's memory order (``fastformer.library.attention_layout_like``); the mask's,
    with ``mask_needs_grad`` (else None), in the 4-D shape it came in (size 1 where it broadcasts).

    dQ comes from float32 atomic adds in the dK/dV kernel, unless PyTorch is asked for
    deterministic algorithms or that kernel fits no config in the GPU's shared memory (Triton then
    raises OutOfResources before launching anything; under ``use_config`` that error is the
    caller's): then from the dQ kernel."""
    args = (grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed,
            mask_needs_grad)
    launch = (query.device, query.dtype, _head_block(query.shape[-1]), _head_block(value.shape[-1]))
    if torch.are_deterministic_algorithms_enabled() or launch in _atomic_dq_unfit:
        return _attention_bwd(*args, atomic_dq=False)
    try:
        return _attention_bwd(*args, atomic_dq=True)
    except OutOfResources:
        if _forced_config is not None:  # use_config(i): that config does not fit, not every config
            raise
        _atomic_dq_unfit.add(launch)
        return _attention_bwd(*args, atomic_dq=False)


def _attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p,
                   is_causal, scale, seed, mask_needs_grad, *, atomic_dq):
    batch, heads_q, len_q, dim = query.shape
    heads_k, len_k, dim_v = key.shape[1], key.shape[2], value.shape[-1]
    grad_q, grad_k, grad_v = (attention_layout_like(t) for t in (query, key, value))
    if batch * heads_q * len_q == 0 or len_k == 0:
        grad_mask = None
        if mask_needs_grad:
            grad_mask = torch.zeros(attn_mask.shape, dtype=attn_mask.dtype, device=attn_mask.device)
        return grad_q.zero_(), grad_k.zero_(), grad_v.zero_(), grad_mask
    mask, padding, mask_strides, meta = _common(query, key, value, attn_mask, key_padding_mask, dropout_p,
                                                is_causal, (out, grad_out, grad_q, grad_k, grad_v))
    interpret = interpreter_enabled()
    seed = seed_pointer(seed, dropout_p, query)
    delta = torch.empty((batch, heads_q, len_q), dtype=torch.float32, device=query.device)
    # The atomic dQ sums: grad_q itself when it is float32, else a float32 tensor in its memory
    # order (so that the final cast is one elementwise copy); the delta kernel zeroes them. Without
    # atomic dQ the argument is unused: grad_q, which the autotuner's reset_to_zero may zero before
    # the dQ kernel writes it.
    grad_q_sum = grad_q
    if atomic_dq and grad_q.dtype != torch.float32:
        grad_q_sum = torch.empty_like(grad_q, dtype=torch.float32)
    # Without a mask gradient, GRAD_MASK is grad_k, unused (the autotuner may zero it before the
    # kernel writes it).
    scores_shape = (batch, heads_q, len_q, len_k)
    mask_grad, grad_mask_strides, grad_mask_sums = NO_MASK_GRAD, (0, 0, 0, 0), grad_k
    if mask_needs_grad:
        grad_mask_sums, accumulate = mask_grad_buffer(attn_mask, scores_shape, deterministic=not atomic_dq)
        grad_mask_strides = broadcast_strides(grad_mask_sums, scores_shape)
        mask_grad = STORE_MASK_GRAD
        if accumulate:
            mask_grad = ADD_KEYS_MASK_GRAD if grad_mask_strides[2] == 0 and len_q > 1 else ADD_MASK_GRAD
        meta["WIDE_OFFSETS"] = meta["WIDE_OFFSETS"] or _wide_rows((grad_mask_sums,))
    with on_device(query):
        block_m = _INTERPRETER_BLOCKS["BLOCK_M"] if interpret else 64
        _attention_bwd_preprocess_kernel[_grid(len_q, block_m, heads_q, batch, meta["FLAT_GRID"])](
            out, grad_out, delta, grad_q_sum, *_strides(out), *_strides(grad_out), *_strides(grad_q_sum), heads_q,
            len_q, dim, dim_v, ZERO_GRAD_Q_SUM=atomic_dq, WIDE_OFFSETS=meta["WIDE_OFFSETS"],
            FLAT_GRID=meta["FLAT_GRID"], ALIGN=meta["ALIGN"], BLOCK_M=block_m, BLOCK_D=meta["BLOCK_D"],
            BLOCK_DV=meta["BLOCK_DV"])
        shared = (query, key, value, mask, padding, grad_out, lse, delta)
        strides = (*_strides(query), *_strides(key), *_strides(value), *mask_strides, *_strides(grad_out))
        group = heads_q // heads_k
        tail = (_bucket(len_q), _bucket(len_k), scale * LOG2E, scale, float(dropout_p))
        _launch("dkdv", len_k, heads_k, batch,
                (*shared, grad_k, grad_v, grad_q_sum, grad_mask_sums, seed, *strides, *_strides(grad_k),
                 *_strides(grad_v), *_strides(grad_q_sum), *grad_mask_strides, heads_q, heads_k, group, len_q,
                 len_k, dim, dim_v, *tail),
                {**meta, "ATOMIC_DQ": atomic_dq, "MASK_GRAD": mask_grad}, interpret)
        if not atomic_dq:
            _launch("dq", len_q, heads_q, batch,
                    (*shared, grad_q, seed, *strides, *_strides(grad_q), heads_q, group, len_q, len_k, dim, dim_v,
                     *tail), meta, interpret)
        elif grad_q_sum is not grad_q:
            grad_q.copy_(grad_q_sum)
    grad_mask = mask_grad_from(grad_mask_sums, attn_mask) if mask_grad != NO_MASK_GRAD else None
    return grad_q, grad_k, grad_v, grad_mask
