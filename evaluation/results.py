"""The README's results table, rebuilt from result folders, so no number in it is typed by hand.

    python cli.py results runs/results                      # print the table
    python cli.py results runs/results --readme README.md   # put it in README.md, between the markers

Every `knn`, `linprobe` and `finetune` run writes a result folder with result.json (the numbers, the
method, the data, the seed, the pre-training budget, wall times, the machine), config.json, code/ and
the git hash. One row of the table is one (method, data, encoder, pre-training, evaluation) over all
the seeds found: mean ± standard deviation of the top-1 accuracy, beside the same evaluation of
random-init encoders of that architecture (the floor). Rows already in the README that the given
folders do not rebuild are kept (so methods can be added one at a time); --fresh drops them.
"""
import json
import statistics
from pathlib import Path

BEGIN = "<!-- results table: begin (built by `python cli.py results DIRS --readme README.md`; do not edit) -->"
END = "<!-- results table: end -->"
HEADER = ("| method | data | encoder | pre-training | evaluation | top-1 (%) | random init (%) | seeds "
          "| pre-train time | eval time | machine |\n|---|---|---|---|---|---|---|---|---|---|---|")
KEY_COLUMNS = 5  # method, data, encoder, pre-training, evaluation
COMMAND_ORDER = {"knn": 0, "linprobe": 1, "finetune": 2}


def collect(paths):
    """Every result.json under `paths` (folders are searched recursively)."""
    found = []
    for path in map(Path, paths):
        if not path.exists():
            raise ValueError(f"{path} does not exist: pass folders that hold result folders (e.g. runs/)")
        for f in [path] if path.is_file() else sorted(path.rglob("result.json")):
            try:
                found.append(json.loads(f.read_text()))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{f} is not valid JSON: delete it or re-run the evaluation that wrote it") from None
    if not found:
        raise ValueError(f"no result.json under {', '.join(map(str, paths))}: run knn / linprobe / finetune first")
    return found


def mean_std(values, scale=100.0):
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def minutes(seconds):
    seconds = [s for s in seconds if s]
    return f"{statistics.mean(seconds) / 60:.1f} min" if seconds else "–"


def table_rows(results):
    """{key: markdown row} for the given results, key = the first KEY_COLUMNS cells."""
    trained, floor = {}, {}
    for r in results:
        arch = (r["method"], r["data"], r["encoder"])
        if r["random_init"]:
            floor.setdefault((*arch, r["settings"]), []).append(r)
        else:
            trained.setdefault((*arch, r["pretraining"], r["settings"]), []).append(r)
    for key, group in floor.items():  # a floor without a trained row still gets a row
        if not any(k[:3] == key[:3] and k[4] == key[3] for k in trained):
            trained[(*key[:3], "–", key[3])] = []
    rows = {}
    for key, group in trained.items():
        base = floor.get((*key[:3], key[4]), [])
        seeds = sorted({r["seed"] for r in group or base})
        cells = [*key, mean_std([r["metrics"]["top1"] for r in group]) if group else "–",
                 mean_std([r["metrics"]["top1"] for r in base]) if base else "–",
                 f"{len(seeds)} ({', '.join(map(str, seeds))})", minutes([r.get("pretrain_wall_s") for r in group]),
                 minutes([r["wall_s"] for r in group or base]),
                 "; ".join(sorted({r["machine"] for r in group + base}))]
        rows[tuple(cells[:KEY_COLUMNS])] = "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"
    return rows


def _order(key):
    evaluation = key[4].split()[0].lower()
    command = {"knn": "knn", "linear": "linprobe", "fine-tune": "finetune"}.get(evaluation, evaluation)
    return key[0], key[1], key[2], key[3] == "–", key[3], COMMAND_ORDER.get(command, 9), key[4]


def table(results, keep=None):
    """The markdown table; `keep` are rows ({key: row}) from an older table that stay unless rebuilt."""
    rows = {**(keep or {}), **table_rows(results)}
    return "\n".join([HEADER, *(rows[k] for k in sorted(rows, key=_order))])


def parse_rows(text):
    """{key: row} of the table between the markers of `text` (README.md)."""
    if BEGIN not in text or END not in text:
        return {}
    body = text[text.index(BEGIN) + len(BEGIN) : text.index(END)]
    lines = [line for line in body.splitlines() if line.startswith("| ") and not line.startswith("| method ")]
    return {tuple(c.strip() for c in line.strip("|").split(" | ")[:KEY_COLUMNS]): line for line in lines}


def update_readme(path, results, fresh=False):
    """Replace the table between the markers of `path` with one rebuilt from `results`."""
    path = Path(path)
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no results markers: add the two lines\n{BEGIN}\n{END}\nwhere the table goes")
    new = table(results, None if fresh else parse_rows(text))
    head, tail = text[: text.index(BEGIN) + len(BEGIN)], text[text.index(END) :]
    path.write_text(f"{head}\n{new}\n{tail}")
