#!/usr/bin/env bash
# Benchmark, in one command: (1) a PatchDPO training step at SDXL architecture, this library's recipe vs the
# official recipe side by side (benchmarks/test_bench_train.py), then (2) the fused PatchDPO loss kernels against the
# eager reference and torch.compile (benchmarks/test_bench_losses.py), then (3) the fused patch-matching kernel of
# the quality estimator against the same baselines (benchmarks/test_bench_match.py).
#
#   bash benchmarks/run_gpu.sh [--quick] [--tile-sweep] [--allow-cpu] [--no-train | --train-only] [--dry-run]
#
#   --dry-run     every stage at tiny size on the CPU, the Triton kernels in their interpreter (TRITON_INTERPRET=1):
#                 one step of the tiny model per training recipe (official, ours), one tiny case per loss op (triton
#                 and eager; one torch.compile), a tiny matching case, the tile sweep's CPU plumbing and the reports;
#                 files named *_dryrun, time budgets relaxed. A plumbing check that this script still works (CI runs
#                 it: tests/benchmarks_smoke/test_run_gpu_dry_run.py)
#   --quick       fewer training steps per recipe and one small shape per loss op (plumbing check, ~2 min)
#   --tile-sweep  afterwards, time a few PATCHDPO_FAST_TILE settings (fwd+bwd, realistic shapes) in the time left
#   --allow-cpu   without CUDA, run the CPU variant instead of failing (tiny training model, Triton cases skip)
#   --cpu         force the CPU variant (what benchmarks/run_cpu.sh does)
#   --no-train    skip the training-step stage (only the loss benchmarks, as before it existed)
#   --train-only  only the training-step stage (no loss or match benchmarks)
#
# PATCHDPO_SKIP_WHEELS=1 skips installing .whl/ (a caller that installed them already, benchmarks/gpu_session.sh).
# RESULTS_DIR (default benchmarks/results) is where every stage writes and where the report generators read.
# Needs python3 with torch, triton and pytest (the training stage also diffusers, transformers, pydantic, pyyaml,
# safetensors; bitsandbytes for its 8-bit variants); pytest-benchmark is used when importable. The package does not
# need to be installed: the checkout is put on PYTHONPATH and benchmarks/bench_common.py maps kernels/ to
# patchdpo_fast.kernels. Writes benchmarks/results/<gpu|cpu>_<device-slug>_<date>.{json,jsonl,md} (and
# tiles_<...>.{json,md}, train_<gpu|cpu>_<device-slug>_<date>.{json,md}, match_<device-slug>_<date>.json), prints
# the markdown reports and a match summary, copies everything (and the log) to $OUT when set, and exits non-zero
# when any benchmark, report, the tile sweep or a training recipe failed. A failing stage does not stop the others:
# each writes its own files.
#
# Time: the whole script aims to end within TOTAL_BUDGET_S (default 540 s). The training stage runs first (SDXL
# build + 6 recipes; expected ~1.5-2 min on an H200), starts no new recipe after TRAIN_TIMEOUT_S - 60 s and is
# interrupted at TRAIN_TIMEOUT_S (default 240 s; its JSON is rewritten after every recipe). The loss suite stops
# starting new cases after BENCH_BUDGET_S (default 330 s; expected ~3-4 min on an H200) and is killed at
# BENCH_TIMEOUT_S (default 450 s); after a training stage both are lowered if needed to fit what is left of
# TOTAL_BUDGET_S (timeout = left - 30 s, budget = timeout - 120 s). The tile sweep gets what is left (at most
# TILE_BUDGET_S, default 150 s) and is skipped below 45 s. The match stage runs right after the loss suite, with its
# own timeout MATCH_TIMEOUT_S (default 60 s; 0 skips it), which the loss stage leaves free of TOTAL_BUDGET_S; cut
# short, it keeps the cases measured so far (SIGINT: pytest-benchmark still writes its JSON) and does not fail.
# BENCH_COMPILE=static times torch.compile with one static-shape compile per case instead of one dynamic-shape
# compile per op (a stronger baseline; ~80 Inductor compiles on the GPU set, so it does not fit 5 minutes).
set -euo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
RES="${RESULTS_DIR:-$REPO/benchmarks/results}"
mkdir -p "$RES"

main() {
QUICK=0
TILES=0
ALLOW_CPU=0
DEVICE=cuda
TRAIN=1
LOSSES=1
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1; QUICK=1; TILES=1; DEVICE=cpu ;;
    --quick) QUICK=1 ;;
    --tile-sweep) TILES=1 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    --cpu) DEVICE=cpu ;;
    --no-train) TRAIN=0 ;;
    --train-only) LOSSES=0 ;;
    -h | --help) sed -n '2,42p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "run_gpu.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

if [ "$DRY" = 1 ]; then
  # a plumbing check must not be cut short by the GPU run's time budgets (a busy CPU can be slow); only hangs are
  TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-3600}" BENCH_BUDGET_S="${BENCH_BUDGET_S:-3000}"
  BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-3000}" TILE_BUDGET_S="${TILE_BUDGET_S:-600}"
  TRAIN_TIMEOUT_S="${TRAIN_TIMEOUT_S:-1200}" MATCH_TIMEOUT_S="${MATCH_TIMEOUT_S:-600}"
fi
TOTAL_BUDGET_S="${TOTAL_BUDGET_S:-540}"
BENCH_BUDGET_S="${BENCH_BUDGET_S:-330}"
BENCH_TIMEOUT_S="${BENCH_TIMEOUT_S:-450}"
TILE_BUDGET_S="${TILE_BUDGET_S:-150}"
TRAIN_TIMEOUT_S="${TRAIN_TIMEOUT_S:-240}"
MATCH_TIMEOUT_S="${MATCH_TIMEOUT_S:-60}"
MATCH_RESERVE_S=0
MATCH_OUT=""
[ "$LOSSES" = 1 ] && MATCH_RESERVE_S="$MATCH_TIMEOUT_S"
BENCH_COMPILE="${BENCH_COMPILE:-dynamic}"
if [ "$TRAIN" = 0 ] && [ "$LOSSES" = 0 ]; then
  echo "run_gpu.sh: --no-train and --train-only together leave nothing to run" >&2
  exit 2
fi

if [ "$DRY" = 1 ]; then
  echo "run_gpu.sh: dry run: tiny sizes on the CPU, Triton kernels in their interpreter; timings are meaningless"
  export TRITON_INTERPRET=1 PATCHDPO_BENCH_DRY_RUN=1
elif [ -n "${TRITON_INTERPRET:-}" ]; then
  echo "run_gpu.sh: unsetting TRITON_INTERPRET=${TRITON_INTERPRET} (the interpreter is for correctness tests only)"
  unset TRITON_INTERPRET
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${PATCHDPO_SKIP_WHEELS:-}" ] && compgen -G "$REPO/.whl/*.whl" > /dev/null; then  # carried wheels (fetch_gpu_wheels.sh)
  echo "== installing carried wheels from .whl/ into /tmp/patchdpo_site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/patchdpo_site \
    "$REPO"/.whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/patchdpo_site"
fi
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
versions = []
for mod in ("diffusers", "transformers", "bitsandbytes"):
    try:
        versions.append(f"{mod} {__import__(mod).__version__}")
    except Exception as exc:
        versions.append(f"{mod} NOT IMPORTABLE ({type(exc).__name__})")
print("training stage: " + "  ".join(versions))
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
RUN_TAG=""
[ "$QUICK" = 1 ] && RUN_TAG="_quick"
[ "$DRY" = 1 ] && RUN_TAG="_dryrun"
NAME="${PREFIX}_${SLUG}_$(date -u +%Y%m%d)${RUN_TAG}"
[ "$BENCH_COMPILE" = static ] && NAME="${NAME}_static"
JSON="$RES/$NAME.json"
JSONL="$RES/$NAME.jsonl"
MD="$RES/$NAME.md"
TILES_JSON="$RES/tiles_${NAME#*_}.json"
TILES_MD="$RES/tiles_${NAME#*_}.md"
TRAIN_NAME="train_${PREFIX}_${SLUG}_$(date -u +%Y%m%d)${RUN_TAG}"
TRAIN_JSON="$RES/$TRAIN_NAME.json"
TRAIN_MD="$RES/$TRAIN_NAME.md"
MATCH_JSON="$RES/match_${SLUG}_$(date -u +%Y%m%d)${RUN_TAG}.json"

TRAIN_RC=0
if [ "$TRAIN" = 1 ]; then
  rm -f "$TRAIN_JSON" "$TRAIN_MD"
  TRAIN_ARGS=(benchmarks/test_bench_train.py --device "$DEVICE" --out-json "$TRAIN_JSON" --out-md "$TRAIN_MD"
              --budget-s $((TRAIN_TIMEOUT_S > 120 ? TRAIN_TIMEOUT_S - 60 : TRAIN_TIMEOUT_S / 2)))
  [ "$QUICK" = 1 ] && TRAIN_ARGS+=(--quick)
  [ "$DRY" = 1 ] && TRAIN_ARGS+=(--warmup 1 --steps 1 --pairs 1 --recipes official,ours)
  TTIMEOUT=()
  command -v timeout >/dev/null 2>&1 && TTIMEOUT=(timeout -s INT -k 30 "$TRAIN_TIMEOUT_S")
  echo "== training step benchmark (timeout ${TRAIN_TIMEOUT_S} s): $PY ${TRAIN_ARGS[*]}"
  set +e
  ${TTIMEOUT[@]+"${TTIMEOUT[@]}"} "$PY" "${TRAIN_ARGS[@]}"
  TRAIN_RC=$?
  if [ -s "$TRAIN_JSON" ] && [ ! -s "$TRAIN_MD" ]; then  # interrupted: rebuild the report from the partial JSON
    "$PY" benchmarks/train_report.py "$TRAIN_JSON" --out "$TRAIN_MD" && cat "$TRAIN_MD"
  fi
  [ -s "$TRAIN_JSON" ] || { echo "run_gpu.sh: the training benchmark wrote no results" >&2; [ "$TRAIN_RC" -ne 0 ] || TRAIN_RC=1; }
  set -e
  echo "== training step benchmark finished with exit status $TRAIN_RC after ${SECONDS} s: $TRAIN_JSON"
  LEFT=$((TOTAL_BUDGET_S - SECONDS - 30 - MATCH_RESERVE_S))
  if [ "$LOSSES" = 1 ] && [ "$LEFT" -lt "$BENCH_TIMEOUT_S" ]; then
    [ "$LEFT" -lt 150 ] && LEFT=150
    BENCH_TIMEOUT_S="$LEFT"
    [ "$BENCH_BUDGET_S" -gt $((LEFT - 120)) ] && BENCH_BUDGET_S=$((LEFT - 120))
    echo "== loss benchmarks get what is left of TOTAL_BUDGET_S=${TOTAL_BUDGET_S} (less ${MATCH_RESERVE_S} s for the match stage): budget ${BENCH_BUDGET_S} s, timeout ${BENCH_TIMEOUT_S} s"
  fi
fi

BENCH_RC=0
TILE_RC=0
REPORT_RC=0
MATCH_RC=0
if [ "$LOSSES" = 1 ]; then
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

# (3) patch matching (quality estimator): fused Triton kernel vs eager vs torch.compile, one short stage
MLEFT=$((TOTAL_BUDGET_S - SECONDS - 15))
MT="$MATCH_TIMEOUT_S"
[ "$MT" -gt "$MLEFT" ] && MT="$MLEFT"
MATCH_OUT=""
if [ "$MATCH_TIMEOUT_S" -le 0 ]; then
  echo "== match benchmark skipped (MATCH_TIMEOUT_S=$MATCH_TIMEOUT_S)"
elif [ "$MT" -lt 20 ]; then
  echo "== match benchmark skipped: ${MT} s for it is too little (MATCH_TIMEOUT_S=${MATCH_TIMEOUT_S}, ${MLEFT} s left of TOTAL_BUDGET_S=${TOTAL_BUDGET_S})"
elif ! "$PY" -c "import pytest_benchmark" 2>/dev/null; then
  echo "== match benchmark skipped: pytest-benchmark is not importable (benchmarks/test_bench_match.py needs it)"
else
  rm -f "$MATCH_JSON"
  MATCH_OUT="$MATCH_JSON"
  MARGS=(benchmarks/test_bench_match.py -p no:cacheprovider -q --bench-device "$DEVICE" -W "ignore::DeprecationWarning"
         --benchmark-json "$MATCH_JSON" --benchmark-quiet --benchmark-sort=name
         --benchmark-storage "file://${TMPDIR:-/tmp}/patchdpo_bench_storage")
  [ "$QUICK" = 1 ] && [ "$DRY" = 0 ] && MARGS+=(-k Nq256)  # one shape: B4 x 256 x 256 x 128 on the CPU, B256 x 256 x 256 x 768 on CUDA
  MENV=()
  [ "$DEVICE" = cpu ] && MENV=(env CUDA_VISIBLE_DEVICES=)  # --cpu on a GPU machine: the CPU cases
  MTIMEOUT=()
  command -v timeout >/dev/null 2>&1 && MTIMEOUT=(timeout -s INT -k 15 "$MT")
  echo "== match benchmark (timeout ${MT} s): $PY -m pytest ${MARGS[*]}"
  set +e
  ${MENV[@]+"${MENV[@]}"} ${MTIMEOUT[@]+"${MTIMEOUT[@]}"} "$PY" -m pytest "${MARGS[@]}"
  MATCH_RC=$?
  set -e
  if [ "$MATCH_RC" = 124 ] && [ -s "$MATCH_JSON" ]; then
    echo "run_gpu.sh: the match benchmark hit its ${MT} s timeout; $MATCH_JSON holds the cases measured before it"
    MATCH_RC=0
  elif [ "$MATCH_RC" = 5 ]; then
    echo "run_gpu.sh: the match benchmark collected no case"
    MATCH_RC=0
  elif [ ! -s "$MATCH_JSON" ]; then
    echo "run_gpu.sh: the match benchmark wrote no results" >&2
    [ "$MATCH_RC" -ne 0 ] || MATCH_RC=1
  fi
  if [ -s "$MATCH_JSON" ]; then
    "$PY" - "$MATCH_JSON" <<'PYEOF' || true
import json, sys
rows = [b.get("extra_info", {}) for b in json.load(open(sys.argv[1])).get("benchmarks", [])]
print(f"{'impl':<9} {'B x Nq x Nk x D':<22} {'dtype':<9} {'median ms':>10} {'TFLOP/s':>8} {'sim. matrix MiB':>16}")
for r in sorted(rows, key=lambda r: (r.get("shape"), r.get("dtype"), r.get("impl"))):
    shape = " x ".join(map(str, r.get("shape", [])))
    print(f"{r.get('impl', '?'):<9} {shape:<22} {r.get('dtype', '?'):<9} {1e3 * r.get('median_s', float('nan')):>10.3f} "
          f"{r.get('tflops', float('nan')):>8.2f} {r.get('similarity_matrix_mib', float('nan')):>16.1f}")
PYEOF
  fi
  echo "== match benchmark finished with exit status $MATCH_RC after ${SECONDS} s: $MATCH_JSON"
fi

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
fi  # LOSSES

if [ -n "${OUT:-}" ]; then
  for f in "$JSON" "$JSONL" "$MD" "$TILES_JSON" "$TILES_MD" "$TRAIN_JSON" "$TRAIN_MD" ${MATCH_OUT:+"$MATCH_OUT"}; do
    if [ -s "$f" ]; then cp "$f" "$OUT/"; fi
  done
  echo "== copied results to $OUT"
fi
[ "$TRAIN" = 1 ] && echo "== training step results: $TRAIN_MD (exit status $TRAIN_RC)"
echo "== done in ${SECONDS} s: train rc=$TRAIN_RC, benchmarks rc=$BENCH_RC, match rc=$MATCH_RC, tile sweep rc=$TILE_RC, report rc=$REPORT_RC"
if [ "$BENCH_RC" -ne 0 ]; then exit "$BENCH_RC"; fi
if [ "$REPORT_RC" -ne 0 ]; then exit "$REPORT_RC"; fi
if [ "$MATCH_RC" -ne 0 ]; then exit "$MATCH_RC"; fi
if [ "$TILE_RC" -ne 0 ]; then exit "$TILE_RC"; fi
exit "$TRAIN_RC"
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  main "$@" 2>&1 | tee -a "$OUT/run_bench.log"
  exit "${PIPESTATUS[0]}"
fi
main "$@"
