"""The augmentation: evaluation's torchvision transforms, and the crop of pre-training, batched
on a device (resized_crops, for data in memory) and per image (crop_one, for files), with the
crops and flips of a batch drawn from its samples' keys (crops_of). All of them crop as
RandomResizedCrop(scale 0.2-1, bicubic) with a horizontal flip, MAE's pre-training augmentation."""

import torch

from .draws import Draws, crop_boxes, sample_keys
from .readers import DATASETS

SCALE = (0.2, 1.0)  # RandomResizedCrop's scale in the MAE pre-training augmentation
RATIO = (3 / 4, 4 / 3)
FLIP = 0.5


def transform(name, img_size, train):
    """Evaluation's augmentation: RandomResizedCrop (scale 0.2-1, bicubic) and a flip, or the
    resize + centre crop, then normalisation with the data set's statistics."""
    from torchvision.transforms import InterpolationMode, v2

    bicubic = InterpolationMode.BICUBIC
    if train:
        crop = v2.RandomResizedCrop(img_size, scale=SCALE, interpolation=bicubic)
        steps = [crop, v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(resize_size(name, img_size), interpolation=bicubic)]
        steps.append(v2.CenterCrop(img_size))
    normalize = v2.Normalize(*DATASETS[name][1])
    return v2.Compose([v2.ToImage(), *steps, v2.ToDtype(torch.float32, scale=True), normalize])


def resize_size(name, img_size):
    """The short side held-out images are resized to before the centre crop: 1/0.875 of the crop
    for large natural images (the ImageNet protocol), the crop itself for small ones."""
    return round(img_size / 0.875) if name in ("imagenet", "folder") else img_size


def normalize(imgs, name):
    """uint8 images (B, C, H, W) as the model takes them: float, normalised with the data set's
    statistics, on their device."""
    mean, std = (torch.tensor(s, device=imgs.device).view(-1, 1, 1) for s in DATASETS[name][1])
    return (imgs.float() / 255 - mean) / std


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


def crop_one(img, box, flip, size):
    """(C, size, size) uint8: the crop box (top, left, height, width) of a (C, H, W) uint8 image,
    resized by torchvision (bicubic, antialias) wherever the image is, flipped if `flip`."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    top, left, height, width = (int(v) for v in box)
    bicubic = InterpolationMode.BICUBIC
    img = TF.resized_crop(img, top, left, height, width, [size, size], bicubic, antialias=True)
    return img.flip(-1) if flip else img


def centre_one(img, name, size):
    """(C, size, size) uint8: a held-out image resized and centre-cropped as transform() does."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    bicubic = InterpolationMode.BICUBIC
    img = TF.resize(img, [resize_size(name, size)], bicubic, antialias=True)
    return TF.center_crop(img, [size, size])


def as_uint8(img):
    """A data set's image as a (C, H, W) uint8 tensor: [0, 1] floats (the built-in data) rounded."""
    if img.dtype != torch.uint8:
        img = (img * 255).round().to(torch.uint8)
    return img


def crops_of(keys, seed, epoch, sizes):
    """The crops and flips of samples `keys` (their indices) at `epoch`: boxes (B, 4) and flips
    (B,), from each sample's first Draws call, for images of `sizes` [(H, W)]."""
    draws = Draws(sample_keys(seed, epoch, keys))(23)  # (B, 23)
    heights = torch.tensor([h for h, _ in sizes])
    widths = torch.tensor([w for _, w in sizes])
    return crop_boxes(draws, heights, widths, SCALE, RATIO, FLIP)
