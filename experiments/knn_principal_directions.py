"""How much of kNN's verdict is the few directions of largest variance (on `patterns`: the image's
colour)? For each run: the protocol's kNN (k=20, T=0.07, cosine, mean-pooled features; `cli.py knn`)
of the trained encoder, of a random-init one and of the raw pixels, after projecting out the top j
principal directions of the training features (j = 0 is the protocol's number), with the share of
the variance those directions hold; and how much of each of the top 4 directions a linear function
of the image's mean colour explains (R^2; docs/learning.md).

    python experiments/knn_principal_directions.py runs/learning/mae-patterns-s0 [RUN ...]
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
from evaluation import loading, probes  # noqa: E402

DIRECTIONS = (0, 1, 2, 4, 8)
columns = [f"kNN, top {j} out (variance)" if j else "kNN" for j in DIRECTIONS]
columns.append("R^2 from colour, top 4")
print("| run | features | " + " | ".join(columns) + " |")
print("|---" * (3 + len(DIRECTIONS)) + "|")

for run in sys.argv[1:]:
    seed = common.load_checkpoint(run)["train"].get("seed", 0)  # as experiments/learning.sh: --seed
    # (M, C + 1): each training image's mean colour and a 1, from the first pass (over the pixels)
    colour = None
    for kind in ("raw pixels", "trained", "random init"):
        random_init = kind == "random init"
        ecfg = loading.EvalConfig(seed=seed, random_init=random_init, num_workers=0)
        model, info = loading.load_model(run, cli.method_of, random_init=random_init, seed=seed)
        data, train_set, val_set = loading.eval_datasets(ecfg, info)
        settings = dict(data=data, batch_size=256, seed=seed, pixels=kind == "raw pixels")
        # (M, D), as run_knn
        train_f, train_y = probes.extract_features(model, train_set, **settings)
        val_f, val_y = probes.extract_features(model, val_set, **settings)
        if colour is None:  # train_f holds the pixels (M, C*H*W)
            means = train_f.view(len(train_f), info["config"].in_chans, -1).mean(-1)
            colour = torch.cat([means, torch.ones(len(train_f), 1)], 1)
        mean = train_f.mean(0)
        # principal directions: rows of vh
        _, s, vh = torch.linalg.svd(train_f - mean, full_matrices=False)
        share = (s**2).cumsum(0) / (s**2).sum()
        cells = []
        for j in DIRECTIONS:
            p = vh[:j]  # (j, D)
            kept_train = train_f - (train_f - mean) @ p.T @ p
            kept_val = val_f - (val_f - mean) @ p.T @ p
            top1, _ = probes.accuracy(
                probes.knn_scores(kept_train, train_y, kept_val, len(train_set.classes)), val_y
            )
            cells.append(f"{100 * top1:.1f}" + (f" ({100 * share[j - 1]:.0f} %)" if j else ""))
        scores = (train_f - mean) @ vh[:4].T  # (M, 4): the features along the top 4 directions
        # the best linear function of the mean colour
        fit = colour @ torch.linalg.lstsq(colour, scores).solution
        r2 = 1 - ((scores - fit) ** 2).sum(0) / ((scores - scores.mean(0)) ** 2).sum(0)
        cells.append(" ".join(f"{v:.2f}" for v in r2.tolist()))
        print(f"| {Path(run).name} | {kind} | " + " | ".join(cells) + " |", flush=True)
