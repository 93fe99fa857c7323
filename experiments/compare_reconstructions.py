"""Every method's reconstructions of the same held-out images, side by side, in one PNG.

    python experiments/compare_reconstructions.py runs/mae runs/simmim runs/pr-mim runs/i-mae \
        runs/revcolv2 --out docs/reconstructions.png

Columns: the original, then for each run its masked input (its own mask: each method masks in its
own way) and its reconstruction with the visible patches pasted back (as `python cli.py visualize
RUN` draws them, one run at a time).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
from evaluation import loading, pictures  # noqa: E402


def main(args=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "runs", nargs="+", help="run folders (or checkpoints) of pre-training runs on the same data"
    )
    parser.add_argument(
        "--out", default="runs/compare_reconstructions.png", help="the PNG to write"
    )
    parser.add_argument(
        "--num-images", type=int, default=8, help="rows: the first N held-out images"
    )
    parser.add_argument("--seed", type=int, default=0, help="seeds the masks")
    a = parser.parse_args(args)
    ecfg = loading.EvalConfig(seed=a.seed, num_workers=0)
    columns = []
    data = None
    for run in a.runs:
        model, info = loading.load_model(run, cli.method_of, need_all=True)
        name, dataset = loading.eval_datasets(ecfg, info, ("val",))
        if data not in (None, name):
            trained = f"{run} was trained on {name}, the runs before it on {data}"
            sys.exit(f"error: {trained}: compare runs of one data set")
        data = name
        cfg = info["config"]
        inputs = cli.bound_inputs(info["module"], cfg)
        normalized = cli.normalized_target(cfg)
        shown, _ = pictures.reconstructions(
            model, dataset, data, cfg.img_size, inputs, normalized, a.num_images, a.seed
        )
        if not columns:
            columns.append(("original", shown[0][1]))
        columns += [(info["method"], shown[1][1]), (f"{info['method']} recon", shown[3][1])]
    title = f"Held-out {data} images: for each method its masked input and its reconstruction"
    title += f" (visible patches pasted); masks seed {a.seed}. Made by {Path(__file__).name}."
    size = pictures.save_grid(columns, a.out, title)
    print(f"wrote {a.out} ({size[0]} x {size[1]} px)")


if __name__ == "__main__":
    main()
