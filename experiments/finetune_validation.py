"""`python cli.py finetune ARGS`, evaluated on a validation split instead of the held-out images:
1,024 training-split images of the built-in `patterns` (indices 20,000-21,023: in neither the
pre-training's 8,192 nor the held-out split). Used to choose the few-label fine-tuning recipe of
experiments/learning.sh without looking at the held-out numbers (docs/learning.md, "Few labels");
its result folders hold the validation numbers.

    python experiments/finetune_validation.py runs/learning/mae-patterns-s0 --train-size 1000 \
        --min-crop 0.2 ...
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import data_sets  # noqa: E402
from evaluation import finetune, loading  # noqa: E402

held_out = loading.eval_datasets


def with_validation_split(ecfg, info, splits=("train", "val")):
    data, train, _ = held_out(ecfg, info, splits)
    if data != "patterns":
        raise SystemExit(f"a validation split is only made for the built-in patterns, not {data}")
    patterns = data_sets.Patterns("train", 21_024, info["config"].img_size)
    val = torch.utils.data.Subset(patterns, range(20_000, 21_024))
    val.classes = data_sets.Patterns.classes
    return data, train, val


finetune.eval_datasets = with_validation_split  # run_finetune reads its data sets through this
cli.main(["finetune", *sys.argv[1:]])
