#!/usr/bin/env bash
# The commands behind the tables under "Latest results" in benchmarks/README.md. Run on a quiet machine
# (nothing else using the CPU or GPU), with msdd installed with the bench extra (diffusers, for SD-VAE):
#
#   pip install -e ".[bench]"
#   bash benchmarks/run_bench.sh                      # CPU, torch's default thread count
#   DEVICE=cuda bash benchmarks/run_bench.sh          # one GPU
#   THREADS=16 ROUNDS=5 WARMUP=2 bash benchmarks/run_bench.sh
#
# Each command writes one JSON file into benchmarks/results/ (the exact command line is inside it) and
# prints its table. On a CPU the default is a reduced set (about 15 minutes); FULL=1 runs every
# contender at fp32/bf16 and batch 1/4, which takes hours (README: "How long it takes").
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cpu}
if [[ "$DEVICE" == cpu ]]; then default_rounds=3 default_warmup=1; else default_rounds=5 default_warmup=2; fi
ROUNDS=${ROUNDS:-$default_rounds}
WARMUP=${WARMUP:-$default_warmup}
OUT=benchmarks/results
mkdir -p "$OUT"
common=(--device "$DEVICE" --rounds "$ROUNDS" --warmup "$WARMUP")
if [[ -n "${THREADS:-}" ]]; then common+=(--threads "$THREADS"); fi

# 1. paper-256, random weights (throughput does not depend on them); the teacher is the preset's schedule,
#    30 steps per stage at cfg 2.
if [[ "$DEVICE" == cpu && -z "${FULL:-}" ]]; then
  # CPU (about 15 minutes on 2 cores): every target ratio in some single run.
  # a. fp32, batch 1: student vs SD-VAE vs SSDD one-step, and the student again under bf16 autocast.
  msdd bench --preset paper-256 --batch-size 1 --contenders student,student-bf16,sd-vae,ssdd-student \
    "${common[@]}" --json "$OUT/paper-256-fp32-b1.json"
  # b. bf16, batch 1, with the 30-step cfg-2 teacher (about a minute per call on 2 cores).
  msdd bench --preset paper-256 --dtype bf16 --batch-size 1 --contenders student,teacher,sd-vae,ssdd-student \
    "${common[@]}" --json "$OUT/paper-256-bf16-b1.json"
else
  # FULL=1 or a GPU: every contender, fp32 and bf16, batch 1 and 4 (hours on a CPU).
  for dtype in fp32 bf16; do
    for batch in 1 4; do
      msdd bench --preset paper-256 --dtype "$dtype" --batch-size "$batch" "${common[@]}" \
        --json "$OUT/paper-256-$dtype-b$batch.json"
    done
  done
fi

# 2. Decode cost against resolution, tiny-64: 64 px with 4 stages, 128 with 5, 256 with 6 (the first stage
#    stays at 8 px). The teacher is guided at cfg 2, the paper's stage-1 setting (tiny-64 itself decodes
#    at cfg 1). Also writes the all-contender table at 64 px.
msdd bench --preset tiny-64 --cfg 2 --resolutions 64,128,256 --batch-size 4 "${common[@]}" \
  --json "$OUT/tiny-64-resolutions.json"
