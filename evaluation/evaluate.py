"""Evaluation plumbing shared by every method: fine-tuning, linear probing, kNN, reconstructions, and
the export of a ViT encoder to a state dict that timm's VisionTransformer loads.

Nothing here names a method. A model is rebuilt from a checkpoint with the method file's `Config` and
model class (cli.py passes them in from its METHODS dict), and everything below touches it through two
calls of the contract: `forward_features(imgs) -> (B, N, D)` and `forward(imgs, **inputs) -> (loss,
pred, mask)`. A new method file therefore plugs in with no change here.

The evaluation protocol (the same for finetune, linprobe and knn; README.md#evaluation):
- Features are `model.forward_features(imgs)`: the encoder on the whole image (no masking), the patch
  tokens in grid order after the encoder's final norm, (B, N, D); every command mean-pools them over
  the N tokens to (B, D). No cls token is used (not every method has one).
- Images are seen at the pre-training image size (the checkpoint's `img_size`) with the data set's
  normalisation. Evaluation images: resize + centre crop (`common.transform(train=False)`).
- knn: L2-normalised features of the training split are the memory bank; each validation image takes
  a vote of its k = 20 nearest neighbours (cosine similarity), weighted by exp(similarity / 0.07)
  (Wu et al. 2018, the protocol of DINO's eval_knn.py).
- linprobe: the encoder is frozen (eval mode); BatchNorm1d without affine + Linear on the pooled
  feature (the MAE protocol, official main_linprobe.py); by default no augmentation, so the features
  are computed once and cached, then the head trains for 90 epochs (SGD, warm-up + cosine).
- finetune: the whole encoder + a global-pool head (LayerNorm + Linear) with the MAE recipe: layer-wise
  lr decay, drop path, mixup / cutmix, label smoothing, RandAugment, random erasing, warm-up + cosine,
  optional EMA (official main_finetune.py); top-1 / top-5 on the validation split after every epoch.
- `--random-init` evaluates the same architecture with random weights: the floor of every number
  (for finetune, it is supervised training from scratch with the same recipe).

Deviations from the official MAE evaluation code:
- Pooling: mean of the patch tokens after the encoder's final norm, for all three commands. The official
  linear probe uses the cls token, and its fine-tuning drops the final norm for an fc_norm after pooling;
  we keep the final norm (it is inside forward_features) and add the head's LayerNorm after pooling.
- The linear probe uses SGD with momentum 0.9 (official: LARS at batch 16,384) and, by default, no
  augmentation (official: RandomResizedCrop + flip), so a CPU probe takes minutes.
- RandAugment is torchvision's (2 ops, magnitude 9, no magnitude noise; official: timm's
  rand-m9-mstd0.5-inc1); mixup / cutmix are torchvision's (one of the two per batch, as timm's switch
  probability 0.5); random erasing fills with per-pixel normal noise, as timm's mode "pixel".
"""
import dataclasses
import inspect
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import common

# ----------------------------------------------------------------------------------------------------
# Options of the evaluation commands. EvalConfig is shared; each command adds its own dataclass.


@dataclass
class EvalConfig:
    data: str = ""  # data set to evaluate on (default: the checkpoint's pre-training data; official ones: imagenet)
    data_dir: str = ""  # where data sets live (default: the checkpoint's --data-dir, else data)
    download: bool = False  # let torchvision download CIFAR / Fashion-MNIST into --data-dir
    train_size: int = -1  # use N training images (-1 = as in pre-training if the data is the same, else all; 0 = all)
    val_size: int = -1  # use N validation images (-1 = as in pre-training if the data is the same, else all; 0 = all)
    seed: int = 0  # seeds the random init, the data order, augmentation and masks
    random_init: bool = False  # evaluate the same architecture with random weights: the floor of every number
    method: str = ""  # method of a checkpoint that does not name one (official MAE checkpoints; default mae)
    num_workers: int = 2  # data-loading processes
    device: str = "auto"  # auto (GPU if there is one) | cpu | cuda | cuda:N
    out: str = ""  # result folder (default: <run folder>/eval/<command>[-random-init]-<data>-s<seed>)

    def __post_init__(self):  # checked before any result folder is written
        if self.num_workers < 0:
            raise ValueError(f"--num-workers must not be negative, got {self.num_workers}")
        common.check_device(self.device)


@dataclass
class KnnConfig:
    k: int = 20  # neighbours that vote (Wu et al. 2018; DINO eval_knn.py)
    temperature: float = 0.07  # votes are weighted by exp(cosine similarity / temperature)
    batch_size: int = 256  # images per step of feature extraction

    def __post_init__(self):
        if self.k < 1 or self.temperature <= 0 or self.batch_size < 1:
            raise ValueError(f"--k and --batch-size must be at least 1 and --temperature positive, "
                             f"got {self.k}, {self.batch_size}, {self.temperature}")


@dataclass
class LinprobeConfig:
    epochs: int = 90  # MAE paper, Appendix A.1: 90 epochs
    warmup_epochs: int = 10  # official main_linprobe.py
    batch_size: int = 256  # images per step (official: 16,384 with LARS)
    blr: float = 0.1  # base learning rate, lr = blr * batch / 256 (official main_linprobe.py)
    weight_decay: float = 0.0  # official main_linprobe.py: none
    augment: bool = False  # RandomResizedCrop + flip every epoch, as official (slow: no feature cache)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.blr <= 0 or self.warmup_epochs < 0:
            raise ValueError("--epochs and --batch-size must be at least 1, --blr positive, --warmup-epochs >= 0")


@dataclass
class FinetuneConfig:
    epochs: int = 100  # MAE paper, Appendix A.1: 100 epochs for ViT-B (50 for ViT-L/H, official FINETUNE.md)
    warmup_epochs: int = 5  # MAE paper, Appendix A.1
    batch_size: int = 32  # images per process and step (official: 32 per GPU x 32 GPUs = 1024)
    accum_iter: int = 1  # gradient accumulation: effective batch = batch_size * accum_iter * processes
    blr: float = 5e-4  # base learning rate, lr = blr * effective batch / 256 (MAE paper, Appendix A.1, ViT-B)
    min_lr: float = 1e-6  # floor of the cosine schedule (official main_finetune.py)
    weight_decay: float = 0.05  # AdamW weight decay (MAE paper, Appendix A.1)
    layer_decay: float = 0.65  # layer-wise lr decay (MAE paper, Appendix A.1: ViT-B 0.65; FINETUNE.md: L/H 0.75)
    drop_path: float = 0.1  # stochastic depth, sets the method Config's drop_path (MAE paper: 0.1 for ViT-B)
    mixup: float = 0.8  # mixup alpha, 0 = off (MAE paper, Appendix A.1)
    cutmix: float = 1.0  # cutmix alpha, 0 = off (MAE paper, Appendix A.1)
    smoothing: float = 0.1  # label smoothing (MAE paper, Appendix A.1)
    randaug_n: int = 2  # RandAugment operations per image, 0 = off (timm rand-m9: 2 ops)
    randaug_m: int = 9  # RandAugment magnitude (MAE paper, Appendix A.1: (9, 0.5))
    reprob: float = 0.25  # random erasing probability (MAE paper, Appendix A.1)
    ema: float = 0.0  # decay of an exponential moving average of the weights, evaluated beside them (0 = off)
    clip_grad: float = 0.0  # clip the gradient norm to this value (0 = off, as the official recipe)
    amp: str = "bf16"  # autocast on GPU: bf16 | fp16 | fp32; CPU runs are fp32
    log_every: int = 20  # write a line to log.jsonl every N steps
    ckpt_every: int = 0  # also save a checkpoint every N steps (0 = only at epoch ends and the last step)
    max_steps: int = 0  # stop after N steps of the full schedule (0 = run all epochs)
    resume: bool = False  # continue the fine-tuning in --out (or the default result folder) exactly; same options

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.accum_iter < 1:
            raise ValueError("--epochs, --batch-size and --accum-iter must be at least 1")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"--layer-decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.smoothing < 1 or not 0 <= self.reprob <= 1 or not 0 <= self.ema < 1:
            raise ValueError("--smoothing and --ema must be in [0, 1), --reprob in [0, 1]")
        if min(self.blr, self.mixup, self.cutmix, self.drop_path, self.warmup_epochs, self.randaug_n) < 0:
            raise ValueError("--blr, --mixup, --cutmix, --drop-path, --warmup-epochs, --randaug-n must not be negative")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"--amp must be bf16, fp16 or fp32, got {self.amp!r}")


@dataclass
class VisualizeConfig:
    num_images: int = 8  # rows of the picture: the first N images of the split
    split: str = "val"  # val | train
    norm_pix: str = "denorm"  # norm-pix models: denorm (each patch's true mean and std put back) | raw (as predicted)
    scale: int = 0  # enlarge each picture by this factor (0 = to about 128 px)

    def __post_init__(self):
        if self.num_images < 1 or self.split not in ("train", "val") or self.norm_pix not in ("denorm", "raw"):
            raise ValueError("--num-images must be at least 1, --split train or val, --norm-pix denorm or raw")


# ----------------------------------------------------------------------------------------------------
# Models from checkpoints: ours ({"model", "method", "config", ...}) and official MAE ones
# ({"model": encoder-only state dict, "args": Namespace}).


def official_config(state, args=None, fields=()):
    """Config values of an official MAE checkpoint, read from its tensor shapes (and `args`, if any)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"the checkpoint has no {key!r}: it is neither ours nor an official MAE/timm ViT one")
    embed_dim, in_chans, patch_size = state["patch_embed.proj.weight"].shape[:3]  # (D, C, P, P)
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)  # pos_embed: (1, 1 + N, D)
    heads = {s["embed_dim"]: s["num_heads"] for s in common.VIT_SIZES.values()}
    if embed_dim not in heads:
        raise ValueError(f"cannot tell the number of heads of a {embed_dim}-d ViT: only the sizes "
                         f"{', '.join(map(str, heads))} of common.VIT_SIZES are known")
    given = vars(args) if args is not None else {}
    values = {k: v for k, v in given.items() if k in fields and k != "drop_path"}  # e.g. norm_pix_loss, mask_ratio
    values.update(img_size=int(grid * patch_size), patch_size=int(patch_size), in_chans=int(in_chans),
                  embed_dim=int(embed_dim),
                  depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
                  num_heads=heads[int(embed_dim)], mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / int(embed_dim))
    if "decoder_embed.weight" in state:  # a full checkpoint (official *_full.pth): the decoder too
        values.update(decoder_embed_dim=int(state["decoder_embed.weight"].shape[0]), decoder_num_heads=16,
                      decoder_depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("decoder_blocks.")))
    return values


def feature_param_names(model):
    """Names of the parameters and buffers that forward_features uses: parameters that get a gradient
    through it on one image, plus every buffer. The rest (decoders, mask tokens) is not evaluated."""
    cfg = model.cfg
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        out = model.forward_features(torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size, device=device))
        if out.ndim != 3:
            raise ValueError(f"forward_features returned shape {tuple(out.shape)}, not (B, N, D): "
                             f"see the contract in README.md")
        out.float().sum().backward()
        used = {n for n, p in model.named_parameters() if p.grad is not None}
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
            p.grad = None
        model.train(was_training)
    return used | {n for n, _ in model.named_buffers()}, out.shape[-1]


def load_model(source, methods, method="", random_init=False, seed=0, overrides=None, need_all=False):
    """(model, info) from a run folder or checkpoint file. `methods` maps a name to (module, class).
    With random_init the architecture is rebuilt and the weights are left random (seeded).
    need_all: every weight must be in the checkpoint (reconstructions need the decoder too)."""
    ckpt = common.load_checkpoint(source)
    name = ckpt.get("method") or method
    if not name:
        raise ValueError(f"{source} does not say which method made it: pass --method")
    if name not in methods:
        raise ValueError(f"{source} holds a {name!r} model, but this checkout has only {', '.join(methods)}: "
                         f"merge its method file or pass --method")
    module, model_cls = methods[name]
    fields = {f.name for f in dataclasses.fields(module.Config)}
    official = "config" not in ckpt
    values = official_config(ckpt["model"], ckpt.get("args"), fields) if official else dict(ckpt["config"])
    for key, value in (overrides or {}).items():
        if key not in fields and not value:  # e.g. --drop-path 0 for a method without drop path
            continue
        if key not in fields:
            raise ValueError(f"{name}'s Config has no field {key!r}, so --{key.replace('_', '-')} cannot be set")
        values[key] = value
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{source} has Config fields {', '.join(unknown)} that {name}'s Config lacks: "
                         f"it was written by another version of the method file")
    cfg = module.Config(**values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
    needed, dim = feature_param_names(model)
    if not random_init:
        own = model.state_dict()
        state = ckpt["model"]
        wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
        if wrong:
            raise ValueError(f"{source}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, the model expects "
                             f"{tuple(own[wrong[0]].shape)}: the checkpoint does not match its config")
        missing, _ = model.load_state_dict(state, strict=False)
        lost = [k for k in missing if need_all or k in needed]
        if lost:
            what = "the whole model (decoder included)" if need_all else "the encoder"
            raise ValueError(f"{source} lacks weights of {what}: {', '.join(lost[:4])}{' ...' if len(lost) > 4 else ''}"
                             f" (a fine-tuned or encoder-only checkpoint? use a full pre-training checkpoint)")
    path = Path(source)
    run_dir = path if path.is_dir() else path.parent
    info = {"method": name, "module": module, "config": cfg, "official": official, "run_dir": run_dir,
            "train": ckpt.get("train") or {}, "ckpt": ckpt, "needed": needed, "dim": dim,
            "encoder_params": sum(p.numel() for n, p in model.named_parameters() if n in needed)}
    return model, info


# ----------------------------------------------------------------------------------------------------
# Export: the encoder as a plain state dict that timm's VisionTransformer loads with strict=True


class TimmViT(nn.Module):
    """The encoder of timm's VisionTransformer (default options: a class token, a learned position
    embedding over 1 + N tokens added after the class token is prepended, pre-norm blocks, the final
    norm), built from common's pieces under timm's state-dict names. `export` loads the exported
    tensors into it and checks that it computes the model's forward_features."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio):
        super().__init__()
        self.patch_embed = common.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.ModuleList([common.Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, imgs):
        x = self.patch_embed(imgs)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 1:]  # (B, N, D): patch tokens after the final norm, as forward_features


TIMM_VIT_NAME = r"cls_token|pos_embed|patch_embed\.proj\.(weight|bias)|norm\.(weight|bias)|" \
                r"blocks\.\d+\.(norm1|attn\.qkv|attn\.proj|norm2|mlp\.fc1|mlp\.fc2)\.(weight|bias)"


def export_timm(model, info, source):
    """(state, kwargs): the encoder's tensors under timm's VisionTransformer names (no decoder, no other
    tensor) and the constructor arguments of timm.models.vision_transformer.VisionTransformer that load
    them (with num_classes=0, qkv_bias=True and norm_layer=partial(nn.LayerNorm, eps=1e-6)). A model
    whose features are not those of such a ViT is refused with a ValueError."""
    own = model.state_dict()
    state = {k: v.detach().clone() for k, v in own.items() if re.fullmatch(TIMM_VIT_NAME, k)}
    lacking = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
                           "norm.weight") if k not in state]
    num_heads = getattr(model.cfg, "num_heads", None)
    if lacking or num_heads is None:
        uses = sorted(n for n in info["needed"] if n not in state and n in own)
        raise ValueError(f"{source}: the {info['method']} encoder is not a ViT with timm's VisionTransformer names "
                         f"(no {', '.join(lacking or ['num_heads in its config'])}; its features use "
                         f"{', '.join(uses[:2]) or 'other tensors'} ...): export writes plain ViT encoders only")
    embed_dim, in_chans, patch_size = state["patch_embed.proj.weight"].shape[:3]  # (D, C, P, P)
    kwargs = dict(img_size=model.cfg.img_size, patch_size=int(patch_size), in_chans=int(in_chans),
                  embed_dim=int(embed_dim), depth=1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks.")),
                  num_heads=int(num_heads), mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / int(embed_dim))
    vit = TimmViT(**kwargs)
    common.load_weights(vit, state, f"the {info['method']} encoder of {source}")  # one-line error on a mismatch
    imgs = torch.randn(2, kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"],
                       generator=torch.Generator().manual_seed(0))
    was_training = model.training
    with torch.no_grad():
        ours, theirs = model.eval().forward_features(imgs), vit.eval()(imgs)  # (B, N, D) each
    model.train(was_training)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        extra = sorted(n for n in info["needed"] if n not in state and n in own)
        raise ValueError(f"{source}: the {info['method']} encoder's features are not those of a plain ViT over its "
                         f"timm-named tensors (it also uses {', '.join(extra[:3]) or 'other computations'}): "
                         f"export writes plain ViT encoders only")
    return state, kwargs


def timm_constructor(kwargs):
    """The Python expression that builds the timm model an exported state dict loads into."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return (f"timm.models.vision_transformer.VisionTransformer({args}, qkv_bias=True, num_classes=0, "
            f"norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6))")


def eval_datasets(ecfg, info, splits=("train", "val")):
    """(data name, *the splits' data sets) following EvalConfig, defaulting to the pre-training data."""
    pre = info["train"]
    data = ecfg.data or pre.get("data") or "imagenet"
    same = data == pre.get("data")
    if data not in common.DATASETS:
        raise ValueError(f"unknown data set {data!r}: choose one of {', '.join(common.DATASETS)}")
    channels, in_chans = common.DATASETS[data][0], info["config"].in_chans
    if channels != in_chans:
        raise ValueError(f"{data} has {channels} channel(s) but the model takes {in_chans}: "
                         f"evaluate on a data set with {in_chans} channel(s)")
    data_dir = ecfg.data_dir or (pre.get("data_dir") if same else None) or "data"
    given = {"train": ecfg.train_size, "val": ecfg.val_size}
    sizes = {k: v if v >= 0 else (pre.get(f"{k}_size", 0) if same else 0) for k, v in given.items()}
    return data, *(common.load_dataset(data, split, data_dir, sizes[split], info["config"].img_size, ecfg.download)
                   for split in splits)


def num_classes(dataset):
    return len(dataset.classes)


# ----------------------------------------------------------------------------------------------------
# Features, kNN and the linear probe


def pooled_features(model, imgs):
    """The protocol's feature: forward_features (B, N, D), mean over the N patch tokens -> (B, D)."""
    return model.forward_features(imgs).mean(dim=1)


def loader_for(dataset, tf, batch_size, num_workers, device, seed=0, epoch=0, rank=0, world=1):
    """An in-order loader over `dataset` (this process's share of it); augmentation seeded by (seed, epoch, index)."""
    data = common.SeededDataset(dataset, tf, None, seed)
    sampler = common.EpochSampler(len(dataset), False, seed=seed, rank=rank, world=world)
    sampler.set_epoch(epoch)
    return common.make_loader(data, batch_size, sampler, num_workers, False, device)


def amp_dtype(device, amp="bf16"):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp] if device.type == "cuda" else None


@torch.no_grad()
def extract_features(model, dataset, tf, batch_size, num_workers, device, progress=None, label="", seed=0, epoch=0):
    """Pooled features (M, D) and labels (M,) of a whole data set, in order, the model in eval mode."""
    loader = loader_for(dataset, tf, batch_size, num_workers, device, seed, epoch)
    model.eval()
    feats, labels = [], []
    task = progress.add_task(label, total=len(loader)) if progress else None
    for imgs, y, _ in loader:
        with torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp_dtype(device) is not None):
            feats.append(pooled_features(model, imgs.to(device, non_blocking=True)).float().cpu())  # (B, D)
        labels.append(y)
        if progress:
            progress.advance(task)
    return torch.cat(feats), torch.cat(labels)


def accuracy(scores, labels, topk=(1, 5)):
    """Fraction of rows whose label is among the k highest scores, for each k (k capped at the classes)."""
    top = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices  # (M, k)
    hit = top == labels.unsqueeze(1)
    return [hit[:, : min(k, scores.shape[1])].any(1).float().mean().item() for k in topk]


def knn_scores(train_feats, train_labels, test_feats, classes, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN votes (M_test, classes): cosine similarity of L2-normalised features, the k nearest
    training features vote for their label with weight exp(similarity / temperature)."""
    train_feats = F.normalize(train_feats.float(), dim=1)
    k = min(k, len(train_feats))
    votes = []
    for part in F.normalize(test_feats.float(), dim=1).split(chunk):
        sim, idx = (part @ train_feats.T).topk(k, dim=1)  # (b, k)
        weight = (sim / temperature).exp()
        votes.append(torch.zeros(len(part), classes).scatter_add_(1, train_labels[idx], weight))
    return torch.cat(votes)  # (M_test, classes)


class LinearProbe(nn.Module):
    """BatchNorm without affine parameters, then a linear classifier (official main_linprobe.py)."""

    def __init__(self, dim, classes):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, feats):
        return self.head(self.bn(feats))  # (B, classes)


# ----------------------------------------------------------------------------------------------------
# Fine-tuning


class Classifier(nn.Module):
    """The encoder's pooled features, then the global-pool head: LayerNorm + Linear (official
    models_vit.py with global_pool, head initialised with std 2e-5)."""

    def __init__(self, encoder, dim, classes):
        super().__init__()
        self.encoder = encoder
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)

    def forward(self, imgs):
        return self.head(self.fc_norm(pooled_features(self.encoder, imgs)))  # (B, classes)


def layer_id(name, encoder_blocks, depth):
    """Layer of a parameter for lr decay (official util/lr_decay.py): 0 for the embeddings (patch_embed,
    cls_token, pos_embed), i + 1 for blocks.i, then decoder_blocks.i where the features use them (a
    RevColV2 top-down column: they come after the encoder's), depth + 1 for everything after the blocks."""
    name = name.removeprefix("encoder.")
    if name.startswith("patch_embed") or name in ("cls_token", "pos_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1  # DEVIATION: a RevColV2 column is one layer (v1: level + column)
    if name.startswith("decoder_blocks."):
        return encoder_blocks + int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_groups(model, weight_decay, layer_decay):
    """AdamW groups with an "lr_scale" each: block i (0-based) of a depth-L stack learns at
    lr * layer_decay ** (L - i), the embeddings at lr * layer_decay ** (L + 1), the final norm and the
    head at lr. The stack is blocks.*, then any trainable decoder_blocks.* (only a model whose features run
    them has them trainable here). No weight decay on biases, norms, tokens and position embeddings."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n.removeprefix("encoder.") for n, _ in named]
    encoder_blocks = len({n.split(".")[1] for n in names if n.startswith("blocks.")})
    depth = encoder_blocks + len({n.split(".")[1] for n in names if n.startswith("decoder_blocks.")})
    groups = {}
    for name, p in named:
        lid = layer_id(name, encoder_blocks, depth)
        skip = p.ndim <= 1 or "token" in name or "pos_embed" in name
        group = groups.setdefault((lid, skip), {"params": [], "names": [], "lr_scale": layer_decay ** (depth + 1 - lid),
                                                "weight_decay": 0.0 if skip else weight_decay})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def finetune_transform(data, img_size, fcfg):
    """The MAE fine-tuning augmentation: RandomResizedCrop (0.08, 1), flip, RandAugment, normalise,
    random erasing (official util/datasets.py through timm's create_transform)."""
    from torchvision.transforms import InterpolationMode, v2

    _, (mean, std) = common.DATASETS[data]
    steps = [v2.ToImage(), v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=InterpolationMode.BICUBIC),
             v2.RandomHorizontalFlip()]
    if fcfg.randaug_n:
        steps += [v2.ToDtype(torch.uint8, scale=True), v2.RandAugment(fcfg.randaug_n, fcfg.randaug_m)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if fcfg.reprob:
        steps.append(v2.RandomErasing(p=fcfg.reprob, value="random"))
    return v2.Compose(steps)


def soft_targets(imgs, labels, classes, fcfg):
    """Mixup or cutmix (one of the two, chosen per batch) and label smoothing: (images, (B, classes))."""
    from torchvision.transforms import v2

    mixers = ([v2.MixUp(alpha=fcfg.mixup, num_classes=classes)] if fcfg.mixup else []) + \
             ([v2.CutMix(alpha=fcfg.cutmix, num_classes=classes)] if fcfg.cutmix else [])
    if mixers:
        imgs, targets = v2.RandomChoice(mixers)(imgs, labels)
    else:
        targets = F.one_hot(labels, classes).float()
    return imgs, targets * (1 - fcfg.smoothing) + fcfg.smoothing / classes  # smoothing commutes with mixing


@torch.no_grad()
def evaluate_classifier(model, loader, device, world, dtype):
    """(top-1, top-5, mean cross-entropy) over a loader, summed across processes."""
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, images
    for imgs, labels, _ in loader:
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(imgs).float()  # (B, classes)
        top1, top5 = accuracy(logits, labels)
        n = len(labels)
        total += torch.tensor([top1 * n, top5 * n, F.cross_entropy(logits, labels, reduction="sum").item(), n],
                              dtype=torch.float64, device=device)
    model.train()
    total = common.all_reduce_sum(total, world)
    n = total[3].clamp(min=1)
    return (total[0] / n).item(), (total[1] / n).item(), (total[2] / n).item()


# ----------------------------------------------------------------------------------------------------
# Reconstructions


def _to_display(x, data):
    """(B, C, H, W) normalised images -> (B, 3, H, W) in [0, 1] (grey repeated to 3 channels)."""
    _, (mean, std) = common.DATASETS[data]
    x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return x.clamp(0, 1).expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.clamp(0, 1)


def _to_pixels(grid_values, size):
    """(B, M) per-position values on a square grid -> (B, 1, H, W) by nearest upsampling."""
    g = math.isqrt(grid_values.shape[1])
    if g * g != grid_values.shape[1] or size % g:
        raise ValueError(f"a (B, {grid_values.shape[1]}) mask is not a square grid dividing {size} px")
    return F.interpolate(grid_values.float().view(-1, 1, g, g), size=(size, size), mode="nearest")


@torch.no_grad()
def reconstructions(model, dataset, data, img_size, sample_inputs, n=8, seed=0, norm_pix="denorm"):
    """Columns of the reconstruction picture for the first n images of `dataset`, each (n, 3, H, W) in
    [0, 1], as a list of (label, images), and a note saying how norm-pix predictions are shown.
    Masks and the other per-sample inputs come from `sample_inputs` seeded by (seed, index)."""
    ds = common.SeededDataset(dataset, common.transform(data, img_size, False), sample_inputs, seed)
    items = [ds[(0, i)] for i in range(min(n, len(dataset)))]
    imgs = torch.stack([it[0] for it in items])  # (B, C, H, W), normalised
    inputs = {k: torch.stack([it[2][k] for it in items]) for k in items[0][2]}
    if "labels" in inspect.signature(model.forward).parameters:
        inputs["labels"] = torch.tensor([it[1] for it in items])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # for a method that draws randomness inside forward
        _, pred, mask = model(imgs.to(device), **{k: v.to(device) for k, v in inputs.items()})
    model.train(was_training)
    pred, mask = pred.float().cpu(), mask.float().cpu()
    B, C, H, W = imgs.shape
    if pred.ndim == 4 and pred.shape == imgs.shape:  # a method that predicts whole images
        pred = common.patchify(pred, model.cfg.patch_size)
    if pred.ndim != 3 or pred.shape[-1] % C or pred.shape[1] * pred.shape[-1] != C * H * W:
        raise ValueError(f"forward returned pred of shape {tuple(pred.shape)}: visualize draws pixel predictions "
                         f"(B, N, P*P*C) or (B, C, H, W) for images of shape {tuple(imgs.shape)}")
    p = math.isqrt(pred.shape[-1] // C)
    target = common.patchify(imgs, p)  # (B, N, P*P*C)
    note = "reconstructions are in the input's pixel space"
    if getattr(model.cfg, "norm_pix_loss", False):  # the official field name of a per-patch normalised target
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        if norm_pix == "denorm":
            pred = pred * (var + 1e-6) ** 0.5 + mean
            note = ("norm-pix target: predictions de-normalised with each patch's TRUE mean and std "
                    "(taken from the original)")
        else:
            target = (target - mean) / (var + 1e-6) ** 0.5
            note = "norm-pix target: predictions and pasted patches in the normalised space, shown as 0.5 + value / 4"
    pix_mask = _to_pixels(mask, H)  # (B, 1, H, W), 1 = masked
    show = (lambda x: (0.5 + common.unpatchify(x, p, C) / 4).clamp(0, 1).expand(-1, 3, -1, -1)) \
        if note.endswith("/ 4") else (lambda x: _to_display(common.unpatchify(x, p, C), data))
    original = _to_display(imgs, data)
    masked = original * (1 - pix_mask) + 0.5 * pix_mask  # masked patches grey
    recon = show(pred)
    pasted = recon * pix_mask + show(target) * (1 - pix_mask)
    columns = [("original", original), (f"masked ({mask.mean().item():.0%})", masked), ("reconstruction", recon),
               ("recon + visible", pasted)]
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    for key, value in inputs.items():  # boolean (N,) inputs, e.g. which masked tokens a method throws away
        if value.dtype == torch.bool and value.ndim == 2:
            overlay = _to_pixels(value, H)
            columns.append((f"{key} (red)", masked * (1 - 0.6 * overlay) + red * 0.6 * overlay))
    return columns, note


PAD, LABEL_H, TITLE_LINES, LINE_H = 2, 14, 3, 12


def grid_size(rows, cols, cell):
    """(width, height) in pixels of a picture of rows x cols cells of cell x cell pixels."""
    return cols * cell + (cols + 1) * PAD, TITLE_LINES * LINE_H + LABEL_H + rows * cell + (rows + 1) * PAD


def save_grid(columns, path, title="", scale=0):
    """Write the columns as a PNG grid: a title band (up to 3 lines), a label above each column."""
    from PIL import Image, ImageDraw, ImageFont

    rows, size = columns[0][1].shape[0], columns[0][1].shape[-1]
    scale = scale or max(1, round(128 / size))
    cell = size * scale
    width, height = grid_size(rows, len(columns), cell)
    canvas = Image.new("RGB", (width, height), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    lines, words = [], title.split()
    while words and len(lines) < TITLE_LINES:  # greedy word wrap, cut after TITLE_LINES lines
        line = words.pop(0)
        while words and draw.textlength(line + " " + words[0], font=font) <= width - 2 * PAD:
            line += " " + words.pop(0)
        lines.append(line)
    for i, line in enumerate(lines):
        draw.text((PAD, i * LINE_H), line, fill="black", font=font)
    top = TITLE_LINES * LINE_H + LABEL_H
    for c, (label, imgs) in enumerate(columns):
        x = PAD + c * (cell + PAD)
        draw.text((x, top - LABEL_H + 1), label, fill="black", font=font)
        big = imgs.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest: pixels stay visible
        for r in range(rows):
            array = (big[r].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
            canvas.paste(Image.fromarray(array), (x, top + PAD + r * (cell + PAD)))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return width, height


def save_reconstructions(model, dataset, data, img_size, sample_inputs, path, seed=0, n=8, norm_pix="denorm",
                         title="", scale=0):
    """The reconstruction picture of `model` on the first n images of `dataset`, written to `path`
    (used by `cli.py visualize` and by common.train's --vis-every)."""
    columns, note = reconstructions(model, dataset, data, img_size, sample_inputs, n, seed, norm_pix)
    return save_grid(columns, path, f"{title} {note}; masks seed {seed}".strip(), scale)


# ----------------------------------------------------------------------------------------------------
# Result folders: config, code and git hash beside every number


def machine():
    """A short description of where a number was measured."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def pretraining_summary(info):
    """What the encoder was pre-trained on, from the run folder's log.jsonl: (text, seconds or None)."""
    if info["official"]:
        return "official checkpoint", None
    train = info["train"]
    rows = []
    log = info["run_dir"] / "log.jsonl"
    if log.is_file():
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    epochs = max([r["epoch"] for r in rows if "epoch" in r] or [0])
    seconds = max([r["elapsed_s"] for r in rows if "elapsed_s" in r] or [0]) or None
    if info["ckpt"].get("finetune"):
        return f"fine-tuned {epochs:g} ep, see {info['run_dir']}", None
    images = f"{train['train_size']:,}" if train.get("train_size") else "all"
    return f"{epochs:g} ep x {images} img, batch {train.get('batch_size', '?')}", seconds


def start_result(out, command, ecfg, ccfg, info, data, code_files, world=1, fresh=True):
    """Create the result folder with config.json and code/ (this code, and the pre-training code that
    the checkpoint carries); return the metadata that result.json repeats. fresh: drop an earlier result
    and log (not when a fine-tuning run is continued)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a result folder: pass a folder")
    (out / "code").mkdir(parents=True, exist_ok=True)
    for f in ("result.json", "log.jsonl") if fresh else ("result.json",):
        (out / f).unlink(missing_ok=True)
    for f in code_files:
        (out / "code" / Path(f).name).write_text(Path(f).read_text())
    for name, text in (info["ckpt"].get("code") or {}).items():
        (out / "code" / "pretrain").mkdir(exist_ok=True)
        (out / "code" / "pretrain" / name).write_text(text)
    pretraining, pretrain_s = pretraining_summary(info)
    cfg = info["config"]
    meta = {"command": command, "method": info["method"], "data": data, "random_init": ecfg.random_init,
            "seed": ecfg.seed, "pretrain_seed": info["train"].get("seed"),
            "pretraining": "none (random init)" if ecfg.random_init else pretraining,
            "pretrain_wall_s": None if ecfg.random_init else pretrain_s,
            "encoder": f"{info['encoder_params'] / 1e6:.2f}M params, {cfg.img_size} px",
            "settings": settings_text(command, ccfg), "source": str(info["run_dir"]), "git": common.git_hash(),
            "pretrain_git": info["ckpt"].get("git"), "machine": machine(), "world_size": world,
            "torch": torch.__version__}
    config = {**meta, "eval": dataclasses.asdict(ecfg), command: dataclasses.asdict(ccfg),
              "model_config": dataclasses.asdict(cfg), "pretrain_train": info["train"]}
    if info["official"] and info["ckpt"].get("args") is not None:
        config["official_args"] = {k: repr(v) for k, v in vars(info["ckpt"]["args"]).items()}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    return meta


def settings_text(command, ccfg):
    if command == "knn":
        return f"kNN k={ccfg.k}, T={ccfg.temperature}"
    if command == "linprobe":
        return f"linear probe {ccfg.epochs} ep{', augmented' if ccfg.augment else ''}"
    return f"fine-tune {ccfg.epochs} ep"


def append_log(out, row):
    with open(Path(out) / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def finish_result(out, meta, metrics, wall_s):
    result = {**meta, "metrics": metrics, "wall_s": round(wall_s, 1)}
    (Path(out) / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------------------------------
# The commands (cli.py parses the options, loads the model with load_model and calls these)


def default_out(info, command, ecfg, data):
    return info["run_dir"] / "eval" / f"{command}{'-random-init' if ecfg.random_init else ''}-{data}-s{ecfg.seed}"


def _progress(console, disable=False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    console=console, disable=disable, transient=True)


def run_knn(model, info, ecfg, kcfg, code_files, console):
    """Weighted kNN top-1 / top-5 of the validation split against the training split's features."""
    start = time.perf_counter()
    data, train_set, val_set = eval_datasets(ecfg, info)
    out = Path(ecfg.out or default_out(info, "knn", ecfg, data))
    meta = start_result(out, "knn", ecfg, kcfg, info, data, code_files)
    device = common.pick_device(ecfg.device)
    model.to(device)
    tf = common.transform(data, info["config"].img_size, False)
    with _progress(console) as bar:
        train_f, train_y = extract_features(model, train_set, tf, kcfg.batch_size, ecfg.num_workers, device, bar,
                                            "train features")
        val_f, val_y = extract_features(model, val_set, tf, kcfg.batch_size, ecfg.num_workers, device, bar,
                                        "val features")
    scores = knn_scores(train_f, train_y, val_f, num_classes(train_set), kcfg.k, kcfg.temperature)
    top1, top5 = accuracy(scores, val_y)
    metrics = {"top1": top1, "top5": top5, "train_images": len(train_set), "val_images": len(val_set)}
    return finish_result(out, meta, metrics, time.perf_counter() - start), out


def run_linprobe(model, info, ecfg, lcfg, code_files, console):
    """Frozen encoder, BatchNorm (no affine) + Linear on the pooled features; top-1 / top-5 per epoch."""
    start = time.perf_counter()
    data, train_set, val_set = eval_datasets(ecfg, info)
    out = Path(ecfg.out or default_out(info, "linprobe", ecfg, data))
    meta = start_result(out, "linprobe", ecfg, lcfg, info, data, code_files)
    device = common.pick_device(ecfg.device)
    model.to(device).requires_grad_(False)
    img_size, classes = info["config"].img_size, num_classes(train_set)
    eval_tf, aug_tf = common.transform(data, img_size, False), common.transform(data, img_size, True)
    torch.manual_seed(ecfg.seed)
    probe = LinearProbe(info["dim"], classes).to(device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0, momentum=0.9, weight_decay=lcfg.weight_decay)
    steps_per_epoch = max(len(train_set) // lcfg.batch_size, 1)  # the last partial batch is dropped, as official
    total, warmup = lcfg.epochs * steps_per_epoch, lcfg.warmup_epochs * steps_per_epoch
    peak_lr, step = lcfg.blr * min(lcfg.batch_size, len(train_set)) / 256, 0
    g = torch.Generator().manual_seed(ecfg.seed)  # the order of the cached features, every epoch
    with _progress(console) as bar:
        val_f, val_y = extract_features(model, val_set, eval_tf, lcfg.batch_size, ecfg.num_workers, device, bar,
                                        "val features")
        if not lcfg.augment:  # the cache: one pass over the training images, then only the head trains
            train_f, train_y = extract_features(model, train_set, eval_tf, lcfg.batch_size, ecfg.num_workers,
                                                device, bar, "train features")
        task = bar.add_task("probe", total=lcfg.epochs)
        for epoch in range(lcfg.epochs):
            if lcfg.augment:  # new crops every epoch, seeded by (seed, epoch, index)
                train_f, train_y = extract_features(model, train_set, aug_tf, lcfg.batch_size, ecfg.num_workers,
                                                    device, seed=ecfg.seed, epoch=epoch)
            order = torch.randperm(len(train_f), generator=g)
            probe.train()
            for i in range(steps_per_epoch):
                idx = order[i * lcfg.batch_size : (i + 1) * lcfg.batch_size]
                for group in optimizer.param_groups:
                    group["lr"] = common.lr_at(step, total, warmup, peak_lr, 0.0)
                loss = F.cross_entropy(probe(train_f[idx].to(device)), train_y[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
            probe.eval()
            with torch.no_grad():
                scores = torch.cat([probe(f.to(device)).cpu() for f in val_f.split(4096)])
            top1, top5 = accuracy(scores, val_y)
            append_log(out, {"epoch": epoch + 1, "train_loss": loss.item(), "top1": top1, "top5": top5})
            bar.update(task, advance=1, description=f"probe: top-1 {top1:.3f}")
    torch.save({"probe": probe.state_dict()}, out / "probe.pt")
    metrics = {"top1": top1, "top5": top5, "train_images": len(train_set), "val_images": len(val_set)}
    return finish_result(out, meta, metrics, time.perf_counter() - start), out


FINETUNE_RESUME_MAY_CHANGE = {"resume", "max_steps", "log_every", "ckpt_every", "num_workers", "device", "out"}


def run_finetune(model, info, ecfg, fcfg, code_files, console):
    """The MAE fine-tuning recipe on the encoder + a global-pool head; top-1 / top-5 after every epoch.
    One process or many under torchrun (DDP; rank 0 writes the result folder); --resume continues it exactly."""
    start = time.perf_counter()
    data, train_set, val_set = eval_datasets(ecfg, info)
    out = Path(ecfg.out or default_out(info, "finetune", ecfg, data))
    tcfg = common.TrainConfig(
        data=data, epochs=fcfg.epochs, warmup_epochs=fcfg.warmup_epochs, batch_size=fcfg.batch_size,
        accum_iter=fcfg.accum_iter, blr=fcfg.blr, min_lr=fcfg.min_lr, weight_decay=fcfg.weight_decay,
        clip_grad=fcfg.clip_grad, seed=ecfg.seed, num_workers=ecfg.num_workers, amp=fcfg.amp, log_every=fcfg.log_every,
        ckpt_every=fcfg.ckpt_every, max_steps=fcfg.max_steps, out=str(out), resume=fcfg.resume, device=ecfg.device)
    rank, world, device = common.setup(tcfg)
    common.epoch_steps(len(train_set), world, tcfg)  # before anything is written
    ckpt = None
    if fcfg.resume:
        ckpt = common.load_checkpoint(out / "checkpoint.pt")
        if "optimizer" not in ckpt or "finetune" not in ckpt:
            raise ValueError(f"{out / 'checkpoint.pt'} is not a fine-tuning checkpoint that can be continued")
        now = {**dataclasses.asdict(ecfg), **dataclasses.asdict(fcfg)}
        saved = {**ckpt.get("eval", {}), **ckpt["finetune"]}
        changed = sorted(k for k in now if k not in FINETUNE_RESUME_MAY_CHANGE and k in saved and saved[k] != now[k])
        if changed:
            raise ValueError(f"--resume continues {out} with the options it was started with; these differ: "
                             + ", ".join(f"--{k.replace('_', '-')} {saved[k]} there, {now[k]} here" for k in changed))
    meta = start_result(out, "finetune", ecfg, fcfg, info, data, code_files, world, fresh=ckpt is None) \
        if rank == 0 else None
    classes = num_classes(train_set)
    for name, p in model.named_parameters():  # train what the features use; decoders stay frozen and unused
        p.requires_grad_(name in info["needed"])
    torch.manual_seed(ecfg.seed)
    clf = Classifier(model, info["dim"], classes).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        clf.fc_norm.load_state_dict(ckpt["head"]["fc_norm"])
        clf.head.load_state_dict(ckpt["head"]["head"])
    groups = layer_decay_groups(clf, fcfg.weight_decay, fcfg.layer_decay)
    optimizer = torch.optim.AdamW(groups, lr=0.0, fused=device.type == "cuda")  # betas (0.9, 0.999): official
    ema = None
    if fcfg.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(clf, multi_avg_fn=get_ema_multi_avg_fn(fcfg.ema), use_buffers=True)
    train_data = common.SeededDataset(train_set, finetune_transform(data, info["config"].img_size, fcfg), None,
                                      ecfg.seed)
    sampler = common.EpochSampler(len(train_set), True, seed=ecfg.seed, rank=rank, world=world)
    loader = common.make_loader(train_data, fcfg.batch_size, sampler, ecfg.num_workers, True, device)
    val_loader = loader_for(val_set, common.transform(data, info["config"].img_size, False), fcfg.batch_size,
                            min(ecfg.num_workers, 2), device, rank=rank, world=world)
    dtype = common.autocast_dtype(fcfg.amp, device)

    def loss_of(net, imgs, labels, inputs):
        imgs, targets = soft_targets(imgs, labels, classes, fcfg)  # mixup / cutmix + smoothing, drawn per step
        return F.cross_entropy(net(imgs).float(), targets)

    def end_of_epoch(epoch):
        metrics = dict(zip(("top1", "top5", "val_loss"), evaluate_classifier(clf, val_loader, device, world, dtype)))
        if ema is not None:
            metrics.update(zip(("ema_top1", "ema_top5", "ema_val_loss"),
                               evaluate_classifier(ema.module, val_loader, device, world, dtype)))
        return metrics

    def model_state():  # the encoder under its own names: knn / linprobe / visualize / finetune read it as they read
        return {"model": model.state_dict(),  # a pre-training checkpoint
                "head": {"fc_norm": clf.fc_norm.state_dict(), "head": clf.head.state_dict()}}

    saved = {"method": info["method"], "config": dataclasses.asdict(info["config"]), "train": info["train"],
             "code": info["ckpt"].get("code"), "git": common.git_hash(), "finetune": dataclasses.asdict(fcfg),
             "eval": dataclasses.asdict(ecfg)}
    common.train(clf, optimizer, tcfg, loader, sampler, loss_of, end_of_epoch, model_state, saved, ckpt, ema,
                 console=console, title="finetune")
    if rank != 0:
        return None, out
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    metrics = next((r for r in reversed(rows) if "top1" in r), None) or {"step": 0, **end_of_epoch(0)}
    metrics = {k: v for k, v in metrics.items() if k not in ("epoch", "elapsed_s")}
    metrics.update(train_images=len(train_set), val_images=len(val_set))
    return finish_result(out, meta, metrics, time.perf_counter() - start), out


def run_visualize(model, info, ecfg, vcfg, sample_inputs, console):
    """A PNG grid per image: original, masked input, reconstruction, reconstruction with the visible patches.
    Returns the picture's path and (width, height)."""
    data, dataset = eval_datasets(ecfg, info, (vcfg.split,))
    name = f"reconstructions{'-random-init' if ecfg.random_init else ''}-{data}-{vcfg.split}-s{ecfg.seed}.png"
    path = Path(ecfg.out or info["run_dir"] / name)
    model.to(common.pick_device(ecfg.device))
    title = f"{info['method']}{' (random init)' if ecfg.random_init else ''}, {data} {vcfg.split}."
    size = save_reconstructions(model, dataset, data, info["config"].img_size, sample_inputs, path, ecfg.seed,
                                vcfg.num_images, vcfg.norm_pix, title, vcfg.scale)
    return path, size
