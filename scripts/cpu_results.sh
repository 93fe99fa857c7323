#!/usr/bin/env bash
# The CPU results of README.md#results for one method: pre-train on the built-in shapes data and on
# Fashion-MNIST with seeds 0, 1, 2 (the same short budget for every method), evaluate every encoder and a
# random-init encoder of the same architecture with knn and linprobe, then print the table.
#
#   bash scripts/cpu_results.sh METHOD [OUT]      # e.g. mae; OUT defaults to runs/results
#   python cli.py results OUT --readme README.md   # then put the rows into the README's table
#
# An interrupted run is continued (--resume) when the script is started again; a finished one is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
method=${1:?usage: bash scripts/cpu_results.sh METHOD [OUT]}
out=${2:-runs/results}
budget=(--epochs 2 --warmup-epochs 1 --train-size 4096 --val-size 1024)  # 64 steps of 128 images
for data in shapes fashion-mnist; do
  for seed in 0 1 2; do
    run=$out/$method-$data-s$seed
    if [ -f "$run/checkpoint.pt" ]; then again=--resume; else again=--overwrite; fi
    nice -n 10 python cli.py pretrain "$method" --data "$data" --seed "$seed" "${budget[@]}" --out "$run" $again
    for init in --no-random-init --random-init; do
      nice -n 10 python cli.py knn "$run" --seed "$seed" "$init"
      nice -n 10 python cli.py linprobe "$run" --seed "$seed" "$init"
    done
  done
done
python cli.py results "$out"
