#!/usr/bin/env bash
# GPU correctness checks, then the fusion and decoder-layer benchmarks, in one call.
#
#   bash benchmarks/run_gpu.sh            # from the repository root; logs + JSON into $OUT (default ./out)
#   bash benchmarks/run_gpu.sh --quick    # fewer token counts everywhere (about half the time)
#   bash benchmarks/run_gpu.sh --smoke    # tiny sizes (also on a CPU machine): tests the plumbing
#
# Targets ~8 minutes on one H100 (TOTAL_S=480): checks <= 2.5 min, fusions <= ~3.3 min, layers get
# the rest (>= ~3.6 min). Each step has a hard `timeout` computed from the time left, and the two benchmarks get a
# matching --budget-s so that they skip (and list) the cases that would not fit instead of being
# killed; both write their JSON after every case/preset. Files in $OUT (7):
#   run_gpu.log  check_kernels.log  check_kernels.json  bench_fusions.log  bench_fusions.json
#   bench_layers.log  bench_layers.json
# Exit status: 0 only if every step exited 0.
set -uo pipefail
cd "$(dirname "$0")/.."

QUICK=0
SMOKE=0
for a in "$@"; do
  case "$a" in
    --quick) QUICK=1 ;;
    --smoke) SMOKE=1 ;;
    *) echo "unknown argument $a (--quick, --smoke)"; exit 2 ;;
  esac
done

export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_FORCE_DISABLE_CACHES=1   # the passes must run on every compile
OUT="${OUT:-$PWD/out}"
export OUT
mkdir -p "$OUT"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
TOTAL_S="${TOTAL_S:-480}"
START=$SECONDS
LOG="$OUT/run_gpu.log"

left() { echo $(( TOTAL_S - (SECONDS - START) )); }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }

{
  echo "=== $(date -u '+%Y-%m-%dT%H:%M:%SZ')  run_gpu.sh quick=$QUICK total budget ${TOTAL_S}s"
  nvidia-smi -L || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv 2>/dev/null || true
  "$PY" - <<'EOF'
import sys, torch
try:
    import triton; tv = triton.__version__
except Exception as e:
    tv = f"missing ({e})"
try:
    import transformers; hv = transformers.__version__
except Exception as e:
    hv = f"missing ({e})"
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (cuda {torch.version.cuda})  triton {tv}  transformers {hv}")
print(f"cuda available: {torch.cuda.is_available()}  devices: {torch.cuda.device_count()}"
      + (f"  [{torch.cuda.get_device_name(0)}]" if torch.cuda.is_available() else ""))
EOF
  echo "git: $(git rev-parse --short=12 HEAD 2>/dev/null || echo '?') $(git status --porcelain --untracked-files=no 2>/dev/null | wc -l | tr -d ' ') modified tracked files"
} 2>&1 | tee "$LOG"

declare -A RC
step() {  # step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  if [ "$limit" -lt 30 ]; then
    echo "=== $name: SKIPPED, only ${limit}s left" | tee -a "$LOG"
    RC[$name]=skipped
    return
  fi
  echo "=== $name: $* (timeout ${limit}s, $(( SECONDS - START ))s elapsed)" | tee -a "$LOG"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  RC[$name]=$rc
  local note=""
  [ "$rc" = 124 ] && note=" (TIMED OUT)"
  echo "=== $name: exit $rc$note at $(( SECONDS - START ))s" | tee -a "$LOG"
}

if [ "$SMOKE" = 1 ]; then
  CHECK_ARGS=(--smoke); FUS_ARGS=(--smoke --fusions post_attn_norm,qkv_norm); LAY_ARGS=(--smoke --presets 31b --layers 31b=1 --tokens 3)
elif [ "$QUICK" = 1 ]; then
  CHECK_ARGS=(--quick); FUS_ARGS=(--tokens 1,128,8192); LAY_ARGS=(--tokens 1,512)
else
  CHECK_ARGS=(); FUS_ARGS=(); LAY_ARGS=()
fi

# 1. correctness of every fused op (~1 min, mostly Triton JIT; checks not reached in time fail the step)
T1=$(min 150 $(( $(left) - 300 )))
step check_kernels "$T1" "$PY" benchmarks/check_kernels_gpu.py --budget-s $(( T1 - 20 )) ${CHECK_ARGS[@]+"${CHECK_ARGS[@]}"}

# 2. fusions: eager vs Inductor vs fused op (~3 min)
T2=$(min 200 $(( $(left) - 220 )))
step bench_fusions "$T2" "$PY" benchmarks/bench_fusions.py --budget-s $(( T2 - 35 )) ${FUS_ARGS[@]+"${FUS_ARGS[@]}"}

# 3. decoder-layer slices: Inductor vs Inductor + passes (the rest, ~4 min)
T3=$(( $(left) - 5 ))
step bench_layers "$T3" "$PY" benchmarks/bench_layers.py --budget-s $(( T3 - 50 )) ${LAY_ARGS[@]+"${LAY_ARGS[@]}"}

{
  echo "=== summary after $(( SECONDS - START ))s: check_kernels=${RC[check_kernels]} bench_fusions=${RC[bench_fusions]} bench_layers=${RC[bench_layers]}"
  ls -l "$OUT"
} 2>&1 | tee -a "$LOG"

for k in check_kernels bench_fusions bench_layers; do
  [ "${RC[$k]}" = 0 ] || exit 1
done
exit 0
