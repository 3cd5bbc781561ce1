#!/usr/bin/env bash
# Download the wheels that the training-step benchmark needs on a GPU machine whose Python image lacks them
# (the project's lent H200 image has torch, triton, transformers, PyYAML, pytest and pytest-benchmark, but not
# diffusers, pydantic or bitsandbytes). Run this where pip reaches PyPI; it fills .whl/ (git-ignored, ~52 MB) for
# CPython 3.12 on manylinux x86_64. benchmarks/run_gpu.sh installs .whl/*.whl into a private folder when present.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .whl
PY="${PYTHON:-python3}"
for spec in diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
            importlib-metadata==10.2.0 zipp==4.1.2 bitsandbytes==0.50.2; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$spec"
done
ls -la .whl
