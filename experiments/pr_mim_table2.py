"""PR-MIM's Table 2 at small scale, on CPU: the components at throw 0.5, same budget, several seeds.

    python experiments/pr_mim_table2.py --seeds 0 1 2   # train what is missing, then evaluate
    python experiments/pr_mim_table2.py --epochs 4 --train-size 4096   # shorter, own run folders

Each row is `python cli.py pretrain pr-mim ROW-OPTIONS --seed S` on the built-in patterns data with
the default `cpu` preset (runs already finished in --out are reused). That preset masks 0.5 of the
tokens and throws 0.25 (pr_mim.py), its stand-in for the paper's 0.75 and 0.5: the rows named
"throw 0.5" throw 0.25. Every checkpoint is then evaluated on the same 1,024 held-out images with
the same masks:
- loss, full decoder: norm-pix MSE on ALL masked tokens with nothing thrown (the decoder sees every
  token, no aggregation): one protocol for every row, a probe of what encoder and decoder learned;
- loss, own path: the same loss through the model's own training path (its throw, sampling and
  aggregation), for the rows that reconstruct every masked token (throw 0 and progressive rows);
- kNN top-1: weighted kNN (k=20, temperature 0.07, cosine) of mean-pooled encoder features, 2,048
  training images as the bank, the held-out images as queries; the paper's Table 2 is a fine-tuning
  accuracy, so this is the representation-quality number closest to it that a CPU can afford.
A random-initialisation row gives the floor. Prints a markdown table (mean +- std over seeds) and
writes results.json beside the runs.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import cli  # noqa: E402
import common  # noqa: E402
import data_sets  # noqa: E402
import pr_mim  # noqa: E402

ROWS = {  # Table 2 at throw 0.5: (name, pretrain options)
    "throw 0 (MAE)": ["--throw", "0"],
    "throw 0.5, neither": ["--sampling", "random", "--no-progressive"],
    "throw 0.5, progressive": ["--sampling", "random"],
    "throw 0.5, furthest": ["--no-progressive"],
    "throw 0.5, both (PR-MIM)": [],
}


def run_dir(out, name, seed):
    return out / f"{name.split(' (')[0].replace(', ', '-').replace(' ', '')}-s{seed}"


def finished(run, epochs):
    log = run / "log.jsonl"
    if not (run / "checkpoint.pt").exists() or not log.exists():
        return False
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return any(r.get("epoch") == epochs and "val_loss" in r for r in rows)


def train(run, options, seed, epochs, train_size):
    if finished(run, epochs):
        return None
    budget = ["--epochs", str(epochs), "--train-size", str(train_size)]
    cmd = [sys.executable, "cli.py", "pretrain", "pr-mim", *options, "--seed", str(seed), *budget]
    cmd += ["--out", str(run), "--overwrite"]
    print(" ".join(cmd[1:]), flush=True)
    tick = time.perf_counter()
    # one thread per process: small models on a shared CPU run faster so (the data worker adds one)
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=one_thread)
    return time.perf_counter() - tick


def images(split, size, img_size):
    data = data_sets.load_dataset("patterns", split, size=size, img_size=img_size)
    tf = data_sets.transform("patterns", img_size, False)
    pairs = [data[i] for i in range(size)]
    imgs = torch.stack([tf(img) for img, _ in pairs])  # (M, C, H, W)
    labels = torch.tensor([label for _, label in pairs])  # (M,)
    return imgs, labels


@torch.no_grad()
def features(model, imgs):
    pooled = [model.forward_features(x).mean(1) for x in imgs.split(256)]  # (B, D) each
    return F.normalize(torch.cat(pooled), dim=1)


@torch.no_grad()
def knn_top1(model, bank, bank_labels, query, query_labels, k=20, temperature=0.07):
    sim = features(model, query) @ features(model, bank).T  # (Q, M) cosine similarities
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(len(query), int(bank_labels.max()) + 1)
    votes.scatter_add_(1, bank_labels[idx], (top / temperature).exp())  # (Q, classes)
    return (votes.argmax(1) == query_labels).float().mean().item() * 100


@torch.no_grad()
def masked_loss(model, imgs, noise, thrown=None):
    """Mean over images of the model's loss (norm-pix MSE on its supervised tokens)."""
    total = 0.0
    for i in range(0, len(imgs), 256):
        batch = slice(i, i + 256)
        extra = {} if thrown is None else {"thrown": thrown[batch]}
        loss = model(imgs[batch], noise=noise[batch], **extra)[0]
        total += loss.item() * len(imgs[batch])
    return total / len(imgs)


def evaluate(state, config, val, noise, bank):
    cfg = pr_mim.Config(**config)
    model = pr_mim.PRMIM(cfg).eval()
    model.load_state_dict(state)
    full_cfg = pr_mim.Config(**{**config, "throw": 0.0})
    full = pr_mim.PRMIM(full_cfg).eval()  # the same weights, nothing thrown
    shared = {k: v for k, v in state.items() if not k.startswith("spatial_aggregation")}
    full.load_state_dict(shared)
    row = {
        "loss_full_decoder": masked_loss(full, val[0], noise),
        "knn_top1": knn_top1(model, *bank, *val),
    }
    # these supervise every masked token
    if model.spatial_aggregation is not None or cfg.throw == 0:
        blank = torch.zeros(len(noise), noise.shape[1], 1)  # (B, N, 1): only the mask is read
        mask = pr_mim.random_masking(blank, cfg.mask_ratio, noise)[1]
        seeded = torch.Generator().manual_seed(0)
        thrown = pr_mim.throw_tokens(mask, model.num_throw, cfg.sampling, seeded)
        row["loss_own_path"] = masked_loss(model, val[0], noise, thrown)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--epochs", type=int, default=6, help="training epochs (6; the cpu preset trains 24)"
    )
    parser.add_argument(
        "--train-size", type=int, default=8192, help="training images (the cpu preset's 8192)"
    )
    parser.add_argument("--out", default="runs/pr_mim_table2")
    args = parser.parse_args()
    out = ROOT / args.out / f"epochs{args.epochs}-train{args.train_size}"
    minutes = {}
    for seed in args.seeds:
        for name, options in ROWS.items():
            seconds = train(run_dir(out, name, seed), options, seed, args.epochs, args.train_size)
            if seconds is not None:
                minutes.setdefault(name, []).append(seconds / 60)

    cfg, _ = cli.resolve(pr_mim, "cpu", None, {})  # the preset the rows train at
    val = images("val", 1024, cfg.img_size)
    bank = images("train", 2048, cfg.img_size)
    tokens = (cfg.img_size // cfg.patch_size) ** 2
    seeded = torch.Generator().manual_seed(0)
    noise = torch.rand(1024, tokens, generator=seeded)  # the same masks for every model
    results = {}
    for name in ROWS:
        for seed in args.seeds:
            ckpt = common.load_checkpoint(run_dir(out, name, seed))
            row = evaluate(ckpt["model"], ckpt["config"], val, noise, bank)
            results.setdefault(name, []).append(row)
    torch.manual_seed(0)
    config = {**ckpt["config"], "throw": 0.0}
    random_init = pr_mim.PRMIM(pr_mim.Config(**config)).state_dict()
    results["random init"] = [evaluate(random_init, config, val, noise, bank)]
    summary = {"results": results, "train_minutes": minutes}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")

    def cell(rows, key, fmt):
        values = [r[key] for r in rows if key in r]
        if not values:
            return "-"
        if len(values) == 1:
            return fmt.format(values[0])
        return (fmt + " +- " + fmt).format(statistics.mean(values), statistics.stdev(values))

    seeds = ", ".join(map(str, args.seeds))
    budget = f"cpu preset, {args.epochs} epochs of {args.train_size} images"
    print(f"\n{len(args.seeds)} seeds ({seeds}), {budget}\n")
    print("| row | loss, all masked, full decoder | loss, all masked, own path | kNN top-1 (%) |")
    print("|---|---|---|---|")
    for name, rows in results.items():
        full = cell(rows, "loss_full_decoder", "{:.4f}")
        own = cell(rows, "loss_own_path", "{:.4f}")
        knn = cell(rows, "knn_top1", "{:.1f}")
        print(f"| {name} | {full} | {own} | {knn} |")


if __name__ == "__main__":
    main()
