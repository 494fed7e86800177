#!/usr/bin/env bash
# Throughput and peak memory against batch size (issue 16, item 5): the student and the SD-VAE decoder side by
# side in one `msdd bench` run per batch size, JSON into benchmarks/results/batch/, then the table.
#   bash benchmarks/batch_table.sh [preset] [dtype]       (default paper-256 fp32; about 7 minutes on 2 CPU cores)
set -euo pipefail
preset=${1:-paper-256}
dtype=${2:-fp32}
out=benchmarks/results/batch
mkdir -p "$out"
for b in 1 4 16; do
  msdd bench --preset "$preset" --dtype "$dtype" --batch-size "$b" --warmup 1 --rounds 2 \
    --contenders student,sd-vae --json "$out/$preset-$dtype-b$b.json"
done
python - "$out" "$preset" "$dtype" <<'PY'
import json, sys
out, preset, dtype = sys.argv[1:]
print("| batch | student img/s | student peak MiB | SD-VAE img/s | SD-VAE peak MiB | student / SD-VAE | matmul peak GFLOP/s |")
print("|---|---|---|---|---|---|---|")
for b in (1, 4, 16):
    r = json.load(open(f"{out}/{preset}-{dtype}-b{b}.json"))
    rows = {c["name"]: c for c in r["contenders"]}
    s, v = rows["student"], rows["sd-vae"]
    print(f"| {b} | {s['img_per_s']:.3f} | {s['peak_memory_mib']:.0f} | {v['img_per_s']:.3f} | {v['peak_memory_mib']:.0f} "
          f"| {s['img_per_s'] / v['img_per_s']:.2f} | {r['machine_peak_gflops']:.0f} |")
PY
