#!/usr/bin/env bash
# Set up, then run the whole CPU test suite (Triton kernels run under TRITON_INTERPRET=1).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
python -m pytest tests -q -p no:cacheprovider --durations=15 "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
