#!/usr/bin/env bash
# The CPU results of README.md#results for one method: pre-train on the built-in patterns data and
# on Fashion-MNIST with seeds 0, 1, 2 (the same short budget for every method), evaluate every
# encoder and a random-init encoder of the same architecture with knn and linprobe, then print the
# table.
#
#   bash experiments/cpu_results.sh METHOD [OUT]   # e.g. mae; OUT defaults to runs/results
#   python cli.py table OUT/*    # then the table of the runs
#
# An interrupted run is continued (--resume) when the script is started again; a finished one is
# kept.
set -euo pipefail
cd "$(dirname "$0")/.."
method=${1:?usage: bash experiments/cpu_results.sh METHOD [OUT]}
out=${2:-runs/results}
# the tiny preset's model (64-d x 2, patch 8, 32 px) for 8 epochs of 4,096 images: 256 steps of
# 128 images, a few minutes per run on a busy 2-core machine; the evaluations use the same 4,096 /
# 1,024 images
budget=(--preset tiny --epochs 8 --warmup-epochs 1 --train-size 4096 --val-size 1024)
budget+=(--batch-size 128 --log-every 8)
# DATASETS="patterns" bash experiments/cpu_results.sh ... redoes one data set
for data in ${DATASETS:-patterns fashion-mnist}; do
  for seed in 0 1 2; do
    run=$out/$method-$data-s$seed
    if [ -f "$run/checkpoint.pt" ]; then again=--resume; else again=--overwrite; fi
    # i-MAE distils from the MAE run of the same data and seed (run `cpu_results.sh mae` first)
    extra=()
    if [ "$method" = i-mae ]; then extra=(--teacher "$out/mae-$data-s$seed"); fi
    nice -n 10 python cli.py pretrain "$method" --data "$data" --seed "$seed" "${budget[@]}" \
      "${extra[@]}" --out "$run" $again
    for init in --no-random-init --random-init; do
      nice -n 10 python cli.py knn "$run" --seed "$seed" "$init"
      nice -n 10 python cli.py linprobe "$run" --seed "$seed" "$init"
    done
  done
done
python cli.py table "$out"/*
