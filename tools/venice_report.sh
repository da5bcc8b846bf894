#!/usr/bin/env bash
# The whole Venice run: index the 1898 reference photos with the default model, then benchmark
# the 220 held-out queries with every method, then diagnose the verified misses. Writes
# runs/venice-index, runs/venice-bench and runs/venice-diagnosis.txt.
#   bash tools/venice_report.sh [DATA_DIR]      (default: ../shared/data/venice)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/data/venice}"
OUT="${OUT:-runs}"
mkdir -p "$OUT"
start=$(date +%s)
delg-geo index build "$DATA" --metadata "$DATA/reference.csv" --index "$OUT/venice-index" --overwrite
built=$(date +%s)
delg-geo index info --index "$OUT/venice-index" --json > "$OUT/venice-index-info.json"
delg-geo bench --index "$OUT/venice-index" --queries "$DATA/queries.csv" --out "$OUT/venice-bench" --map
python tools/bench_query.py --index "$OUT/venice-index" --queries "$DATA/queries.csv" > "$OUT/venice-query-latency.json"
python tools/diagnose_bench.py "$OUT/venice-bench" --index "$OUT/venice-index" | tee "$OUT/venice-diagnosis.txt"
end=$(date +%s)
echo "build $((built - start)) s, bench $((end - built)) s, total $((end - start)) s" | tee "$OUT/venice-timing.txt"
