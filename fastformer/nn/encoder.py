"""``FastTransformerEncoderLayer``: a drop-in for ``torch.nn.TransformerEncoderLayer`` on fastformer ops.

Same constructor, parameters, ``state_dict`` keys and ``forward`` as PyTorch's layer (it *is* a
subclass of it); only ``forward`` is replaced, by one built from the fused ops:

* self-attention: ``fastformer.attention`` (through ``self.self_attn``),
* dropout + residual add + LayerNorm: ``fastformer.residual_layer_norm``,
* bias + GELU (when the activation is GELU): ``fastformer.bias_gelu``.

``FastTransformerEncoder``: ``torch.nn.TransformerEncoder`` passing its masks to the layers as
given (a boolean padding mask stays a key-padding mask, whose padded key tiles the kernels skip).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import transformer as _transformer

import fastformer
from fastformer.functional import keeps_bias_in_gemm
from fastformer.nn.multihead_attention import FastMultiheadAttention
from fastformer.torch_backend.dropout import dropout, dropout_add

__all__ = ["FastTransformerEncoder", "FastTransformerEncoderLayer"]


def is_plain(module, cls: type) -> bool:
    """Whether ``module`` is exactly a ``cls`` without hooks, so that a fused forward may use its
    parameters instead of calling it. A subclass, a wrapper put in its place (a LoRA adapter), or
    a hook would be silently skipped otherwise: those modules are called as they are."""
    return type(module) is cls and not has_hooks(module)


def has_hooks(module) -> bool:
    """Whether a forward or backward hook is registered on ``module`` (a function: never)."""
    return isinstance(module, nn.Module) and bool(module._forward_hooks or module._forward_pre_hooks
                                                  or module._backward_hooks or module._backward_pre_hooks)


def gelu_approximate(activation) -> str | None:
    """"none"/"tanh" when ``activation`` is a GELU that ``bias_gelu`` computes exactly, else None."""
    if activation is F.gelu:
        return "none"
    if is_plain(activation, nn.GELU):
        return activation.approximate
    return None


class FastTransformerEncoderLayer(nn.TransformerEncoderLayer):
    r"""``torch.nn.TransformerEncoderLayer`` computed with fastformer's fused ops.

    Constructor, parameters, ``state_dict`` keys and ``forward(src, src_mask=None,
    src_key_padding_mask=None, is_causal=False)`` are PyTorch's, so checkpoints load both ways
    (``strict=True``) and the layer can be put wherever PyTorch's is used, including
    ``nn.TransformerEncoder``. With dropout off (``eval()`` or ``dropout=0``) outputs and gradients
    equal PyTorch's up to rounding.

    Dataflow (``sa`` = self-attention incl. output projection, ``ff`` = linear2(dropout(act(linear1
    x))), ``rln(x, r, norm, p)`` = ``fastformer.residual_layer_norm(x, r, norm.weight, norm.bias,
    norm.eps, p)`` returning ``(layer_norm(dropout_p(x) + r), dropout_p(x) + r)``)::

        post-norm (norm_first=False), PyTorch: x1 = norm1(x + dropout1(sa(x)))
                                               y  = norm2(x1 + dropout2(ff(x1)))
            x1, _ = rln(sa(x),  x,  norm1, p)        # one fused call each
            y,  _ = rln(ff(x1), x1, norm2, p)

        pre-norm (norm_first=True), PyTorch:   x1 = x + dropout1(sa(norm1(x)))
                                               y  = x1 + dropout2(ff(norm2(x1)))
            h1, _  = rln(x, None, norm1, 0)          # plain LayerNorm of the input
            h2, x1 = rln(sa(h1), x, norm2, p)        # ONE call: the new residual stream x1 AND
                                                     # its normalisation norm2(x1), the FFN input
            y = x1 + dropout2(ff(h2))                # no norm follows inside the layer: plain add

    Dropout (attention weights, after the activation, dropout1/dropout2) is applied with the
    probabilities of ``self.self_attn.dropout``, ``self.dropout``, ``self.dropout1`` and
    ``self.dropout2``, each where its own module is in training mode, as PyTorch's forward does
    (so Monte Carlo dropout, ``eval()`` then ``train()`` on the dropout modules, keeps working;
    PyTorch's inference fast path, taken without gradients, skips the dropout modules). On the
    CPU in float32/float64 the masks are drawn by ``fastformer.torch_backend.dropout`` (32 random
    bits per element, twice as fast as ``bernoulli_``), so they differ from PyTorch's draws for
    the same seed.

    FFN activation: GELU (``"gelu"``, ``F.gelu``, or an ``nn.GELU`` module, exact or tanh) runs
    ``linear1`` without its bias and fuses the bias into ``fastformer.bias_gelu`` (where bias_gelu
    runs on the torch backend, e.g. on the CPU, the bias stays in ``linear1``'s GEMM instead: there
    the fusion would only add a pass); ReLU or any other callable keeps PyTorch's path
    (``F.linear`` with bias, then the activation).

    Submodules are read, not called, by the fused ops; so a part that is no longer PyTorch's own
    plain module (a LoRA adapter put in place of ``linear1``, an ``nn.GELU`` subclass, another norm)
    or that carries a hook is called as it is: ``linear1`` and the activation unfused, and for
    the norms and dropouts PyTorch's forward of the whole layer.

    Masks, PyTorch's conventions: ``src_mask`` (S, S) or (N * nhead, S, S), bool (True = may NOT
    attend) or additive float; ``src_key_padding_mask`` (N, S) (or (S,) for unbatched input), bool
    (True = padding) or additive float. ``is_causal=True`` is a hint that ``src_mask`` is the causal
    mask (a mask must be given, as in PyTorch); the hint is trusted and the causal kernel path used.
    Input (S, N, E), (N, S, E) with ``batch_first=True``, or unbatched (S, E).

    An ``nn.GELU(approximate="tanh")`` activation is the tanh GELU in every mode. PyTorch's layer
    computes it as the exact erf GELU in inference (eval, no gradients), where it takes its native
    fast path, so the two layers differ there (by up to 5e-4 in an activation value).

    Fully masked query rows (e.g. a sequence whose keys are all padding): PyTorch's layer returns
    NaN there; this layer returns finite values: the attention output of such a row is 0 (so the
    row becomes ``norm1(x + out_proj.bias)`` and so on) and its gradients are finite.

    Nested-tensor input (what ``nn.TransformerEncoder`` with ``enable_nested_tensor=True`` feeds its
    layers in inference with a padding mask) is padded, run with the matching key-padding mask, and
    returned as a nested tensor, so ``nn.TransformerEncoder(FastTransformerEncoderLayer(...), n)``
    works with its defaults.
    """

    # Backend forced for this layer's ops (set by fastformer.optimize(backend=...)); None: automatic.
    fastformer_backend: str | None = None

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout,
                         activation=activation, layer_norm_eps=layer_norm_eps,
                         batch_first=batch_first, norm_first=norm_first, bias=bias, device=device,
                         dtype=dtype)
        # The same parameters (the very tensors PyTorch's constructor just initialised, so a given
        # seed gives PyTorch's initialisation), held by a FastMultiheadAttention: built on the meta
        # device (no memory, no random numbers drawn) and given the parameters by assignment.
        fast_attn = FastMultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                           batch_first=batch_first, device="meta", dtype=dtype)
        fast_attn.load_state_dict(self.self_attn.state_dict(), strict=True, assign=True)
        fast_attn.train(self.self_attn.training)
        self.self_attn = fast_attn

    # ------------------------------------------------------------------------------------------
    def forward(self, src: Tensor, src_mask: Tensor | None = None,
                src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        """See :class:`torch.nn.TransformerEncoderLayer` (same arguments, shapes and masks)."""
        if src.is_nested:
            return self._forward_nested(src, src_mask, src_key_padding_mask, is_causal)
        if src.dim() not in (2, 3):
            raise AssertionError(f"src should be 2-D (unbatched) or 3-D (batched), got {src.dim()}-D")
        if not self._fusable():
            return super().forward(src, src_mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                                   is_causal=is_causal)
        return self._forward_dense(src, src_mask, src_key_padding_mask, is_causal)

    def _fusable(self) -> bool:
        """Whether the norms and dropouts that the fused ops replace are PyTorch's own, without
        hooks; else (a module swapped in after construction, a hook) PyTorch's forward runs, which
        calls every submodule (the attention still through ``self.self_attn``)."""
        modules = self._modules  # (faster than nn.Module.__getattr__: this runs every call)
        return (is_plain(modules["norm1"], nn.LayerNorm) and is_plain(modules["norm2"], nn.LayerNorm)
                and is_plain(modules["dropout1"], nn.Dropout) and is_plain(modules["dropout2"], nn.Dropout)
                and is_plain(modules["dropout"], nn.Dropout))

    def _forward_dense(self, x: Tensor, src_mask, padding, is_causal) -> Tensor:
        """x: (S, N, E), (N, S, E) or (S, E); the per-token ops do not care which."""
        # Each dropout follows its own module's mode, as when PyTorch's forward calls the modules
        # (a layer in eval() with its nn.Dropout modules in train(): Monte Carlo dropout).
        p1 = self.dropout1.p if self.dropout1.training else 0.0
        p2 = self.dropout2.p if self.dropout2.training else 0.0
        if self.norm_first:
            h1, _ = fastformer.residual_layer_norm(x, None, self.norm1.weight, self.norm1.bias,
                                                   self.norm1.eps, backend=self.fastformer_backend)
            h2, x1 = fastformer.residual_layer_norm(self._sa(h1, src_mask, padding, is_causal), x,
                                                    self.norm2.weight, self.norm2.bias,
                                                    self.norm2.eps, p1, backend=self.fastformer_backend)
            return dropout_add(self._ff(h2), x1, p2, self.dropout2.training)
        x1, _ = fastformer.residual_layer_norm(self._sa(x, src_mask, padding, is_causal), x,
                                               self.norm1.weight, self.norm1.bias, self.norm1.eps, p1,
                                               backend=self.fastformer_backend)
        y, _ = fastformer.residual_layer_norm(self._ff(x1), x1, self.norm2.weight, self.norm2.bias,
                                              self.norm2.eps, p2, backend=self.fastformer_backend)
        return y

    # ------------------------------------------------------------------------------------------
    def _ff(self, x: Tensor) -> Tensor:
        """linear2(dropout(activation(linear1(x)))), without dropout2 (fused by the caller); with a
        GELU, the bias of linear1, the GELU and the dropout are one op."""
        approximate = gelu_approximate(self.activation)
        if approximate is not None:
            p = self.dropout.p if self.dropout.training else 0.0
            h = linear_bias_gelu(x, self.linear1, approximate, dropout_p=p, backend=self.fastformer_backend)
        else:
            h = dropout(self.activation(self.linear1(x)), self.dropout.p, self.dropout.training)
        return self.linear2(h)

    def _sa(self, x: Tensor, attn_mask, key_padding_mask, is_causal) -> Tensor:
        """Self-attention incl. the output projection, without dropout1 (fused by the caller).

        ``self.self_attn`` is a :class:`FastMultiheadAttention`: one packed QKV GEMM, then
        ``fastformer.attention`` on strided views, with PyTorch's mask conventions translated (and
        the attention-weight dropout in training mode).
        """
        return self.self_attn(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask,
                              need_weights=False, is_causal=is_causal)[0]

    # ------------------------------------------------------------------------------------------
    def _forward_nested(self, src: Tensor, src_mask, src_key_padding_mask, is_causal) -> Tensor:
        """Nested (N, *, E) input: pad, mask the padding, run, and return a nested tensor again."""
        if src_mask is not None or src_key_padding_mask is not None:
            raise AssertionError("masks are not supported with NestedTensor input")
        if not self.self_attn.batch_first:
            raise AssertionError("NestedTensor input needs batch_first=True")
        lengths = [t.shape[0] for t in src.unbind()]
        padded = src.to_padded_tensor(0.0)
        positions = torch.arange(padded.shape[1], device=padded.device)
        padding = positions[None, :] >= torch.tensor(lengths, device=padded.device)[:, None]
        out = self._forward_dense(padded, None, padding, is_causal)
        return torch.nested.as_nested_tensor([out[i, :n] for i, n in enumerate(lengths)],
                                             layout=src.layout)


def linear_bias_gelu(x: Tensor, linear: nn.Linear, approximate: str, dropout_p: float = 0.0,
                     backend: str | None = None) -> Tensor:
    """``dropout(gelu(linear(x)), dropout_p)``, the bias where it is cheapest: a GEMM without it,
    then ``fastformer.bias_gelu`` with it (and the dropout); except where that bias_gelu call would
    run PyTorch's own GELU (the torch backend, e.g. on the CPU): there fusing the bias saves nothing
    and costs a pass, so the GEMM keeps it (one addmm), as in PyTorch's layer. A ``linear`` that is
    not a plain ``nn.Linear`` (a LoRA wrapper, a hook) is called as it is. Also used by
    ``fastformer.optimize``."""
    if not is_plain(linear, nn.Linear) or linear.bias is None or keeps_bias_in_gemm(
            x, linear.out_features, approximate, backend, has_dropout=dropout_p > 0.0):
        return fastformer.bias_gelu(linear(x), None, approximate, dropout_p=dropout_p, backend=backend)
    return fastformer.bias_gelu(F.linear(x, linear.weight), linear.bias, approximate, dropout_p=dropout_p,
                                backend=backend)


class FastTransformerEncoder(nn.TransformerEncoder):
    """:class:`torch.nn.TransformerEncoder` that hands its layers the masks as given.

    PyTorch's encoder turns a boolean ``src_key_padding_mask`` into an additive float one before
    its layers see it; fastformer's layers then could not tell padding from a general additive
    mask, and the attention kernels could not skip padded key tiles. This subclass (what
    :func:`fastformer.optimize` turns an ``nn.TransformerEncoder`` of fast layers into) passes both
    masks through unchanged; the layers accept PyTorch's bool and float conventions alike, so the
    results are the same. Where PyTorch's encoder may take its nested-tensor inference path (eval,
    no gradients, a padding mask and no ``mask``), it runs PyTorch's own forward, which the fast
    layers also take. Same constructor, parameters and ``state_dict`` keys as PyTorch's.
    """

    def forward(self, src: Tensor, mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool | None = None) -> Tensor:
        first_layer = self.layers[0]
        if not all(isinstance(layer, FastTransformerEncoderLayer) for layer in self.layers) or \
                self._may_take_nested_path(first_layer, mask, src_key_padding_mask):
            return super().forward(src, mask=mask, src_key_padding_mask=src_key_padding_mask,
                                   is_causal=is_causal)
        batch_first = first_layer.self_attn.batch_first
        seq_len = src.shape[1 if batch_first and src.dim() == 3 else 0]
        is_causal = _transformer._detect_is_causal_mask(mask, is_causal, seq_len)
        output = src
        for layer in self.layers:
            output = layer(output, src_mask=mask, is_causal=is_causal,
                           src_key_padding_mask=src_key_padding_mask)
        return output if self.norm is None else self.norm(output)

    def _may_take_nested_path(self, first_layer, mask, src_key_padding_mask) -> bool:
        """A superset of the conditions of PyTorch's nested-tensor inference path."""
        if first_layer.training or not getattr(self, "use_nested_tensor", False):
            return False
        if src_key_padding_mask is None or mask is not None:
            return False
        return not (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
