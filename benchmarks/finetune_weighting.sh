#!/usr/bin/env bash
# Does the stage loss weighting still matter late in training? Fine-tune the shipped tiny-64 teacher
# for the same number of steps with `model.flow.loss_weighting` = stage (its own) and none, then
# evaluate both (2 and 10 steps per stage) and trace their stages. About 35 minutes on 2 CPU cores.
#   bash benchmarks/finetune_weighting.sh [OUT_DIR]     (default runs/finetune-weighting)
# Measured when tiny-64 predicted v. Its preset and shipped models now predict x, whose loss the weighting
# does not touch (stage 1 warns): the two runs would train the same model.
set -euo pipefail
OUT=${1:-runs/finetune-weighting}
STEPS=${STEPS:-1600}
mkdir -p "$OUT"
msdd eval --model tiny-64-teacher --sweep-steps '2;10' --out "$OUT/eval-shipped.json"
for w in stage none; do
  msdd train --preset tiny-64 --run-dir "$OUT/$w" --init-from tiny-64-teacher --max-steps "$STEPS" \
    --set model.flow.loss_weighting=$w --set train.lr=1e-4 --set train.warmup_steps=50 --set train.max_steps="$STEPS"
  msdd eval --model "$OUT/$w/model" --sweep-steps '2;10' --out "$OUT/eval-$w.json"
  python "$(dirname "$0")/stage_drift.py" --model "$OUT/$w/model" --steps 10 --out "$OUT/drift-$w.json"
done
