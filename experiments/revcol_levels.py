"""Where does a RevColV2 run keep what it learned? For every level of the last bottom-up column and
of the last top-down column (the evaluations read that column's top level): the held-out accuracy of
a linear classifier fitted to convergence (L-BFGS, standardised features) on the level's tokens,
normalised as forward_features does and mean-pooled, and the effective rank of those features (exp
of the entropy of their variance spectrum); beside the same for a random-init model. A collapsed
level has an effective rank near 1.

    python experiments/revcol_levels.py runs/learning/revcolv2-fashion-mnist-s0 [RUN ...]
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import data_sets  # noqa: E402
from evaluation import loading  # noqa: E402


@torch.no_grad()
def level_features(model, dataset, tf):
    """{level name: (M, D) pooled features}, (M,) labels."""
    feats = {}
    labels = []
    for start in range(0, len(dataset), 512):
        items = [dataset[i] for i in range(start, min(start + 512, len(dataset)))]
        imgs = torch.stack([tf(img) for img, _ in items])  # (B, C, H, W)
        labels += [label for _, label in items]
        noise = torch.arange(model.num_patches).expand(len(imgs), -1)  # no mask, grid order
        # L x (B, N, D), level 0 first
        bottom_up, _, ids_restore = model.forward_encoder(imgs, 0.0, noise)
        # L x (B, N, D), top level first
        _, top_down = model.forward_decoder(bottom_up, ids_restore)
        L = len(bottom_up)
        named = [(f"bottom-up level {k}", x) for k, x in enumerate(bottom_up)]
        named += [(f"top-down level {L - 1 - k}", x) for k, x in enumerate(top_down)]
        for name, x in named:
            feats.setdefault(name, []).append(F.layer_norm(x, x.shape[-1:]).mean(1))  # (B, D)
    return {name: torch.cat(f) for name, f in feats.items()}, torch.tensor(labels)


def linear_accuracy(train, train_y, val, val_y, classes):
    mean = train.mean(0)
    std = train.std(0) + 1e-6
    train = (train - mean) / std
    val = (val - mean) / std
    w = torch.zeros(train.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(train @ w + b, train_y) + 1e-4 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ((val @ w + b).argmax(1) == val_y).float().mean().item()


def effective_rank(x):
    var = torch.linalg.svdvals(x - x.mean(0)) ** 2
    p = var / var.sum()
    return torch.exp(-(p * p.clamp_min(1e-12).log()).sum()).item()


for run in sys.argv[1:]:
    trained = "linear (trained) | effective rank (trained)"
    print(f"| {Path(run).name} | {trained} | linear (random init) | effective rank |")
    print("|---|---|---|---|---|")
    model, info = loading.load_model(run, cli.method_of)
    random_model, _ = loading.load_model(run, cli.method_of, random_init=True)
    if info["method"] != "revcolv2":
        raise SystemExit(f"{run} is a {info['method']} run: this reads the levels of RevColV2 runs")
    # once: the same for both models
    data, train_set, val_set = loading.eval_datasets(loading.EvalConfig(), info)
    tf = data_sets.transform(data, model.cfg.img_size, train=False)
    rows = {}
    for m in (model, random_model):
        m.eval()
        train, train_y = level_features(m, train_set, tf)
        val, val_y = level_features(m, val_set, tf)
        for name in train:
            acc = linear_accuracy(train[name], train_y, val[name], val_y, len(train_set.classes))
            rank = effective_rank(train[name])
            rows.setdefault(name, []).extend([f"{100 * acc:.1f}", f"{rank:.1f}"])
    for name, cells in rows.items():
        print(f"| {name} | " + " | ".join(cells) + " |")
