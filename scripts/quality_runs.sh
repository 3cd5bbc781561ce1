#!/usr/bin/env bash
# The quality figures of docs/quality.md, reproducible: the AUROC-vs-minutes curve of `quality-train` (1, 3 and 10
# CPU minutes), the leave-one-family-out estimators (3 CPU minutes each, one per defect family) and their grades on
# the validation and the test split, each printed beside the raw-pixel baseline. One intra-op thread per process
# (--minutes counts the process's CPU time, so the figures do not depend on what else runs on the machine).
#
#   bash scripts/quality_runs.sh [curve|lofo|all]     # DATA=../shared/data/dreambench256 OUT=runs/quality
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
DATA=${DATA:-../shared/data/dreambench256}
OUT=${OUT:-runs/quality}
PY=.venv/bin/python
HELD_OUT=backpack_dog,can,dog3,robot_toy,bear_plushie,clock,dog8,pink_sunglasses  # val + test subjects
FAMILIES="smear recolor missing duplicate foreign resample"

train() { "$PY" -m patchdpo_fast.quality.train_backbone --images "$DATA" --exclude-subjects "$HELD_OUT" \
    --threads 1 --no-progress "$@"; }
grade() { "$PY" -m patchdpo_fast.quality.evaluate --images "$DATA" --threads 1 "$@"; }

if [[ $what == curve || $what == all ]]; then
    for m in 1 3 10; do
        train --out "$OUT/minutes-$m" --minutes "$m"
        for split in val test; do grade --estimator "$OUT/minutes-$m" --split "$split" --out "$OUT/minutes-$m.$split.json"; done
    done
fi
if [[ $what == lofo || $what == all ]]; then
    for f in $FAMILIES; do train --out "$OUT/lofo/$f" --minutes 3 --exclude-families "$f"; done
    for split in val test; do grade --lofo "$OUT/lofo" --split "$split" --out "$OUT/lofo.$split.json"; done
fi
