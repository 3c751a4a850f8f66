#!/usr/bin/env bash
# Does bf16 autocast + channels-last change results? The default recipe trained twice on the
# same split and seed, fast path vs plain path (fp32, contiguous), then `cxrlab compare`.
# Target: |validation AUC difference| <= 0.005.
#   benchmarks/precision_auc.sh DATA OUT [IMAGE_SIZE EPOCHS]
# DATA: e.g. every second image of chest_xray/train (the full recipe twice, fp32 at ~2x the
# time, does not fit a 2-core session); the defaults shorten the recipe to 160 px, 4 epochs.
set -euo pipefail
data=$1 out=$2 size=${3:-160} epochs=${4:-4}
mkdir -p "$out"
python - "$data" "$out" "$size" "$epochs" <<'PY'
import sys
from pathlib import Path
from cxrlab.config import RunConfig
data, out, size, epochs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
base = {"data": data, "image_size": size, "epochs": epochs}
RunConfig.build(base).save(out / "fast.yaml")
RunConfig.build({**base, "precision": "fp32", "channels_last": False}).save(out / "plain.yaml")
PY
for v in fast plain; do
  if [ ! -f "$out/$v/metrics.json" ]; then
    start=$(date +%s)
    cxrlab train --config "$out/$v.yaml" --out "$out/$v" -q
    echo "$(( $(date +%s) - start ))" > "$out/$v/wall_seconds"
  fi
  echo "$v: $(cat "$out/$v/wall_seconds") s wall"
done
cxrlab compare "$out/plain" "$out/fast" --json "$out/compare.json"
