#!/usr/bin/env bash
# The student's tie to the real image (issue 12): distil one teacher with and without the pixel loss
# (distill.lambda_pix), and with a weaker adversarial term, for the same number of steps; evaluate each
# student on the 42 held-out images (msdd eval: PSNR/SSIM beside bicubic and PCA). RUN (a space-separated list
# of the names below) picks others: the adversarial weight adaptive against the step's whole non-adversarial loss
# (adaptive-total, the default), against the reference code's term (adaptive-reference, paper-256's), or fixed at
# lambda_adv 1 or 0.1.
#   bash benchmarks/student_loss.sh TEACHER_DIR OUT_DIR [STEPS] [--set KEY=VALUE ...]
#   RUN="adaptive-total adaptive-reference adv-fixed" bash benchmarks/student_loss.sh TEACHER_DIR OUT_DIR 300
# LPIPS (distill.perceptual=lpips, lambda_perc 0.5) is the paper's term; it needs the VGG16 file, so
# this offline script does not run it.
set -euo pipefail
TEACHER=$1; OUT=$2; STEPS=${3:-300}; shift 3 || shift $#
mkdir -p "$OUT"
declare -A VARIANTS=(
  [pix0]="--set distill.lambda_pix=0"
  [pix1]="--set distill.lambda_pix=1"
  [pix1-adv0.1]="--set distill.lambda_pix=1 --set distill.lambda_adv=0.1"
  [adaptive-total]="--set distill.adaptive_of=total"
  [adaptive-reference]="--set distill.adaptive_of=reference"
  [adv-fixed]="--set distill.adaptive_adv=false"
  [adv-fixed-0.1]="--set distill.adaptive_adv=false --set distill.lambda_adv=0.1"
)
for name in ${RUN:-pix0 pix1 pix1-adv0.1}; do
  # shellcheck disable=SC2086
  msdd distill --teacher "$TEACHER" --run-dir "$OUT/$name" --max-steps "$STEPS" --set distill.max_steps="$STEPS" \
    --set distill.ckpt_every="$STEPS" --set distill.grid_every="$STEPS" ${VARIANTS[$name]} "$@"
  msdd eval --model "$OUT/$name/model" --out "$OUT/eval-$name.json"
done
