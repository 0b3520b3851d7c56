#!/usr/bin/env bash
# Runtime on one GPU (issue 5): the CUDA tests of the runtime, then `gemma4-passes bench` per preset
# (eager / Inductor / piecewise CUDA graphs / passes + piecewise CUDA graphs over the paged cache).
#   bash benchmarks/run_runtime_gpu.sh "e2b 31b:6"      # presets, optionally preset:layers
# Logs and JSON go to $OUT (default ./out).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PRESETS=${1:-"e2b e4b 31b:6 26b-a4b:6"}
BENCH_ARGS=${BENCH_ARGS:-"--decode-steps 8 --parity-steps 64 --parity-batch 8"}
nvidia-smi -L
python -c "import torch, transformers, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 240 python -m pytest -q -x tests/runtime/test_graphed_pieces.py tests/runtime/test_paged_attention.py \
    -k "cuda or CUDA" 2>&1 | tail -n 5 | tee "$OUT/runtime_cuda_tests.log"
fi
for spec in $PRESETS; do
  preset=${spec%%:*}; layers=""
  [ "$spec" != "$preset" ] && layers="--layers ${spec#*:}"
  tag=${spec/:/_l}
  echo "=== bench $spec"
  timeout ${BENCH_TIMEOUT:-420} python -m gemma4_passes.cli bench --preset "$preset" $layers --dtype bf16 $BENCH_ARGS \
    --json "$OUT/bench_$tag.json" > "$OUT/bench_$tag.log" 2>&1
  echo "rc=$?" >> "$OUT/bench_$tag.log"
  grep -v "Warning\|warn" "$OUT/bench_$tag.log" | tail -n 30
done
