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
