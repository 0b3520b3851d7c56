#!/usr/bin/env bash
# Install gemma4-passes with everything its demo and tests use (CPU machine, Python >= 3.10).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python -m pip install -q --disable-pip-version-check"
# torch first: a pinned CPU build where one is available locally; an already installed
# torch >= 2.11 is kept as it is.
if ! python -c 'import torch, sys; v = tuple(int(x) for x in torch.__version__.split(".")[:2]); sys.exit(v < (2, 11))' 2>/dev/null; then
  $PIP "torch==2.13.0"
fi
# transformers pinned to the release the suite is validated on: 5.24 changed the decoder-layer
# signature YOCO mirrors (it then falls back, logged), and the tensor-parallel plan the TP harness
# tests read differs before 5.23.
$PIP -e ".[test]" "transformers==5.23.0"
# SGLang for the plugin tests: its metadata pins a CUDA torch, so no dependencies from it;
# the light packages its plugin/compilation modules import are listed in the file.
$PIP --no-deps "sglang==0.5.23"
$PIP -r .ci/requirements-sglang.txt
