"""The built-in data set: 10 classes of periodic patterns, drawn on the fly at any size.

Each class is a pattern field (stripes, checkerboard, dots...): a function of rotated, shifted
pixel coordinates, positive on the pattern's foreground. `Patterns` draws a random period,
orientation, phase and colours per image, so only the layout of the pattern tells the class.
"""

import math

import torch


def _field(label, u, v, p, r, theta):
    """Pattern `label` at rotated, shifted pixel coordinates (u, v), period p (px); (r, theta):
    polar coordinates about a random centre. Positive on the foreground, with about unit slope."""
    tau = 2 * math.pi
    a = tau * u / p
    b = tau * v / p
    if label == 0:  # stripes
        return torch.sin(a)
    if label == 1:  # checkerboard
        return torch.sin(a) * torch.sin(b) * 2
    if label == 2:  # dots on a square lattice
        return torch.cos(a) + torch.cos(b) - 1.0
    if label == 3:  # grid lines
        return (torch.maximum(torch.cos(a), torch.cos(b)) - 0.75) * 3
    if label == 4:  # dots on a hexagonal lattice
        angles = (0, tau / 6, tau / 3)
        waves = [torch.cos(tau * (u * math.cos(t) + v * math.sin(t)) / p) for t in angles]
        return sum(waves) - 1.2
    if label == 5:  # concentric rings
        return torch.sin(tau * r / p)
    if label == 6:  # zigzag stripes
        fold = 1 - 2 * (v / p - torch.floor(v / p) - 0.5).abs()  # a triangle wave of v, in [0, 1]
        return torch.sin(tau * (u + 0.6 * p * fold) / p)
    if label == 7:  # wavy stripes
        return torch.sin(a + 1.6 * torch.sin(b / 1.5))
    if label == 8:  # bricks
        # mortar between rows of height p, the joints shifted by half a brick each row
        row = torch.floor(v / p)
        # dv, du: distances from the middle of a brick, 0.5 on the mortar
        dv = (v / p - row - 0.5).abs()
        du = ((u / (2 * p) + 0.5 * row) % 1.0 - 0.5).abs()
        return (torch.maximum(dv, du) - 0.38) * -8
    return torch.sin(8 * theta)  # 9: spokes around a centre


class Patterns(torch.utils.data.Dataset):
    """The built-in data set: 10 classes of periodic patterns filling the image, drawn on the fly.

    No download, any image size, deterministic per (split, index) and balanced (the label is index
    mod 10). Period (18-30 % of the side), orientation, phase, the ground colour and the polarity
    are random and the same for every class; only the layout of the pattern tells the class. A
    masked autoencoder must infer that layout from the visible patches to fill in the hidden ones,
    while the random colour keeps kNN on raw pixels low (docs/learning.md).
    """

    classes = (
        "stripes",
        "checkerboard",
        "dots",
        "grid",
        "hex-dots",
        "rings",
        "zigzag",
        "waves",
        "bricks",
        "spokes",
    )

    def __init__(self, split, size, img_size):
        self.size = size
        self.img_size = img_size
        self.split_bit = {"train": 0, "val": 1}[split]
        t = torch.arange(img_size) + 0.5  # pixel centres
        self.y, self.x = torch.meshgrid(t, t, indexing="ij")

    def __len__(self):
        return self.size

    def render(self, index):
        """Images (B, 3, H, W) in [0, 1] and labels (B,) of the int64 indices `index` (B,)."""
        index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        B = len(index)
        S = self.img_size
        labels = index % len(self.classes)
        g = torch.Generator()
        seeds = (2 * index + self.split_bit).tolist()  # CPU generators use 32 bits of a seed
        draws = [torch.rand(10, 1, 1, generator=g.manual_seed(s)) for s in seeds]
        rnd = torch.stack(draws)  # (B, 10, 1, 1)
        p = (0.18 + 0.12 * rnd[:, 0]) * S  # the period in pixels
        rot = rnd[:, 1] * 2 * math.pi  # the orientation
        dx = self.x - (rnd[:, 2] * 2 - 0.5) * S  # (B, H, W), the origin maybe off the image
        dy = self.y - (rnd[:, 3] * 2 - 0.5) * S
        u = dx * rot.cos() + dy * rot.sin()
        v = -dx * rot.sin() + dy * rot.cos()
        ex = self.x - (0.15 + 0.7 * rnd[:, 8]) * S  # about a centre in the image
        ey = self.y - (0.15 + 0.7 * rnd[:, 9]) * S
        r = (ex**2 + ey**2).sqrt()
        theta = torch.atan2(ey, ex) + rot
        f = torch.empty(B, S, S)
        for k in range(len(self.classes)):
            sel = labels == k
            f[sel] = _field(k, u[sel], v[sel], p[sel], r[sel], theta[sel])
        alpha = (0.5 + 2.5 * f).clamp(0, 1)[:, None]  # (B, 1, H, W): soft edges
        # +1: the pattern brighter than the ground, -1: darker
        sign = (rnd[:, 4:5] < 0.5).float() * 2 - 1  # (B, 1, 1, 1)
        # the ground: a random colour, room for the pattern 0.4 from it on the grey axis
        ground = rnd[:, 5:8] * 0.6 + (sign < 0).float() * 0.4  # (B, 3, 1, 1)
        return (ground + sign * 0.4 * alpha).clamp(0, 1), labels

    def __getitems__(self, indices):  # a DataLoader's batch in one call
        images, labels = self.render(indices)
        return list(zip(images, labels.tolist()))

    def __getitem__(self, i):
        return self.__getitems__([i])[0]
