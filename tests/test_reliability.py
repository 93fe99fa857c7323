"""Scale and reliability: torchrun DDP on CPU (gloo), fine-tuning resumed after a kill, graceful
stop on SIGTERM (pre-training resumed after a kill, for every method: tests/test_loop.py)."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import KILL_BEFORE_STEP_6, ROOT, run_cli, run_torchrun

import common
import mae


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def losses(run):
    return {row["step"]: row["loss"] for row in read_log(run) if "loss" in row}


# 14 s; two processes stay in the default suite: test_loop (DDP no_sync), test_imae (val65)
@pytest.mark.slow
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path):
    args = (
        "pretrain",
        "mae",
        "--preset",
        "tiny",
        "--epochs",
        1,
        "--train-size",
        128,
        "--log-every",
        1,
        "--knn-every",  # the kNN monitor: every process computes it alike, rank 0 logs it
        1,
        "--knn-train-size",
        64,
    )
    one = tmp_path / "one"
    two = tmp_path / "two"
    assert run_cli(*args, "--batch-size", 16, "--out", one).returncode == 0
    r = run_torchrun(*args, "--batch-size", 8, "--out", two)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("done: log") == 1  # rank 0 alone reports and writes
    a = losses(one)
    b = losses(two)
    assert list(a) == list(b) == list(range(1, 9))
    # same samples, masks and mean: only float order differs
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    val = lambda run: [row["val_loss"] for row in read_log(run) if "val_loss" in row]  # noqa: E731
    assert len(val(one)) == len(val(two)) == 2  # before training and after the epoch
    # held-out loss reduced across ranks
    assert all(abs(x - y) < 1e-5 for x, y in zip(val(one), val(two)))
    knn = lambda run: [row["knn_top1"] for row in read_log(run) if "knn_top1" in row]  # noqa: E731
    assert len(knn(one)) == len(knn(two)) == 2
    assert knn(one)[0] == knn(two)[0]  # the same initial weights
    assert abs(knn(one)[1] - knn(two)[1]) <= 2 / 64  # weights a float order apart: a query or two
    assert common.load_checkpoint(two)["world_size"] == 2


# 31 s; killed-and-resumed pre-training stays in the default suite (test_loop, five methods)
@pytest.mark.slow
def test_finetune_resume_after_sigkill_is_bitwise_the_uninterrupted_run(tmp_path):
    """Data order, augmentation (RandAugment, random erasing), mixup / cutmix draws, drop path and
    the EMA all continue exactly after a SIGKILL at step 5 or later: neither an epoch end (8) nor a
    checkpoint (every 3)."""
    source = tmp_path / "pretrain"
    assert (
        run_cli("pretrain", "mae", "--preset", "tiny", "--max-steps", 2, "--out", source).returncode
        == 0
    )
    args = (
        "finetune",
        source,
        "--epochs",
        2,
        "--train-size",
        128,
        "--batch-size",
        16,
        "--log-every",
        1,
        "--ckpt-every",
        3,
        "--num-workers",
        1,
        "--drop-path",
        0.1,
        "--ema",
        0.9,
    )
    full = tmp_path / "full"
    killed = tmp_path / "killed"
    assert run_cli(*args, "--out", full).returncode == 0
    main = KILL_BEFORE_STEP_6 + "import sys, cli; cli.main(sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", main, *map(str, args), "--out", str(killed)], cwd=ROOT, timeout=300
    )
    assert proc.returncode == -signal.SIGKILL
    # then steps 4 and 5 were logged: dropped and redone
    assert common.load_checkpoint(killed)["step"] == 3
    r = run_cli(*args, "--out", killed, "--resume")
    assert r.returncode == 0, r.stderr

    def strip(run):
        return [
            {k: v for k, v in row.items() if k not in ("img_per_s", "elapsed_s")}  # noqa: E731
            for row in read_log(run)
        ]

    assert [row["step"] for row in read_log(killed) if "loss" in row] == list(range(1, 17))
    assert strip(killed) == strip(full)  # losses, lr, top-1 / top-5 and EMA metrics, bitwise
    a = common.load_checkpoint(full)
    b = common.load_checkpoint(killed)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part])
    assert all(torch.equal(a["head"]["head"][k], b["head"]["head"][k]) for k in a["head"]["head"])
    changed = run_cli(*args, "--out", killed, "--resume", "--blr", 1e-3)
    assert changed.returncode != 0
    assert "--blr 0.0005 there, 0.001 here" in changed.stderr.replace("\n", "")


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path):
    out = tmp_path / "run"
    args = (
        "pretrain",
        "mae",
        "--preset",
        "tiny",
        "--patch-size",
        4,
        "--train-size",
        1024,
        "--epochs",
        1,
        "--out",
        out,
    )
    proc = subprocess.Popen(
        [sys.executable, "cli.py", *map(str, args)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:  # wait for training to start
        if (out / "log.jsonl").exists() and any("loss" in row for row in read_log(out)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped by a signal" in err and "--resume" in err
    ckpt = common.load_checkpoint(out)
    assert 0 < ckpt["step"] < 32 and ckpt["step"] == max(losses(out))


def test_wrong_architecture_checkpoint_gives_one_line(tmp_path):
    def tiny_mae(**widths):  # the tiny preset's MAE at patch 4, with `widths` changed
        sizes = dict(
            embed_dim=64,
            depth=2,
            num_heads=4,
            decoder_embed_dim=32,
            decoder_depth=1,
            decoder_num_heads=4,
        )
        return mae.MAE(mae.Config(img_size=32, patch_size=4, **{**sizes, **widths}))

    small = tiny_mae()
    wider = tiny_mae(embed_dim=128)
    deeper = tiny_mae(depth=3)
    with pytest.raises(
        ValueError, match=r"cls_token is \(1, 1, 64\) there and \(1, 1, 128\) here"
    ) as e:
        common.load_weights(wider, small.state_dict(), "x.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="tensor\\(s\\) missing"):
        common.load_weights(deeper, small.state_dict())


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    """--compile (torch.compile, slow to compile on CPU) trains the same model as eager mode."""
    args = ("pretrain", "mae", "--preset", "tiny", "--max-steps", 3)
    assert run_cli(*args, "--out", tmp_path / "eager").returncode == 0
    r = run_cli(*args, "--compile", "--out", tmp_path / "compiled")
    assert r.returncode == 0, r.stderr[-2000:]
    a = losses(tmp_path / "eager")
    b = losses(tmp_path / "compiled")
    assert list(a) == list(b) and all(abs(a[s] - b[s]) < 1e-4 for s in a)
