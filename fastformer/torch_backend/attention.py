"""Attention composed from PyTorch ops: the fallback that supports every call, and the CPU path.

Forward: ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), which runs PyTorch's own
fused kernel for the device, with every fastformer mask folded into one SDPA mask. With dropout,
explicit math instead, because SDPA's dropout mask cannot be regenerated for the backward.

Backward: explicit math, in chunks of the batch so that at most about 256 MiB of scores are live:
    S = scale * Q K^T + mask;  P = softmax(S);  Pd = P * keep / (1 - p)      (keep = all-ones if p = 0)
    O = Pd V
    dV = Pd^T dO;  dPd = dO V^T;  dP = dPd * keep / (1 - p)
    dS = P * (dP - rowsum(P * dP))
    dQ = scale * dS K;  dK = scale * dS^T Q;  dmask = dS summed over the mask's broadcast dims
With GQA, K and V are repeated over the query heads of their group and dK, dV summed back.

Rows with no key left to attend to: their mask row is opened (so softmax stays finite and no NaN
reaches any gradient) and their output and incoming gradient are multiplied by 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastformer.dispatch import forward_mode_ad
from fastformer.masks import fold_key_padding, future_keys
from fastformer.torch_backend.dropout import dropout, dropout_keep_mask, uses_own_sampler

_CHUNK_BYTES = 256 * 2**20

# The backward below is composed of differentiable PyTorch ops: autograd can differentiate it
# again (double backward; fastformer.library reads this).
DIFFERENTIABLE_BACKWARD = True

# SDPA's memory-efficient CUDA kernel adds the mask to the scores and then multiplies them by
# log2(e): a finite mask value beyond +-2.36e38 (finfo(float32 or bfloat16).min, which Hugging Face
# fills its masks with) overflows to infinity there, and a row masked only that way gives NaN
# where SDPA's math (the CPU) attends uniformly (pytorch/pytorch#110213). On CUDA, finite values
# of such masks are saturated at this bound, as the Triton and CUDA kernels saturate them.
_CUDA_MASK_LIMIT = 2.35e38


def _folded_mask(query, key, attn_mask, key_padding_mask, is_causal):
    """One mask holding attn_mask, key_padding_mask and causality, plus the rows still alive.

    Returns (mask, alive): mask is None, bool (True = attend) or float (additive, in the query
    dtype), broadcastable to (B, Hq, Lq, Lk); alive is None or a bool tensor broadcastable to
    (B, Hq, Lq, 1), False on rows with no key left (those rows are opened in the returned mask).
    With no attn_mask and no key_padding_mask, returns (None, None): causality alone leaves every
    row key 0 (top-left alignment), and the caller applies it.
    """
    if attn_mask is None and key_padding_mask is None:
        return None, None
    mask = attn_mask
    if mask is not None and mask.dtype != torch.bool and mask.dtype != query.dtype:
        mask = mask.to(query.dtype)  # SDPA wants bool or the query dtype
    if key_padding_mask is not None:
        mask = fold_key_padding(mask, key_padding_mask)
    if is_causal:
        future = future_keys(query.shape[-2], key.shape[-2], query.device)
        mask = mask & ~future if mask.dtype == torch.bool else mask.masked_fill(future, float("-inf"))
    attends = mask if mask.dtype == torch.bool else mask != float("-inf")
    alive = attends.any(dim=-1, keepdim=True)
    mask = mask | ~alive if mask.dtype == torch.bool else mask.masked_fill(~alive, 0.0)
    return (saturated_for_cuda_sdpa(mask) if mask.is_cuda else mask), alive


def saturated_for_cuda_sdpa(mask):
    """A float32 or bfloat16 mask with its finite values clipped to +-_CUDA_MASK_LIMIT, its
    infinities kept; other masks as they are."""
    if mask.dtype not in (torch.float32, torch.bfloat16):
        return mask
    return torch.where(mask.isinf(), mask, mask.clamp(-_CUDA_MASK_LIMIT, _CUDA_MASK_LIMIT))


def _batch_chunks(batch, heads, len_q, len_k):
    per_item = max(1, heads * len_q * len_k * 4)
    step = max(1, _CHUNK_BYTES // per_item)
    return [slice(start, min(start + step, batch)) for start in range(0, batch, step)]


def _rows(t, rows):
    """Slice the batch dim of a 4-D tensor that may broadcast over it (size 1); tensors of fewer
    dims broadcast over the batch (a causal (Lq, Lk) mask)."""
    return t if t is None or t.dim() < 4 or t.shape[0] == 1 else t[rows]


def _probabilities(q, k, mask, is_causal, scale):
    """softmax(scale * Q K^T + mask) in q's (float32 or wider) dtype; K already repeated for GQA."""
    # Scaling Q (Lq x D) rather than the scores (Lq x Lk) is the smaller pass, forward and backward.
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    elif is_causal:
        scores = scores.masked_fill(future_keys(*scores.shape[-2:], scores.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


def _compute_dtype(dtype):
    return torch.promote_types(dtype, torch.float32)


def _repeat_kv(t, group, dtype):
    t = t.to(dtype)
    return t.repeat_interleave(group, dim=1) if group > 1 else t


def _keep(seed, dropout_p, shape, device):
    return None if dropout_p == 0.0 else dropout_keep_mask(seed, shape, dropout_p, device)


def attention_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed,
                  *, out_like_query=True, native_dropout=False):
    """Returns (out, lse); this backend recomputes in the backward, so lse is empty. ``out`` comes
    in SDPA's layout whatever ``out_like_query`` asks (the library lays it out for its custom op).

    ``native_dropout``: a mask drawn now from PyTorch's generator (by SDPA, or on the CPU by
    ``torch_backend.dropout``) instead of the keep-mask regenerated from ``seed`` — for
    :func:`eager_attention_fwd`, where autograd keeps the mask.
    """
    batch, heads_q, len_q, _ = query.shape
    len_k, dim_v = key.shape[-2], value.shape[-1]
    no_lse = query.new_empty(0, dtype=torch.float32)
    if query.numel() == 0 or len_k == 0:  # nothing to attend to
        # Zeros that autograd connects to the inputs, so that they get (zero) gradients.
        connected = (query.sum() + key.sum() + value.sum()) * 0.0
        return query.new_zeros(batch, heads_q, len_q, dim_v) + connected, no_lse
    mask, alive = _folded_mask(query, key, attn_mask, key_padding_mask, is_causal)
    if native_dropout and dropout_p > 0.0 and uses_own_sampler(query):
        out = _eager_dropout_attention(query, key, value, mask, is_causal, scale, dropout_p)
    elif dropout_p == 0.0 or native_dropout:
        sdpa_causal = is_causal and mask is None
        if sdpa_causal and not scale > 0.0:
            # SDPA's own causal masking gives NaN rows for scale <= 0 (seen on the CPU, PyTorch 2.6
            # to 2.14): the masked scores end up times the scale. An explicit mask is exact.
            mask, sdpa_causal = ~future_keys(len_q, len_k, query.device), False
        out = _sdpa(query, key, value, mask, dropout_p, sdpa_causal, scale)
    else:
        out = _dropout_attention(query, key, value, mask, is_causal, scale,
                                 _keep(seed, dropout_p, (batch, heads_q, len_q, len_k), query.device),
                                 dropout_p)
    return (out if alive is None else out * alive), no_lse


# SDPA's CUDA kernels (flash, memory-efficient) put the batch on a grid axis that stops at 65535:
# a larger batch fails with "invalid configuration argument" (pytorch/pytorch#142228). Such a
# batch goes through SDPA in slices, which autograd joins for the backward.
SDPA_MAX_BATCH = 65535


def _sdpa(query, key, value, mask, dropout_p, is_causal, scale):
    """SDPA on (B, H, L, D) inputs and a 4-D mask (or None), in batch slices of at most
    ``SDPA_MAX_BATCH``."""
    def sdpa(q, k, v, m):
        # bool(): under torch.jit.trace sizes are traced tensors, which SDPA's flag refuses.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p, is_causal=is_causal,
                                              scale=scale, enable_gqa=bool(q.shape[1] != k.shape[1]))

    batch = query.shape[0]
    if forward_mode_ad():  # (torch.func.jvp, jacfwd): only SDPA's math kernel computes tangents
        with sdpa_kernel([SDPBackend.MATH]):
            return sdpa(query, key, value, mask)
    if batch <= SDPA_MAX_BATCH:
        return sdpa(query, key, value, mask)
    slices = [slice(start, start + SDPA_MAX_BATCH) for start in range(0, batch, SDPA_MAX_BATCH)]
    return torch.cat([sdpa(query[rows], key[rows], value[rows], _rows(mask, rows)) for rows in slices])


def eager_attention_fwd(*args):
    """The forward under PyTorch's autograd (eager mode): SDPA and its backward; with dropout, on
    the CPU, SDPA's math with a mask from ``torch_backend.dropout`` (faster than SDPA's own)."""
    return attention_fwd(*args, native_dropout=True)


def _eager_dropout_attention(query, key, value, mask, is_causal, scale, dropout_p):
    """SDPA's math with the dropout mask drawn by ``torch_backend.dropout.dropout``, under autograd.

    Not chunked: autograd keeps every probability for the backward anyway, as SDPA's math does.
    It also keeps the scaled keep-mask in float32 (SDPA's math keeps a bool one): as large as the
    probabilities, the price of the faster mask.
    """
    dtype = _compute_dtype(query.dtype)
    group = query.shape[1] // key.shape[1]
    if mask is not None and mask.dtype == torch.bool:
        # Additive: the backward of an add passes the gradient through, a masked_fill's costs a pass.
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    probs = _probabilities(query.to(dtype), _repeat_kv(key, group, dtype), mask, is_causal, scale)
    out = torch.matmul(dropout(probs, dropout_p), _repeat_kv(value, group, dtype))
    return out.to(query.dtype)


def _dropout_attention(query, key, value, mask, is_causal, scale, keep, dropout_p):
    dtype = _compute_dtype(query.dtype)
    group = query.shape[1] // key.shape[1]
    out = query.new_empty(*query.shape[:3], value.shape[-1])
    for rows in _batch_chunks(*query.shape[:3], key.shape[-2]):
        probs = _probabilities(query[rows].to(dtype), _repeat_kv(key[rows], group, dtype),
                               _rows(mask, rows), is_causal, scale)
        probs = probs * keep[rows] / (1.0 - dropout_p)
        out[rows] = torch.matmul(probs, _repeat_kv(value[rows], group, dtype)).to(out.dtype)
    return out


def attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p,
                  is_causal, scale, seed, mask_needs_grad):
    """Returns (grad_query, grad_key, grad_value, grad_attn_mask or None)."""
    batch, heads_q, len_q, _ = query.shape
    heads_k, len_k = key.shape[1], key.shape[2]
    group = heads_q // heads_k
    dtype = _compute_dtype(query.dtype)
    grad_mask = None
    if mask_needs_grad:  # accumulated over the chunks (and over the batch where it broadcasts)
        grad_mask = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
    if query.numel() == 0 or len_k == 0:
        return query.new_zeros(query.shape), key.new_zeros(key.shape), value.new_zeros(value.shape), \
            None if grad_mask is None else grad_mask.to(attn_mask.dtype)
    # Written chunk by chunk, every row once.
    grad_q = torch.empty(query.shape, dtype=dtype, device=query.device)
    grad_k = torch.empty(key.shape, dtype=dtype, device=key.device)
    grad_v = torch.empty(value.shape, dtype=dtype, device=value.device)
    mask, alive = _folded_mask(query, key, attn_mask, key_padding_mask, is_causal)
    keep = _keep(seed, dropout_p, (batch, heads_q, len_q, len_k), query.device)
    for rows in _batch_chunks(batch, heads_q, len_q, len_k):
        q = query[rows].to(dtype)
        k, v = _repeat_kv(key[rows], group, dtype), _repeat_kv(value[rows], group, dtype)
        d_out = grad_out[rows].to(dtype)
        if alive is not None:
            d_out = d_out * _rows(alive, rows)
        probs = _probabilities(q, k, _rows(mask, rows), is_causal, scale)
        d_probs = torch.matmul(d_out, v.transpose(-2, -1))
        if keep is None:
            dropped = probs
        else:
            dropped = probs * keep[rows] / (1.0 - dropout_p)
            d_probs = d_probs * keep[rows] / (1.0 - dropout_p)
        d_v = torch.matmul(dropped.transpose(-2, -1), d_out)
        d_scores = probs * (d_probs - (probs * d_probs).sum(dim=-1, keepdim=True))
        grad_q[rows] = torch.matmul(d_scores, k) * scale
        d_k = torch.matmul(d_scores.transpose(-2, -1), q) * scale
        grad_k[rows] = d_k.unflatten(1, (heads_k, group)).sum(dim=2)
        grad_v[rows] = d_v.unflatten(1, (heads_k, group)).sum(dim=2)
        if grad_mask is not None:
            _accumulate_broadcast(grad_mask, rows, d_scores)
    grad_mask = None if grad_mask is None else grad_mask.to(attn_mask.dtype)
    return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype), grad_mask


def _accumulate_broadcast(grad_mask, rows, d_scores):
    """grad_mask (a 4-D mask shape with size-1 broadcast dims) += d_scores summed to that shape."""
    dims = [d for d in range(1, 4) if grad_mask.shape[d] == 1 and d_scores.shape[d] != 1]
    summed = d_scores.sum(dim=dims, keepdim=True) if dims else d_scores
    if grad_mask.shape[0] == 1:
        grad_mask += summed.sum(dim=0, keepdim=True)
    else:
        grad_mask[rows] += summed
