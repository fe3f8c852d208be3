#!/usr/bin/env bash
# The GPU acceptance of the deformable attention op and the detector, as ONE command in five minutes.
#
#   bench/gpu_check.sh [OPTIONS] [OUTDIR]       # OUTDIR, else $OUT (the device tool's output folder)
#
# On the GPU machine (bare image: Python 3.12, torch 2.11, no registry), with the wheels made here by
# bench/gpu_wheels.sh carried along (the dependencies the image lacks AND the CUDA op built for sm_90
# against the image's torch, so nothing is compiled there):
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Steps, most important first (each time-boxed with `timeout`, each printing one verdict line and
# rewriting OUTDIR/gpu_results.md the moment it ends, so a cut run still returns what finished; a
# failing step does not stop the later ones). Planned device seconds in brackets (PLAN below):
#   install     [30, outside the budget] GPU, driver, Python, torch; pip install --no-index --no-deps
#               --target WORK/site of .whl/ (the op wheel included); every module imports
#   op          [30] the carried op: loads, was built for the device's sm_XY (else, and only else, it is
#               compiled there as a fallback, which the verdict says); fp32/fp16/bf16 against the float64
#               reference, forward and backward, on cuda:0 and on cuda:1 when there are two
#   msda        [45] bench/msda.py: the device's copy bandwidth measured (the floor), reference vs CUDA
#               fp32/fp16/bf16, encoder and decoder
#   throughput  [110] bench/train_throughput.py deformable_detr_r50 800x1066 batch 2, fp32 and bf16, ours
#               vs HF on the same weights (HF's attention path named), speed and peak memory
#   gpu-tests   [50] pytest -m gpu tests/
#   smoke       [65] 100-step stage=pretrain of deformable_detr_r50 (backbone_weights=null) on the built-in
#               data: fp32 / bf16 / bf16 + model.msda_low_precision side by side, CUDA op forced
# The steps after install share --budget seconds (300): each gets at most twice its plan, cut to what is
# left. Results: OUTDIR/gpu_results.md (verdicts, planned and measured seconds, figures), op.json,
# msda.json, throughput.json (each copied as its step ends), gpu_check.log (every step's log, appended as
# it ends), logs.tar.gz (at the end). Exit status: 0 when no step failed or missed, 1 when one failed, 2
# when targets were missed but nothing failed.
#
# --dry-run (on a CPU machine) rehearses every step: the install into a scratch target with a Python
# 3.12 and imports in an image stand-in venv, the op step with the carried op wheel loaded by the
# image's torch version (the venv bench/gpu_wheels.sh built it in) on the CPU, the GPU tests collected,
# and CPU rehearsals of msda, throughput and smoke (tiny sizes) that exercise the same scripts, JSON
# files and verdicts. It never compiles. See ops/README.md ("GPU check") and bench/RESULTS.md.
set -uo pipefail   # not -e: a failing step must not stop the later ones

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; cat <<'EOF'
Options:
  --dry-run          CPU rehearsal of every step (see above)
  --steps A,B,...    run only these steps (default: all, in the order above)
  --budget SECONDS   seconds for the steps after install (default 300; dry run: 3600, with the CPU time
                     boxes of PLAN)
  --plan             print the plan (planned device seconds and time boxes per step) and exit
  --keep-work        keep the work folder (default: removed after the results are written)
  -h, --help         this text
EOF
}

# step, planned device seconds, dry-run time box (CPU seconds on 2 cores). On the device a step's box is
# twice its plan, cut to the budget left; install is outside the budget (its box: INSTALL_BOX); the op
# step's box also holds FALLBACK_BUILD seconds for the build that runs only when the carried wheel fails.
PLAN="install 30 900
op 30 300
msda 45 300
throughput 110 900
gpu-tests 50 300
smoke 65 1200"
INSTALL_BOX=90
FALLBACK_BUILD=180

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_STEPS="$(echo "$PLAN" | cut -d' ' -f1 | tr '\n' ' ' | sed 's/ $//')"
DRY_RUN=0 STEPS="" BUDGET="" KEEP_WORK=0 OUTDIR="" PLAN_ONLY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --steps) STEPS="${2:?--steps needs a comma-separated list}"; shift ;;
    --steps=*) STEPS="${1#*=}" ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --plan) PLAN_ONLY=1 ;;
    --keep-work) KEEP_WORK=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    *) [ -z "$OUTDIR" ] || { echo "gpu_check.sh: one output folder only" >&2; exit 64; }; OUTDIR="$1" ;;
  esac
  shift
done
if [ "$DRY_RUN" = 1 ]; then BUDGET="${BUDGET:-3600}"; else BUDGET="${BUDGET:-300}"; fi
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget must be whole seconds, got $BUDGET" >&2; exit 64; }
STEPS="${STEPS:-${ALL_STEPS// /,}}"
for s in ${STEPS//,/ }; do
  [[ " $ALL_STEPS " == *" $s "* ]] || { echo "gpu_check.sh: unknown step $s (steps: $ALL_STEPS)" >&2; exit 64; }
done

selected() { [[ ",$STEPS," == *",$1,"* ]]; }
plan_of() { echo "$PLAN" | awk -v s="$1" -v col="$2" '$1 == s { print $col }'; }
box_of() {  # a step's time box before the budget cut
  if [ "$DRY_RUN" = 1 ]; then plan_of "$1" 3
  elif [ "$1" = install ]; then echo "$INSTALL_BOX"
  elif [ "$1" = op ]; then echo $((2 * $(plan_of op 2) + FALLBACK_BUILD))
  else echo $((2 * $(plan_of "$1" 2))); fi
}
print_plan() {
  local s p total=0
  echo "planned device time per step (seconds; install is outside the ${BUDGET} s budget):"
  for s in $ALL_STEPS; do
    selected "$s" || continue
    p=$(plan_of "$s" 2)
    [ "$s" = install ] || total=$((total + p))
    printf '  %-11s %4s s   time box %4s s\n' "$s" "$p" "$(box_of "$s")"
  done
  echo "planned total after install: ${total} s (budget ${BUDGET} s); the op step's box holds" \
    "$([ "$DRY_RUN" = 1 ] && echo "no build (the dry run never compiles)" || echo "${FALLBACK_BUILD} s for a fallback build")"
}
if [ "$PLAN_ONLY" = 1 ]; then print_plan; exit 0; fi

OUTDIR="${OUTDIR:-${OUT:-}}"
[ -n "$OUTDIR" ] || { echo "gpu_check.sh: give an output folder (argument or \$OUT)" >&2; exit 64; }
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$REPO"

export PY="${PYTHON:-python3}" REPO DRY_RUN WHEELS="${GPU_CHECK_WHEELS:-.whl}"  # the carried wheels
export GPU_CHECK_CACHE="${GPU_CHECK_CACHE:-${TMPDIR:-/tmp}/stepwise_gpu_check_cache}"
export WORK; WORK="$(mktemp -d "${TMPDIR:-/tmp}/stepwise_gpu_check.XXXXXX")"
export SITE="$WORK/site" BUILD="$WORK/build"
# Where the carried wheels are installed for the image's Python: SITE on the device; in the dry run a
# folder the CPU machine's own Python never sees (its packages are built for another Python and torch).
if [ "$DRY_RUN" = 1 ]; then export SITE312="$WORK/site312"; else export SITE312="$SITE"; fi
mkdir -p "$SITE" "$SITE312" "$BUILD/lib"
# The repository's packages, an op compiled here (the fallback only) and the carried wheels come first.
export PYTHONPATH="$REPO:$REPO/ops:$BUILD/lib:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "$DRY_RUN" = 1 ]; then export MAX_JOBS="${MAX_JOBS:-2}"; else export MAX_JOBS="${MAX_JOBS:-$(nproc)}"; fi
START=$(date +%s)
DEADLINE=""  # set when install ends: the budget covers the steps after it
DRY_FLAG=(); [ "$DRY_RUN" = 1 ] && DRY_FLAG=(--dry-run)
GPU_NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" \
  2>/dev/null || echo unknown)
echo "gpu_check: $( [ "$DRY_RUN" = 1 ] && echo "DRY RUN, " )GPU $GPU_NAME; steps $STEPS; work $WORK; results -> $OUTDIR"
print_plan
: >"$OUTDIR/gpu_check.log"

report() {  # the results so far -> OUTDIR/gpu_results.md
  "$PY" bench/gpu_results.py report --work "$WORK" --out "$OUTDIR" \
    --header "mode=$([ "$DRY_RUN" = 1 ] && echo "dry run (no GPU)" || echo "GPU check")" \
    --header "GPU=$GPU_NAME" --header "command=bench/gpu_check.sh ${DRY_FLAG[*]} --steps $STEPS --budget $BUDGET" \
    --header "commit=${GPU_CHECK_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "unknown (set GPU_CHECK_COMMIT)")}" \
    --header "elapsed=$(( $(date +%s) - START ))s$1" --order "${ALL_STEPS// /,}"
}

step_done() {  # NAME: the step's log, JSON and the report so far leave for OUTDIR at once
  local name="$1" f v
  { echo "===== $name"; cat "$WORK/$name.log" 2>/dev/null
    if [ "$name" = smoke ]; then
      for v in fp32 bf16 bf16_lowp; do
        [ -f "$WORK/smoke_$v.log" ] && { echo "===== smoke_$v"; tr '\r' '\n' <"$WORK/smoke_$v.log" | tail -n 60; }
      done
    fi; } >>"$OUTDIR/gpu_check.log"
  for f in op msda throughput; do [ -f "$WORK/$f.json" ] && cp "$WORK/$f.json" "$OUTDIR/"; done
  report " (after $name)" >/dev/null
}

skip_step() {  # NAME REASON
  selected "$1" || return 0
  "$PY" bench/gpu_results.py verdict --work "$WORK" --step "$1" --planned "$(plan_of "$1" 2)" --skip "$2"
  step_done "$1"
}

# run_step NAME FUNCTION: FUNCTION under `timeout` (the step's box, cut to the deadline), its output to
# WORK/NAME.log, then its verdict line, and the results so far in OUTDIR.
run_step() {
  local name="$1" fn="$2" box left t0 rc ms planned
  selected "$name" || return 0
  box=$(box_of "$name"); planned=$(plan_of "$name" 2)
  if [ -n "$DEADLINE" ]; then
    left=$((DEADLINE - $(date +%s) - 5))
    [ "$left" -lt 15 ] && { skip_step "$name" "no time left of the ${BUDGET}s budget"; return 0; }
    [ "$box" -gt "$left" ] && box=$left
  fi
  echo "--- $(date +%T) $name (planned ${planned}s, time box ${box}s)"
  t0=$(date +%s%N)
  timeout -k 10 "$box" bash -c "$fn" >"$WORK/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  "$PY" bench/gpu_results.py verdict --work "$WORK" --step "$name" --rc "$rc" --timeout "$box" --planned "$planned" \
    --seconds "$((ms / 1000)).$(printf %03d $((ms % 1000)))" "${DRY_FLAG[@]}"
  step_done "$name"
}

# ------------------------------------------------------------------------------------------ steps
find_python312() {
  local c
  for c in python3.12 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 \
           /usr/bin/python3.12 /usr/local/bin/python3.12; do
    "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$c"; return 0; }
  done
  return 1
}

# The image stand-in for the dry run: the cached Python 3.12 venv with the image's torch that
# bench/gpu_wheels.sh builds the op wheel in, plus the image's packages the wheels need (manifest.json
# 'from_image'), so that the dry run imports the carried wheels and loads the op as the GPU machine will.
image_standin_python() {
  local python pkgs
  python=$("$PY" bench/gpu_wheels.py venv) || return 1
  if [ ! -f "$(dirname "$python")/../.image-packages" ]; then
    pkgs=$("$PY" -c "import json; m = json.load(open('$WHEELS/manifest.json'))
print(' '.join(k.split(' (as ')[-1].rstrip(')') for k in m['from_image']))") || return 1
    "$python" -m pip install -q $pkgs >&2 && touch "$(dirname "$python")/../.image-packages" || return 1
  fi
  echo "$python"
}

step_install() {
  set -u
  echo "date: $(date -u +%FT%TZ)"; uname -a; nproc; free -g 2>/dev/null | head -2; ldd --version 2>&1 | head -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader
  "$PY" - <<'EOF' || exit 1
import os, platform, sys
import torch
cuda = torch.cuda.is_available()
if cuda:
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}")
if not cuda and os.environ.get("DRY_RUN") != "1":
    sys.exit("no CUDA device visible to torch")
EOF
  "$PY" bench/gpu_wheels.py check --wheels "$WHEELS" || exit 1
  local n py312 standin; n=$(ls "$WHEELS"/*.whl | wc -l)
  if [ "$DRY_RUN" != 1 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || exit 1
    "$PY" bench/gpu_wheels.py check --wheels "$WHEELS" --target "$SITE" --import all || exit 1
    echo "summary: $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1), Python $("$PY" -c \
      'import platform; print(platform.python_version())'), torch $("$PY" -c 'import torch; print(torch.__version__)');" \
      "$n wheels (the op's included) installed into $SITE and imported"
    return 0
  fi
  if ! py312=$(find_python312); then
    echo "summary: file-list check of $n wheels only (no Python 3.12 here to install them with)"
    return 0
  fi
  "$py312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE312" \
    "$WHEELS"/*.whl || exit 1
  if standin=$(image_standin_python); then
    PYTHONPATH= PYTHONNOUSERSITE=1 "$standin" bench/gpu_wheels.py check --wheels "$WHEELS" --target "$SITE312" \
      --import all || exit 1
    echo "summary: $n wheels (the op's included) installed with $py312 into a scratch target; all imported" \
      "(image stand-in venv: the image's torch and packages)"
  else
    PYTHONPATH= "$py312" bench/gpu_wheels.py check --wheels "$WHEELS" --target "$SITE312" --import self-contained \
      || exit 1
    echo "summary: $n wheels installed with $py312 into a scratch target; self-contained ones imported"
  fi
}

# The Python that loads the carried op: the device's python3; in the dry run the image stand-in venv
# (Python 3.12 with the image's torch), since the op wheel is built for that torch and no other.
op_python() {
  if [ "$DRY_RUN" != 1 ]; then echo "$PY"; return 0; fi
  image_standin_python
}

step_op() {
  set -u
  local oppy
  oppy=$(op_python) || { echo "no Python 3.12 stand-in for the image here"; exit 1; }
  [ "$DRY_RUN" = 1 ] && export PYTHONPATH="$REPO/ops:$SITE312"  # the stand-in: the carried op alone
  "$oppy" bench/op_check.py prepare --site "$SITE312" --wheels "$WHEELS" --build-dir "$BUILD" --work "$WORK" \
    "${DRY_FLAG[@]}" || exit 1
  "$oppy" bench/op_check.py correct --json "$WORK/op.json" --source "$WORK/op_source.json"
}

step_gpu_tests() {
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only tests/test_ops_gpu.py
  else
    "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests/
  fi
}

step_msda() {
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" bench/msda.py --device cpu --repeats 1 --shapes decoder --copy-mib 256 --json "$WORK/msda.json"
  else
    "$PY" bench/msda.py --device cuda --repeats 20 --json "$WORK/msda.json"
  fi
}

step_throughput() {
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" bench/train_throughput.py --model tiny --batch 1 --size 96 96 --iters 1 --warmup 0 --classes 5 \
      --boxes 2 --device cpu --dtype bf16 --impls ours,ours-lowp,hf --json "$WORK/throughput.json"
  else
    "$PY" bench/train_throughput.py --model deformable_detr_r50 --batch 2 --size 800 1066 --device cuda \
      --dtype fp32,bf16 --iters 6 --warmup 1 --json "$WORK/throughput.json"
  fi
}

SMOKE_COMMON="stage=pretrain stage.eval_every_epochs=0 stage.checkpoint_every_steps=0 stage.trackers=[]"
SMOKE_COMMON+=" stage.max_eval_images=32 output_root=$WORK/runs data.root=$WORK/data"
if [ "$DRY_RUN" = 1 ]; then
  # the tiny model on small images: CPU autocast bf16 is slow, and the point is the code path
  SMOKE_SIZE="model=tiny data.preset=tiny stage.max_steps=12 stage.log_every=2 data.train_scales=[64,80]"
  SMOKE_SIZE+=" data.max_size=96 data.crop_resize_scales=[64] data.crop_min=48 data.crop_max=64 data.eval_scale=64"
else
  SMOKE_SIZE="model=deformable_detr_r50 model.backbone_weights=null data.preset=small stage.max_steps=100"
  SMOKE_SIZE+=" stage.log_every=10"
fi
export SMOKE_COMMON SMOKE_SIZE

step_smoke() {
  set -u
  local preset v extra rc=0 pids=()
  preset=$(echo "$SMOKE_SIZE" | grep -o 'data.preset=[a-z]*' | cut -d= -f2)
  "$PY" -m stepwise.make_synthetic out="$WORK/data" preset="$preset" seed=0 \
    workers=$([ "$DRY_RUN" = 1 ] && echo 0 || echo 8) | tail -2 || exit 1
  # the CUDA op is forced on the GPU machine (an error instead of a silent fallback to the reference)
  [ "$DRY_RUN" = 1 ] || export STEPWISE_MSDA_BACKEND=compiled
  for v in fp32 bf16 bf16_lowp; do
    case $v in
      fp32) extra="stage.mixed_precision=no" ;;
      bf16) extra="stage.mixed_precision=bf16" ;;
      bf16_lowp) extra="stage.mixed_precision=bf16 model.msda_low_precision=true" ;;
    esac
    # shellcheck disable=SC2086
    "$PY" -m stepwise.run $SMOKE_COMMON $SMOKE_SIZE exp="smoke_$v" $extra >"$WORK/smoke_$v.log" 2>&1 &
    pids+=($!)
    [ "$DRY_RUN" = 1 ] && wait $!  # one at a time on a small CPU machine (the exit status is read below)
  done
  for i in 0 1 2; do
    wait "${pids[$i]}"; local r=$?
    v=$(echo "fp32 bf16 bf16_lowp" | cut -d' ' -f$((i + 1)))
    echo "smoke_$v: exit status $r; last lines:"; tr '\r' '\n' <"$WORK/smoke_$v.log" | tail -n 3
    [ $r -eq 0 ] || rc=1
  done
  exit $rc
}
export -f find_python312 image_standin_python op_python step_install step_op step_gpu_tests step_msda \
  step_throughput step_smoke

# ------------------------------------------------------------------------------------------ order
if selected install && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  skip_step install "no wheels in $WHEELS: run bench/gpu_wheels.sh on the CPU machine, then carry=[\".whl\"]"
else
  run_step install step_install
fi
DEADLINE=$(( $(date +%s) + BUDGET ))
if [ "$DRY_RUN" = 1 ] && ! ls "$WHEELS"/stepwise_ops_kernels-*.whl >/dev/null 2>&1; then
  skip_step op "no op wheel in $WHEELS (bench/gpu_wheels.sh builds it; the dry run never compiles)"
else
  run_step op step_op
fi
run_step msda step_msda
run_step throughput step_throughput
run_step gpu-tests step_gpu_tests
run_step smoke step_smoke

# ------------------------------------------------------------------------------------------ results
ELAPSED=$(( $(date +%s) - START ))
report " (done)"
(cd "$WORK" && tar -czf "$OUTDIR/logs.tar.gz" --exclude='*.pt' --exclude='*.pth' --exclude='*.safetensors' \
   --exclude='./data' --exclude='./site' --exclude='./site312' --exclude='./build/tmp' --exclude='*.so' --exclude='events.out.*' .)
echo "gpu_check: ${ELAPSED}s; results in $OUTDIR: gpu_results.md, gpu_check.log, logs.tar.gz and the steps' JSON"
[ "$KEEP_WORK" = 1 ] && echo "work folder kept: $WORK" || rm -rf "$WORK"
if grep -q '| FAIL |' "$OUTDIR/gpu_results.md"; then exit 1; fi
if grep -q '| MISS |' "$OUTDIR/gpu_results.md"; then exit 2; fi
exit 0
