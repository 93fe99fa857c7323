"""Forking a method in one step: an edited copy of mae.py anywhere trains with `python my_idea.py`
or `python cli.py pretrain path/to/my_idea.py`, its new Config field an option, and every evaluation
command works on its run from another folder after the file is gone: the model is rebuilt from the
code in the checkpoint."""

import json
import pickle
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT, ForkedCli

import common
import data_sets

KNOB = "    my_knob: float = 0.5  # my idea's knob: scales the loss\n"
TINY = ("--preset", "tiny", "--max-steps", 2)


def make_fork(folder):
    """mae.py copied to folder/my_idea.py, with a new Config field that the loss uses and the model
    class renamed."""
    source = (ROOT / "mae.py").read_text()
    anchor = "    drop_path: float = 0.0"
    assert source.count(anchor) == 1 and source.count("class MAE(nn.Module):") == 1
    source = source.replace(anchor, KNOB + anchor).replace(
        "class MAE(nn.Module):", "class MyIdea(nn.Module):"
    )
    loss = "return (loss * mask).sum() / mask.sum()"
    assert source.count(loss) == 1
    source = source.replace(loss, "return self.cfg.my_knob * (loss * mask).sum() / mask.sum()")
    (folder / "my_idea.py").write_text(source)
    return source


@pytest.fixture(scope="module")
def fork_run(tmp_path_factory):
    """(folder, run folder, the fork's source): `python my_idea.py ...` in the fork's folder, then
    the file moved away and a decoy my_idea.py put in its place (importing it fails): only the
    checkpoint's code rebuilds the model."""
    folder = tmp_path_factory.mktemp("fork")
    source = make_fork(folder)
    args = [
        sys.executable,
        "my_idea.py",
        *map(str, TINY),
        "--my-knob",
        "0.3",
        "--num-workers",
        "1",
        "--out",
        "run",
    ]
    r = subprocess.run(args, cwd=folder, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    (folder / "my_idea.py").rename(folder / "my_idea_moved.py.txt")
    (folder / "my_idea.py").write_text("raise SystemExit('the decoy my_idea.py was imported')\n")
    return folder, folder / "run", source


def assert_fork_checkpoint(run, source):
    ckpt = common.load_checkpoint(run)
    assert ckpt["method"] == "my_idea" and ckpt["step"] == 2
    # the option, and the preset
    assert ckpt["config"]["my_knob"] == 0.3 and ckpt["config"]["embed_dim"] == 64
    assert ckpt["code"]["my_idea.py"] == source and "def train(" in ckpt["code"]["common.py"]


def test_python_my_idea_trains_the_fork_itself(fork_run):
    folder, run, source = fork_run
    assert_fork_checkpoint(run, source)
    losses = [
        row["loss"]
        for row in map(json.loads, (run / "log.jsonl").read_text().splitlines())
        if "loss" in row
    ]
    assert len(losses) == 2


def test_cli_pretrain_takes_the_path_of_a_method_file(tmp_path):
    source = make_fork(tmp_path)
    with ForkedCli() as cli:  # in the project root, the file given by its path elsewhere
        r = cli.run(
            "pretrain", tmp_path / "my_idea.py", *TINY, "--my-knob", 0.3, "--out", tmp_path / "run"
        )
        assert r.returncode == 0, r.stdout + r.stderr
        assert_fork_checkpoint(tmp_path / "run", source)
        r = cli.run("pretrain", tmp_path / "my_idea.py", "--help")
    assert r.returncode == 0, r.stderr
    line = next(line for line in r.stdout.splitlines() if "--my-knob" in line)
    assert "my idea's knob: scales the loss" in line and "[default: 0.5]" in line
    assert "Config (my_idea.py)" in r.stdout
    assert "--norm-pix-loss" in r.stdout
    assert "--max-steps" in r.stdout


def test_every_evaluation_command_runs_on_a_fork_from_its_checkpoint(fork_run):
    """From the fork's folder (another working directory than the project's), cli.py given by its
    full path; the fork's file is gone and a decoy that fails on import has its name: the code comes
    from the checkpoint."""
    folder, run, source = fork_run
    knn = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "knn", "run", "--num-workers", "1"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert knn.returncode == 0, knn.stdout + knn.stderr
    result = json.loads((run / "eval" / "knn-patterns-s0" / "result.json").read_text())
    assert result["method"] == "my_idea" and 0 <= result["metrics"]["top1"] <= 1
    assert (
        run / "eval" / "knn-patterns-s0" / "code" / "pretrain" / "my_idea.py"
    ).read_text() == source
    commands = {
        "linprobe": ("--epochs", 2, "--warmup-epochs", 0, "--num-workers", 0),
        "finetune": ("--epochs", 1, "--num-workers", 0),
        "visualize": ("--num-images", 2),
        "export": (),
        "separability": ("--images", 16, "--batch-size", 16),
    }
    with ForkedCli(cwd=folder) as cli:
        outcomes = {command: cli.run(command, "run", *args) for command, args in commands.items()}
    for command, r in outcomes.items():
        assert r.returncode == 0, (command, r.stdout + r.stderr)
        assert "decoy" not in r.stdout + r.stderr
    for command in ("linprobe", "finetune"):
        assert (
            json.loads((run / "eval" / f"{command}-patterns-s0" / "result.json").read_text())[
                "method"
            ]
            == "my_idea"
        )
    assert (run / "reconstructions-patterns-val-s0.png").stat().st_size > 0
    assert (run / "encoder_timm.pth").stat().st_size > 0
    assert "the my_idea encoder" in outcomes["export"].stdout
    assert "my_idea trained" in outcomes["separability"].stdout


def test_a_fork_loaded_from_a_checkpoint_pickles_for_data_workers(fork_run):
    """A fork's bound sample_inputs pickles by its module's name (as anything handed to a spawned
    process must), and draws the batch's inputs."""
    import cli

    _, run, _ = fork_run
    module, model_cls = cli.method_of("my_idea", common.load_checkpoint(run))
    assert model_cls.__name__ == "MyIdea" and sys.modules["my_idea"] is module
    draw = pickle.loads(
        pickle.dumps(cli.bound_inputs(module, module.Config(img_size=32, patch_size=8)))
    )
    keys = data_sets.sample_keys(0, 0, common.torch.arange(2))
    assert draw.func is module.sample_inputs
    assert draw(data_sets.Draws(keys)).keys() == {"noise"}


def test_bad_method_files_get_one_line_errors(tmp_path):
    config_only = "import dataclasses\n\n\n@dataclasses.dataclass\nclass Config:\n    x: int = 0\n"
    (tmp_path / "no_model.py").write_text(config_only)
    # a name already taken by a module cli.py imports
    shutil.copy(ROOT / "mae.py", tmp_path / "json.py")
    (tmp_path / "broken.py").write_text("def f(:\n")
    cases = {
        "no_model.py": "needs a dataclass Config and one model class with forward_features",
        "json.py": "the name 'json' is taken",
        "missing.py": "unknown method",
        "broken.py": "invalid syntax (broken.py, line 1)",
    }
    with ForkedCli() as cli:
        outcomes = {
            name: cli.run("pretrain", tmp_path / name, "--preset", "tiny") for name in cases
        }
    for name, message in cases.items():
        r = outcomes[name]
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and lines and message in lines[-1], (name, r.stderr)
        assert "Traceback" not in r.stderr
