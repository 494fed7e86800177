#!/usr/bin/env bash
# Is a larger tiny-64 decoder better per CPU-minute? Train tiny-64 from scratch with its own decoder
# (depth 4, width 128: 2.3M parameters) and with a 3.4x larger one (depth 6, width 192: 7.7M), each
# with the number of steps that fits about the same training time on 2 CPU cores (the larger one's
# steps take 2x as long), then evaluate both (10 steps per stage) and trace their stages. About 35 minutes.
#   bash benchmarks/decoder_size.sh [OUT_DIR]     (default runs/decoder-size)
set -euo pipefail
OUT=${1:-runs/decoder-size}
mkdir -p "$OUT"
BIG=(--set model.decoder.width=192 --set model.decoder.heads=6 --set model.decoder.mlp_hidden=512 --set model.decoder.depth=6)
msdd train --preset tiny-64 --run-dir "$OUT/base" --minutes 18 --max-steps 2100 --set train.max_steps=2100
msdd train --preset tiny-64 --run-dir "$OUT/big" --minutes 18 --max-steps 1050 --set train.max_steps=1050 "${BIG[@]}"
for w in base big; do
  msdd eval --model "$OUT/$w/model" --out "$OUT/eval-$w.json"
  python "$(dirname "$0")/stage_drift.py" --model "$OUT/$w/model" --steps 10 --out "$OUT/drift-$w.json"
done
