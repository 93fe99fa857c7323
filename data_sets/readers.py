"""The data sets by name: their channels and statistics (DATASETS), and load_dataset to read one.

Data sets of small images are read whole into memory (TensorImages: uint8 tensors) through
torchvision's readers: Fashion-MNIST and CIFAR-10/100. Folders of image files (Tiny-ImageNet,
ImageNet and any `folder`) are read a file at a time (folders.py).
"""

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .patterns import Patterns

IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# name: (channels, (mean, std) of the normalisation)
DATASETS = {
    "patterns": (3, ((0.500, 0.502, 0.500), (0.259, 0.259, 0.258))),
    "fashion-mnist": (1, ((0.2860,), (0.3530,))),
    "cifar10": (3, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))),
    "cifar100": (3, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))),
    "tiny-imagenet": (3, IMAGENET_STATS),
    "imagenet": (3, IMAGENET_STATS),
    "folder": (3, IMAGENET_STATS),
}
# `apt install dataset-fashion-mnist` puts the four gzipped IDX files here
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = [
    f"{split}-{kind}-ubyte"
    for split in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
]


class TensorImages(torch.utils.data.Dataset):
    """Images held in memory: (image (C, H, W) uint8, label) of images (M, C, H, W), labels (M,)."""

    def __init__(self, images, labels, classes):
        self.images = images
        self.labels = labels
        self.classes = classes

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def _idx_files(folder):
    """Fashion-MNIST's four IDX files in `folder`, each plain or gzipped; None if one is missing."""
    found = []
    for name in FASHION_MNIST_FILES:
        candidates = [p for p in (folder / name, folder / f"{name}.gz") if p.is_file()]
        if not candidates:
            return None
        found.append(candidates[0])
    return found


def _unpack(files, raw):
    """Puts `files` into `raw` as plain IDX files, decompressed with torchvision's extract_archive.
    Each is written aside and moved in whole, so processes that start together read whole files."""
    from torchvision.datasets.utils import extract_archive

    raw.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=raw.parent) as aside:
        for path in files:
            name = path.name.removesuffix(".gz")
            if path.suffix == ".gz":
                extract_archive(path, aside)
            else:
                shutil.copyfile(path, Path(aside, name))
            os.replace(Path(aside, name), raw / name)


def _fashion_mnist(split, root, download):
    """Fashion-MNIST through torchvision's FashionMNIST, which reads the four plain IDX files in
    <root>/FashionMNIST/raw/. Elsewhere (the original files under <root>/fashion-mnist/ or <root>/,
    the Debian package's gzipped ones), they are decompressed into that folder once; --download
    fetches them there when none are found."""
    from torchvision.datasets import FashionMNIST

    raw = root / "FashionMNIST" / "raw"
    sources = [root / "fashion-mnist", raw, root, FASHION_MNIST_DEBIAN]
    if not all((raw / name).is_file() for name in FASHION_MNIST_FILES):
        found = [files for files in map(_idx_files, sources) if files]
        if not found and not download:
            raise ValueError(
                f"Fashion-MNIST not found in {', '.join(map(str, sources))}: install it with "
                f"`apt install dataset-fashion-mnist`, or pass --download"
            )
        if found:
            try:
                _unpack(found[0], raw)
            except OSError as e:
                raise ValueError(
                    f"cannot write Fashion-MNIST's files into {raw}/ ({e.strerror}): "
                    f"pass a --data-dir this process can write to"
                ) from None
    ds = FashionMNIST(str(root), train=split == "train", download=download)
    return TensorImages(ds.data.unsqueeze(1), ds.targets, ds.classes)


def _cifar(name, split, root, download):
    from torchvision.datasets import CIFAR10, CIFAR100

    reader = CIFAR10 if name == "cifar10" else CIFAR100
    try:
        ds = reader(str(root), train=split == "train", download=download)
    except RuntimeError:
        hint = "expected the torchvision python version, e.g. cifar-10-batches-py/"
        raise ValueError(
            f"{name} not found under {root}/ ({hint}): pass --download, or --data-dir"
        ) from None
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2)  # (M, H, W, C) -> (M, C, H, W)
    return TensorImages(images, torch.tensor(ds.targets), ds.classes)


def channels(name):
    """The channels of the images of data set `name`; a ValueError if there is no such data set."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name][0]


def load_dataset(name, split, root="data", size=0, img_size=32, download=False, encoded=False):
    """The raw (image, label) data set `name` for split 'train' or 'val'; if size > 0, a fixed
    random subset of `size` items (every class represented). encoded: files as (path, bytes),
    for decoding on the training device. Missing or malformed data raise a ValueError saying what
    was expected."""
    root = Path(root)
    channels(name)
    if name == "patterns":
        return Patterns(split, size or {"train": 50_000, "val": 10_000}[split], img_size)
    if name == "fashion-mnist":
        ds = _fashion_mnist(split, root, download)
    elif name in ("cifar10", "cifar100"):
        ds = _cifar(name, split, root, download)
    else:
        from . import folders  # it imports torchvision: only when the data is files

        loader = folders.read_encoded if encoded else folders.read_image
        if name == "tiny-imagenet":
            ds = folders.tiny_imagenet(split, root, loader)
        else:
            ds = folders.image_folder(split, root, loader)
    if size and size < len(ds):
        generator = torch.Generator().manual_seed(0)
        keep = torch.randperm(len(ds), generator=generator)[:size].sort()[0]
        classes = ds.classes
        ds = torch.utils.data.Subset(ds, keep.tolist())
        ds.classes = classes
    return ds
