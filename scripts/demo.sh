#!/usr/bin/env bash
# Set up, then run the main job: eager vs Inductor vs Inductor + gemma4-passes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
gemma4-passes demo "$@"
