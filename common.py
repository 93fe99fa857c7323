"""Plumbing shared by every method file: ViT pieces, data sets, the training loop and checkpoints.

Nothing in here is any paper's contribution; masking, targets, decoders and losses live in the method
files, even where that repeats a few lines (see README.md, "How the code is organised").

Shape legend, used in every file:
    B batch, C channels, H = W image size, P patch size, N patches (H/P * W/P),
    N_vis visible patches, N_mask masked patches, D encoder width, D_dec decoder width.
    mask: (B, N), 0 = visible (kept), 1 = masked (removed): the facebookresearch/mae convention.
"""

import argparse
import contextlib
import dataclasses
import gzip
import inspect
import json
import math
import os
import re
import signal
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# ----------------------------------------------------------------------------------------------------
# ViT pieces. State-dict names follow timm's VisionTransformer, which the official MAE code builds on,
# so official checkpoints load into our models and our encoders load into timm.


class PatchEmbed(nn.Module):
    """Image to patch tokens with one Conv2d whose kernel = stride = P: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        if min(img_size, patch_size, in_chans, embed_dim) < 1:
            raise ValueError(
                f"--img-size, --patch-size, --in-chans and --embed-dim must be at least 1, got "
                f"{img_size}, {patch_size}, {in_chans} and {embed_dim}"
            )
        if img_size % patch_size:
            raise ValueError(
                f"image size {img_size} is not a multiple of the patch size {patch_size}: "
                f"choose --img-size as a multiple of --patch-size"
            )
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(x.shape)}: resize the data or change --img-size / --in-chans"
            )
        return rearrange(self.proj(x), "b d h w -> b (h w) d")  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, computed by F.scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"the number of heads must be at least 1, got {num_heads}")
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads: change --num-heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        # the (three h d) order is timm's qkv layout, so official weights split into q, k, v correctly
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))  # (B, N, D)


class Mlp(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample (Huang et al. 2016), rescaled."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *[1] * (x.ndim - 1)).bernoulli_(1 - self.p)  # (B, 1, 1)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). LayerNorm eps 1e-6."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Fixed 2D sin-cos position embedding, (1, [1 +] N, D), in the layout of the official MAE code
    (util/pos_embed.py): the first D/2 channels encode the column, the last D/2 the row; a zero row
    is prepended for the cls token."""
    if embed_dim % 4:
        raise ValueError(f"width {embed_dim} must be a multiple of 4 for the 2D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each, patches in row-major order

    def embed_1d(pos):
        angles = pos.reshape(-1, 1) * omega  # (N, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, D/2)

    emb = torch.cat([embed_1d(col), embed_1d(row)], dim=1)  # (N, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb])  # (1 + N, D)
    return emb.float().unsqueeze(0)


def patchify(imgs, p):
    """(B, C, H, W) -> (B, N, P*P*C), pixels in (p1 p2 c) order: the official einsum layout."""
    return rearrange(imgs, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)


def unpatchify(x, p, c=3):
    """(B, N, P*P*C) -> (B, C, H, W), the inverse of patchify for a square grid."""
    h = int(x.shape[1] ** 0.5)
    return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=p, p2=p, c=c)


def init_weights(model):
    """The official MAE initialisation of the generic parts: xavier-uniform Linear layers with zero
    bias, the patch projection initialised like a Linear layer, LayerNorm weight 1 and bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))


# ----------------------------------------------------------------------------------------------------
# Model sizes and presets. A preset sets the scale of a run (image size, widths, batch, epochs) in one
# place; a method's Config fields and common.TrainConfig fields hold everything else.

VIT_SIZES = {  # ViT-Ti/S (DeiT), ViT-B/L/H (ViT paper); every size gets the official MAE decoder, 512-d x 8
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14),
}
for _size in VIT_SIZES.values():
    _size.update(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)

# a table: a preset reads better in three or four lines than in one field a line
# fmt: off
PRESETS = {
    # seconds on a CPU: for tests and for trying a code change
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                 decoder_depth=1, decoder_num_heads=4, data="shapes", train_size=256, val_size=64,
                 batch_size=32, epochs=2, warmup_epochs=0, blr=1.5e-3, num_workers=0, log_every=1),
    # the default of every command: a short real run on the built-in data, a few minutes on a laptop CPU
    "cpu": dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, decoder_embed_dim=128,
                decoder_depth=2, decoder_num_heads=4, data="shapes", train_size=8192, val_size=1024,
                batch_size=128, epochs=6, warmup_epochs=1, blr=1.5e-3, num_workers=1, log_every=8),
    # one GPU, hours: ViT-Tiny width on the 8x8 grid of 32-px CIFAR images
    "cifar": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128,
                  decoder_depth=4, decoder_num_heads=4, data="cifar10", batch_size=256, epochs=400,
                  warmup_epochs=20, num_workers=8),
    # one GPU, about a day: ViT-S/8 at 64 px (8x8 grid), the small model of the i-MAE code
    "tiny-imagenet": dict(img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6,
                          decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
                          data="tiny-imagenet", batch_size=256, epochs=400, warmup_epochs=20,
                          num_workers=8),
    # the paper recipe: ViT-B/16 at 224 px, 4096 images per step (64 per GPU x 64 GPUs, or accumulate)
    "imagenet": dict(img_size=224, **VIT_SIZES["base"], data="imagenet", batch_size=64, epochs=800,
                     warmup_epochs=40, num_workers=10),
}
# fmt: on

# ----------------------------------------------------------------------------------------------------
# Data. Every data set yields (image, label), the image a PIL image or a (C, H, W) uint8 or [0, 1] tensor;
# SeededDataset adds the augmentation and the per-sample random inputs of a method (e.g. masks).

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS = {  # name: (channels, (mean, std)) of the normalisation
    "shapes": (3, ((0.497, 0.504, 0.500), (0.264, 0.264, 0.266))),
    "fashion-mnist": (1, ((0.2860,), (0.3530,))),
    "cifar10": (3, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": (3, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "tiny-imagenet": (3, IMAGENET_STATS),
    "imagenet": (3, IMAGENET_STATS),
    "folder": (3, IMAGENET_STATS),
}
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # apt install dataset-fashion-mnist


class Shapes(torch.utils.data.Dataset):
    """The built-in data set: one coloured shape (the class) on a striped, noisy background.

    Drawn on the fly, so it needs no download, works at any image size, and is deterministic per
    (split, index). Colour, stripes, size, position and rotation are random; only the form tells the
    class, so a linear probe or kNN on learned features has something real to find.
    """

    classes = ("circle", "square", "triangle", "ring", "cross", "star", "crescent", "ellipse")

    def __init__(self, split, size, img_size):
        self.size, self.img_size, self.split_bit = size, img_size, {"train": 0, "val": 1}[split]
        t = (torch.arange(img_size) + 0.5) / img_size * 2 - 1  # pixel centres in [-1, 1]
        self.y, self.x = torch.meshgrid(t, t, indexing="ij")

    def __len__(self):
        return self.size

    @staticmethod
    def signed_distance(label, u, v):  # < 0 inside the shape; u, v in units of the shape's radius
        r, a = (u**2 + v**2).sqrt(), torch.atan2(v, u)
        edges = [u * math.cos(t) + v * math.sin(t) for t in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
        return [
            r - 1,
            torch.maximum(u.abs(), v.abs()) - 0.8,
            torch.stack(edges).amax(0) - 0.5,
            (r - 0.72).abs() - 0.28,
            torch.minimum(torch.maximum(u.abs() - 1, v.abs() - 0.3), torch.maximum(u.abs() - 0.3, v.abs() - 1)),
            r - (0.6 + 0.4 * torch.cos(5 * a)),
            torch.maximum(r - 1, 0.8 - ((u - 0.55) ** 2 + v**2).sqrt()),
            (u**2 + (v / 0.5) ** 2).sqrt() - 1,
        ][label]

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(2 * i + self.split_bit)  # CPU generators use only 32 bits of a seed
        label = i % len(self.classes)
        rand = torch.rand(8, generator=g)
        c1, c2 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
        angle, freq, phase = rand[0] * math.pi, 1 + 5 * rand[1], 2 * math.pi * rand[2]
        wave = 0.5 + 0.5 * torch.sin(freq * math.pi * (self.x * angle.cos() + self.y * angle.sin()) + phase)
        img = c1 * wave + c2 * (1 - wave) + 0.06 * torch.randn(3, self.img_size, self.img_size, generator=g)
        # the shape's colour is 0.3 to 0.7 away (mod 1) from the background's mean in every channel
        colour = (0.5 * (c1 + c2) + 0.3 + 0.4 * torch.rand(3, 1, 1, generator=g)) % 1.0
        cx, cy, scale, rot = (rand[3] - 0.5) * 0.7, (rand[4] - 0.5) * 0.7, 0.35 + 0.3 * rand[5], 2 * math.pi * rand[6]
        dx, dy = self.x - cx, self.y - cy
        u, v = (dx * rot.cos() + dy * rot.sin()) / scale, (-dx * rot.sin() + dy * rot.cos()) / scale
        pixels = self.signed_distance(label, u, v) * scale * self.img_size / 2  # distance in pixels
        alpha = (0.5 - pixels).clamp(0, 1)  # (H, W), anti-aliased over one pixel
        return (img * (1 - alpha) + colour * alpha).clamp(0, 1), label


def _read_idx(path):
    """An IDX file of MNIST / Fashion-MNIST (optionally gzipped) as a uint8 tensor."""
    data = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    shape = struct.unpack(f">{data[3]}I", data[4 : 4 + 4 * data[3]])
    return torch.frombuffer(bytearray(data[4 + 4 * data[3] :]), dtype=torch.uint8).reshape(shape)


class TensorImages(torch.utils.data.Dataset):
    def __init__(self, images, labels, classes):
        self.images, self.labels, self.classes = images, labels, classes  # (M, C, H, W) uint8, (M,)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


class FileImages(torch.utils.data.Dataset):
    def __init__(self, samples, classes):
        self.samples, self.classes = samples, classes  # [(path, label)], class names

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.samples[i]
        with Image.open(path) as img:
            return img.convert("RGB"), label  # a PIL image; transform() turns it into a tensor


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


def _images_in(folder):
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _fashion_mnist(split, root, download):
    prefix = {"train": "train", "val": "t10k"}[split]
    dirs = [root / "fashion-mnist", root / "FashionMNIST" / "raw", root, FASHION_MNIST_DEBIAN]
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=split == "train", download=True)
    for d in dirs:
        for suffix in ("", ".gz"):
            images, labels = d / f"{prefix}-images-idx3-ubyte{suffix}", d / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.exists() and labels.exists():
                classes = (
                    "T-shirt",
                    "trouser",
                    "pullover",
                    "dress",
                    "coat",
                    "sandal",
                    "shirt",
                    "sneaker",
                    "bag",
                    "boot",
                )
                return TensorImages(_read_idx(images).unsqueeze(1), _read_idx(labels), classes)
    raise ValueError(
        f"Fashion-MNIST not found in {', '.join(map(str, dirs))}: install it with "
        f"`apt install dataset-fashion-mnist`, or pass --download"
    )


def _cifar(name, split, root, download):
    from torchvision.datasets import CIFAR10, CIFAR100

    try:
        ds = (CIFAR10 if name == "cifar10" else CIFAR100)(str(root), train=split == "train", download=download)
    except RuntimeError:
        raise ValueError(
            f"{name} not found under {root}/ (expected the torchvision python version, e.g. "
            f"cifar-10-batches-py/): pass --download, or --data-dir where it lives"
        ) from None
    return TensorImages(torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets), ds.classes)


def _tiny_imagenet(split, root):
    root = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    hint = (
        f"expected the Tiny-ImageNet layout under {root}/ (wnids.txt, train/<wnid>/images/*.JPEG, "
        f"val/images/ and val/val_annotations.txt): unzip tiny-imagenet-200.zip there or pass --data-dir"
    )
    if not root.is_dir():
        raise ValueError(f"the data folder {root} does not exist: {hint}")
    if not (root / "wnids.txt").is_file():
        raise ValueError(f"no wnids.txt: {hint}")
    wnids = (root / "wnids.txt").read_text().split()
    index = {w: k for k, w in enumerate(wnids)}
    if split == "train":
        samples = [
            (p, index[w])
            for w in wnids
            if (root / "train" / w / "images").is_dir()
            for p in _images_in(root / "train" / w / "images")
        ]
    else:
        annotations = root / "val" / "val_annotations.txt"
        if not annotations.is_file():
            raise ValueError(f"no val/val_annotations.txt: {hint}")
        rows = [line.split("\t") for line in annotations.read_text().splitlines() if line.strip()]
        samples = [(root / "val" / "images" / r[0], index[r[1]]) for r in rows if r[1] in index]
        if not all(p.is_file() for p, _ in samples):
            raise ValueError(f"val_annotations.txt names images missing from val/images/: {hint}")
    if not samples:
        raise ValueError(f"no {split} images found: {hint}")
    return FileImages(samples, wnids)


def _image_folder(split, root):
    folder = root / split
    hint = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (the ImageNet layout)"
    if not root.is_dir():
        raise ValueError(f"the data folder {root} does not exist: {hint}; pass --data-dir")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    samples = [(p, k) for k, c in enumerate(classes) for p in _images_in(folder / c)]
    if not samples:
        raise ValueError(f"no images in class folders under {folder}/: {hint}; pass --data-dir")
    return FileImages(samples, classes)


def load_dataset(name, split, root="data", size=0, img_size=32, download=False):
    """The raw (image, label) data set `name` for split 'train' or 'val'; if size > 0, a fixed random
    subset of `size` items. Missing or malformed data raise a ValueError that says what was expected."""
    root = Path(root)
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    if name == "shapes":
        return Shapes(split, size or {"train": 50_000, "val": 10_000}[split], img_size)
    if name == "fashion-mnist":
        ds = _fashion_mnist(split, root, download)
    elif name in ("cifar10", "cifar100"):
        ds = _cifar(name, split, root, download)
    elif name == "tiny-imagenet":
        ds = _tiny_imagenet(split, root)
    else:
        ds = _image_folder(split, root)
    if size and size < len(ds):  # a fixed random subset, so every class is represented
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:size].sort()[0]
        ds, classes = torch.utils.data.Subset(ds, keep.tolist()), ds.classes
        ds.classes = classes
    return ds


def transform(name, img_size, train):
    """MAE pre-training augmentation (RandomResizedCrop scale (0.2, 1), bicubic, flip) or the
    evaluation resize + centre crop, then normalisation with the data set's statistics."""
    from torchvision.transforms import InterpolationMode, v2

    channels, (mean, std) = DATASETS[name]
    if train:
        steps = [
            v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC),
            v2.RandomHorizontalFlip(),
        ]
    else:  # large natural images: resize to 1/0.875 of the crop first, as the ImageNet protocol does
        resize = round(img_size / 0.875) if name in ("imagenet", "folder") else img_size
        steps = [v2.Resize(resize, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(img_size)]
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])


class SeededDataset(torch.utils.data.Dataset):
    """Applies `transform` and draws a method's per-sample random inputs (`sample_inputs(generator)`,
    e.g. a mask) with randomness seeded by the sample's key (epoch, index).

    So every random draw of a sample is fixed by (seed, epoch, index), whatever the number of data
    workers or processes, and a resumed run sees exactly what an uninterrupted one would have."""

    def __init__(self, base, transform, sample_inputs=None, seed=0):
        self.base, self.transform, self.sample_inputs, self.seed = base, transform, sample_inputs, seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        img, label = self.base[index]
        with torch.random.fork_rng(devices=[]):  # torchvision transforms draw from the global RNG
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) % 2**32)
            img = self.transform(img)
        if not self.sample_inputs:
            return img, label, {}
        return img, label, self.sample_inputs(torch.Generator().manual_seed(hash((self.seed, epoch, index, 1)) % 2**32))


class EpochSampler(torch.utils.data.Sampler):
    """Yields keys (epoch, index): a permutation seeded by (seed, epoch), split across processes like
    DistributedSampler (rank r takes every world-th index), starting `start` keys into this rank's
    share so a resumed run skips exactly what it has already trained on."""

    def __init__(self, n, shuffle, seed=0, rank=0, world=1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return max(self.n // self.world - self.start, 0) if self.shuffle else len(range(self.rank, self.n, self.world))

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
            order = order[: self.n // self.world * self.world]  # every rank gets the same count
        else:
            order = torch.arange(self.n)
        for i in order[self.rank :: self.world][self.start :].tolist():
            yield self.epoch, i


def make_loader(dataset, batch_size, sampler, num_workers, train, device):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def pretrain_loader(train_set, data, img_size, sample_inputs, seed, batch_size, num_workers, device, rank=0, world=1):
    """The pre-training loader (the MAE augmentation and the method's per-sample inputs in the workers, this
    process's share of a seeded shuffle) and its sampler, whose set_epoch starts each epoch. `train` and
    `bench --data` both use it, so the benchmark times the loader training runs."""
    sampler = EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world=world)
    dataset = SeededDataset(train_set, transform(data, img_size, True), sample_inputs, seed)
    return make_loader(dataset, batch_size, sampler, num_workers, True, device), sampler


# ----------------------------------------------------------------------------------------------------
# Devices, processes, checkpoints


def distributed():
    """(rank, world size, local rank) from torchrun's environment, joining the process group once."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0))


def gather_batch(*tensors):
    """Each (B_r, ...) tensor from every process r, concatenated in rank order (sum of B_r, ...), then the index
    where this process's rows start: for a method whose samples interact across the whole batch, so N
    processes compute what one would. The B_r may differ (a held-out set split across processes: the last
    batch, or a size not divisible by N): the sizes are gathered first, then rows padded to the largest and
    trimmed back. In one process: the tensors as they are, and 0. No gradient flows back."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return (*tensors, 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([len(tensors[0])], device=tensors[0].device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]  # B_r of every process
    gathered = []
    for x in tensors:
        padded = x.new_zeros(max(sizes), *x.shape[1:])
        padded[: len(x)] = x.detach()
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes)]))
    return (*gathered, sum(sizes[:rank]))


def check_device(name):
    """A ValueError unless `name` is auto or a device torch can use here (cpu, cuda, cuda:N, ...)."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu or auto")


def pick_device(name="auto", local_rank=0):
    check_device(name)
    if name == "auto":
        name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank) if device.index is None else device  # `cuda`: this process's GPU
        torch.cuda.set_device(device)
    return device


def git_hash():
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_checkpoint(obj, path):
    """Write atomically: a temporary file, flushed to disk, then renamed over the old checkpoint, so a
    crash mid-write never leaves a half-written checkpoint behind."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """Load a checkpoint of ours, or an official MAE one ({"model": state_dict, "args": Namespace, ...}),
    with weights_only=True: only tensors and plain containers, so a crafted file cannot run code."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}: pass a run folder (runs/NAME) or a .pt/.pth file")
    # the official MAE scripts pickle their args; older checkpoints of ours hold torch's version string class
    torch.serialization.add_safe_globals([argparse.Namespace, torch.torch_version.TorchVersion])
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if refused:
            raise ValueError(
                f"{path} holds pickled objects that safe loading refuses ({refused[1]}): it is "
                f"not a checkpoint of this project or an official facebookresearch one"
            ) from None
        with open(path, "rb") as f:
            head = f.read(4)
        if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save writes a zip archive (old torch: a pickle)
            raise ValueError(
                f"{path} is not a checkpoint (not a file torch.save wrote): pass a run folder "
                f"(runs/NAME) or a .pt/.pth checkpoint"
            ) from None
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0][:160]
        raise ValueError(
            f"{path} is not a readable checkpoint, truncated or corrupt ({reason}): restore "
            f"it or re-run the training that wrote it"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(
            f"{path} holds no 'model' state dict: it is not a checkpoint of this project "
            f"or an official facebookresearch one"
        )
    return ckpt


def load_weights(model, state, source="the checkpoint"):
    """model.load_state_dict(state, strict=True), but a mismatch (another architecture or size) is a
    one-line ValueError naming the first differing tensor instead of torch's multi-line report."""
    own = model.state_dict()
    shapes = [
        (k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape
    ]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if shapes:
        k, theirs, ours = shapes[0]
        raise ValueError(
            f"{source} does not fit this model: {k} is {theirs} there and {ours} here "
            f"({len(shapes)} tensor(s) differ): it was written for another size or method"
        )
    if missing or unexpected:
        names = ", ".join((missing or unexpected)[:3])
        raise ValueError(
            f"{source} does not fit this model: {len(missing)} tensor(s) missing, {len(unexpected)} "
            f"unexpected (e.g. {names}): it was written for another architecture or method"
        )
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# The training loop


@dataclass
class TrainConfig:
    data: str = "imagenet"  # shapes | fashion-mnist | cifar10 | cifar100 | tiny-imagenet | imagenet | folder
    data_dir: str = "data"  # where data sets live; for imagenet / folder: the folder holding train/ and val/
    download: bool = False  # let torchvision download CIFAR / Fashion-MNIST into --data-dir
    train_size: int = 0  # use N training images, a fixed random subset (0 = all; shapes: how many to draw)
    val_size: int = 0  # use N held-out images for the per-epoch reconstruction loss (0 = all)
    epochs: int = 800  # MAE paper Sec. 4: 800 epochs for the ablations, 1600 for the best results
    warmup_epochs: int = 40  # MAE paper, Appendix A.1: 40 warm-up epochs
    batch_size: int = 64  # images per process and step (official: 64 per GPU x 64 GPUs = 4096)
    accum_iter: int = 1  # gradient accumulation: effective batch = batch_size * accum_iter * processes
    blr: float = 1.5e-4  # base learning rate, lr = blr * effective batch / 256 (MAE paper, Appendix A.1)
    lr: float = 0.0  # absolute learning rate; 0 = derive it from --blr
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.05  # AdamW weight decay (MAE paper, Appendix A.1); never on norms, biases, tokens
    clip_grad: float = 0.0  # clip the gradient norm to this value (0 = off; the MAE recipe does not clip)
    seed: int = 0  # seeds the initialisation, data order, augmentation and masks
    num_workers: int = 8  # data-loading processes per training process
    amp: str = "bf16"  # autocast on GPU: bf16 | fp16 (with a gradient scaler) | fp32; CPU runs are fp32
    compile: bool = False  # torch.compile the model
    log_every: int = 20  # write a line to log.jsonl every N steps
    ckpt_every: int = 0  # also save a checkpoint every N steps (0 = only at epoch ends and the last step)
    vis_every: int = 0  # also save a reconstruction picture, vis-epochNNNN.png, every N epochs (0 = never)
    max_steps: int = 0  # stop after N steps of the full schedule (0 = run all epochs); for budgets and tests
    out: str = ""  # run folder for log and checkpoint (default runs/<method>-<data>-<time>)
    resume: bool = False  # continue the run in --out from its checkpoint, exactly
    overwrite: bool = False  # replace a run already in --out
    device: str = "auto"  # auto (GPU if there is one) | cpu | cuda | cuda:N

    def __post_init__(self):
        check_options(
            self,
            "epochs batch_size accum_iter log_every",
            "warmup_epochs train_size val_size lr min_lr "
            "weight_decay clip_grad num_workers ckpt_every max_steps vis_every",
        )
        if self.blr <= 0 and self.lr <= 0:
            raise ValueError(f"--blr must be positive, got {self.blr}")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"--amp must be bf16, fp16 or fp32, got {self.amp!r}")
        if self.data not in DATASETS:
            raise ValueError(f"unknown data set {self.data!r}: choose one of {', '.join(DATASETS)}")
        check_device(self.device)


# options that may change when a run (pre-training or fine-tuning) is resumed: they do not change what it computes
RESUME_MAY_CHANGE = set("out resume max_steps num_workers log_every ckpt_every vis_every compile device".split())


def check_options(cfg, positive="", non_negative=""):
    """A ValueError naming the first field of the dataclass `cfg` (as its --option) that is out of range: the
    `positive` ones (space-separated names) must be at least 1, the `non_negative` ones at least 0."""
    for names, low, words in ((positive, 1, "be at least 1"), (non_negative, 0, "not be negative")):
        for name in names.split():
            if getattr(cfg, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must {words}, got {getattr(cfg, name)}")


def param_groups(model, weight_decay):
    """AdamW parameter groups: no weight decay on biases and norms (1-d) or on tokens and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            skip = p.ndim <= 1 or "token" in name or "pos_embed" in name
            (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, total_steps, warmup_steps, lr, min_lr):
    """Linear warm-up, then a half-cycle cosine to min_lr, per step (official util/lr_sched.py)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_step(seed, step, micro=0, rank=0):
    """Seed torch's global generators (CPU and every GPU) for one micro-batch from where it is in the run:
    whatever the model or the loop draws there (drop path, mixup, a method's noise) is fixed by (seed, step,
    micro-batch, process), not by what ran before, so a resumed run draws exactly what an uninterrupted one does."""
    torch.manual_seed(hash((seed, step, micro, rank)) % 2**63)


def all_reduce_sum(x, world):
    if world > 1:
        dist.all_reduce(x)
    return x


def all_reduce_max(x, world):
    if world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def setup(tcfg):
    """(rank, world size, device) of this process, with TF32 matmuls allowed on a GPU."""
    rank, world, local_rank = distributed()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, pick_device(tcfg.device, local_rank)


def autocast_dtype(amp, device):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp] if device.type == "cuda" else None


def epoch_steps(images, world, tcfg):
    """Optimiser steps in an epoch of `images` training images; a ValueError if not even one."""
    steps = images // world // (tcfg.batch_size * tcfg.accum_iter)
    if steps == 0:
        raise ValueError(
            f"{images} training images are fewer than one step needs "
            f"({tcfg.batch_size * tcfg.accum_iter * world}): lower --batch-size or use more data"
        )
    return steps


def train(
    model,
    optimizer,
    tcfg,
    loader,
    sampler,
    loss_of,
    end_of_epoch,
    model_state,
    meta,
    ckpt=None,
    ema=None,
    evaluate_first=False,
    console=None,
    title="train",
):
    """The training loop of pre-training and fine-tuning. Returns the run folder, tcfg.out.

    loss_of(net, imgs, labels, inputs) -> the loss of one micro-batch; end_of_epoch(epoch) -> {metric: value}, logged
    after each epoch (and before training if evaluate_first); model_state() -> the model's part of the checkpoint
    ({"model": state dict, ...}); meta: the rest of it (configs, code). ckpt: the checkpoint to continue (--resume),
    whose model the caller has loaded already; the optimiser, scaler, step and EMA are restored here. ema: an
    AveragedModel updated after every step.

    One process or many under torchrun (DDP; rank 0 writes log.jsonl and checkpoint.pt). Every random draw is seeded
    by its place in the run (seed_step; data: SeededDataset), so a resumed run is bitwise the uninterrupted one.
    The loss and the stop flag reach the host only at logged steps (every --log-every steps and at epoch ends)."""
    from rich.console import Console
    from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # set-up: processes, the schedule, the run folder
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device, main = next(model.parameters()).device, rank == 0
    console = console or Console()
    out = Path(tcfg.out)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    amp_dtype = autocast_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    images_per_step = tcfg.batch_size * tcfg.accum_iter  # per process
    steps_per_epoch = epoch_steps(sampler.n, world, tcfg)
    total_steps, warmup_steps = tcfg.epochs * steps_per_epoch, tcfg.warmup_epochs * steps_per_epoch
    stop = min(total_steps, tcfg.max_steps) if tcfg.max_steps else total_steps
    peak_lr = tcfg.lr or tcfg.blr * images_per_step * world / 256
    step = 0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
            ema.n_averaged.fill_(step)
    net = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    net = torch.compile(net) if tcfg.compile else net
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_path.with_name(ckpt_path.name + ".tmp").unlink(missing_ok=True)  # left by a run killed mid-save
        rows = (
            [json.loads(line) for line in log_path.read_text().splitlines() if line.endswith("}")]
            if ckpt is not None and log_path.exists()
            else []
        )
        # keep what the log says up to the checkpoint (a killed run may have gone on); a new run starts afresh
        log_path.write_text("".join(json.dumps(row) + "\n" for row in rows if row["step"] <= step))
        if ckpt is None:
            ckpt_path.unlink(missing_ok=True)
        console.print(
            f"{title}: {sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained "
            f"parameters, {steps_per_epoch} steps/epoch x {tcfg.epochs} epochs, {world} process(es) on "
            f"{device}, lr {peak_lr:.2e} (effective batch {images_per_step * world}), run folder {out}"
        )

    def write_log(**row):
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save():  # the one save: model, optimiser, scaler, step, EMA, configs and code
        if main:
            save_checkpoint(
                {
                    **model_state(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "step": step,
                    "ema": ema.module.state_dict() if ema is not None else None,
                    **meta,
                },
                ckpt_path,
            )
        if world > 1:
            dist.barrier()

    signals = []  # SIGTERM (preemption) or Ctrl-C: stop at the next logged step and save; a second Ctrl-C aborts

    def on_signal(signum, frame):
        if signals and signum == signal.SIGINT:
            raise KeyboardInterrupt
        signals.append(signum)

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    fields = TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s")
    progress = Progress(
        *Progress.get_default_columns()[:-1],
        MofNCompleteColumn(),
        fields,
        TimeRemainingColumn(),
        console=console,
        disable=not main,
    )
    task = progress.add_task(title, total=stop, completed=step, loss=float("nan"), lr=0.0, ips=0.0)
    if evaluate_first and step == 0:  # before training: the floor every later number is read against
        metrics = end_of_epoch(0)
        write_log(step=0, epoch=0, **metrics)
        if main:
            console.print("before training: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    # the loop over optimiser steps, with an inner loop over micro-batches
    batches, saved_step, stop_asked = None, step if ckpt is not None else -1, False
    loss_sum, logged_step, tick = torch.zeros((), device=device), step, time.perf_counter()
    start = tick
    progress.start()
    try:
        while step < stop:
            epoch = step // steps_per_epoch
            if batches is None or step % steps_per_epoch == 0:  # a new epoch, or the rest of the resumed one
                sampler.set_epoch(epoch, start=(step % steps_per_epoch) * images_per_step)
                batches = iter(loader)
                progress.update(task, description=f"epoch {epoch + 1}/{tcfg.epochs}")
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, tcfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            for micro in range(tcfg.accum_iter):
                imgs, labels, inputs = next(batches)
                imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
                seed_step(tcfg.seed, step, micro, rank)
                last = micro == tcfg.accum_iter - 1
                with net.no_sync() if world > 1 and not last else contextlib.nullcontext():  # DDP: sync at the last
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = loss_of(net, imgs, labels, inputs)
                    scaler.scale(loss / tcfg.accum_iter).backward()
                loss_sum += loss.detach().float() / tcfg.accum_iter
            if tcfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            epoch_end = step % steps_per_epoch == 0
            save_now = epoch_end or step == stop or (tcfg.ckpt_every and step % tcfg.ckpt_every == 0)
            if step % tcfg.log_every == 0 or save_now:  # the one host sync: logged steps, and before every save
                stats = all_reduce_sum(
                    torch.stack([loss_sum / world, torch.tensor(float(bool(signals)), device=device)]), world
                ).tolist()
                mean_loss, stop_asked = stats[0] / (step - logged_step), stats[1] > 0
                if not math.isfinite(mean_loss):
                    where = (
                        f"the checkpoint of step {saved_step} in {ckpt_path} is kept"
                        if saved_step >= 0
                        else "no checkpoint was written"
                    )
                    raise FloatingPointError(
                        f"loss is {mean_loss} between steps {logged_step + 1} and {step} (epoch "
                        f"{epoch + 1}); stopped, {where}. Try a lower --blr, --clip-grad 1.0 or "
                        f"--amp fp32"
                    )
                ips = (step - logged_step) * images_per_step * world / (time.perf_counter() - tick)
                write_log(
                    step=step, epoch=round(step / steps_per_epoch, 4), loss=mean_loss, lr=lr, img_per_s=round(ips, 1)
                )
                progress.update(task, completed=step, loss=mean_loss, lr=lr, ips=ips)
                loss_sum.zero_()
                logged_step, tick = step, time.perf_counter()
            if epoch_end:  # the end of an epoch: held-out metrics, then a checkpoint
                metrics = end_of_epoch(epoch + 1)
                write_log(step=step, epoch=epoch + 1, **metrics, elapsed_s=round(time.perf_counter() - start, 1))
                if main:
                    progress.console.print(
                        f"epoch {epoch + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
                    )
            if save_now or stop_asked:
                save()
                saved_step = step
            if stop_asked:
                break
    finally:
        progress.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stop_asked:
        raise InterruptedError(
            f"stopped by a signal at step {step}, checkpoint saved: continue with --resume --out {out}"
        )
    return out


@torch.no_grad()
def evaluate_loss(model, loader, device, amp_dtype, world, seed=0):
    """Mean loss of `model` over a held-out loader, with the global RNG fixed and then restored, so
    the number is comparable across epochs and the training randomness is left untouched."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of losses x images, images)
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    count = all_reduce_max(torch.tensor(len(loader), device=device), world)  # a process may hold one batch fewer
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        batches, batch = iter(loader), None
        for _ in range(int(count)):
            # a process out of batches still runs the model, on an empty batch, so that a method gathering the
            # batch across processes (common.gather_batch) finds every process there
            batch = next(batches, None) or [batch[0][:0], batch[1][:0], {k: v[:0] for k, v in batch[2].items()}]
            imgs, labels, inputs = batch
            if takes_labels:
                inputs = {**inputs, "labels": labels}
            imgs, inputs = imgs.to(device), {k: v.to(device) for k, v in inputs.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = model(imgs, **inputs)[0]
            if len(imgs):
                total += torch.stack([loss.double() * len(imgs), torch.tensor(len(imgs), device=device)])
    model.train()
    total = all_reduce_sum(total, world)
    return (total[0] / total[1].clamp(min=1)).item()


def pretrain(model, cfg, tcfg, train_set, val_set, method, code_files, sample_inputs=None, console=None, picture=None):
    """Pre-train `model` and return the run folder. The model is called as model(imgs, **inputs) ->
    (loss, pred, mask), with inputs = sample_inputs(generator) of each sample, collated, plus
    labels=(B,) if its forward has a `labels` parameter. Held-out loss before training and after each
    epoch; picture(model, path, title), if given, draws reconstructions every --vis-every epochs (called on
    every process, with path None but on rank 0).

    Writes config.json, log.jsonl and checkpoint.pt (model, optimiser, scaler, step, configs, method and
    common.py source, git hash) in tcfg.out."""
    rank, world, device = setup(tcfg)
    epoch_steps(len(train_set), world, tcfg)  # before anything is written
    out = Path(tcfg.out)
    model.to(device)
    ckpt = None
    if tcfg.resume:
        ckpt = load_checkpoint(out / "checkpoint.pt")
        load_weights(model, ckpt["model"], str(out / "checkpoint.pt"))
    optimizer = torch.optim.AdamW(
        param_groups(model, tcfg.weight_decay), lr=0.0, betas=(0.9, 0.95), fused=device.type == "cuda"
    )  # betas: MAE paper, Appendix A.1
    loader, sampler = pretrain_loader(
        train_set,
        tcfg.data,
        cfg.img_size,
        sample_inputs,
        tcfg.seed,
        tcfg.batch_size,
        tcfg.num_workers,
        device,
        rank,
        world,
    )
    val_data = SeededDataset(val_set, transform(tcfg.data, cfg.img_size, False), sample_inputs, tcfg.seed + 1)
    val_loader = make_loader(
        val_data,
        tcfg.batch_size,
        EpochSampler(len(val_set), False, rank=rank, world=world),
        min(tcfg.num_workers, 2),
        False,
        device,
    )
    takes_labels = "labels" in inspect.signature(model.forward).parameters  # e.g. a method pairing images by class
    meta = {
        "method": method,
        "config": dataclasses.asdict(cfg),
        "train": dataclasses.asdict(tcfg),
        "git": git_hash(),
        "torch": str(torch.__version__),
        "world_size": world,
        "code": {Path(f).name: Path(f).read_text() for f in code_files},
    }
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "code"}, indent=2) + "\n")

    def loss_of(net, imgs, labels, inputs):
        return net(imgs, **inputs, **({"labels": labels} if takes_labels else {}))[0]

    def end_of_epoch(epoch):
        val_loss = evaluate_loss(model, val_loader, device, autocast_dtype(tcfg.amp, device), world, seed=tcfg.seed)
        if picture and tcfg.vis_every and epoch and epoch % tcfg.vis_every == 0:  # every process runs the model,
            path = out / f"vis-epoch{epoch:04d}.png" if rank == 0 else None  # as above; rank 0 draws
            picture(model, path, f"{method}, epoch {epoch}, held-out images.")
        return {"val_loss": val_loss}

    return train(
        model,
        optimizer,
        tcfg,
        loader,
        sampler,
        loss_of,
        end_of_epoch,
        lambda: {"model": model.state_dict()},
        meta,
        ckpt,
        evaluate_first=True,
        console=console,
        title=method,
    )
