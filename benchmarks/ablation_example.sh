#!/usr/bin/env bash
# Target: the README's ablation example (12 runs: cnn, 128 px, dropout x augment, 3 seeds)
# finishes within 45 minutes on a 2-core CPU. Records wall time and load beside the sweep;
# rerunning resumes (complete runs are skipped), so the wall time is only meaningful for a
# fresh OUT.
#   benchmarks/ablation_example.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/ablation-example/sweep}
mkdir -p "$(dirname "$out")"
log="$(dirname "$out")"
uptime > "$log/uptime-start.txt"
start=$(date +%s)
cxrlab ablate examples/ablation-regularisation.yaml --out "$out" -q
end=$(date +%s)
uptime > "$log/uptime-end.txt"
echo "wall: $((end - start)) s; load at start: $(cat "$log/uptime-start.txt"); at end: $(cat "$log/uptime-end.txt")" | tee "$log/wall.txt"
