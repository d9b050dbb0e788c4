"""Mask helpers shared by the backends."""

from __future__ import annotations

import torch


def fold_key_padding(attn_mask, key_padding_mask):
    """``attn_mask`` with ``key_padding_mask`` (B, Lk), True = padding, folded in.

    attn_mask: None, bool (True = may attend) or additive float, 4-D broadcastable to
    (B, Hq, Lq, Lk). Returns a bool mask (``& ~padding``) or a float one (-inf where padded).
    """
    padding = key_padding_mask[:, None, None, :]
    if attn_mask is None:
        return ~padding
    if attn_mask.dtype == torch.bool:
        return attn_mask & ~padding
    return attn_mask.masked_fill(padding, float("-inf"))


def future_keys(len_q: int, len_k: int, device) -> torch.Tensor:
    """True above the diagonal: the keys a top-left aligned causal query row may not see."""
    return torch.ones(len_q, len_k, dtype=torch.bool, device=device).triu(1)


def float_mask_in(mask, dtype):
    """An additive float ``mask`` in ``dtype`` (the query's), as every backend reads it.

    A mask of a wider dtype (a float32 mask meeting a bfloat16 query under autocast, as Hugging Face
    builds them with ``torch.finfo(float32).min``) saturates: finite values beyond ``dtype``'s
    range become its largest finite ones, so that they stay finite as SDPA keeps them, where a
    plain cast would make them infinite (a row of them would count as having no key, and +inf
    gives NaN). Infinities stay infinite. Works on the stored elements of a broadcast mask only.
    """
    if mask.dtype == dtype:
        return mask
    finfo = torch.finfo(dtype)
    if torch.finfo(mask.dtype).max > finfo.max:
        mask = torch.where(mask.isinf(), mask, mask.clamp(finfo.min, finfo.max))
    return mask.to(dtype)


def mask_grad_buffer(attn_mask, scores_shape, deterministic, dtype=None):
    """(zero-filled tensor, accumulate): where an attention backward kernel writes dS, the gradient
    of a float ``attn_mask`` (4-D, broadcastable to ``scores_shape`` = (B, Hq, Lq, Lk)).

    A mask of the full shape gets dS stored, in ``dtype`` (default: the mask's). A mask that
    broadcasts (a (1, Hq, Lq, Lk) learned position bias, a (B, 1, 1, Lk) key bias) gets dS added
    up in float32 with atomics (``accumulate``) into a tensor of its own shape, which the kernel
    reads with stride 0 on the broadcast dims (:func:`broadcast_strides`); under deterministic
    algorithms the full dS is stored in float32 instead, to be summed afterwards. Zero-filled: the
    tiles the kernels skip (causal, padding) have no gradient. :func:`mask_grad_from` turns the
    tensor into the mask's gradient.
    """
    scores_shape = tuple(scores_shape)
    if tuple(attn_mask.shape) == scores_shape:
        return torch.zeros(scores_shape, dtype=dtype or attn_mask.dtype, device=attn_mask.device), False
    if deterministic:
        return torch.zeros(scores_shape, dtype=torch.float32, device=attn_mask.device), False
    return torch.zeros(attn_mask.shape, dtype=torch.float32, device=attn_mask.device), True


def broadcast_strides(t, shape):
    """The strides of ``t`` viewed as broadcast to ``shape``: 0 on the dims it broadcasts."""
    return tuple(stride if size == full else 0 for size, full, stride in zip(t.shape, shape, t.stride()))


def mask_grad_from(buffer, attn_mask):
    """The gradient of ``attn_mask`` from :func:`mask_grad_buffer`'s tensor, once the kernel wrote
    it: summed over the dims where the mask broadcasts, in the mask's dtype and shape."""
    broadcast = [d for d in range(buffer.dim()) if attn_mask.shape[d] != buffer.shape[d]]
    grad = buffer.sum(broadcast, keepdim=True) if broadcast else buffer
    return grad.to(attn_mask.dtype)
