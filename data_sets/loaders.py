"""The loaders: every random draw fixed by (seed, epoch, index).

EpochSampler hands each process its share of a seeded shuffle, and every random choice about a
sample (its crop and flip, a method's masks: `sample_inputs(cfg, draws)`) is a Draws of its key
(draws.py), so a resumed run sees what an uninterrupted one would have, whatever the number of
workers or processes. A pre-training loader yields batches on the training device: images (B, C,
S, S) normalised there, labels (B,) and the method's inputs, drawn there for the whole batch. Its
three paths, the images crossing processes and the bus as uint8 on each:

    batched  data held in memory (patterns, Fashion-MNIST, CIFAR): the uint8 images once on the
             device, each batch cropped, resized and flipped there in a few batched calls
    workers  data read from files on a CPU (or MIM_WORKER_DATA=1): DataLoader workers decode,
             crop, resize and flip each image to uint8 (torchvision.io and v2 on tensors)
    device   data read from files on a GPU: workers read the files' bytes, the training process
             decodes the batch on the GPU (nvJPEG) and crops, resizes and flips there

SeededDataset serves evaluation (kNN, probes, fine-tuning): its torchvision transforms
(augment.transform) draw from the global RNG, seeded per sample. The crops: augment.py.
"""

import contextlib
import copy
import os
import sys

import torch

from .augment import (
    FLIP,
    RATIO,
    SCALE,
    as_uint8,
    centre_one,
    crop_one,
    crops_of,
    normalize,
    resized_crops,
)
from .draws import Draws, crop_boxes, sample_keys
from .readers import DATASETS, load_dataset


class SeededDataset(torch.utils.data.Dataset):
    """Applies `transform` with the global RNG seeded by the sample's key (epoch, index): every
    draw of a torchvision transform fixed by (seed, epoch, index), whatever the number of workers
    or processes. Items: (image, label, {})."""

    def __init__(self, base, transform, seed=0):
        self.base = base
        self.transform = transform
        self.seed = seed

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        return self.transformed(key, self.base[key[1]])

    def __getitems__(self, keys):  # a DataLoader's batch: the base's items in one call if it can
        if hasattr(self.base, "__getitems__"):
            items = self.base.__getitems__([index for _, index in keys])
        else:
            items = [self.base[index] for _, index in keys]
        return [self.transformed(key, item) for key, item in zip(keys, items)]

    def transformed(self, key, item):
        epoch, index = key
        img, label = item
        with torch.random.fork_rng(devices=[]):  # torchvision transforms draw from the global RNG
            torch.default_generator.manual_seed(hash((self.seed, epoch, index)) % 2**32)
            img = self.transform(img)
        return img, label, {}


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


def make_loader(dataset, batch_size, sampler, num_workers, train, device, collate_fn=None):
    """A DataLoader of `dataset` in the order of `sampler`; training drops a last, partial batch."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=train,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        collate_fn=collate_fn,
    )


# --------------------------------------------------------------------------------------------------
# Pre-training loaders


class BatchedLoader:
    """The pre-training loader of data held in memory: the uint8 images once on `device`; each
    batch cropped like RandomResizedCrop(scale, ratio), resized, flipped and normalised there in a
    few batched calls, its crops and the method's inputs drawn there for the whole batch. Unlike
    torchvision: float weights, not uint8's fixed-point ones, and no rounding to uint8 after the
    resize. The held-out loader takes the whole image (scale 1), unflipped, every image."""

    def __init__(self, images, labels, data, img_size, sample_inputs, seed, batch_size, sampler):
        self.images = images
        self.labels = labels
        self.data = data
        self.img_size = img_size
        self.sample_inputs = sample_inputs
        self.seed = seed
        self.batch_size = batch_size
        self.sampler = sampler
        self.scale = SCALE
        self.flip = FLIP
        self.drop_last = True
        self.skipped = []  # nothing to skip: no files

    def __len__(self):
        partial = 0 if self.drop_last else self.batch_size - 1  # a last, partial batch kept
        return (len(self.sampler) + partial) // self.batch_size

    def __iter__(self):
        keys = list(self.sampler)
        for b in range(len(self)):
            yield self.batch(keys[b * self.batch_size : (b + 1) * self.batch_size])

    def batch(self, keys):
        """The batch of `keys` [(epoch, index)], on the device: images (B, C, S, S) normalised,
        labels (B,) and inputs {name: (B, ...)}."""
        device = self.images.device
        index = torch.tensor([i for _, i in keys])
        if device.type == "cuda":
            index = index.pin_memory()
        index = index.to(device, non_blocking=True)
        sample = sample_keys(self.seed, keys[0][0], index)  # (B,)
        draws = Draws(sample)(23)  # (B, 23): the crop, then the flip
        H, W = self.images.shape[-2:]
        boxes, flips = crop_boxes(draws, H, W, self.scale, RATIO, self.flip)
        imgs = resized_crops(self.images[index].float() / 255, boxes, flips, self.img_size)
        mean, std = (torch.tensor(s, device=device).view(-1, 1, 1) for s in DATASETS[self.data][1])
        inputs = self.sample_inputs(Draws(sample, first=1)) if self.sample_inputs else {}
        return (imgs - mean) / std, self.labels[index], inputs


class PretrainSamples(torch.utils.data.Dataset):
    """A worker's part of the workers path: an item (image (C, S, S) uint8, label, epoch, index,
    path, why), the last two the path of an image that cannot be read and why (else ""). The image
    decoded, cropped, resized and flipped as the batched and device paths do it (`train`), or
    resized and centre-cropped."""

    def __init__(self, base, data, img_size, seed, train):
        self.base = base
        self.data = data
        self.img_size = img_size
        self.seed = seed
        self.train = train

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        try:
            img, label = self.base[index]
        except OSError as e:  # a file that cannot be read: the training process decides
            size = (DATASETS[self.data][0], self.img_size, self.img_size)
            return torch.zeros(size, dtype=torch.uint8), -1, epoch, index, e.filename, e.strerror
        img = as_uint8(img)
        if self.train:
            boxes, flips = crops_of(torch.tensor([index]), self.seed, epoch, [img.shape[-2:]])
            img = crop_one(img, boxes[0], bool(flips[0]), self.img_size)
        else:
            img = centre_one(img, self.data, self.img_size)
        return img, label, epoch, index, "", ""


class EncodedSamples(torch.utils.data.Dataset):
    """A worker's part of the device path: an item (path, the file's bytes, label, epoch, index);
    a file that cannot be read hands on empty bytes, which do not decode."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, key):
        epoch, index = key
        try:
            (path, data), label = self.base[index]
        except OSError as e:
            return e.filename, torch.zeros(0, dtype=torch.uint8), -1, epoch, index
        return path, data, label, epoch, index


def as_lists(samples):
    """The device path's collate: the files' paths and bytes as lists, the rest as tensors."""
    paths, datas, labels, epochs, indices = zip(*samples)
    return (
        list(paths),
        list(datas),
        torch.tensor(labels),
        torch.tensor(epochs),
        torch.tensor(indices),
    )


class WorkerLoader:
    """A pre-training loader of the workers or the device path: DataLoader workers prepare each
    sample (PretrainSamples: a uint8 crop; EncodedSamples: the file's bytes); the training process
    brings a batch to the device ahead of its step (pinned memory, non-blocking copies on a side
    stream of a GPU; the device path decodes and crops it there), normalises it and draws the
    method's inputs there for the whole batch. An image that cannot be read stops the run
    (UnreadableImage), or, with skip_bad, is dropped from its batch and listed in `skipped`."""

    def __init__(self, dataset, sampler, settings, data, img_size, sample_inputs, seed, skip_bad):
        batch_size, num_workers, device, train = settings
        self.decode_here = isinstance(dataset, EncodedSamples)
        collate = as_lists if self.decode_here else None
        self.loader = make_loader(
            dataset, batch_size, sampler, num_workers, train, device, collate_fn=collate
        )
        self.sampler = sampler
        self.device = device
        self.data = data
        self.img_size = img_size
        self.sample_inputs = sample_inputs
        self.seed = seed
        self.skip_bad = skip_bad
        self.train = train
        self.skipped = []
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        ahead = None  # the next batch, its copy to the device (or its decoding) under way
        for batch in self.loader:
            current = ahead
            ahead = self.start(batch)
            if current is not None:
                yield self.finish(*current)
        if ahead is not None:
            yield self.finish(*ahead)

    def start(self, batch):
        """Begin bringing a batch to the device: (images uint8 (B, C, S, S), labels, epoch, index,
        the unreadable images [(row, path, why)]) on it, the copies not yet waited for."""
        stream = torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext()
        with stream:
            if self.decode_here:
                paths, datas, labels, epochs, index = batch
                imgs, bad = self.decode(paths, datas, int(epochs[0]), index)
            else:
                imgs, labels, epochs, index, paths, whys = batch
                imgs = imgs.to(self.device, non_blocking=True)
                rows = enumerate(zip(paths, whys))
                bad = [(k, path, why) for k, (path, why) in rows if path]
            labels = labels.to(self.device, non_blocking=True)
            index = index.to(self.device, non_blocking=True)
        return imgs, labels, int(epochs[0]), index, bad

    def decode(self, paths, datas, epoch, index):
        """The device path: the files decoded on the device, then cropped, resized and flipped
        there (or resized and centre-cropped), as uint8 (B, C, S, S); and the paths it could not
        decode."""
        from .folders import decode_on

        images = decode_on(self.device, list(zip(paths, datas)))
        bad = [(k, e.filename, e.strerror) for k, e in enumerate(images) if isinstance(e, OSError)]
        good = [(k, img) for k, img in enumerate(images) if isinstance(img, torch.Tensor)]
        if self.train and good:
            sizes = [tuple(img.shape[-2:]) for _, img in good]
            keys = index[[k for k, _ in good]]
            boxes, flips = crops_of(keys, self.seed, epoch, sizes)  # on the CPU: the host slices
            crops = [
                crop_one(img, box, flip, self.img_size)
                for (_, img), box, flip in zip(good, boxes, flips.tolist())
            ]
        else:
            crops = [centre_one(img, self.data, self.img_size) for _, img in good]
        channels = DATASETS[self.data][0]
        out = torch.zeros(
            len(images),
            channels,
            self.img_size,
            self.img_size,
            dtype=torch.uint8,
            device=self.device,
        )
        for (k, _), crop in zip(good, crops):
            out[k] = crop
        return out, bad

    def finish(self, imgs, labels, epoch, index, bad):
        """The batch as the model takes it, on the device: (images normalised, labels, inputs)."""
        if self.stream:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in (imgs, labels, index):
                t.record_stream(current)
        if bad:
            imgs, labels, index = self.drop(bad, imgs, labels, index)
        keys = sample_keys(self.seed, epoch, index)
        inputs = self.sample_inputs(Draws(keys, first=1)) if self.sample_inputs else {}
        return normalize(imgs, self.data), labels, inputs

    def drop(self, bad, imgs, labels, index):
        """Stop on an image that cannot be read [(row, path, why)], or with skip_bad drop it from
        the batch, counted in `skipped`."""
        from .folders import UnreadableImage

        _, path, why = bad[0]
        if not self.skip_bad or len(bad) == len(imgs):  # skipping all of a batch would leave none
            raise UnreadableImage(None, why, path)
        for _, path, why in bad:
            print(f"skipped an image that {why}: {path}", file=sys.stderr)
            self.skipped.append(path)
        rows = {row for row, _, _ in bad}
        keep = torch.tensor([k not in rows for k in range(len(imgs))]).to(imgs.device)
        return imgs[keep], labels[keep], index[keep]


def reads_files(dataset):
    """Whether a data set (or a Subset of one) reads its images from files: a torchvision
    DatasetFolder (ImageFolder, TinyImageNet). None exists unless torchvision.datasets was imported,
    so the built-in data never imports torchvision here."""
    folders = sys.modules.get("torchvision.datasets")
    base = getattr(dataset, "dataset", dataset)
    return folders is not None and isinstance(base, folders.DatasetFolder)


def encoded(dataset):
    """The same data set of files, its items (path, bytes) for decoding on the device."""
    from .folders import read_encoded

    if isinstance(dataset, torch.utils.data.Subset):
        subset = copy.copy(dataset)
        subset.dataset = encoded(dataset.dataset)
        return subset
    dataset = copy.copy(dataset)
    dataset.loader = read_encoded
    return dataset


def choose_path(dataset, device):
    """batched for data in memory, device for files on a GPU, workers for files on a CPU; workers
    for all with MIM_WORKER_DATA=1."""
    if os.environ.get("MIM_WORKER_DATA") == "1":
        return "workers"
    if not reads_files(dataset):
        return "batched"
    return "device" if device.type == "cuda" else "workers"


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
    path=None,
    skip_bad=False,
):
    """The pre-training loader (the MAE augmentation and the method's inputs, this process's share
    of a seeded shuffle) by `path` (None: choose_path); loader.sampler.set_epoch starts each epoch.
    `bench --data` times it."""
    path = path or choose_path(train_set, device)
    sampler = EpochSampler(len(train_set), shuffle=True, seed=seed, rank=rank, world=world)
    settings = (batch_size, num_workers, device, True)
    if path == "batched":
        # read once, through the data set's interface, to the device
        read = torch.utils.data.DataLoader(train_set, 256, num_workers=num_workers)
        images, labels = (torch.cat(x) for x in zip(*read))
        images = as_uint8(images).to(device)
        labels = labels.to(device)
        args = (images, labels, data, img_size, sample_inputs, seed, batch_size, sampler)
        return BatchedLoader(*args), sampler
    if path == "device":
        samples = EncodedSamples(encoded(train_set))
    else:
        samples = PretrainSamples(train_set, data, img_size, seed, train=True)
    args = (samples, sampler, settings, data, img_size, sample_inputs, seed, skip_bad)
    return WorkerLoader(*args), sampler


def pretrain_loaders(tcfg, img_size, sample_inputs, device, rank=0, world=1):
    """The data of a pre-training run: the loader over this process's share of the training set
    (augmented, shuffled) and the held-out loader over its share of the validation set (resized
    and centre-cropped, in order, every image, its inputs seeded apart), on the same path."""
    data = tcfg.data
    splits = dict(root=tcfg.data_dir, img_size=img_size, download=tcfg.download)
    train_set = load_dataset(data, "train", size=tcfg.train_size, **splits)
    val_set = load_dataset(data, "val", size=tcfg.val_size, **splits)
    settings = (tcfg.seed, tcfg.batch_size, tcfg.num_workers, device, rank, world)
    loader, _ = pretrain_loader(
        train_set, data, img_size, sample_inputs, *settings, skip_bad=tcfg.skip_bad_images
    )
    val_sampler = EpochSampler(len(val_set), False, rank=rank, world=world)  # in order, every one
    val_seed = tcfg.seed + 1
    if isinstance(loader, BatchedLoader):  # the whole image: a crop of scale 1, unflipped
        val, _ = pretrain_loader(val_set, data, img_size, sample_inputs, val_seed, *settings[1:])
        val.sampler = val_sampler
        val.scale = (1.0, 1.0)
        val.flip = 0.0
        val.drop_last = False
        return loader, val
    if loader.decode_here:
        samples = EncodedSamples(encoded(val_set))
    else:
        samples = PretrainSamples(val_set, data, img_size, val_seed, train=False)
    val_settings = (tcfg.batch_size, min(tcfg.num_workers, 2), device, False)
    val_args = (samples, val_sampler, val_settings, data, img_size, sample_inputs, val_seed)
    return loader, WorkerLoader(*val_args, tcfg.skip_bad_images)
