#!/usr/bin/env bash
# The GPU acceptance of the deformable attention op and the detector, as ONE command (issue 16).
#
#   bench/gpu_check.sh [OPTIONS] [OUTDIR]       # OUTDIR, else $OUT (the device tool's output folder)
#
# On the GPU machine (bare image: Python 3.12, torch, no registry), with the wheels made here by
# bench/gpu_wheels.sh carried along:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
# Steps (each time-boxed with `timeout`, each printing one verdict line; a failing step does not stop
# the later ones; all of them end by a global deadline, --budget seconds after the start):
#   env           GPU, driver, Python, torch, CUDA, glibc
#   wheels        file-list check of .whl/, pip install --no-index --no-deps --target WORK/site, imports
#   args          --help of every bench script; the smoke run's config composes
#   build         the op for sm_90 against the image's torch (FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0,
#                 CUDA_HOME from bench/cuda_home.py) into WORK/build; cuobjdump shows sm_90; it loads
#   smoke         200-step stage=pretrain of deformable_detr_r50 (backbone_weights=null) on the built-in
#                 data, fp32 / bf16 / bf16 + model.msda_low_precision, CUDA op forced; runs beside the tests
#   gpu-tests     pytest -m gpu tests/
#   op-cpu-tests  pytest tests/test_ops.py (the op's CPU tests, against this build)
#   msda          bench/msda.py --device cuda: fp32/fp16/bf16, encoder and decoder, ratios, bandwidth floor
#   throughput    bench/train_throughput.py deformable_detr_r50 800x1066 batch 2, fp32 and bf16, ours vs HF
# Results: OUTDIR/gpu_results.md (verdict table, figures), OUTDIR/gpu_check.log (every step's full log),
# OUTDIR/logs.tar.gz (logs, JSON, metrics.jsonl of the smoke runs). Exit status: 0 when no step
# failed or missed, 1 when one failed, 2 when targets were missed but nothing failed.
#
# --dry-run (on a CPU machine) runs every part that needs no GPU: the wheel checks (an install into a
# scratch target and imports under a Python 3.12 when one is found, else the file-list check alone),
# the CUDA build with FORCE_CUDA=1 into a scratch folder, the GPU tests collected, the op's CPU tests
# against that build, and CPU rehearsals of msda, throughput and smoke (tiny sizes) that exercise the
# same scripts, JSON files and verdicts. See ops/README.md ("GPU check") and bench/RESULTS.md.
set -uo pipefail   # not -e: a failing step must not stop the later ones

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; cat <<'EOF'
Options:
  --dry-run          CPU rehearsal of every step (see above)
  --steps A,B,...    run only these steps (default: all, in the order above)
  --budget SECONDS   global deadline for all steps (default 530: the device's run allows 600;
                     dry run: 2400, and every time box x3)
  --keep-work        keep the work folder (default: removed after the results are written)
  -h, --help         this text
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ALL_STEPS="env wheels args build smoke gpu-tests op-cpu-tests msda throughput"
DRY_RUN=0 STEPS="" BUDGET="" KEEP_WORK=0 OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --steps) STEPS="${2:?--steps needs a comma-separated list}"; shift ;;
    --steps=*) STEPS="${1#*=}" ;;
    --budget) BUDGET="${2:?--budget needs seconds}"; shift ;;
    --budget=*) BUDGET="${1#*=}" ;;
    --keep-work) KEEP_WORK=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    *) [ -z "$OUTDIR" ] || { echo "gpu_check.sh: one output folder only" >&2; exit 64; }; OUTDIR="$1" ;;
  esac
  shift
done
OUTDIR="${OUTDIR:-${OUT:-}}"
[ -n "$OUTDIR" ] || { echo "gpu_check.sh: give an output folder (argument or \$OUT)" >&2; exit 64; }
[ "$DRY_RUN" = 1 ] && BUDGET="${BUDGET:-2400}" SCALE=3 || BUDGET="${BUDGET:-530}" SCALE=1
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check.sh: --budget must be whole seconds, got $BUDGET" >&2; exit 64; }
STEPS="${STEPS:-${ALL_STEPS// /,}}"
for s in ${STEPS//,/ }; do
  [[ " $ALL_STEPS " == *" $s "* ]] || { echo "gpu_check.sh: unknown step $s (steps: $ALL_STEPS)" >&2; exit 64; }
done
mkdir -p "$OUTDIR" && OUTDIR="$(cd "$OUTDIR" && pwd)"
cd "$REPO"

export PY="${PYTHON:-python3}" REPO DRY_RUN WHEELS="${GPU_CHECK_WHEELS:-.whl}"  # the carried wheels
export WORK; WORK="$(mktemp -d "${TMPDIR:-/tmp}/stepwise_gpu_check.XXXXXX")"
export SITE="$WORK/site" BUILD="$WORK/build"
mkdir -p "$SITE" "$BUILD/lib"
# The repository's packages, the carried wheels and the op built by this check come first.
export PYTHONPATH="$REPO:$REPO/ops:$BUILD/lib:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if [ "$DRY_RUN" = 1 ]; then export MAX_JOBS="${MAX_JOBS:-2}"; else export MAX_JOBS="${MAX_JOBS:-$(nproc)}"; fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
DRY_FLAG=(); [ "$DRY_RUN" = 1 ] && DRY_FLAG=(--dry-run)
echo "gpu_check: $( [ "$DRY_RUN" = 1 ] && echo "DRY RUN, " )steps $STEPS; budget ${BUDGET}s; work $WORK; results -> $OUTDIR"

selected() { [[ ",$STEPS," == *",$1,"* ]]; }

# run_step NAME BOX FUNCTION: FUNCTION under `timeout` (BOX seconds, cut to the deadline), its output
# to WORK/NAME.log, then its verdict line.
run_step() {
  local name="$1" box="$2" fn="$3" left t0 rc ms
  selected "$name" || return 0
  left=$((DEADLINE - $(date +%s) - 5))
  if [ "$left" -lt 20 ]; then
    "$PY" bench/gpu_results.py verdict --work "$WORK" --step "$name" --skip "no time left of the ${BUDGET}s budget"
    return 0
  fi
  box=$((box * SCALE))  # a dry run on a small shared CPU machine gets longer boxes
  [ "$box" -gt "$left" ] && box=$left
  echo "--- $(date +%T) $name (time box ${box}s)"
  t0=$(date +%s%N)
  timeout -k 10 "$box" bash -c "$fn" >"$WORK/$name.log" 2>&1
  rc=$?
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  "$PY" bench/gpu_results.py verdict --work "$WORK" --step "$name" --rc "$rc" --timeout "$box" \
    --seconds "$((ms / 1000)).$(printf %03d $((ms % 1000)))" "${DRY_FLAG[@]}"
}

# ------------------------------------------------------------------------------------------ steps
step_env() {
  set -u
  echo "date: $(date -u +%FT%TZ)"; uname -a; nproc; free -g 2>/dev/null | head -2
  ldd --version 2>&1 | head -1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
    --format=csv,noheader
  "$PY" - <<'EOF'
import os, platform, sys
import torch
cuda = torch.cuda.is_available()
gpu = torch.cuda.get_device_name(0) if cuda else "none"
if cuda:
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB")
print(f"python {platform.python_version()} ({sys.executable}); torch {torch.__version__}, CUDA {torch.version.cuda}")
print(f"summary: GPU {gpu}; Python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda})")
if not cuda and os.environ.get("DRY_RUN") != "1":
    sys.exit("no CUDA device visible to torch")
EOF
}

find_python312() {
  local c
  for c in python3.12 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.12*/bin/python3.12 \
           /usr/bin/python3.12 /usr/local/bin/python3.12; do
    "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1 && { echo "$c"; return 0; }
  done
  return 1
}

# The image's own packages that the wheels need (manifest.json 'from_image'), in a cached Python 3.12
# venv, so that the dry run can import the carried wheels as the GPU machine will.
image_standin_python() {
  local py312="$1" venv="${GPU_CHECK_CACHE:-${TMPDIR:-/tmp}/stepwise_gpu_check_cache}/py312-image" pkgs
  if [ ! -x "$venv/bin/python" ]; then
    pkgs=$("$PY" -c "import json; m = json.load(open('$WHEELS/manifest.json'))
print(' '.join(k.split(' (as ')[-1].rstrip(')') for k in m['from_image']))") || return 1
    "$py312" -m venv "$venv" >&2 && "$venv/bin/python" -m pip install -q $pkgs >&2 || { rm -rf "$venv"; return 1; }
  fi
  echo "$venv/bin/python"
}

step_wheels() {
  set -u
  "$PY" bench/gpu_wheels.py check --wheels "$WHEELS" || exit 1
  local n; n=$(ls "$WHEELS"/*.whl | wc -l)
  if [ "$DRY_RUN" != 1 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --find-links "$WHEELS" \
      --target "$SITE" "$WHEELS"/*.whl || exit 1
    "$PY" bench/gpu_wheels.py check --wheels "$WHEELS" --target "$SITE" --import all || exit 1
    echo "summary: $n wheels installed into $SITE and imported"
    return 0
  fi
  local py312 standin
  if ! py312=$(find_python312); then
    echo "summary: file-list check of $n wheels only (no Python 3.12 here to install them with)"
    return 0
  fi
  "$py312" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --find-links "$WHEELS" \
    --target "$WORK/site312" "$WHEELS"/*.whl || exit 1
  if standin=$(image_standin_python "$py312"); then
    PYTHONPATH= PYTHONNOUSERSITE=1 "$standin" bench/gpu_wheels.py check --wheels "$WHEELS" --target "$WORK/site312" \
      --import all || exit 1
    echo "summary: $n wheels installed with $py312 into a scratch target; all imported (image stand-in venv)"
  else
    PYTHONPATH= "$py312" bench/gpu_wheels.py check --wheels "$WHEELS" --target "$WORK/site312" \
      --import self-contained || exit 1
    echo "summary: $n wheels installed with $py312 into a scratch target; self-contained ones imported"
  fi
}

SMOKE_COMMON="stage=pretrain stage.eval_every_epochs=0 stage.checkpoint_every_steps=0 stage.trackers=[]"
SMOKE_COMMON+=" stage.max_eval_images=32 output_root=$WORK/runs data.root=$WORK/data"
if [ "$DRY_RUN" = 1 ]; then
  # the tiny model on small images: CPU autocast bf16 is slow, and the point is the code path
  SMOKE_SIZE="model=tiny data.preset=tiny stage.max_steps=12 stage.log_every=2 data.train_scales=[64,80]"
  SMOKE_SIZE+=" data.max_size=96 data.crop_resize_scales=[64] data.crop_min=48 data.crop_max=64 data.eval_scale=64"
else
  SMOKE_SIZE="model=deformable_detr_r50 model.backbone_weights=null data.preset=small stage.max_steps=200"
  SMOKE_SIZE+=" stage.log_every=20"
fi
export SMOKE_COMMON SMOKE_SIZE

step_args() {
  set -u
  local s
  for s in msda.py train_throughput.py gpu_results.py gpu_wheels.py cuda_home.py; do
    "$PY" "bench/$s" --help >/dev/null || { echo "bench/$s --help failed"; exit 1; }
    echo "bench/$s --help: ok"
  done
  "$PY" bench/train_throughput.py --dtype fp8 2>&1 | grep -q "unknown --dtype" || { echo "bad --dtype not named"; exit 1; }
  "$PY" - $SMOKE_COMMON $SMOKE_SIZE <<'EOF' || exit 1
import sys
from stepwise.config import load_config
for variant in (["stage.mixed_precision=no"], ["stage.mixed_precision=bf16", "model.msda_low_precision=true"]):
    cfg = load_config(sys.argv[1:] + ["exp=smoke_check"] + variant)
    print(f"smoke config composes: model {cfg.model.name}, {cfg.stage.max_steps} steps, {cfg.stage.mixed_precision},"
          f" msda_low_precision {cfg.model.msda_low_precision}, backbone_weights {cfg.model.backbone_weights}")
EOF
  echo "summary: 5 bench scripts parse --help; the smoke run's config composes"
}

step_build() {
  set -u
  local cuda_home lib cuobjdump t0
  cuda_home=$("$PY" bench/cuda_home.py --verbose) || exit 1
  echo "CUDA_HOME=$cuda_home ($("$cuda_home/bin/nvcc" --version | grep -o 'release [0-9.]*'))"
  t0=$(date +%s)
  FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 CUDA_HOME="$cuda_home" \
    "$PY" ops/setup.py build_ext --build-lib "$BUILD/lib" --build-temp "$BUILD/tmp" || exit 1
  local seconds=$(( $(date +%s) - t0 ))
  lib=$(ls "$BUILD"/lib/stepwise_ops_C*.so) || exit 1
  cuobjdump=""
  for c in "$cuda_home/bin/cuobjdump" "$(command -v cuobjdump)" \
           "$("$PY" -c 'import triton, os; print(os.path.dirname(triton.__file__))' 2>/dev/null)/backends/nvidia/bin/cuobjdump"; do
    [ -x "$c" ] && { cuobjdump="$c"; break; }
  done
  if [ -n "$cuobjdump" ]; then
    "$cuobjdump" --list-elf "$lib" | tee "$BUILD/elf.txt"
    grep -q "sm_90" "$BUILD/elf.txt" || { echo "no sm_90 machine code in $lib"; exit 1; }
    arch="sm_90 machine code (cuobjdump)"
  else
    arch="architecture not checked (no cuobjdump)"
  fi
  "$PY" - "$lib" <<'EOF' || exit 1
import sys
from pathlib import Path
import torch
import stepwise_ops
from stepwise_ops import _library, ms_deform_attn_compiled, ms_deform_attn_reference
from stepwise_ops.testing import SHAPE_SETS, make_inputs
found = _library.find_library()
assert found is not None and found.resolve() == Path(sys.argv[1]).resolve(), f"stepwise_ops loads {found}, not this build"
assert _library.built_with_cuda(), f"the build has no CUDA kernel ({_library.load_error()})"
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for device in devices:
    inputs = make_inputs(SHAPE_SETS["four_levels"], n=2, lq=5, m=2, d=8, p=2, device=device, seed=0)
    torch.testing.assert_close(ms_deform_attn_compiled(*inputs), ms_deform_attn_reference(*inputs), rtol=1e-4,
                               atol=1e-4)
print(f"loads with built_with_cuda=True; matches the reference on {', '.join(devices)}")
EOF
  echo "summary: built in ${seconds}s (MAX_JOBS=$MAX_JOBS, CUDA_HOME=$cuda_home), $arch, loads, matches the reference"
}

step_gpu_tests() {
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only tests/test_ops_gpu.py
  else
    "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests/
  fi
}

step_op_cpu_tests() { "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_ops.py; }

step_msda() {
  if [ "$DRY_RUN" = 1 ]; then
    "$PY" bench/msda.py --device cpu --repeats 1 --shapes decoder --json "$WORK/msda.json"
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
      --dtype fp32,bf16 --iters 8 --warmup 2 --json "$WORK/throughput.json"
  fi
}

step_smoke() {
  set -u
  local preset v rc=0 pids=()
  preset=$(echo "$SMOKE_SIZE" | grep -o 'data.preset=[a-z]*' | cut -d= -f2)
  "$PY" -m stepwise.make_synthetic out="$WORK/data" preset="$preset" seed=0 workers=0 | tail -2 || exit 1
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
export -f step_env find_python312 image_standin_python step_wheels step_args step_build step_gpu_tests \
  step_op_cpu_tests step_msda step_throughput step_smoke

# ------------------------------------------------------------------------------------------ order
run_step env 30 step_env
if selected wheels && ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PY" bench/gpu_results.py verdict --work "$WORK" --step wheels \
    --skip "no wheels in $WHEELS: run bench/gpu_wheels.sh on the CPU machine, then carry=[\".whl\"]"
else
  run_step wheels 90 step_wheels
fi
run_step args 60 step_args
run_step build 300 step_build
# The smoke runs train beside the tests (neither is timed); the timed benchmarks run alone after both.
SMOKE_PID=""
if selected smoke; then
  run_step smoke 270 step_smoke &
  SMOKE_PID=$!
fi
run_step gpu-tests 180 step_gpu_tests
run_step op-cpu-tests 150 step_op_cpu_tests
[ -n "$SMOKE_PID" ] && wait "$SMOKE_PID"
run_step msda 120 step_msda
run_step throughput 240 step_throughput

# ------------------------------------------------------------------------------------------ results
ELAPSED=$(( $(date +%s) - START ))
{
  for s in $ALL_STEPS; do
    [ -f "$WORK/$s.log" ] && { echo "===== $s"; cat "$WORK/$s.log"; }
    if [ "$s" = smoke ]; then
      for v in fp32 bf16 bf16_lowp; do
        [ -f "$WORK/smoke_$v.log" ] && { echo "===== smoke_$v"; tr '\r' '\n' <"$WORK/smoke_$v.log" | tail -n 60; }
      done
    fi
  done
} >"$OUTDIR/gpu_check.log"
GPU=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')" 2>/dev/null)
"$PY" bench/gpu_results.py report --work "$WORK" --out "$OUTDIR" \
  --header "mode=$([ "$DRY_RUN" = 1 ] && echo "dry run (no GPU)" || echo "GPU check")" \
  --header "GPU=$GPU" --header "command=bench/gpu_check.sh ${DRY_FLAG[*]} --steps $STEPS --budget $BUDGET" \
  --header "commit=${GPU_CHECK_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "unknown (set GPU_CHECK_COMMIT)")}" \
  --order "${ALL_STEPS// /,}" \
  --header "elapsed=${ELAPSED}s"
(cd "$WORK" && tar -czf "$OUTDIR/logs.tar.gz" --exclude='*.pt' --exclude='*.pth' --exclude='*.safetensors' \
   --exclude='./data' --exclude='./site' --exclude='./site312' --exclude='./build/tmp' --exclude='*.so' --exclude='events.out.*' .)
echo "gpu_check: ${ELAPSED}s; results in $OUTDIR/gpu_results.md, gpu_check.log, logs.tar.gz"
[ "$KEEP_WORK" = 1 ] && echo "work folder kept: $WORK" || rm -rf "$WORK"
if grep -q '| FAIL |' "$OUTDIR/gpu_results.md"; then exit 1; fi
if grep -q '| MISS |' "$OUTDIR/gpu_results.md"; then exit 2; fi
exit 0
