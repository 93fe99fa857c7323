"""The prepared GPU check of issue 15: at most 8 minutes on one GPU, no download (built-in
`patterns` data only).

    python experiments/gpu_check.py                     # on the GPU machine
    GPU_CHECK_SMALL=1 python experiments/gpu_check.py   # the same steps, reduced (tiny preset, few
    steps): a CPU test

It measures, each with `python cli.py bench` or `pretrain` as a user runs them: MAE ViT-B/16 at 224
px (`--preset imagenet`) images/s, MFU and peak GPU memory, eager and compiled; the cifar preset's
images/s, eager and compiled; the cifar preset's data loader alone on `patterns` (`bench --data
patterns`); and a 20-step pre-training run on it, eager and compiled, whose losses in log.jsonl must
agree within bf16 tolerance (rtol 2e-2). The report is printed, and written to $OUT/gpu_check.txt
(with every figure in $OUT/gpu_check.json) when OUT is set. Exit status 1 if a command fails or the
losses disagree."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SMALL = os.environ.get("GPU_CHECK_SMALL") == "1"
# presets: ViT-B/16 224 px; ViT-Ti/4 32 px
BIG, CIFAR = ("tiny", "tiny") if SMALL else ("imagenet", "cifar")
# 256: the cifar preset's batch, and ViT-B's near its best
BIG_BATCH, CIFAR_BATCH = (4, 8) if SMALL else (256, 256)
TIMED = "--steps 1 --warmup 1 --rounds 1" if SMALL else "--steps 10 --warmup 3 --rounds 2"
PRETRAIN = (
    "--train-size 256 --val-size 64 --max-steps 4"
    if SMALL
    else "--train-size 4096 --val-size 1024 --max-steps 20"
)
RTOL = 2e-2  # bf16 keeps 8 bits of mantissa: 2**-8 = 0.4 % per rounding, and 20 steps of them


def cli(args, timeout=420):
    """`python cli.py ARGS` in the project root -> stdout; a failure ends the check with its
    stderr."""
    tick = time.perf_counter()
    env = {**os.environ, "COLUMNS": "200"}
    command = [sys.executable, "cli.py", *args.split()]
    r = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    say(f"  ({time.perf_counter() - tick:.0f} s) python cli.py {args}")
    if r.returncode != 0:
        say(r.stderr[-3000:] + r.stdout[-2000:])
        finish(f"FAILED: python cli.py {args} exited {r.returncode}")
    return r.stdout


def bench(method, preset, batch, extra=""):
    """The first row of `bench --json` (the method's defaults)."""
    return json.loads(
        cli(f"bench {method} --preset {preset} --batch-size {batch} {TIMED} --json {extra}")
    )[0]


def losses(folder):
    """{step: loss} of a run's log.jsonl (the training rows, not the held-out ones)."""
    rows = [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def compare(eager, compiled, rtol=RTOL):
    """(worst relative difference, True if every step of both runs is there and within rtol)."""
    if not eager or eager.keys() != compiled.keys():
        return float("inf"), False
    worst = max(abs(compiled[s] - eager[s]) / abs(eager[s]) for s in eager)
    return worst, worst <= rtol


def row_line(name, r):
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    peak = "-" if r["peak_gpu_mb"] is None else f"{r['peak_gpu_mb']:.0f}"
    flops = f"{r['gflops']:.3g} GFLOPs/img fwd+bwd"
    return f"{name}: {r['images_per_s']:.0f} img/s, MFU {mfu}, step {r['step_ms']:.1f} ms, peak {peak} MB, {flops}"


REPORT = []
FIGURES = {}
START = time.perf_counter()


def say(line):
    print(line, flush=True)
    REPORT.append(line)


def finish(verdict):
    say(f"{verdict} (in {time.perf_counter() - START:.0f} s)")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.txt").write_text("\n".join(REPORT) + "\n")
        Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(FIGURES, indent=2) + "\n")
    sys.exit(0 if verdict.startswith("OK") else 1)


if __name__ == "__main__":
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (CPU, fp32)"
    say(
        f"gpu_check{' (small)' if SMALL else ''}: {gpu}, torch {torch.__version__}, bf16 autocast on a GPU"
    )
    for name, preset, batch in (
        ("MAE ViT-B/16 224 px", BIG, BIG_BATCH),
        ("cifar preset", CIFAR, CIFAR_BATCH),
    ):
        for mode, extra in (("eager", ""), ("compiled", "--compile")):
            label = f"{name} ({preset}), batch {batch}, {mode}"
            FIGURES[label] = bench("mae", preset, batch, extra)
            say(row_line(label, FIGURES[label]))
    label = f"data loader alone, patterns, {CIFAR} preset"
    FIGURES[label] = json.loads(cli(f"bench mae --preset {CIFAR} --data patterns --json"))
    r = FIGURES[label]
    say(
        f"{label} (batch {r['batch_size']}, {r['num_workers']} workers): {r['images_per_s']:.0f} img/s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for mode, extra in (("eager", ""), ("compiled", "--compile")):
            cli(
                f"pretrain mae --preset {CIFAR} --data patterns {PRETRAIN} --log-every 1 --out {tmp}/{mode} {extra}"
            )
            runs[mode] = losses(f"{tmp}/{mode}")
    worst, ok = compare(runs["eager"], runs["compiled"])
    FIGURES["pretrain losses"] = runs | {"worst_relative_difference": worst, "rtol": RTOL}
    steps = f"pre-training on patterns, {len(runs['eager'])} steps"
    say(f"{steps}, eager vs compiled: worst relative loss difference {worst:.2e} (rtol {RTOL:g})")
    if time.perf_counter() - START > 480 and not SMALL:
        say("note: over the 8-minute budget of the check")
    finish(
        "OK: compiled losses equal eager ones"
        if ok
        else "FAILED: compiled losses differ from eager ones"
    )
