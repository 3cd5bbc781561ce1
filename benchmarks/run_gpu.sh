#!/usr/bin/env bash
# Benchmark the fused PatchDPO loss kernels against the eager reference and torch.compile, in one command.
#
#   bash benchmarks/run_gpu.sh [--quick] [--tile-sweep] [--allow-cpu]
#
#   --quick       one small shape per op (plumbing check, ~1 min)
#   --tile-sweep  afterwards, time a few PATCHDPO_FAST_TILE settings (fwd+bwd, realistic shapes) in the time left
#   --allow-cpu   without CUDA, run the CPU variant instead of failing (Triton cases skip); used to check plumbing
#   --cpu         force the CPU variant (what benchmarks/run_cpu.sh does)
#
# Needs python3 with torch, triton and pytest; pytest-benchmark is used when importable. The package does not need
# to be installed: the checkout is put on PYTHONPATH and benchmarks/bench_common.py maps kernels/ to
# patchdpo_fast.kernels. Writes benchmarks/results/<gpu|cpu>_<device-slug>_<date>.{json,jsonl,md} (and
# tiles_<...>.{json,md}), prints the markdown report, copies everything (and the log) to $OUT when set, and exits
# non-zero when any benchmark, the report or the tile sweep failed.
#
# Time: the whole script aims to end within TOTAL_BUDGET_S (default 540 s). The suite stops starting new cases after
# BENCH_BUDGET_S (default 330 s; expected ~3-4 min on an H200) and is killed at BENCH_TIMEOUT_S (default 450 s);
# the tile sweep gets what is left (at most TILE_BUDGET_S, default 150 s) and is skipped below 45 s.
# BENCH_COMPILE=static times torch.compile with one static-shape compile per case instead of one dynamic-shape
# compile per op (a stronger baseline; ~80 Inductor compiles on the GPU set, so it does not fit 5 minutes).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
RES="$REPO/benchmarks/results"
mkdir -p "$RES"

main() {
QUICK=0
TILES=0
ALLOW_CPU=0
DEVICE=cuda
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    --tile-sweep) TILES=1 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    --cpu) DEVICE=cpu ;;
    -h | --help) sed -n '2,24p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run_gpu.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-540}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-330}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-450}"
TILE_BUDGET_S="${TILE_BUDGET_S:-150}"
BENCH_COMPILE="${BENCH_COMPILE:-dynamic}"

if [ -n "${TRITON_INTERPRET:-}" ]; then
  echo "run_gpu.sh: unsetting TRITON_INTERPRET=${TRITON_INTERPRET} (the interpreter is for correctness tests only)"
  unset TRITON_INTERPRET
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

echo "== preflight ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
"$PY" - <<'PYEOF'
import importlib.util, platform, torch, pytest
try:
    import triton
    tv = triton.__version__
except Exception as exc:
    tv = f"NOT IMPORTABLE ({exc})"
print(f"python {platform.python_version()}  torch {torch.__version__}  triton {tv}  pytest {pytest.__version__}  "
      f"pytest-benchmark {'yes' if importlib.util.find_spec('pytest_benchmark') else 'no (built-in stand-in)'}")
print(f"cuda available: {torch.cuda.is_available()}"
      + (f"  device: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PYEOF

if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [ "$ALLOW_CPU" = 1 ]; then
    echo "run_gpu.sh: no CUDA device; --allow-cpu given, running the CPU variant (Triton cases will skip)"
    DEVICE=cpu
  else
    echo "run_gpu.sh: no CUDA device (torch.cuda.is_available() is False); use --allow-cpu or run_cpu.sh" >&2
    exit 3
  fi
fi

SLUG="$("$PY" - "$DEVICE" <<'PYEOF'
import re, sys, torch
if sys.argv[1] == "cuda":
    name = torch.cuda.get_device_name(0)
else:
    name = "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
print(re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown")
PYEOF
)"
PREFIX=$([ "$DEVICE" = cuda ] && echo gpu || echo cpu)
NAME="${PREFIX}_${SLUG}_$(date -u +%Y%m%d)"
[ "$QUICK" = 1 ] && NAME="${NAME}_quick"
[ "$BENCH_COMPILE" = static ] && NAME="${NAME}_static"
JSON="$RES/$NAME.json"
JSONL="$RES/$NAME.jsonl"
MD="$RES/$NAME.md"
TILES_JSON="$RES/tiles_${NAME#*_}.json"
TILES_MD="$RES/tiles_${NAME#*_}.md"
rm -f "$JSON" "$JSONL" "$MD"
echo "== results: $RES/$NAME.{json,jsonl,md}"

ARGS=(benchmarks/test_bench_losses.py -p no:cacheprovider -v --durations=15
      --bench-device "$DEVICE" --bench-jsonl "$JSONL" --bench-budget-s "$BENCH_BUDGET_S"
      --bench-compile "$BENCH_COMPILE" -W "ignore::DeprecationWarning")
[ "$QUICK" = 1 ] && ARGS+=(--bench-quick)
if "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  ARGS+=(--benchmark-json "$JSON" --benchmark-quiet --benchmark-sort=name
        --benchmark-storage "file://${TMPDIR:-/tmp}/patchdpo_bench_storage")
fi
TIMEOUT=()
command -v timeout >/dev/null 2>&1 && TIMEOUT=(timeout -s INT -k 30 "$BENCH_TIMEOUT_S")

echo "== benchmarks: $PY -m pytest ${ARGS[*]}"
set +e
${TIMEOUT[@]+"${TIMEOUT[@]}"} "$PY" -m pytest "${ARGS[@]}"
BENCH_RC=$?
set -e
echo "== benchmarks finished with exit status $BENCH_RC after ${SECONDS} s"

TILE_RC=0
if [ "$TILES" = 1 ]; then
  LEFT=$((TOTAL_BUDGET_S - SECONDS - 30))
  [ "$LEFT" -gt "$TILE_BUDGET_S" ] && LEFT="$TILE_BUDGET_S"
  if [ "$LEFT" -lt 45 ]; then
    echo "== tile sweep skipped: only ${LEFT} s left of TOTAL_BUDGET_S=${TOTAL_BUDGET_S}"
  else
    TARGS=(--budget-s "$LEFT" --out-json "$TILES_JSON" --out-md "$TILES_MD")
    [ "$QUICK" = 1 ] && TARGS+=(--quick)
    [ "$DEVICE" = cpu ] && TARGS+=(--allow-cpu)
    echo "== tile sweep (budget ${LEFT} s): $PY benchmarks/tile_sweep.py ${TARGS[*]}"
    set +e
    "$PY" benchmarks/tile_sweep.py "${TARGS[@]}"
    TILE_RC=$?
    set -e
  fi
fi

echo "== report"
RARGS=(--out "$MD")
[ -s "$TILES_JSON" ] && [ "$TILES" = 1 ] && RARGS+=(--tiles "$TILES_JSON")
REPORT_RC=0
set +e
if [ -s "$JSON" ]; then
  "$PY" benchmarks/report.py "$JSON" "${RARGS[@]}"
  REPORT_RC=$?
elif [ -s "$JSONL" ]; then
  echo "run_gpu.sh: no pytest-benchmark JSON (plugin missing or run cut short); building it from $JSONL"
  "$PY" benchmarks/report.py "$JSONL" "${RARGS[@]}" --write-json "$JSON"
  REPORT_RC=$?
else
  echo "run_gpu.sh: no results were written" >&2
  REPORT_RC=1
fi
set -e

if [ -s "$MD" ]; then
  echo
  cat "$MD"
fi
if [ -n "${OUT:-}" ]; then
  for f in "$JSON" "$JSONL" "$MD" "$TILES_JSON" "$TILES_MD"; do
    if [ -s "$f" ]; then cp "$f" "$OUT/"; fi
  done
  echo "== copied results to $OUT"
fi
echo "== done in ${SECONDS} s: benchmarks rc=$BENCH_RC, tile sweep rc=$TILE_RC, report rc=$REPORT_RC"
if [ "$BENCH_RC" -ne 0 ]; then exit "$BENCH_RC"; fi
if [ "$REPORT_RC" -ne 0 ]; then exit "$REPORT_RC"; fi
exit "$TILE_RC"
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  main "$@" 2>&1 | tee -a "$OUT/run_bench.log"
  exit "${PIPESTATUS[0]}"
fi
main "$@"
