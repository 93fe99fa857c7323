"""Random draws fixed by a sample's place in the run, made for a whole batch at once.

Every random choice a loader makes for a sample (its crop, its flip, a method's masks) is a
function of (seed, epoch, index) alone: a counter-based hash of them, with no generator state,
computed for the whole batch in a few integer tensor ops wherever the keys are (on the GPU in
training, on the CPU in a data worker or a test). A resumed run draws exactly what the
uninterrupted one drew, whatever the number of workers and processes, the batch a sample is in,
or the device the draws are made on.
"""

import math

import torch

MASK32 = 0xFFFFFFFF


def mul32(x, c):
    """x * c mod 2^32 for x in [0, 2^32) (an int or an int64 tensor) and a 32-bit constant c,
    split in 16-bit halves so that no product leaves int64."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & MASK32


def mix32(x):
    """A 32-bit integer hash (C. Wellons' lowbias32) of values in [0, 2^32), ints or tensors."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seed, epoch, index):
    """(B,) int64 keys in [0, 2^32) of the samples `index` (B,) at `epoch` of a run of `seed`."""
    run = mix32(mix32(seed & MASK32) ^ (epoch & MASK32))  # an int, the same for the whole batch
    return mix32((index & MASK32) ^ run)


class Draws:
    """draws(*shape) -> (B, *shape) float64 uniform in [0, 1) for a batch of keys (B,): the k-th
    call gives each sample its k-th draws (`first`: the number of the first call), 53 random bits
    each, fixed by the sample's key, k and the position within the shape."""

    def __init__(self, keys, first=0):
        self.keys = keys
        self.call = first

    def __call__(self, *shape):
        count = math.prod(shape)
        if count >= 2**24 or self.call >= 2**8:
            raise ValueError("Draws hands out at most 2^24 values a call and 2^8 calls")
        counter = (self.call << 24) | torch.arange(count, device=self.keys.device)  # (n,)
        self.call += 1
        high = mix32(self.keys[:, None] ^ mix32(counter))  # (B, n), 32 bits
        low = mix32(high ^ 0x68E31DA4) >> 11  # 21 more bits
        bits = (high << 21) | low  # 53 bits: exact in float64
        return (bits.double() / 2**53).view(len(self.keys), *shape)


def crop_boxes(draws, heights, widths, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5):
    """RandomResizedCrop's crops and a random flip of a batch, as torchvision's get_params draws
    them (10 tries, then the centre crop): boxes (B, 4) of (top, left, height, width) and flips
    (B,) bool, of (B, 23) uniform draws and the images' heights and widths (ints, or (B,) tensors
    for images of many sizes)."""
    H = torch.as_tensor(heights, dtype=torch.float64, device=draws.device)
    W = torch.as_tensor(widths, dtype=torch.float64, device=draws.device)
    H = H.expand(len(draws))[:, None]  # (B, 1)
    W = W.expand(len(draws))[:, None]
    s0, s1 = scale
    r0, r1 = (math.log(r) for r in ratio)
    area = H * W * (s0 + (s1 - s0) * draws[:, :10])  # (B, 10) tries
    aspect = (r0 + (r1 - r0) * draws[:, 10:20]).exp()
    w = (area * aspect).sqrt().round()
    h = (area / aspect).sqrt().round()
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    k = ok.int().argmax(1, keepdim=True)  # the first try that fits, else the centre crop
    fits = ok.any(1)
    H = H[:, 0]
    W = W[:, 0]
    w = torch.where(fits, w.gather(1, k)[:, 0], torch.minimum(W, (H * ratio[1]).round()))
    h = torch.where(fits, h.gather(1, k)[:, 0], torch.minimum(H, (W / ratio[0]).round()))
    top = torch.where(fits, (draws[:, 20] * (H - h + 1)).floor(), ((H - h) / 2).floor())
    left = torch.where(fits, (draws[:, 21] * (W - w + 1)).floor(), ((W - w) / 2).floor())
    return torch.stack([top, left, h, w], 1), draws[:, 22] < flip
