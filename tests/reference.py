"""float64 references, written from the definitions and independent of fastformer's code."""

from __future__ import annotations

import math

import torch


def attention(q, k, v, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None, keep=None,
              dropout_p=0.0):
    """softmax(scale Q K^T + masks) V in float64; rows with no key left give 0.

    keep: optional bool (B, Hq, Lq, Lk) dropout keep-mask, applied as keep / (1 - dropout_p).
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, heads_q, len_q, dim = q.shape
    group = heads_q // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    len_k = k.shape[2]
    allowed = torch.ones(batch, heads_q, len_q, len_k, dtype=torch.bool, device=q.device)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            scores = scores + attn_mask.double()
            allowed = allowed & (attn_mask != float("-inf"))
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(len_q, len_k, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    alive = allowed.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~alive, 0.0), dim=-1) * alive
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def residual_norm(x, residual, weight, bias, eps, rms=False, keep=None, dropout_p=0.0):
    """(out, residual_out) in float64: r = dropout(x) + residual, out = norm(r) * weight + bias."""
    r = x.double()
    if keep is not None:
        r = r * keep / (1.0 - dropout_p)
    if residual is not None:
        r = r + residual.double()
    if rms:
        y = r / torch.sqrt((r * r).mean(dim=-1, keepdim=True) + eps)
    else:
        centred = r - r.mean(dim=-1, keepdim=True)
        y = centred / torch.sqrt((centred * centred).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.double()
    if bias is not None:
        y = y + bias.double()
    return y, r


def gelu(x, bias=None, approximate="none"):
    h = x.double() if bias is None else x.double() + bias.double()
    if approximate == "tanh":
        return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))
    return 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
