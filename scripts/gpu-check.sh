#!/usr/bin/env bash
# What to run on a machine with NVIDIA GPUs to check alignloop's GPU paths and measure the `small` preset.
#
#   scripts/gpu-check.sh                      # the checks below, 200 pretraining steps each (minutes)
#   scripts/gpu-check.sh --max-steps 100 --max-seconds 120 --recipe
#   scripts/gpu-check.sh --dry-run            # the same script on the CPU (micro preset, gloo, 5 steps)
#
# Checks, each `alignloop pretrain --preset small` on the same data, seed and global batch:
#   bf16          one GPU, bf16 autocast (the reference the others' loss is compared with)
#   bf16-compile  one GPU, --compile
#   ddp           torchrun on every visible GPU (nccl), DDP
#   fsdp          torchrun on every visible GPU, FSDP2 with bf16 mixed precision (--fsdp)
#   ddp-compile, fsdp-compile   the same with --compile
#   micro-recipe  `alignloop run --preset micro` under torchrun on every GPU: evaluation, sampling, the reward
#                 model and PPO on CUDA and nccl, end to end (about a minute)
#   recipe        with --recipe: `alignloop run --preset small` under torchrun, its wall time (hours)
# The torchrun checks need 2 GPUs or more (skipped on one). A check fails when its command fails or its
# loss ends more than 5% from bf16's. Figures: OUT/results.md and OUT/results.json (default OUT:
# runs/gpu-check), one log per check in OUT/logs/. Exit 0: all passed; 1: a check failed; 2: bad
# arguments; 3: no CUDA.
#
# Python: $PYTHON (default: python3) with alignloop installed and a CUDA build of torch (scripts/venv.sh
# installs the CPU build: use your own environment here).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "gpu-check: $*" >&2; exit 2; }
PY="${PYTHON:-python3}"
OUT=runs/gpu-check
STEPS=""
MAX_SECONDS=0
RECIPE=0
DRY=0
NPROC=""
while [ $# -gt 0 ]; do
  case "$1" in
    --max-steps) [ $# -ge 2 ] || die "--max-steps needs a number"; STEPS=$2; shift 2 ;;
    --max-seconds) [ $# -ge 2 ] || die "--max-seconds needs a number"; MAX_SECONDS=$2; shift 2 ;;
    --out) [ $# -ge 2 ] || die "--out needs a folder"; OUT=$2; shift 2 ;;
    --nproc) [ $# -ge 2 ] || die "--nproc needs a number"; NPROC=$2; shift 2 ;;
    --recipe) RECIPE=1; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument $1 (--help lists them)" ;;
  esac
done
[[ -z "$STEPS" || "$STEPS" =~ ^[1-9][0-9]*$ ]] || die "--max-steps wants a whole number > 0, not $STEPS"
[[ "$MAX_SECONDS" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--max-seconds wants a number of seconds, not $MAX_SECONDS"
[[ -z "$NPROC" || "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--nproc wants a whole number > 0, not $NPROC"

if [ "$DRY" = 1 ]; then  # the script's own paths on the CPU: argument handling, torchrun with gloo, the summary
  PRESET=micro DEVICE=cpu DTYPE=float32 STEPS=${STEPS:-5} NPROC=${NPROC:-2}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  mkdir -p "$OUT"
  "$PY" scripts/gpu_check.py env "$OUT/env.json" >/dev/null
else
  PRESET=small DEVICE=cuda DTYPE=bfloat16 STEPS=${STEPS:-200}
  mkdir -p "$OUT"
  if ! GPUS=$("$PY" scripts/gpu_check.py env "$OUT/env.json" --require-cuda); then
    exit 3
  fi
  NPROC=${NPROC:-$GPUS}
  [ "$NPROC" -le "$GPUS" ] || die "--nproc $NPROC but only $GPUS GPUs are visible"
fi
export ALIGNLOOP_QUIET=1  # no progress bars in the logs
mkdir -p "$OUT/logs"
: >"$OUT/checks.jsonl"
DATA="$OUT/data"
echo "gpu-check: $PRESET preset on $DEVICE, $STEPS steps$([ "$MAX_SECONDS" != 0 ] && echo " or $MAX_SECONDS s") per check, up to $NPROC processes → $OUT"

# The world and tokenizer every check trains on (made once, kept between runs of this script).
if [ ! -f "$DATA/tokenizer/tokenizer.json" ]; then
  for stage in world tokenizer; do
    "$PY" -m alignloop "$stage" --preset "$PRESET" --out "$DATA" >"$OUT/logs/data-$stage.log" 2>&1 \
      || { echo "gpu-check: alignloop $stage failed: see $OUT/logs/data-$stage.log" >&2; exit 1; }
  done
fi

launcher() {  # the command line of N processes: torchrun for more than one
  if [ "$1" -gt 1 ]; then echo "$PY -m torch.distributed.run --standalone --nproc_per_node $1 -m alignloop"
  else echo "$PY -m alignloop"; fi
}

record() {  # name nproc what status wall_s stage run (stage and run: folders within OUT)
  printf '{"name": "%s", "nproc": %s, "what": "%s", "status": "%s", "wall_s": %s, "stage": "%s", "run": "%s"}\n' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" >>"$OUT/checks.jsonl"
}

run_check() {  # name nproc what run-dir stage-dir (both within OUT) -- alignloop arguments
  local name=$1 nproc=$2 what=$3 run=$4 stage=$5 status=ok start
  shift 6
  rm -rf "${OUT:?}/$run"
  echo "  $name: $what"
  start=$(date +%s)
  # shellcheck disable=SC2046  # the launcher's words are meant to split
  if ! $(launcher "$nproc") "$@" >"$OUT/logs/$name.log" 2>&1; then
    status=failed
    echo "    failed: $OUT/logs/$name.log" >&2
  fi
  record "$name" "$nproc" "$what" "$status" "$(( $(date +%s) - start ))" "$stage" "$run"
}

skip() {  # name nproc what why
  echo "  $1: skipped ($4)"
  record "$1" "$2" "$3" "skipped: $4" null "" ""
}

pretrain_check() {  # name nproc what -- extra pretrain flags
  local name=$1 nproc=$2 what=$3
  shift 4
  run_check "$name" "$nproc" "$what" "$name" "$name/pretrain" -- pretrain --preset "$PRESET" \
    --data "$DATA/world/corpus.jsonl" --tokenizer "$DATA/tokenizer" --out "$OUT/$name" --device "$DEVICE" \
    --dtype "$DTYPE" --max-steps "$STEPS" --max-seconds "$MAX_SECONDS" --eval-every 1000000 \
    --checkpoint-every 1000000 --sample-every 0 "$@"
}

precision=$([ "$DTYPE" = bfloat16 ] && echo "bf16 autocast" || echo "fp32")
pretrain_check bf16 1 "one process, $precision" --
if [ "$DRY" = 1 ]; then
  skip bf16-compile 1 "one process, --compile" "dry run: compiling on the CPU takes minutes"
else
  pretrain_check bf16-compile 1 "one process, $precision, --compile" -- --compile
fi
if [ "$NPROC" -ge 2 ]; then
  pretrain_check ddp "$NPROC" "torchrun, DDP" --
  pretrain_check fsdp "$NPROC" "torchrun, FSDP2$([ "$DTYPE" = bfloat16 ] && echo ", bf16 mixed precision")" -- --fsdp
  if [ "$DRY" = 1 ]; then
    skip ddp-compile "$NPROC" "torchrun, DDP, --compile" "dry run"
    skip fsdp-compile "$NPROC" "torchrun, FSDP2, --compile" "dry run"
  else
    pretrain_check ddp-compile "$NPROC" "torchrun, DDP, --compile" -- --compile
    pretrain_check fsdp-compile "$NPROC" "torchrun, FSDP2, --compile" -- --fsdp --compile
  fi
else
  for name in ddp fsdp ddp-compile fsdp-compile; do skip "$name" 1 "torchrun" "one GPU: torchrun needs 2 or more"; done
fi
run_check micro-recipe "$NPROC" "alignloop run --preset micro (every stage)" micro-recipe "" -- \
  run --preset micro --device "$DEVICE" --out "$OUT/micro-recipe"
if [ "$RECIPE" = 1 ]; then
  run_check recipe "$NPROC" "alignloop run --preset $PRESET (every stage)" recipe "" -- \
    run --preset "$PRESET" --device "$DEVICE" --out "$OUT/recipe"
fi

exec "$PY" scripts/gpu_check.py summarise "$OUT"
