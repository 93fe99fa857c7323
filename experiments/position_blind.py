"""Does an MAE run use where a hidden patch is? Its held-out reconstruction loss beside the loss of a position-blind
prediction: each image's predictions for its hidden patches replaced by their mean, one patch painted everywhere.
Equal losses: the decoder ignores the positions (MAE's plateau on `patterns`, docs/learning.md); the gap is what
the positions are worth. Also the best position-blind prediction (each image's mean hidden target) and zero.

    python experiments/position_blind.py runs/learning/mae-patterns-s0 [RUN ...]   # MAE runs
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
import data_sets  # noqa: E402
from evaluation import evaluate  # noqa: E402

IMAGES = 512


def blind(x, mask):  # (B, N, P*P*C): each image's mean over its hidden patches, at every position
    hidden = mask.unsqueeze(-1)  # (B, N, 1)
    return ((x * hidden).sum(1, keepdim=True) / hidden.sum(1, keepdim=True)).expand_as(x)


print("| run | model | position-blind | best position-blind | zero |")
print("|---|---|---|---|---|")
for run in sys.argv[1:]:
    model, info = evaluate.load_model(run, cli.method_of, need_all=True)
    if info["method"] != "mae":
        raise SystemExit(f"{run} is a {info['method']} run: this measures MAE runs (forward -> loss, pred, mask)")
    cfg, data = info["config"], info["train"].get("data", "patterns")
    held_out = data_sets.load_dataset(data, "val", info["train"].get("data_dir") or "data", IMAGES, cfg.img_size)
    tf = data_sets.transform(data, cfg.img_size, train=False)
    imgs = torch.stack([tf(held_out[i][0]) for i in range(len(held_out))])  # (B, C, H, W)
    noise = torch.rand(len(imgs), model.num_patches, generator=torch.Generator().manual_seed(0))  # one fixed mask
    model.eval()
    with torch.no_grad():
        loss, pred, mask = model(imgs, noise=noise)  # (B, N, P*P*C), (B, N)
        target = common.patchify(imgs, cfg.patch_size)  # (B, N, P*P*C): the target of mae.forward_loss
        if cfg.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1.0e-6) ** 0.5
        others = [blind(pred, mask), blind(target, mask), torch.zeros_like(pred)]  # each scored by the model's loss
        cells = [loss.item()] + [model.forward_loss(imgs, p, mask).item() for p in others]
    print(f"| {Path(run).name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
