#!/usr/bin/env bash
# Does the default run learn? For one method: the README's default pre-training (`python cli.py
# pretrain METHOD`, the cpu preset) with seeds 0, 1, 2, each encoder evaluated with knn and linprobe
# beside a random-init encoder of the same architecture and beside the raw pixels, then fine-tuning
# on 1,000 labelled images against fine-tuning a random-init encoder on the same images. Then the
# table (python cli.py table).
#
#   bash experiments/learning.sh METHOD [OUT]   # e.g. mae; OUT defaults to runs/learning
#   DATA=fashion-mnist SEEDS="0" bash experiments/learning.sh simmim   # another data, fewer seeds
#   # a variant, in its own OUT:
#   PRETRAIN_ARGS="--mask-ratio 0.75" SEEDS="0" bash experiments/learning.sh mae runs/mask-0.75
#   # without the two fine-tunings (about half of each seed's time):
#   FINETUNE=0 bash experiments/learning.sh simmim
#
# An interrupted pre-training is continued (--resume) when the script is started again; a finished
# one is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
method=${1:?usage: bash experiments/learning.sh METHOD [OUT]}
out=${2:-runs/learning}
data=${DATA:-patterns}
read -ra extra <<< "${PRETRAIN_ARGS:-}"  # more pre-training options, the same for every seed
for seed in ${SEEDS:-0 1 2}; do
  run=$out/$method-$data-s$seed
  # i-MAE distils from the MAE run of the same data and seed: run `learning.sh mae` first
  teacher=()
  if [ "$method" = i-mae ]; then teacher=(--teacher "$out/mae-$data-s$seed"); fi
  # a finished run: --resume is a no-op
  if [ -f "$run/checkpoint.pt" ]; then again=--resume; else again=--overwrite; fi
  python cli.py pretrain "$method" --data "$data" --seed "$seed" "${teacher[@]}" "${extra[@]}" \
    --out "$run" $again
  floors=(--random-init)
  if [ "$method" = mae ]; then floors+=(--pixels); fi  # the pixels' row once, beside MAE's
  for command in knn linprobe; do
    for option in --no-random-init "${floors[@]}"; do
      python cli.py "$command" "$run" --seed "$seed" "$option"
    done
  done
  # few labels, why one pre-trains: a short recipe for 1,000 images, chosen with MAE on a
  # validation split (experiments/finetune_validation.py)
  recipe=(--train-size 1000 --epochs "${FT_EPOCHS:-30}" --warmup-epochs 3 --batch-size 64)
  recipe+=(--blr 2e-3 --layer-decay 0.75 --min-crop 1 --mixup 0 --cutmix 0 --randaug-n 0)
  recipe+=(--reprob 0)
  inits=(--no-random-init --random-init)
  if [ "${FINETUNE:-1}" = 0 ]; then inits=(); fi
  for init in "${inits[@]}"; do
    python cli.py finetune "$run" --seed "$seed" "${recipe[@]}" $init
  done
done
python cli.py table "$out"/*
