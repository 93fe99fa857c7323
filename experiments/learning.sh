#!/usr/bin/env bash
# Does a method learn, and does a fork beat its base? For one method (a built-in name or a method
# file anywhere, e.g. a fork): the default pre-training (`python cli.py pretrain METHOD`, the cpu
# preset, its kNN curve logged) with seeds 0, 1, 2, each encoder evaluated with knn and linprobe
# beside a random-init encoder of the same architecture (and, for MAE, the raw pixels), then
# fine-tuning on 1,000 labelled images against fine-tuning a random-init encoder on the same images.
# Then the table of OUT (python cli.py table). Runs are named METHOD-DATA-sSEED, METHOD a file's
# name without .py, as `python cli.py knn OUT/my_idea-patterns-s0` finds them.
#
#   bash experiments/learning.sh METHOD [OUT]   # e.g. mae; OUT defaults to runs/learning
#   FINETUNE=0 bash experiments/learning.sh my_idea.py runs/compare   # a fork, from anywhere
#   DATA=fashion-mnist SEEDS="0" bash experiments/learning.sh simmim   # another data, fewer seeds
#   # a variant, in its own OUT:
#   PRETRAIN_ARGS="--mask-ratio 0.75" SEEDS="0" bash experiments/learning.sh mae runs/mask-0.75
#   # without the two fine-tunings (about half of each seed's time):
#   FINETUNE=0 bash experiments/learning.sh simmim
#
# An interrupted pre-training is continued (--resume) when the script is started again; a finished
# one is kept.
set -euo pipefail
method=${1:?usage: bash experiments/learning.sh METHOD [OUT]}
out=${2:-runs/learning}
if [ -f "$method" ]; then method=$(realpath "$method"); fi  # a method file, from the caller's folder
out=$(realpath -m "$out")
name=$(basename "$method" .py)
cd "$(dirname "$0")/.."
data=${DATA:-patterns}
read -ra extra <<< "${PRETRAIN_ARGS:-}"  # more pre-training options, the same for every seed
for seed in ${SEEDS:-0 1 2}; do
  run=$out/$name-$data-s$seed
  # i-MAE distils from the MAE run of the same data and seed: run `learning.sh mae` first
  teacher=()
  if [ "$name" = i-mae ]; then teacher=(--teacher "$out/mae-$data-s$seed"); fi
  # a finished run: --resume is a no-op
  if [ -f "$run/checkpoint.pt" ]; then again=--resume; else again=--overwrite; fi
  python cli.py pretrain "$method" --data "$data" --seed "$seed" "${teacher[@]}" "${extra[@]}" \
    --out "$run" $again
  floors=(--random-init)
  if [ "$name" = mae ]; then floors+=(--pixels); fi  # the pixels' row once, beside MAE's
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
