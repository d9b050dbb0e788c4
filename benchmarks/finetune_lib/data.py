"""IMDB reviews: loading (CSV folder, aclImdb folder, Hugging Face, synthetic), tokenizer, batches.

Every source gives the same thing: ``{"train": Split, "test": Split}`` with the review texts as
written and labels 1 = positive, 0 = negative. Texts are tokenized once into lists of ids; batches
are lists of indices (length-bucketed or random), padded per batch to their longest review.
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import hashlib
import json
import lzma
import math
import os
import random
import re
import statistics
import zlib
from pathlib import Path
from typing import Sequence

import torch

HOW_TO_GET_DATA = """\
No IMDB data found. Give one of:
  --data PATH   a folder holding train.csv and test.csv (or .csv.gz, .csv.xz, .csv.bz2),
                columns text,label
                (label 1 = positive, 0 = negative), or the aclImdb folder of the original
                archive aclImdb_v1.tar.gz (https://ai.stanford.edu/~amaas/data/sentiment/),
                with train/pos, train/neg, test/pos, test/neg
  --data hf     the Hugging Face "imdb" data set (needs `pip install datasets` and internet)
  --synthetic   generated stand-in reviews: measures speed only, accuracies mean nothing
Without --data, the folder named by the environment variable FASTFORMER_IMDB_DATA is used,
then ./aclImdb if it exists."""

DATA_ENV_VAR = "FASTFORMER_IMDB_DATA"

# Compressed CSV files and how to open them; plain ".csv" last.
CSV_SUFFIXES = {".csv.gz": gzip.open, ".csv.xz": lzma.open, ".csv.bz2": bz2.open, ".csv": open}
_CSV_NAMES = ".csv[" + "|".join(suffix[4:] for suffix in CSV_SUFFIXES if suffix != ".csv") + "]"
# What a damaged or mislabelled archive raises while it is read.
_ARCHIVE_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)

# "<br />" line breaks (and their variants, any case) are markup, not words.
BR_PATTERN = r"(?i)<br\s*/?>"


class DataError(RuntimeError):
    """The data could not be found or read; the message says what to do."""


@dataclasses.dataclass
class Split:
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, size: int | None, seed: int) -> "Split":
        """``size`` reviews drawn at random (the files are sorted by label); all when None."""
        if size is None or size >= len(self):
            return self
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:size].tolist()
        return Split([self.texts[i] for i in order], [self.labels[i] for i in order])


# --------------------------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------------------------
def resolve_source(data: str | None) -> str:
    """The ``--data`` value, or the default location; raises :class:`DataError` if there is none."""
    if data:
        return data
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        if env != "hf" and not Path(env).expanduser().exists():  # named as the user gave it
            raise DataError(f"{DATA_ENV_VAR}={env}: no such file or folder.\n\n{HOW_TO_GET_DATA}")
        return env
    if Path("aclImdb").is_dir():
        return "aclImdb"
    raise DataError(HOW_TO_GET_DATA)


def load_imdb(source: str) -> tuple[dict[str, Split], str]:
    """``({"train": Split, "test": Split}, description)`` from a folder or "hf"."""
    if source == "hf":
        return _load_hugging_face(), "Hugging Face datasets: imdb"
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"--data {source}: no such file or folder.\n\n{HOW_TO_GET_DATA}")
    csv_files = {split: _find_csv(path, split) for split in ("train", "test")}
    if all(csv_files.values()):
        splits = {split: _read_csv(file) for split, file in csv_files.items()}
        names = ", ".join(file.name for file in csv_files.values())
        return splits, f"CSV files ({names})"
    for root in (path, path / "aclImdb"):
        if all((root / split / label).is_dir() for split in ("train", "test") for label in ("pos", "neg")):
            return {split: _read_acl_folder(root / split) for split in ("train", "test")}, "aclImdb folder"
    found = [file.name for file in csv_files.values() if file]
    missing = [f"{split}{_CSV_NAMES}" for split, file in csv_files.items() if not file]
    half = f" (it has {', '.join(found)} but no {', '.join(missing)})" if found else ""
    raise DataError(f"--data {source}: found neither train.csv + test.csv (plain or compressed) nor an "
                    f"aclImdb folder (train/pos, train/neg, test/pos, test/neg) there{half}.\n\n{HOW_TO_GET_DATA}")


def _find_csv(folder: Path, split: str) -> Path | None:
    """``split`` + one of :data:`CSV_SUFFIXES` in ``folder``, in that order; in another letter
    case if it is the only such file (two that differ only in case: a DataError)."""
    if not folder.is_dir():
        return None
    files = [file for file in folder.iterdir() if file.is_file()]
    for name in (split + suffix for suffix in CSV_SUFFIXES):
        if (folder / name).is_file():
            return folder / name
        alike = sorted(file.name for file in files if file.name.lower() == name)
        if len(alike) > 1:
            raise DataError(f"{folder}: {' and '.join(alike)} differ only in letter case: which is the "
                            f"{split} split?")
        if alike:
            return folder / alike[0]
    return None


_LABELS = {"1": 1, "0": 0, "pos": 1, "neg": 0, "positive": 1, "negative": 0}


def _label(value: str | None, where: str) -> int:
    if value is None:
        raise DataError(f"{where}: no label field")
    label = _LABELS.get(value.strip().lower())
    if label is None:
        raise DataError(f"{where}: label must be 1/0 (or pos/neg, positive/negative), got {value!r}")
    return label


def _read_csv(path: Path) -> Split:
    suffix, opener = next((s, o) for s, o in CSV_SUFFIXES.items() if path.name.lower().endswith(s))
    texts, labels = [], []
    csv.field_size_limit(2**27)
    # utf-8-sig: spreadsheet programs start their UTF-8 CSV files with a byte-order mark
    with opener(path, "rt", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            missing = {"text", "label"} - set(reader.fieldnames or ())
            if missing:
                raise DataError(f"{path.name}: needs the columns text,label; missing {sorted(missing)} "
                                f"(columns: {reader.fieldnames})")
            for row in reader:
                where = f"{path.name} line {reader.line_num}"
                if row["text"] is None:
                    raise DataError(f"{where}: no text field")
                texts.append(row["text"])
                labels.append(_label(row["label"], where))
        except (DataError, UnicodeDecodeError) as error:
            if suffix != ".csv":
                _check_archive(f, path)  # a damaged archive shows as a bad row before its checksum
            if isinstance(error, DataError):
                raise
            raise DataError(f"{path.name}: not UTF-8 text ({error}); save it as UTF-8") from None
        except _ARCHIVE_ERRORS as error:  # e.g. a truncated or mislabelled archive
            raise DataError(_damaged(path, error)) from None
    if not texts:
        raise DataError(f"{path.name}: no rows")
    return Split(texts, labels)


def _damaged(path: Path, error: BaseException) -> str:
    return f"{path.name}: cannot be read as {path.suffix[1:]}, damaged? ({type(error).__name__}: {error})"


def _check_archive(f, path: Path) -> None:
    """Read the rest of an open compressed file: its checksum, at the end, tells a damaged archive
    (raised as such) from a well-formed file whose content is wrong (nothing raised)."""
    raw = getattr(f, "buffer", f)  # bytes: a decoding error would stop the read before the end
    try:
        while raw.read(1 << 20):
            pass
    except _ARCHIVE_ERRORS as error:
        raise DataError(_damaged(path, error)) from None


def _read_acl_folder(folder: Path) -> Split:
    texts, labels = [], []
    for name, label in (("neg", 0), ("pos", 1)):
        for file in sorted((folder / name).glob("*.txt")):
            try:
                texts.append(file.read_text(encoding="utf-8"))
            except UnicodeDecodeError as error:
                raise DataError(f"{file}: not UTF-8 text ({error})") from None
            labels.append(label)
    if not texts:
        raise DataError(f"{folder}: no *.txt reviews in pos/ and neg/")
    if len(set(labels)) < 2:
        raise DataError(f"{folder}: reviews of one class only (pos/ or neg/ is empty)")
    return Split(texts, labels)


def _load_hugging_face() -> dict[str, Split]:
    try:
        import datasets
    except ImportError as error:
        raise DataError(f"--data hf needs the datasets package (pip install datasets): {error}\n\n"
                        f"{HOW_TO_GET_DATA}") from None
    try:
        loaded = datasets.load_dataset("imdb")
    except Exception as error:  # no internet, hub down, ...
        raise DataError(f"--data hf: could not load the Hugging Face data set 'imdb' "
                        f"({type(error).__name__}: {error}).\n\n{HOW_TO_GET_DATA}") from None
    return {split: Split(list(loaded[split]["text"]), [int(x) for x in loaded[split]["label"]])
            for split in ("train", "test")}


# --------------------------------------------------------------------------------------------
# synthetic stand-in
# --------------------------------------------------------------------------------------------
def synthetic_imdb(train_size: int, test_size: int, seed: int) -> dict[str, Split]:
    """Generated reviews with IMDB's length distribution (median ~175 words, long tail).

    Filler words plus a few sentiment words whose balance decides the label, so a model can learn
    something; the point is to measure speed without the real data.
    """
    rng = random.Random(seed)
    filler = [f"w{i}" for i in range(3000)]
    good = ["great", "wonderful", "loved", "superb", "moving", "brilliant"]
    bad = ["awful", "boring", "worst", "waste", "dull", "terrible"]

    def review() -> tuple[str, int]:
        words = min(1200, max(10, int(rng.lognormvariate(math.log(175), 0.65))))
        label = rng.randrange(2)
        cues = max(1, words // 25)
        major, minor = (good, bad) if label else (bad, good)
        tokens = [rng.choice(filler) for _ in range(words - cues)]
        tokens += [rng.choice(major if rng.random() < 0.8 else minor) for _ in range(cues)]
        rng.shuffle(tokens)
        for i in range(0, len(tokens), 40):  # a few line breaks, as in the real reviews
            tokens[i] += " <br /><br />"
        return " ".join(tokens), label

    splits = {}
    for split, size in (("train", train_size), ("test", test_size)):
        pairs = [review() for _ in range(size)]
        splits[split] = Split([t for t, _ in pairs], [y for _, y in pairs])
    return splits


# --------------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------------
def _tokenizers():
    try:
        import tokenizers
    except ImportError as error:
        raise SystemExit(f"the fine-tuning benchmark needs the tokenizers package "
                         f"(pip install tokenizers): {error}") from None
    return tokenizers


PAD, UNK = "[PAD]", "[UNK]"


def train_wordpiece(texts: Sequence[str], vocab_size: int, max_length: int):
    """A lower-cased WordPiece tokenizer trained on ``texts`` (``<br />`` stripped, accents removed).

    Pad id 0, unknown id 1; encodings are truncated to ``max_length`` tokens.
    """
    tk = _tokenizers()
    tokenizer = tk.Tokenizer(tk.models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
    tokenizer.normalizer = tk.normalizers.Sequence([
        tk.normalizers.Replace(tk.Regex(BR_PATTERN), " "),
        tk.normalizers.NFD(), tk.normalizers.Lowercase(), tk.normalizers.StripAccents()])
    tokenizer.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = tk.decoders.WordPiece()
    trainer = tk.trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=2,
                                           special_tokens=[PAD, UNK], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    return tokenizer


def vocab_digest(tokenizer) -> str:
    """SHA-256 of the vocabulary (token -> id): equal for two runs exactly when they tokenized alike."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def tokenizer_from_json(text: str):
    return _tokenizers().Tokenizer.from_str(text)


def pretrained_tokenizer(path: str | os.PathLike, max_length: int):
    """A model's own ``tokenizer.json`` (e.g. MiniLM's), truncating to ``max_length`` with its
    special tokens, no padding (batches pad themselves)."""
    tokenizer = _tokenizers().Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.no_padding()
    return tokenizer


def pad_id(tokenizer) -> int:
    token_id = tokenizer.token_to_id(PAD)
    return 0 if token_id is None else token_id


_BR = re.compile(BR_PATTERN)


def encode(tokenizer, texts: Sequence[str], strip_markup: bool = False) -> list[list[int]]:
    """Token ids of each text (batched in Rust). ``strip_markup`` removes ``<br />`` first (for
    pretrained tokenizers whose normalizer does not)."""
    if strip_markup:
        texts = [_BR.sub(" ", text) for text in texts]
    return [encoding.ids for encoding in tokenizer.encode_batch(list(texts))]


# --------------------------------------------------------------------------------------------
# batches
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Encoded:
    """A tokenized split: ids per review, labels, lengths."""

    ids: list[list[int]]
    labels: list[int]

    def __post_init__(self):
        self.lengths = [len(x) for x in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def without_empty(self) -> tuple["Encoded", int]:
        """The reviews that have a token (one with none, e.g. only ``<br />``, would be a row of
        padding only: NaN in PyTorch's attention), and how many were left out."""
        keep = [i for i, n in enumerate(self.lengths) if n > 0]
        return Encoded([self.ids[i] for i in keep], [self.labels[i] for i in keep]), len(self) - len(keep)


def make_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                 bucketing: bool = True, pool_batches: int = 50) -> list[list[int]]:
    """Shuffled batches of indices for one epoch.

    Bucketing: shuffle, cut into pools of ``pool_batches`` batches, sort each pool by length, cut
    it into batches, then shuffle the batches, so that reviews of similar length share a batch
    (little padding) while the order stays random. Without bucketing: plain random batches.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if bucketing:
        pool = batch_size * pool_batches
        pools = [sorted(order[i:i + pool], key=lambda j: lengths[j]) for i in range(0, len(order), pool)]
        order = [j for p in pools for j in p]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches sorted by length (evaluation: fastest, order does not matter)."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def shard(batches: list, rank: int, world_size: int, equal: bool = True) -> list:
    """Every ``world_size``-th batch from ``rank``; ``equal`` drops the tail so that every rank
    runs as many steps (DistributedDataParallel needs that in training)."""
    if world_size == 1:
        return batches
    if equal:
        batches = batches[:len(batches) - len(batches) % world_size]
    return batches[rank::world_size]


def collate(data: Encoded, indices: Sequence[int], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (B, L) int64, padding_mask (B, L) bool with True = padding, labels (B,))."""
    longest = max(data.lengths[i] for i in indices)
    ids = torch.full((len(indices), longest), pad, dtype=torch.long)
    padding = torch.ones((len(indices), longest), dtype=torch.bool)
    for row, i in enumerate(indices):
        n = data.lengths[i]
        ids[row, :n] = torch.tensor(data.ids[i], dtype=torch.long)
        padding[row, :n] = False
    return ids, padding, torch.tensor([data.labels[i] for i in indices], dtype=torch.long)


def length_summary(lengths: Sequence[int]) -> dict:
    values = sorted(lengths)
    if not values:
        return {}
    return {"reviews": len(values), "tokens": sum(values), "median": statistics.median(values),
            "mean": sum(values) / len(values), "max": values[-1]}

