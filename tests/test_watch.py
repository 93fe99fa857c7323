"""Watching a run learn and comparing runs: the kNN monitor of pre-training (--knn-every), the
picture of runs side by side (cli.py plot), the comparison of a fork with its base from another
folder (experiments/learning.sh, cli.py table), and the help a mistake gets."""

import json
import os
import shutil
import subprocess

import pytest
import torch
from conftest import ROOT, ForkedCli, run_cli

from evaluation import plots

TINY = ("--preset", "tiny", "--log-every", 1)


def rows(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def ok(r):
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """Two tiny MAE runs, the same but for the kNN monitor, and a SimMIM one with it. Drop path
    on: a monitor that left the model in eval mode would change the steps after it."""
    root = tmp_path_factory.mktemp("watch")
    mae = ("pretrain", "mae", *TINY, "--drop-path", 0.1)
    ok(run_cli(*mae, "--knn-every", 1, "--out", root / "mae-knn"))
    ok(run_cli(*mae, "--out", root / "mae"))
    ok(run_cli("pretrain", "simmim", *TINY, "--knn-every", 1, "--out", root / "simmim-knn"))
    return root


def test_the_monitor_logs_knn_before_training_and_every_epoch_and_changes_nothing(watched):
    monitored = rows(watched / "mae-knn")
    knn = [(row["step"], row["knn_top1"]) for row in monitored if "knn_top1" in row]
    assert [step for step, _ in knn] == [0, 8, 16]  # before training, after epochs 1 and 2
    assert all(0 <= top1 <= 1 for _, top1 in knn)
    plain = rows(watched / "mae")
    assert not any("knn_top1" in row for row in plain)
    losses = [{r["step"]: r["loss"] for r in log if "loss" in r} for log in (monitored, plain)]
    assert losses[0] == losses[1]  # bitwise: the monitor draws nothing the training sees
    held_out = [[r["val_loss"] for r in log if "val_loss" in r] for log in (monitored, plain)]
    assert held_out[0] == held_out[1]


def test_the_monitors_last_value_is_the_knn_command_on_the_checkpoint(watched):
    """`cli.py knn` on the run's checkpoint, with the monitor's subsets (the tiny preset's 256
    training and 64 held-out images), gives the last value the monitor logged."""
    last = [row["knn_top1"] for row in rows(watched / "mae-knn") if "knn_top1" in row][-1]
    r = ok(run_cli("knn", watched / "mae-knn", "--train-size", 256, "--val-size", 64))
    folder = watched / "mae-knn" / "eval" / "knn-patterns-s0"
    assert json.loads((folder / "result.json").read_text())["metrics"]["top1"] == last, r.stdout


def test_the_monitor_resumes_exactly(tmp_path):
    """Stopped at step 11 (after epoch 1's kNN) and resumed: the same log as the whole run, kNN rows
    included, but for the clocks."""
    args = ("pretrain", "mae", *TINY, "--knn-every", 1)
    whole = tmp_path / "whole"
    cut = tmp_path / "cut"
    ok(run_cli(*args, "--out", whole))
    ok(run_cli(*args, "--out", cut, "--max-steps", 11))
    ok(run_cli("pretrain", "mae", "--out", cut, "--resume", "--max-steps", 0))

    def without_clocks(run):
        return [
            {k: v for k, v in r.items() if k not in ("elapsed_s", "img_per_s")} for r in rows(run)
        ]

    assert without_clocks(cut) == without_clocks(whole)


def test_plot_draws_the_logs_of_every_run(watched, tmp_path):
    out = tmp_path / "runs.png"
    runs = [watched / "mae-knn", watched / "simmim-knn"]
    figure = plots.plot(runs, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = figure.axes
    assert [ax.get_title() for ax in axes] == [title for _, title in plots.PANELS]
    for run, colour in zip(runs, ("C0", "C1")):
        log = rows(run)
        for ax, (key, _) in zip(axes, plots.PANELS):
            line = next(ln for ln in ax.lines if ln.get_label().endswith(f"({run.name})"))
            scale = 100 if key == "knn_top1" else 1
            expected = [(r["epoch"], r[key] * scale) for r in log if key in r]
            assert [tuple(p) for p in line.get_xydata()] == expected, (run.name, key)
        floor = [
            ln for ln in axes[2].lines if ln.get_linestyle() == "--" and ln.get_color() == colour
        ]
        knn0 = 100 * next(r["knn_top1"] for r in log if "knn_top1" in r)
        assert len(floor) == 1 and floor[0].get_ydata()[0] == knn0  # the random-init floor
    assert any(ln.get_label() == "mae (mae-knn)" for ln in axes[0].lines)
    r = ok(run_cli("plot", *runs, "--out", tmp_path / "cli.png"))
    assert (tmp_path / "cli.png").is_file() and "2 run(s)" in r.stdout


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "is not a folder"),
        ("empty", "holds no log.jsonl: it is not a pre-training run folder"),
        ("no-knn", "logged no kNN: pre-train with --knn-every N"),
    ],
)
def test_plot_bad_input_gets_one_line(watched, tmp_path, case, message):
    (tmp_path / "empty").mkdir()
    folder = {"missing": tmp_path / "nothing", "empty": tmp_path / "empty"}
    folder["no-knn"] = watched / "mae"
    r = run_cli("plot", folder[case], "--out", tmp_path / "x.png")
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow  # 40 s: pre-training, knn and the probe of a fork and of its base
def test_a_fork_and_its_base_compared_from_another_folder(tmp_path):
    """The README's comparison recipe, scaled down: a fork in another folder and MAE, one seed
    each, by experiments/learning.sh run from that folder; the runs are named as knn finds them,
    and table and plot put them side by side."""
    elsewhere = tmp_path / "my project"
    elsewhere.mkdir()
    source = (ROOT / "mae.py").read_text().replace("class MAE(", "class MyBlock(")
    (elsewhere / "my_block.py").write_text(source)
    env = {**os.environ, "FINETUNE": "0", "SEEDS": "0", "OMP_NUM_THREADS": "1"}
    env["PRETRAIN_ARGS"] = "--preset tiny --knn-every 1 --max-steps 8"
    script = str(ROOT / "experiments" / "learning.sh")
    for method in ("my_block.py", "mae"):
        r = subprocess.run(
            ["bash", script, method, "runs"], cwd=elsewhere, env=env, capture_output=True, text=True
        )
        assert r.returncode == 0, r.stderr[-3000:]
    runs = elsewhere / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["mae-patterns-s0", "my_block-patterns-s0"]
    with ForkedCli(cwd=elsewhere) as cli:
        ok(cli.run("knn", "runs/my_block-patterns-s0", "--out", "knn-again"))
        table = ok(cli.run("table", "runs/my_block-patterns-s0", "runs/mae-patterns-s0")).stdout
        assert "| my_block |" in table and "| mae |" in table and "held-out loss" in table
        assert "n=1" in table
        ok(cli.run("plot", *sorted(map(str, runs.iterdir())), "--out", "compare.png"))
    assert (elsewhere / "compare.png").is_file()


@pytest.mark.parametrize(
    "args, message",
    [
        (("pretrain", "mae", "--mask-ration", 0.5), "did you mean --mask-ratio?"),
        (("pretrain", "pr-mim", "--throww", 0.5), "did you mean --throw?"),
        (("pretrain", "mea"), "did you mean mae"),
        (("knn", "{runs}/mea"), "did you mean {runs}/mae?"),
        (("knn", "{runs}/crashed"), "its run stopped before its first checkpoint"),
        (("pretrain", "mae", "--out", "{runs}/crashed", "--resume"), "without --resume"),
    ],
)
def test_mistakes_get_the_nearest_names(tmp_path, args, message):
    runs = tmp_path / "runs"
    ok(run_cli("pretrain", "mae", "--preset", "tiny", "--max-steps", 1, "--out", runs / "mae"))
    (runs / "crashed").mkdir()
    (runs / "crashed" / "log.jsonl").write_text("")
    args = [str(a).replace("{runs}", str(runs)) for a in args]
    r = run_cli(*args)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert message.replace("{runs}", str(runs)) in lines[0], lines[0]


def test_a_method_file_beside_the_name_is_suggested(tmp_path):
    shutil.copy(ROOT / "mae.py", tmp_path / "my_block.py")
    with ForkedCli(cwd=tmp_path) as cli:
        r = cli.run("pretrain", "my_block")
    assert r.returncode == 2 and "did you mean my_block.py?" in r.stderr, r.stderr


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_the_same_command(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "log.jsonl").write_text('{"step": 0, "epoch": 0, "val_loss": 1.0}\n')
    r = ok(run_cli("pretrain", "mae", "--preset", "tiny", "--max-steps", 2, "--out", out))
    assert "done" in r.stdout and max(row["step"] for row in rows(out)) == 2
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 2
    # a run with a checkpoint still blocks it: --resume, --overwrite or another --out
    r = run_cli("pretrain", "mae", "--preset", "tiny", "--max-steps", 2, "--out", out)
    assert r.returncode == 2 and "already holds a run" in r.stderr
