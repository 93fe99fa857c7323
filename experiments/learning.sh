#!/usr/bin/env bash
# Does the default run learn? For one method: the README's default pre-training (`python cli.py pretrain METHOD`,
# the cpu preset) with seeds 0, 1, 2, each encoder evaluated with knn and linprobe beside a random-init encoder of the
# same architecture and beside the raw pixels; for MAE also fine-tuning on 1,000 labelled images against fine-tuning
# a random-init encoder on the same images. Then the table (experiments/results.py).
#
#   bash experiments/learning.sh METHOD [OUT]     # e.g. mae; OUT defaults to runs/learning
#   DATA=fashion-mnist SEEDS="0" bash experiments/learning.sh simmim   # another data set, fewer seeds
#
# An interrupted pre-training is continued (--resume) when the script is started again; a finished one is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
method=${1:?usage: bash experiments/learning.sh METHOD [OUT]}
out=${2:-runs/learning}
data=${DATA:-patterns}
extra=()  # i-MAE distils from the MAE run of the same data and seed: run `bash experiments/learning.sh mae` first
for seed in ${SEEDS:-0 1 2}; do
  run=$out/$method-$data-s$seed
  if [ "$method" = i-mae ]; then extra=(--teacher "$out/mae-$data-s$seed"); fi
  if [ -f "$run/checkpoint.pt" ]; then again=--resume; else again=--overwrite; fi  # a finished run: a no-op
  python cli.py pretrain "$method" --data "$data" --seed "$seed" "${extra[@]}" --out "$run" $again
  floors=(--random-init); if [ "$method" = mae ]; then floors+=(--pixels); fi  # the pixels' row once, beside MAE's
  for command in knn linprobe; do
    for option in --no-random-init "${floors[@]}"; do
      python cli.py "$command" "$run" --seed "$seed" "$option"
    done
  done
  if [ "$method" = mae ]; then  # few labels: why one pre-trains (a short recipe for 1,000 images, chosen on a
    for init in --no-random-init --random-init; do  # validation split: experiments/finetune_validation.py)
      python cli.py finetune "$run" --seed "$seed" --train-size 1000 --epochs ${FT_EPOCHS:-30} --warmup-epochs 3 \
        --batch-size 64 --blr 2e-3 --layer-decay 0.75 --min-crop 1 --mixup 0 --cutmix 0 --randaug-n 0 --reprob 0 $init
    done
  fi
done
python experiments/results.py "$out"
