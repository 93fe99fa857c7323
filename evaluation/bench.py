"""What one training step of a model costs, measured: the plumbing behind `python cli.py bench METHOD`; each figure
and how it is measured is in docs/costs.md. Nothing here knows which method it measures.

A row is a model class, its Config and the method's optional `sample_inputs`. FLOPs come from torch.utils.flop_counter
with two corrections: attention runs on the MATH backend while counting (the fused CPU kernel counts as zero), and the
backward of a grouped convolution counts as twice its forward (torch counts its weight gradient `groups` times over).
Step times come from rounds that time every row in turn, so a change in the machine's load hits every row alike; every
figure is also a ratio to the first row's. `loader_throughput` (`--data`) times the pre-training loader alone.
"""

import contextlib
import gc
import inspect
import itertools
import statistics
import time

import torch
from rich.table import Column, Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import data_sets

FIGURES = {  # key: (column title, format), in table order
    "params_m": ("params (M)", "{:.2f}"),
    "gflops_fwd": ("GFLOPs/img fwd", "{:.3g}"),
    "gflops": ("GFLOPs/img fwd+bwd", "{:.3g}"),
    "saved_mb": ("saved MB/step", "{:.1f}"),
    "saved_mb_math": ("saved MB/step, math attn", "{:.1f}"),
    "peak_gpu_mb": ("peak GPU MB", "{:.0f}"),
    "step_ms": ("step ms (median)", "{:.1f}"),
    "step_ms_min": ("step ms (min)", "{:.1f}"),
    "inputs_ms": ("inputs ms/img (workers)", "{:.3f}"),
}


def conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, **kwargs):
    """Each gradient of a convolution (input, weight) costs its forward's multiply-adds (torch's formula counts the
    weight gradient of a grouped convolution `groups` times over). args: convolution_backward's bias sizes, stride,
    padding, dilation, transposed, output padding, groups, output mask."""
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
    """(forward, forward + backward) FLOPs of one step on `imgs`, attention on the MATH backend."""
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


def step_times(model, imgs, inputs, steps, warmup, device):
    """Seconds of each of `steps` training steps (forward, backward, AdamW) after `warmup` untimed ones, and the peak
    GPU memory of the timed steps (None on CPU)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    cuda, times = device.type == "cuda", []
    sync = torch.cuda.synchronize if cuda else lambda device: None
    for i in range(warmup + steps):
        if i == warmup and cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sync(device)
        tick = time.perf_counter()
        model(imgs, **inputs)[0].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - tick)
    return times[warmup:], torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None


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


def measure(model_cls, cfg, sample_inputs, batch_size, steps, warmup, device, static=True, seed=0):
    """The figures of one model (only the step times unless `static`); it is built (seeded) here and freed after, so
    one model at a time is in memory."""
    torch.manual_seed(seed)
    model = model_cls(cfg).to(device).train()
    shape = (batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    imgs = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    inputs, inputs_ms = make_inputs(cfg, sample_inputs, batch_size, seed)
    if "labels" in inspect.signature(model.forward).parameters:
        inputs["labels"] = torch.arange(batch_size)
    imgs, inputs, row = imgs.to(device), {k: v.to(device) for k, v in inputs.items()}, {}
    if static:
        few = min(batch_size, 2)  # FLOPs are per image: counted on two images, not on the whole batch
        fwd, total = count_flops(model, imgs[:few], {k: v[:few] for k, v in inputs.items()})
        row = {"params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, "inputs_ms": inputs_ms}
        row.update(gflops_fwd=fwd / few / 1e9, gflops=total / few / 1e9)
        row.update(saved_mb=saved_bytes(model, imgs, inputs) / 2**20)
        row.update(saved_mb_math=saved_bytes(model, imgs, inputs, math_attention=True) / 2**20)
    row["times"], peak = step_times(model, imgs, inputs, steps, warmup, device)
    if static:
        row["peak_gpu_mb"] = peak
    del model, imgs, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(rows, batch_size=8, steps=3, warmup=1, rounds=3, device="cpu", log=print):
    """rows: [(name, model class, Config, sample_inputs or None)] -> one dict per row with every figure and `ratio`,
    each figure over the first row's. The step times come from `rounds` rounds that each time every row in turn."""
    if batch_size < 1 or steps < 1 or warmup < 0 or rounds < 1:
        raise ValueError(
            f"--batch-size, --steps and --rounds must be at least 1 and --warmup not negative, "
            f"got {batch_size}, {steps}, {rounds}, {warmup}"
        )
    device, results = torch.device(device), [{"name": name, "times": []} for name, *_ in rows]
    for r in range(rounds):
        for result, (name, model_cls, cfg, sample_inputs) in zip(results, rows):
            log(f"round {r + 1}/{rounds}: {name}")
            row = measure(model_cls, cfg, sample_inputs, batch_size, steps, warmup, device, static=r == 0)
            result.update(row, times=result["times"] + row["times"])
    for result in results:
        times = result.pop("times")
        result.update(step_ms=statistics.median(times) * 1e3, step_ms_min=min(times) * 1e3)
    base = results[0]
    for row in results:
        row["ratio"] = {k: row[k] / base[k] if row[k] is not None and base[k] else None for k in FIGURES}
    return results


def table(results, title=""):
    """A rich Table of `run`'s results: each figure with its ratio to the first row (no GPU column on a CPU)."""
    shown = [k for k in FIGURES if any(r[k] is not None for r in results)]
    out = Table("row", *(Column(FIGURES[k][0], justify="right") for k in shown), title=title, title_justify="left")
    for i, row in enumerate(results):
        cells = ["-" if row[k] is None else FIGURES[k][1].format(row[k]) for k in shown]
        ratios = ["" if i == 0 or row["ratio"][k] is None else f" ({row['ratio'][k]:.2f}x)" for k in shown]
        out.add_row(row["name"], *(cell + ratio for cell, ratio in zip(cells, ratios)))
    return out


def loader_throughput(train_set, data, img_size, sample_inputs, batch_size, batches, warmup, workers, device, seed=0):
    """Images per second of the pre-training loader over `train_set` alone (data_sets.pretrain_loader, the one
    common.train uses), timed over `batches` batches after `warmup` untimed ones (worker start-up, the first
    prefetched batches); epochs follow one another as in training when the data set is shorter."""
    if batch_size < 1 or batches < 1 or warmup < 0 or workers < 0:
        raise ValueError(
            f"--batch-size and --batches must be at least 1, --warmup and --num-workers not negative, "
            f"got {batch_size}, {batches}, {warmup}, {workers}"
        )
    settings = (seed, batch_size, workers, torch.device(device))
    loader, sampler = data_sets.pretrain_loader(train_set, data, img_size, sample_inputs, *settings)
    if len(loader) == 0:
        raise ValueError(f"{len(train_set)} images are fewer than one batch of {batch_size}: lower --batch-size")

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
    result = dict(images_per_s=images / seconds, ms_per_batch=seconds / batches * 1e3, seconds=seconds, batches=batches)
    return result | dict(warmup_batches=warmup, batch_size=batch_size, num_workers=workers, images=len(train_set))


LOADER_COLUMNS = {"data": "{data}", "px": "{img_size}", "batch": "{batch_size}", "workers": "{num_workers}"}
LOADER_COLUMNS |= {"timed batches": "{batches}", "ms/batch": "{ms_per_batch:.1f}", "img/s": "{images_per_s:.0f}"}


def loader_table(result, title=""):
    """A one-row rich Table of loader_throughput's result, with the data set and image size added."""
    out = Table(*(Column(k, justify="right") for k in LOADER_COLUMNS), title=title, title_justify="left")
    out.add_row(*(cell.format(**result) for cell in LOADER_COLUMNS.values()))
    return out
