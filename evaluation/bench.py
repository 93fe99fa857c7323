"""What one training step of a model costs, measured (`python cli.py bench METHOD`; every figure
and how it is measured: docs/costs.md); with --data, the data loader alone (loader_bench.py).
Nothing here knows which method it measures. A row is a model class, its Config and the method's
optional `sample_inputs`; every figure is also a ratio to the first row's."""

import contextlib
import dataclasses
import gc
import inspect
import json
import re
import statistics
import time
import typing

import torch
from rich.markup import escape
from rich.table import Column, Table
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

import common
import data_sets
from evaluation import loader_bench


@dataclasses.dataclass
class BenchConfig:
    batch_size: int | None = None  # images per step (None: 8; with --data: the preset's)
    steps: int = 3  # timed steps per row and round; the median over all rounds is shown
    warmup: int = 1  # untimed steps first (with --data: untimed batches, at least 2 per worker)
    rounds: int = 3  # rounds over all rows, so load changes on the machine hit every row alike
    compare: str = ""  # a base measured first, the ratios' base: a built-in name or a method file
    vary: str = ""  # extra rows, split by `;`: FIELD=VALUE pairs of the Config, joined by `,`
    json: bool = False  # print JSON instead of a table
    device: str = "auto"  # auto (GPU if there is one) | cpu | cuda | cuda:N
    data: str = ""  # measure the images/s of the pre-training data loader alone on this data
    data_dir: str = "data"  # with --data: where data sets live
    num_workers: int | None = None  # with --data: data-loading processes (None: the preset's)
    batches: int = 50  # with --data: timed batches
    amp: str = "bf16"  # autocast on GPU, as pretrain: bf16 | fp16 (+ grad scaler) | fp32; CPU: fp32
    compile: bool = False  # torch.compile the model, as pretrain --compile (in the --warmup steps)

    def __post_init__(self):  # None: the default (with --data, TrainConfig checks the preset's)
        given = " batch_size" if self.batch_size is not None else ""
        common.check_options(self, "steps rounds batches" + given, "warmup")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"--amp must be bf16, fp16 or fp32, got {self.amp!r}")


FIGURES = {  # key: (title, format)
    "params_m": ("params (M)", "{:.2f}"),
    "gflops_fwd": ("GFLOPs/img fwd", "{:.3g}"),
    "gflops": ("GFLOPs/img fwd+bwd", "{:.3g}"),
    "saved_mb": ("saved MB/step", "{:.1f}"),
    "saved_mb_math": ("saved MB/step, math attn", "{:.1f}"),
    "peak_gpu_mb": ("peak GPU MB", "{:.0f}"),
    "step_ms": ("step ms (median)", "{:.1f}"),
    "step_ms_min": ("step ms (min)", "{:.1f}"),
    "images_per_s": ("img/s", "{:.0f}"),
    "mfu": ("MFU", "{:.1%}"),  # on a GPU of PEAK_BF16 only
    "inputs_ms": ("inputs ms/img", "{:.4f}"),
}
# peak dense bf16 tensor FLOP/s by a word of torch.cuda.get_device_name, the first match counting:
# half the sparse figures of NVIDIA's datasheets, A100 624 (SXM, PCIe), H100 1,979 (SXM), 1,513
# (PCIe), H200 1,979 (docs/costs.md); NVL parts: not known
PEAK_BF16 = {"NVL": None, "A100": 312e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12}


def main(b, name, module, model_cls, configs, find_method, console, err_console):
    """The bench command: rows of the --compare base, the method and the --vary rows (or with --data
    the loader), printed as a table or JSON. configs(module, overrides=...) -> (Config, TrainConfig)
    with the options given."""
    device = common.pick_device(b.device)
    log = (err_console if b.json else console).print
    torch.backends.cuda.matmul.allow_tf32 = True  # as common.setup
    torch.backends.cudnn.allow_tf32 = True
    varied = vary_rows(b.vary, module.Config, name)  # bad input: an error before anything runs
    if b.data:
        result, table = loader_bench.loader_table(b, name, module, configs, device)
    else:
        result, table = step_table(
            b, name, module, model_cls, configs, find_method, varied, device, log
        )
    if b.json:
        return print(json.dumps(result, indent=2))
    console.print(table)


def field_value(text, kind):
    """`text` as a value of the type `kind` (of X | None: X; bool: true, false, 1 or 0); a
    ValueError if it is none."""
    kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
    if kind is bool:
        words = {"true": True, "1": True, "false": False, "0": False}
        if text.lower() not in words:
            raise ValueError(f"{text!r} does not parse as bool (true, false, 1 or 0)")
        return words[text.lower()]
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} does not parse as {getattr(kind, '__name__', kind)}") from None


def vary_rows(text, config_cls, name):
    """[(label, Config overrides)] of --vary: rows separated by `;`, each FIELD=VALUE pairs joined
    by `,`, the values of the type of the Config's field. A one-line ValueError on an unknown field
    or a bad value, naming the fields there are."""
    kinds = typing.get_type_hints(config_cls)
    names = [f.name for f in dataclasses.fields(config_cls)]
    known = f"{name}'s Config fields: {', '.join(names)}"
    rows = []
    for group in text.split(";"):
        overrides = {}
        for pair in filter(None, (p.strip() for p in group.split(","))):
            field, eq, value = (part.strip() for part in pair.partition("="))
            if not eq:
                raise ValueError(f"--vary: {pair!r} is not FIELD=VALUE ({known})")
            if field not in names:
                raise ValueError(f"--vary: {name}'s Config has no field {field!r} ({known})")
            try:
                overrides[field] = field_value(value, kinds[field])
            except ValueError as e:
                raise ValueError(f"--vary: {field}={e} ({known})") from None
        if overrides:
            label = ", ".join(f"{k}={v}" for k, v in overrides.items())
            rows.append((label, overrides))
    return rows


def step_table(b, name, module, model_cls, configs, find_method, varied, device, log):
    """(result, table) of the training step's figures: the --compare base, the method, then the
    --vary rows; a row its Config refuses is skipped with its reason."""
    wanted = [(*find_method(b.compare, "--compare"), {})] if b.compare else []
    wanted.append((name, module, model_cls, {}))
    wanted += [(f"{name}: {label}", module, model_cls, v) for label, v in varied]
    rows = []
    for label, method, cls, overrides in wanted:
        try:
            cfg = configs(method, overrides=overrides)[0]
        except ValueError as e:
            if not overrides:
                raise
            log(f"[dim]skipped {escape(label)}: {escape(str(e))}[/]")
            continue
        rows.append((label, cls, cfg, getattr(method, "sample_inputs", None)))
    batch_size = 8 if b.batch_size is None else b.batch_size
    cfg = rows[-1][2]
    timing = (b.steps, b.warmup, b.rounds, device, log, b.amp, b.compile)
    result = run(rows, batch_size, *timing)
    amp = b.amp if device.type == "cuda" else "fp32"
    title = f"{cfg.img_size} px, patch {cfg.patch_size}, batch {batch_size}, {device}, "
    title += f"{amp}{', compiled' * b.compile}, {torch.get_num_threads()} threads; "
    title += "ratios to the first row, measured in this run"
    # the figures some row has (no GPU MB on a CPU), and MFU always
    shown = [k for k in FIGURES if k == "mfu" or any(r[k] is not None for r in result)]
    columns = [Column(FIGURES[k][0], justify="right") for k in shown]
    table = Table("row", *columns, title=title, title_justify="left")
    for i, row in enumerate(result):
        cells = []
        for k in shown:
            cell = "-" if row[k] is None else FIGURES[k][1].format(row[k])
            if i > 0 and row["ratio"][k] is not None:
                cell += f" ({row['ratio'][k]:.2f}x)"
            cells.append(cell)
        table.add_row(row["name"], *cells)
    return result, table


def conv_backward_flops(grad_out_shape, x_shape, w_shape, *args, **kwargs):
    """Each gradient of a convolution (input, weight) costs its forward's multiply-adds (torch's
    formula counts the weight gradient of a grouped convolution `groups` times over). args:
    convolution_backward's after the weight's."""
    transposed = args[4]
    output_mask = args[7]  # which of the input's and the weight's gradients are computed
    once = flop_counter.conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return once * sum(map(int, output_mask[:2]))


class OpFlops(TorchDispatchMode):
    """Sums the FLOPs of every op run under it with FlopCounterMode's formulas, without its module
    tracking, whose backward hooks break a custom autograd.Function calling torch.autograd.grad in
    its backward (a reversible net)."""

    def __init__(self):
        super().__init__()
        mapping = {torch.ops.aten.convolution_backward: conv_backward_flops}
        counter = flop_counter.FlopCounterMode(display=False, custom_mapping=mapping)
        self.formulas = counter.flop_registry
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func._overloadpacket in self.formulas:
            formula = self.formulas[func._overloadpacket]
            self.total += formula(*args, **(kwargs or {}), out_val=out)
        return out


def count_flops(model, imgs, inputs):
    """(forward, forward + backward) FLOPs of one step on `imgs`, attention on the MATH backend
    (torch counts the fused CPU kernel as zero), grouped convolutions by conv_backward_flops."""
    with sdpa_kernel(SDPBackend.MATH):
        with OpFlops() as forward:
            loss = model(imgs, **inputs)[0]
        with OpFlops() as backward:
            loss.backward()
    model.zero_grad(set_to_none=True)
    return forward.total, forward.total + backward.total


def saved_bytes(model, imgs, inputs, math_attention=False):
    """Bytes autograd keeps for the backward of one step: every storage a saved tensor lives in,
    counted once, parameters and buffers excluded."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            storages[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
        return t

    with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(imgs, **inputs)  # the graph, and what it saved, is freed on return
    return sum(storages.values())


def make_inputs(cfg, sample_inputs, batch_size, device, seed=0, calls=5):
    """The method's inputs of a batch, drawn on `device` as the loader draws them, and the median
    milliseconds per image of drawing them for the batch (the median of `calls` timed calls, after
    one untimed)."""
    if sample_inputs is None:
        return {}, 0.0
    keys = data_sets.sample_keys(seed, 0, torch.arange(batch_size, device=device))
    times = []
    for _ in range(calls + 1):
        sync(device)
        tick = time.perf_counter()
        batch = sample_inputs(cfg, data_sets.Draws(keys, first=1))
        sync(device)
        times.append(time.perf_counter() - tick)
    return batch, statistics.median(times[1:]) * 1e3 / batch_size


def sync(device):
    """Wait for the device's work (a GPU's: its kernels run after the host returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    model_cls,
    cfg,
    sample_inputs,
    batch_size,
    steps,
    warmup,
    device,
    static=True,
    seed=0,
    amp="bf16",
    compile=False,
):
    """The figures of one model, built (seeded) here: "times", the seconds of `steps` training steps
    after `warmup` untimed ones, each as common.train runs it (autocast, forward, backward, fused
    AdamW step of common.pretrain's groups, a gradient scaler for fp16; optionally compiled), and if
    `static` the others."""
    torch.manual_seed(seed)
    model = model_cls(cfg).to(device).train()
    cuda = device.type == "cuda"
    imgs = torch.randn(batch_size, cfg.in_chans, cfg.img_size, cfg.img_size)
    inputs, inputs_ms = make_inputs(cfg, sample_inputs, batch_size, device, seed)
    if "labels" in inspect.signature(model.forward).parameters:
        inputs["labels"] = torch.arange(batch_size)
    imgs = imgs.to(device)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    row = {"times": []}
    if static:
        few = min(batch_size, 2)  # FLOPs are per image: counted on two images, not on the batch
        fwd, total = count_flops(model, imgs[:few], {k: v[:few] for k, v in inputs.items()})
        params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        row |= dict(
            params_m=params,
            inputs_ms=inputs_ms,
            gflops_fwd=fwd / few / 1e9,
            gflops=total / few / 1e9,
        )
        row["saved_mb"] = saved_bytes(model, imgs, inputs) / 2**20
        row["peak_gpu_mb"] = None
        row["saved_mb_math"] = saved_bytes(model, imgs, inputs, math_attention=True) / 2**20
    groups = common.param_groups(model, common.TrainConfig.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=1e-6, betas=(0.9, 0.95), fused=True)  # as pretrain
    amp_dtype = common.autocast_dtype(amp, device)
    net = torch.compile(model) if compile else model
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
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


def run(
    rows,
    batch_size=8,
    steps=3,
    warmup=1,
    rounds=3,
    device="cpu",
    log=print,
    amp="bf16",
    compile=False,
):
    """rows: [(name, model class, Config, sample_inputs or None)] -> one dict per row with every
    figure and `ratio`, each figure over the first row's. The step times come from `rounds` rounds
    that each time every row in turn; images/s is batch_size over the median step, MFU its FLOPs/s
    over the device's peak_flops (None if unknown)."""
    device = torch.device(device)
    results = [{"name": name, "times": []} for name, *_ in rows]
    peak = peak_flops(device)
    for r in range(rounds):
        for result, (name, *row) in zip(results, rows):
            log(f"round {r + 1}/{rounds}: {name}")
            options = dict(static=r == 0, amp=amp, compile=compile)
            figures = measure(*row, batch_size, steps, warmup, device, **options)
            result["times"] += figures.pop("times")
            result.update(figures)
            gc.collect()  # the model is freed before the next one is built
    for row in results:
        times = row.pop("times")
        row.update(step_ms=statistics.median(times) * 1e3, step_ms_min=min(times) * 1e3)
        row["images_per_s"] = batch_size / statistics.median(times)
        flops = row["gflops"] * 1e9 * row["images_per_s"]  # the optimizer's left out
        row["mfu"] = flops / peak if peak else None
        first = results[0]
        row["ratio"] = {
            k: row[k] / first[k] if row[k] is not None and first[k] else None for k in FIGURES
        }
    return results


def peak_flops(device):
    """The peak dense bf16 FLOP/s of a GPU by its name in PEAK_BF16; None on a CPU or a GPU not in
    the table."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    for key, peak in PEAK_BF16.items():
        if re.search(rf"\b{key}\b", name, re.IGNORECASE):
            return peak
    return None
