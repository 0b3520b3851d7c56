#!/usr/bin/env bash
# Set up, then run the whole CPU test suite (Triton kernels run under TRITON_INTERPRET=1).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# Without a GPU the Triton kernels are tested through Triton's interpreter. Triton decides
# that when a kernel is defined, so set it before anything (an SGLang test, a compile)
# imports the kernel modules.
if ! python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  export TRITON_INTERPRET=1
fi
python -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
