#!/usr/bin/env bash
# i-MAE's second question: how much do the semantics of the mixing matter? The probability that an
# image is mixed with one of its own class (--same-class-prob 0, 0.5, 1; official --same_prob)
# swept at the default budget, each run's linear probe and our linear separability
# (evaluation/separability.py) beside MAE's, seeds 0 1 2.
#
#   bash experiments/learning.sh mae   # the MAE runs (the teachers, and the row to compare with)
#   bash experiments/imae_semantics.sh [OUT]   # OUT defaults to runs/learning
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/learning}
data=${DATA:-patterns}
for seed in ${SEEDS:-0 1 2}; do
  mae=$out/mae-$data-s$seed
  for p in 0 0.5 1; do
    run=$out/i-mae-same$p-$data-s$seed
    # the default, 0: the run of `learning.sh i-mae`, if made
    if [ $p = 0 ]; then run=$out/i-mae-$data-s$seed; fi
    if [ -f "$run/checkpoint.pt" ]; then again=--resume; else again=--overwrite; fi
    python cli.py pretrain i-mae --data "$data" --seed "$seed" --teacher "$mae" \
      --same-class-prob $p --out "$run" $again
    python cli.py linprobe "$run" --seed "$seed"
    python cli.py separability "$run" --seed "$seed" --json > "$run/separability.json"
  done
  python cli.py separability "$mae" --seed "$seed" --json > "$mae/separability.json"
done
python - "$out" "$data" ${SEEDS:-0 1 2} <<'PY'
import json
import statistics
import sys
from pathlib import Path

out = Path(sys.argv[1])
data = sys.argv[2]
seeds = sys.argv[3:]


def cell(values, digits):
    text = f"{statistics.mean(values):.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{digits}f}"
    return text


def probe_top1(folder, seed):
    result = folder / "eval" / f"linprobe-{data}-s{seed}" / "result.json"
    return json.loads(result.read_text())["metrics"]["top1"]


encoder = f"encoder ({data}, seeds {' '.join(seeds)})"
print(f"| {encoder} | linear probe top-1 | separability (own latents) |")
print("|---|---|---|")
runs = [("MAE", "mae"), ("i-MAE, same-class-prob 0", "i-mae")]
runs += [(f"i-MAE, same-class-prob {p}", f"i-mae-same{p}") for p in ("0.5", "1")]
for name, run in runs:
    folders = [out / f"{run}-{data}-s{s}" for s in seeds]
    probe = [probe_top1(f, s) for f, s in zip(folders, seeds)]
    sep = [json.loads((f / "separability.json").read_text())["separability"] for f in folders]
    print(f"| {name} | {cell([100 * p for p in probe], 1)} | {cell(sep, 3)} |")
PY
