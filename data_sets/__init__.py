"""Data: the data sets, the augmentation and the seeded loaders of pre-training and evaluation.

Every data set yields (image, label), the image a PIL image or a (C, H, W) uint8 or [0, 1] tensor,
and has `.classes`. Every random draw of the loaders is fixed by (seed, epoch, index).

    patterns.py  the built-in data set, drawn on the fly
    readers.py   the data sets by name (DATASETS, load_dataset); Fashion-MNIST and CIFAR in memory
    folders.py   data sets of image files (ImageNet, `folder`, Tiny-ImageNet), via ImageFolder
    draws.py     the random draws of a batch, fixed by each sample's (seed, epoch, index)
    augment.py   evaluation's transforms and pre-training's crops (batched, and per image)
    loaders.py   SeededDataset, EpochSampler, and the pre-training loaders of the three data paths
"""

from .augment import normalize, resize_weights, resized_crops, transform
from .draws import Draws, crop_boxes, sample_keys
from .loaders import (
    BatchedLoader,
    EpochSampler,
    SeededDataset,
    WorkerLoader,
    choose_path,
    make_loader,
    pretrain_loader,
    pretrain_loaders,
    reads_files,
)
from .patterns import Patterns
from .readers import (
    DATASETS,
    FASHION_MNIST_DEBIAN,
    IMAGENET_STATS,
    TensorImages,
    channels,
    load_dataset,
)

__all__ = [
    "DATASETS",
    "Draws",
    "WorkerLoader",
    "choose_path",
    "crop_boxes",
    "normalize",
    "reads_files",
    "sample_keys",
    "FASHION_MNIST_DEBIAN",
    "IMAGENET_STATS",
    "BatchedLoader",
    "EpochSampler",
    "Patterns",
    "SeededDataset",
    "TensorImages",
    "channels",
    "load_dataset",
    "make_loader",
    "pretrain_loader",
    "pretrain_loaders",
    "resize_weights",
    "resized_crops",
    "transform",
]
