"""FastMultiheadAttention: ``torch.nn.MultiheadAttention`` with its attention computed by the fused op.

Chain: ``_attention_fwd_kernel`` -> ``attention_fwd`` -> ``AttentionFunction`` ->
``fastformer.attention`` -> ``FastMultiheadAttention`` (this file).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastformer import functional as _functional
from fastformer.masks import future_keys

__all__ = ["FastMultiheadAttention"]


class FastMultiheadAttention(nn.MultiheadAttention):
    r"""Drop-in replacement for :class:`torch.nn.MultiheadAttention`, attention by :func:`fastformer.attention`.

    Same constructor, ``forward`` signature, return value, parameters, initialisation and
    ``state_dict`` keys as ``torch.nn.MultiheadAttention`` (it subclasses it and overrides only
    ``forward``), so a checkpoint loads both ways with ``strict=True``::

        mha = fastformer.nn.FastMultiheadAttention(embed_dim, num_heads, dropout=0.1, batch_first=True)
        mha.load_state_dict(torch_mha.state_dict())          # and torch_mha.load_state_dict(mha.state_dict())
        out, _ = mha(x, x, x, key_padding_mask=pad, need_weights=False)   # the fast path

    What happens in ``forward``:

    * Self-attention (``query is key is value`` and ``kdim == vdim == embed_dim``) runs one packed
      QKV GEMM with ``in_proj_weight``; q, k and v are strided views of the result, handed to the
      fused op without copies. ``key is value`` runs one GEMM for k and v; otherwise three.
    * The output always comes from the fused :func:`fastformer.attention`, which never forms the
      L x S matrix. Masks are passed in its conventions (bool ``attn_mask`` inverted, bool
      ``key_padding_mask`` passed as is, float ``key_padding_mask`` folded into an additive
      (B, 1, 1, S) mask, 3-D (B*num_heads, L, S) masks viewed as (B, num_heads, L, S)).
    * ``is_causal=True`` (which, as in PyTorch, requires ``attn_mask`` as well) is trusted as a hint:
      the mask is not read and the fused op applies a top-left aligned causal mask, exactly what
      PyTorch does on its SDPA path. With ``add_bias_kv`` / ``add_zero_attn`` (which append keys)
      the given ``attn_mask`` is used instead, as PyTorch does when it needs the weights.
    * Dropout on the attention weights: ``dropout`` in training mode only, as PyTorch.
    * Nested-tensor (ragged batch) inputs run PyTorch's own forward, which takes them on its
      inference fast path (``FastTransformerEncoderLayer`` pads them for the fused op instead).

    Differences from ``torch.nn.MultiheadAttention`` (intended):

    * A query row with no key left to attend to (everything masked) gets an attention output of 0
      (so the module returns ``out_proj.bias`` there), weights of 0 and zero gradients. PyTorch
      gives NaN there with ``need_weights=True`` (and 0 or NaN on its SDPA path, depending on the
      kernel), NaN that then spreads to the gradients.
    * ``need_weights=True`` (PyTorch's default!) still returns the weights, but they are computed
      in a second pass: softmax of the scaled scores with the same masks, materialising a
      (B, num_heads, L, S) tensor (B*num_heads*L*S elements, plus its autograd graph when
      gradients are on), then averaged over heads if ``average_attn_weights``. This costs about
      as much memory and time as PyTorch's unfused attention. Pass ``need_weights=False`` for the
      fast, fused path (weights ``None``).
    * In training mode with ``dropout > 0`` the returned weights are the probabilities before
      dropout (the fused op's dropout mask is internal); PyTorch returns them after dropout.
      The output is dropped out as usual.
    """

    # Backend forced for this module's attention (set by fastformer.optimize(backend=...));
    # None: the automatic choice.
    fastformer_backend: str | None = None

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None,
                average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """As ``torch.nn.MultiheadAttention.forward``; returns ``(attn_output, attn_weights or None)``."""
        if query.is_nested or key.is_nested or value.is_nested:
            # Ragged batches: PyTorch's own implementation, which takes them on its inference fast
            # path (and says why not elsewhere).
            return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                                   need_weights=need_weights, attn_mask=attn_mask,
                                   average_attn_weights=average_attn_weights, is_causal=is_causal)
        self_attention = query is key and key is value
        kv_shared = key is value
        batched = self._check_shapes(query, key, value, key_padding_mask, attn_mask)
        if batched:
            batch_first = self.batch_first
        else:  # unbatched (L, E): a batch of one, batch-first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            batch_first = True
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if batch_first:
            batch, len_q, _ = query.shape
            len_k = key.shape[1]
        else:
            len_q, batch, _ = query.shape
            len_k = key.shape[0]
        self._check_batch(query, key, value, batch, batch_first)
        key_padding_mask, attn_mask = self._check_masks(key_padding_mask, attn_mask, is_causal, batch,
                                                        len_q, len_k, batched, query.dtype)

        q, k, v = self._project(query, key, value, self_attention, kv_shared)
        q, k, v = (_heads(t, self.num_heads, batch_first) for t in (q, k, v))
        heads, head_dim = self.num_heads, self.head_dim

        # Fused-op masks: attn_mask bool (True = may attend) or additive float, (1|B, 1|H, L, S);
        # pad: bool (B, S), True = padding.
        extended = self.bias_k is not None or self.add_zero_attn
        causal = is_causal and not extended
        mask = None
        if attn_mask is not None and not causal:
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask
            mask = mask[None, None] if mask.dim() == 2 else mask.view(batch, heads, len_q, len_k)
        pad = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                pad = key_padding_mask
            else:  # additive float: fold into the attention mask
                folded = key_padding_mask[:, None, None, :]
                if mask is None:
                    mask = folded
                elif mask.dtype == torch.bool:
                    mask = torch.zeros(mask.shape, dtype=folded.dtype, device=mask.device) \
                        .masked_fill(~mask, float("-inf")) + folded
                else:
                    mask = mask + folded
        if self.bias_k is not None:  # one more key and value, visible to every query
            k = torch.cat([k, self.bias_k.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
            v = torch.cat([v, self.bias_v.view(1, heads, 1, head_dim).expand(batch, -1, -1, -1)], dim=2)
            mask, pad = _extend_masks(mask, pad)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, heads, 1, head_dim)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, heads, 1, head_dim)], dim=2)
            mask, pad = _extend_masks(mask, pad)

        dropout_p = self.dropout if self.training else 0.0
        out = _functional.attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                                    key_padding_mask=pad, backend=self.fastformer_backend)
        out = _merge_heads(out, batch_first)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)

        weights = None
        if need_weights:
            weights = _attention_weights(q, k, mask, pad, causal)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    # ------------------------------------------------------------------------------------------
    def _project(self, query, key, value, self_attention, kv_shared):
        """The input projections, (..., E) each; views of one GEMM's result when inputs are shared.

        Split with unbind / split, whose backward assembles the packed gradient in one op (a stack
        or cat), never with select or slicing: each of those has a backward that zero-fills a
        gradient of the whole packed tensor and copies its part in, summed afterwards."""
        embed_dim = self.embed_dim
        bias = self.in_proj_bias
        if self._qkv_same_embed_dim:
            weight = self.in_proj_weight
            if self_attention:
                return F.linear(query, weight, bias).unflatten(-1, (3, embed_dim)).unbind(-2)
            if kv_shared:
                sizes = [embed_dim, 2 * embed_dim]
                w_q, w_kv = weight.split(sizes)
                b_q, b_kv = (None, None) if bias is None else bias.split(sizes)
                q = F.linear(query, w_q, b_q)
                k, v = F.linear(key, w_kv, b_kv).unflatten(-1, (2, embed_dim)).unbind(-2)
                return q, k, v
            weights = weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = (None, None, None) if bias is None else bias.chunk(3)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _check_shapes(self, query, key, value, key_padding_mask, attn_mask):
        """PyTorch's checks (same exception types), messages naming the argument. Returns batched."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"FastMultiheadAttention: {name} must be a Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise AssertionError(f"FastMultiheadAttention: query should be unbatched 2-D (L, E) or batched "
                                 f"3-D, but received a {query.dim()}-D query of shape {tuple(query.shape)}")
        batched = query.dim() == 3
        kind = "batched (3-D)" if batched else "unbatched (2-D)"
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise AssertionError(f"FastMultiheadAttention: for {kind} query, expected key and value to be "
                                 f"{query.dim()}-D but found {key.dim()}-D key and {value.dim()}-D value")
        if key_padding_mask is not None and key_padding_mask.dim() != query.dim() - 1:
            raise AssertionError(f"FastMultiheadAttention: for {kind} query, expected key_padding_mask to be "
                                 f"None or {query.dim() - 1}-D, but found a {key_padding_mask.dim()}-D tensor")
        if attn_mask is not None and attn_mask.dim() not in (2, 3):
            raise AssertionError(f"FastMultiheadAttention: for {kind} query, expected attn_mask to be None, "
                                 f"2-D or 3-D, but found a {attn_mask.dim()}-D tensor")
        if not batched and attn_mask is not None and attn_mask.dim() == 3:
            expected = (self.num_heads, query.shape[0], key.shape[0])
            if tuple(attn_mask.shape) != expected:
                raise AssertionError(f"FastMultiheadAttention: expected 3-D attn_mask of shape "
                                     f"(num_heads, L, S) = {expected}, got {tuple(attn_mask.shape)}")
        if query.shape[-1] != self.embed_dim:
            raise AssertionError(f"FastMultiheadAttention: query's last dim must be embed_dim="
                                 f"{self.embed_dim}, got query of shape {tuple(query.shape)}")
        if self._qkv_same_embed_dim:
            if key.shape != value.shape:
                raise AssertionError(f"FastMultiheadAttention: key shape {tuple(key.shape)} does not match "
                                     f"value shape {tuple(value.shape)}")
        elif key.shape[:-1] != value.shape[:-1]:
            raise AssertionError(f"FastMultiheadAttention: key's sequence and batch dims "
                                 f"{tuple(key.shape[:-1])} do not match value's {tuple(value.shape[:-1])}")
        # PyTorch: AssertionError with separate projection weights, RuntimeError from F.linear otherwise
        cls = RuntimeError if self._qkv_same_embed_dim else AssertionError
        if key.shape[-1] != self.kdim:
            raise cls(f"FastMultiheadAttention: key's last dim must be kdim={self.kdim}, "
                               f"got key of shape {tuple(key.shape)}")
        if value.shape[-1] != self.vdim:
            raise cls(f"FastMultiheadAttention: value's last dim must be vdim={self.vdim}, "
                               f"got value of shape {tuple(value.shape)}")
        return batched

    @staticmethod
    def _check_batch(query, key, value, batch, batch_first):
        dim = 0 if batch_first else 1
        if key.shape[dim] != batch:  # PyTorch fails in a view here (RuntimeError)
            raise RuntimeError(f"FastMultiheadAttention: key and value must have the batch size of query "
                               f"({batch}), got query {tuple(query.shape)}, key {tuple(key.shape)}, "
                               f"value {tuple(value.shape)} (batch_first={batch_first})")

    def _check_masks(self, key_padding_mask, attn_mask, is_causal, batch, len_q, len_k, batched, dtype):
        for name, mask in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
            if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
                raise AssertionError(f"FastMultiheadAttention: only bool and floating types of {name} are "
                                     f"supported, got {mask.dtype}")
        # In eager mode only: under torch.compile a warning call breaks the graph, at every layer.
        if (key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype
                and not torch.compiler.is_compiling()):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=3)
        if is_causal and attn_mask is None:
            raise RuntimeError("FastMultiheadAttention: need attn_mask if specifying the is_causal hint "
                               "(as torch.nn.MultiheadAttention). You may use "
                               "nn.Transformer.generate_square_subsequent_mask to create it.")
        if attn_mask is not None:
            expected = (len_q, len_k) if attn_mask.dim() == 2 else (batch * self.num_heads, len_q, len_k)
            if tuple(attn_mask.shape) != expected:
                cls = RuntimeError if batched else AssertionError
                shape = "(L, S)" if attn_mask.dim() == 2 else "(batch * num_heads, L, S)"
                raise cls(f"FastMultiheadAttention: the shape of the {attn_mask.dim()}-D attn_mask is "
                          f"{tuple(attn_mask.shape)}, but should be {shape} = {expected}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, len_k):
            raise AssertionError(f"FastMultiheadAttention: expected key_padding_mask of shape (batch, S) = "
                                 f"{(batch, len_k)}, got {tuple(key_padding_mask.shape)}")
        if key_padding_mask is not None and key_padding_mask.is_floating_point():
            key_padding_mask = key_padding_mask.to(dtype)
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
        return key_padding_mask, attn_mask


def _heads(t, num_heads, batch_first):
    """(B, L, E) or (L, B, E) -> a (B, H, L, D) view (no copy)."""
    t = t.unflatten(-1, (num_heads, -1))
    return t.transpose(1, 2) if batch_first else t.permute(1, 2, 0, 3)


def _merge_heads(out, batch_first):
    """(B, H, L, D) -> (B, L, H*D) or (L, B, H*D)."""
    out = out.transpose(1, 2) if batch_first else out.permute(2, 0, 1, 3)
    return out.flatten(-2)


def _extend_masks(mask, pad):
    """Masks for one more key at the end, visible to every query (as PyTorch pads its masks)."""
    if mask is not None:
        extra = torch.ones if mask.dtype == torch.bool else torch.zeros
        mask = torch.cat([mask, extra(*mask.shape[:-1], 1, dtype=mask.dtype, device=mask.device)], dim=-1)
    if pad is not None:
        pad = torch.cat([pad, pad.new_zeros(pad.shape[0], 1)], dim=-1)
    return mask, pad


def _attention_weights(q, k, mask, pad, is_causal):
    """softmax(Q K^T / sqrt(D) + masks), (B, H, L, S); rows with no key left are 0 (and get 0 gradients)."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if pad is not None:
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    if is_causal:
        scores = scores.masked_fill(future_keys(*scores.shape[-2:], scores.device), float("-inf"))
    alive = (scores != float("-inf")).any(dim=-1, keepdim=True)
    return torch.softmax(scores.masked_fill(~alive, 0.0), dim=-1) * alive
