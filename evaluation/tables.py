"""Runs side by side in one compact table (`python cli.py table RUN [RUN ...]`): a row per method
(and one for the raw pixels), a column per data set and evaluation, each cell the top-1 of the
trained encoders beside the mean of their random-init floor, with the seeds behind each; and the
held-out reconstruction loss of the runs. Built from the result folders that knn, linprobe and
finetune write into a run's eval/ (docs/evaluation.md); no number is typed by hand."""

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

BEGIN = "<!-- results table: begin (built by `python cli.py table`; do not edit) -->"
END = "<!-- results table: end -->"
EVALUATIONS = {"knn": "kNN", "linprobe": "linear", "finetune": "fine-tune"}
PIXELS = "raw pixels"


@dataclass
class TableConfig:
    readme: str = ""  # also write the table into this file, between its results markers


def collect(paths):
    """Every result.json under `paths` (run folders, or any folders holding result folders)."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path} does not exist: pass run folders (e.g. runs/NAME)")
        for f in [path] if path.is_file() else sorted(path.rglob("result.json")):
            try:
                found.append(json.loads(f.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(
                    f"{f} is not valid JSON: delete it or re-run its evaluation"
                ) from None
    if not found:
        where = ", ".join(map(str, paths))
        raise ValueError(f"no result.json under {where}: run knn / linprobe / finetune on the runs")
    return found


def held_out_loss(run):
    """The last held-out loss in a pre-training run's log.jsonl; None if it has none."""
    log = Path(run) / "log.jsonl"
    if not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.endswith("}")]
    losses = [row["val_loss"] for row in rows if "val_loss" in row]
    return losses[-1] if losses else None


def mean_std(values, digits=1):
    """'m ± s' of several values, 'm' of one, '–' of none."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def cell(trained, floor):
    """A table cell: the trained runs' mean ± std (the floor's mean) and the seeds behind each."""
    if not trained and not floor:
        return ""
    text = mean_std([t for _, t in trained])
    n_trained = len({seed for seed, _ in trained})
    n_floor = len({seed for seed, _ in floor})
    if not floor:
        return f"{text} n={n_trained}"
    if n_trained == n_floor:
        return f"{text} ({mean_std([t for _, t in floor])}) n={n_trained}"
    return f"{text} n={n_trained} ({mean_std([t for _, t in floor])} n={n_floor})"


def order(method, first):
    """Rows: the built-in methods in `first`'s order, then forks by name, the raw pixels last."""
    if method == PIXELS:
        return (2, 0, method)
    if method in first:
        return (0, first.index(method), method)
    return (1, 0, method)


def table(results, first=()):
    """The markdown table and its caption. `first`: the method names to list first, in order."""
    cells = {}  # (method, data, command) -> {"trained": [(seed, top-1)], "floor": [...]}
    losses = {}  # (method, data) -> {run: held-out loss}
    settings = {}  # command -> its settings, what every row shares
    pretraining = set()
    machines = set()
    for r in results:
        kind = "floor" if r["random_init"] else "trained"
        group = cells.setdefault(
            (r["method"], r["data"], r["command"]), {"trained": [], "floor": []}
        )
        group[kind].append((r["seed"], 100 * r["metrics"]["top1"]))
        labelled = r["metrics"].get("train_images")
        settings.setdefault(r["command"], set()).add(f"{r['settings']} on {labelled:,} images")
        machines.add(r["machine"])
        if kind == "trained" and r["method"] != PIXELS:
            pretraining.add(r["pretraining"])
            losses.setdefault((r["method"], r["data"]), {})[r["source"]] = held_out_loss(
                r["source"]
            )
    datas = sorted({data for _, data, _ in cells}, key=lambda d: (d != "patterns", d))
    columns = []
    for data in datas:
        columns += [(data, c) for c in EVALUATIONS if any(k[1:] == (data, c) for k in cells)]
        if any(k[1] == data for k in losses):
            columns.append((data, "loss"))
    methods = sorted({m for m, _, _ in cells}, key=lambda m: order(m, list(first)))
    header = ["method"]
    header += [f"{d} {EVALUATIONS.get(c, 'held-out loss')}" for d, c in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in methods:
        row = [method]
        for data, command in columns:
            if command == "loss":
                values = [v for v in losses.get((method, data), {}).values() if v is not None]
                row.append(f"{mean_std(values, 3)} n={len(values)}" if values else "")
            else:
                group = cells.get((method, data, command), {"trained": [], "floor": []})
                row.append(cell(group["trained"], group["floor"]))
        lines.append("| " + " | ".join(row) + " |")
    return caption(settings, pretraining, machines) + "\n\n" + "\n".join(lines)


def caption(settings, pretraining, machines):
    """What every row shares, said once above the table."""
    evaluations = "; ".join("; ".join(sorted(settings[c])) for c in EVALUATIONS if c in settings)
    return (
        "Top-1 % of the trained encoders, mean ± std over n seeds, (the mean of a random-init "
        f"encoder of the same architecture); {evaluations}. Pre-training: "
        f"{'; '.join(sorted(pretraining)) or '–'}. Held-out loss: the reconstruction loss of the "
        "pre-training runs on held-out images, under each method's own masks and target, so it "
        "compares runs of one method (a fork with its base only if they share masks and target). "
        f"Machine: {'; '.join(sorted(machines))}."
    )


def update_readme(path, text):
    """Replace what stands between the results markers of `path` with `text`."""
    path = Path(path)
    readme = path.read_text()
    if BEGIN not in readme or END not in readme:
        raise ValueError(f"{path} has no results markers: add the lines {BEGIN} and {END}")
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
