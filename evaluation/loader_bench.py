"""What the pre-training data loader alone delivers, in images per second (`python cli.py bench
METHOD --data DATA`): the path training takes, and with data in memory the per-sample worker path
beside it (docs/training.md, "Data paths")."""

import functools
import itertools
import time

import torch
from rich.table import Column, Table

import data_sets

LOADER_COLUMNS = {
    "path": "{path}",
    "data": "{data}",
    "px": "{img_size}",
    "batch": "{batch_size}",
    "workers": "{num_workers}",
    "timed batches": "{batches}",
    "ms/batch": "{ms_per_batch:.1f}",
    "img/s": "{images_per_s:.0f}",
}


def loader_table(b, name, module, configs, device):
    """(result, table) of --data: the pre-training loader alone, with the preset's batch size and
    workers unless given; the path training takes first, and the other path of the data beside it
    (data in memory: batched and workers; files: decoded on the device and in the workers)."""
    loader = dict(
        data=b.data, data_dir=b.data_dir, num_workers=b.num_workers, batch_size=b.batch_size
    )
    cfg, tcfg = configs(module, overrides={k: v for k, v in loader.items() if v is not None})
    train_set = data_sets.load_dataset(
        tcfg.data, "train", tcfg.data_dir, tcfg.train_size, cfg.img_size
    )
    inputs = None
    if hasattr(module, "sample_inputs"):
        inputs = functools.partial(module.sample_inputs, cfg)
    timed = (b.batches, b.warmup, device)
    path = data_sets.choose_path(train_set, device)  # as training reads it
    other = {"batched": "workers", "device": "workers", "workers": None}[path]
    if data_sets.reads_files(train_set) and path == "workers":
        other = "device"  # on the CPU: the device path's code, run there
    paths = [loader_throughput(train_set, cfg, tcfg, inputs, *timed, path=path)]
    if other:
        paths.append(loader_throughput(train_set, cfg, tcfg, inputs, *timed, path=other))
    result = {"method": name, **paths[0], "paths": paths}
    title = f"{name}'s pre-training data loader alone: {result['images']} images"
    title += f", augmentation + sample_inputs, {result['warmup_batches']} batches untimed first"
    columns = [Column(k, justify="right") for k in LOADER_COLUMNS]
    table = Table(*columns, title=title, title_justify="left")
    for row in paths:
        table.add_row(*(cell.format(**row) for cell in LOADER_COLUMNS.values()))
    return result, table


def sync(device):
    """Wait for the device's work (a GPU's: its kernels run after the host returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_throughput(train_set, cfg, tcfg, sample_inputs, batches, warmup, device, path=None):
    """Images per second of the pre-training loader over `train_set` alone
    (data_sets.pretrain_loader by `path`, as in training: cfg's image size, tcfg's batch size,
    workers and seed) over `batches` batches after `warmup` untimed ones, at least 2 per worker
    (worker start-up, the first prefetched batches), the device's work waited for; epochs follow
    one another."""
    warmup = max(warmup, 2 * tcfg.num_workers)
    device = torch.device(device)
    settings = (tcfg.seed, tcfg.batch_size, tcfg.num_workers, device)
    loader, sampler = data_sets.pretrain_loader(
        train_set, tcfg.data, cfg.img_size, sample_inputs, *settings, path=path
    )  # one process
    if len(loader) == 0:
        fewer = f"{len(train_set)} images are fewer than one batch of {tcfg.batch_size}"
        raise ValueError(f"{fewer}: lower --batch-size")

    def forever():
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from loader

    stream = forever()
    try:
        for _ in range(warmup):
            next(stream)
        sync(device)
        tick = time.perf_counter()
        images = sum(len(next(stream)[0]) for _ in range(batches))
        sync(device)
        seconds = time.perf_counter() - tick
    except OSError as e:  # an image that cannot be read: bad input, said in one line
        raise ValueError(f"{e}: replace or remove it") from None
    finally:
        stream.close()  # ends the epoch's iterator, so the workers shut down
    path = path or data_sets.choose_path(train_set, device)
    return dict(
        path=path,
        data=tcfg.data,
        img_size=cfg.img_size,
        batch_size=tcfg.batch_size,
        num_workers=tcfg.num_workers,
        images=len(train_set),
        warmup_batches=warmup,
        batches=batches,
        seconds=seconds,
        images_per_s=images / seconds,
        ms_per_batch=seconds / batches * 1e3,
    )
