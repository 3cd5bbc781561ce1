#!/usr/bin/env bash
# CPU variant of the loss benchmarks: eager vs torch.compile at the CPU shape set (Triton cases skip).
#   bash benchmarks/run_cpu.sh [--quick]
# Writes benchmarks/results/cpu_<cpu-slug>_<date>.{json,jsonl,md}; see run_gpu.sh for the details.
set -euo pipefail
exec bash "$(dirname "${BASH_SOURCE[0]}")/run_gpu.sh" --cpu "$@"
