"""Data sets of image files, read a file at a time through torchvision's ImageFolder.

`imagenet` and `folder`: root/{train,val}/<class>/<image>, the classes the sorted folder names.
`tiny-imagenet`: the layout of tiny-imagenet-200.zip, the classes in wnids.txt's order. An item is
(a PIL RGB image, its label), read by ImageFolder's `loader` (a path -> the image), the one place
to change what a worker hands on (e.g. the file's bytes).
"""

from pathlib import Path

from torchvision.datasets import ImageFolder


class TinyImageNet(ImageFolder):
    """Tiny-ImageNet's split `split` ('train' or 'val') under `root`: the classes in wnids.txt's
    order, the training images in train/<wnid>/images/, the held-out ones in val/images/, labelled
    by val/val_annotations.txt (tab-separated: file, wnid, box)."""

    def __init__(self, root, split, **kwargs):
        self.split = split
        self.wnids = Path(root, "wnids.txt").read_text().split()
        super().__init__(Path(root, split), allow_empty=True, **kwargs)

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


def tiny_imagenet(split, root):
    """Tiny-ImageNet under `root` or root/tiny-imagenet-200/; a ValueError names what is missing."""
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
    ds = TinyImageNet(root, split)
    if not all(Path(path).is_file() for path, _ in ds.samples):
        raise ValueError(f"val_annotations.txt names images missing from val/images/: {hint}")
    if not ds.samples:
        raise ValueError(f"no {split} images found: {hint}")
    return ds


def image_folder(split, root):
    """ImageFolder of root/split (the classes: sorted folder names); a ValueError if no images."""
    folder = root / split
    hint = f"expected {root}/train/<class>/<image> and {root}/val/<class>/<image> (ImageNet's)"
    if not root.is_dir():
        raise ValueError(f"the data folder {root} does not exist: {hint}; pass --data-dir")
    empty = ValueError(f"no images in class folders under {folder}/: {hint}; pass --data-dir")
    try:
        ds = ImageFolder(folder, allow_empty=True)
    except FileNotFoundError:  # no such folder, or no class folder in it
        raise empty from None
    if not ds.samples:
        raise empty
    return ds
