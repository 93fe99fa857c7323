"""The README's results table, rebuilt from result folders, so no number in it is typed by hand (a maintainer's tool).

    python experiments/results.py runs/results                      # print the table
    python experiments/results.py runs/results --readme README.md   # put it in README.md, between the markers

One row per (method, data, encoder, pre-training, evaluation): the mean ± std top-1 over the seeds found, beside the
random-init floor; rows that the given folders do not rebuild are kept unless --fresh (docs/evaluation.md).
"""

import argparse
import json
import statistics
from pathlib import Path

BEGIN = "<!-- results table: begin (built by `python experiments/results.py DIRS --readme README.md`; do not edit) -->"
END = "<!-- results table: end -->"
COLUMNS = ["method", "data", "encoder", "pre-training", "evaluation", "top-1 (%)", "random init (%)", "seeds"]
COLUMNS += ["pre-train time", "eval time", "machine"]
KEY_COLUMNS = 5  # method, data, encoder, pre-training, evaluation
EVALUATION_ORDER = {"kNN": 0, "linear": 1, "fine-tune": 2}  # by the first word of the evaluation's settings


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


def mean_std(results):
    top1 = [100 * r["metrics"]["top1"] for r in results]
    if not top1:
        return "–"
    return f"{top1[0]:.1f}" if len(top1) == 1 else f"{statistics.mean(top1):.1f} ± {statistics.stdev(top1):.1f}"


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
    for key in floor:  # a floor without a trained row still gets a row
        if not any(k[:3] == key[:3] and k[4] == key[3] for k in trained):
            trained[(*key[:3], "–", key[3])] = []
    rows = {}
    for key, group in trained.items():
        base = floor.get((*key[:3], key[4]), [])
        seeds = sorted({r["seed"] for r in group or base})
        cells = [*key, mean_std(group), mean_std(base), f"{len(seeds)} ({', '.join(map(str, seeds))})"]
        cells += [minutes([r.get("pretrain_wall_s") for r in group]), minutes([r["wall_s"] for r in group or base])]
        cells.append("; ".join(sorted({r["machine"] for r in group + base})))
        rows[key] = "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"
    return rows


def table(results, keep=None):
    """The markdown table; `keep` are rows ({key: row}) from an older table that stay unless rebuilt."""
    rows = {**(keep or {}), **table_rows(results)}

    def order(key):  # method, data, encoder, trained before the floor, pre-training, knn / linprobe / finetune
        return *key[:3], key[3] == "–", key[3], EVALUATION_ORDER.get(key[4].split()[0], 9), key[4]

    header = f"| {' | '.join(COLUMNS)} |\n|{'---|' * len(COLUMNS)}"
    return "\n".join([header, *(rows[k] for k in sorted(rows, key=order))])


def update_readme(path, results, fresh=False):
    """Replace the table between the markers of `path` with one rebuilt from `results`."""
    path = Path(path)
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no results markers: add the two lines\n{BEGIN}\n{END}\nwhere the table goes")
    head, rest = text.split(BEGIN, 1)
    old, tail = rest.split(END, 1)
    lines = [line for line in old.splitlines() if line.startswith("| ") and not line.startswith("| method ")]
    keep = (
        {} if fresh else {tuple(c.strip() for c in line.strip("|").split(" | ")[:KEY_COLUMNS]): line for line in lines}
    )
    path.write_text(f"{head}{BEGIN}\n{table(results, keep)}\n{END}{tail}")


def main(args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", default=["runs"], help="folders that hold result folders (default: runs)")
    parser.add_argument("--readme", default="", help="rewrite the results table in this file (between its markers)")
    parser.add_argument("--fresh", action="store_true", help="drop the table's rows that the folders do not rebuild")
    args = parser.parse_args(args)
    try:
        rows = collect(args.folders)
        if args.readme:
            update_readme(args.readme, rows, args.fresh)
            return print(f"updated {args.readme} from {len(rows)} result(s)")
    except ValueError as e:
        parser.error(str(e))  # one line, exit 2
    print(table(rows))


if __name__ == "__main__":
    main()
