"""float64 references, written from the definitions and independent of fastformer's code."""

from __future__ import annotations

import math

import torch


def attention(q, k, v, attn_mask=None, key_padding_mask=None, is_causal=False, scale=None, keep=None,
              dropout_p=0.0, compute_dtype=torch.float64):
    """softmax(scale Q K^T + masks) V in float64; rows with no key left give 0.

    keep: optional bool (B, Hq, Lq, Lk) dropout keep-mask, applied as keep / (1 - dropout_p).
    compute_dtype: another dtype computes the same formula in it, step by step as plain PyTorch
    would (the baseline of DESIGN.md's half-precision criterion).
    """
    probs, v = _attention_probs(q, k, v, attn_mask, key_padding_mask, is_causal, scale, compute_dtype)
    if keep is not None:
        probs = probs * keep / (1.0 - dropout_p)
    return torch.einsum("bhqk,bhkd->bhqd", probs, v)


def attention_scores_grad(q, k, v, out, grad_out, attn_mask=None, key_padding_mask=None, is_causal=False,
                          scale=None):
    """dS = P * (dO V^T - rowsum(dO * O)) in float64: the gradient of the scores, and so of an
    additive float mask, as flash-style kernels compute it from the output they stored. With the
    exact O it is autograd's gradient; with a kernel's own rounded O it is that kernel's algorithm
    computed exactly, so the kernel's error against it is its float32 arithmetic alone."""
    probs, v = _attention_probs(q, k, v, attn_mask, key_padding_mask, is_causal, scale)
    grad_out = grad_out.double()
    grad_probs = torch.einsum("bhqd,bhkd->bhqk", grad_out, v)
    delta = (grad_out * out.double()).sum(dim=-1, keepdim=True)
    return probs * (grad_probs - delta)


def _attention_probs(q, k, v, attn_mask, key_padding_mask, is_causal, scale, compute_dtype=torch.float64):
    """(P, V with its heads repeated for GQA) in ``compute_dtype``; P's rows with no key left are 0."""
    q, k, v = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
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
            scores = scores + attn_mask.to(compute_dtype)
            allowed = allowed & (attn_mask != float("-inf"))
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    if is_causal:
        allowed = allowed & torch.ones(len_q, len_k, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    alive = allowed.any(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~alive, 0.0), dim=-1) * alive, v


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


def philox_uniforms16(seed: int, shape):
    """The 16-bit uniforms of the documented dropout keep-mask (fastformer/triton/dropout.py), from
    Philox-4x32-10 itself (Salmon et al., SC'11; the constants of Triton's tl.randint4x), as a
    NumPy uint64 array of ``shape``: the tensor viewed as rows of its last dim L, element (r, c)
    takes 16-bit half c % 2 (0: low) of word (c % 8) // 2 of Philox(key = seed, counter = (g, 0)),
    g = r * ceil(L / 8) + c // 8."""
    import numpy as np

    shape = tuple(shape)
    length = shape[-1] if shape else 1
    rows = math.prod(shape) // length if length else 0
    groups_per_row = (length + 7) // 8
    r, c = np.meshgrid(np.arange(rows, dtype=np.uint64), np.arange(length, dtype=np.uint64), indexing="ij")
    counter = r * np.uint64(groups_per_row) + c // np.uint64(8)
    low = np.uint64(0xFFFFFFFF)
    c0, c1 = counter & low, counter >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    for _ in range(10):
        product_a, product_b = np.uint64(0xD2511F53) * c0, np.uint64(0xCD9E8D57) * c2  # 32 x 32 -> 64 bits
        c0, c1, c2, c3 = ((product_b >> np.uint64(32)) ^ c1 ^ k0, product_b & low,
                          (product_a >> np.uint64(32)) ^ c3 ^ k1, product_a & low)
        k0, k1 = (k0 + np.uint64(0x9E3779B9)) & low, (k1 + np.uint64(0xBB67AE85)) & low
    words = np.stack([c0, c1, c2, c3])
    word = np.take_along_axis(words, (c % np.uint64(8) // np.uint64(2)).astype(np.int64)[None], axis=0)[0]
    return ((word >> (np.uint64(16) * (c % np.uint64(2)))) & np.uint64(0xFFFF)).reshape(shape)


def philox_keep_mask(seed: int, shape, dropout_p: float) -> torch.Tensor:
    """The documented dropout keep-mask: element kept when its 16-bit uniform
    (:func:`philox_uniforms16`) is >= round(p * 2^16), rounded in float32."""
    import numpy as np

    threshold = int(np.float32(dropout_p) * np.float32(65536.0) + np.float32(0.5))
    return torch.from_numpy(philox_uniforms16(seed, shape) >= np.uint64(threshold))


def rounding_probes(seed: int, shape) -> tuple[float, float]:
    """Two dropout probabilities, (u + 3/4) 2^-16 and (u + 1/4) 2^-16 with u element 0's 16-bit
    uniform (exact in float32): p rounded to the nearest multiple of 2^-16 drops element 0 with the
    first and keeps it with the second; truncated, it would keep it with both, rounded up drop it
    with both."""
    u = int(philox_uniforms16(seed, shape).reshape(-1)[0])
    return (u + 0.75) / 65536, (u + 0.25) / 65536
