"""Does an MAE run use where a hidden patch is? Its held-out reconstruction loss beside the loss of
a position-blind prediction: each image's predictions for its hidden patches replaced by their mean,
one patch painted everywhere. Equal losses: the decoder ignores the positions (MAE's plateau on
`patterns`, docs/learning.md); the gap is what the positions are worth. Also the best position-blind
prediction (each image's mean hidden target) and zero.

    python experiments/position_blind.py runs/learning/mae-patterns-s0 [RUN ...]   # MAE runs
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
import data_sets  # noqa: E402
from evaluation import loading  # noqa: E402

IMAGES = 512


def blind(x, mask):  # (B, N, P*P*C): each image's mean over its hidden patches, at every position
    hidden = mask.unsqueeze(-1)  # (B, N, 1)
    return ((x * hidden).sum(1, keepdim=True) / hidden.sum(1, keepdim=True)).expand_as(x)


print("| run | model | position-blind | best position-blind | zero |")
print("|---|---|---|---|---|")
for run in sys.argv[1:]:
    model, info = loading.load_model(run, cli.method_of, need_all=True)
    if info["method"] != "mae":
        measures = "this measures MAE runs (forward -> loss, pred, mask)"
        raise SystemExit(f"{run} is a {info['method']} run: {measures}")
    cfg = info["config"]
    data = info["train"].get("data", "patterns")
    data_dir = info["train"].get("data_dir") or "data"
    held_out = data_sets.load_dataset(data, "val", data_dir, IMAGES, cfg.img_size)
    tf = data_sets.transform(data, cfg.img_size, train=False)
    imgs = torch.stack([tf(held_out[i][0]) for i in range(len(held_out))])  # (B, C, H, W)
    seeded = torch.Generator().manual_seed(0)
    noise = torch.rand(len(imgs), model.num_patches, generator=seeded)  # one fixed mask
    model.eval()
    with torch.no_grad():
        loss, pred, mask = model(imgs, noise=noise)  # (B, N, P*P*C), (B, N)
        target = common.patchify(imgs, cfg.patch_size)  # (B, N, P*P*C): forward_loss's target
        if cfg.norm_pix_loss:
            mean = target.mean(-1, keepdim=True)
            var = target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        # each scored by the model's loss
        others = [blind(pred, mask), blind(target, mask), torch.zeros_like(pred)]
        cells = [loss.item()] + [model.forward_loss(imgs, p, mask).item() for p in others]
    print(f"| {Path(run).name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
