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
