"""Frozen-encoder evaluations: features of a whole data set (forward_features mean-pooled over the
tokens), weighted kNN on them, and the linear probe (BatchNorm + Linear). extract_features and
knn_scores stand on their own, for any caller with a model and a data set. Protocol:
docs/evaluation.md."""

import functools
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import Progress

import common
import data_sets
from evaluation.loading import eval_datasets, train_config
from evaluation.result_folders import default_out, finish_result, start_result


@dataclass
class KnnConfig:
    k: int = 20  # neighbours that vote (Wu et al. 2018; DINO eval_knn.py)
    temperature: float = 0.07  # votes are weighted by exp(cosine similarity / temperature)
    batch_size: int = 256  # images per step of feature extraction
    pixels: bool = False  # raw normalised pixels as features, not the encoder's: the floor of none

    def __post_init__(self):
        if self.k < 1 or self.temperature <= 0 or self.batch_size < 1:
            rule = "--k and --batch-size must be at least 1 and --temperature positive"
            raise ValueError(f"{rule}, got {self}")


@dataclass
class LinprobeConfig:
    epochs: int = 90  # MAE paper, Appendix A.1: 90 epochs
    warmup_epochs: int = 10  # official main_linprobe.py
    batch_size: int = 256  # images per step (official: 16,384 with LARS)
    blr: float = 0.1  # base learning rate, lr = blr * batch / 256 (official main_linprobe.py)
    weight_decay: float = 0.0  # official main_linprobe.py: none
    augment: bool = False  # RandomResizedCrop + flip each epoch, as official (slow: no cache)
    pixels: bool = False  # raw normalised pixels as features, not the encoder's: the floor of none

    def __post_init__(self):
        train_config(self)  # every field but augment is one of common.TrainConfig's


def loader_for(
    dataset, tf, batch_size, num_workers, device, shuffle=False, seed=0, epoch=0, rank=0, world=1
):
    """This process's share of `dataset`, `tf` applied with its random draws seeded by (seed, epoch,
    index); shuffled in a seeded order without the last partial batch (loader.sampler.set_epoch
    starts each epoch)."""
    sampler = data_sets.EpochSampler(len(dataset), shuffle, seed=seed, rank=rank, world=world)
    sampler.set_epoch(epoch)
    data = data_sets.SeededDataset(dataset, tf, seed)
    return data_sets.make_loader(data, batch_size, sampler, num_workers, shuffle, device)


@torch.no_grad()
def extract_features(
    model,
    dataset,
    data,
    batch_size,
    num_workers=0,
    seed=0,
    augment=False,
    epoch=0,
    bar=None,
    label="",
    pixels=False,
):
    """The protocol's features of a whole data set in order, the model in eval mode (its mode is
    restored after): forward_features (B, N, D) mean-pooled over the N tokens, (M, D), or the pixels
    (M, C*H*W); and the labels (M,). Augmented crops are seeded by (seed, epoch, index). bar: a rich
    Progress to show the batches in, under `label`."""
    device = next(model.parameters()).device
    tf = data_sets.transform(data, model.cfg.img_size, augment)
    loader = loader_for(dataset, tf, batch_size, num_workers, device, seed=seed, epoch=epoch)
    if bar:
        loader = bar.track(loader, description=f"{label} features")
    return features_of(model, ((imgs, labels) for imgs, labels, _ in loader), pixels)


@torch.no_grad()
def features_of(model, batches, pixels=False):
    """extract_features' features (M, D) and labels (M,) of batches [(images, labels)] given."""
    device = next(model.parameters()).device
    dtype = common.autocast_dtype("bf16", device)
    was_training = model.training
    model.eval()
    feats = []
    labels = []
    for imgs, y in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            imgs = imgs.to(device, non_blocking=True)
            x = imgs.flatten(1) if pixels else model.forward_features(imgs).mean(1)  # (B, D)
            feats.append(x.float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def accuracy(scores, labels, topk=(1, 5)):
    """Fraction of rows whose label is among the k highest scores, for each k (k capped at the
    classes)."""
    top = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices
    hit = top == labels.unsqueeze(1)  # (M, k)
    return [hit[:, :k].any(1).float().mean().item() for k in topk]


def knn_scores(train_feats, train_labels, test_feats, classes, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN votes (M_test, classes): the k training features nearest by cosine similarity
    vote for their label with weight exp(similarity / temperature)."""
    train_feats = F.normalize(train_feats.float(), dim=1)
    votes = []
    for part in F.normalize(test_feats.float(), dim=1).split(chunk):
        sim, idx = (part @ train_feats.T).topk(min(k, len(train_feats)), dim=1)  # (b, k)
        weights = (sim / temperature).exp()
        votes.append(torch.zeros(len(part), classes).scatter_add_(1, train_labels[idx], weights))
    return torch.cat(votes)  # (M_test, classes)


def knn_top1(model, train_batches, val_batches, classes, k=20, temperature=0.07):
    """{"knn_top1": ...}: the kNN of `cli.py knn` (its defaults: k 20, T 0.07) of batches of
    images [(images, labels)] prepared as it prepares them, without a result folder: the monitor
    of pre-training, called with the model as it trains. It draws nothing at random, so training
    goes on as it would without it."""
    train_f, train_y = features_of(model, train_batches)
    val_f, val_y = features_of(model, val_batches)
    scores = knn_scores(train_f, train_y, val_f, classes, k, temperature)
    return {"knn_top1": accuracy(scores, val_y, topk=(1,))[0]}


def knn_monitor(tcfg, img_size):
    """The kNN monitor of a pre-training run (--knn-every), None if off: knn_top1 with the first
    --knn-train-size training images (a fixed subset; all of --train-size's if 0) as the memory
    bank and the held-out images of --val-size as the queries, as `cli.py knn RUN --train-size
    KNN_TRAIN_SIZE` takes them. Their images are prepared once and kept (in batches of 256, on the
    host); each call only runs the encoder."""
    if not tcfg.knn_every:
        return None
    bank = tcfg.knn_train_size or tcfg.train_size
    sets = dict(root=tcfg.data_dir, img_size=img_size, download=tcfg.download)
    train_set = data_sets.load_dataset(tcfg.data, "train", size=bank, **sets)
    val_set = data_sets.load_dataset(tcfg.data, "val", size=tcfg.val_size, **sets)
    tf = data_sets.transform(tcfg.data, img_size, False)
    cpu = torch.device("cpu")
    loaders = [loader_for(ds, tf, 256, 0, cpu) for ds in (train_set, val_set)]  # once: no workers
    train, val = ([(imgs, labels) for imgs, labels, _ in loader] for loader in loaders)
    classes = len(train_set.classes)
    return functools.partial(knn_top1, train_batches=train, val_batches=val, classes=classes)


def init_head(module, std):  # a classifier head: trunc normal weights, zero bias (official)
    nn.init.trunc_normal_(module.weight, std=std)
    nn.init.zeros_(module.bias)
    return module


def run_knn(model, info, ecfg, kcfg, code_files, console):
    """Weighted kNN top-1 / top-5 of the validation split against the training split's features."""
    start = time.perf_counter()
    data, train_set, val_set = eval_datasets(ecfg, info)
    out = Path(ecfg.out or default_out(info, "knn", ecfg, data, kcfg.pixels))
    settings = f"kNN k={kcfg.k}, T={kcfg.temperature}"
    meta = start_result(out, "knn", settings, ecfg, kcfg, info, data, code_files)
    model.to(common.pick_device(ecfg.device))
    with Progress(console=console, transient=True) as bar:
        options = dict(
            data=data,
            batch_size=kcfg.batch_size,
            num_workers=ecfg.num_workers,
            seed=ecfg.seed,
            bar=bar,
            pixels=kcfg.pixels,
        )
        train_f, train_y = extract_features(model, train_set, label="train", **options)
        val_f, val_y = extract_features(model, val_set, label="val", **options)
    classes = len(train_set.classes)
    scores = knn_scores(train_f, train_y, val_f, classes, kcfg.k, kcfg.temperature)
    top1, top5 = accuracy(scores, val_y)
    return finish_result(out, meta, {"top1": top1, "top5": top5}, start, train_set, val_set)


def run_linprobe(model, info, ecfg, lcfg, code_files, console):
    """Frozen encoder, BatchNorm (no affine) + Linear on the pooled features; top-1 / top-5 per
    epoch."""
    start = time.perf_counter()
    data, train_set, val_set = eval_datasets(ecfg, info)
    out = Path(ecfg.out or default_out(info, "linprobe", ecfg, data, lcfg.pixels))
    settings = f"linear probe {lcfg.epochs} ep{', augmented' if lcfg.augment else ''}"
    meta = start_result(out, "linprobe", settings, ecfg, lcfg, info, data, code_files)
    device = common.pick_device(ecfg.device)
    model.to(device).requires_grad_(False)
    torch.manual_seed(ecfg.seed)
    cfg = info["config"]
    dim = cfg.in_chans * cfg.img_size**2 if lcfg.pixels else info["dim"]
    # official main_linprobe.py: BatchNorm without affine, then a head of std 0.01
    bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
    head = init_head(nn.Linear(dim, len(train_set.classes)), 0.01)
    probe = nn.Sequential(OrderedDict(bn=bn, head=head)).to(device)
    optimizer = torch.optim.SGD(
        probe.parameters(), lr=0.0, momentum=0.9, weight_decay=lcfg.weight_decay
    )
    # steps per epoch: the last partial batch is dropped, as official
    steps = max(len(train_set) // lcfg.batch_size, 1)
    total = lcfg.epochs * steps
    warmup = lcfg.warmup_epochs * steps
    peak_lr = lcfg.blr * min(lcfg.batch_size, len(train_set)) / 256
    order = torch.Generator().manual_seed(ecfg.seed)  # of the training features, every epoch
    with Progress(console=console, transient=True) as bar:
        options = dict(
            data=data,
            batch_size=lcfg.batch_size,
            num_workers=ecfg.num_workers,
            seed=ecfg.seed,
            pixels=lcfg.pixels,
        )
        val_f, val_y = extract_features(model, val_set, bar=bar, label="val", **options)
        # the cache: one pass over the training images, then only the head trains
        if not lcfg.augment:
            train_f, train_y = extract_features(model, train_set, bar=bar, label="train", **options)
        task = bar.add_task("probe", total=lcfg.epochs)
        for epoch in range(lcfg.epochs):
            if lcfg.augment:  # new crops every epoch
                train_f, train_y = extract_features(
                    model, train_set, augment=True, epoch=epoch, **options
                )
            probe.train()
            shuffled = torch.randperm(len(train_f), generator=order)
            batches = shuffled[: steps * lcfg.batch_size].view(steps, -1)
            for i, idx in enumerate(batches):
                lr = common.lr_at(epoch * steps + i, total, warmup, peak_lr, 0.0)
                optimizer.param_groups[0]["lr"] = lr
                logits = probe(train_f[idx].to(device))
                loss = F.cross_entropy(logits, train_y[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            probe.eval()
            with torch.no_grad():
                scores = torch.cat([probe(f.to(device)).cpu() for f in val_f.split(4096)])
            top1, top5 = accuracy(scores, val_y)
            row = {"epoch": epoch + 1, "train_loss": loss.item(), "top1": top1, "top5": top5}
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(task, advance=1, description=f"probe: top-1 {top1:.3f}")
    torch.save({"probe": probe.state_dict()}, out / "probe.pt")
    return finish_result(out, meta, {"top1": top1, "top5": top5}, start, train_set, val_set)
