"""Bad input to every CLI command: a non-zero exit (2 for usage errors), one last line on stderr
that names the problem, no traceback, and nothing already on disk changed.

Each case is one command in a process of its own, run by conftest.ForkedCli (cli.main(ARGS), what
`python cli.py ARGS` runs, forked from a process that imported cli.py once, so the ~50 cases do not
pay the import of torch ~50 times), in a folder of its own holding copies of the prepared files it
names, hashed before and after."""

import hashlib
import shutil

import pytest
import torch
from conftest import ForkedCli, run_cli

PRETRAIN = ("pretrain", "mae", "--preset", "tiny", "--out", "{new}")
# (id, arguments, words of the last stderr line, exit code); {name}: a prepared file, see `prepared`
CASES = [
    (
        "unknown-command",
        ("no-such-command",),
        "No such command 'no-such-command'. (see `cli.py --help`)",
        2,
    ),
    # pretrain
    ("unknown-method", ("pretrain", "no-such-method"), "unknown method 'no-such-method'", 2),
    ("not-a-number", (*PRETRAIN, "--epochs", "many"), "Invalid value for '--epochs'", 2),
    (
        "unknown-option",
        (*PRETRAIN, "--no-such-option", 1),
        "no such option --no-such-option (see `python cli",
        2,
    ),
    ("option-without-value", (*PRETRAIN, "--epochs"), "--epochs needs a value", 2),
    (
        "flag-with-a-value",
        (*PRETRAIN, "--compile=yes"),
        "--compile is a flag: pass --compile or --no-compile",
        2,
    ),
    (
        "stray-argument",
        (*PRETRAIN, "simmim"),
        "pretrain takes one method then options, got 'simmim'",
        2,
    ),
    ("unknown-preset", (*PRETRAIN, "--preset", "huge"), "unknown preset 'huge'", 2),
    (
        "mask-ratio-above-1",
        (*PRETRAIN, "--mask-ratio", 1.5),
        "--mask-ratio must be in (0, 1), got 1.5",
        2,
    ),
    ("mask-ratio-0", (*PRETRAIN, "--mask-ratio", 0), "--mask-ratio must be in (0, 1), got 0", 2),
    (
        "throw-above-mask-ratio",
        ("pretrain", "pr-mim", "--preset", "tiny", "--throw", 0.8, "--out", "{new}"),
        "--throw must be in [0, 0.75]",
        2,
    ),
    (
        "img-not-multiple-of-patch",
        (*PRETRAIN, "--img-size", 30),
        "--img-size 30 is not a multiple of --patch-size 8",
        2,
    ),
    (
        "width-not-divisible-by-heads",
        (*PRETRAIN, "--num-heads", 3),
        "--embed-dim 64 is not divisible by 3 heads",
        2,
    ),
    (
        "zero-patch-size",
        ("pretrain", "simmim", "--preset", "tiny", "--patch-size", 0, "--out", "{new}"),
        "--patch-size must be at least 1, got 0",
        2,
    ),
    ("negative-depth", (*PRETRAIN, "--depth", -1), "--depth must not be negative, got -1", 2),
    ("unknown-device", (*PRETRAIN, "--device", "tpu0"), "unknown --device 'tpu0'", 2),
    ("unknown-data", (*PRETRAIN, "--data", "mnist"), "unknown data set 'mnist'", 2),
    (
        "missing-data-folder",
        (*PRETRAIN, "--data", "folder", "--data-dir", "{missing}"),
        "does not exist",
        2,
    ),
    (
        "empty-data-folder",
        (*PRETRAIN, "--data", "folder", "--data-dir", "{empty}"),
        "no images in class folders",
        2,
    ),
    (
        "grey-data-colour-model",
        (*PRETRAIN, "--data", "fashion-mnist", "--in-chans", 3),
        "--in-chans 3 does not match fashion-mnist, which has 1 channel(s)",
        2,
    ),
    (
        "colour-data-grey-model",
        (*PRETRAIN, "--data", "cifar10", "--in-chans", 1),
        "--in-chans 1 does not match cifar10",
        2,
    ),
    ("zero-epochs", (*PRETRAIN, "--epochs", 0), "--epochs must be at least 1, got 0", 2),
    ("negative-epochs", (*PRETRAIN, "--epochs", -3), "--epochs must be at least 1, got -3", 2),
    (
        "zero-batch-size",
        (*PRETRAIN, "--batch-size", 0),
        "--batch-size must be at least 1, got 0",
        2,
    ),
    (
        "fewer-images-than-a-batch",
        (*PRETRAIN, "--train-size", 8),
        "8 training images are fewer than one step needs",
        1,
    ),
    (
        "out-holds-a-run",
        ("pretrain", "mae", "--preset", "tiny", "--out", "{run}"),
        "already holds a run",
        2,
    ),
    (
        "out-is-a-file",
        ("pretrain", "mae", "--preset", "tiny", "--out", "{text}"),
        "is a file, not a run folder",
        2,
    ),
    ("resume-without-out", ("pretrain", "mae", "--resume"), "--resume needs --out", 2),
    (
        "resume-changes-a-setting",
        ("pretrain", "mae", "--out", "{run}", "--resume", "--mask-ratio", 0.5),
        "drop --mask-ratio",
        2,
    ),
    (
        "resume-truncated-checkpoint",
        ("pretrain", "mae", "--out", "{truncated_run}", "--resume"),
        "is not a readable checkpoint, truncated or corrupt",
        2,
    ),
    # the commands that read a checkpoint
    *[
        (f"{command}-{what}", (command, path), message, 2)
        for command in ("knn", "linprobe", "finetune", "visualize", "separability", "export")
        for what, path, message in [
            ("missing", "{missing}", "no checkpoint at"),
            ("truncated", "{truncated}", "truncated or corrupt"),
            ("not-a-checkpoint", "{text}", "is not a checkpoint"),
        ]
    ],
    ("knn-two-runs", ("knn", "{run}", "{run}"), "knn takes one run or checkpoint, got 2", 2),
    ("knn-k-0", ("knn", "{run}", "--k", 0), "--k and --batch-size must be at least 1", 2),
    (
        "knn-grey-data-colour-model",
        ("knn", "{run}", "--data", "fashion-mnist"),
        "fashion-mnist has 1 channel(s) but the model takes 3",
        2,
    ),
    (
        "linprobe-negative-epochs",
        ("linprobe", "{run}", "--epochs", -1),
        "--epochs must be at least 1, got -1",
        2,
    ),
    ("knn-out-is-a-file", ("knn", "{run}", "--out", "{text}"), "is a file, not a result folder", 2),
    (
        "knn-negative-workers",
        ("knn", "{run}", "--num-workers", -1),
        "--num-workers must not be negative",
        2,
    ),
    (
        "finetune-zero-epochs",
        ("finetune", "{run}", "--epochs", 0),
        "--epochs must be at least 1, got 0",
        2,
    ),
    (
        "finetune-min-crop-0",
        ("finetune", "{run}", "--min-crop", 0),
        "--min-crop must be in (0, 1] (a fraction",
        2,
    ),
    (
        "finetune-batch-above-the-data",
        ("finetune", "{run}", "--batch-size", 4096, "--num-workers", 0),
        "256 training images are fewer than one step needs (4096)",
        2,
    ),
    (
        "visualize-zero-images",
        ("visualize", "{run}", "--num-images", 0),
        "--num-images must be at least 1",
        2,
    ),
    (
        "separability-zero-images",
        ("separability", "{run}", "--images", 0),
        "--images at least 4",
        2,
    ),
    (
        "separability-alphas-not-numbers",
        ("separability", "{run}", "--alphas", "a,b"),
        "--alphas must be numbers",
        2,
    ),
    (
        "export-out-exists",
        ("export", "{run}", "--out", "{text}"),
        "already exists: pass --overwrite",
        2,
    ),
    # bench
    (
        "bench-unknown-compare",
        ("bench", "mae", "--preset", "tiny", "--compare", "beit"),
        "unknown --compare 'beit'",
        2,
    ),
    (
        "bench-zero-batch-size",
        ("bench", "mae", "--preset", "tiny", "--batch-size", 0),
        "--batch-size",
        2,
    ),
    (
        "bench-unknown-data",
        ("bench", "mae", "--preset", "tiny", "--data", "mnist"),
        "unknown data set 'mnist'",
        2,
    ),
    (
        "bench-missing-data-folder",
        ("bench", "mae", "--preset", "tiny", "--data", "folder", "--data-dir", "{missing}"),
        "does not exist",
        2,
    ),
    (
        "bench-zero-batches",
        ("bench", "mae", "--preset", "tiny", "--data", "patterns", "--batches", 0),
        "--batches must be at least 1",
        2,
    ),
]
# copied into a case's folder when it names them
PREPARED = ("run", "truncated_run", "truncated", "text", "empty")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """run: a two-step tiny MAE run; truncated_run: the same with its checkpoint cut in half (as by
    a full disk); truncated: that checkpoint alone; text: a text file; empty: a data folder with
    empty train/, val/."""
    root = tmp_path_factory.mktemp("prepared")
    r = run_cli("pretrain", "mae", "--preset", "tiny", "--max-steps", 2, "--out", root / "run")
    assert r.returncode == 0, r.stdout + r.stderr
    shutil.copytree(root / "run", root / "truncated_run")
    ckpt = root / "truncated_run" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    shutil.copy(ckpt, root / "truncated")
    (root / "text").write_text("a note, not a checkpoint\n")
    for split in ("train", "val"):
        (root / "empty" / split).mkdir(parents=True)
    return root


def snapshot(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "folder"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def outcomes(request, prepared, tmp_path_factory):
    """{case id: (CompletedProcess, files before, files after)} for the cases selected in this
    session."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if item.path == request.path and hasattr(item, "callspec")
    }
    jobs = {}
    for case_id, args, _, _ in CASES:
        if case_id not in selected:
            continue
        folder = tmp_path_factory.mktemp(case_id)
        paths = {name: folder / name for name in (*PREPARED, "missing", "new")}
        for name in PREPARED:
            if any(f"{{{name}}}" in str(a) for a in args):
                copy = shutil.copytree if (prepared / name).is_dir() else shutil.copy
                copy(prepared / name, paths[name])
        jobs[case_id] = (folder, [str(a).format(**paths) for a in args], snapshot(folder))
    with ForkedCli() as cli:
        runs = {case_id: cli.run(*args) for case_id, (_, args, _) in jobs.items()}
    return {
        case_id: (runs[case_id], before, snapshot(folder))
        for case_id, (folder, _, before) in jobs.items()
    }


@pytest.mark.parametrize("case_id, args, message, code", CASES, ids=[case[0] for case in CASES])
def test_bad_input(outcomes, case_id, args, message, code):
    r, before, after = outcomes[case_id]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == code, r.stdout + r.stderr
    assert lines and message in lines[-1], r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert after == before  # nothing written, changed or removed


def test_table_command_gives_one_line_errors(tmp_path):
    """`cli.py table`, the tool behind the README's table: bad folders exit 2 with one line."""
    (tmp_path / "empty").mkdir()
    for folder, message in (("empty", "no result.json under"), ("missing", "does not exist")):
        r = run_cli("table", tmp_path / folder)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert r.returncode == 2 and lines and message in lines[-1], r.stderr
        assert "Traceback" not in r.stdout + r.stderr


def test_load_checkpoint_names_what_is_wrong(tmp_path):
    import common

    torch.save([1, 2, 3], tmp_path / "list.pt")  # a torch file, but no state dict in it
    with pytest.raises(ValueError, match="no 'model' state dict"):
        common.load_checkpoint(tmp_path / "list.pt")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(ValueError, match="is not a checkpoint"):
        common.load_checkpoint(tmp_path / "notes.pt")
    with pytest.raises(ValueError, match="no checkpoint at"):
        common.load_checkpoint(tmp_path / "missing.pt")
