"""What one training step of a model costs, measured: the plumbing behind `python cli.py bench METHOD`.

For each row (a model class, its Config, and the method's optional `sample_inputs`) it measures
- parameters (trainable ones);
- FLOPs per image of the forward pass and of forward + backward, counted by torch.utils.flop_counter
  (matmuls, convolutions and attention; element-wise work is not counted), with two corrections:
  attention runs on the MATH backend while counting, because the fused CPU kernel of
  F.scaled_dot_product_attention is counted as zero FLOPs, and the backward of a grouped (e.g.
  depth-wise) convolution is counted as twice its forward, where torch's formula counts the weight
  gradient `groups` times over;
- bytes saved for backward per step, with autograd's saved-tensor hooks, each storage counted once and
  parameters left out, once with the default (fused) attention and once with the MATH attention, which
  stores the N x N attention maps as attention did before fused kernels;
- peak memory of a step on a GPU (weights, gradients, AdamW state and activations; fp32, no autocast);
- the median and the shortest time of a step (forward, backward, AdamW), from rounds that time every
  row in turn (on a busy machine the shortest is the least disturbed);
- the time the per-sample inputs take per image (`sample_inputs`, which the data workers run, so it
  is not in the step time).
Every figure of a row is also given as a ratio to the first row, measured in the same run. Nothing
here knows which method it measures.

With `--data`, `loader_throughput` measures instead the images per second of the training data loader
alone (the data set, the pre-training augmentation and the method's sample_inputs in the workers, the
loader common.train builds): a step that takes longer per image than the loader needs keeps the
device fed; one that takes less waits for data.
"""
import contextlib
import gc
import inspect
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import common

aten = torch.ops.aten

# (key, column title, format): the figures of a row, in table order
FIGURES = [("params_m", "params (M)", "{:.2f}"), ("gflops_fwd", "GFLOPs/img fwd", "{:.3g}"),
           ("gflops", "GFLOPs/img fwd+bwd", "{:.3g}"), ("saved_mb", "saved MB/step", "{:.1f}"),
           ("saved_mb_math", "saved MB/step, math attn", "{:.1f}"), ("peak_gpu_mb", "peak GPU MB", "{:.0f}"),
           ("step_ms", "step ms (median)", "{:.1f}"), ("step_ms_min", "step ms (min)", "{:.1f}"),
           ("inputs_ms", "inputs ms/img (workers)", "{:.3f}")]


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs):
    """Each gradient of a convolution (input, weight) costs as many multiply-adds as its forward. torch's
    own formula gets the weight gradient of a grouped convolution `groups` times too big."""
    forward = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def make_inputs(cfg, sample_inputs, batch_size, seed=0, timed_calls=64):
    """The collated per-sample inputs of a batch, as the data loader builds them, and the median
    milliseconds of one sample_inputs call over `timed_calls` calls on one thread, as in a data worker
    (the median, so a call that the operating system preempts does not count)."""
    if sample_inputs is None:
        return {}, 0.0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a data-loader worker, which torch runs on one thread
    sample_inputs(cfg, torch.Generator().manual_seed(seed))  # untimed: the first call pays one-off costs
    samples, times = [], []
    for i in range(max(batch_size, timed_calls)):
        tick = time.perf_counter()
        sample = sample_inputs(cfg, torch.Generator().manual_seed(seed + i))
        times.append(time.perf_counter() - tick)
        samples.append(sample)
    torch.set_num_threads(threads)
    return torch.utils.data.default_collate(samples[:batch_size]), statistics.median(times) * 1e3


class OpFlops(TorchDispatchMode):
    """Sums the FLOPs of every op run under it with torch's own formulas (FlopCounterMode's table), without
    FlopCounterMode's module tracking, whose backward hooks break a custom autograd.Function that calls
    torch.autograd.grad in its backward (a reversible network recomputing its forward)."""

    def __init__(self, mapping):
        super().__init__()
        self.formulas = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping).flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(model, imgs, inputs):
    """(forward, forward + backward) FLOPs of one step on `imgs`, attention on the MATH backend."""
    mapping = {aten.convolution_backward: conv_backward_flops}
    with sdpa_kernel(SDPBackend.MATH):
        with OpFlops(mapping) as forward:
            loss = model(imgs, **inputs)[0]
        with OpFlops(mapping) as backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return forward.total, forward.total + backward.total


def saved_bytes(model, imgs, inputs, math_attention=False):
    """Bytes autograd keeps for the backward of one step: every storage a saved tensor lives in,
    counted once, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            storages[(t.device, storage.data_ptr())] = storage.nbytes()
        return t

    with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(imgs, **inputs)[0]
    del loss  # the graph, and what it saved, goes here
    return sum(storages.values())


def step_times(model, imgs, inputs, steps, warmup, device):
    """Seconds of each of `warmup + steps` training steps (forward, backward, AdamW), and the peak GPU
    memory of the timed steps (None on CPU)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times, peak = [], None
    for i in range(warmup + steps):
        if i == warmup and device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tick = time.perf_counter()
        loss = model(imgs, **inputs)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - tick)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    del optimizer
    return times[warmup:], peak


def measure(model_cls, cfg, sample_inputs, batch_size, steps, warmup, device, static=True, seed=0):
    """The figures of FIGURES for one model (only the step times unless `static`); the model is built
    (seeded) here and freed after, so one model at a time is in memory."""
    torch.manual_seed(seed)
    model = model_cls(cfg).to(device).train()
    shape = (batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    imgs = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    inputs, inputs_ms = make_inputs(cfg, sample_inputs, batch_size, seed)
    if "labels" in inspect.signature(model.forward).parameters:
        inputs["labels"] = torch.arange(batch_size)
    imgs, inputs = imgs.to(device), {k: v.to(device) for k, v in inputs.items()}
    row = {}
    if static:
        few = min(batch_size, 2)  # FLOPs are per image: count on two images, not on the whole batch
        fwd, total = count_flops(model, imgs[:few], {k: v[:few] for k, v in inputs.items()})
        row = {"params_m": sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
               "gflops_fwd": fwd / few / 1e9, "gflops": total / few / 1e9,
               "saved_mb": saved_bytes(model, imgs, inputs) / 2**20,
               "saved_mb_math": saved_bytes(model, imgs, inputs, math_attention=True) / 2**20, "inputs_ms": inputs_ms}
    row["times"], peak = step_times(model, imgs, inputs, steps, warmup, device)
    if static:
        row["peak_gpu_mb"] = peak / 2**20 if peak is not None else None
    del model, imgs, inputs
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def run(rows, batch_size=8, steps=3, warmup=1, rounds=3, device="cpu", log=print):
    """rows: [(name, model class, Config, sample_inputs or None)]. Returns one dict per row with
    every figure and `ratio`, each figure divided by the first row's.

    The step times come from `rounds` rounds that each time every row in turn (`warmup` + `steps`
    steps), so a change in the machine's load during the run hits all rows alike."""
    if batch_size < 1 or steps < 1 or warmup < 0 or rounds < 1:
        raise ValueError(f"--batch-size, --steps and --rounds must be at least 1 and --warmup not negative, "
                         f"got {batch_size}, {steps}, {rounds}, {warmup}")
    device = torch.device(device)
    results = [{"name": name} for name, *_ in rows]
    for r in range(rounds):
        for result, (name, model_cls, cfg, sample_inputs) in zip(results, rows):
            log(f"round {r + 1}/{rounds}: {name}")
            row = measure(model_cls, cfg, sample_inputs, batch_size, steps, warmup, device, static=r == 0)
            result["times"] = result.get("times", []) + row.pop("times")
            result.update(row)
    for result in results:
        times = result.pop("times")
        result.update(step_ms=statistics.median(times) * 1e3, step_ms_min=min(times) * 1e3)
    base = results[0]
    for row in results:
        row["ratio"] = {k: row[k] / base[k] if row[k] is not None and base[k] else None for k, _, _ in FIGURES}
    return results


def table(results, title=""):
    """A rich Table of `run`'s results: each figure with its ratio to the first row."""
    from rich.table import Table

    shown = [f for f in FIGURES if any(r[f[0]] is not None for r in results)]  # no GPU column on CPU
    out = Table(title=title, title_justify="left")
    out.add_column("row")
    for _, header, _ in shown:
        out.add_column(header, justify="right")
    for i, row in enumerate(results):
        cells = []
        for key, _, fmt in shown:
            value, ratio = row[key], row["ratio"][key]
            text = "-" if value is None else fmt.format(value)
            cells.append(text if i == 0 or ratio is None else f"{text} ({ratio:.2f}x)")
        out.add_row(row["name"], *cells)
    return out


def loader_throughput(train_set, data, img_size, sample_inputs, batch_size, batches, warmup, num_workers, device,
                      seed=0):
    """Images per second of the pre-training loader over `train_set` alone (common.pretrain_loader, the one
    common.train uses: augmentation and `sample_inputs` in the workers, pinned memory on a GPU, persistent
    workers), timed over `batches` batches after `warmup` untimed ones (worker start-up, the first
    prefetched batches); epochs follow one another as in training when the data set is shorter."""
    if batch_size < 1 or batches < 1 or warmup < 0 or num_workers < 0:
        raise ValueError(f"--batch-size and --batches must be at least 1, --warmup and --num-workers not negative, "
                         f"got {batch_size}, {batches}, {warmup}, {num_workers}")
    loader, sampler = common.pretrain_loader(train_set, data, img_size, sample_inputs, seed, batch_size, num_workers,
                                             torch.device(device))
    if len(loader) == 0:
        raise ValueError(f"{len(train_set)} images are fewer than one batch of {batch_size}: lower --batch-size")

    def forever():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    stream = forever()
    for _ in range(warmup):
        next(stream)
    tick, images = time.perf_counter(), 0
    for _ in range(batches):
        images += len(next(stream)[0])
    seconds = time.perf_counter() - tick
    stream.close()  # ends the epoch's iterator, so the workers shut down
    return {"images_per_s": images / seconds, "ms_per_batch": seconds / batches * 1e3, "batches": batches,
            "warmup_batches": warmup, "batch_size": batch_size, "num_workers": num_workers, "images": len(train_set),
            "seconds": seconds}


def loader_table(result, title=""):
    """A one-row rich Table of loader_throughput's result."""
    from rich.table import Table

    out = Table(title=title, title_justify="left")
    cells = {"data": result["data"], "px": str(result["img_size"]), "batch": str(result["batch_size"]),
             "workers": str(result["num_workers"]), "timed batches": str(result["batches"]),
             "ms/batch": f"{result['ms_per_batch']:.1f}", "img/s": f"{result['images_per_s']:.0f}"}
    for name in cells:
        out.add_column(name, justify="left" if name == "data" else "right")
    out.add_row(*cells.values())
    return out
