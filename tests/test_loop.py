"""The training loop through the command line: gradient accumulation, DDP's no_sync, --clip-grad,
the lr schedule, Ctrl-C, and bitwise resume of every method with drop path and a data worker.

Most runs are children of one fork server (conftest.ForkedCli: it imports cli.py once), so a run
costs its training, not the ~3 s start-up of python and torch; each child is still a process of its
own, with its own files, pid and exit code, so it can be signalled or killed like `python
cli.py`."""

import json
import math
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import KILL_BEFORE_STEP_6, ForkedCli, run_torchrun

import common

# Records, before every optimiser step, the total gradient norm over all parameters (in float64),
# one a line.
GRAD_NORMS = r"""
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
def record(optimizer, args, kwargs):
    params = [p for group in optimizer.param_groups for p in group["params"]]
    squares = [p.grad.double().pow(2).sum() for p in params if p.grad is not None]
    norm = sum(squares, torch.zeros((), dtype=torch.float64)).sqrt().item()
    with open({path!r}, "a") as f:
        f.write(repr(norm) + "\n")
register_optimizer_step_pre_hook(record)
"""


@pytest.fixture(scope="module")
def server():
    # one thread a run: the models are too small to gain from two, and other processes share cores
    with ForkedCli(env={"OMP_NUM_THREADS": "1"}) as s:
        yield s


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("loop")


def read_log(run):
    path = Path(run) / "log.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
        if path.exists()
        else []
    )


def losses(run):
    return {row["step"]: row["loss"] for row in read_log(run) if "loss" in row}


def val_losses(run):
    return {row["step"]: row["val_loss"] for row in read_log(run) if "val_loss" in row}


def weights(run):
    return common.load_checkpoint(run)["model"]


def same_weights(a, b):
    """Equal to float rounding (rtol 1e-5), but for the key bias of attention (the middle third of
    qkv.bias): a softmax ignores a shift shared by all keys, so its gradient is 0 but for rounding
    noise, which Adam rescales into moves of up to a step's lr: its values differ between two
    summation orders by more than rounding."""

    def part(name, w):
        return w.view(3, -1)[[0, 2]] if name.endswith("attn.qkv.bias") else w

    return set(a) == set(b) and all(
        torch.allclose(part(k, a[k]), part(k, b[k]), rtol=1e-5, atol=1e-6) for k in a
    )


def close(a, b, tol=1e-5):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def alive(pid):
    """The child is running (not exited; a zombie, exited but not yet reaped, counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def poll_step(run, pid, until, timeout=120):
    """Poll log.jsonl every 20 ms until a logged training step satisfies until(step); returns it, or
    None if the run ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline and alive(pid):
        steps = [row["step"] for row in read_log(run) if "loss" in row]
        if steps and until(steps[-1]):
            return steps[-1]
        time.sleep(0.02)
    return None


# --------------------------------------------------------------------------------------------------
# -- 1-3: gradient accumulation, DDP no_sync, --clip-grad. 128 images, 32 per step: 4 steps/epoch, 2
# epochs.

BASE = (
    "pretrain",
    "mae",
    "--preset",
    "tiny",
    "--train-size",
    128,
    "--val-size",
    32,
    "--epochs",
    2,
    "--log-every",
    1,
)


@pytest.fixture(scope="module")
def accum_runs(server, runs):
    """Three runs of 8 steps with the gradient norm before every step: 32 images a step in one
    batch, the same 32 as two micro-batches of 16, and the first again with --clip-grad 0.01."""
    spec = {
        "one": ("--batch-size", 32),
        "accum": ("--batch-size", 16, "--accum-iter", 2),
        "clip": ("--batch-size", 32, "--clip-grad", 0.01),
    }
    for name, extra in spec.items():
        out = runs / name
        ok(
            server.run(
                *BASE, *extra, "--out", out, prelude=GRAD_NORMS.format(path=str(out) + ".norms")
            )
        )
    norms = {
        name: [float(x) for x in Path(str(runs / name) + ".norms").read_text().split()]
        for name in spec
    }
    return {name: runs / name for name in spec}, norms


def test_gradient_accumulation_trains_like_one_big_batch(accum_runs):
    run, norms = accum_runs
    a = losses(run["one"])
    b = losses(run["accum"])
    assert list(a) == list(b) == list(range(1, 9))
    # the same 32 images per step: the step's loss is the mean of its two micro-batches' (MAE: a
    # mean over images with the same number of masked patches each)
    assert all(close(a[s], b[s]) for s in a), (a, b)

    def lr(run):
        return [row["lr"] for row in read_log(run) if "lr" in row]

    assert lr(run["one"]) == lr(run["accum"])  # the lr scales with the effective batch, 32 in both
    # the gradient each optimiser step sees: the mean over the 32 images, not a sum of the
    # micro-batches' (Adam is nearly blind to a gradient's scale, so the weights alone would not
    # show a missing / accum_iter)
    assert len(norms["one"]) == len(norms["accum"]) == 8  # one optimiser step per 2 micro-batches
    assert all(close(x, y, 1e-4) for x, y in zip(norms["one"], norms["accum"])), norms
    assert same_weights(weights(run["one"]), weights(run["accum"]))


def test_ddp_no_sync_accumulation_matches_one_process(accum_runs, tmp_path):
    """2 processes x 8 images x 2 micro-batches = the 32 images of one process's 16 x 2, step for
    step."""
    run, _ = accum_runs
    two = tmp_path / "two"
    r = run_torchrun(*BASE, "--batch-size", 8, "--accum-iter", 2, "--out", two)
    assert r.returncode == 0, r.stderr[-3000:]
    a = losses(run["accum"])
    b = losses(two)
    assert list(a) == list(b) == list(range(1, 9))
    assert all(close(a[s], b[s]) for s in a), (a, b)

    def lr(run):
        return [row["lr"] for row in read_log(run) if "lr" in row]

    assert lr(two) == lr(run["accum"])  # the effective batch counts the processes
    va = val_losses(run["accum"])
    vb = val_losses(two)
    assert list(va) == list(vb) == [0, 4, 8] and all(close(va[s], vb[s]) for s in va)
    # rank 0's weights: had the ranks not averaged their accumulated gradients, they would have
    # drifted apart
    assert same_weights(weights(run["accum"]), weights(two))
    assert common.load_checkpoint(two)["world_size"] == 2


def test_clip_grad_clips_the_total_norm(accum_runs):
    run, norms = accum_runs
    assert len(norms["clip"]) == 8
    # unclipped, every step's gradient is well above the threshold ...
    assert min(norms["one"]) > 0.05
    # ... and clipped, the total norm over all parameters is brought down to 0.01 exactly (x g / (g
    # + 1e-6))
    assert all(abs(n - 0.01) < 1e-6 for n in norms["clip"]), norms["clip"]
    # the same first batch; only the update differs
    assert losses(run["clip"])[1] == losses(run["one"])[1]
    assert losses(run["clip"])[8] != losses(run["one"])[8]


# --------------------------------------------------------------------------------------------------
# -- 4-5: the schedule, and Ctrl-C. 128 images, 16 x 2 a step: 4 steps/epoch, 3 epochs, 1 of
# warm-up.

SCHEDULE = (
    "pretrain",
    "mae",
    "--preset",
    "tiny",
    "--train-size",
    128,
    "--val-size",
    32,
    "--batch-size",
    16,
    "--accum-iter",
    2,
    "--epochs",
    3,
    "--warmup-epochs",
    1,
    "--blr",
    2e-3,
    "--min-lr",
    1e-5,
    "--log-every",
    1,
)


@pytest.fixture(scope="module")
def schedule_run(server, runs):
    out = runs / "schedule"
    ok(server.run(*SCHEDULE, "--out", out))
    return out


def test_lr_is_linear_warmup_then_half_cycle_cosine(schedule_run):
    # blr x effective batch / 256; 1 and 3 epochs of 4
    peak = 2e-3 * 32 / 256
    floor = 1e-5
    warmup = 4
    total = 12
    expected = {}
    for step in range(1, total + 1):
        # a logged step's lr was set before it ran, at the index of the steps done before it
        t = step - 1
        expected[step] = (
            peak * t / warmup
            if t < warmup
            else floor
            + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))
        )
    got = {row["step"]: row["lr"] for row in read_log(schedule_run) if "lr" in row}
    assert list(got) == list(expected)
    assert all(math.isclose(got[s], expected[s], rel_tol=1e-9, abs_tol=1e-15) for s in got), (
        got,
        expected,
    )
    # (by hand: the warm-up starts at 0 and peaks as epoch 2 begins)
    assert got[1] == 0 and got[5] == peak


def test_one_ctrl_c_saves_and_exits_130_and_the_resumed_run_is_the_uninterrupted_one(
    server, schedule_run, tmp_path
):
    out = tmp_path / "run"
    pid = server.start(*SCHEDULE, "--out", out)
    seen = poll_step(out, pid, lambda step: step >= 2)
    assert seen is not None and seen < 10, "the run ended before it could be interrupted"
    os.kill(pid, signal.SIGINT)
    r = server.wait(pid)
    assert r.returncode == 130, r.stderr[-3000:]
    message = r.stderr.strip()
    assert "\n" not in message and "--resume" in message and str(out) in message, message
    stopped = common.load_checkpoint(out)["step"]
    # the step in hand was finished and saved
    assert seen <= stopped <= seen + 2 and stopped == max(losses(out))
    ok(server.run("pretrain", "mae", "--out", out, "--resume"))
    full = losses(schedule_run)
    resumed = losses(out)
    assert list(resumed) == list(range(1, 13))
    assert resumed == full  # bitwise, the steps after the resume included
    assert val_losses(out) == val_losses(schedule_run)
    a = weights(schedule_run)
    b = weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_aborts_at_once_without_a_traceback(server, tmp_path):
    out = tmp_path / "run"
    # slow steps (~0.6 s: 256 images at 64 patches each): both signals land early in the step after
    # the one just logged, well before it ends, where one Ctrl-C would stop the run gracefully
    pid = server.start(
        "pretrain",
        "mae",
        "--preset",
        "tiny",
        "--patch-size",
        4,
        "--train-size",
        2048,
        "--val-size",
        16,
        "--batch-size",
        256,
        "--epochs",
        1,
        "--log-every",
        1,
        "--ckpt-every",
        1,
        "--out",
        out,
    )
    seen = poll_step(out, pid, lambda step: step >= 1)
    assert seen is not None and seen <= 4, "the run ended before it could be interrupted"
    os.kill(pid, signal.SIGINT)
    time.sleep(0.05)  # two signals at once would be merged into one
    os.kill(pid, signal.SIGINT)
    r = server.wait(pid)
    assert r.returncode == 130, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "KeyboardInterrupt" not in r.stderr, r.stderr[-3000:]
    # not the graceful stop of one Ctrl-C: it did not wait
    assert "stopped by a signal" not in r.stderr
    last = max(losses(out))
    assert last <= seen + 2 < 8  # it stopped mid-run, within the step the signals came in
    # the checkpoint on disk is whole (it loads): one of a logged step
    ckpt = common.load_checkpoint(out)
    assert ckpt["step"] in losses(out)
    assert all(torch.isfinite(w).all() for w in ckpt["model"].values())


# --------------------------------------------------------------------------------------------------
# -- 6: bitwise resume of every method with drop path and a data worker. 64 images, 8 a step: 8
# steps/epoch, 2 epochs.

METHOD_NAMES = ["mae", "simmim", "pr-mim", "i-mae", "revcolv2"]
DROP_PATH = 0.1


def resume_args(method, drop_path):
    return (
        "pretrain",
        method,
        "--preset",
        "tiny",
        "--train-size",
        64,
        "--val-size",
        16,
        "--batch-size",
        8,
        "--epochs",
        2,
        "--log-every",
        1,
        "--ckpt-every",
        3,
        "--num-workers",
        1,
        "--drop-path",
        drop_path,
    )


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_killed_and_resumed_run_with_drop_path_is_bitwise_the_uninterrupted_one(
    server, tmp_path, method
):
    full = tmp_path / "full"
    cut = tmp_path / "cut"
    args = resume_args(method, DROP_PATH)
    ok(server.run(*args, "--out", full))
    r = server.run(*args, "--out", cut, prelude=KILL_BEFORE_STEP_6)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    saved = common.load_checkpoint(cut)["step"]
    # steps 4 and 5 were logged after the checkpoint: dropped, redone
    assert saved == 3 and max(losses(cut)) == 5
    ok(
        server.run(
            "pretrain", method, "--out", cut, "--resume", "--max-steps", 0, "--num-workers", 1
        )
    )
    a = losses(full)
    b = losses(cut)
    # the killed run's lines after its checkpoint were dropped, none repeated
    assert list(b) == list(range(1, 17))
    differ = [s for s in range(saved + 1, 17) if a[s] != b[s]]
    assert not differ, (
        f"checkpoint at step {saved}; losses differ from step {differ[0]} on: "
        + ", ".join(f"{s}: {a[s]} vs {b[s]}" for s in differ[:3])
    )
    # held-out loss at the epoch ends, 8 after the resume
    assert val_losses(cut) == val_losses(full)
    wa = weights(full)
    wb = weights(cut)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
