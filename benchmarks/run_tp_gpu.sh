#!/usr/bin/env bash
# Tensor-parallel GPU runs on nvidia-h200-x2 (issue 4), logs and JSON under $OUT.
#   bash benchmarks/run_tp_gpu.sh "check skip bench"        # the kernel: correctness, skipped call, latency
#   bash benchmarks/run_tp_gpu.sh "layers:31b:2 layers:31b:4 layers:26b-a4b:2"  # decoder-layer slices at TP=2
# NVLink multicast stays off (the machine's rule): set here too, for every child process.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=. PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/tp_out}; mkdir -p "$OUT"
TR="torchrun --nproc-per-node 2 --master-port 29533"
rc=0
for step in ${1:-check skip bench}; do
  case $step in
    check) timeout ${CHECK_TIMEOUT:-300} $TR benchmarks/allreduce_check.py --out "$OUT" 2>&1 | tee "$OUT/check.log" | grep -v Warning | tail -40 ;;
    skip)  timeout 90 $TR benchmarks/allreduce_check.py --skip-test --out "$OUT" > "$OUT/skip.log" 2>&1; echo "skip rc=$?"; grep -m3 -E "SKIP-TEST|TIMED OUT" "$OUT/skip.log" ;;
    bench) timeout ${BENCH_TIMEOUT:-300} $TR benchmarks/bench_allreduce.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v -i warn | tail -40 ;;
    layers:*) spec=${step#layers:}; p=${spec%%:*}; n=${spec#*:}; [ "$n" = "$spec" ] && n=2
      timeout ${LAYERS_TIMEOUT:-300} $TR benchmarks/tp_layers.py --preset "$p" --layers "$n" --out "$OUT/l$n" ${LAYERS_ARGS:-} 2>&1 | tee "$OUT/layers_${p}_$n.log" | grep -E '^[0-9]+ |Error|error' | tail -30 ;;
  esac
  rc=$((rc | ${PIPESTATUS[0]:-0}))
done
exit $rc
