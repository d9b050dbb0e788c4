"""A backend whose "kernels" allocate their outputs and compute nothing, for measuring what
fastformer itself costs per call (checks, dispatch, autograd) apart from any kernel. It follows
the interface of every backend module (``fastformer/triton/attention.py`` and friends)."""

import torch

from fastformer.library import attention_output_like


def attention_fwd(query, key, value, attn_mask, key_padding_mask, dropout_p, is_causal, scale, seed, *,
                  out_like_query=True):
    out = attention_output_like(query, value.shape[-1], out_like_query)
    return out, query.new_empty(query.shape[:3], dtype=torch.float32)


def attention_bwd(grad_out, query, key, value, out, lse, attn_mask, key_padding_mask, dropout_p,
                  is_causal, scale, seed, mask_needs_grad):
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), None


def residual_norm_fwd(x, residual, weight, bias, eps, dropout_p, rms, seed, store_residual):
    stats = x.new_empty(x.shape[0], dtype=torch.float32)
    residual_out = torch.empty_like(x) if store_residual else x.new_empty(0)
    return torch.empty_like(x), residual_out, stats, torch.empty_like(stats)


def residual_norm_bwd(grad_out, grad_residual_out, normed, weight, bias, mean, rstd, dropout_p, rms,
                      seed, has_residual, *, x_dtype=None):
    def like(t):
        return None if t is None else torch.empty_like(t)
    return torch.empty_like(normed), like(normed if has_residual else None), like(weight), like(bias)


def bias_gelu_fwd(x, bias, approximate, dropout_p, seed):
    return torch.empty_like(x)


def bias_gelu_bwd(grad_out, x, bias, approximate, dropout_p, seed):
    return torch.empty_like(x), None if bias is None else torch.empty_like(bias)
