#!/usr/bin/env bash
# The quality figures of docs/quality.md, reproducible. Every estimator is trained on the 12 train subjects of
# ../shared/data/dreambench256 (the 8 val + test subjects excluded) with 2 torch threads; --minutes counts the
# process's CPU time, so a figure does not depend on what else runs on the machine (only how long it takes).
#
#   bash scripts/quality_runs.sh STAGE [STAGE ...]      # DATA=../shared/data/dreambench256 OUT=runs/quality
#
# Stages (a finished run or grade is skipped, so a stage can be rerun after an interruption; stages touching other
# runs can go in parallel, each process counts its own CPU time):
#   curve     m3 m1 m10: quality-train --minutes 3, 1, 10 with the default recipe, graded on val (raw-pixel beside)
#   choices   m3 grid hard noglobal: the recipe choices at 3 minutes graded on val: the default recipe, the first
#             version's grid recipe (--recipe grid), --hard-labels, --no-global-changes
#   lofo      leave-one-family-out: one 3-minute estimator per defect family that never saw it, graded on val
#   ship      the ship candidate: the default recipe for $SHIP_MINUTES (20) minutes, graded on val
#   shipped   the shipped estimator (tiny-trained) on val, as shipped-v2 (the shipped-v1 figures of docs/quality.md
#             are the first version's asset, replaced after issue 11's sharpship stage; it is in git at a29c7e2)
#   test      the test split, once: the 3-minute default run, the leave-one-family-out estimators and the shipped
#             estimator (a ship candidate is graded on test only once it replaces the shipped one)
# The stages above are the first off-grid recipe's: whole 256 px views all the time (--crop-fraction 0; the default
# before progressive resizing). Progressive resizing, quality-train's default now (the first 60 % of the budget on
# 128 px crops at the photos' pixel scale, then whole views):
#   prog      p3 p1 p10: the default recipe for 3, 1, 10 minutes, graded on val
#   progknobs 3-minute variants graded on val: no crops (a rerun of minutes-3 beside the others), crop fraction
#             0.85, 16 crops per step, 96 px crops, lr 2e-3, best-match BCE weight 3, and seed 1 of the default and
#             of no crops (seed noise)
#   progtest  the test split, once: the 3-minute default run
# The runs above wrote estimators without the sharpness channel (their folders have no sharpness_weight); the
# default now joins the relative local sharpness to the features (--sharpness-weight 0.3, docs/quality.md "Why
# blur-like defects are hard"). Its stages, each run on seeds 0 and 1:
#   sharp     sharp-3-off: the default before (--sharpness-weight 0), rerun beside; sharp-3: the default now;
#             sharp-3-in-loss: the channel in the training loss too; sharp-3-no-global-blur: no whole-image blur
#             among the global changes, graded with the channel and without it (.w0)
#   sharptest the test split, once: sharp-3 (seed 0)
#   sharpship the ship candidate with the default now (progressive resizing, sharpness channel) for $SHARP_SHIP_MINUTES
#             (30) minutes, graded on val
#   sharplofo leave-one-family-out with the default now: one 3-minute estimator per family that never saw it, on val
#   sharplr   lr 2e-3 with the default now, seeds 0 and 1, on val (lr 2e-3 helped missing / duplicate / resample and
#             hurt smear without the channel, and the channel covers smear), and the default (lr 1e-3) rerun beside
#   lrlofo    leave-one-family-out with lr 2e-3 (the default after sharplr), on val
#   lrtest    the test split, once: sharp-3-lr-2e-3 (seed 0) and the lrlofo estimators
#   sharpfinal the test split, once: the sharpship candidate and the sharplofo estimators
# Every run above passes --lr 1e-3, the default of all the stages above until quality-train's default became 2e-3 after
# the sharplr stage (a stage's own --lr, in progknobs, sharplr and lrlofo, comes later on the command line and wins),
# and --reference-scales 1 --reference-shift 0: no reference views, which quality-train writes by default since the
# views stages (docs/quality.md, "Reference views"; views change how an estimator is graded, not how it trains).
#   views     existing backbones graded with the default reference views on val (.views): sharp-3-lr-2e-3 and its
#             seed 1 (the same backbones with and without views), and sharp-ship-60 (the shipped backbone)
#   shipviews the shipped estimator gets the default views: scripts/quality_refit.py on its folder (calibration refitted
#             on the 12 train subjects), then graded on val as shipped-v3
#   viewsrun  fresh runs with quality-train's defaults as they are now (lr 2e-3, reference views): views-3 (seeds 0
#             and 1) and one leave-one-family-out estimator per family (views-lofo), graded on val
#   viewstest the test split, once: views-3 (seed 0), views-lofo and the shipped estimator with its views
# THREADS (2) is what every stage above passes to quality-train. On a 2-core machine alone, one thread makes ~45 %
# more steps of the tiny backbone per CPU second and as many per wall second; quality-train's default since the
# threads stage is 1 thread for the tiny backbone on CPU (docs/quality.md, "Threads"):
#   threads   views-3 with --threads 1 and --threads 2 (seed 0, each run alone on the machine), leave-one-family-out
#             with --threads 1 (views-lofo-t1), views-3 --threads 1 seed 1, all graded on val
#   threadstest the test split, once: views-3-threads-1 and views-lofo-t1
#   threadscurve the curve with the defaults as they are now (views, one thread): 1 and 10 CPU minutes, graded on val
set -euo pipefail
cd "$(dirname "$0")/.."
# idle OpenMP threads sleep instead of spinning: with the default (spin) policy a thread whose partner is
# descheduled burns CPU time at every barrier, and --minutes (CPU time) would buy 10x fewer steps on a busy machine
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
DATA=${DATA:-../shared/data/dreambench256}
OUT=${OUT:-runs/quality}
THREADS=${THREADS:-2}
SHIP_MINUTES=${SHIP_MINUTES:-20}
SHARP_SHIP_MINUTES=${SHARP_SHIP_MINUTES:-30}
PY=.venv/bin/python
HELD_OUT=backpack_dog,can,dog3,robot_toy,bear_plushie,clock,dog8,pink_sunglasses  # val + test subjects
FAMILIES="smear recolor missing duplicate foreign resample"

train() {  # train NAME MINUTES [quality-train flags]
    local name=$1 minutes=$2
    shift 2
    [[ -f $OUT/$name/quality_config.json ]] && return 0
    echo "== $(date -u +%H:%M:%S) quality-train $name ($minutes CPU min) $*"
    "$PY" -m patchdpo_fast.quality.train_backbone --images "$DATA" --exclude-subjects "$HELD_OUT" \
        --threads "$THREADS" --no-progress --seed 0 --lr 1e-3 --reference-scales 1 --reference-shift 0 \
        --out "$OUT/$name" --minutes "$minutes" "$@"
}
fresh() {  # fresh NAME MINUTES [quality-train flags]: quality-train with its defaults as they are now
    local name=$1 minutes=$2
    shift 2
    [[ -f $OUT/$name/quality_config.json ]] && return 0
    echo "== $(date -u +%H:%M:%S) quality-train $name ($minutes CPU min, defaults) $*"
    "$PY" -m patchdpo_fast.quality.train_backbone --images "$DATA" --exclude-subjects "$HELD_OUT" \
        --threads "$THREADS" --no-progress --out "$OUT/$name" --minutes "$minutes" "$@"
}
grade() {  # grade NAME SPLIT [quality-eval flags]
    local name=$1 split=$2
    shift 2
    [[ -f $OUT/$name.$split.json ]] && return 0
    echo "== $(date -u +%H:%M:%S) quality-eval $name ($split) $*"
    "$PY" -m patchdpo_fast.quality.evaluate --images "$DATA" --threads "$THREADS" --split "$split" \
        --out "$OUT/$name.$split.json" "$@"
}

run() {  # one stage
    case $1 in
    curve) run m3; run m1; run m10 ;;
    choices) run m3; run grid; run hard; run noglobal ;;
    m1 | m3 | m10)
        train "minutes-${1#m}" "${1#m}" --crop-fraction 0
        grade "minutes-${1#m}" val --estimator "$OUT/minutes-${1#m}"
        ;;
    grid)
        train grid-3 3 --recipe grid
        grade grid-3 val --estimator "$OUT/grid-3"
        ;;
    hard)
        train hard-labels-3 3 --hard-labels --crop-fraction 0
        grade hard-labels-3 val --estimator "$OUT/hard-labels-3"
        ;;
    noglobal)
        train no-global-3 3 --no-global-changes --crop-fraction 0
        grade no-global-3 val --estimator "$OUT/no-global-3"
        ;;
    lofo)
        for f in $FAMILIES; do train "lofo/$f" 3 --exclude-families "$f" --crop-fraction 0; done
        grade lofo val --lofo "$OUT/lofo"
        ;;
    ship)
        train "ship-$SHIP_MINUTES" "$SHIP_MINUTES" --crop-fraction 0
        grade "ship-$SHIP_MINUTES" val --estimator "$OUT/ship-$SHIP_MINUTES"
        ;;
    prog) run p3; run p1; run p10 ;;
    p1 | p3 | p10)
        train "prog-minutes-${1#p}" "${1#p}"
        grade "prog-minutes-${1#p}" val --estimator "$OUT/prog-minutes-${1#p}"
        ;;
    progknobs)
        local -a knobs=("no-crops:--crop-fraction 0" "crop-fraction-0.85:--crop-fraction 0.85"
            "crop-batch-16:--crop-batch-size 16" "crop-96:--crop-size 96" "lr-2e-3:--lr 2e-3"
            "bce-3:--bce-weight 3" "seed-1:--seed 1" "no-crops-seed-1:--crop-fraction 0 --seed 1")
        local knob
        for knob in "${knobs[@]}"; do
            # shellcheck disable=SC2086  # the flags split on purpose
            train "prog-3-${knob%%:*}" 3 ${knob#*:}
            grade "prog-3-${knob%%:*}" val --estimator "$OUT/prog-3-${knob%%:*}"
        done
        ;;
    progtest)
        grade prog-minutes-3 test --estimator "$OUT/prog-minutes-3"
        ;;
    sharp)
        local -a runs=("sharp-3-off:--sharpness-weight 0" "sharp-3:" "sharp-3-in-loss:--sharpness-in-loss"
            "sharp-3-no-global-blur:--no-global-blur")
        local r name seed
        for seed in 0 1; do
            for r in "${runs[@]}"; do
                name=${r%%:*}
                [[ $seed == 1 ]] && name+=-seed-1
                # shellcheck disable=SC2086  # the flags split on purpose
                train "$name" 3 ${r#*:} --seed "$seed"
                grade "$name" val --estimator "$OUT/$name"
            done
            name=sharp-3-no-global-blur
            [[ $seed == 1 ]] && name+=-seed-1
            grade "$name.w0" val --estimator "$OUT/$name" --sharpness-weight 0
        done
        ;;
    sharptest)
        grade sharp-3 test --estimator "$OUT/sharp-3"
        ;;
    sharpship)
        train "sharp-ship-$SHARP_SHIP_MINUTES" "$SHARP_SHIP_MINUTES"
        grade "sharp-ship-$SHARP_SHIP_MINUTES" val --estimator "$OUT/sharp-ship-$SHARP_SHIP_MINUTES"
        ;;
    sharplofo)
        for f in $FAMILIES; do train "sharp-lofo/$f" 3 --exclude-families "$f"; done
        grade sharp-lofo val --lofo "$OUT/sharp-lofo"
        ;;
    sharplr)
        local lr seed name
        for lr in 2e-3 1e-3; do
            for seed in 0 1; do
                name=sharp-3-lr-$lr
                [[ $seed == 1 ]] && name+=-seed-1
                train "$name" 3 --lr "$lr" --seed "$seed"
                grade "$name" val --estimator "$OUT/$name"
            done
        done
        ;;
    lrlofo)
        for f in $FAMILIES; do train "lr-lofo/$f" 3 --exclude-families "$f" --lr 2e-3; done
        grade lr-lofo val --lofo "$OUT/lr-lofo"
        ;;
    lrtest)
        grade sharp-3-lr-2e-3 test --estimator "$OUT/sharp-3-lr-2e-3"
        grade lr-lofo test --lofo "$OUT/lr-lofo"
        ;;
    sharpfinal)
        grade "sharp-ship-$SHARP_SHIP_MINUTES" test --estimator "$OUT/sharp-ship-$SHARP_SHIP_MINUTES"
        grade sharp-lofo test --lofo "$OUT/sharp-lofo"
        ;;
    shipped)
        grade shipped-v2 val --estimator tiny-trained --reference-scales 1 --reference-shift 0
        ;;
    views)
        local -a views=(--reference-scales 1,1.2 --reference-crops 3 --reference-shift 0.5)
        local name
        for name in sharp-3-lr-2e-3 sharp-3-lr-2e-3-seed-1 sharp-ship-60; do
            grade "$name.views" val --estimator "$OUT/$name" "${views[@]}"
        done
        ;;
    viewsrun)
        fresh views-3 3
        grade views-3 val --estimator "$OUT/views-3"
        for f in $FAMILIES; do fresh "views-lofo/$f" 3 --exclude-families "$f"; done
        grade views-lofo val --lofo "$OUT/views-lofo"
        fresh views-3-seed-1 3 --seed 1
        grade views-3-seed-1 val --estimator "$OUT/views-3-seed-1"
        ;;
    shipviews)
        "$PY" scripts/quality_refit.py patchdpo_fast/quality/assets/tiny_dreambench --images "$DATA" \
            --reference-scales 1,1.2 --reference-crops 3 --reference-shift 0.5
        grade shipped-v3 val --estimator tiny-trained
        ;;
    viewstest)
        grade views-3 test --estimator "$OUT/views-3"
        grade views-lofo test --lofo "$OUT/views-lofo"
        grade shipped-v3 test --estimator tiny-trained
        ;;
    threads)
        fresh views-3-threads-1 3 --threads 1
        grade views-3-threads-1 val --estimator "$OUT/views-3-threads-1"
        fresh views-3-threads-2 3 --threads 2
        grade views-3-threads-2 val --estimator "$OUT/views-3-threads-2"
        for f in $FAMILIES; do fresh "views-lofo-t1/$f" 3 --threads 1 --exclude-families "$f"; done
        grade views-lofo-t1 val --lofo "$OUT/views-lofo-t1"
        fresh views-3-threads-1-seed-1 3 --threads 1 --seed 1
        grade views-3-threads-1-seed-1 val --estimator "$OUT/views-3-threads-1-seed-1"
        ;;
    threadscurve)
        for m in 1 10; do
            fresh "views-$m-threads-1" "$m" --threads 1
            grade "views-$m-threads-1" val --estimator "$OUT/views-$m-threads-1"
        done
        ;;
    threadstest)
        grade views-3-threads-1 test --estimator "$OUT/views-3-threads-1"
        grade views-lofo-t1 test --lofo "$OUT/views-lofo-t1"
        ;;
    test)
        grade minutes-3 test --estimator "$OUT/minutes-3"
        grade lofo test --lofo "$OUT/lofo"
        grade shipped-v2 test --estimator tiny-trained --reference-scales 1 --reference-shift 0
        ;;
    *)
        echo "unknown stage $1" >&2
        exit 2
        ;;
    esac
}

for stage in "$@"; do run "$stage"; done
