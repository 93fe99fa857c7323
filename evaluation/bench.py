"""What one training step of a model costs, measured (`python cli.py bench METHOD`; every figure and how it is
measured: docs/costs.md). Nothing here knows which method it measures. A row is a model class, its Config and the
method's optional `sample_inputs`; every figure is also a ratio to the first row's."""

import contextlib
import dataclasses
import functools
import gc
import inspect
import itertools
import json
import re
import statistics
import time

import torch
from rich.markup import escape
from rich.table import Column, Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import common
import data_sets


@dataclasses.dataclass
class BenchConfig:
    batch_size: int | None = None  # images per step for memory and time (None: 8; with --data: the preset's)
    steps: int = 3  # timed steps per row and round; the median over all rounds is shown
    warmup: int = 1  # untimed steps before them (with --data: untimed batches, at least 2 per worker)
    rounds: int = 3  # rounds over all rows, so load changes on the machine hit every row alike
    compare: str = ""  # a base method measured first, every figure a ratio to it: a built-in name or a method file
    variants: bool = True  # also the rows of the method's BENCH_VARIANTS
    json: bool = False  # print JSON instead of a table
    device: str = "auto"  # auto (GPU if there is one) | cpu | cuda | cuda:N
    data: str = ""  # measure the images/s of the pre-training data loader alone on this data set instead
    data_dir: str = "data"  # with --data: where data sets live
    num_workers: int | None = None  # with --data: data-loading processes (None: the preset's)
    batches: int = 50  # with --data: timed batches
    amp: str = "bf16"  # autocast on GPU, as pretrain: bf16 | fp16 (with a gradient scaler) | fp32; CPU runs are fp32
    compile: bool = (
        False  # torch.compile the model for the timed steps, as pretrain --compile (compiled in the --warmup steps)
    )

    def __post_init__(self):  # None: the default (with --data, TrainConfig checks the preset's batch and workers)
        given = " batch_size" if self.batch_size is not None else ""
        common.check_options(self, "steps rounds batches" + given, "warmup")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"--amp must be bf16, fp16 or fp32, got {self.amp!r}")


FIGURES = {"params_m": ("params (M)", "{:.2f}"), "gflops_fwd": ("GFLOPs/img fwd", "{:.3g}")}  # key: (title, format)
FIGURES |= {"gflops": ("GFLOPs/img fwd+bwd", "{:.3g}"), "saved_mb": ("saved MB/step", "{:.1f}")}
FIGURES |= {"saved_mb_math": ("saved MB/step, math attn", "{:.1f}"), "peak_gpu_mb": ("peak GPU MB", "{:.0f}")}
FIGURES |= {"step_ms": ("step ms (median)", "{:.1f}"), "step_ms_min": ("step ms (min)", "{:.1f}")}
FIGURES |= {"images_per_s": ("img/s", "{:.0f}"), "mfu": ("MFU", "{:.1%}")}  # MFU: on a GPU of PEAK_BF16 only
FIGURES |= {"inputs_ms": ("inputs ms/img (workers)", "{:.3f}")}
LOADER_COLUMNS = {
    "path": "{path}",
    "data": "{data}",
    "px": "{img_size}",
    "batch": "{batch_size}",
    "workers": "{num_workers}",
}
LOADER_COLUMNS |= {"timed batches": "{batches}", "ms/batch": "{ms_per_batch:.1f}", "img/s": "{images_per_s:.0f}"}
# peak dense bf16 tensor FLOP/s by a word of torch.cuda.get_device_name, the first match counting: half the sparse
# figures of NVIDIA's datasheets, A100 624 (SXM, PCIe), H100 1,979 (SXM), 1,513 (PCIe), H200 1,979 (docs/costs.md)
PEAK_BF16 = {"NVL": None, "A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}  # NVL parts: not known


def main(b, name, module, model_cls, configs, find_method, console, err_console):
    """The bench command: rows of the --compare base, the method and its BENCH_VARIANTS (or with --data the loader),
    printed as a table or JSON. configs(module, overrides=...) -> (Config, TrainConfig) with the options given."""
    device, log = common.pick_device(b.device), (err_console if b.json else console).print
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as common.setup
    if b.data:  # the loader alone, with the preset's batch size and workers unless given
        loader = {"data": b.data, "data_dir": b.data_dir, "num_workers": b.num_workers, "batch_size": b.batch_size}
        cfg, tcfg = configs(module, overrides={k: v for k, v in loader.items() if v is not None})
        train_set = data_sets.load_dataset(tcfg.data, "train", tcfg.data_dir, tcfg.train_size, cfg.img_size)
        inputs = functools.partial(module.sample_inputs, cfg) if hasattr(module, "sample_inputs") else None
        paths = [loader_throughput(train_set, cfg, tcfg, inputs, b.batches, b.warmup, device)]  # as training reads it
        if paths[0]["path"] == "batched":  # data in memory: the per-sample worker path beside it
            paths.append(loader_throughput(train_set, cfg, tcfg, inputs, b.batches, b.warmup, device, batched=False))
        result = {"method": name, **paths[0], "paths": paths}  # the path training takes, and both side by side
        title = f"{name}'s pre-training data loader alone: {result['images']} images, augmentation + sample_inputs"
        title += f", {result['warmup_batches']} batches untimed first"
        table = Table(*(Column(k, justify="right") for k in LOADER_COLUMNS), title=title, title_justify="left")
        for row in paths:
            table.add_row(*(cell.format(**row) for cell in LOADER_COLUMNS.values()))
    else:
        variants = getattr(module, "BENCH_VARIANTS", {}) if b.variants else {}
        wanted = [(*find_method(b.compare, "--compare"), {})] if b.compare else []
        wanted += [(f"{name}: {k}" if k else name, module, model_cls, v) for k, v in {"": {}, **variants}.items()]
        rows = []
        for label, method, cls, overrides in wanted:
            try:
                rows.append(
                    (label, cls, configs(method, overrides=overrides)[0], getattr(method, "sample_inputs", None))
                )
            except ValueError as e:
                if not overrides:
                    raise
                log(f"[dim]skipped {escape(label)}: {escape(str(e))}[/]")
        batch_size, cfg = 8 if b.batch_size is None else b.batch_size, rows[-1][2]
        result = run(rows, batch_size, b.steps, b.warmup, b.rounds, device, log, b.amp, b.compile)
        title = f"{cfg.img_size} px, patch {cfg.patch_size}, batch {batch_size}, {device}, "
        title += f"{b.amp if device.type == 'cuda' else 'fp32'}{', compiled' * b.compile}, "
        title += f"{torch.get_num_threads()} threads; ratios to the first row, measured in this run"
        shown = [k for k in FIGURES if k == "mfu" or any(r[k] is not None for r in result)]  # no GPU MB on a CPU
        columns = [Column(FIGURES[k][0], justify="right") for k in shown]
        table = Table("row", *columns, title=title, title_justify="left")
        for i, row in enumerate(result):
            cells = ["-" if row[k] is None else FIGURES[k][1].format(row[k]) for k in shown]
            ratios = ["" if i == 0 or row["ratio"][k] is None else f" ({row['ratio'][k]:.2f}x)" for k in shown]
            table.add_row(row["name"], *(cell + ratio for cell, ratio in zip(cells, ratios)))
    if b.json:
        return print(json.dumps(result, indent=2))
    console.print(table)


def conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, **kwargs):
    """Each gradient of a convolution (input, weight) costs its forward's multiply-adds (torch's formula counts the
    weight gradient of a grouped convolution `groups` times over). args: convolution_backward's after the weight's."""
    transposed, output_mask = args[4], args[7]
    return flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed) * sum(map(int, output_mask[:2]))


class OpFlops(TorchDispatchMode):
    """Sums the FLOPs of every op run under it with FlopCounterMode's formulas, without its module tracking, whose
    backward hooks break a custom autograd.Function calling torch.autograd.grad in its backward (a reversible net)."""

    def __init__(self):
        super().__init__()
        mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
        self.formulas, self.total = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping).flop_registry, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in self.formulas:
            self.total += self.formulas[func._overloadpacket](*args, **(kwargs or {}), out_val=out)
        return out


def count_flops(model, imgs, inputs):
    """(forward, forward + backward) FLOPs of one step on `imgs`, attention on the MATH backend (torch counts the
    fused CPU kernel as zero), grouped convolutions by conv_backward_flops."""
    with sdpa_kernel(SDPBackend.MATH):
        with OpFlops() as forward:
            loss = model(imgs, **inputs)[0]
        with OpFlops() as backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return forward.total, forward.total + backward.total


def saved_bytes(model, imgs, inputs, math_attention=False):
    """Bytes autograd keeps for the backward of one step: every storage a saved tensor lives in, counted once,
    parameters and buffers excluded."""
    own, storages = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            storages[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
        return t

    with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(imgs, **inputs)  # the graph, and what it saved, is freed on return
    return sum(storages.values())


def make_inputs(cfg, sample_inputs, batch_size, seed=0, timed_calls=64):
    """The collated per-sample inputs of a batch, and the median milliseconds of one sample_inputs call on one thread,
    as in a data worker (the median: a call the operating system preempts does not count)."""
    if sample_inputs is None:
        return {}, 0.0
    threads, samples, times = torch.get_num_threads(), [], []
    torch.set_num_threads(1)
    sample_inputs(cfg, torch.Generator().manual_seed(seed))  # untimed: the first call pays one-off costs
    for i in range(max(batch_size, timed_calls)):
        tick = time.perf_counter()
        samples.append(sample_inputs(cfg, torch.Generator().manual_seed(seed + i)))
        times.append(time.perf_counter() - tick)
    torch.set_num_threads(threads)
    return torch.utils.data.default_collate(samples[:batch_size]), statistics.median(times) * 1e3


def measure(
    model_cls, cfg, sample_inputs, batch_size, steps, warmup, device, static=True, seed=0, amp="bf16", compile=False
):
    """The figures of one model, built (seeded) here: "times", the seconds of `steps` training steps after `warmup`
    untimed ones, each as common.train runs it (autocast, forward, backward, fused AdamW step of common.pretrain's
    groups, a gradient scaler for fp16; optionally compiled), and if `static` the others."""
    torch.manual_seed(seed)
    model, cuda = model_cls(cfg).to(device).train(), device.type == "cuda"
    imgs = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    inputs, inputs_ms = make_inputs(cfg, sample_inputs, batch_size, seed)
    if "labels" in inspect.signature(model.forward).parameters:
        inputs["labels"] = torch.arange(batch_size)
    imgs, inputs, row = imgs.to(device), {k: v.to(device) for k, v in inputs.items()}, {"times": []}
    if static:
        few = min(batch_size, 2)  # FLOPs are per image: counted on two images, not on the whole batch
        fwd, total = count_flops(model, imgs[:few], {k: v[:few] for k, v in inputs.items()})
        params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        row |= dict(params_m=params, inputs_ms=inputs_ms, gflops_fwd=fwd / few / 1e9, gflops=total / few / 1e9)
        row |= dict(saved_mb=saved_bytes(model, imgs, inputs) / 2**20, peak_gpu_mb=None)
        row["saved_mb_math"] = saved_bytes(model, imgs, inputs, math_attention=True) / 2**20
    groups = common.param_groups(model, common.TrainConfig.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=1e-6, betas=(0.9, 0.95), fused=cuda)  # as common.pretrain
    amp_dtype, net = common.autocast_dtype(amp, device), torch.compile(model) if compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    sync = torch.cuda.synchronize if cuda else lambda device: None
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        tick = time.perf_counter()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = net(imgs, **inputs)[0]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        row["times"] += [time.perf_counter() - tick] if i >= warmup else []
    if static and cuda:
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def run(rows, batch_size=8, steps=3, warmup=1, rounds=3, device="cpu", log=print, amp="bf16", compile=False):
    """rows: [(name, model class, Config, sample_inputs or None)] -> one dict per row with every figure and `ratio`,
    each figure over the first row's. The step times come from `rounds` rounds that each time every row in turn;
    images/s is batch_size over the median step, MFU its FLOPs/s over the device's peak_flops (None if unknown)."""
    device, results = torch.device(device), [{"name": name, "times": []} for name, *_ in rows]
    peak = peak_flops(device)
    for r in range(rounds):
        for result, (name, *row) in zip(results, rows):
            log(f"round {r + 1}/{rounds}: {name}")
            figures = measure(*row, batch_size, steps, warmup, device, static=r == 0, amp=amp, compile=compile)
            result["times"] += figures.pop("times")
            result.update(figures)
            gc.collect()  # the model is freed before the next one is built
    for row in results:
        times = row.pop("times")
        row.update(step_ms=statistics.median(times) * 1e3, step_ms_min=min(times) * 1e3)
        row["images_per_s"] = batch_size / statistics.median(times)
        row["mfu"] = row["gflops"] * 1e9 * row["images_per_s"] / peak if peak else None  # optimizer FLOPs left out
        row["ratio"] = {k: row[k] / results[0][k] if row[k] is not None and results[0][k] else None for k in FIGURES}
    return results


def peak_flops(device):
    """The peak dense bf16 FLOP/s of a GPU by its name in PEAK_BF16; None on a CPU or a GPU not in the table."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_BF16.items() if re.search(rf"\b{key}\b", name, re.IGNORECASE)), None)


def loader_throughput(train_set, cfg, tcfg, sample_inputs, batches, warmup, device, batched=None):
    """Images per second of the pre-training loader over `train_set` alone (data_sets.pretrain_loader, as in training:
    cfg's image size, tcfg's batch size, workers and seed) over `batches` batches after `warmup` untimed ones, at least
    2 per worker (worker start-up, the first prefetched batches); epochs follow one another."""
    warmup = max(warmup, 2 * tcfg.num_workers)
    settings = (tcfg.seed, tcfg.batch_size, tcfg.num_workers, torch.device(device), 0, 1, batched)  # one process
    loader, sampler = data_sets.pretrain_loader(train_set, tcfg.data, cfg.img_size, sample_inputs, *settings)
    if len(loader) == 0:
        raise ValueError(f"{len(train_set)} images are fewer than one batch of {tcfg.batch_size}: lower --batch-size")

    def forever():
        for epoch in itertools.count():
            sampler.set_epoch(epoch)
            yield from loader

    stream = forever()
    for _ in range(warmup):
        next(stream)
    tick = time.perf_counter()
    images = sum(len(next(stream)[0]) for _ in range(batches))
    seconds = time.perf_counter() - tick
    stream.close()  # ends the epoch's iterator, so the workers shut down
    result = dict(path="batched" if isinstance(loader, data_sets.BatchedLoader) else "workers", data=tcfg.data)
    result |= dict(img_size=cfg.img_size, batch_size=tcfg.batch_size, num_workers=tcfg.num_workers)
    result |= dict(images=len(train_set), warmup_batches=warmup, batches=batches, seconds=seconds)
    return result | dict(images_per_s=images / seconds, ms_per_batch=seconds / batches * 1e3)
