"""Flash attention in CUDA C++ (``csrc/attention/``): the Python side of the "cuda" backend.

The kernels (FlashAttention-2 structure, tensor-core ``mma.sync`` m16n8k16 with ``ldmatrix`` and
``cp.async``; see ``csrc/attention/*.cuh``) are registered by the extension as
``torch.ops.fastformer.cuda_attention_fwd`` / ``cuda_attention_bwd``. This module implements the
contract every attention backend implements (``attention_fwd`` / ``attention_bwd``, as
``fastformer.triton.attention``): the same dropout offsets and keep rule (Philox, bit-identical to
the Triton backend), the same log-sum-exp convention (float32 (B, Hq, Lq), natural log, -inf on
rows with no key) and the same results for rows with no key (output 0, gradients 0).

What the kernels handle (declared by :func:`support`):
- float16 / bfloat16, float32 accumulation;
- head dims 1..128: compiled for 32, 64, 96 and 128, any other padded up to the next one by
  predication (zeros loaded past the head dim, nothing stored there; no copies);
- any strides with a contiguous last dim (others are made contiguous here); rows are loaded with
  16-byte cp.async when 16-byte aligned, 4-byte cp.async when 4-byte aligned (head dim 50 in a
  (B, L, H, D) projection), element by element otherwise;
- is_causal (top-left aligned, as SDPA), with key tiles past the diagonal skipped;
- GQA / MQA (Hq % Hk == 0): K and V are never repeated; the dK/dV kernel sums the query heads of
  a key/value head in registers (dK and dV are run-to-run identical);
- dQ: summed by the dK/dV kernel with float32 atomics (FlashAttention-2's default; five products
  a score), or, under ``torch.use_deterministic_algorithms(True)``, by a dQ kernel that recomputes
  the scores (seven; run-to-run identical);
- key_padding_mask: read as one byte per key; key tiles past each batch row's last unpadded key
  are skipped (right padding, the usual case, costs no work), and the bytes are tested only in
  batch rows with padding before that key end. Both found on the device by one small kernel
  (one launch per call, no host synchronisation);
- attn_mask, bool or additive float, broadcastable to (B, Hq, Lq, Lk), read tile by tile through
  a stride-0 view (a float mask is rounded to the query dtype, as the other backends see it, and
  read as float32; fastformer.attention saturates a wider one first);
- dropout, regenerated in the backward from the seed.
- a value head dim different from the query/key one (both up to 128; the instantiation is chosen
  by the larger, which is also the head dim dispatch checks);
- a float attn_mask's gradient (a learned position bias): dS, written by the dK/dV kernel's own
  variant into float32, stored where the mask has the full (B, Hq, Lq, Lk) shape, added with
  atomics where it broadcasts (summed over the queries first for a per-key bias), or under
  deterministic algorithms stored in full and summed here (``fastformer.masks.mask_grad_buffer``).
"""

from __future__ import annotations

import torch

from fastformer import cuda
from fastformer.masks import mask_grad_buffer, mask_grad_from

__all__ = ["MAX_HEAD_DIM", "attention_bwd", "attention_fwd", "support"]

# The largest head dim the kernels are compiled for (csrc/attention/launch.h, kMaxHeadDim).
MAX_HEAD_DIM = 128
DTYPES = frozenset({torch.float16, torch.bfloat16})
FEATURES = frozenset({"dropout", "causal", "bool_mask", "float_mask", "mask_grad", "key_padding_mask", "gqa",
                      "value_dim"})


def support():
    """What the CUDA attention kernels support, for ``fastformer.dispatch``."""
    from fastformer.dispatch import Support

    return Support(devices=frozenset({"cuda"}), dtypes=DTYPES, features=FEATURES,
                   head_dims=(1, MAX_HEAD_DIM), min_compute_capability=(8, 0))


def _check(query, key, value):
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() != 4:
            raise ValueError(f"attention (cuda): {name} must be 4-D (batch, heads, seq_len, head_dim), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype not in DTYPES:
            raise ValueError(f"attention (cuda): dtype must be float16 or bfloat16, got {name} {t.dtype}")
    dim, dim_v = query.shape[-1], value.shape[-1]
    if max(dim, dim_v) > MAX_HEAD_DIM:
        raise ValueError(f"attention (cuda): head dims up to {MAX_HEAD_DIM}, got {dim} and {dim_v}")
    heads_q, heads_k = query.shape[1], key.shape[1]
    heads_fit = heads_q % heads_k == 0 if heads_k > 0 else heads_q == 0  # (no heads at all: an empty call)
    if not heads_fit:
        raise ValueError(f"attention (cuda): query heads ({heads_q}) must be a multiple of key/value heads "
                         f"({heads_k})")
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.device.type != cuda.KERNEL_DEVICE:
            raise ValueError(f"attention (cuda): {name} must be a CUDA tensor, got {t.device}")


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def attention_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, *,
                  out_like_query=True):
    """Returns (out (B, Hq, Lq, Dv), lse (B, Hq, Lq) float32); out laid out like the query
    (``fastformer.library.attention_layout_like``), or with ``out_like_query=False`` stored as
    (B, Lq, Hq, Dv)."""
    _check(query, key, value)
    query, key, value = (_last_dim_contiguous(t) for t in (query, key, value))
    seed = cuda.seed_argument("attention (cuda)", seed, query)
    return cuda.kernel_ops().cuda_attention_fwd(query, key, value, attn_mask, key_padding_mask, float(scale),
                                                bool(is_causal), float(dropout_p), seed, bool(out_like_query))


def attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p,
                  is_causal, scale, seed, mask_needs_grad):
    """Returns (grad_query, grad_key, grad_value, grad_attn_mask): gradients in the input dtypes,
    each in its input's memory order (``fastformer.library.attention_layout_like``); the mask's,
    with ``mask_needs_grad`` (else None), in the 4-D shape and the dtype it came in."""
    _check(query, key, value)
    query, key, value, out, grad_out = (_last_dim_contiguous(t) for t in (query, key, value, out, grad_out))
    if grad_out.dtype != query.dtype:
        grad_out = grad_out.to(query.dtype)
    seed = cuda.seed_argument("attention (cuda)", seed, query)
    grad_mask_buffer = None
    if mask_needs_grad:
        scores_shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        grad_mask_buffer, _ = mask_grad_buffer(attn_mask, scores_shape, torch.are_deterministic_algorithms_enabled(),
                                               dtype=torch.float32)
    grad_q, grad_k, grad_v = cuda.kernel_ops().cuda_attention_bwd(
        grad_out, query, key, value, out, lse.contiguous(), attn_mask, key_padding_mask, float(scale),
        bool(is_causal), float(dropout_p), seed, grad_mask_buffer)
    grad_mask = None if grad_mask_buffer is None else mask_grad_from(grad_mask_buffer, attn_mask)
    return grad_q, grad_k, grad_v, grad_mask
