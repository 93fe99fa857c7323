"""The pre-training data paths (data_sets/loaders.py and augment.py): the batched on-device
augmentation of data held in memory, the worker path, and files decoded on the device (run on
the CPU device here).
Every draw fixed by (seed, epoch, index) whatever the batch, path or process split (draws.py),
RandomResizedCrop's crop distribution, flips, normalisation, torchvision's resize, the choice of
path, uint8 across processes, unreadable images, and a bitwise resume through the command line."""

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import run_cli, run_torchrun
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
    # the worker path draws the same masks (and the same crops, checked below)
    worker, worker_sampler = shapes_loader(path="workers")
    assert torch.equal(by_key(worker, worker_sampler, 1)[(1, 7)][2], whole[(1, 7)][2])


def ks(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = torch.cat([a, b]).unique()
    cdf = [(x[:, None] <= grid).double().mean(0) for x in (a, b)]
    return (cdf[0] - cdf[1]).abs().max().item()


def test_draws_are_uniform_independent_and_fixed_by_the_key_alone():
    """Draws: a sample's values depend on its key and the call alone (not on the batch around it or
    the device), are uniform in [0, 1), and uncorrelated across samples, calls and positions."""
    keys = data_sets.sample_keys(7, 3, torch.arange(2000))
    assert len(set(keys.tolist())) == 2000  # distinct samples, distinct keys
    draws = data_sets.Draws(keys)
    a = draws(50)  # (2000, 50)
    b = draws(50)  # the second call: other values
    assert a.dtype == torch.float64 and 0 <= a.min() and a.max() < 1
    alone = data_sets.Draws(keys[[5, 1999]])
    assert torch.equal(alone(50), a[[5, 1999]])  # a batch of two: the same values
    assert torch.equal(data_sets.Draws(keys[[5]], first=1)(50), b[[5]])
    for x in (a, b):  # uniform: the deciles hold 10 % each, the mean 0.5
        counts = torch.histc(x.float(), bins=10, min=0, max=1) / x.numel()
        assert (counts - 0.1).abs().max() < 0.005 and abs(x.mean() - 0.5) < 0.002
    pairs = {"samples": (a[:-1], a[1:]), "calls": (a, b), "positions": (a[:, :-1], a[:, 1:])}
    for name, (x, y) in pairs.items():
        corr = torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1]
        assert abs(corr) < 0.01, name
    other = data_sets.Draws(data_sets.sample_keys(7, 4, torch.arange(2000)))(50)  # another epoch
    assert not torch.equal(other, a)


@pytest.mark.parametrize("size", [(32, 32), (28, 40)])
def test_crops_follow_random_resized_crop_and_half_are_flipped(size):
    H, W = size
    n = 4000
    draws = data_sets.Draws(data_sets.sample_keys(0, 0, torch.arange(n)))(23)
    boxes, flips = data_sets.crop_boxes(draws, H, W)
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


def test_the_path_in_memory_data_files_on_a_cpu_and_files_on_a_gpu_take(monkeypatch, tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(8):
        Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / f"{i}.png")
    files = data_sets.load_dataset("folder", "train", tmp_path)  # an ImageFolder
    blank = torch.zeros(8, 1, 28, 28, dtype=torch.uint8)
    fashion = data_sets.TensorImages(blank, torch.zeros(8), ["a"])
    subset = torch.utils.data.Subset(fashion, [0, 1, 2, 3])
    patterns = data_sets.load_dataset("patterns", "val", size=8, img_size=8)
    gpu = torch.device("cuda")
    for ds, on_cpu, on_gpu in (
        (files, "workers", "device"),
        (torch.utils.data.Subset(files, [0, 1]), "workers", "device"),
        (fashion, "batched", "batched"),
        (subset, "batched", "batched"),
        (patterns, "batched", "batched"),
    ):
        assert data_sets.choose_path(ds, CPU) == on_cpu
        assert data_sets.choose_path(ds, gpu) == on_gpu
    loader, sampler = data_sets.pretrain_loader(files, "folder", 8, None, 0, 2, 0, CPU)
    assert isinstance(loader, data_sets.WorkerLoader) and loader.sampler is sampler
    monkeypatch.setenv("MIM_WORKER_DATA", "1")
    assert data_sets.choose_path(fashion, CPU) == "workers"


def test_held_out_in_memory_data_is_every_image_in_order_with_the_worker_paths_masks(monkeypatch):
    """Batched held-out images: all of them (the last, partial batch too), in order, unaugmented,
    with the masks the worker path draws; their pixels equal it (both the built-in images rounded
    to uint8 once)."""
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
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


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


def jpeg_folder(root, sizes, classes=2, bad=None):
    """root/train/c<k>/<i>.jpg of random images of `sizes` [(H, W)], and a val split; `bad`: the
    name of a truncated JPEG put among them."""
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for i, (h, w) in enumerate(sizes):
            folder = root / split / f"c{i % classes}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = torch.randint(0, 256, (h, w, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(folder / f"{i}.jpg", quality=95)
    if bad:
        good = (root / "train" / "c0" / "0.jpg").read_bytes()
        (root / "train" / "c0" / bad).write_bytes(good[: len(good) // 2])
    return root


def first_batches(path, dataset, data="folder", size=24, n=2, skip_bad=False):
    loader, sampler = data_sets.pretrain_loader(
        dataset, data, size, None, 5, 4, 0, CPU, path=path, skip_bad=skip_bad
    )
    sampler.set_epoch(1)
    batches = iter(loader)
    return [next(batches) for _ in range(n)], list(sampler), loader


def test_files_decoded_on_the_device_are_a_per_sample_references_crops(tmp_path):
    """The device path run on the CPU device: for the same seed, each image is what a per-sample
    reference makes of its file (PIL's decoding and bicubic resized crop at the crop and flip of the
    sample's draws), within resampling tolerance (PIL's uint8 fixed point against torchvision's
    float kernel); and it is bitwise the worker path's image, which decodes in the workers."""
    sizes = [(40, 60), (64, 48), (50, 50), (33, 71), (80, 45), (45, 45), (70, 35), (36, 90)]
    root = jpeg_folder(tmp_path, sizes)
    dataset = data_sets.load_dataset("folder", "train", root)
    device, keys, _ = first_batches("device", dataset)
    workers, _, _ = first_batches("workers", dataset)
    for (a, labels, _), (b, same_labels, _) in zip(device, workers):
        assert torch.equal(a, b) and torch.equal(labels, same_labels)
    mean, std = (torch.tensor(s).view(-1, 1, 1) for s in data_sets.DATASETS["folder"][1])
    got = torch.cat([imgs for imgs, _, _ in device]) * std + mean  # back to [0, 1]
    index = torch.tensor([i for _, i in keys[:8]])
    files = [dataset.samples[i][0] for i in index]
    opened = [Image.open(f).convert("RGB") for f in files]
    sizes = [(img.height, img.width) for img in opened]
    draws = data_sets.Draws(data_sets.sample_keys(5, 1, index))(23)
    heights = torch.tensor([h for h, _ in sizes])
    widths = torch.tensor([w for _, w in sizes])
    boxes, flips = data_sets.crop_boxes(draws, heights, widths)
    for k, img in enumerate(opened):
        top, left, height, width = (int(v) for v in boxes[k])
        crop = TF.resized_crop(img, top, left, height, width, [24, 24], InterpolationMode.BICUBIC)
        crop = TF.horizontal_flip(crop) if flips[k] else crop
        reference = TF.to_dtype(TF.pil_to_tensor(crop), torch.float32, scale=True)
        diff = (got[k] - reference).abs()
        assert diff.mean() < 2 / 255 and diff.max() < 24 / 255, (k, diff.mean(), diff.max())


def test_workers_and_batched_paths_crop_the_same_images_alike():
    """The same samples through the worker path (torchvision on uint8, in a worker) and the
    batched path (two matmuls on the device): the same crops, flips and masks; the pixels within
    uint8 resampling: torchvision's uint8 kernel rounds and clamps between its two passes, which
    changes a few pixels at sharp edges (bicubic overshoot) by up to a few percent."""
    batched, batched_sampler = shapes_loader(n=16, batch_size=8)
    workers, workers_sampler = shapes_loader(n=16, batch_size=8, path="workers")
    a = by_key(batched, batched_sampler, 3)
    b = by_key(workers, workers_sampler, 3)
    std = torch.tensor(data_sets.DATASETS["patterns"][1][1]).view(-1, 1, 1)
    for key in a:
        diff = (a[key][0] - b[key][0]).abs() * std
        assert diff.max() < 16 / 255 and diff.mean() < 0.5 / 255, (key, diff.max(), diff.mean())
        assert torch.equal(a[key][2], b[key][2])  # the masks


def test_images_cross_from_the_workers_as_uint8(tmp_path):
    root = jpeg_folder(tmp_path, [(40, 60)] * 4)
    dataset = data_sets.load_dataset("folder", "train", root)
    _, _, loader = first_batches("workers", dataset, n=1)
    img, label, epoch, index, path, why = loader.loader.dataset[(0, 2)]
    assert img.dtype == torch.uint8 and img.shape == (3, 24, 24) and path == why == ""
    files, _, device_loader = first_batches("device", dataset, n=1)
    path, data, label, epoch, index = device_loader.loader.dataset[(0, 2)]
    assert data.dtype == torch.uint8 and data.ndim == 1  # the file's bytes


@pytest.mark.parametrize("path", ["workers", "device"])
def test_an_unreadable_image_stops_the_loader_or_is_skipped_and_listed(tmp_path, path):
    """7 images and a truncated JPEG, batches of 4: the loader stops at the broken file, naming it
    and why; skipping, its batch holds the other 3 and `skipped` lists it."""
    root = jpeg_folder(tmp_path, [(40, 60)] * 7, bad="broken.jpg")
    dataset = data_sets.load_dataset("folder", "train", root)
    with pytest.raises(OSError) as e:
        first_batches(path, dataset, n=2)
    assert e.value.filename.endswith("broken.jpg") and "truncated" in str(e.value)
    batches, _, loader = first_batches(path, dataset, n=2, skip_bad=True)
    assert sorted(len(imgs) for imgs, _, _ in batches) == [3, 4]
    assert [Path(f).name for f in loader.skipped] == ["broken.jpg"]


def test_an_unreadable_image_saves_the_run_and_resume_continues_once_replaced(tmp_path):
    """Through the command line (the worker path on a CPU): a truncated JPEG stops the run with one
    line naming it and the fix, after saving the last completed step; the file replaced, --resume
    ends the run; with --skip-bad-images a run skips it and counts it in the log."""
    root = jpeg_folder(tmp_path / "data", [(40, 60)] * 12, bad="broken.jpg")
    args = ("pretrain", "mae", "--preset", "tiny", "--data", "folder", "--data-dir", root)
    args += ("--batch-size", 4, "--epochs", 2, "--log-every", 1, "--num-workers", 1)
    run = tmp_path / "run"
    r = run_cli(*args, "--out", run)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert "broken.jpg" in lines[0] and "--resume" in lines[0] and "--skip-bad-images" in lines[0]
    saved = common.load_checkpoint(run)["step"]
    # 13 images, 4 a step: 3 steps an epoch, 6 in all; it stopped at the step with the broken one
    assert saved == max(losses(run), default=0) < 6  # the last completed step, nothing lost
    good = (root / "train" / "c0" / "0.jpg").read_bytes()
    (root / "train" / "c0" / "broken.jpg").write_bytes(good)
    r = run_cli("pretrain", "mae", "--out", run, "--resume")
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(losses(run)) == list(range(1, 7))
    (root / "train" / "c0" / "broken.jpg").write_bytes(good[:100])
    skipping = tmp_path / "skipping"
    r = run_cli(*args, "--out", skipping, "--skip-bad-images")
    assert r.returncode == 0 and "skipped an image" in r.stderr, r.stderr[-2000:]
    rows = [json.loads(line) for line in (skipping / "log.jsonl").read_text().splitlines()]
    assert max(row.get("skipped_images", 0) for row in rows) == 2  # once an epoch


# 14 s
@pytest.mark.slow
def test_under_torchrun_an_unreadable_image_stops_every_process_with_one_line(tmp_path):
    """Only the process that reads the broken file knows of it: it stops at once with the line
    (a save would wait for the others, who wait in the step's all-reduce: the run hung), and
    torchrun stops the others."""
    root = jpeg_folder(tmp_path / "data", [(40, 60)] * 12, bad="broken.jpg")
    args = ("pretrain", "mae", "--preset", "tiny", "--data", "folder", "--data-dir", root)
    args += ("--batch-size", 2, "--epochs", 2, "--log-every", 1, "--num-workers", 1)
    r = run_torchrun(*args, "--out", tmp_path / "run", timeout=120)
    assert r.returncode != 0
    lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "broken.jpg" in lines[0], r.stderr[-2000:]
    assert "continue from its last checkpoint with --resume" in lines[0]
