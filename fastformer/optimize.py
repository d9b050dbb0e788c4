"""``fastformer.optimize(model)``: swap supported submodules for fastformer's, in place, weights kept.

torch.nn:
    nn.MultiheadAttention       -> FastMultiheadAttention
    nn.TransformerEncoderLayer  -> FastTransformerEncoderLayer (also inside nn.TransformerEncoder)
    nn.TransformerEncoder       -> FastTransformerEncoder, when all its layers are fast (it hands
                                   them a boolean padding mask as is, not as PyTorch's float one)
The fast classes are subclasses of PyTorch's that only replace ``forward``, so a module is
converted by changing its class: parameters, buffers, hooks and ``state_dict`` keys stay as
they are, and checkpoints keep loading both ways.

Hugging Face BERT-family encoders (BERT, RoBERTa, MiniLM, ELECTRA, sentence-transformers models
built on them; DistilBERT), when ``transformers`` is installed:
    self-attention       -> ``fastformer.attention``, registered as the attention function
                            "fastformer" of transformers' attention registry
    *SelfOutput/*Output  -> dense, then dropout + residual + LayerNorm in ``residual_layer_norm``
    *Intermediate (GELU) -> dense without bias, then ``bias_gelu``
    DistilBERT's TransformerBlock (transformers >= 5) -> both residual adds (and the FFN's dropout)
                            in ``residual_layer_norm``, the FFN's bias + GELU in ``bias_gelu``

Everything else is left alone, and the report says why.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

import fastformer
from fastformer import dispatch
from fastformer.nn import FastMultiheadAttention, FastTransformerEncoder, FastTransformerEncoderLayer
from fastformer.nn.encoder import linear_bias_gelu

__all__ = ["OptimizeReport", "optimize"]

logger = logging.getLogger("fastformer")

# fastformer's own modules: their calls pass their ``fastformer_backend`` attribute on.
_FAST_MODULES = (FastMultiheadAttention, FastTransformerEncoderLayer)

# Relative error allowed by verify=True (DESIGN.md's attention forward tolerances).
_VERIFY_TOL = {torch.float64: 1e-8, torch.float32: 2e-3, torch.bfloat16: 2.5e-2, torch.float16: 2.5e-2}


@dataclasses.dataclass
class OptimizeReport:
    """What :func:`optimize` replaced, and what it left alone and why (module names as keys)."""

    replaced: dict = dataclasses.field(default_factory=dict)
    left_alone: dict = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastformer.optimize: replaced {len(self.replaced)} module(s)"]
        lines += [f"  {name or '(model)'}: {what}" for name, what in self.replaced.items()]
        if self.left_alone:
            lines.append(f"left alone {len(self.left_alone)} module(s):")
            lines += [f"  {name or '(model)'}: {why}" for name, why in self.left_alone.items()]
        return "\n".join(lines)


def optimize(model: nn.Module, *, backend: str | None = None, verify: bool = False) -> nn.Module:
    """Swap the supported submodules of ``model`` for fastformer's, in place; return ``model``.

    Args:
        backend: force this backend ("cuda", "triton", "torch") on the swapped modules and on
            every fastformer module in the model (those it already had, and the attention inside
            a swapped encoder layer); None lets each call of the swapped modules pick the fastest
            backend that supports it, and leaves the others as they were.
        verify: run each swapped torch.nn module (and a Hugging Face model as a whole) against an
            unswapped copy on a small random input and raise ``RuntimeError`` if they differ
            beyond DESIGN.md's tolerances.

    The report (:class:`OptimizeReport`) is logged at INFO level on the "fastformer" logger and
    kept as ``model.fastformer_report``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be a torch.nn.Module, got {type(model).__name__}")
    if backend is not None:
        dispatch.get_backend(backend)
    report = OptimizeReport()
    originals = {}
    for name, module in list(model.named_modules()):
        if type(module) is nn.MultiheadAttention:
            originals[name] = copy.deepcopy(module) if verify else None
            module.__class__ = FastMultiheadAttention
            report.replaced[name] = "nn.MultiheadAttention -> FastMultiheadAttention"
        elif type(module) is nn.TransformerEncoderLayer:
            originals[name] = copy.deepcopy(module) if verify else None
            _to_fast_encoder_layer(module)
            report.replaced[name] = "nn.TransformerEncoderLayer -> FastTransformerEncoderLayer"
        elif isinstance(module, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) and not isinstance(
                module, (FastMultiheadAttention, FastTransformerEncoderLayer)):
            report.left_alone[name] = (f"{type(module).__name__} subclasses a supported torch.nn module "
                                       f"but may change its behaviour")
    for name, module in list(model.named_modules()):  # after the layers: it needs them fast
        if type(module) is nn.TransformerEncoder and all(
                isinstance(layer, FastTransformerEncoderLayer) for layer in module.layers):
            module.__class__ = FastTransformerEncoder
            report.replaced[name] = ("nn.TransformerEncoder -> FastTransformerEncoder (padding masks "
                                     "reach the layers as given)")
    hf_originals = _optimize_hugging_face(model, report, verify)
    for name, module in model.named_modules():
        swapped = name in report.replaced or _is_hf_attention(module)
        if swapped or (backend is not None and isinstance(module, _FAST_MODULES)):
            module.fastformer_backend = backend
    if verify:
        for name, original in originals.items():
            _verify_module(name, original, model.get_submodule(name))
        for name, original in hf_originals.items():
            _verify_hugging_face(original, model.get_submodule(name))
    model.fastformer_report = report
    logger.info("%s", report)
    return model


def _to_fast_encoder_layer(layer: nn.TransformerEncoderLayer) -> None:
    layer.__class__ = FastTransformerEncoderLayer
    if type(layer.self_attn) is nn.MultiheadAttention:
        layer.self_attn.__class__ = FastMultiheadAttention


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------
def _optimize_hugging_face(model, report, verify):
    """Swap the BERT-family blocks of every Hugging Face model in ``model`` (the model itself, or
    models held by a user's module, e.g. an encoder inside a classifier).

    Returns {name: unswapped copy} of those models when verify is set, else {}.
    """
    try:
        import transformers
    except ImportError:
        return {}
    found = []  # (name, model) of the outermost PreTrainedModels
    for name, module in model.named_modules():
        nested = any(outer == "" or name.startswith(outer + ".") for outer, _ in found)
        if isinstance(module, transformers.PreTrainedModel) and not nested:
            found.append((name, module))
    originals = {}
    for prefix, hf_model in found:
        if verify:
            originals[prefix] = copy.deepcopy(hf_model)
        _optimize_hugging_face_model(transformers, hf_model, prefix, report)
    return originals


def _optimize_hugging_face_model(transformers, model, prefix, report):
    def qualified(name):
        return f"{prefix}.{name}" if prefix and name else (prefix or name)

    attention_key = f"{prefix} (attention)" if prefix else "(attention)"
    if _register_attention(transformers) and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("fastformer")
            refused = None
        except Exception as error:  # a model class that refuses custom attention functions
            refused = f"set_attn_implementation('fastformer') failed: {error}"
        # Some classes (DeBERTa-v2 in transformers 5) only log that they keep their own attention.
        if refused is None and getattr(model.config, "_attn_implementation", None) != "fastformer":
            refused = (f"{type(model).__name__} does not take attention functions from transformers' "
                       f"registry (set_attn_implementation left it as "
                       f"{getattr(model.config, '_attn_implementation', None)!r})")
        if refused is None:
            report.replaced[attention_key] = ("self-attention -> fastformer.attention (transformers "
                                              "attention registry)")
        else:
            report.left_alone[attention_key] = refused
    else:
        report.left_alone[attention_key] = (f"transformers {transformers.__version__} has no attention "
                                            f"registry (AttentionInterface)")
    fused_norms = set()  # ids of the LayerNorms that run fused
    for name, module in list(model.named_modules()):
        name = qualified(name)
        kind = _hf_block_kind(module)
        if kind == "output":
            module.__class__ = _fast_subclass(type(module), _fused_output_forward)
            report.replaced[name] = f"{type(module).__mro__[1].__name__}: dropout + residual + LayerNorm fused"
            fused_norms.add(id(module.LayerNorm))
        elif kind == "intermediate":
            approximate = _gelu_kind(module.intermediate_act_fn)
            if approximate is None:
                report.left_alone[name] = (f"activation {type(module.intermediate_act_fn).__name__} is "
                                           f"not a GELU that bias_gelu computes")
                continue
            module.fastformer_gelu = approximate
            module.__class__ = _fast_subclass(type(module), _fused_intermediate_forward)
            report.replaced[name] = f"{type(module).__mro__[1].__name__}: bias + GELU fused"
        elif kind == "distilbert block":
            reasons = _distilbert_block_unsupported_reasons(module, transformers.__version__)
            if reasons:
                report.left_alone[name] = "DistilBERT block: " + "; ".join(reasons)
                continue
            module.fastformer_gelu = _gelu_kind(module.ffn.activation)
            module.__class__ = _fast_subclass(type(module), _fused_distilbert_block_forward)
            gelu = "" if module.fastformer_gelu is None else ", the FFN's bias + GELU"
            report.replaced[name] = f"TransformerBlock: both residual adds + LayerNorms fused{gelu}"
            fused_norms.update((id(module.sa_layer_norm), id(module.output_layer_norm)))
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and id(module) not in fused_norms:
            report.left_alone[qualified(name)] = "LayerNorm outside the blocks that fastformer fuses (runs as is)"


def _register_attention(transformers) -> bool:
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        return False
    interface.register("fastformer", _hf_attention)
    masks = getattr(transformers, "AttentionMaskInterface", None)
    if masks is not None:  # ask for SDPA's boolean masks (True = may attend), which we take as is
        try:
            from transformers.masking_utils import sdpa_mask  # noqa: F401
        except ImportError:
            return True  # older versions build the eager additive mask, which we also take
        masks.register("fastformer", _hf_mask)
    return True


def _hf_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
             attention_mask=None, local_size=None, allow_is_bidirectional_skip=False, **kwargs):
    """transformers' ``sdpa_mask``, except for the padding mask of a bidirectional encoder: that
    comes back as a broadcast view of the 2-D padding mask (stride 0 over the query rows), which
    :func:`_hf_attention` reads as ``key_padding_mask`` without looking at its values (a check of
    the values would wait for the GPU in every layer)."""
    from transformers import masking_utils

    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    plain_padding = (mask_function is masking_utils.bidirectional_mask_function
                     and attention_mask is not None and attention_mask.dim() == 2
                     and attention_mask.shape[-1] == kv_length and q_offset == 0 and kv_offset == 0
                     and local_size is None)
    if plain_padding and not (allow_is_bidirectional_skip and masking_utils._ignore_bidirectional_mask_sdpa(
            attention_mask, kv_length, local_size)):
        keep = attention_mask.to(torch.bool)
        return keep[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
    return masking_utils.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                   mask_function=mask_function, attention_mask=attention_mask,
                                   local_size=local_size,
                                   allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature on top of fastformer.attention.

    q/k/v are (B, H, L, D); the result is (B, L, H, D) (a free view of fastformer's layout).
    A boolean (B, 1, Lq, Lk) mask that is the same for every query row (padding) becomes
    key_padding_mask, which the kernels skip tile by tile: recognised from its strides when it is
    a broadcast view (what :func:`_hf_mask` builds), else by comparing its rows.
    """
    key_padding_mask = None
    if (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1):
        first_row = attention_mask[:, :, :1, :]
        if (attention_mask.shape[-2] == 1 or attention_mask.stride(-2) == 0
                or torch.equal(attention_mask, first_row.expand_as(attention_mask))):
            key_padding_mask, attention_mask = ~first_row[:, 0, 0, :], None
    is_causal = attention_mask is None and key_padding_mask is None and query.shape[2] > 1 and bool(
        kwargs.get("is_causal", getattr(module, "is_causal", False)))
    out = fastformer.attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                               is_causal=is_causal, scale=scaling, key_padding_mask=key_padding_mask,
                               backend=getattr(module, "fastformer_backend", None))
    return out.transpose(1, 2), None


def _is_hf_attention(module) -> bool:
    """A transformers attention module (BertSelfAttention, AlbertAttention, ...): the module that
    :func:`_hf_attention` receives, where it reads ``fastformer_backend``."""
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("Attention")


def _hf_block_kind(module) -> str | None:
    name = type(module).__name__
    has = lambda *attrs: all(hasattr(module, a) for a in attrs)  # noqa: E731
    if name.endswith("Output") and has("dense", "LayerNorm", "dropout") and isinstance(
            module.LayerNorm, nn.LayerNorm) and isinstance(module.dense, nn.Linear) and isinstance(
            module.dropout, nn.Dropout):
        return "output"
    if name.endswith("Intermediate") and has("dense", "intermediate_act_fn") and isinstance(
            module.dense, nn.Linear) and module.dense.bias is not None:
        return "intermediate"
    if name == "TransformerBlock" and type(module).__module__.endswith(".modeling_distilbert"):
        return "distilbert block"
    return None


# The arguments of the DistilBERT TransformerBlock.forward that _fused_distilbert_block_forward
# replaces (transformers 5); a block whose forward takes others is left alone.
_DISTILBERT_BLOCK_ARGUMENTS = ("self", "hidden_states", "attention_mask", "kwargs")


def _distilbert_block_unsupported_reasons(block, version: str) -> list[str]:
    reasons = []
    arguments = tuple(inspect.signature(type(block).forward).parameters)
    if arguments != _DISTILBERT_BLOCK_ARGUMENTS:
        reasons.append(f"its forward in transformers {version} takes {arguments}, not the "
                       f"{_DISTILBERT_BLOCK_ARGUMENTS} that fastformer's replacement takes")
    parts = {"sa_layer_norm": nn.LayerNorm, "output_layer_norm": nn.LayerNorm, "ffn.lin1": nn.Linear,
             "ffn.lin2": nn.Linear, "ffn.dropout": nn.Dropout}
    for path, cls in parts.items():
        part = block
        for attribute in path.split("."):
            part = getattr(part, attribute, None)
        if not isinstance(part, cls):
            reasons.append(f"{path} is {type(part).__name__}, not nn.{cls.__name__}")
    if getattr(getattr(block, "ffn", None), "chunk_size_feed_forward", 0):
        reasons.append("feed-forward chunking is on (chunk_size_feed_forward)")
    return reasons


def _gelu_kind(activation) -> str | None:
    """"none" / "tanh" for the GELUs bias_gelu computes exactly, else None."""
    if activation is F.gelu:
        return "none"
    if isinstance(activation, nn.GELU):
        return activation.approximate
    name = type(activation).__name__
    if name == "GELUActivation" and getattr(activation, "act", F.gelu) is F.gelu:
        return "none"
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):
        return "tanh"
    return None


_FAST_SUBCLASSES = {}


def _fast_subclass(cls, forward):
    """A subclass of ``cls`` that only replaces ``forward`` (same parameters and state_dict keys)."""
    key = (cls, forward)
    if key not in _FAST_SUBCLASSES:
        _FAST_SUBCLASSES[key] = type(f"Fast{cls.__name__}", (cls,), {"forward": forward,
                                                                      "__module__": __name__})
    return _FAST_SUBCLASSES[key]


def _fused_output_forward(self, hidden_states, input_tensor):
    """LayerNorm(dropout(dense(h)) + input) with the last three steps in one fused op."""
    dropout_p = self.dropout.p if self.training else 0.0
    out, _ = fastformer.residual_layer_norm(self.dense(hidden_states), input_tensor, self.LayerNorm.weight,
                                            self.LayerNorm.bias, self.LayerNorm.eps, dropout_p,
                                            backend=getattr(self, "fastformer_backend", None))
    return out


def _fused_intermediate_forward(self, hidden_states):
    """gelu(dense(h)), the dense's bias fused into the GELU where that saves a pass."""
    return linear_bias_gelu(hidden_states, self.dense, self.fastformer_gelu,
                            backend=getattr(self, "fastformer_backend", None))


def _fused_distilbert_block_forward(self, hidden_states, attention_mask=None, **kwargs):
    """DistilBERT's block: x = LayerNorm(attention(h) + h); out = LayerNorm(dropout(FFN(x)) + x),
    each residual add (with its dropout) fused into its LayerNorm, the FFN's bias into its GELU
    (``fastformer_gelu``; None: another activation, run as is)."""
    backend = getattr(self, "fastformer_backend", None)
    attention_output, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    norm = self.sa_layer_norm
    x, _ = fastformer.residual_layer_norm(attention_output, hidden_states, norm.weight, norm.bias, norm.eps,
                                          backend=backend)
    ffn = self.ffn
    if self.fastformer_gelu is None:
        h = ffn.activation(ffn.lin1(x))
    else:
        h = linear_bias_gelu(x, ffn.lin1, self.fastformer_gelu, backend=backend)
    norm = self.output_layer_norm
    out, _ = fastformer.residual_layer_norm(ffn.lin2(h), x, norm.weight, norm.bias, norm.eps,
                                            ffn.dropout.p if ffn.training else 0.0, backend=backend)
    return out


# --------------------------------------------------------------------------------------------
# verify=True
# --------------------------------------------------------------------------------------------
def _relative_error(actual, expected) -> float:
    expected, actual = expected.double(), actual.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _check(name, actual, expected):
    tol = _VERIFY_TOL.get(expected.dtype, 2e-3)
    error = _relative_error(actual, expected)
    if not math.isfinite(error) or error > tol:
        raise RuntimeError(f"optimize(verify=True): {name or '(model)'} differs from the original: "
                           f"relative error {error:.3g} > {tol:.3g}")


def _verify_module(name, original, fast):
    parameter = next(fast.parameters())
    like = dict(dtype=parameter.dtype, device=parameter.device)
    batch, length = 2, 7
    with torch.no_grad():
        if isinstance(original, nn.MultiheadAttention):
            def inputs(dim, size):
                shape = (batch, size, dim) if original.batch_first else (size, batch, dim)
                return torch.randn(shape, **like)
            query = inputs(original.embed_dim, length)
            key, value = inputs(original.kdim, length + 2), inputs(original.vdim, length + 2)
            _check(name, fast(query, key, value, need_weights=False)[0],
                   original(query, key, value, need_weights=False)[0])
        else:
            d_model = original.linear1.in_features
            shape = (batch, length, d_model) if original.self_attn.batch_first else (length, batch, d_model)
            src = torch.randn(shape, **like)
            _check(name, fast(src), original(src))


def _verify_hugging_face(original, model):
    config = model.config
    parameter = next(model.parameters())
    input_ids = torch.randint(0, config.vocab_size, (2, 9), device=parameter.device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    with torch.no_grad():
        expected = original(input_ids=input_ids, attention_mask=attention_mask)
        actual = model(input_ids=input_ids, attention_mask=attention_mask)
    actual, expected = actual[0], expected[0]
    if expected.shape[:2] == input_ids.shape:  # per-token outputs: padded positions are undefined
        keep = attention_mask.bool()
        actual, expected = actual[keep], expected[keep]
    _check("(model)", actual, expected)  # else one output per sequence (a classifier's logits)
