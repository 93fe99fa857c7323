"""The training loop and the pretrain command, through the CLI as a user runs them."""

import functools
import json

import pytest
import torch
from conftest import run_cli

import common
import data_sets


def read_log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_pretrain_smoke_two_steps_writes_log_and_full_checkpoint(tmp_path):
    out = tmp_path / "run"
    r = run_cli("pretrain", "mae", "--preset", "tiny", "--max-steps", 2, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"checkpoint {out / 'checkpoint.pt'}" in r.stdout.replace("\n", "")
    rows = read_log(out)
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]  # the held-out loss before training
    ckpt = common.load_checkpoint(out)
    assert ckpt["step"] == 2 and ckpt["method"] == "mae" and ckpt["config"]["embed_dim"] == 64
    assert {"model", "optimizer", "scaler", "step", "train", "git", "code"} <= set(ckpt)
    # no generator state to restore: every draw is seeded by its step (common.train)
    assert "rng" not in ckpt
    assert "def random_masking" in ckpt["code"]["mae.py"]
    assert "def train(" in ckpt["code"]["common.py"]
    assert json.loads((out / "config.json").read_text())["config"] == ckpt["config"]


def test_overwrite_replaces_a_run_and_resuming_a_finished_one_changes_nothing(tmp_path):
    """(Refusing a folder that holds a run, and --resume with changed settings:
    tests/test_cli_errors.py.)"""
    out = tmp_path / "run"
    assert (
        run_cli("pretrain", "mae", "--preset", "tiny", "--max-steps", 1, "--out", out).returncode
        == 0
    )
    r = run_cli(
        "pretrain", "mae", "--preset", "tiny", "--max-steps", 2, "--out", out, "--overwrite"
    )
    assert r.returncode == 0, r.stderr
    # the old run's log is gone
    assert [row["step"] for row in read_log(out) if "loss" in row] == [1, 2]
    assert common.load_checkpoint(out)["step"] == 2
    before = (out / "checkpoint.pt").read_bytes(), (out / "log.jsonl").read_text()
    r = run_cli("pretrain", "mae", "--preset", "tiny", "--max-steps", 2, "--out", out, "--resume")
    # finished: nothing to run, no bar
    assert r.returncode == 0 and "nan" not in r.stdout, r.stdout + r.stderr
    assert ((out / "checkpoint.pt").read_bytes(), (out / "log.jsonl").read_text()) == before


def test_help_lists_every_config_field_with_its_source():
    import mae

    r = run_cli("pretrain", "mae", "--help")
    assert r.returncode == 0
    for cls in (mae.Config, common.TrainConfig):
        for name in cls.__dataclass_fields__:
            assert "--" + name.replace("_", "-") in r.stdout
    assert "Tab. 1c" in r.stdout  # the trailing comment of norm_pix_loss is its help text


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import mae

    cfg = mae.Config(
        img_size=32,
        patch_size=8,
        embed_dim=32,
        depth=1,
        num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    tcfg = common.TrainConfig(
        data="patterns",
        train_size=64,
        val_size=16,
        batch_size=16,
        epochs=3,
        warmup_epochs=0,
        num_workers=0,
        out=str(tmp_path / "run"),
    )
    model = mae.MAE(cfg)
    real_forward = model.forward
    calls = []

    def forward(imgs, **inputs):  # the 6th step (the 2nd of epoch 2) diverges
        calls.append(1)
        loss, pred, mask = real_forward(imgs, **inputs)
        # +2: held-out batches
        return (loss * float("nan") if len(calls) == 6 + 2 else loss), pred, mask

    monkeypatch.setattr(model, "forward", forward)
    inputs = functools.partial(mae.sample_inputs, cfg)
    loaders = data_sets.pretrain_loaders(tcfg, 32, inputs, torch.device("cpu"))
    # the loss reaches the host at logged steps only: here the end of epoch 2 (log-every 20 > 4
    # steps per epoch)
    with pytest.raises(
        FloatingPointError, match=r"loss is nan between steps 5 and 8 \(epoch 2\).*step 4.*is kept"
    ):
        common.pretrain(model, cfg, tcfg, *loaders, "mae", [mae.__file__, common.__file__])
    ckpt = common.load_checkpoint(tmp_path / "run")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_short_run_on_builtin_data_lowers_held_out_loss(tmp_path):
    out = tmp_path / "run"
    r = run_cli(
        "pretrain",
        "mae",
        "--preset",
        "tiny",
        "--patch-size",
        4,
        "--train-size",
        512,
        "--epochs",
        4,
        "--blr",
        1e-2,
        "--warmup-epochs",
        1,
        "--log-every",
        100,
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    val = [row["val_loss"] for row in read_log(out) if "val_loss" in row]
    # before training and after each epoch, on held-out images with fixed masks
    assert len(val) == 5
    # predicting each patch's mean scores 1 - 1/48 on norm-pix targets (48 = 4 x 4 x 3 values,
    # unbiased variance): the run must do clearly better than that, not just unlearn its random init
    trivial = 1 - 1 / 48
    assert val[-1] < 0.9 * trivial and val[-1] < 0.7 * val[0], val


def test_drop_path_drops_whole_branches_per_sample_in_training_only():
    """common.Block's stochastic depth: in training each sample's attention and MLP branches are
    kept (rescaled) or dropped whole, so with p = 0.5 some samples come out unchanged (both dropped)
    and others do not; in eval mode the block is the one without drop path; p = 0 is the plain
    block."""
    torch.manual_seed(0)
    plain = common.Block(16, 2)
    dropping = common.Block(16, 2, drop_path=0.5)
    dropping.load_state_dict(plain.state_dict())
    x = torch.randn(64, 5, 16)
    with torch.no_grad():
        out = dropping.train()(x)
        unchanged = (out == x).flatten(1).all(1)  # (B,): both branches dropped
        assert 5 <= int(unchanged.sum()) <= 30, int(unchanged.sum())  # ~B/4 expected
        assert torch.equal(dropping.eval()(x), plain.eval()(x))
        assert torch.equal(plain.train()(x), plain.eval()(x))


def test_importing_the_cli_and_pretraining_on_patterns_load_no_torchvision(tmp_path):
    """torchvision's import pulls in torch._dynamo (about 2 s on 2 cores): importing cli.py, which
    every command does, and pre-training on the built-in data, which needs none of torchvision, must
    not pay for it."""
    import subprocess
    import sys

    from conftest import ROOT

    code = "import sys, cli; cli.main(sys.argv[1:])"
    args = [
        "pretrain",
        "mae",
        "--preset",
        "tiny",
        "--max-steps",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    probe = (
        f"import atexit, sys; atexit.register(lambda: print('torchvision' in sys.modules)); {code}"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False", r.stdout[-500:]
