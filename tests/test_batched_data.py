"""The batched on-device augmentation of data held in memory (data_sets.BatchedLoader): every draw
fixed by (seed, epoch, index) whatever the batch or process split, RandomResizedCrop's crop
distribution, flips, normalisation, torchvision's resize, the choice of path, and a bitwise resume
through the command line."""

import functools
import json
import math

import pytest
import torch
from conftest import run_cli
from PIL import Image
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

import cli
import common
import data_sets
import mae

CPU = torch.device("cpu")


def shapes_loader(n=64, batch_size=8, rank=0, world=1, img_size=16, **kwargs):
    cfg, _ = cli.resolve(mae, "tiny", None, {"img_size": img_size, "patch_size": 4})
    ds = data_sets.load_dataset("patterns", "train", "data", n, img_size)
    inputs = functools.partial(mae.sample_inputs, cfg)
    return data_sets.pretrain_loader(
        ds, "patterns", img_size, inputs, 3, batch_size, 0, CPU, rank, world, **kwargs
    )


def by_key(loader, sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    keys = list(sampler)
    out = {}
    for b, (imgs, labels, inputs) in enumerate(loader):
        for k in range(len(imgs)):
            out[keys[b * len(imgs) + k]] = (imgs[k], labels[k], inputs["noise"][k])
    return out


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_draw_is_fixed_by_seed_epoch_and_index_whatever_the_batch_and_processes():
    one, sampler = shapes_loader(batch_size=8)
    assert isinstance(one, data_sets.BatchedLoader) and len(one) == 8
    whole = by_key(one, sampler, 1)
    assert len(whole) == 64 and {e for e, _ in whole} == {1}
    halves = [by_key(*shapes_loader(batch_size=4, rank=r, world=2), 1) for r in (0, 1)]
    assert halves[0].keys().isdisjoint(halves[1].keys()) and len(halves[0]) + len(halves[1]) == 64
    for key, sample in {**halves[0], **halves[1]}.items():
        # bitwise, batch 8 of one process vs batch 4 of one of two
        assert same(sample, whole[key]), key
    # a resumed epoch: the rest of it, each sample as it was
    resumed = by_key(one, sampler, 1, start=24)
    assert len(resumed) == 40 and all(same(s, whole[k]) for k, s in resumed.items())
    # the same key at batch position 0 and 5, among other keys
    first = one.batch([(1, 7), (1, 3)])
    fifth = one.batch([(1, i) for i in (9, 2, 4, 5, 6, 7, 8, 1)])
    assert torch.equal(first[0][0], fifth[0][5])
    assert torch.equal(first[2]["noise"][0], fifth[2]["noise"][5])
    assert first[1][0] == 7 % 8  # the built-in data set's label
    # another epoch, another crop
    assert not torch.equal(whole[(1, 7)][0], by_key(one, sampler, 2)[(2, 7)][0])
    # the masks are those of the worker path (SeededDataset's generator)
    worker, _ = shapes_loader(batched=False)
    assert torch.equal(worker.dataset[(1, 7)][2]["noise"], whole[(1, 7)][2])


def ks(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).unique()
    cdf = [(x[:, None] <= grid).double().mean(0) for x in (a, b)]
    return (cdf[0] - cdf[1]).abs().max().item()


@pytest.mark.parametrize("size", [(32, 32), (28, 40)])
def test_crops_follow_random_resized_crop_and_half_are_flipped(size):
    H, W = size
    loader, _ = shapes_loader(n=8)
    loader.images = torch.zeros(1, 3, H, W, dtype=torch.uint8)
    n = 4000
    generator = torch.Generator().manual_seed(0)
    boxes, flips = loader.crops(torch.rand(n, 23, generator=generator, dtype=torch.float64))
    torch.manual_seed(0)
    rrc = v2.RandomResizedCrop(16, scale=(0.2, 1.0))
    image = torch.zeros(3, H, W)
    params = [list(rrc.make_params([image]).values())[:4] for _ in range(n)]
    ref = torch.tensor(params, dtype=torch.float64)
    for got in (boxes, ref):  # (top, left, height, width) within the image
        top, left, height, width = got.unbind(1)
        assert (height >= 1).all() and (width >= 1).all()
        assert (top + height <= H).all() and (left + width <= W).all()
    features = {
        "area fraction": lambda b: b[:, 2] * b[:, 3] / (H * W),
        "log aspect ratio": lambda b: (b[:, 3] / b[:, 2]).log(),
        "centre x": lambda b: (b[:, 1] + b[:, 3] / 2) / W,
        "centre y": lambda b: (b[:, 0] + b[:, 2] / 2) / H,
    }
    critical = 1.95 * math.sqrt(2 / n)  # KS at p = 0.001
    for name, f in features.items():
        assert ks(f(boxes), f(ref)) < critical, name
        assert abs(f(boxes).mean() - f(ref).mean()) < 0.02, name
    assert 0.2 - 0.02 < (boxes[:, 2] * boxes[:, 3] / (H * W)).min()
    assert abs(flips.double().mean() - 0.5) < 0.03


def test_resized_crops_are_torchvisions_resized_crop_bicubic_antialias_and_flip():
    imgs = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor(
        [
            [0, 0, 32, 32],
            [3, 5, 20, 11],
            [1, 2, 7, 9],
            [0, 0, 31, 32],
            [10, 4, 22, 25],
            [5, 5, 8, 8],
        ]
    )
    flips = torch.tensor([0, 1, 0, 1, 0, 1]).bool()
    for size in (16, 32, 48):  # shrunk (antialiased), equal, enlarged
        out = data_sets.resized_crops(imgs, boxes.double(), flips, size)
        bicubic = InterpolationMode.BICUBIC
        ref = [
            TF.resized_crop(img, *box.tolist(), [size, size], bicubic, antialias=True)
            for img, box in zip(imgs, boxes)
        ]
        ref = torch.stack([TF.horizontal_flip(r) if f else r for r, f in zip(ref, flips)])
        torch.testing.assert_close(out, ref.clamp(0, 1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("data", ["patterns", "fashion-mnist"])
def test_whole_unflipped_crops_are_the_normalised_images(data):
    channels, (mean, std) = data_sets.DATASETS[data]
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (16, channels, 28, 28), dtype=torch.uint8, generator=generator)
    ds = data_sets.TensorImages(images, torch.arange(16) % 3, ["a", "b", "c"])
    loader, sampler = data_sets.pretrain_loader(ds, data, 28, None, 0, 8, 0, CPU)
    loader.scale = (1.0, 1.0)
    loader.ratio = (1.0, 1.0)
    loader.flip = 0.0
    sampler.set_epoch(0)
    keys = list(sampler)
    imgs, labels, inputs = next(iter(loader))
    index = torch.tensor([i for _, i in keys[:8]])
    mean = torch.tensor(mean).view(-1, 1, 1)
    std = torch.tensor(std).view(-1, 1, 1)
    expected = (images[index].float() / 255 - mean) / std
    torch.testing.assert_close(imgs, expected, atol=1e-5, rtol=0)
    assert torch.equal(labels, index % 3) and inputs == {}
    loader.flip = 1.0  # every image mirrored
    torch.testing.assert_close(next(iter(loader))[0], expected.flip(-1), atol=1e-5, rtol=0)


def test_in_memory_data_is_batched_and_files_or_mim_worker_data_use_workers(monkeypatch, tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / f"{i}.png")
    files = data_sets.load_dataset("folder", "train", tmp_path)  # an ImageFolder
    blank = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    fashion = data_sets.TensorImages(blank, torch.zeros(8), ["a"])
    subset = torch.utils.data.Subset(fashion, [0, 1, 2, 3])
    for ds, batched in (
        (files, False),
        (fashion, True),
        (subset, True),
        (data_sets.load_dataset("patterns", "val", size=8, img_size=8), True),
    ):
        loader, sampler = data_sets.pretrain_loader(ds, "fashion-mnist", 8, None, 0, 2, 0, CPU)
        assert isinstance(loader, data_sets.BatchedLoader) == batched and loader.sampler is sampler
    monkeypatch.setenv("MIM_WORKER_DATA", "1")
    loader, _ = data_sets.pretrain_loader(fashion, "fashion-mnist", 8, None, 0, 2, 0, CPU)
    assert isinstance(loader.dataset.base, type(fashion))


def test_held_out_in_memory_data_is_every_image_in_order_with_the_worker_paths_masks(monkeypatch):
    """Batched held-out images: all of them (the last, partial batch too), in order, unaugmented,
    with the masks the worker path draws; their pixels differ from it only by the built-in images'
    rounding to uint8 (0.5 / 255)."""
    cfg, _ = cli.resolve(mae, "tiny", None, {"img_size": 16, "patch_size": 4})
    tcfg = common.TrainConfig(
        data="patterns", train_size=16, val_size=20, batch_size=8, num_workers=0
    )
    inputs = functools.partial(mae.sample_inputs, cfg)
    batched = list(data_sets.pretrain_loaders(tcfg, 16, inputs, CPU)[1])
    monkeypatch.setenv("MIM_WORKER_DATA", "1")
    workers = list(data_sets.pretrain_loaders(tcfg, 16, inputs, CPU)[1])
    assert [len(b[0]) for b in batched] == [len(b[0]) for b in workers] == [8, 8, 4]
    for (a, labels, masks), (b, truth, expected) in zip(batched, workers):
        assert torch.equal(labels, truth) and torch.equal(masks["noise"], expected["noise"])
        std = torch.tensor(data_sets.DATASETS["patterns"][1][1]).view(-1, 1, 1)
        torch.testing.assert_close(a * std, b * std, atol=0.5 / 255 + 1e-6, rtol=0)


def losses(out):
    records = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# 20 s; test_loop's five SIGKILL resume tests run on this batched path in the default suite
@pytest.mark.slow
def test_a_pretraining_run_on_the_builtin_data_resumes_bitwise(tmp_path):
    args = ("pretrain", "mae", "--preset", "tiny", "--train-size", 64, "--val-size", 16)
    args = (*args, "--batch-size", 8, "--epochs", 2, "--log-every", 1)
    full = tmp_path / "full"
    cut = tmp_path / "cut"
    for run in (
        ("--out", full),
        ("--out", cut, "--max-steps", 5),
        ("--out", cut, "--resume", "--max-steps", 0),
    ):
        r = run_cli(*args, *run)
        assert r.returncode == 0, r.stderr
    assert list(losses(cut)) == list(range(1, 17)) and losses(cut) == losses(full)
