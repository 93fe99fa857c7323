"""The first GPU run of the project, one command of at most 8 minutes (issue 26). It reports as it
goes: each figure is in the report the moment it is measured, so a killed check keeps them.

    python experiments/gpu_check.py [--out DIR] [--deadline SECONDS] [--dry-run]

DIR (default: $OUT, else runs/gpu_check) gets gpu_check.md, a line appended per figure, and
gpu_check.json, rewritten whole after each. Nothing needs the internet or anything outside the
checkout and its pip install: the data is the built-in patterns and a JPEG folder made here. The
sections, the cheapest and most important first:

 1. environment: torch, CUDA, cuDNN, driver, GPU, the attention kernels SDPA runs for ViT-B
 2. one pre-training step of every method (`cli.py pretrain METHOD --preset tiny --max-steps 1`)
 3. CPU against GPU losses of a few steps of the tiny MAE: fp32, TF32 and bf16, with tolerances
 4. MAE ViT-B/16 at 224 px (`--preset imagenet`): images/s, MFU, peak memory, batch 128, 256
 5. PR-MIM's step time over MAE's at ViT-B, throw 0.5 (the paper: about 0.75x)
 6. RevColV2's peak memory, reversible over plain (`--vary reversible=false`)
 7. a generated JPEG folder's images/s, decoded on the GPU and in workers (`bench --data folder`)
 8. section 4 compiled
 9. the real loop's images/s, from the log.jsonl of `pretrain mae --preset imagenet`
10. the top 10 CUDA kernels of a profiled compiled step of MAE ViT-B

What the CLI measures runs as a user runs it, `python cli.py ...` in a process of its own; the
rest in this process. A section is skipped ("not measured: deadline") when its estimated cost does
not fit in the time left before --deadline (default 480 s); every command gets at most the time
left. A failing figure is reported with the last lines of its stderr and the check goes on. The
last line is the verdict; the exit status is 1 if a figure failed, else 0.

--dry-run (and any run without a GPU): the same sections at tiny sizes on the CPU, in about a
minute on 2 cores; what only a GPU measures is "not measured: no GPU" (tests/test_gpu_check.py).
"""

import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

START = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MARGIN_S = 5  # kept before the deadline for the verdict


@dataclasses.dataclass
class Sizes:
    """What differs between the GPU run and the dry run: sizes and estimated seconds."""

    preset: str  # the big rows' preset: ViT-B/16 at 224 px, or the 64-d tiny model at 32 px
    model: str  # its name in the report
    mae_batches: tuple  # MAE's throughput rows, eager and compiled
    timing: list  # bench's timed steps (the compiled rows: one round, one compile)
    pr_mim_batch: int
    revcol_batch: int
    loss_steps: int  # CPU against GPU: optimiser steps compared
    jpegs: tuple  # training and held-out images of the generated folder, 500 x 375 px
    loader: list  # bench --data's options
    loop: list  # the real loop's pretrain options
    profile_batch: int
    bench_s: int  # one bench command, eager
    compiled_s: int  # one bench command, compiled
    one_step_s: int  # every method's one step, at once
    loop_s: int
    profile_s: int


GPU = Sizes(
    preset="imagenet",
    model="MAE ViT-B/16 224 px",
    mae_batches=(128, 256),
    timing=["--steps", 10, "--warmup", 3, "--rounds", 2],
    pr_mim_batch=128,
    revcol_batch=64,
    loss_steps=5,
    jpegs=(512, 32),
    loader=["--preset", "imagenet", "--batch-size", 128, "--batches", 30],
    loop=["--preset", "imagenet", "--data", "patterns", "--batch-size", 128]
    + ["--train-size", 3200, "--val-size", 128, "--max-steps", 24, "--log-every", 4],
    # 128, as the compiled bench row and the loop: their compiled graphs are in inductor's cache
    profile_batch=128,
    bench_s=30,
    compiled_s=75,
    one_step_s=60,
    loop_s=75,
    profile_s=60,
)
DRY = Sizes(
    preset="tiny",
    model="MAE tiny preset 32 px",
    mae_batches=(8,),
    timing=["--steps", 1, "--warmup", 0, "--rounds", 1],
    pr_mim_batch=8,
    revcol_batch=8,
    loss_steps=3,
    jpegs=(16, 8),
    loader=["--preset", "tiny", "--batch-size", 8, "--batches", 2, "--num-workers", 1],
    loop=["--preset", "tiny", "--batch-size", 8, "--max-steps", 4, "--log-every", 1],
    profile_batch=8,
    bench_s=8,
    compiled_s=0,
    one_step_s=15,
    loop_s=8,
    profile_s=4,
)


# Both are BaseExceptions: raised by a timer inside torch.compile, they must pass through its
# `except Exception` clauses


class OutOfTime(BaseException):
    """The deadline came, or would come, before the measurement's end: not measured."""


class Failed(BaseException):
    """A failed measurement; its message ends with the last lines of the command's stderr."""


# --------------------------------------------------------------------------------------------------
# The report and the means of measuring: the deadline, commands, in-process limits


class Report:
    """gpu_check.md, each line appended and flushed (and printed), and gpu_check.json, rewritten
    whole after each figure (a temporary file renamed over it): both readable after a kill."""

    def __init__(self, out, header):
        out.mkdir(parents=True, exist_ok=True)
        self.md = out / "gpu_check.md"
        self.json = out / "gpu_check.json"
        self.md.write_text("")
        self.data = {**header, "sections": []}
        self.section = None

    def line(self, text=""):
        print(text, flush=True)
        with open(self.md, "a") as f:
            f.write(text + "\n")

    def save(self):
        temporary = self.json.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(temporary, self.json)

    def start(self, number, title):
        self.section = {"title": title, "status": "measuring", "figures": {}}
        self.data["sections"].append(self.section)
        self.line(f"\n## {number}. {title}\n")
        self.save()

    def figure(self, label, text, value=None):
        """`- LABEL: TEXT`; in the JSON, LABEL: value (default: the text)."""
        self.section["figures"][label] = text if value is None else value
        self.line(f"- {label}: {text}")
        self.save()

    def missing(self, label, why):
        self.figure(label, f"not measured: {why}")

    def failed(self, label, why):
        """`- LABEL: FAILED: ...`, the lines after the first indented below it."""
        first, *rest = str(why).splitlines() or [""]
        self.section["status"] = "failed"
        self.section["figures"][label] = f"FAILED: {why}"
        self.line(f"- {label}: FAILED: {first}")
        for line in rest:
            self.line(f"      {line}")  # a code block inside the list item
        self.save()

    def table(self, label, columns, rows):
        """A markdown table, a row at a time; in the JSON, LABEL: [{column: cell}]."""
        self.section["figures"][label] = []
        self.line(f"{label}:\n")
        self.line("| " + " | ".join(columns) + " |")
        self.line("|" + "---|" * len(columns))
        for row in rows:
            self.section["figures"][label].append(dict(zip(columns, row)))
            self.line("| " + " | ".join(map(str, row)) + " |")
            self.save()
        self.line()

    def end(self, seconds):
        """The section's status: failed, ok, partly measured, or why nothing was measured."""
        figures = [str(v) for v in self.section["figures"].values()]
        missing = [v for v in figures if v.startswith("not measured")]
        if self.section["status"] == "failed":
            pass
        elif figures and len(missing) == len(figures):
            self.section["status"] = missing[0]
        else:
            self.section["status"] = "partly measured" if missing else "ok"
        self.section["seconds"] = round(seconds, 1)
        self.save()


@dataclasses.dataclass
class Command:
    """A started `python cli.py ARGS`, its output in files of the work folder."""

    args: list
    process: subprocess.Popen
    out: Path
    err: Path
    started: float

    def tail(self, lines=12):
        """The last lines of its stderr (stdout if stderr is empty)."""
        text = self.err.read_text(errors="replace") or self.out.read_text(errors="replace")
        return "\n".join(line[:200] for line in text.strip().splitlines()[-lines:])


class Check:
    """What the sections share: the report, the sizes, the deadline, a work folder."""

    def __init__(self, report, sizes, no_gpu, deadline, work):
        self.report = report
        self.sizes = sizes
        self.no_gpu = no_gpu  # why nothing runs on a GPU ("no GPU", "dry run"), or ""
        self.device = ["--device", "cpu"] if no_gpu else []
        self.end = START + deadline - MARGIN_S
        self.work = work
        self.launched = 0
        self.measured = {}  # figures a later section compares with

    def left(self):
        return self.end - time.monotonic()

    def limit(self, started, estimate):
        """(when a measurement begun at `started` must end, whether the deadline sets that time):
        it fails past 3 times its estimated seconds (at least 60 s)."""
        cap = started + max(3 * estimate, 60)
        return min(cap, self.end), self.end <= cap

    def attempt(self, label, measure):
        """measure(), which writes its figures; a deadline or a failure written as LABEL's row."""
        try:
            measure()
        except OutOfTime as e:
            self.report.missing(label, f"deadline ({e})")
        except Failed as e:
            self.report.failed(label, e)
        except Exception:
            lines = traceback.format_exc().strip().splitlines()
            self.report.failed(label, "\n".join(lines[-12:]))

    def launch(self, args, estimate, threads=None):
        """Starts `python cli.py ARGS` in the project root, as a user runs it; OutOfTime instead
        if its estimated seconds do not fit in the time left."""
        if self.left() < estimate:
            raise OutOfTime(f"{self.left():.0f} s left, about {estimate} s needed")
        self.launched += 1
        logs = self.work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = logs / f"{self.launched:02d}.out"
        err = logs / f"{self.launched:02d}.err"
        env = {**os.environ, "COLUMNS": "200"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        args = [str(a) for a in args]
        command = [sys.executable, "cli.py", *args]
        with open(out, "w") as stdout, open(err, "w") as stderr:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        return Command(args, process, out, err, time.monotonic())

    def wait(self, command, estimate):
        """The stdout of a launched command. OutOfTime if the deadline stops it; Failed if it
        exits non-zero or runs past its limit."""
        until, deadline = self.limit(command.started, estimate)
        try:
            command.process.wait(timeout=max(until - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            command.process.kill()
            command.process.wait()
            ran = time.monotonic() - command.started
            if deadline:
                raise OutOfTime(f"stopped after {ran:.0f} s") from None
            raise Failed(f"timed out after {ran:.0f} s\n{command.tail()}") from None
        if command.process.returncode != 0:
            exited = f"`cli.py {' '.join(command.args)}` exited {command.process.returncode}"
            raise Failed(f"{exited}\n{command.tail()}")
        return command.out.read_text()

    def cli(self, args, estimate):
        """`python cli.py ARGS` -> its stdout (launch, then wait)."""
        return self.wait(self.launch(args, estimate), estimate)

    def bench(self, args, estimate):
        """The JSON that `python cli.py bench ARGS --json` prints."""
        return json.loads(self.cli(["bench", *args, "--json", *self.device], estimate))

    @contextlib.contextmanager
    def in_time(self, estimate):
        """In-process work, stopped by a timer signal: OutOfTime at the deadline, or Failed past
        its limit."""
        until, deadline = self.limit(time.monotonic(), estimate)
        seconds = max(until - time.monotonic(), 0.1)

        def stop(signum, frame):
            if deadline:
                raise OutOfTime(f"stopped after {seconds:.0f} s")
            raise Failed(f"timed out after {seconds:.0f} s")

        previous = signal.signal(signal.SIGALRM, stop)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def log_rows(run):
    """The training rows (with a loss) of a run's log.jsonl."""
    lines = (Path(run) / "log.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if "loss" in r]


def compare(reference, other, rtol):
    """(worst relative difference, True if every step of both is there and within rtol) of two
    {step: loss}."""
    if not reference or reference.keys() != other.keys():
        return float("inf"), False
    worst = max(abs(other[s] - reference[s]) / abs(reference[s]) for s in reference)
    return worst, worst <= rtol


def bench_text(row, no_gpu):
    """A bench row in words: images/s, MFU, step, peak memory, FLOPs."""
    step = f"step {row['step_ms']:.1f} ms, {row['gflops']:.3g} GFLOPs/img fwd+bwd"
    if no_gpu:
        return f"CPU: {row['images_per_s']:.0f} img/s, {step}; MFU, peak memory: not measured"
    mfu = "- (not a GPU of bench's peak table)"
    if row["mfu"] is not None:
        mfu = f"{row['mfu']:.1%} (goal: 40 %)"
    peak = "-" if row["peak_gpu_mb"] is None else f"{row['peak_gpu_mb']:.0f} MB"
    return f"{row['images_per_s']:.0f} img/s, MFU {mfu}, {step}, peak memory {peak}"


# --------------------------------------------------------------------------------------------------
# The sections, in the order they run


ATTENTION_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def attention_backends(device, dtype):
    """(the SDPA backends that each alone run ViT-B's attention forward and backward, the one
    SDPA picks) on q, k, v of (256, 12, 50, 64): a batch of 256, 12 heads, MAE's 49 visible
    patches and the class token at 224 px, head width 64."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    shape = (256, 12, 50, 64)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in "qkv")
    runs = []
    for name in ATTENTION_BACKENDS:
        if not hasattr(SDPBackend, name):  # an older torch
            continue
        try:
            with warnings.catch_warnings(), sdpa_kernel(getattr(SDPBackend, name)):
                warnings.simplefilter("ignore")  # the reasons a backend does not run
                F.scaled_dot_product_attention(q, k, v).sum().backward()
            runs.append(name)
        except RuntimeError:
            pass
    picked = "unknown"
    with contextlib.suppress(AttributeError, RuntimeError):  # a private function of torch's
        choice = torch._fused_sdp_choice(q, k, v)
        picked = next(n for n, b in SDPBackend.__members__.items() if b.value == choice)
    return runs, picked


def nvidia_smi(query):
    """nvidia-smi's answer to --query-gpu=QUERY, or "unknown"."""
    command = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]
    try:
        r = subprocess.run(command, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (no nvidia-smi)"
    if r.returncode != 0 or not r.stdout.strip():
        return "unknown"
    return r.stdout.strip().splitlines()[0]


def environment(check):
    """torch, CUDA, cuDNN, driver, GPU, CPU cores and the attention kernels of ViT-B's shapes."""
    report = check.report
    report.figure("python", sys.version.split()[0])
    report.figure("torch", torch.__version__)
    report.figure("CUDA", str(torch.version.cuda or "none (a CPU build of torch)"))
    report.figure("cuDNN", str(torch.backends.cudnn.version() or "none"))
    report.figure("driver", nvidia_smi("driver_version"))
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpus = torch.cuda.device_count()
        gpu = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}, {gpus} GPU(s)"
        report.figure("GPU", gpu)
    else:
        report.figure("GPU", "none")
    report.figure("CPU cores", f"{len(os.sched_getaffinity(0))} usable of {os.cpu_count()}")
    with check.in_time(10):
        runs, picked = attention_backends("cpu", torch.float32)
    report.figure("attention, CPU fp32", f"runs on {', '.join(runs)}; SDPA picks {picked}")
    if check.no_gpu:
        return report.missing("attention kernel, GPU bf16", check.no_gpu)
    with check.in_time(10):
        runs, picked = attention_backends("cuda", torch.bfloat16)
    value = {"runs": runs, "picked": picked}
    text = f"SDPA picks {picked}; each alone runs: {', '.join(runs)}"
    report.figure("attention kernel, GPU bf16", text, value)


def one_step_each_method(check):
    """`pretrain METHOD --preset tiny --max-steps 1` with pretrain's defaults for every method at
    once (tiny models share the GPU; i-MAE without a teacher); the loss of each log.jsonl."""
    import cli

    estimate = check.sizes.one_step_s
    commands = {}
    for name in cli.MODULES:
        out = check.work / "one-step" / name
        args = ["pretrain", name, "--preset", "tiny", "--max-steps", 1, "--out", out]
        commands[name] = check.launch([*args, *check.device], estimate, threads=1)
    for name, command in commands.items():
        check.attempt(name, functools.partial(one_step_row, check, name, command, estimate))


def one_step_row(check, name, command, estimate):
    check.wait(command, estimate)
    rows = log_rows(check.work / "one-step" / name)
    seconds = time.monotonic() - command.started
    loss = rows[0]["loss"]
    if not math.isfinite(loss):
        raise Failed(f"loss {loss} after one step")
    check.report.figure(name, f"loss {loss:.4f} after one step ({seconds:.0f} s)", loss)


# (label, TF32 on, autocast dtype, relative tolerance): each against the CPU's fp32 losses
LOSS_MODES = (
    ("GPU fp32, TF32 off", False, None, 1e-4),
    ("GPU fp32, TF32 on", True, None, 1e-2),
    ("GPU bf16 autocast", True, torch.bfloat16, 3e-2),
)


def train_losses(model, imgs, noise, device, steps, dtype=None):
    """The losses of `steps` AdamW steps of a copy of `model` on `device`, always on the same
    images and masking noise."""
    import copy

    model = copy.deepcopy(model).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    imgs = imgs.to(device)
    noise = noise.to(device)
    losses = []
    for _ in range(steps):
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss = model(imgs, noise=noise)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def cpu_vs_gpu_losses(check):
    """The tiny preset's MAE, one initialisation, images and masks, trained a few steps on the CPU
    in fp32 and on the GPU in each of LOSS_MODES; the losses compared step by step."""
    import cli
    import mae

    cfg = cli.resolve(mae, "tiny", None, {})[0]
    torch.manual_seed(0)
    model = mae.MAE(cfg)
    draws = torch.Generator().manual_seed(0)
    imgs = torch.randn(32, cfg.in_chans, cfg.img_size, cfg.img_size, generator=draws)
    noise = torch.rand(32, model.num_patches, generator=draws)  # (B, N)
    steps = check.sizes.loss_steps
    with check.in_time(5):
        reference = train_losses(model, imgs, noise, "cpu", steps)
    text = ", ".join(f"{loss:.5f}" for loss in reference)
    check.report.figure(f"CPU fp32, {steps} steps (the reference)", text, reference)
    inputs = (model, imgs, noise)
    for label, tf32, dtype, rtol in LOSS_MODES:
        if check.no_gpu:
            check.report.missing(label, check.no_gpu)
            continue
        mode = (tf32, dtype, rtol)
        check.attempt(label, functools.partial(gpu_losses, check, label, reference, inputs, mode))


def gpu_losses(check, label, reference, inputs, mode):
    tf32, dtype, rtol = mode
    matmul = torch.backends.cuda.matmul.allow_tf32
    convolutions = torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        with check.in_time(10):
            losses = train_losses(*inputs, "cuda", len(reference), dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = convolutions
    steps = range(1, len(reference) + 1)
    worst, ok = compare(dict(zip(steps, reference)), dict(zip(steps, losses)), rtol)
    text = f"worst relative difference {worst:.1e}, tolerance {rtol:g}: "
    text += "within" if ok else "BEYOND"
    text += f" ({', '.join(f'{loss:.5f}' for loss in losses)})"
    if not ok:
        raise Failed(text)
    check.report.figure(label, text, {"losses": losses, "worst": worst, "rtol": rtol})


def mae_throughput(check, compiled=False):
    """`bench mae --preset imagenet --batch-size B` at each batch: images/s, MFU (bench's, of the
    GPU's peak), peak memory."""
    sizes = check.sizes
    mode = "compiled" if compiled else "eager"
    for batch in sizes.mae_batches:
        label = f"{sizes.model}, batch {batch}, {mode}"
        if compiled and check.no_gpu:
            check.report.missing(label, check.no_gpu)
            continue
        check.attempt(label, functools.partial(mae_row, check, label, batch, compiled))


def mae_row(check, label, batch, compiled):
    sizes = check.sizes
    timing = sizes.timing
    if compiled:  # one round: one compile
        timing = [*timing[:-1], 1]
    args = ["mae", "--preset", sizes.preset, "--batch-size", batch, *timing]
    args += ["--compile"] if compiled else []
    estimate = sizes.compiled_s if compiled else sizes.bench_s
    row = check.bench(args, estimate)[0]
    row.pop("ratio")
    check.measured[("mae", batch, compiled)] = row
    check.report.figure(label, bench_text(row, check.no_gpu), row)


def mae_vit_b_compiled(check):
    mae_throughput(check, compiled=True)


def pr_mim_over_mae(check):
    """`bench pr-mim --compare mae --vary throw=0.5`: PR-MIM's step time over MAE's."""
    sizes = check.sizes
    batch = sizes.pr_mim_batch
    args = ["pr-mim", "--preset", sizes.preset, "--compare", "mae", "--vary", "throw=0.5"]
    rows = check.bench([*args, "--batch-size", batch, *sizes.timing], 2 * sizes.bench_s)
    mae_row = rows[0]
    pr_mim = next((r for r in rows if r["name"].endswith("throw=0.5")), rows[-1])
    ratio = pr_mim["step_ms"] / mae_row["step_ms"]
    flops = pr_mim["gflops"] / mae_row["gflops"]
    where = f"{'CPU, ' if check.no_gpu else ''}{sizes.preset} preset, batch {batch}"
    text = f"{ratio:.2f}x (the paper: 0.75x): {pr_mim['step_ms']:.1f} ms against MAE's "
    text += f"{mae_row['step_ms']:.1f} ms ({where}); FLOPs {flops:.2f}x"
    value = {"step_ratio": ratio, "flops_ratio": flops, "rows": rows}
    check.report.figure("PR-MIM step / MAE step, throw 0.5", text, value)


def revcolv2_memory(check):
    """`bench revcolv2 --vary reversible=false`: peak GPU memory (and autograd's saved bytes)
    reversible over plain."""
    sizes = check.sizes
    batch = sizes.revcol_batch
    args = ["revcolv2", "--preset", sizes.preset, "--batch-size", batch]
    rows = check.bench([*args, "--vary", "reversible=false", *sizes.timing], 2 * sizes.bench_s)
    reversible = rows[0]
    plain = rows[-1]
    saved = reversible["saved_mb"] / plain["saved_mb"]
    where = f"{sizes.preset} preset, batch {batch}"
    text = f"{saved:.2f}x ({reversible['saved_mb']:.0f} MB / {plain['saved_mb']:.0f} MB, {where})"
    check.report.figure("saved for backward, reversible / plain", text, saved)
    label = "peak GPU memory, reversible / plain"
    if check.no_gpu:
        return check.report.missing(label, check.no_gpu)
    peak = reversible["peak_gpu_mb"] / plain["peak_gpu_mb"]
    megabytes = f"{reversible['peak_gpu_mb']:.0f} MB / {plain['peak_gpu_mb']:.0f} MB"
    check.report.figure(label, f"{peak:.2f}x ({megabytes}, {where})", {"ratio": peak, "rows": rows})


def write_jpegs(folder, train, held_out, width=500, height=375):
    """TRAIN and HELD_OUT JPEGs (ImageNet's typical 500 x 375 px) in 2 classes under
    folder/{train,val}/: smooth random colour fields with grain, quality 90."""
    from PIL import Image

    draws = torch.Generator().manual_seed(0)
    for split, count in (("train", train), ("val", held_out)):
        for i in range(count):
            path = folder / split / f"class{i % 2}" / f"{i:05d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            coarse = torch.rand(1, 3, 6, 8, generator=draws)
            field = F.interpolate(coarse, size=(height, width), mode="bicubic")[0]
            grain = torch.randn(3, height, width, generator=draws) * 0.04
            pixels = ((field + grain).clamp(0, 1) * 255).byte().permute(1, 2, 0)
            Image.fromarray(pixels.numpy()).save(path, quality=90)


def jpeg_decoding(check):
    """A generated JPEG folder through `bench mae --data folder`: the pre-training loader's
    images/s, decoded on the GPU ("device" path) and in workers ("workers" path)."""
    folder = check.work / "jpegs"
    train, held_out = check.sizes.jpegs
    tick = time.monotonic()
    write_jpegs(folder, train, held_out)
    files = list(folder.rglob("*.jpg"))
    kilobytes = statistics.mean(f.stat().st_size for f in files) / 1e3
    text = f"{len(files)} JPEGs of 500 x 375 px, {kilobytes:.0f} KB each on average"
    check.report.figure("generated", f"{text} ({time.monotonic() - tick:.0f} s)")
    args = ["mae", *check.sizes.loader, "--data", "folder", "--data-dir", folder]
    paths = {row["path"]: row for row in check.bench(args, check.sizes.bench_s)["paths"]}
    labels = {"workers": "decoded in workers", "device": "decoded on the GPU"}
    if check.no_gpu:
        labels["device"] = "decoded by the device path, on the CPU"
    for path, row in paths.items():
        where = f"{row['img_size']} px, batch {row['batch_size']}, workers: {row['num_workers']}"
        text = f"{row['images_per_s']:.0f} img/s ({where}, {row['batches']} timed batches)"
        check.report.figure(labels.get(path, f"path {path}"), text, row)
    if "workers" not in paths:
        check.report.missing(labels["workers"], "bench --data gives no `workers` path")
    if check.no_gpu or "device" not in paths:
        why = check.no_gpu or "bench --data gives no `device` path"
        check.report.missing("decoded on the GPU", why)


def real_loop(check):
    """`pretrain mae --preset imagenet --data patterns` with pretrain's defaults (compiled on a
    GPU): the loop's images/s in its log.jsonl against bench's step alone."""
    out = check.work / "loop"
    args = ["pretrain", "mae", *check.sizes.loop, "--out", out, *check.device]
    check.cli(args, check.sizes.loop_s)
    rows = log_rows(out)
    first = rows[0]
    later = rows[1:] or rows
    ips = statistics.median(r["img_per_s"] for r in later)
    steps = f"steps {later[0]['step']}-{later[-1]['step']}"
    text = f"{ips:.0f} img/s (the median of the logged intervals of {steps}); the first "
    text += f"interval, which holds any compile: {first['img_per_s']:.0f} img/s"
    text += f"; loss {rows[-1]['loss']:.4f} at step {rows[-1]['step']}"
    if check.no_gpu:
        text = f"CPU, tiny preset: {text}"
    check.report.figure("the loop", text, {"images_per_s": ips, "rows": rows})
    label = "the loop over bench's step alone"
    batch = check.sizes.loop[check.sizes.loop.index("--batch-size") + 1]
    for compiled in (True, False):
        step = check.measured.get(("mae", batch, compiled))
        if step:
            mode = "compiled" if compiled else "eager"
            text = f"{ips / step['images_per_s']:.2f}x of the {mode} step at batch {batch}"
            return check.report.figure(label, text, ips / step["images_per_s"])
    check.report.missing(label, f"no bench row at batch {batch}")


def profiled_step(check):
    """torch.profiler over a few compiled training steps of MAE ViT-B (bf16, fused AdamW): the
    top 10 CUDA kernels by self CUDA time. Without a GPU: the CPU ops of eager steps."""
    from torch.profiler import ProfilerActivity, profile

    import cli
    import mae

    gpu = not check.no_gpu
    device = torch.device("cuda" if gpu else "cpu")
    cfg = cli.resolve(mae, check.sizes.preset, None, {})[0]
    torch.manual_seed(0)
    model = mae.MAE(cfg).to(device)
    net = torch.compile(model) if gpu else model
    batch = check.sizes.profile_batch
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    noise = torch.rand(batch, model.num_patches, device=device)  # (B, N)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=gpu)
    dtype = torch.bfloat16 if gpu else None
    sync = torch.cuda.synchronize if gpu else lambda: None

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=gpu):
            loss = net(imgs, noise=noise)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    steps = 3
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if gpu else [])]
    with check.in_time(check.sizes.profile_s):
        for _ in range(3):  # the compile, then steady steps
            step()
        sync()
        with profile(activities=activities) as profiler:
            for _ in range(steps):
                step()
            sync()
    kind = "CUDA kernels of a compiled step" if gpu else "CPU ops of an eager step"
    title = f"top 10 {kind}, {check.sizes.preset} preset, batch {batch}"
    columns = ["#", "name", "self ms/step", "%", "calls/step"]
    check.report.table(title, columns, top(profiler, gpu, steps))
    if check.no_gpu:
        check.report.missing("top CUDA kernels", check.no_gpu)


def top(profiler, gpu, steps, count=10):
    """The rows of the `count` CUDA kernels (CPU ops without a GPU) of most self time in a profile
    of `steps` steps; the ranges of record_function (Optimizer.step, ...) left out."""
    from torch.autograd import DeviceType

    kind = DeviceType.CUDA if gpu else DeviceType.CPU
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    events = [e for e in profiler.key_averages() if e.device_type == kind]
    events = [e for e in events if not getattr(e, "is_user_annotation", False)]
    total = sum(getattr(e, key) for e in events) or 1
    ranked = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:count]
    rows = []
    for rank, event in enumerate(ranked, 1):
        name = event.key.replace("|", "/")
        name = name if len(name) <= 70 else name[:67] + "..."
        microseconds = getattr(event, key)
        share = f"{microseconds / total:.1%}"
        per_step = f"{microseconds / 1e3 / steps:.2f}"
        rows.append([rank, f"`{name}`", per_step, share, event.count // steps])
    return rows


# (title, function, estimated seconds on a GPU, in a dry run)
SECTIONS = (
    ("Environment", environment, 15, 3),
    ("One step of every method", one_step_each_method, GPU.one_step_s, DRY.one_step_s),
    ("CPU against GPU losses", cpu_vs_gpu_losses, 20, 4),
    ("MAE ViT-B/16 images/s, eager", mae_throughput, GPU.bench_s, DRY.bench_s),
    ("PR-MIM over MAE", pr_mim_over_mae, 2 * GPU.bench_s, 2 * DRY.bench_s),
    ("RevColV2 memory, reversible over plain", revcolv2_memory, 2 * GPU.bench_s, 10),
    ("JPEG folder decoding", jpeg_decoding, GPU.bench_s, 10),
    ("MAE ViT-B/16 images/s, compiled", mae_vit_b_compiled, GPU.compiled_s, 0),
    ("The real loop's images/s", real_loop, GPU.loop_s, DRY.loop_s),
    ("Top kernels of a profiled compiled step", profiled_step, GPU.profile_s, DRY.profile_s),
)


# --------------------------------------------------------------------------------------------------
# The check: every section in turn, then the verdict


def run_section(check, number, title, section, estimate):
    check.report.start(number, title)
    tick = time.monotonic()
    if check.left() < estimate:
        why = f"deadline ({check.left():.0f} s left, the section needs about {estimate} s)"
        check.report.missing("the section", why)
    else:
        check.attempt("the section", functools.partial(section, check))
    if torch.cuda.is_initialized():  # the memory of this process's measurements, for the next
        torch.cuda.empty_cache()
    check.report.end(time.monotonic() - tick)


def verdict(report):
    """The last line, and the exit status: 1 if a section failed."""
    sections = report.data["sections"]
    failed = [s["title"] for s in sections if s["status"] == "failed"]
    statuses = collections.Counter(s["status"].split(" (")[0] for s in sections)
    counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
    seconds = time.monotonic() - START
    result = f"FAILED: {', '.join(failed)}" if failed else "OK"
    line = f"verdict: {result} ({counts}; {seconds:.0f} s)"
    report.data["verdict"] = line
    report.line(f"\n{line}")
    report.save()
    return 1 if failed else 0


def stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt("SIGTERM")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or ROOT / "runs" / "gpu_check")
    parser.add_argument("--deadline", type=float, default=480, help="seconds from the start")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, on the CPU")
    args = parser.parse_args(argv)
    no_gpu = "dry run" if args.dry_run else ""
    if not torch.cuda.is_available():
        no_gpu = "no GPU"
    sizes = DRY if no_gpu else GPU
    header = dict(
        started=time.strftime("%Y-%m-%d %H:%M:%S"),
        host=socket.gethostname(),
        mode=f"{no_gpu}: tiny sizes on the CPU" if no_gpu else "GPU",
        deadline_s=args.deadline,
    )
    report = Report(Path(args.out), header)
    report.line(f"# GPU check, {header['started']} on {header['host']}")
    report.line(f"\n{header['mode']}; deadline {args.deadline:.0f} s; `{' '.join(sys.argv)}`")
    report.save()
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))  # runs, checkpoints, JPEGs: not in --out
    check = Check(report, sizes, no_gpu, args.deadline, work)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        for number, (title, section, gpu_s, dry_s) in enumerate(SECTIONS, 1):
            run_section(check, number, title, section, dry_s if no_gpu else gpu_s)
    except KeyboardInterrupt as e:
        report.failed("stopped", f"by {e or 'Ctrl-C'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return verdict(report)


if __name__ == "__main__":
    sys.exit(main())
