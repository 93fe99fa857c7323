"""Fine-tuning: the MAE recipe (MAE paper, Appendix A.1; official main_finetune.py) on the
encoder and a global-pool head, through common.train: layer-wise learning-rate decay,
RandAugment, mixup / cutmix, label smoothing, drop path, an optional EMA of the weights.
Protocol: docs/evaluation.md."""

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import common
import data_sets
from evaluation.loading import eval_datasets, train_config
from evaluation.probes import accuracy, init_head, loader_for
from evaluation.result_folders import default_out, finish_result, start_result


@dataclass
class FinetuneConfig:
    epochs: int = 100  # MAE paper, App. A.1: 100 for ViT-B (50 for L/H: official FINETUNE.md)
    warmup_epochs: int = 5  # MAE paper, Appendix A.1
    batch_size: int = 32  # images per process and step (official: 32 per GPU x 32 GPUs = 1024)
    accum_iter: int = 1  # gradient accumulation: effective batch = batch * accum_iter * processes
    blr: float = 5e-4  # base learning rate, lr = blr * effective batch / 256 (MAE paper, ViT-B)
    min_lr: float = 1e-6  # floor of the cosine schedule (official main_finetune.py)
    weight_decay: float = 0.05  # AdamW weight decay (MAE paper, Appendix A.1)
    layer_decay: float = 0.65  # layer-wise lr decay (MAE paper: ViT-B 0.65; FINETUNE.md: L/H 0.75)
    drop_path: float = 0.1  # stochastic depth: the Config's drop_path (MAE paper: 0.1, ViT-B)
    mixup: float = 0.8  # mixup alpha, 0 = off (MAE paper, Appendix A.1)
    cutmix: float = 1.0  # cutmix alpha, 0 = off (MAE paper, Appendix A.1)
    smoothing: float = 0.1  # label smoothing (MAE paper, Appendix A.1)
    min_crop: float = 0.08  # RandomResizedCrop's smallest crop, a share of the area (timm's 0.08)
    randaug_n: int = 2  # RandAugment operations per image, 0 = off (timm rand-m9: 2 ops)
    randaug_m: int = 9  # RandAugment magnitude (MAE paper, Appendix A.1: (9, 0.5))
    reprob: float = 0.25  # random erasing probability (MAE paper, Appendix A.1)
    ema: float = 0.0  # decay of a moving average of the weights, evaluated beside them (0 = off)
    clip_grad: float = 0.0  # clip the gradient norm to this value (0 = off, as the official recipe)
    amp: str = "bf16"  # autocast on GPU: bf16 | fp16 | fp32; CPU runs are fp32
    log_every: int = 20  # write a line to log.jsonl every N steps
    ckpt_every: int = 0  # also save a checkpoint every N steps (0: at epoch ends and the last step)
    max_steps: int = 0  # stop after N steps of the full schedule (0 = run all epochs)
    resume: bool = False  # continue the fine-tuning in --out (or the default folder) exactly

    def __post_init__(self):
        train_config(self)  # the fields shared with common.TrainConfig; then the recipe's own
        common.check_options(self, non_negative="mixup cutmix drop_path randaug_n")
        in_range = (
            0 < self.layer_decay <= 1
            and 0 <= self.smoothing < 1
            and 0 <= self.ema < 1
            and 0 <= self.reprob <= 1
        )
        if not in_range:
            rule = "--layer-decay must be in (0, 1], --smoothing and --ema in [0, 1)"
            raise ValueError(f"{rule}, --reprob in [0, 1]")
        if not 0 < self.min_crop <= 1:
            rule = "--min-crop must be in (0, 1] (a fraction of the image's area)"
            raise ValueError(f"{rule}, got {self.min_crop}")


class Classifier(nn.Module):
    """The pooled features, then the global-pool head LayerNorm + Linear (official models_vit.py,
    std 2e-5)."""

    def __init__(self, encoder, dim, classes):
        super().__init__()
        self.encoder = encoder
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = init_head(nn.Linear(dim, classes), 2e-5)

    def forward(self, imgs):
        pooled = self.encoder.forward_features(imgs).mean(dim=1)  # (B, D)
        return self.head(self.fc_norm(pooled))  # (B, classes)


def layer_decay_groups(model, weight_decay, layer_decay):
    """AdamW groups with an "lr_scale" each (official util/lr_decay.py): layer 0 is the embeddings,
    layer i + 1 blocks.i, then come the trainable decoder_blocks.i (of a model whose features run
    top-down columns after the bottom-up ones), and layer L + 1 is the rest (final norm, head);
    layer l learns at lr * layer_decay ** (L + 1 - l). No weight decay on 1-d, token, pos_embed."""
    named = [
        (n, n.removeprefix("encoder.").split("."), p)
        for n, p in model.named_parameters()
        if p.requires_grad
    ]
    stacks = ("blocks", "decoder_blocks")
    blocks = {s: len({parts[1] for _, parts, _ in named if parts[0] == s}) for s in stacks}
    depth = sum(blocks.values())
    first = {
        "patch_embed": 0,
        "cls_token": 0,
        "pos_embed": 0,
        "blocks": 1,
        "decoder_blocks": blocks["blocks"] + 1,
    }
    groups = {}
    for name, parts, p in named:
        # each blocks.i and decoder_blocks.i is one layer (the method file says where that deviates)
        layer = first.get(parts[0], depth + 1) + (int(parts[1]) if parts[0] in blocks else 0)
        no_decay = p.ndim <= 1 or "token" in name or "pos_embed" in name
        decay = 0.0 if no_decay else weight_decay
        scale = layer_decay ** (depth + 1 - layer)
        new = {"params": [], "names": [], "lr_scale": scale, "weight_decay": decay}
        group = groups.setdefault((layer, decay), new)
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def finetune_transform(data, img_size, fcfg):
    """The MAE fine-tuning augmentation (official util/datasets.py through timm's
    create_transform)."""
    from torchvision.transforms import InterpolationMode, v2

    crop = v2.RandomResizedCrop(
        img_size, scale=(fcfg.min_crop, 1.0), interpolation=InterpolationMode.BICUBIC
    )
    steps = [v2.ToImage(), crop, v2.RandomHorizontalFlip()]
    if fcfg.randaug_n:
        steps.append(v2.ToDtype(torch.uint8, scale=True))
        steps.append(v2.RandAugment(fcfg.randaug_n, fcfg.randaug_m))
    steps.append(v2.ToDtype(torch.float32, scale=True))
    steps.append(v2.Normalize(*data_sets.DATASETS[data][1]))
    if fcfg.reprob:
        steps.append(v2.RandomErasing(p=fcfg.reprob, value="random"))
    return v2.Compose(steps)


def soft_targets(imgs, labels, classes, fcfg):
    """Mixup or cutmix (one of the two, chosen per batch) and label smoothing: (images, (B,
    classes))."""
    from torchvision.transforms import v2

    alphas = ((v2.MixUp, fcfg.mixup), (v2.CutMix, fcfg.cutmix))
    mixers = [mix(alpha=a, num_classes=classes) for mix, a in alphas if a]
    if mixers:
        imgs, targets = v2.RandomChoice(mixers)(imgs, labels)
    else:
        targets = F.one_hot(labels, classes).float()
    # smoothing commutes with mixing
    return imgs, targets * (1 - fcfg.smoothing) + fcfg.smoothing / classes


@torch.no_grad()
def evaluate_classifier(model, loader, device, world, dtype, prefix=""):
    """{top1, top5, val_loss} (mean cross-entropy) over a loader, summed across processes; names
    after `prefix`."""
    model.eval()
    # top-1 hits, top-5 hits, loss sum, images
    total = torch.zeros(4, dtype=torch.float64, device=device)
    for imgs, labels, _ in loader:
        imgs = imgs.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(imgs).float()  # (B, classes)
        top1, top5 = accuracy(logits, labels)
        n = len(labels)
        loss = F.cross_entropy(logits, labels, reduction="sum").item()
        total += torch.tensor([top1 * n, top5 * n, loss, n], dtype=torch.float64, device=device)
    model.train()
    if world > 1:
        torch.distributed.all_reduce(total)
    means = (total[:3] / total[3].clamp(min=1)).tolist()
    return {prefix + k: v for k, v in zip(("top1", "top5", "val_loss"), means)}


def check_resume(ckpt, out, ecfg, fcfg):
    """A ValueError unless `ckpt` is a fine-tuning started with these options (but those that do not
    change what it computes)."""
    if "finetune" not in ckpt:
        path = out / "checkpoint.pt"
        raise ValueError(f"{path} is not a fine-tuning checkpoint that can be continued")
    options = {**asdict(ecfg), **asdict(fcfg)}
    saved = {**ckpt["eval"], **ckpt["finetune"]}
    differ = [
        k for k, v in saved.items() if k not in common.RESUME_MAY_CHANGE and v != options.get(k, v)
    ]
    if differ:
        changed = ", ".join(
            f"--{k.replace('_', '-')} {saved[k]} there, {options[k]} here" for k in differ
        )
        continues = f"--resume continues {out} with the options it was started with"
        raise ValueError(f"{continues}; these differ: {changed}")


def run_finetune(model, info, ecfg, fcfg, code_files, console):
    """The MAE fine-tuning recipe on the encoder + a global-pool head, top-1 / top-5 after every
    epoch; one process or many under torchrun (rank 0 writes the result folder); --resume continues
    it exactly."""
    start = time.perf_counter()
    data, train_set, val_set = eval_datasets(ecfg, info)
    out = Path(ecfg.out or default_out(info, "finetune", ecfg, data))
    tcfg = train_config(
        fcfg,
        data=data,
        seed=ecfg.seed,
        num_workers=ecfg.num_workers,
        device=ecfg.device,
        out=str(out),
    )
    rank, world, device = common.setup(tcfg)
    steps = common.epoch_steps(len(train_set), world, tcfg)  # before anything is written
    ckpt = common.load_checkpoint(out / "checkpoint.pt") if fcfg.resume else None
    if ckpt is not None:  # the options it was started with
        check_resume(ckpt, out, ecfg, fcfg)
    meta = None  # rank 0 writes the result folder
    if rank == 0:
        settings = f"fine-tune {fcfg.epochs} ep"
        meta = start_result(
            out, "finetune", settings, ecfg, fcfg, info, data, code_files, world, fresh=not ckpt
        )
    classes = len(train_set.classes)
    img_size = info["config"].img_size
    # train what the features use; decoders stay frozen and unused
    for name, p in model.named_parameters():
        p.requires_grad_(name in info["needed"])
    torch.manual_seed(ecfg.seed)
    clf = Classifier(model, info["dim"], classes).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        clf.fc_norm.load_state_dict(ckpt["head"]["fc_norm"])
        clf.head.load_state_dict(ckpt["head"]["head"])
    groups = layer_decay_groups(clf, fcfg.weight_decay, fcfg.layer_decay)
    # betas (0.9, 0.999): official
    opt = torch.optim.AdamW(groups, lr=0.0, fused=True)
    ema = None
    if fcfg.ema:
        average = get_ema_multi_avg_fn(fcfg.ema)
        ema = AveragedModel(clf, multi_avg_fn=average, use_buffers=True)
    train_tf = finetune_transform(data, img_size, fcfg)
    val_tf = data_sets.transform(data, img_size, False)
    dtype = common.autocast_dtype(fcfg.amp, device)
    batch = fcfg.batch_size
    workers = ecfg.num_workers
    shuffled = dict(shuffle=True, seed=ecfg.seed, rank=rank, world=world)
    loader = loader_for(train_set, train_tf, batch, workers, device, **shuffled)
    val_workers = min(workers, 2)
    val_loader = loader_for(val_set, val_tf, batch, val_workers, device, rank=rank, world=world)

    def loss_of(net, imgs, labels, inputs):
        # mixup / cutmix + smoothing, drawn per step
        imgs, targets = soft_targets(imgs, labels, classes, fcfg)
        return F.cross_entropy(net(imgs).float(), targets)

    def evaluate(epoch):
        metrics = evaluate_classifier(clf, val_loader, device, world, dtype)
        if ema is not None:
            metrics |= evaluate_classifier(ema.module, val_loader, device, world, dtype, "ema_")
        return metrics

    saved = dict(
        method=info["method"],
        config=asdict(info["config"]),
        train=info["train"],
        code=info["ckpt"].get("code"),
        git=common.git_hash(),
        finetune=asdict(fcfg),
        eval=asdict(ecfg),
    )

    # the encoder under its own names: the evaluations read it as a pre-training checkpoint
    def state():
        heads = {k: getattr(clf, k).state_dict() for k in ("fc_norm", "head")}
        return {"model": model.state_dict(), "head": heads, **saved}

    common.train(
        clf, opt, tcfg, loader, loss_of, evaluate, state, ckpt=ckpt, ema=ema, title="finetune"
    )
    # the final weights' numbers: the last epoch's in the log, or, if --max-steps stopped the run
    # inside an epoch, computed now (on every process: the evaluation sums over them)
    stopped_inside = min(tcfg.max_steps or math.inf, tcfg.epochs * steps) % steps
    final = evaluate(0) if stopped_inside else None
    if rank != 0:
        return None, out
    if not final:
        rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        last = [r for r in rows if "top1" in r][-1]
        final = {k: v for k, v in last.items() if k not in ("epoch", "elapsed_s")}
    return finish_result(out, meta, final, start, train_set, val_set)
