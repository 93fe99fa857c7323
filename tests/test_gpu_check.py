"""experiments/gpu_check.py, its dry run on the CPU: a complete report (every section, the JSON,
the GPU rows not measured), a deadline that skips sections and still exits 0, and a killed check
whose report is readable up to the kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

from experiments import gpu_check

TITLES = [title for title, *_ in gpu_check.SECTIONS]
NO_GPU = "not measured: " + ("dry run" if torch.cuda.is_available() else "no GPU")


def dry_run(out, *args, timeout=300):
    command = [sys.executable, "experiments/gpu_check.py", "--dry-run", "--out", out, *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def read_report(out):
    """(gpu_check.md's text, gpu_check.json's sections by title, the JSON)."""
    text = (out / "gpu_check.md").read_text()
    data = json.loads((out / "gpu_check.json").read_text())
    return text, {s["title"]: s for s in data["sections"]}, data


def test_gpu_check_compares_every_step_of_the_losses():
    reference = {1: 2.0, 2: 1.5}
    compare = gpu_check.compare
    assert compare(reference, {1: 2.02, 2: 1.51}, 2e-2) == (pytest.approx(0.01), True)
    assert not compare(reference, {1: 2.0, 2: 1.6}, 2e-2)[1]
    assert not compare(reference, {1: 2.0}, 2e-2)[1]
    assert not compare({}, {}, 2e-2)[1]  # no loss at all is a failure, not a pass


@pytest.mark.slow
def test_dry_run_writes_a_complete_report_with_the_gpu_rows_not_measured(tmp_path):
    tick = time.monotonic()
    r = dry_run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - tick < 120  # about a minute on 2 busy cores
    text, sections, data = read_report(tmp_path)
    assert [f"## {i}. {title}" in text for i, title in enumerate(TITLES, 1)] == [True] * 10
    assert list(sections) == TITLES
    assert data["verdict"].startswith("verdict: OK") and data["verdict"] in text
    assert "FAILED" not in text and "not measured: deadline" not in text
    assert all(s["status"] != "failed" for s in sections.values())
    # what a CPU measures is measured...
    one_step = sections["One step of every method"]["figures"]
    assert set(one_step) == {"mae", "simmim", "pr-mim", "i-mae", "revcolv2"}
    assert all(isinstance(loss, float) for loss in one_step.values())
    jpegs = sections["JPEG folder decoding"]["figures"]
    assert jpegs["decoded in workers"]["images_per_s"] > 0
    assert "top 10 CPU ops" in text and "| 10 | `" in text
    # ...and what only a GPU measures is marked
    gpu_rows = [
        ("Environment", "attention kernel, GPU bf16"),
        ("CPU against GPU losses", "GPU bf16 autocast"),
        ("RevColV2 memory, reversible over plain", "peak GPU memory, reversible / plain"),
        ("JPEG folder decoding", "decoded on the GPU"),
        ("Top kernels of a profiled compiled step", "top CUDA kernels"),
    ]
    for title, label in gpu_rows:
        assert sections[title]["figures"][label] == NO_GPU, (title, label)
    assert sections["MAE ViT-B/16 images/s, compiled"]["status"] == NO_GPU
    assert f"- {gpu_rows[0][1]}: {NO_GPU}" in text


def test_a_deadline_too_short_skips_sections_and_still_exits_0(tmp_path):
    tick = time.monotonic()
    r = dry_run(tmp_path, "--deadline", "12")
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - tick < 30
    text, sections, data = read_report(tmp_path)
    assert list(sections) == TITLES
    assert all(f"## {i}. {title}" in text for i, title in enumerate(TITLES, 1))
    assert "torch" in sections["Environment"]["figures"]
    skipped = [t for t, s in sections.items() if s["status"].startswith("not measured: deadline")]
    assert "One step of every method" in skipped and len(skipped) >= 5
    assert "- the section: not measured: deadline (" in text
    assert data["verdict"].startswith("verdict: OK") and data["verdict"] in text


def test_a_killed_check_leaves_the_figures_it_measured(tmp_path):
    command = [sys.executable, "experiments/gpu_check.py", "--dry-run", "--out", tmp_path]
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # its work folder, which a kill leaves behind
    # a process group of its own, so that the kill takes the commands it runs too
    check = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, **quiet)
    report = tmp_path / "gpu_check.md"
    try:
        tick = time.monotonic()
        while "## 2. " not in (report.read_text() if report.exists() else ""):
            assert check.poll() is None and time.monotonic() - tick < 120
            time.sleep(0.2)
    finally:
        os.killpg(check.pid, signal.SIGKILL)
        check.wait()
    text, sections, data = read_report(tmp_path)
    assert "## 1. Environment" in text and f"- torch: {torch.__version__}" in text
    assert sections["Environment"]["figures"]["torch"] == torch.__version__
    assert "verdict" not in data and "verdict" not in text


def test_the_deadline_stops_a_command_and_in_process_work(tmp_path):
    report = gpu_check.Report(tmp_path, {})
    report.start(1, "a section")
    check = gpu_check.Check(report, gpu_check.DRY, "no GPU", 480, tmp_path / "work")
    check.end = time.monotonic() + 2
    run = ["pretrain", "mae", "--preset", "tiny", "--out", tmp_path / "run", "--device", "cpu"]
    command = check.launch(run, estimate=0)
    check.attempt("a command", lambda: check.wait(command, estimate=0))
    assert command.process.returncode is not None  # killed, not left running
    check.end = time.monotonic() + 0.5

    def spin():
        with check.in_time(estimate=0):
            while True:
                pass

    check.attempt("in-process work", spin)
    with pytest.raises(gpu_check.OutOfTime, match="about 5 s needed"):
        check.launch(run, estimate=5)
    report.end(1.0)
    figures = json.loads((tmp_path / "gpu_check.json").read_text())["sections"][0]["figures"]
    assert figures["a command"].startswith("not measured: deadline (stopped after 2 s)")
    assert figures["in-process work"] == "not measured: deadline (stopped after 0 s)"
