#!/usr/bin/env bash
# Create ./.venv (if missing) and install patchdpo_fast with the pinned CPU stack from requirements/constraints-cpu.txt.
# torch is pinned to 2.13.0: on the project's CPU machines pip takes a local CPU build; an unpinned torch would pull
# a multi-GB CUDA build. DeepSpeed is installed without building its C++/CUDA ops (DS_BUILD_OPS=0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export DS_BUILD_OPS=0 PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q -c requirements/constraints-cpu.txt torch==2.13.0
# the core plus the training stack ([train]) and the test tools ([test]); `pip install patchdpo_fast` alone is the
# light core (torch, triton, numpy, safetensors) for trainers that only import the loss ops
.venv/bin/python -m pip install -q -c requirements/constraints-cpu.txt -e ".[train,test]"
.venv/bin/python -c "import torch, triton, patchdpo_fast.ops; print(f'patchdpo_fast ready: torch {torch.__version__}, triton {triton.__version__}')"
