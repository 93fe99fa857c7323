"""The augmentation and the seeded loaders: every random draw fixed by (seed, epoch, index).

SeededDataset adds the augmentation and a method's per-sample random inputs (e.g. masks), and
EpochSampler hands each process its share of a seeded shuffle, so a resumed run sees what an
uninterrupted one would have, whatever the number of workers or processes. Data held in memory
skips the workers: BatchedLoader augments whole batches on the training device, its draws fixed
by (seed, epoch, index) as well.
"""

import math
import os
import sys

import torch

from .readers import DATASETS, load_dataset


def transform(name, img_size, train):
    """MAE pre-training augmentation (RandomResizedCrop scale (0.2, 1), bicubic, flip) or the
    evaluation resize + centre crop, then normalisation with the data set's statistics."""
    from torchvision.transforms import InterpolationMode, v2

    bicubic = InterpolationMode.BICUBIC
    if train:
        crop = v2.RandomResizedCrop(img_size, scale=(0.2, 1.0), interpolation=bicubic)
        steps = [crop, v2.RandomHorizontalFlip()]
    else:
        # large natural images: resize to 1/0.875 of the crop first, as the ImageNet protocol does
        resize = round(img_size / 0.875) if name in ("imagenet", "folder") else img_size
        steps = [v2.Resize(resize, interpolation=bicubic), v2.CenterCrop(img_size)]
    normalize = v2.Normalize(*DATASETS[name][1])
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), normalize])


class SeededDataset(torch.utils.data.Dataset):
    """Applies `transform` and draws a method's per-sample random inputs (`sample_inputs(g)`, e.g.
    a mask), all seeded by the sample's key (epoch, index): every draw is fixed by (seed, epoch,
    index), whatever the number of workers or processes, so a resumed run sees exactly what an
    uninterrupted one would have."""

    def __init__(self, base, transform, sample_inputs=None, seed=0):
        self.base = base
        self.transform = transform
        self.sample_inputs = sample_inputs
        self.seed = seed

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
        generator = torch.Generator().manual_seed(hash((self.seed, epoch, index, 1)) % 2**32)
        return img, label, self.sample_inputs(generator)


class EpochSampler(torch.utils.data.Sampler):
    """Keys (epoch, index): a permutation seeded by (seed, epoch), split across processes like
    DistributedSampler (rank r takes every world-th index), starting `start` keys into this rank's
    share (a resumed run skips exactly what it has trained on). Without shuffle: this rank's indices
    in order, every one of them."""

    def __init__(self, n, shuffle, seed=0, rank=0, world=1):
        self.n = n
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.epoch = epoch
        self.start = start

    def __len__(self):
        if self.shuffle:
            return max(self.n // self.world - self.start, 0)
        return len(range(self.rank, self.n, self.world))

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=generator)
            order = order[: self.n // self.world * self.world]  # equal shares
        else:
            order = torch.arange(self.n)
        for i in order[self.rank :: self.world][self.start :].tolist():
            yield self.epoch, i


def make_loader(dataset, batch_size, sampler, num_workers, train, device):
    """A DataLoader of `dataset` in the order of `sampler`; training drops a last, partial batch."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def resize_weights(start, length, size, n):
    """(B, size, n): rows of torchvision's antialiased bicubic resize (PIL's kernel, a = -0.5,
    widened when a crop is shrunk) of each crop [start, start + length) (B,) of an axis of n pixels
    to `size`; taps off the crop dropped."""
    j = torch.arange(n, device=start.device)  # the pixels of the axis
    start = start[:, None, None]
    length = length[:, None, None]
    out = torch.arange(size, device=start.device)[:, None]  # (size, 1): the resized pixels
    centre = start + (out + 0.5) * length / size  # (B, size, 1)
    x = ((j + 0.5 - centre) / (length / size).clamp(min=1)).abs()  # distances in kernel units
    k = torch.where(x < 1, (1.5 * x - 2.5) * x * x + 1, ((-0.5 * x + 2.5) * x - 4) * x + 2)
    k = k * ((x < 2) & (j >= start) & (j < start + length))  # taps off the crop dropped
    return k / k.sum(-1, keepdim=True)


def resized_crops(imgs, boxes, flips, size):
    """(B, C, size, size): the crops (top, left, height, width) (B, 4) of imgs (B, C, H, W) resized
    as torchvision's resized_crop(bicubic, antialias) does it, two batched matmuls, flipped
    left-right where flips (B,), in [0, 1]."""
    top, left, h, w = boxes.to(imgs.device, torch.float32).unbind(1)
    rows = resize_weights(top, h, size, imgs.shape[-2])
    cols = resize_weights(left, w, size, imgs.shape[-1])
    cols = torch.where(flips.to(imgs.device)[:, None, None], cols.flip(1), cols)
    return (rows[:, None] @ (imgs @ cols[:, None].transpose(-1, -2))).clamp(0, 1)


class BatchedLoader:
    """The pre-training loader of data held in memory: the uint8 images once on `device`, each batch
    cropped like RandomResizedCrop(scale, ratio) (the same 10 tries and fallback), resized, flipped
    and normalised there in a few batched calls. Each sample's crop and flip come from a generator
    seeded by (seed, epoch, index), as in SeededDataset, and its method inputs from SeededDataset's
    own generator (the same masks): a loop on the host, ~20 us a sample. Unlike transform(): float
    weights, not uint8's fixed-point ones, and no rounding to uint8 after the resize; the built-in
    data set is rounded to uint8 once, and clamped to [0, 1] after it as uint8 data are."""

    scale = (0.2, 1.0)
    ratio = (3 / 4, 4 / 3)
    flip = 0.5
    drop_last = True

    def __init__(
        self, images, labels, data, img_size, sample_inputs, seed, batch_size, sampler, device
    ):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.sampler = sampler
        self.device = device
        self.img_size = img_size
        self.sample_inputs = sample_inputs
        self.seed = seed
        self.batch_size = batch_size
        mean, std = DATASETS[data][1]
        self.mean = torch.tensor(mean, device=device).view(-1, 1, 1)
        self.std = torch.tensor(std, device=device).view(-1, 1, 1)

    def __len__(self):
        partial = 0 if self.drop_last else self.batch_size - 1  # a last, partial batch kept
        return (len(self.sampler) + partial) // self.batch_size

    def __iter__(self):
        keys = list(self.sampler)
        for b in range(len(self)):
            yield self.batch(keys[b * self.batch_size : (b + 1) * self.batch_size])

    def crops(self, draws):
        """Boxes (top, left, height, width) (B, 4) and flips (B,) of (B, 23) uniform draws, as
        RandomResizedCrop's get_params draws them."""
        H, W = self.images.shape[-2:]
        s0, s1 = self.scale
        r0, r1 = (math.log(r) for r in self.ratio)
        area = H * W * (s0 + (s1 - s0) * draws[:, :10])
        ratio = (r0 + (r1 - r0) * draws[:, 10:20]).exp()
        w = (area * ratio).sqrt().round()  # (B, 10) tries
        h = (area / ratio).sqrt().round()
        ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
        k = ok.int().argmax(1, keepdim=True)  # the first try that fits, else the centre crop
        fits = ok.any(1)
        w = torch.where(fits, w.gather(1, k)[:, 0], min(W, round(H * self.ratio[1])))
        h = torch.where(fits, h.gather(1, k)[:, 0], min(H, round(W / self.ratio[0])))
        top = torch.where(fits, (draws[:, 20] * (H - h + 1)).floor(), (H - h) // 2)
        left = torch.where(fits, (draws[:, 21] * (W - w + 1)).floor(), (W - w) // 2)
        return torch.stack([top, left, h, w], 1), draws[:, 22] < self.flip

    def batch(self, keys):
        """The batch of `keys`, on the device: images (B, C, S, S), normalised, labels (B,) and
        inputs {name: (B, ...)}."""
        index = torch.tensor([i for _, i in keys], device=self.device)
        gen = torch.Generator()
        seeds = [hash((self.seed, *k)) % 2**32 for k in keys]
        uniform = [torch.rand(23, generator=gen.manual_seed(s), dtype=torch.float64) for s in seeds]
        draws = torch.stack(uniform)  # (B, 23)
        imgs = resized_crops(self.images[index].float() / 255, *self.crops(draws), self.img_size)
        sample_inputs = self.sample_inputs or (lambda g: {})
        seeds = [hash((self.seed, *k, 1)) % 2**32 for k in keys]
        # as SeededDataset draws them: the same masks
        drawn = [sample_inputs(gen.manual_seed(s)) for s in seeds]
        inputs = {name: torch.stack([d[name] for d in drawn]).to(self.device) for name in drawn[0]}
        return (imgs - self.mean) / self.std, self.labels[index], inputs


def reads_files(dataset):
    """Whether a data set (or a Subset of one) reads its images from files: a torchvision
    DatasetFolder (ImageFolder, TinyImageNet). None exists unless torchvision.datasets was imported,
    so the built-in data never imports torchvision here."""
    folders = sys.modules.get("torchvision.datasets")
    base = getattr(dataset, "dataset", dataset)
    return folders is not None and isinstance(base, folders.DatasetFolder)


def pretrain_loader(
    train_set,
    data,
    img_size,
    sample_inputs,
    seed,
    batch_size,
    num_workers,
    device,
    rank=0,
    world=1,
    batched=None,
):
    """The pre-training loader (the MAE augmentation and the method's per-sample inputs, this
    process's share of a seeded shuffle); loader.sampler.set_epoch starts each epoch. `bench --data`
    times it. batched (None: when the data is not read from files, unless MIM_WORKER_DATA=1): a
    BatchedLoader, else SeededDataset in `num_workers` workers."""
    sampler = EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world=world)
    in_memory = not reads_files(train_set) and os.environ.get("MIM_WORKER_DATA") != "1"
    if batched or (batched is None and in_memory):
        # read once, through the data set's interface
        read = torch.utils.data.DataLoader(train_set, 256, num_workers=num_workers)
        images, labels = (torch.cat(x) for x in zip(*read))
        if images.dtype != torch.uint8:  # [0, 1] images (the built-in ones) rounded to uint8
            images = (images * 255).round().to(torch.uint8)
        loader = BatchedLoader(
            images, labels, data, img_size, sample_inputs, seed, batch_size, sampler, device
        )
        return loader, sampler
    dataset = SeededDataset(train_set, transform(data, img_size, True), sample_inputs, seed)
    return make_loader(dataset, batch_size, sampler, num_workers, True, device), sampler


def pretrain_loaders(tcfg, img_size, sample_inputs, device, rank=0, world=1):
    """The data of a pre-training run: the loader over this process's share of the training set
    (augmented, shuffled) and the held-out loader over its share of the validation set (no
    augmentation, inputs seeded apart)."""
    data = tcfg.data
    train_set = load_dataset(data, "train", tcfg.data_dir, tcfg.train_size, img_size, tcfg.download)
    val_set = load_dataset(data, "val", tcfg.data_dir, tcfg.val_size, img_size, tcfg.download)
    settings = (tcfg.seed, tcfg.batch_size, tcfg.num_workers, device, rank, world)
    loader = pretrain_loader(train_set, data, img_size, sample_inputs, *settings)[0]
    val_sampler = EpochSampler(len(val_set), False, rank=rank, world=world)  # in order, every image
    if isinstance(loader, BatchedLoader):
        # on the device too: the whole image (a crop of scale 1), unflipped, all kept
        val_settings = (tcfg.seed + 1, *settings[1:])
        val, _ = pretrain_loader(
            val_set, data, img_size, sample_inputs, *val_settings, batched=True
        )
        val.sampler = val_sampler
        val.scale = (1.0, 1.0)
        val.flip = 0.0
        val.drop_last = False
        return loader, val
    val_transform = transform(data, img_size, False)
    val_data = SeededDataset(val_set, val_transform, sample_inputs, tcfg.seed + 1)
    val_workers = min(tcfg.num_workers, 2)
    return loader, make_loader(val_data, tcfg.batch_size, val_sampler, val_workers, False, device)
