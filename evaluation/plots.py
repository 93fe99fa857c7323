"""Runs side by side in one picture (`python cli.py plot RUN [RUN ...] --out FILE.png`): the
training loss, the held-out loss and the kNN top-1 of each pre-training run, read from its
log.jsonl, on shared axes; each run labelled by its method and folder, its kNN before training
(the random-init floor) a dashed line of its colour."""

import json
from dataclasses import dataclass
from pathlib import Path

PANELS = (
    ("loss", "training loss"),
    ("val_loss", "held-out loss (each method's own masks)"),
    ("knn_top1", "kNN top-1 (%), dashed: random init"),
)


@dataclass
class PlotConfig:
    out: str = "runs.png"  # the picture to write (PNG)


def read_run(folder):
    """{"label", "method", "rows"} of a run folder: its log.jsonl's rows; a ValueError naming what
    is missing if it is not a pre-training run."""
    folder = Path(folder)
    log = folder / "log.jsonl"
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: pass pre-training run folders (runs/NAME)")
    if not log.is_file():
        raise ValueError(f"{folder} holds no log.jsonl: it is not a pre-training run folder")
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    if not any("loss" in row for row in rows):
        raise ValueError(f"{log} has no training step yet: nothing to plot")
    config = folder / "config.json"
    method = json.loads(config.read_text()).get("method", "?") if config.is_file() else "?"
    return {"label": f"{method} ({folder.name})", "method": method, "rows": rows}


def curve(rows, key):
    """(epochs, values) of the log rows that hold `key` (kNN in %)."""
    points = [(row["epoch"], row[key]) for row in rows if key in row]
    scale = 100 if key == "knn_top1" else 1
    return [e for e, _ in points], [v * scale for _, v in points]


def plot(folders, out):
    """Write the picture of the runs in `folders` to `out` and return its matplotlib Figure."""
    from matplotlib.figure import Figure

    runs = [read_run(folder) for folder in folders]
    if not any(curve(run["rows"], "knn_top1")[0] for run in runs):
        raise ValueError(
            "these runs logged no kNN: pre-train with --knn-every N (the cpu preset does)"
        )
    figure = Figure(figsize=(15, 4.5), layout="constrained")
    axes = figure.subplots(1, len(PANELS), sharex=True)
    colours = [f"C{k % 10}" for k in range(len(runs))]
    for ax, (key, title) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        for run, colour in zip(runs, colours):
            epochs, values = curve(run["rows"], key)
            if not epochs:
                continue
            ax.plot(epochs, values, color=colour, label=run["label"])
            if key == "knn_top1" and epochs[0] == 0:  # before training: the random-init floor
                ax.axhline(values[0], color=colour, linestyle="--", linewidth=1)
    axes[0].legend(fontsize="small")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return figure
