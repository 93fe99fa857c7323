"""Data sets of image files, read a file at a time through torchvision's ImageFolder, and the
decoding of their files.

`imagenet` and `folder`: root/{train,val}/<class>/<image>, the classes the sorted folder names.
`tiny-imagenet`: the layout of tiny-imagenet-200.zip, the classes in wnids.txt's order. An item
is (image, label): the image a (3, H, W) uint8 RGB tensor decoded by torchvision.io (PIL for the
formats it lacks), or, for decoding on the training device, (path, the file's bytes).
"""

import io
from pathlib import Path

import torch
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_image, decode_jpeg


class UnreadableImage(OSError):
    """An image file that cannot be read or decoded: its path is `filename`, why `strerror`."""

    def __str__(self):
        return f"{self.filename} {self.strerror}"


def decode(data, path=""):
    """(3, H, W) uint8 RGB of a file's bytes (a uint8 tensor): torchvision.io (JPEG, PNG, WebP,
    GIF; grey and CMYK made RGB), else PIL (BMP, TIFF, ...); UnreadableImage if neither can."""
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            return pil_to_tensor(img.convert("RGB"))
    except Exception as e:  # PIL raises many kinds for a broken file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UnreadableImage(None, f"cannot be decoded ({reason})", str(path)) from None


def read_bytes(path):
    """A file's bytes as a uint8 tensor in ordinary memory (torchvision's read_file maps the file,
    which a worker cannot hand to another process); UnreadableImage if it cannot be read."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UnreadableImage(None, f"cannot be read ({e.strerror})", str(path)) from None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def read_image(path):
    """An image file as (3, H, W) uint8 RGB, decoded on the CPU (ImageFolder's loader)."""
    return decode(read_bytes(path), path)


def read_encoded(path):
    """(path, the file's bytes as a uint8 tensor): what a worker hands on to be decoded on the
    training device."""
    return str(path), read_bytes(path)


def decode_on(device, files):
    """Decode files [(path, bytes)] on `device`: on a GPU by nvJPEG, the batch at once; a file it
    cannot decode (PNG, CMYK, ...) falls back to the CPU alone. A list of (3, H, W) uint8 on the
    device, an UnreadableImage for a file that cannot be decoded at all."""
    datas = [data for _, data in files]
    if device.type == "cuda":
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass  # not all JPEGs nvJPEG reads: one at a time below
    images = []
    for path, data in files:
        image = None
        if device.type == "cuda":
            try:
                image = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                pass
        if image is None:
            try:
                image = decode(data, path).to(device, non_blocking=True)
            except UnreadableImage as e:
                image = e
        images.append(image)
    return images


class TinyImageNet(ImageFolder):
    """Tiny-ImageNet's split `split` ('train' or 'val') under `root`: the classes in wnids.txt's
    order, the training images in train/<wnid>/images/, the held-out ones in val/images/, labelled
    by val/val_annotations.txt (tab-separated: file, wnid, box)."""

    def __init__(self, root, split, loader=read_image):
        self.split = split
        self.wnids = Path(root, "wnids.txt").read_text().split()
        super().__init__(Path(root, split), loader=loader, allow_empty=True)

    def find_classes(self, directory):
        return self.wnids, {w: k for k, w in enumerate(self.wnids)}

    def make_dataset(self, directory, class_to_idx, **kwargs):
        if self.split == "train":
            # ImageFolder walks the classes in sorted order: the samples go in wnids.txt's order
            samples = super().make_dataset(directory, class_to_idx, **kwargs)
            return sorted(samples, key=lambda sample: sample[1])
        annotations = Path(directory, "val_annotations.txt")
        if not annotations.is_file():
            return []
        rows = [line.split("\t") for line in annotations.read_text().splitlines()]
        images = Path(directory, "images")
        known = [r for r in rows if len(r) > 1 and r[1] in class_to_idx]
        return [(str(images / r[0]), class_to_idx[r[1]]) for r in known]


def tiny_imagenet(split, root, loader=read_image):
    """Tiny-ImageNet under `root` or root/tiny-imagenet-200/; a ValueError names what is missing.
    loader: read_image (decoded) or read_encoded (bytes)."""
    if (root / "tiny-imagenet-200").is_dir():
        root = root / "tiny-imagenet-200"
    hint = (
        f"expected the Tiny-ImageNet layout under {root}/ (wnids.txt, train/<wnid>/images/*.JPEG, "
        f"val/images/ and val/val_annotations.txt): unzip tiny-imagenet-200.zip there or pass "
        f"--data-dir"
    )
    if not root.is_dir():
        raise ValueError(f"the data folder {root} does not exist: {hint}")
    if not (root / "wnids.txt").is_file():
        raise ValueError(f"no wnids.txt: {hint}")
    ds = TinyImageNet(root, split, loader)
    if not all(Path(path).is_file() for path, _ in ds.samples):
        raise ValueError(f"val_annotations.txt names images missing from val/images/: {hint}")
    if not ds.samples:
        raise ValueError(f"no {split} images found: {hint}")
    return ds


def image_folder(split, root, loader=read_image):
    """ImageFolder of root/split (the classes: sorted folder names); a ValueError if no images.
    loader: read_image (decoded) or read_encoded (bytes)."""
    folder = root / split
    hint = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageNet's)"
    if not root.is_dir():
        raise ValueError(f"the data folder {root} does not exist: {hint}; pass --data-dir")
    empty = ValueError(f"no images in class folders under {folder}/: {hint}; pass --data-dir")
    try:
        ds = ImageFolder(folder, loader=loader, allow_empty=True)
    except FileNotFoundError:  # no such folder, or no class folder in it
        raise empty from None
    if not ds.samples:
        raise empty
    return ds
