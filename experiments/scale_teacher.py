"""Does the scale of i-MAE's distillation target matter? The target is the teacher MAE's decoder
embedding of the clean image's visible tokens (imae.py), and its scale is whatever the MAE's
training left there. For each MAE run: the target's mean square on 256 held-out images under one
fixed mask (cls token included, as the loss has it). With --mean-square M --out DIR: a copy of one
run whose decoder embedding (weight and bias) is scaled to mean square M, so that the same encoder
gives a larger or smaller target; distil from it to see what the scale alone does.

    python experiments/scale_teacher.py runs/learning/mae-patterns-s0 [RUN ...]
    python experiments/scale_teacher.py runs/learning/mae-patterns-s1 --mean-square 2.43 \
        --out runs/big/mae-patterns-s1
    FINETUNE=0 SEEDS=1 bash experiments/learning.sh i-mae runs/big   # i-MAE distilling from it
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import common  # noqa: E402
import data_sets  # noqa: E402

IMAGES = 256


def target_mean_square(run):
    """The mean square of i-MAE's distillation target with the MAE run `run` as its teacher."""
    teacher, info = cli.load_whole_model(run)  # as imae.py's prepare_pretrain gets it
    if info["method"] != "mae":
        raise SystemExit(f"{run} is a {info['method']} run: i-MAE's teacher is an MAE")
    cfg = teacher.cfg
    data = info["train"].get("data", "patterns")
    data_dir = info["train"].get("data_dir") or "data"
    held_out = data_sets.load_dataset(data, "val", data_dir, IMAGES, cfg.img_size)
    tf = data_sets.transform(data, cfg.img_size, train=False)
    imgs = torch.stack([tf(held_out[i][0]) for i in range(len(held_out))])  # (B, C, H, W)
    seeded = torch.Generator().manual_seed(0)
    noise = torch.rand(len(imgs), teacher.num_patches, generator=seeded)  # one fixed mask
    teacher.eval()
    with torch.no_grad():
        latent = teacher.forward_encoder(imgs, cfg.mask_ratio, noise)[0]  # (B, 1 + N_vis, D)
        target = teacher.decoder_embed(latent)  # (B, 1 + N_vis, D_dec), as the student's loss
    return target.pow(2).mean().item()


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("runs", nargs="+", help="MAE run folders (or checkpoints)")
parser.add_argument(
    "--mean-square", type=float, help="write a copy of the one run with its target at this scale"
)
parser.add_argument("--out", help="the folder of that copy (a new one)")
args = parser.parse_args()
if (args.mean_square is None) != (args.out is None) or (args.out and len(args.runs) != 1):
    raise SystemExit("--mean-square M and --out DIR go together, with one run to copy")
if args.mean_square is not None and args.mean_square <= 0:
    raise SystemExit(f"--mean-square must be positive, got {args.mean_square}")
squares = {run: target_mean_square(run) for run in args.runs}
for run, square in squares.items():
    print(f"{run}: target mean square {square:.3f}")
if args.out:
    out = Path(args.out)
    if (out / "checkpoint.pt").exists():
        raise SystemExit(f"{out} already holds a checkpoint: pass a new --out")
    source = args.runs[0]
    ckpt = common.load_checkpoint(source)
    scale = (args.mean_square / squares[source]) ** 0.5  # the target is linear in the embedding
    for p in ("weight", "bias"):
        ckpt["model"][f"decoder_embed.{p}"] *= scale
    out.mkdir(parents=True, exist_ok=True)
    common.save_checkpoint(ckpt, out / "checkpoint.pt")
    copied = target_mean_square(out)
    print(f"{out}: decoder embedding x {scale:.3f}, target mean square {copied:.3f}")
