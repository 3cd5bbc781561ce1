#!/usr/bin/env bash
# Everything a lent GPU session checks, in ONE command that ends within ~9 minutes (the device budget is 15 minutes
# per session, machine start included):
#
#   1. environment: GPU, driver, torch / triton / diffusers versions (env.txt);
#   2. correctness of the compiled kernels on the device: tests/gpu (every loss op x dtype x layout x odd shapes x
#      grad_output != 1 x a large batch against the float64 reference, patch matching, torch.compile, the tiny
#      trainer on CUDA) and the gpu-marked tests of the CPU suite; pytest-xdist when available (compiles run in
#      parallel), killed at GPU_TESTS_TIMEOUT_S (default 100 s);
#   3. the training-step benchmark at SDXL architecture (ours vs the official recipe), TRAIN_TIMEOUT_S (140 s);
#   4. the loss-kernel and patch-matching benchmarks (benchmarks/run_gpu.sh --no-train) in what is left of
#      SESSION_BUDGET_S (default 540 s), less MEMORY_RESERVE_S for stage 5;
#   5. if benchmarks/gpu_memory_check.py exists: measured CUDA memory of training steps against the memory plan.
#
#   bash benchmarks/gpu_session.sh            # on the GPU machine, from the repository root
#   bash benchmarks/gpu_session.sh --dry-run  # the plumbing on a CPU machine (stages 2-5 at tiny size / skipped)
#
# Wheels the image lacks are installed from .whl/ (benchmarks/fetch_gpu_wheels.sh) and this checkout into a private
# folder, so nothing outside /tmp changes. Results land in RESULTS_DIR (default /tmp/patchdpo_gpu_results); with $OUT
# set, they are packed into $OUT/gpu_results.tar.gz (the device tool returns at most 8 files) beside the log.
# A failing stage does not stop the later ones; the exit status is the first failure's.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
RES="${RESULTS_DIR:-/tmp/patchdpo_gpu_results}"
SESSION_BUDGET_S="${SESSION_BUDGET_S:-540}"
GPU_TESTS_TIMEOUT_S="${GPU_TESTS_TIMEOUT_S:-100}"
TRAIN_TIMEOUT_S="${TRAIN_TIMEOUT_S:-140}"
MEMORY_RESERVE_S="${MEMORY_RESERVE_S:-90}"
mkdir -p "$RES"
LOG="$RES/session.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
FIRST_RC=0
note_rc() { [ "$FIRST_RC" = 0 ] && [ "$1" != 0 ] && FIRST_RC="$1"; echo "== $2 finished with exit status $1 after ${SECONDS} s"; }

echo "== gpu_session $(date -u +%Y-%m-%dT%H:%M:%SZ) in $REPO (dry run: $DRY)"
SITE=/tmp/patchdpo_site
if compgen -G "$REPO/.whl/*.whl" > /dev/null && [ "$DRY" = 0 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$REPO"/.whl/*.whl \
    || echo "gpu_session: installing the carried wheels failed"
fi
PKG=/tmp/patchdpo_pkg
rm -rf "$PKG"
# the package itself (patchdpo_fast.kernels is the top-level kernels/ folder once installed)
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$PKG" "$REPO" \
  || { echo "gpu_session: installing this checkout failed"; exit 1; }
export PYTHONPATH="$PKG:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "== 1. environment"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  "$PY" - <<'PYEOF'
import importlib, platform
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}  sm_{p.major}{p.minor}  {p.multi_processor_count} SMs  {p.total_memory / 2**30:.1f} GiB")
for mod in ("triton", "diffusers", "transformers", "peft", "bitsandbytes", "deepspeed", "pydantic", "pytest",
            "pytest_benchmark", "xdist", "patchdpo_fast"):
    try:
        m = importlib.import_module(mod)
        print(f"{mod} {getattr(m, '__version__', '?')}  {getattr(m, '__file__', '')}")
    except Exception as exc:
        print(f"{mod} NOT IMPORTABLE ({type(exc).__name__}: {exc})")
PYEOF
} 2>&1 | tee "$RES/env.txt"

echo "== 2. compiled kernels on the device (timeout ${GPU_TESTS_TIMEOUT_S} s)"
if [ "$DRY" = 1 ]; then
  echo "gpu_session: dry run: the gpu tests only get collected"
  (cd /tmp && "$PY" -m pytest -p no:cacheprovider -q --collect-only "$REPO/tests/gpu" > "$RES/gpu_tests.txt" 2>&1)
  note_rc $? "gpu test collection"
else
  XDIST=()
  "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 8)
  (cd /tmp && TRITON_INTERPRET=0 timeout -s INT -k 15 "$GPU_TESTS_TIMEOUT_S" "$PY" -m pytest -p no:cacheprovider \
    -q -rfEs --durations=10 ${XDIST[@]+"${XDIST[@]}"} --junitxml "$RES/gpu_tests.xml" -m gpu \
    "$REPO/tests/gpu" "$REPO/tests/ops/test_losses.py" "$REPO/tests/quality/test_quality_matching.py" \
    "$REPO/tests/models/test_attention_backends.py" 2>&1 | tee "$RES/gpu_tests.txt")
  note_rc "${PIPESTATUS[0]}" "gpu tests"
fi

echo "== 3. training step benchmark (timeout ${TRAIN_TIMEOUT_S} s)"
STEM="train_gpu_$("$PY" -c "import re,torch; print(re.sub(r'[^a-z0-9]+','-',torch.cuda.get_device_name(0).lower()).strip('-') if torch.cuda.is_available() else 'cpu')")_$(date -u +%Y%m%d)"
TARGS=(benchmarks/test_bench_train.py --out-json "$RES/$STEM.json" --out-md "$RES/$STEM.md"
       --budget-s $((TRAIN_TIMEOUT_S - 60)))
[ "$DRY" = 1 ] && TARGS+=(--device cpu --warmup 1 --steps 1 --pairs 1 --recipes official,ours)
timeout -s INT -k 20 "$TRAIN_TIMEOUT_S" "$PY" "${TARGS[@]}"
rc=$?
if [ -s "$RES/$STEM.json" ] && [ ! -s "$RES/$STEM.md" ]; then
  "$PY" benchmarks/train_report.py "$RES/$STEM.json" --out "$RES/$STEM.md"
fi
note_rc "$rc" "training step benchmark"

LEFT=$((SESSION_BUDGET_S - SECONDS - MEMORY_RESERVE_S))
echo "== 4. loss and matching benchmarks in ${LEFT} s"
if [ "$LEFT" -lt 120 ] && [ "$DRY" = 0 ]; then
  echo "gpu_session: skipped: too little time left"
else
  MATCH=40
  BT=$((LEFT - MATCH - 20))
  BB=$((BT - 90))
  [ "$BB" -lt 30 ] && BB=30
  if [ "$DRY" = 1 ]; then
    RESULTS_DIR="$RES" OUT= PATCHDPO_SKIP_WHEELS=1 bash benchmarks/run_gpu.sh --dry-run --no-train
  else
    RESULTS_DIR="$RES" OUT= PATCHDPO_SKIP_WHEELS=1 TOTAL_BUDGET_S="$LEFT" BENCH_TIMEOUT_S="$BT" BENCH_BUDGET_S="$BB" \
      MATCH_TIMEOUT_S="$MATCH" bash benchmarks/run_gpu.sh --no-train
  fi
  note_rc $? "loss and matching benchmarks"
fi

echo "== 5. memory plan against CUDA allocations"
if [ -f benchmarks/gpu_memory_check.py ]; then
  MT=$((SESSION_BUDGET_S - SECONDS))
  [ "$MT" -lt 30 ] && MT=30
  MARGS=(benchmarks/gpu_memory_check.py --out-json "$RES/memory_gpu.json" --out-md "$RES/memory_gpu.md")
  [ "$DRY" = 1 ] && MARGS+=(--dry-run)
  timeout -s INT -k 10 "$MT" "$PY" "${MARGS[@]}"
  note_rc $? "memory check"
else
  echo "gpu_session: benchmarks/gpu_memory_check.py is not in this checkout: skipped"
fi

echo "== done in ${SECONDS} s, first failure's exit status: $FIRST_RC"
if [ -n "${OUT:-}" ]; then
  tar -C "$RES" -czf "$OUT/gpu_results.tar.gz" . && cp "$LOG" "$OUT/session.log"
  ls -la "$OUT"
fi
exit "$FIRST_RC"
