#!/usr/bin/env bash
# The i-MAE numbers of README.md#i-mae: our linear separability (separability.py) of the MAE and
# i-MAE encoders of README.md#results (same budget, seeds 0, 1, 2, both data sets), of a random-init
# encoder and of raw pixels; each with the encoder's own latents as the target and with the seed's
# MAE as a common reference.
#
#   bash experiments/cpu_results.sh mae   # the runs: MAE first (i-MAE distils from it)
#   bash experiments/cpu_results.sh i-mae
#   bash experiments/imae_results.sh [OUT]   # OUT defaults to runs/results
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/results}
for data in ${DATASETS:-patterns fashion-mnist}; do
  for seed in 0 1 2; do
    mae=$out/mae-$data-s$seed
    for run in mae i-mae random; do
      src=$out/$run-$data-s$seed
      init=--no-random-init
      if [ "$run" = random ]; then
        src=$mae
        init=--random-init
      fi
      for ref in self mae; do
        json=$out/separability/$run-$data-s$seed.$ref.json
        [ -f "$json" ] && continue
        mkdir -p "$out/separability"
        reference=()
        if [ "$ref" = mae ]; then reference=(--reference "$mae"); fi
        nice -n 10 python cli.py separability "$src" $init --seed "$seed" "${reference[@]}" \
          --json > "$json.tmp"
        mv "$json.tmp" "$json"
      done
    done
  done
done
python - "$out/separability" ${DATASETS:-patterns fashion-mnist} <<'PY'
import json
import statistics
import sys
from pathlib import Path

folder = Path(sys.argv[1])
datasets = sys.argv[2:]


def cell(values):
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def report(run, data, seed, ref):
    return json.loads((folder / f"{run}-{data}-s{seed}.{ref}.json").read_text())


columns = "separability, own latents | separability, MAE's latents | R² of the dominant image, own"
print(f"| data | encoder | {columns} |")
print("|---|---|---|---|---|")
encoders = (("random", "random init"), ("mae", "MAE"), ("i-mae", "i-MAE (distilled from MAE)"))
for data in datasets:
    for run, label in encoders:
        rows = [{ref: report(run, data, s, ref) for ref in ("self", "mae")} for s in (0, 1, 2)]
        dom = [statistics.mean(r["dom"] for r in row["self"]["rows"]) for row in rows]
        own = cell([r["self"]["separability"] for r in rows])
        mae = cell([r["mae"]["separability"] for r in rows])
        print(f"| {data} | {label} | {own} | {mae} | {cell(dom)} |")
    pixels = {}
    for ref in ("self", "mae"):
        pixels[ref] = [report("mae", data, s, ref)["pixels"] for s in (0, 1, 2)]
    print(f"| {data} | raw pixels (floor) | {cell(pixels['self'])} | {cell(pixels['mae'])} | |")
PY
