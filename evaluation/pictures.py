"""Reconstruction pictures: a model's forward on the first images of a split, drawn as a PNG grid
(original, masked input, reconstruction, reconstruction with the visible patches pasted back, and
each boolean per-patch input of the method in red). The `visualize` command and pre-training's
--vis-every draw them."""

import inspect
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import common
import data_sets
from evaluation.loading import eval_datasets


@dataclass
class VisualizeConfig:
    num_images: int = 8  # rows of the picture: the first N images of the split
    split: str = "val"  # val | train
    norm_pix: str = "denorm"  # norm-pix models: denorm (true patch mean and std back) | raw (as is)
    scale: int = 0  # enlarge each picture by this factor (0 = to about 128 px)

    def __post_init__(self):
        valid = (
            self.num_images >= 1
            and self.split in ("train", "val")
            and self.norm_pix in ("denorm", "raw")
        )
        if not valid:
            rule = "--num-images must be at least 1, --split train or val"
            raise ValueError(f"{rule}, --norm-pix denorm or raw")


# how the predictions of a model with a per-patch normalised target are shown
NORM_PIX_NOTES = {
    "denorm": "norm-pix target: predictions de-normalised with each patch's TRUE mean and std"
    " (from the original)",
    "raw": "norm-pix target: predictions and pasted patches in the normalised space,"
    " shown as 0.5 + value / 4",
}


@torch.no_grad()
def reconstructions(
    model,
    dataset,
    data,
    img_size,
    sample_inputs,
    normalized_target,
    n=8,
    seed=0,
    norm_pix="denorm",
):
    """The columns (label, (n, 3, H, W) in [0, 1]) of the picture of the first n images: original,
    masked input, reconstruction, reconstruction + visible patches, then each boolean (N,) input of
    `sample_inputs` (drawn for keys (seed, 0, index); e.g. the tokens a method throws away) in red;
    and a note on how the predictions are shown. normalized_target: the model predicts per-patch
    normalised pixels (each patch's own mean and std taken out), shown as `norm_pix` says."""
    tf = data_sets.transform(data, img_size, False)
    ds = data_sets.SeededDataset(dataset, tf, seed)
    first = [ds[(0, i)] for i in range(min(n, len(dataset)))]
    imgs, labels, _ = torch.utils.data.default_collate(first)
    inputs = {}
    if sample_inputs:  # as a loader draws them: the second call of each sample's draws
        keys = data_sets.sample_keys(seed, 0, torch.arange(len(imgs)))
        inputs = sample_inputs(data_sets.Draws(keys, first=1))
    if "labels" in inspect.signature(model.forward).parameters:
        inputs = {**inputs, "labels": labels}
    device = next(model.parameters()).device
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # for a method that draws randomness inside forward
        on_device = {k: v.to(device) for k, v in inputs.items()}
        _, pred, mask = model.eval()(imgs.to(device), **on_device)
    model.train(was_training)
    C, H, W = imgs.shape[1:]
    pred = pred.float().cpu()
    mask = mask.float().cpu()
    if pred.shape == imgs.shape:  # whole-image predictions
        pred = common.patchify(pred, model.cfg.patch_size)
    if pred.ndim != 3 or pred.shape[-1] % C or pred[0].numel() != C * H * W:
        shapes = f"of shape {tuple(pred.shape)} for images of shape {tuple(imgs.shape)}"
        drawn = "visualize draws (B, N, P*P*C) or (B, C, H, W) pixels"
        raise ValueError(f"forward returned pred {shapes}: {drawn}")
    p = math.isqrt(pred.shape[-1] // C)
    target = common.patchify(imgs, p)  # (B, N, P*P*C)
    raw = False
    note = "reconstructions are in the input's pixel space"
    if normalized_target:
        mean = target.mean(-1, keepdim=True)
        std = (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        raw = norm_pix == "raw"
        note = NORM_PIX_NOTES[norm_pix]
        if raw:
            target = (target - mean) / std
        else:
            pred = pred * std + mean
    data_mean, data_std = (torch.tensor(s).view(1, -1, 1, 1) for s in data_sets.DATASETS[data][1])

    # (B, N, P*P*C) patches or (B, C, H, W) images -> (B, 3, H, W) in [0, 1]
    def show(x, raw=False):
        x = common.unpatchify(x, p, C) if x.ndim == 3 else x
        x = 0.5 + x / 4 if raw else x * data_std + data_mean
        return x.clamp(0, 1).expand(-1, 3, -1, -1)

    def pixels(values):  # (B, M) values on a square grid -> (B, 1, H, W), nearest
        g = math.isqrt(values.shape[1])
        if g * g != values.shape[1] or H % g:
            grid = f"a (B, {values.shape[1]}) mask is not a square grid dividing {H} px"
            raise ValueError(grid)
        return F.interpolate(values.float().view(-1, 1, g, g), size=(H, W), mode="nearest")

    original = show(imgs)
    recon = show(pred, raw)
    m = pixels(mask)  # 1 = masked
    masked = original * (1 - m) + 0.5 * m  # masked patches grey
    columns = [
        ("original", original),
        (f"masked ({mask.mean().item():.0%})", masked),
        ("reconstruction", recon),
        ("recon + visible", recon * m + show(target, raw) * (1 - m)),
    ]
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    for key, v in inputs.items():
        if v.dtype == torch.bool and v.ndim == 2:
            o = 0.6 * pixels(v)
            columns.append((f"{key} (red)", masked * (1 - o) + red * o))
    return columns, note


def save_grid(columns, path, title="", scale=0):
    """Write the columns (label, (rows, 3, H, W) in [0, 1]) side by side as a PNG, each image
    enlarged `scale` times (0: to about 128 px), under up to 3 lines of `title` and a label over
    each column; (width, height)."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    pad = 2
    line_h = 12
    title_lines = 3
    # (rows * columns, 3, H, W), row by row
    cells = torch.stack([imgs for _, imgs in columns], 1).flatten(0, 1)
    scale = scale or max(1, round(128 / cells.shape[-1]))
    # nearest: the pixels stay visible
    cells = cells.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    grid = make_grid(cells, nrow=len(columns), padding=pad, pad_value=1.0)
    grid = to_pil_image(grid.mul(255).round().byte())
    top = (title_lines + 1) * line_h
    canvas = Image.new("RGB", (grid.width, top + grid.height), "white")
    canvas.paste(grid, (0, top))
    draw = ImageDraw.Draw(canvas)
    # the default font: about 6 px a letter
    for i, line in enumerate(textwrap.wrap(title, grid.width // 6)[:title_lines]):
        draw.text((pad, i * line_h), line, fill="black")
    for c, (label, _) in enumerate(columns):
        draw.text((pad + c * (cells.shape[-1] + pad), top - line_h), label, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return canvas.size


def run_visualize(model, info, ecfg, vcfg, sample_inputs, normalized_target, console):
    """A PNG of the first images of a split (held-out by default): the original, the masked input,
    the reconstruction, and the reconstruction with the visible patches pasted back.

    Returns the picture's path and (width, height); normalized_target: the model predicts per-patch
    normalised pixels."""
    data, dataset = eval_datasets(ecfg, info, (vcfg.split,))
    init = "-random-init" if ecfg.random_init else ""
    name = f"reconstructions{init}-{data}-{vcfg.split}-s{ecfg.seed}.png"
    path = Path(ecfg.out or info["run_dir"] / name)
    model.to(common.pick_device(ecfg.device))
    columns, note = reconstructions(
        model,
        dataset,
        data,
        info["config"].img_size,
        sample_inputs,
        normalized_target,
        vcfg.num_images,
        ecfg.seed,
        vcfg.norm_pix,
    )
    what = f"{info['method']}{' (random init)' if init else ''}, {data} {vcfg.split}"
    title = f"{what}. {note}; masks seed {ecfg.seed}"
    return path, save_grid(columns, path, title, vcfg.scale)
