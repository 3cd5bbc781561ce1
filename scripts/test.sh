#!/usr/bin/env bash
# The project's test command (README, CI): lint, format check and the whole test suite on the CPU.
# Triton kernels run under TRITON_INTERPRET=1 (set by tests/conftest.py).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
# pytest through its own entry point: `python -m` would put the repo root on sys.path, where the top-level
# kernels/ folder would shadow the unrelated PyPI package `kernels` that bitsandbytes probes for.
.venv/bin/pytest -q "$@"
