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
    MPNetSelfAttention   -> ``fastformer.attention`` with the relative position bias as its float
                            mask (MPNet, e.g. all-mpnet-base-v2, keeps its own attention, outside
                            the registry); the bias, a learned embedding, gets its gradient from
                            the kernel
    MPNetAttention       -> the self-attention, then dropout + residual + LayerNorm fused
    DeBERTa-v2/v3's DisentangledSelfAttention -> ``fastformer.attention``, its position terms
                            (c2p, p2c, computed as transformers computes them) and the padding as
                            one float mask, whose gradient flows back through those terms
    AlbertAttention (transformers >= 5) -> q, k, v, fastformer's registry attention function, then
                            dense, then dropout + residual + LayerNorm fused
    AlbertLayer (transformers >= 5) -> the FFN's residual add + LayerNorm fused, its bias + GELU
                            in ``bias_gelu``
    NomicBertLayer       -> both residual adds (with their dropout) and LayerNorms in
                            ``residual_layer_norm`` (nomic-embed-text; post-norm)
    EsmLayer             -> the attention's residual add (with its dropout) and the FFN's LayerNorm
                            (pre-norm) in ``residual_layer_norm``, the FFN's bias + GELU in
                            ``bias_gelu`` (ESM-2 protein models); its attention goes through the
                            registry as above
    ModernBertEncoderLayer (transformers >= 5) -> the first residual add and the MLP's LayerNorm
                            (pre-norm) in ``residual_layer_norm``; its attention goes through the
                            registry as above

Everything else is left alone, and the report says why.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import dataclasses
import inspect
import logging
import math
import textwrap
import types

import torch
import torch.nn.functional as F
from torch import nn

import fastformer
from fastformer import dispatch
from fastformer.masks import future_keys
from fastformer.nn import FastMultiheadAttention, FastTransformerEncoder, FastTransformerEncoderLayer
from fastformer.nn.encoder import gelu_approximate, has_hooks, is_plain, linear_bias_gelu

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
    undo = _Undo()
    for name, module in list(model.named_modules()):
        if type(module) is nn.MultiheadAttention:
            originals[name] = copy.deepcopy(module) if verify else None
            undo.set_class(module, FastMultiheadAttention)
            report.replaced[name] = "nn.MultiheadAttention -> FastMultiheadAttention"
        elif type(module) is nn.TransformerEncoderLayer:
            originals[name] = copy.deepcopy(module) if verify else None
            _to_fast_encoder_layer(module, undo)
            report.replaced[name] = "nn.TransformerEncoderLayer -> FastTransformerEncoderLayer"
        elif isinstance(module, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) and not isinstance(
                module, (FastMultiheadAttention, FastTransformerEncoderLayer)):
            report.left_alone[name] = (f"{type(module).__name__} subclasses a supported torch.nn module "
                                       f"but may change its behaviour")
    for name, module in list(model.named_modules()):  # after the layers: it needs them fast
        if type(module) is nn.TransformerEncoder and all(
                isinstance(layer, FastTransformerEncoderLayer) for layer in module.layers):
            undo.set_class(module, FastTransformerEncoder)
            report.replaced[name] = ("nn.TransformerEncoder -> FastTransformerEncoder (padding masks "
                                     "reach the layers as given)")
    hf_originals = _optimize_hugging_face(model, report, verify, undo)
    for name, module in model.named_modules():
        swapped = name in report.replaced or _is_hf_attention(module)
        if swapped or (backend is not None and isinstance(module, _FAST_MODULES)):
            undo.set_attribute(module, "fastformer_backend", backend)
    if verify:
        try:
            for name, original in originals.items():
                _verify_module(name, original, model.get_submodule(name))
            for name, original in hf_originals.items():
                _verify_hugging_face(original, model.get_submodule(name))
        except Exception as error:
            undo()
            if isinstance(error, _VerifyMismatch):
                raise RuntimeError(f"{error}; the model was left as it was") from None
            raise RuntimeError(f"optimize(verify=True) could not compare the model with the original on a "
                               f"random batch ({type(error).__name__}: {error}); the model was left as it "
                               f"was") from error
    model.fastformer_report = report
    logger.info("%s", report)
    return model


def _to_fast_encoder_layer(layer: nn.TransformerEncoderLayer, undo: _Undo) -> None:
    undo.set_class(layer, FastTransformerEncoderLayer)
    if type(layer.self_attn) is nn.MultiheadAttention:
        undo.set_class(layer.self_attn, FastMultiheadAttention)


class _Undo:
    """What optimize changed (classes, attributes, attention implementations), to put back when
    verify=True finds a difference: the model is then left exactly as it was given."""

    _MISSING = object()

    def __init__(self):
        self._steps = []

    def set_class(self, module, cls):
        self._steps.append(lambda was=module.__class__: setattr(module, "__class__", was))
        module.__class__ = cls

    def set_attribute(self, module, name, value):
        was = module.__dict__.get(name, self._MISSING)
        self._steps.append(lambda: module.__dict__.pop(name, None) if was is self._MISSING
                           else setattr(module, name, was))
        setattr(module, name, value)

    def add(self, step):
        self._steps.append(step)

    def __call__(self):
        for step in reversed(self._steps):
            step()
        self._steps.clear()


# --------------------------------------------------------------------------------------------
# Hugging Face
# --------------------------------------------------------------------------------------------
def _optimize_hugging_face(model, report, verify, undo):
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
        _optimize_hugging_face_model(transformers, hf_model, prefix, report, undo)
    return originals


def _optimize_hugging_face_model(transformers, model, prefix, report, undo):
    def qualified(name):
        return f"{prefix}.{name}" if prefix and name else (prefix or name)

    attention_key = f"{prefix} (attention)" if prefix else "(attention)"
    if _register_attention(transformers) and hasattr(model, "set_attn_implementation"):
        before = getattr(model.config, "_attn_implementation", None)
        # The implementation the model had before any optimize (a second call finds "fastformer").
        original = model.__dict__.get("fastformer_attention_was", before)
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
        if refused is None and not any(map(_is_hf_attention, model.modules())):
            refused = f"{type(model).__name__} has no attention module"  # e.g. FNet (Fourier transforms)
        if refused is None:
            refused = _hf_attention_unsupported_reason(model)
            if refused is not None:
                model.set_attn_implementation(before)
            else:
                undo.add(lambda: model.set_attn_implementation(before))
        if refused is None:
            undo.set_attribute(model, "fastformer_attention_was", original)
            # Unpickling the model registers "fastformer" again, in a process that has not run optimize.
            undo.set_attribute(model, "fastformer_attention_registration", _AttentionRegistration())
            report.replaced[attention_key] = ("self-attention -> fastformer.attention (transformers "
                                              "attention registry)")
            if original == "eager":  # the one implementation that returns the attention weights
                report.replaced[attention_key] += ("; it was 'eager': output_attentions=True now gives no "
                                                   "weights (as with 'sdpa')")
        else:
            report.left_alone[attention_key] = refused
    else:
        report.left_alone[attention_key] = (f"transformers {transformers.__version__} has no attention "
                                            f"registry (AttentionInterface)")
    fused_norms = set()  # ids of the LayerNorms that run fused
    swapped_kinds = set()
    checked = {}  # (class, kind) -> what the behaviour check found (the first module of each class)
    for name, module in list(model.named_modules()):
        kind = _hf_block_kind(module)
        if kind is None:
            continue
        block, base = _HF_BLOCKS[kind], _original_class(module)
        reasons = _hf_block_unsupported_reasons(kind, module, base)
        if not reasons:
            if kind in _FFN_KINDS:
                undo.set_attribute(module, "fastformer_gelu", _gelu_kind(_activation(kind, module)))
            undo.set_attribute(module, "fastformer_reads", _reads(module, block))
            if (base, kind) not in checked:
                checked[base, kind] = _behaviour_reasons(kind, module, base)
            reasons = checked[base, kind]
        if reasons:
            report.left_alone[qualified(name)] = f"{base.__name__}: " + "; ".join(reasons)
            continue
        undo.set_class(module, _fast_subclass(base, block.forward))
        fused_gelu = kind in _FFN_KINDS and kind != "intermediate" and module.fastformer_gelu
        gelu = ", the FFN's bias + GELU" if fused_gelu else ""
        report.replaced[qualified(name)] = f"{base.__name__}: {block.what}{gelu}"
        fused_norms.update(id(getattr(module, norm)) for norm in block.norms)
        swapped_kinds.add(kind)
    if swapped_kinds & _ATTENTION_KINDS:
        report.left_alone.pop(attention_key, None)  # the model's own attention, swapped as a block instead
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and id(module) not in fused_norms:
            report.left_alone[qualified(name)] = "LayerNorm outside the blocks that fastformer fuses (runs as is)"


# transformers.masking_utils, for _hf_mask: imported when the mask function is registered, not
# in it (torch 2.11's dynamo breaks the graph at an import of a lazily loaded module).
_masking_utils = None


def _register_attention(transformers) -> bool:
    global _masking_utils
    interface = getattr(transformers, "AttentionInterface", None)
    if interface is None:
        return False
    interface.register("fastformer", _hf_attention)
    masks = getattr(transformers, "AttentionMaskInterface", None)
    if masks is not None:  # ask for SDPA's boolean masks (True = may attend), which we take as is
        try:
            from transformers import masking_utils
        except ImportError:
            masking_utils = None
        if not hasattr(masking_utils, "sdpa_mask"):
            return True  # older versions build the eager additive mask, which we also take
        _masking_utils = masking_utils
        masks.register("fastformer", _hf_mask)
    return True


class _AttentionRegistration:
    """Held by an optimized Hugging Face model: unpickled (torch.load of the whole model, deepcopy),
    it registers the "fastformer" attention function its config names, which a new process has
    not registered (optimize does it)."""

    def __reduce__(self):
        return _registered_attention, ()


def _registered_attention() -> _AttentionRegistration:
    import transformers

    _register_attention(transformers)
    return _AttentionRegistration()


def _hf_attention_unsupported_reason(model) -> str | None:
    """Why the model's attention must not switch to fastformer's, or None.

    Switching changes every attention function the registry hands out and every mask the model
    builds through transformers' mask interface (boolean, SDPA's form). So: no module may compute
    attention itself from the model's mask (it would read a boolean mask as an additive one: GIT's
    text self-attention), and none may need what :func:`_hf_attention` does not compute (logit
    soft-capping, attention sinks)."""
    if getattr(model.config, "attn_logit_softcapping", None) is not None:
        return (f"{type(model).__name__} soft-caps its attention logits (attn_logit_softcapping), which "
                f"fastformer does not")
    for name, module in model.named_modules():
        if isinstance(getattr(module, "sinks", None), torch.Tensor):
            return f"{name} ({type(module).__name__}) has attention sinks, which fastformer does not compute"
        if _computes_attention_itself(module):
            return (f"{name} ({type(module).__name__}) computes its attention itself from the model's mask: "
                    f"it would read the boolean masks fastformer's registry entry builds as additive ones")
    return None


def _computes_attention_itself(module) -> bool:
    """A transformers module whose forward takes the model's attention_mask and runs its own
    softmax, without looking the attention function up in the registry. Read from the forward's
    code (its syntax tree), so that a comment or a docstring example mentioning a softmax (ELECTRA's
    masked-LM head, BART's generation example) does not count."""
    cls = type(module)
    if not cls.__module__.startswith("transformers."):
        return False
    try:
        if "attention_mask" not in inspect.signature(cls.forward).parameters:
            return False
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls.forward)))
    except (TypeError, ValueError, OSError, SyntaxError):  # no Python source to read: assume the worst
        return True
    names = {node.id if isinstance(node, ast.Name) else node.attr
             for node in ast.walk(tree) if isinstance(node, (ast.Name, ast.Attribute))}
    calls_softmax = any(isinstance(node, ast.Call) and _called_name(node.func) == "softmax"
                        for node in ast.walk(tree))
    return calls_softmax and not names & {"ALL_ATTENTION_FUNCTIONS", "_attn_implementation"}


def _called_name(func: ast.expr) -> str | None:
    """The name a call's function goes by: ``softmax`` for ``softmax(x)``, ``F.softmax(x)`` and
    ``x.softmax()``."""
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else None


def _values_readable(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host is free: a CPU tensor, outside torch.compile and
    torch.func transforms (vmap cannot branch on values). A GPU tensor's would wait for the device
    (draining its queue) and is refused while a CUDA graph is captured, so the Hugging Face glue
    never reads a mask's values there."""
    return (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not dispatch.func_transforms_active())


def _hf_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
             attention_mask=None, local_size=None, allow_is_bidirectional_skip=False, **kwargs):
    """transformers' ``sdpa_mask``, except for the padding mask of a bidirectional encoder: that
    comes back as a broadcast view of the 2-D padding mask (stride 0 over the query rows), which
    :func:`_hf_attention` reads as ``key_padding_mask`` without looking at its values. When nothing
    is padded, ``sdpa_mask`` answers None (no mask, SDPA's fastest path) after checking
    ``.all()``: so do we where that read is free (:func:`_values_readable`), once; on a GPU the
    padding mask is handed over as is (an all-False ``key_padding_mask`` costs the kernels a few
    small device ops per call, not a wait for the GPU)."""
    masking_utils = _masking_utils
    if mask_function is None:
        mask_function = masking_utils.causal_mask_function
    plain_padding = (mask_function is masking_utils.bidirectional_mask_function
                     and attention_mask is not None and attention_mask.dim() == 2
                     and attention_mask.shape[-1] == kv_length and q_offset == 0 and kv_offset == 0
                     and local_size is None)
    if plain_padding:
        if (allow_is_bidirectional_skip and _values_readable(attention_mask)
                and masking_utils._ignore_bidirectional_mask_sdpa(attention_mask, kv_length, local_size)):
            return None  # nothing padded: what sdpa_mask answers, without its second read
        keep = attention_mask.to(torch.bool)
        return keep[:, None, None, :].expand(batch_size, 1, q_length, kv_length)
    return masking_utils.sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset,
                                   mask_function=mask_function, attention_mask=attention_mask,
                                   local_size=local_size,
                                   allow_is_bidirectional_skip=allow_is_bidirectional_skip, **kwargs)


def _hf_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature on top of fastformer.attention.

    q/k/v are (B, H, L, D); the result is (B, L, H, D), contiguous when the query is a view of a
    (B, L, H, D) projection as transformers makes it (the kernel backends lay the output out like
    the query).
    A boolean (B, 1, Lq, Lk) mask that is the same for every query row (padding) becomes
    key_padding_mask, which the kernels skip tile by tile: recognised from its strides when it is
    a broadcast view (what :func:`_hf_mask` builds), else, where its values are free to read
    (:func:`_values_readable`), by comparing its rows; on a GPU such a full mask stays attn_mask.
    """
    for name in ("softcap", "s_aux"):  # as transformers' SDPA function: no silent approximation
        if kwargs.get(name) is not None:
            raise ValueError(f"fastformer's attention function does not support {name!r} (soft-capping, "
                             f"attention sinks): leave this model's attention as it is")
    if kwargs.get("output_attentions"):
        _warn_once("fastformer's attention function returns no attention weights (output_attentions=True), "
                   "as transformers' 'sdpa'; set the model's attention to 'eager' to get them")
    # As transformers' SDPA function: the call's hint, else the module's, else causal.
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    position_bias = kwargs.get("position_bias")
    if position_bias is not None:  # relative positions (T5, LayoutLMv3): one additive mask
        attention_mask = _with_position_bias(position_bias, attention_mask,
                                             causal and query.shape[2] > 1, query.shape[2], key.shape[2])
    key_padding_mask = None
    if (attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
            and attention_mask.shape[1] == 1):
        first_row = attention_mask[:, :, :1, :]
        if (attention_mask.shape[-2] == 1 or attention_mask.stride(-2) == 0
                or (_values_readable(attention_mask)
                    and torch.equal(attention_mask, first_row.expand_as(attention_mask)))):
            # A mask shared by the batch (batch 1) is expanded to it, as SDPA broadcasts it.
            key_padding_mask = (~first_row[:, 0, 0, :]).expand(query.shape[0], -1)
            attention_mask = None
    is_causal = attention_mask is None and key_padding_mask is None and query.shape[2] > 1 and bool(causal)
    out = fastformer.attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                               is_causal=is_causal, scale=scaling, key_padding_mask=key_padding_mask,
                               backend=getattr(module, "fastformer_backend", None))
    return out.transpose(1, 2), None


def _with_position_bias(position_bias, attention_mask, causal, len_q, len_k):
    """The additive mask of ``position_bias`` (B or 1, H, Lq, Lk) and the call's mask: -inf where
    the boolean mask (or causality, without a mask) removes a key, the float mask added."""
    if attention_mask is None:
        if not causal:
            return position_bias
        return position_bias.masked_fill(future_keys(len_q, len_k, position_bias.device), float("-inf"))
    if attention_mask.dtype == torch.bool:
        return position_bias.masked_fill(~attention_mask, float("-inf"))
    return position_bias + attention_mask


_warned = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning("%s", message)


def _is_hf_attention(module) -> bool:
    """A transformers attention module (BertSelfAttention, AlbertAttention, ...): the module that
    :func:`_hf_attention` receives, where it reads ``fastformer_backend``."""
    cls = type(module)
    return cls.__module__.startswith("transformers.") and cls.__name__.endswith("Attention")


def _hf_block_kind(module) -> str | None:
    """Which of :data:`_HF_BLOCKS` a module looks like, by its class name (checked in depth by
    :func:`_hf_block_unsupported_reasons` and :func:`_behaviour_reasons`)."""
    cls = _original_class(module)
    if cls.__name__.endswith("Output") and hasattr(module, "LayerNorm"):
        return "output"
    if cls.__name__.endswith("Intermediate") and hasattr(module, "intermediate_act_fn"):
        return "intermediate"
    for kind, block in _HF_BLOCKS.items():
        if block.model_class is not None and (cls.__module__.rsplit(".", 1)[-1], cls.__name__) == block.model_class:
            return kind
    return None


_ATTENTION_KINDS = {"mpnet attention", "deberta attention"}  # attention computed outside the registry


@dataclasses.dataclass(frozen=True)
class _HFBlock:
    """A Hugging Face block that optimize fuses: what its original forward must take, what it must
    consist of, the forward that replaces it, and the LayerNorms that then run fused."""

    arguments: tuple  # of the original forward
    parts: dict  # attribute path -> the torch.nn class it must be
    uses: tuple  # the other attributes the fused forward calls; any other child refuses the block
    forward: object
    norms: tuple  # the LayerNorms that run fused
    what: str
    reads: tuple = ()  # the parts whose parameters the fused forward uses instead of calling them
    model_class: tuple | None = None  # (transformers module, class name) of the one class it fuses
    width: str = "dense"  # a Linear whose in_features is the block input's width (behaviour check)
    activation: object = None  # the FFN activation's path, or a function of the block that finds it
    chunking: str | None = None  # the path of chunk_size_feed_forward, which refuses the block when set
    rotary: str | None = None  # the path of the head size that rotary (cos, sin) position embeddings take


def _attribute(module, path: str):
    for name in path.split("."):
        module = getattr(module, name, None)
    return module


def _activation(kind, module):
    """The FFN activation of a block (None: the block has none)."""
    path = _HF_BLOCKS[kind].activation
    if path is None:
        return None
    return path(module) if callable(path) else _attribute(module, path)


def _hf_block_unsupported_reasons(kind, module, base) -> list[str]:
    block = _HF_BLOCKS[kind]
    reasons = []
    arguments = tuple(inspect.signature(base.forward).parameters)
    if arguments != block.arguments:
        reasons.append(f"its forward takes {arguments}, not the {block.arguments} of the forward that "
                       f"fastformer puts in its place")
    for path, cls in block.parts.items():
        part = _attribute(module, path)
        if not isinstance(part, cls):
            reasons.append(f"{path} is {type(part).__name__}, not nn.{cls.__name__}")
        elif path in block.reads and type(part) is not cls:
            reasons.append(f"{path} is {type(part).__name__}, a subclass of nn.{cls.__name__} whose forward the "
                           f"fused block would not run")
    known = {*block.parts, *block.uses}
    for prefix in {""} | {path.rsplit(".", 1)[0] + "." for path in known if "." in path}:
        owner = module if not prefix else _attribute(module, prefix[:-1])
        for name, _ in owner.named_children() if isinstance(owner, nn.Module) else ():
            if prefix + name not in known:
                reasons.append(f"it also has {prefix + name}, which the forward fastformer puts in its "
                               f"place would not run")
    if kind == "intermediate" and _gelu_kind(module.intermediate_act_fn) is None:
        reasons.append(f"activation {type(module.intermediate_act_fn).__name__} is not a GELU that "
                       f"bias_gelu computes")
    if block.chunking is not None and _attribute(module, block.chunking):
        reasons.append("feed-forward chunking is on (chunk_size_feed_forward)")
    implementation = getattr(getattr(module, "config", None), "_attn_implementation", None)
    if kind == "albert attention" and implementation != "fastformer":
        reasons.append(f"its attention is transformers' {implementation!r}, not fastformer's, which the fused "
                       f"forward calls")
    return reasons


def _behaviour_reasons(kind, module, base) -> list[str]:
    """Run the original forward and fastformer's on one small random input (eval mode, a private
    generator): a class whose forward does something else than its structure suggests (e.g. a
    LayerNorm it never applies) is caught here. Skipped for parameters on the meta device."""
    parameter = next(module.parameters())
    if parameter.device.type == "meta":
        return []
    block = _HF_BLOCKS[kind]
    width = _attribute(module, block.width).in_features
    generator = _private_generator(parameter.device)

    def rand(*sizes):
        return torch.randn(*sizes, generator=generator, device=parameter.device, dtype=parameter.dtype)
    inputs = (rand(2, 3, width),)
    if kind == "output":
        inputs += (rand(2, 3, module.dense.out_features),)
    if kind.startswith("mpnet"):  # no mask, a position bias
        heads = (module if kind == "mpnet attention" else module.attn).num_attention_heads
        inputs += (None, rand(2, heads, 3, 3))
    if kind == "deberta attention":  # a padding mask (the last key of row 1), relative embeddings
        keep = torch.ones(2, 1, 3, 3, dtype=torch.bool, device=parameter.device)
        keep[1, :, :, 2] = False
        embeddings = rand(2 * module.pos_ebd_size, width) if module.relative_attention else None
        inputs += (keep, False, None, None, embeddings)
    kwargs = {}
    if block.rotary is not None:  # rotary (cos, sin) of random angles
        angles = rand(2, 3, _attribute(module, block.rotary))
        kwargs["position_embeddings"] = (angles.cos(), angles.sin())
    with _evaluating(module), torch.no_grad():
        expected, actual = base.forward(module, *inputs, **kwargs), block.forward(module, *inputs, **kwargs)
    if isinstance(expected, tuple):  # (attention output, ...)
        expected, actual = expected[0], actual[0]
    mismatch = _mismatch(actual, expected)
    return [] if mismatch is None else [f"its forward computes something else on a random input ({mismatch})"]


def _gelu_kind(activation) -> str | None:
    """"none" / "tanh" for the GELUs bias_gelu computes exactly (torch's, and transformers' by class
    name), else None."""
    approximate = gelu_approximate(activation)
    if approximate is not None or has_hooks(activation):  # a hooked one: the fused forward would not call it
        return approximate
    name = type(activation).__name__
    if name == "GELUActivation" and getattr(activation, "act", F.gelu) is F.gelu:
        return "none"
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):
        return "tanh"
    if isinstance(activation, types.FunctionType):  # a model's own GELU function (ESM's)
        if activation not in _GELU_FUNCTION_KINDS:  # probed once (optimize): a forward only looks it up
            _GELU_FUNCTION_KINDS[activation] = _gelu_function_kind(activation)
        return _GELU_FUNCTION_KINDS[activation]
    return None


_GELU_FUNCTION_KINDS = {}  # function -> _gelu_function_kind(function)


def _gelu_function_kind(function) -> str | None:
    """"none" / "tanh" for a plain function equal to that GELU in float64 on points that tell them
    apart (they differ by up to 2e-4 there), else None."""
    x = torch.linspace(-6.0, 6.0, 121, dtype=torch.float64)
    try:
        with torch.no_grad():
            y = function(x)
    except Exception:
        return None
    for approximate in ("none", "tanh"):
        if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(
                y, F.gelu(x, approximate=approximate), rtol=1e-12, atol=1e-12):
            return approximate
    return None


_FAST_SUBCLASSES = {}  # (class, forward) -> subclass
_MADE_FROM = {}  # subclass -> (class, forward)


def _fast_subclass(cls, forward):
    """A subclass of ``cls`` that only replaces ``forward`` (same parameters and state_dict keys).
    Made at run time, so its instances pickle as (cls, forward) plus their state."""
    key = (cls, forward)
    if key not in _FAST_SUBCLASSES:
        fast = type(f"Fast{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__,
                                                     "__reduce_ex__": _reduce_fast_module})
        _FAST_SUBCLASSES[key], _MADE_FROM[fast] = fast, key
    return _FAST_SUBCLASSES[key]


def _original_class(module) -> type:
    """The module's class, or for a module optimize already swapped, the class it had."""
    return _MADE_FROM.get(type(module), (type(module),))[0]


def _reduce_fast_module(self, protocol):
    # (Not type(self).forward: transformers may wrap the forward of subclasses it sees made.)
    _, _, *state = object.__reduce_ex__(self, protocol)  # (copyreg.__newobj__, (cls,), state, ...)
    return (_new_fast_module, _MADE_FROM[type(self)], *state)


def _new_fast_module(cls, forward):
    fast = _fast_subclass(cls, forward)
    return fast.__new__(fast)


@contextlib.contextmanager
def _evaluating(*modules):
    """Every submodule in eval mode inside the block, each back in its own mode after it."""
    modes = [(sub, sub.training) for module in modules for sub in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


def _reads(module, block) -> tuple:
    """What :func:`_as_optimized` checks at each call: each part the fused forward reads, with the
    class it must have (torch.nn's own; a part outside ``parts``, DistilBERT's FFN: its class now)."""
    return tuple((tuple(path.split(".")), block.parts.get(path) or type(_attribute(module, path)))
                 for path in block.reads)


def _as_optimized(module, kind) -> bool:
    """Whether a swapped block is still as optimize found it: the parts whose parameters its fused
    forward uses (norms, dropouts, DistilBERT's FFN) of the same class and without hooks, and its
    activation the GELU it fused. If not, the block's original forward runs, calling every part as
    it is. The parts the fused forward calls (the dense layers: a LoRA adapter put in place of one)
    need no check."""
    reads = module.__dict__.get("fastformer_reads")
    if reads is None:  # swapped (and pickled) by a version that did not record them
        reads = module.fastformer_reads = _reads(module, _HF_BLOCKS[kind])
    for path, cls in reads:
        part = module
        for name in path:  # through _modules: nn.Module.__getattr__ is slow, and this runs every call
            part = part._modules.get(name)
        if not is_plain(part, cls):
            return False
    return kind not in _FFN_KINDS or _gelu_kind(_activation(kind, module)) == module.fastformer_gelu


def _original_forward(module, *args, **kwargs):
    return _original_class(module).forward(module, *args, **kwargs)


def _residual_norm(x, residual, norm, dropout, backend):
    """norm(dropout(x) + residual) in one ``residual_layer_norm``: the dropout in its own mode, as
    ``dropout(x)`` would apply it (None: no dropout)."""
    dropout_p = dropout.p if dropout is not None and dropout.training else 0.0
    out, _ = fastformer.residual_layer_norm(x, residual, norm.weight, norm.bias, norm.eps, dropout_p, backend=backend)
    return out


def _fused_output_forward(self, hidden_states, input_tensor):
    """LayerNorm(dropout(dense(h)) + input) with the last three steps in one fused op."""
    if not _as_optimized(self, "output"):
        return _original_forward(self, hidden_states, input_tensor)
    return _residual_norm(self.dense(hidden_states), input_tensor, self.LayerNorm, self.dropout,
                          getattr(self, "fastformer_backend", None))


def _fused_intermediate_forward(self, hidden_states):
    """gelu(dense(h)), the dense's bias fused into the GELU where that saves a pass."""
    if not _as_optimized(self, "intermediate"):
        return _original_forward(self, hidden_states)
    return linear_bias_gelu(hidden_states, self.dense, self.fastformer_gelu,
                            backend=getattr(self, "fastformer_backend", None))


def _fused_distilbert_block_forward(self, hidden_states, attention_mask=None, **kwargs):
    """DistilBERT's block: x = LayerNorm(attention(h) + h); out = LayerNorm(dropout(FFN(x)) + x),
    each residual add (with its dropout) fused into its LayerNorm, the FFN's bias into its GELU
    (``fastformer_gelu``; None: another activation, run as is)."""
    if not _as_optimized(self, "distilbert block"):
        return _original_forward(self, hidden_states, attention_mask, **kwargs)
    backend = getattr(self, "fastformer_backend", None)
    attention_output, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    norm = self.sa_layer_norm
    x, _ = fastformer.residual_layer_norm(attention_output, hidden_states, norm.weight, norm.bias, norm.eps,
                                          backend=backend)
    ffn = self.ffn
    return _fused_ffn(x, ffn.lin1, ffn.activation, ffn.lin2, self.fastformer_gelu, self.output_layer_norm,
                      ffn.dropout.p if ffn.dropout.training else 0.0, backend)


def _fused_ffn(x, lin1, activation, lin2, gelu, norm, dropout_p, backend):
    """LayerNorm(dropout(lin2(activation(lin1(x)))) + x) with the residual add and the dropout fused
    into the norm, and lin1's bias into the GELU (``gelu``: "none" or "tanh"; None: another
    activation, run as is)."""
    h = activation(lin1(x)) if gelu is None else linear_bias_gelu(x, lin1, gelu, backend=backend)
    out, _ = fastformer.residual_layer_norm(lin2(h), x, norm.weight, norm.bias, norm.eps, dropout_p, backend=backend)
    return out


def _fused_modernbert_layer_forward(self, hidden_states, attention_mask=None, position_embeddings=None, **kwargs):
    """ModernBERT's pre-norm layer: h = h + attn(attn_norm(h)); out = h + mlp(mlp_norm(h)), the
    first residual add fused into mlp_norm (one pass over the stream that returns both h and its
    norm, where the add and the norm took one each)."""
    if not _as_optimized(self, "modernbert layer"):
        return _original_forward(self, hidden_states, attention_mask, position_embeddings, **kwargs)
    attention_output, _ = self.attn(self.attn_norm(hidden_states), position_embeddings=position_embeddings,
                                    attention_mask=attention_mask, **kwargs)
    norm, backend = self.mlp_norm, getattr(self, "fastformer_backend", None)
    normed, hidden_states = fastformer.residual_layer_norm(attention_output, hidden_states, norm.weight, norm.bias,
                                                           norm.eps, backend=backend)
    return hidden_states + self.mlp(normed)


def _fused_nomic_bert_layer_forward(self, hidden_states, attention_mask=None, position_embeddings=None,
                                    **kwargs):
    """NomicBERT's post-norm layer (nomic-embed-text): x = LayerNorm(h + dropout(attn(h))); out =
    LayerNorm(x + dropout(mlp(x))), each residual add with its dropout fused into its LayerNorm
    (its SwiGLU MLP runs as is)."""
    if not _as_optimized(self, "nomic bert layer"):
        return _original_forward(self, hidden_states, attention_mask, position_embeddings, **kwargs)
    backend = getattr(self, "fastformer_backend", None)
    attention_output, _ = self.self_attn(hidden_states, attention_mask=attention_mask,
                                         position_embeddings=position_embeddings, **kwargs)
    x = _residual_norm(attention_output, hidden_states, self.post_attention_layernorm, self.post_attention_dropout,
                       backend)
    return _residual_norm(self.mlp(x), x, self.post_mlp_layernorm, self.post_mlp_dropout, backend)


def _fused_albert_attention_forward(self, hidden_states, attention_mask=None, **kwargs):
    """ALBERT's attention: LayerNorm(h + dropout(dense(attention(h)))), the attention through
    fastformer's registry function (the model's, checked at each call), the last three steps
    fused."""
    if getattr(self.config, "_attn_implementation", None) != "fastformer" or not _as_optimized(
            self, "albert attention"):
        return _original_forward(self, hidden_states, attention_mask, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.attention_head_size)
    q, k, v = (projection(hidden_states).view(shape).transpose(1, 2)
               for projection in (self.query, self.key, self.value))
    out, weights = _hf_attention(self, q, k, v, attention_mask, scaling=self.scaling,
                                 dropout=self.attention_dropout.p if self.training else 0.0, **kwargs)
    out = _residual_norm(self.dense(out.reshape(*hidden_states.shape[:-1], -1)), hidden_states, self.LayerNorm,
                         self.output_dropout, getattr(self, "fastformer_backend", None))
    return out, weights


def _fused_albert_layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    """ALBERT's layer: x = attention(h); out = LayerNorm(ffn_output(act(ffn(x))) + x), the residual
    add fused into the LayerNorm and the FFN's bias into its GELU (``fastformer_gelu``; None:
    another activation, run as is)."""
    if not _as_optimized(self, "albert layer"):
        return _original_forward(self, hidden_states, attention_mask, **kwargs)
    attention_output, _ = self.attention(hidden_states, attention_mask, **kwargs)
    return _fused_ffn(attention_output, self.ffn, self.activation, self.ffn_output, self.fastformer_gelu,
                      self.full_layer_layer_norm, 0.0, getattr(self, "fastformer_backend", None))


def _fused_esm_layer_forward(self, hidden_states, attention_mask=None, encoder_hidden_states=None,
                             encoder_attention_mask=None, position_embeddings=None, **kwargs):
    """ESM's pre-norm layer (ESM-2): x = h + dropout(dense(attn(attn_norm(h)))); out = output(
    gelu(intermediate.dense(LayerNorm(x))), x), the first residual add with its dropout fused into
    the FFN's LayerNorm (one pass that returns x and its norm) and intermediate.dense's bias into
    the GELU (``fastformer_gelu``; None: another activation, the intermediate runs as is). The
    attention's pre-norm and the last residual add run as they are."""
    if encoder_hidden_states is not None or not _as_optimized(self, "esm layer"):
        return _original_forward(self, hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask,
                                 position_embeddings, **kwargs)
    backend, attention = getattr(self, "fastformer_backend", None), self.attention
    attention_output, _ = attention.self(attention.LayerNorm(hidden_states), attention_mask=attention_mask,
                                         position_embeddings=position_embeddings, **kwargs)
    output, norm = attention.output, self.LayerNorm
    dropout_p = output.dropout.p if output.dropout.training else 0.0
    normed, x = fastformer.residual_layer_norm(output.dense(attention_output), hidden_states, norm.weight, norm.bias,
                                               norm.eps, dropout_p, backend=backend)
    if self.fastformer_gelu is None:
        return self.output(self.intermediate(normed), x)
    return self.output(linear_bias_gelu(normed, self.intermediate.dense, self.fastformer_gelu, backend=backend), x)


def _esm_gelu(layer):
    """ESM's FFN activation: the module-level ``gelu`` that EsmIntermediate's forward calls."""
    return getattr(inspect.getmodule(type(layer.intermediate)), "gelu", None)


def _fused_mpnet_attention_forward(self, hidden_states, attention_mask=None, position_bias=None,
                                   output_attentions=False, **kwargs):
    """MPNet's self-attention: softmax(q k^T / sqrt(d) + position_bias + mask) v, then o, with the
    bias and the model's mask as one float mask of ``fastformer.attention``. output_attentions
    (the weights) takes the original forward."""
    if output_attentions or not _as_optimized(self, "mpnet attention"):
        return _original_forward(self, hidden_states, attention_mask, position_bias, output_attentions, **kwargs)
    heads, head_dim = self.num_attention_heads, self.attention_head_size
    shape = (*hidden_states.shape[:-1], heads, head_dim)
    q, k, v = (projection(hidden_states).view(shape).transpose(1, 2) for projection in (self.q, self.k, self.v))
    mask = attention_mask
    if position_bias is not None:
        mask = _with_position_bias(position_bias, attention_mask, False, q.shape[2], k.shape[2])
    out = fastformer.attention(q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.dropout.training else 0.0,
                               scale=1.0 / math.sqrt(head_dim), backend=getattr(self, "fastformer_backend", None))
    return (self.o(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], heads * head_dim)),)


def _fused_mpnet_attention_block_forward(self, hidden_states, attention_mask=None, position_bias=None,
                                         output_attentions=False, **kwargs):
    """MPNet's attention block: LayerNorm(dropout(attn(h)) + h), the last three steps fused."""
    if not _as_optimized(self, "mpnet attention block"):
        return _original_forward(self, hidden_states, attention_mask, position_bias, output_attentions, **kwargs)
    attention = self.attn(hidden_states, attention_mask, position_bias, output_attentions=output_attentions)
    out = _residual_norm(attention[0], hidden_states, self.LayerNorm, self.dropout,
                         getattr(self, "fastformer_backend", None))
    return (out, *attention[1:])


def _fused_deberta_attention_forward(self, hidden_states, attention_mask, output_attentions=False, query_states=None,
                                     relative_pos=None, rel_embeddings=None):
    """DeBERTa-v2/v3's disentangled self-attention: softmax(q k^T / sqrt(d s) + c2p + p2c) v, s = 1
    + the number of position terms. The position terms (transformers' own code, from q, k and the
    relative embeddings) with -inf on the masked keys make the float mask of
    ``fastformer.attention`` (without them: the boolean mask). A row with no key (a padded query)
    gets the mean of the values, as in the original (there before attention dropout), which fills
    all its scores with the same lowest value, so no gradient reaches q, k or the position terms
    from it; the padded positions matter where a convolution follows the first layer
    (conv_kernel_size). output_attentions and query_states (the enhanced mask decoder of
    pretraining) take the original forward."""
    if output_attentions or query_states is not None or not _as_optimized(self, "deberta attention"):
        return _original_forward(self, hidden_states, attention_mask, output_attentions, query_states, relative_pos,
                                 rel_embeddings)
    heads = self.num_attention_heads
    query_layer, key_layer, value_layer = (self.transpose_for_scores(projection(hidden_states), heads)
                                           for projection in (self.query_proj, self.key_proj, self.value_proj))
    scale_factor = 1 + ("c2p" in self.pos_att_type) + ("p2c" in self.pos_att_type)
    length, head_dim = query_layer.shape[-2], query_layer.shape[-1]
    q, k, v = (t.view(-1, heads, length, head_dim) for t in (query_layer, key_layer, value_layer))
    keep = attention_mask.bool()
    mask = keep
    if self.relative_attention:
        bias = self.disentangled_attention_bias(query_layer, key_layer, relative_pos,
                                                self.pos_dropout(rel_embeddings), scale_factor)
        mask = bias.view(-1, heads, length, length).masked_fill(~keep, float("-inf"))
    scale = _deberta_scale(self.attention_head_size, scale_factor)
    out = fastformer.attention(q, k, v, attn_mask=mask, dropout_p=self.dropout.p if self.dropout.training else 0.0,
                               scale=scale, backend=getattr(self, "fastformer_backend", None))
    out = torch.where(keep.any(-1, keepdim=True), out, v.mean(-2, keepdim=True))
    return out.transpose(1, 2).reshape(*hidden_states.shape[:-1], heads * head_dim), None


_DEBERTA_SCALES = {}  # (head size, scale factor) -> _deberta_scale's value


def _deberta_scale(head_size, scale_factor) -> float:
    """1 / sqrt(d s) as transformers' scaled_size_sqrt computes it: in float32 by torch on the CPU
    (whose sqrt may differ by an ulp from the correctly rounded one: sqrt(42)). Computed once per
    size, when optimize's behaviour check first runs the block, so that a compiled forward reads a
    Python float: a tensor's .item() in it would break the graph at every layer."""
    key = (head_size, scale_factor)
    if key not in _DEBERTA_SCALES:
        _DEBERTA_SCALES[key] = 1.0 / torch.sqrt(torch.tensor(head_size * scale_factor, dtype=torch.float32)).item()
    return _DEBERTA_SCALES[key]


# The Hugging Face blocks optimize fuses (see _hf_block_kind).
_HF_BLOCKS = {
    "output": _HFBlock(("self", "hidden_states", "input_tensor"),
                       {"dense": nn.Linear, "LayerNorm": nn.LayerNorm, "dropout": nn.Dropout}, (),
                       _fused_output_forward, ("LayerNorm",), "dropout + residual + LayerNorm fused",
                       reads=("LayerNorm", "dropout")),
    "intermediate": _HFBlock(("self", "hidden_states"), {"dense": nn.Linear}, ("intermediate_act_fn",),
                             _fused_intermediate_forward, (), "bias + GELU fused", activation="intermediate_act_fn"),
    # DistilBERT's block in transformers 5 (older versions take other arguments: left alone).
    "distilbert block": _HFBlock(
        ("self", "hidden_states", "attention_mask", "kwargs"),
        {"sa_layer_norm": nn.LayerNorm, "output_layer_norm": nn.LayerNorm, "ffn.lin1": nn.Linear,
         "ffn.lin2": nn.Linear, "ffn.dropout": nn.Dropout}, ("attention", "ffn", "ffn.activation"),
        _fused_distilbert_block_forward, ("sa_layer_norm", "output_layer_norm"),
        "both residual adds + LayerNorms fused", reads=("sa_layer_norm", "output_layer_norm", "ffn", "ffn.dropout"),
        model_class=("modeling_distilbert", "TransformerBlock"), width="ffn.lin1", activation="ffn.activation",
        chunking="ffn.chunk_size_feed_forward"),
    "mpnet attention": _HFBlock(
        ("self", "hidden_states", "attention_mask", "position_bias", "output_attentions", "kwargs"),
        {"q": nn.Linear, "k": nn.Linear, "v": nn.Linear, "o": nn.Linear, "dropout": nn.Dropout}, (),
        _fused_mpnet_attention_forward, (), "attention with its relative position bias -> fastformer.attention",
        reads=("dropout",), model_class=("modeling_mpnet", "MPNetSelfAttention"), width="q"),
    "mpnet attention block": _HFBlock(
        ("self", "hidden_states", "attention_mask", "position_bias", "output_attentions", "kwargs"),
        {"LayerNorm": nn.LayerNorm, "dropout": nn.Dropout}, ("attn",), _fused_mpnet_attention_block_forward,
        ("LayerNorm",), "dropout + residual + LayerNorm fused", reads=("LayerNorm", "dropout"),
        model_class=("modeling_mpnet", "MPNetAttention"), width="attn.q"),
    "deberta attention": _HFBlock(
        ("self", "hidden_states", "attention_mask", "output_attentions", "query_states", "relative_pos",
         "rel_embeddings"),
        {"query_proj": nn.Linear, "key_proj": nn.Linear, "value_proj": nn.Linear, "dropout": nn.Dropout},
        ("pos_dropout", "pos_key_proj", "pos_query_proj"), _fused_deberta_attention_forward, (),
        "disentangled attention (position terms as its float mask) -> fastformer.attention", reads=("dropout",),
        model_class=("modeling_deberta_v2", "DisentangledSelfAttention"), width="query_proj"),
    # ALBERT's attention and layer in transformers 5 (older versions take other arguments: left
    # alone). The layer's `dropout` is unused by its own forward too.
    "albert attention": _HFBlock(
        ("self", "hidden_states", "attention_mask", "kwargs"),
        {"query": nn.Linear, "key": nn.Linear, "value": nn.Linear, "dense": nn.Linear, "LayerNorm": nn.LayerNorm,
         "attention_dropout": nn.Dropout, "output_dropout": nn.Dropout}, (), _fused_albert_attention_forward,
        ("LayerNorm",), "dropout + residual + LayerNorm fused", reads=("LayerNorm", "attention_dropout",
                                                                       "output_dropout"),
        model_class=("modeling_albert", "AlbertAttention"), width="query"),
    "albert layer": _HFBlock(
        ("self", "hidden_states", "attention_mask", "kwargs"),
        {"ffn": nn.Linear, "ffn_output": nn.Linear, "full_layer_layer_norm": nn.LayerNorm},
        ("attention", "activation", "dropout"), _fused_albert_layer_forward, ("full_layer_layer_norm",),
        "residual add + LayerNorm fused", reads=("full_layer_layer_norm",),
        model_class=("modeling_albert", "AlbertLayer"), width="ffn", activation="activation",
        chunking="chunk_size_feed_forward"),
    "nomic bert layer": _HFBlock(
        ("self", "hidden_states", "attention_mask", "position_embeddings", "kwargs"),
        {"post_attention_layernorm": nn.LayerNorm, "post_mlp_layernorm": nn.LayerNorm,
         "post_attention_dropout": nn.Dropout, "post_mlp_dropout": nn.Dropout}, ("self_attn", "mlp"),
        _fused_nomic_bert_layer_forward, ("post_attention_layernorm", "post_mlp_layernorm"),
        "both residual adds (with their dropout) + LayerNorms fused",
        reads=("post_attention_layernorm", "post_mlp_layernorm", "post_attention_dropout", "post_mlp_dropout"),
        model_class=("modeling_nomic_bert", "NomicBertLayer"), width="self_attn.q_proj", rotary="self_attn.head_dim"),
    # ModernBERT's layer in transformers 5 (older versions take other arguments: left alone).
    "modernbert layer": _HFBlock(
        ("self", "hidden_states", "attention_mask", "position_embeddings", "kwargs"), {"mlp_norm": nn.LayerNorm},
        ("attn_norm", "attn", "mlp"), _fused_modernbert_layer_forward, ("mlp_norm",),
        "residual add + the MLP's LayerNorm fused", reads=("mlp_norm",),
        model_class=("modeling_modernbert", "ModernBertEncoderLayer"), width="mlp.Wi", rotary="attn.head_dim"),
    # ESM's layer (ESM-2, pre-norm) in transformers 5; with cross-attention (a decoder) it has
    # another child and is left alone.
    "esm layer": _HFBlock(
        ("self", "hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask",
         "position_embeddings", "kwargs"),
        {"attention.LayerNorm": nn.LayerNorm, "attention.output.dense": nn.Linear,
         "attention.output.dropout": nn.Dropout, "LayerNorm": nn.LayerNorm, "intermediate.dense": nn.Linear},
        ("attention", "attention.self", "attention.output", "intermediate", "output"), _fused_esm_layer_forward,
        ("LayerNorm",), "the attention's residual add (with its dropout) + the FFN's LayerNorm fused",
        reads=("attention", "attention.output", "attention.output.dropout", "LayerNorm", "intermediate"),
        model_class=("modeling_esm", "EsmLayer"), width="intermediate.dense", activation=_esm_gelu,
        chunking="chunk_size_feed_forward", rotary="attention.self.attention_head_size"),
}
_FFN_KINDS = tuple(kind for kind, block in _HF_BLOCKS.items() if block.activation)  # blocks with an FFN activation


# --------------------------------------------------------------------------------------------
# verify=True
# --------------------------------------------------------------------------------------------
def _relative_error(actual, expected) -> float:
    expected, actual = expected.double(), actual.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def _mismatch(actual, expected) -> str | None:
    """"relative error X > tolerance" when ``actual`` is off by more than DESIGN.md allows, else None."""
    tol = _VERIFY_TOL.get(expected.dtype, 2e-3)
    error = _relative_error(actual, expected)
    return None if math.isfinite(error) and error <= tol else f"relative error {error:.3g} > {tol:.3g}"


class _VerifyMismatch(RuntimeError):
    pass


def _check(name, actual, expected):
    mismatch = _mismatch(actual, expected)
    if mismatch is not None:
        raise _VerifyMismatch(f"optimize(verify=True): {name or '(model)'} differs from the original: {mismatch}")


def _private_generator(device) -> torch.Generator:
    """Random inputs for checks, drawn without touching the user's random state."""
    return torch.Generator(device=device).manual_seed(0)


@contextlib.contextmanager
def _pytorch_fast_path_off():
    """PyTorch's inference fast path of nn.TransformerEncoderLayer / nn.MultiheadAttention (eval,
    no grad) deviates from their own definition (it takes any nn.GELU for the exact one, e.g.):
    verify against the definition, which the fast modules follow."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def _verify_module(name, original, fast):
    parameter = next(fast.parameters())
    like = dict(dtype=parameter.dtype, device=parameter.device, generator=_private_generator(parameter.device))
    batch, length = 2, 7
    with _evaluating(original, fast), torch.no_grad(), _pytorch_fast_path_off():  # no dropout
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
    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    vocab_size = getattr(config, "vocab_size", None) or config.encoder.vocab_size
    if encoder_decoder and hasattr(config, "decoder"):
        vocab_size = min(vocab_size, config.decoder.vocab_size)
    input_ids = torch.randint(0, vocab_size, (2, 9), device=parameter.device,
                              generator=_private_generator(parameter.device))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if encoder_decoder:  # T5, BART, EncoderDecoderModel: the decoder reads the same tokens
        inputs["decoder_input_ids"] = input_ids
    with _evaluating(original, model), torch.no_grad():  # no dropout
        expected = original(**inputs)
        actual = model(**inputs)
    actual, expected = actual[0], expected[0]
    if expected.dim() == 3 and expected.shape[:2] == input_ids.shape:  # per token: padding undefined
        keep = attention_mask.bool()
        actual, expected = actual[keep], expected[keep]
    _check("(model)", actual, expected)  # else one output per sequence (a classifier's logits)
