"""Data: the built-in data set, readers of the others, the augmentation, and seeded loaders.

Every data set yields (image, label), the image a PIL image or a (C, H, W) uint8 or [0, 1] tensor. SeededDataset
adds the augmentation and a method's per-sample random inputs (e.g. masks), every draw fixed by (seed, epoch, index),
and EpochSampler hands each process its share of a seeded shuffle, so a resumed run sees what an uninterrupted one
would have, whatever the number of workers or processes. Data held in memory skips the workers: BatchedLoader
augments whole batches on the training device, its draws fixed by (seed, epoch, index) as well.
"""

import gzip
import itertools
import math
import os
import struct
from pathlib import Path

import torch

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DATASETS = {  # name: (channels, (mean, std)) of the normalisation
    "patterns": (3, ((0.500, 0.502, 0.500), (0.259, 0.259, 0.258))),
    "fashion-mnist": (1, ((0.2860,), (0.3530,))),
    "cifar10": (3, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": (3, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "tiny-imagenet": (3, IMAGENET_STATS),
    "imagenet": (3, IMAGENET_STATS),
    "folder": (3, IMAGENET_STATS),
}
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")  # apt install dataset-fashion-mnist


def _field(label, u, v, p, r, theta):
    """Pattern `label` at rotated, shifted pixel coordinates (u, v), period p (px); (r, theta): polar coordinates
    about a random centre. Positive on the pattern's foreground, with about unit slope."""
    tau = 2 * math.pi
    a, b = tau * u / p, tau * v / p
    if label == 0:  # stripes
        return torch.sin(a)
    if label == 1:  # checkerboard
        return torch.sin(a) * torch.sin(b) * 2
    if label == 2:  # dots on a square lattice
        return torch.cos(a) + torch.cos(b) - 1.0
    if label == 3:  # grid lines
        return (torch.maximum(torch.cos(a), torch.cos(b)) - 0.75) * 3
    if label == 4:  # dots on a hexagonal lattice
        return sum(torch.cos(tau * (u * math.cos(t) + v * math.sin(t)) / p) for t in (0, tau / 6, tau / 3)) - 1.2
    if label == 5:  # concentric rings
        return torch.sin(tau * r / p)
    if label == 6:  # zigzag stripes
        return torch.sin(tau * (u + 0.6 * p * (1 - 2 * (v / p - torch.floor(v / p) - 0.5).abs())) / p)
    if label == 7:  # wavy stripes
        return torch.sin(a + 1.6 * torch.sin(b / 1.5))
    if label == 8:  # bricks: mortar between rows of height p, the joints shifted by half a brick each row
        row = torch.floor(v / p)
        dv, du = (v / p - row - 0.5).abs(), ((u / (2 * p) + 0.5 * row) % 1.0 - 0.5).abs()  # 0.5 on the mortar
        return (torch.maximum(dv, du) - 0.38) * -8
    return torch.sin(8 * theta)  # 9: spokes around a centre


class Patterns(torch.utils.data.Dataset):
    """The built-in data set: 10 classes of periodic patterns filling the image, drawn on the fly.

    No download, any image size, deterministic per (split, index) and balanced (the label is index mod 10). Period
    (18-30 % of the side), orientation, phase, the ground colour and the polarity are random and the same for every
    class; only the layout of the pattern tells the class. A masked autoencoder must infer that layout from the
    visible patches to fill in the hidden ones, while the random colour keeps kNN on raw pixels low (docs/learning.md).
    """

    classes = ("stripes", "checkerboard", "dots", "grid", "hex-dots", "rings", "zigzag", "waves", "bricks", "spokes")

    def __init__(self, split, size, img_size):
        self.size, self.img_size, self.split_bit = size, img_size, {"train": 0, "val": 1}[split]
        t = torch.arange(img_size) + 0.5  # pixel centres
        self.y, self.x = torch.meshgrid(t, t, indexing="ij")

    def __len__(self):
        return self.size

    def render(self, index):
        """Images (B, 3, H, W) in [0, 1] and labels (B,) of the int64 indices `index` (B,)."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        B, S, labels = len(index), self.img_size, index % len(self.classes)
        g, seeds = torch.Generator(), (2 * index + self.split_bit).tolist()  # CPU generators use 32 bits of a seed
        rnd = torch.stack([torch.rand(10, 1, 1, generator=g.manual_seed(s)) for s in seeds])  # (B, 10, 1, 1)
        p, rot = (0.18 + 0.12 * rnd[:, 0]) * S, rnd[:, 1] * 2 * math.pi  # period in pixels, orientation
        dx, dy = self.x - (rnd[:, 2] * 2 - 0.5) * S, self.y - (rnd[:, 3] * 2 - 0.5) * S  # (B, H, W), origin maybe off
        u, v = dx * rot.cos() + dy * rot.sin(), -dx * rot.sin() + dy * rot.cos()
        ex, ey = self.x - (0.15 + 0.7 * rnd[:, 8]) * S, self.y - (0.15 + 0.7 * rnd[:, 9]) * S  # a centre in the image
        r, theta = (ex**2 + ey**2).sqrt(), torch.atan2(ey, ex) + rot
        f = torch.empty(B, S, S)
        for k in range(len(self.classes)):
            sel = labels == k
            f[sel] = _field(k, u[sel], v[sel], p[sel], r[sel], theta[sel])
        alpha = (0.5 + 2.5 * f).clamp(0, 1)[:, None]  # (B, 1, H, W): soft edges
        sign = (rnd[:, 4:5] < 0.5).float() * 2 - 1  # (B, 1, 1, 1), +1: the pattern brighter than the ground
        ground = rnd[:, 5:8] * 0.6 + (sign < 0).float() * 0.4  # (B, 3, 1, 1): a random colour, room for +-0.4
        return (ground + sign * 0.4 * alpha).clamp(0, 1), labels  # the pattern 0.4 from it on the grey axis

    def __getitems__(self, indices):  # a DataLoader's batch in one call
        images, labels = self.render(indices)
        return list(zip(images, labels.tolist()))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]


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


def _images_in(folder):
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))


def _fashion_mnist(split, root, download):
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=split == "train", download=True)
    dirs = [root / "fashion-mnist", root / "FashionMNIST" / "raw", root, FASHION_MNIST_DEBIAN]
    for d, gz in itertools.product(dirs, ("", ".gz")):
        prefix = d / {"train": "train", "val": "t10k"}[split]
        images, labels = Path(f"{prefix}-images-idx3-ubyte{gz}"), Path(f"{prefix}-labels-idx1-ubyte{gz}")
        if images.exists() and labels.exists():
            classes = "T-shirt trouser pullover dress coat sandal shirt sneaker bag boot".split()
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
        hint = "expected the torchvision python version, e.g. cifar-10-batches-py/"
        raise ValueError(f"{name} not found under {root}/ ({hint}): pass --download, or --data-dir") from None
    return TensorImages(torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets), ds.classes)


def _tiny_imagenet(split, root):
    root = root / "tiny-imagenet-200" if (root / "tiny-imagenet-200").is_dir() else root
    hint = (
        f"expected the Tiny-ImageNet layout under {root}/ (wnids.txt, train/<wnid>/images/*.JPEG, "
        f"val/images/ and val/val_annotations.txt): unzip tiny-imagenet-200.zip there or pass --data-dir"
    )
    if not root.is_dir() or not (root / "wnids.txt").is_file():
        raise ValueError(f"{'no wnids.txt' if root.is_dir() else f'the data folder {root} does not exist'}: {hint}")
    wnids = (root / "wnids.txt").read_text().split()
    index = {w: k for k, w in enumerate(wnids)}
    if split == "train":
        folders = [(root / "train" / w / "images", index[w]) for w in wnids]
        samples = [(p, k) for folder, k in folders if folder.is_dir() for p in _images_in(folder)]
    else:
        annotations = root / "val" / "val_annotations.txt"
        rows = [line.split("\t") for line in annotations.read_text().splitlines()] if annotations.is_file() else []
        samples = [(root / "val" / "images" / r[0], index[r[1]]) for r in rows if len(r) > 1 and r[1] in index]
        if not all(p.is_file() for p, _ in samples):
            raise ValueError(f"val_annotations.txt names images missing from val/images/: {hint}")
    if not samples:
        raise ValueError(f"no {split} images found: {hint}")
    return FileImages(samples, wnids)


def _image_folder(split, root):
    folder, hint = root / split, f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageNet's)"
    if not root.is_dir():
        raise ValueError(f"the data folder {root} does not exist: {hint}; pass --data-dir")
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    samples = [(p, k) for k, c in enumerate(classes) for p in _images_in(folder / c)]
    if not samples:
        raise ValueError(f"no images in class folders under {folder}/: {hint}; pass --data-dir")
    return FileImages(samples, classes)


def channels(name):
    """The channels of the images of data set `name`; a ValueError if there is no such data set."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name][0]


def load_dataset(name, split, root="data", size=0, img_size=32, download=False):
    """The raw (image, label) data set `name` for split 'train' or 'val'; if size > 0, a fixed random subset of
    `size` items (every class represented). Missing or malformed data raise a ValueError saying what was expected."""
    root = Path(root)
    channels(name)
    if name == "patterns":
        return Patterns(split, size or {"train": 50_000, "val": 10_000}[split], img_size)
    if name in ("fashion-mnist", "cifar10", "cifar100"):
        ds = _fashion_mnist(split, root, download) if name == "fashion-mnist" else _cifar(name, split, root, download)
    else:
        ds = (_tiny_imagenet if name == "tiny-imagenet" else _image_folder)(split, root)
    if size and size < len(ds):
        keep = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:size].sort()[0]
        ds, ds.classes = torch.utils.data.Subset(ds, keep.tolist()), ds.classes
    return ds


def transform(name, img_size, train):
    """MAE pre-training augmentation (RandomResizedCrop scale (0.2, 1), bicubic, flip) or the evaluation resize +
    centre crop, then normalisation with the data set's statistics."""
    from torchvision.transforms import InterpolationMode, v2

    bicubic = InterpolationMode.BICUBIC
    if train:
        steps = [v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=bicubic), v2.RandomHorizontalFlip()]
    else:  # large natural images: resize to 1/0.875 of the crop first, as the ImageNet protocol does
        resize = round(img_size / 0.875) if name in ("imagenet", "folder") else img_size
        steps = [v2.Resize(resize, interpolation=bicubic), v2.CenterCrop(img_size)]
    normalize = v2.Normalize(*DATASETS[name][1])
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), normalize])


class SeededDataset(torch.utils.data.Dataset):
    """Applies `transform` and draws a method's per-sample random inputs (`sample_inputs(generator)`, e.g. a mask),
    all seeded by the sample's key (epoch, index): every draw is fixed by (seed, epoch, index), whatever the number
    of workers or processes, so a resumed run sees exactly what an uninterrupted one would have."""

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
    """Keys (epoch, index): a permutation seeded by (seed, epoch), split across processes like DistributedSampler
    (rank r takes every world-th index), starting `start` keys into this rank's share (a resumed run skips exactly
    what it has trained on). Without shuffle: this rank's indices in order, every one of them."""

    def __init__(self, n, shuffle, seed=0, rank=0, world=1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return max(self.n // self.world - self.start, 0) if self.shuffle else len(range(self.rank, self.n, self.world))

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = order[: self.n // self.world * self.world] if self.shuffle else torch.arange(self.n)  # equal shares
        for i in order[self.rank :: self.world][self.start :].tolist():
            yield self.epoch, i


def make_loader(dataset, batch_size, sampler, num_workers, train, device):
    pin, persistent = device.type == "cuda", num_workers > 0
    kwargs = dict(num_workers=num_workers, drop_last=train, pin_memory=pin, persistent_workers=persistent)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, **kwargs)


def resize_weights(start, length, size, n):
    """(B, size, n): rows of torchvision's antialiased bicubic resize (PIL's kernel, a = -0.5, widened when a crop is
    shrunk) of each crop [start, start + length) (B,) of an axis of n pixels to `size`; taps off the crop dropped."""
    start, length, j = start[:, None, None], length[:, None, None], torch.arange(n, device=start.device)
    centre = start + (torch.arange(size, device=start.device)[:, None] + 0.5) * length / size  # (B, size, 1)
    x = ((j + 0.5 - centre) / (length / size).clamp(min=1)).abs()  # distances in kernel units
    k = torch.where(x < 1, (1.5 * x - 2.5) * x * x + 1, ((-0.5 * x + 2.5) * x - 4) * x + 2)
    k = k * ((x < 2) & (j >= start) & (j < start + length))  # taps off the crop dropped
    return k / k.sum(-1, keepdim=True)


def resized_crops(imgs, boxes, flips, size):
    """(B, C, size, size): the crops (top, left, height, width) (B, 4) of imgs (B, C, H, W) resized as torchvision's
    resized_crop(bicubic, antialias) does it, two batched matmuls, flipped left-right where flips (B,), in [0, 1]."""
    top, left, h, w = boxes.to(imgs.device, torch.float32).unbind(1)
    rows, cols = resize_weights(top, h, size, imgs.shape[-2]), resize_weights(left, w, size, imgs.shape[-1])
    cols = torch.where(flips.to(imgs.device)[:, None, None], cols.flip(1), cols)
    return (rows[:, None] @ (imgs @ cols[:, None].transpose(-1, -2))).clamp(0, 1)


class BatchedLoader:
    """The pre-training loader of data held in memory: the uint8 images once on `device`, each batch cropped like
    RandomResizedCrop(scale, ratio) (the same 10 tries and fallback), resized, flipped and normalised there in a few
    batched calls. Each sample's crop and flip come from a generator seeded by (seed, epoch, index), as in
    SeededDataset, and its method inputs from SeededDataset's own generator (the same masks): a loop on the host,
    ~20 us a sample. Unlike transform(): float weights, not uint8's fixed-point ones, and no rounding to uint8 after
    the resize; the built-in data set is rounded to uint8 once, and clamped to [0, 1] after it as uint8 data are."""

    scale, ratio, flip, drop_last = (0.2, 1.0), (3 / 4, 4 / 3), 0.5, True

    def __init__(self, images, labels, data, img_size, sample_inputs, seed, batch_size, sampler, device):
        self.images, self.labels, self.sampler, self.device = images.to(device), labels.to(device), sampler, device
        self.img_size, self.sample_inputs, self.seed, self.batch_size = img_size, sample_inputs, seed, batch_size
        self.mean, self.std = (torch.tensor(s, device=device).view(-1, 1, 1) for s in DATASETS[data][1])

    def __len__(self):
        return (len(self.sampler) + (0 if self.drop_last else self.batch_size - 1)) // self.batch_size

    def __iter__(self):
        keys = list(self.sampler)
        for b in range(len(self)):
            yield self.batch(keys[b * self.batch_size : (b + 1) * self.batch_size])

    def crops(self, draws):
        """Boxes (top, left, height, width) (B, 4) and flips (B,) from (B, 23) uniform draws, as get_params draws."""
        H, W = self.images.shape[-2:]
        (s0, s1), (r0, r1) = self.scale, (math.log(r) for r in self.ratio)
        area, ratio = H * W * (s0 + (s1 - s0) * draws[:, :10]), (r0 + (r1 - r0) * draws[:, 10:20]).exp()
        w, h = (area * ratio).sqrt().round(), (area / ratio).sqrt().round()  # (B, 10) tries
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        k, fits = ok.int().argmax(1, keepdim=True), ok.any(1)  # the first try that fits, else the centre crop
        w = torch.where(fits, w.gather(1, k)[:, 0], min(W, round(H * self.ratio[1])))
        h = torch.where(fits, h.gather(1, k)[:, 0], min(H, round(W / self.ratio[0])))
        top = torch.where(fits, (draws[:, 20] * (H - h + 1)).floor(), (H - h) // 2)
        left = torch.where(fits, (draws[:, 21] * (W - w + 1)).floor(), (W - w) // 2)
        return torch.stack([top, left, h, w], 1), draws[:, 22] < self.flip

    def batch(self, keys):
        """(images (B, C, S, S) normalised, labels (B,), inputs {name: (B, ...)}), all on the device, of keys."""
        index, gen = torch.tensor([i for _, i in keys], device=self.device), torch.Generator()
        seeds = [hash((self.seed, *k)) % 2**32 for k in keys]
        draws = torch.stack([torch.rand(23, generator=gen.manual_seed(s), dtype=torch.float64) for s in seeds])
        imgs = resized_crops(self.images[index].float() / 255, *self.crops(draws), self.img_size)
        sample_inputs, seeds = self.sample_inputs or (lambda g: {}), [hash((self.seed, *k, 1)) % 2**32 for k in keys]
        drawn = [sample_inputs(gen.manual_seed(s)) for s in seeds]  # as SeededDataset draws them: the same masks
        inputs = {name: torch.stack([d[name] for d in drawn]).to(self.device) for name in drawn[0]}
        return (imgs - self.mean) / self.std, self.labels[index], inputs


def pretrain_loader(
    train_set, data, img_size, sample_inputs, seed, batch_size, num_workers, device, rank=0, world=1, batched=None
):
    """The pre-training loader (the MAE augmentation and the method's per-sample inputs, this process's share of a
    seeded shuffle); loader.sampler.set_epoch starts each epoch. `bench --data` times it. batched (None: when the data
    is not read from files, unless MIM_WORKER_DATA=1): a BatchedLoader, else SeededDataset in `num_workers` workers."""
    sampler = EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world=world)
    files = isinstance(getattr(train_set, "dataset", train_set), FileImages)
    if batched or (batched is None and not files and os.environ.get("MIM_WORKER_DATA") != "1"):
        read = torch.utils.data.DataLoader(train_set, 256, num_workers=num_workers)  # through the data set's interface
        images, labels = (torch.cat(x) for x in zip(*read))  # once; a [0, 1] image (the built-in one) rounded to uint8
        images = images if images.dtype == torch.uint8 else (images * 255).round().to(torch.uint8)
        return BatchedLoader(images, labels, data, img_size, sample_inputs, seed, batch_size, sampler, device), sampler
    dataset = SeededDataset(train_set, transform(data, img_size, True), sample_inputs, seed)
    return make_loader(dataset, batch_size, sampler, num_workers, True, device), sampler


def pretrain_loaders(tcfg, img_size, sample_inputs, device, rank=0, world=1):
    """The data of a pre-training run: the loader over this process's share of the training set (augmented, shuffled)
    and the held-out loader over its share of the validation set (no augmentation, inputs seeded apart)."""
    train_set = load_dataset(tcfg.data, "train", tcfg.data_dir, tcfg.train_size, img_size, tcfg.download)
    val_set = load_dataset(tcfg.data, "val", tcfg.data_dir, tcfg.val_size, img_size, tcfg.download)
    settings = (tcfg.seed, tcfg.batch_size, tcfg.num_workers, device, rank, world)
    loader = pretrain_loader(train_set, tcfg.data, img_size, sample_inputs, *settings)[0]
    val_sampler = EpochSampler(len(val_set), False, rank=rank, world=world)  # in order, every image
    if isinstance(loader, BatchedLoader):  # on the device too: the whole image (a crop of scale 1), unflipped, all kept
        val, _ = pretrain_loader(
            val_set, tcfg.data, img_size, sample_inputs, tcfg.seed + 1, *settings[1:], batched=True
        )
        val.sampler, val.scale, val.flip, val.drop_last = val_sampler, (1.0, 1.0), 0.0, False
        return loader, val
    val_data = SeededDataset(val_set, transform(tcfg.data, img_size, False), sample_inputs, tcfg.seed + 1)
    return loader, make_loader(val_data, tcfg.batch_size, val_sampler, min(tcfg.num_workers, 2), False, device)
