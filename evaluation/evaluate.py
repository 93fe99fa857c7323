"""Evaluation plumbing shared by every method: kNN, linear probe, fine-tuning (on common.train), reconstruction
pictures, result folders, export to timm. It names no method: a checkpoint's model is used only through
forward_features(imgs) -> (B, N, D) and forward(imgs, **inputs) -> (loss, pred, mask). Protocol: docs/evaluation.md."""

import inspect
import json
import math
import os
import platform
import re
import shutil
import sys
import textwrap
import time
import types
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.progress import Progress
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import common
import data_sets

# Options of the evaluation commands: EvalConfig is shared, each command adds its own dataclass.


def train_config(cfg, **values):
    """common.TrainConfig from the fields `cfg` shares with it (so it checks them, with its errors) and `values`."""
    names = {f.name for f in fields(common.TrainConfig)}
    return common.TrainConfig(**{k: v for k, v in asdict(cfg).items() if k in names}, **values)


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
        common.check_options(self, non_negative="num_workers")
        common.check_device(self.device)


@dataclass
class KnnConfig:
    k: int = 20  # neighbours that vote (Wu et al. 2018; DINO eval_knn.py)
    temperature: float = 0.07  # votes are weighted by exp(cosine similarity / temperature)
    batch_size: int = 256  # images per step of feature extraction
    pixels: bool = False  # the raw normalised pixels as features instead of the encoder's: the floor of no encoder

    def __post_init__(self):
        if self.k < 1 or self.temperature <= 0 or self.batch_size < 1:
            raise ValueError(f"--k and --batch-size must be at least 1 and --temperature positive, got {self}")


@dataclass
class LinprobeConfig:
    epochs: int = 90  # MAE paper, Appendix A.1: 90 epochs
    warmup_epochs: int = 10  # official main_linprobe.py
    batch_size: int = 256  # images per step (official: 16,384 with LARS)
    blr: float = 0.1  # base learning rate, lr = blr * batch / 256 (official main_linprobe.py)
    weight_decay: float = 0.0  # official main_linprobe.py: none
    augment: bool = False  # RandomResizedCrop + flip every epoch, as official (slow: no feature cache)
    pixels: bool = False  # the raw normalised pixels as features instead of the encoder's: the floor of no encoder

    def __post_init__(self):
        train_config(self)  # every field but augment is one of common.TrainConfig's


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
    min_crop: float = 0.08  # RandomResizedCrop's smallest crop, a fraction of the area (official: timm's 0.08)
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
        train_config(self)  # the fields shared with common.TrainConfig; then the recipe's own
        common.check_options(self, non_negative="mixup cutmix drop_path randaug_n")
        if not (0 < self.layer_decay <= 1 and 0 <= self.smoothing < 1 and 0 <= self.ema < 1 and 0 <= self.reprob <= 1):
            raise ValueError("--layer-decay must be in (0, 1], --smoothing and --ema in [0, 1), --reprob in [0, 1]")
        if not 0 < self.min_crop <= 1:
            raise ValueError(f"--min-crop must be in (0, 1] (a fraction of the image's area), got {self.min_crop}")


@dataclass
class VisualizeConfig:
    num_images: int = 8  # rows of the picture: the first N images of the split
    split: str = "val"  # val | train
    norm_pix: str = "denorm"  # norm-pix models: denorm (each patch's true mean and std put back) | raw (as predicted)
    scale: int = 0  # enlarge each picture by this factor (0 = to about 128 px)

    def __post_init__(self):
        if self.num_images < 1 or self.split not in ("train", "val") or self.norm_pix not in ("denorm", "raw"):
            raise ValueError("--num-images must be at least 1, --split train or val, --norm-pix denorm or raw")


@dataclass
class ExportConfig:
    out: str = ""  # the file to write (default: <run folder>/encoder_timm.pth)
    overwrite: bool = False  # replace --out if it exists
    method: str = ""  # method of a checkpoint that does not name one (official MAE checkpoints; default mae)


# Models from checkpoints: ours ({"model", "method", "config", ...}) and official MAE ones ({"model", "args"}).


def model_class(module):
    """A method file's model: its nn.Module class with a forward_features method (of several, the most derived)."""
    found = [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__]
    found = [c for c in found if issubclass(c, nn.Module) and hasattr(c, "forward_features")]
    found = [c for c in found if not any(issubclass(d, c) for d in found if d is not c)]
    if len(found) != 1 or not is_dataclass(getattr(module, "Config", None)):
        raise ValueError(f"{module.__file__} needs a dataclass Config and one model class with forward_features")
    return found[0]


def load_method(name, source, filename):
    """(module, model class) of a method file's source, run as the module `name` and kept in sys.modules, where
    data-loading workers find its functions."""
    if name not in sys.modules:
        code = compile(source, filename, "exec")  # a SyntaxError: bad input, for main
        module = sys.modules[name] = types.ModuleType(name)
        module.__file__, module.__source__ = filename, source
        exec(code, vars(module))
    if getattr(sys.modules.get(name), "__source__", None) != source:
        raise ValueError(f"{filename}: the name {name!r} is taken by a method or a module: rename the file")
    return sys.modules[name], model_class(sys.modules[name])


def vit_shape(state):
    """The sizes of a ViT but num_heads, read off its state dict (a position embedding over 1 + N tokens)."""
    embed_dim, in_chans, patch = map(int, state["patch_embed.proj.weight"].shape[:3])  # (D, C, P, P)
    img_size = math.isqrt(state["pos_embed"].shape[1] - 1) * patch  # pos_embed: (1, 1 + N, D)
    ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    sizes = dict(img_size=img_size, patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, mlp_ratio=ratio)
    return {**sizes, "depth": len({k.split(".")[1] for k in state if k.startswith("blocks.")})}


def official_config(state, args, names):
    """Config values of an official MAE checkpoint: the sizes from its tensors, the other `names` from its args."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise ValueError(f"the checkpoint has no {key!r}: it is neither ours nor an official MAE/timm ViT one")
    shape, heads = vit_shape(state), {s["embed_dim"]: s["num_heads"] for s in common.VIT_SIZES.values()}
    if shape["embed_dim"] not in heads:
        known = ", ".join(map(str, heads))
        raise ValueError(f"cannot tell the heads of a {shape['embed_dim']}-d ViT: common.VIT_SIZES knows {known}")
    given = {k: v for k, v in (vars(args) if args else {}).items() if k in names and k != "drop_path"}
    values = {**given, **shape, "num_heads": heads[shape["embed_dim"]]}  # given: e.g. norm_pix_loss, mask_ratio
    if "decoder_embed.weight" in state:  # a full checkpoint (official *_full.pth): the decoder too
        depth = len({k.split(".")[1] for k in state if k.startswith("decoder_blocks.")})
        values.update(decoder_embed_dim=state["decoder_embed.weight"].shape[0], decoder_depth=depth)
        values["decoder_num_heads"] = 16  # the official decoder's
    return values


def feature_param_names(model):
    """(names, D): the parameters that get a gradient through forward_features and every buffer (the rest, decoders
    and mask tokens, is not evaluated); D, the width of the features."""
    cfg, params = model.cfg, dict(model.named_parameters())
    flags, was_training = [p.requires_grad for p in params.values()], model.training
    imgs = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size).to(next(model.parameters()))
    out = model.requires_grad_(True).eval().forward_features(imgs)
    if out.ndim != 3:
        raise ValueError(f"forward_features returned shape {tuple(out.shape)}, not (B, N, D): see docs/evaluation.md")
    grads = torch.autograd.grad(out.float().sum(), list(params.values()), allow_unused=True)
    for p, flag in zip(params.values(), flags):
        p.requires_grad_(flag)
    model.train(was_training)
    used = {n for n, g in zip(params, grads) if g is not None}
    return used | {n for n, _ in model.named_buffers()}, out.shape[-1]


def load_model(source, find_method, method="", random_init=False, seed=0, overrides=None, need_all=False):
    """(model, info) from a run folder or checkpoint file; find_method(name, checkpoint) -> (method module, model
    class), e.g. cli.method_of. random_init: weights left random (seeded); need_all: the decoder must be there too."""
    ckpt = common.load_checkpoint(source)
    name = ckpt.get("method") or method
    if not name:
        raise ValueError(f"{source} does not say which method made it: pass --method")
    module, model_cls = find_method(name, ckpt)
    names = {f.name for f in fields(module.Config)}
    official = "config" not in ckpt
    values = official_config(ckpt["model"], ckpt.get("args"), names) if official else dict(ckpt["config"])
    for key, value in (overrides or {}).items():
        if key in names:
            values[key] = value
        elif value:  # (--drop-path 0 is fine for a method without drop path)
            raise ValueError(f"{name}'s Config has no field {key!r}, so --{key.replace('_', '-')} cannot be set")
    unknown = ", ".join(sorted(set(values) - names))
    if unknown:
        raise ValueError(f"{source} has Config fields that {name}'s Config lacks ({unknown}): another version wrote it")
    cfg = module.Config(**values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
    needed, dim = feature_param_names(model)
    if not random_init:
        own, state = model.state_dict(), ckpt["model"]
        lost = [k for k in own if k not in state and (need_all or k in needed)]
        if lost:
            what = "the whole model (decoder included)" if need_all else "the encoder"
            listed = ", ".join(lost[:4]) + (" ..." if len(lost) > 4 else "")
            hint = "a fine-tuned or encoder-only checkpoint? use a full pre-training checkpoint"
            raise ValueError(f"{source} lacks weights of {what}: {listed} ({hint})")
        common.load_weights(model, {**own, **{k: v for k, v in state.items() if k in own}}, source)  # one-line errors
    run_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    params = sum(p.numel() for n, p in model.named_parameters() if n in needed)
    info = dict(method=name, module=module, config=cfg, official=official, run_dir=run_dir, ckpt=ckpt, needed=needed)
    info.update(train=ckpt.get("train") or {}, dim=dim, encoder_params=params)
    return model, info


# Export: the encoder as a plain state dict that timm's VisionTransformer loads with strict=True


class TimmViT(nn.Module):
    """timm's VisionTransformer encoder (cls token, learned pos_embed over 1 + N tokens, pre-norm blocks, final norm)
    from common's pieces under timm's names: export_timm checks in it that the exported tensors compute our features."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio, num_heads):
        super().__init__()
        self.patch_embed = common.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, embed_dim))
        self.blocks = nn.Sequential(*[common.Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, imgs):
        x = self.patch_embed(imgs)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        return self.norm(self.blocks(x))[:, 1:]  # (B, N, D): patch tokens after the final norm, as forward_features


TIMM_NAME = (
    r"cls_token|pos_embed|(patch_embed\.proj|norm|blocks\.\d+\.(norm[12]|attn\.(qkv|proj)|mlp\.fc[12]))\.(weight|bias)"
)
TIMM_NEEDS = "cls_token pos_embed patch_embed.proj.weight blocks.0.attn.qkv.weight blocks.0.mlp.fc1.weight norm.weight"


def export_timm(model, info, source):
    """(state, kwargs): the encoder's tensors under timm's names (nothing else) and the VisionTransformer arguments
    that load them. A model whose features are not those of such a ViT is refused with a one-line ValueError."""
    own = model.state_dict()
    state = {k: v.detach().clone() for k, v in own.items() if re.fullmatch(TIMM_NAME, k)}
    other = ", ".join(sorted(n for n in info["needed"] if n not in state and n in own)[:3]) or "other computations"
    lacking = [k for k in TIMM_NEEDS.split() if k not in state]
    lacking += [] if hasattr(model.cfg, "num_heads") else ["num_heads in its config"]
    refused = f"export writes plain ViT encoders only ({source}: the {info['method']} features use {other})"
    if lacking:
        raise ValueError(f"not a ViT with timm's VisionTransformer names, no {', '.join(lacking)}: {refused}")
    kwargs = {**vit_shape(state), "img_size": model.cfg.img_size, "num_heads": int(model.cfg.num_heads)}
    vit = TimmViT(**kwargs)
    common.load_weights(vit, state, f"the {info['method']} encoder of {source}")  # one-line error on a mismatch
    size, generator = kwargs["img_size"], torch.Generator().manual_seed(0)
    imgs = torch.randn(2, kwargs["in_chans"], size, size, generator=generator)
    was_training = model.training
    with torch.no_grad():
        ours, theirs = model.eval().forward_features(imgs), vit.eval()(imgs)  # (B, N, D) each
    model.train(was_training)
    if ours.shape != theirs.shape or not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise ValueError(f"the features are not those of a plain ViT over its timm-named tensors: {refused}")
    return state, kwargs


def timm_constructor(kwargs):
    """The Python expression that builds the timm model an exported state dict loads into."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    norm = "norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)"
    return f"timm.models.vision_transformer.VisionTransformer({args}, qkv_bias=True, num_classes=0, {norm})"


def run_export(source, xcfg, find_method, console):
    """Write the encoder of `source` with export_timm (atomically) and print the timm code that loads it; the path."""
    model, info = load_model(source, find_method, xcfg.method or "mae")
    path = Path(xcfg.out) if xcfg.out else info["run_dir"] / "encoder_timm.pth"
    if path.is_dir() or (path.exists() and not xcfg.overwrite):
        fix = "pass another --out" if path.is_dir() else "pass --overwrite to replace it, or another --out"
        raise ValueError(f"{path} already exists{' and is a folder' if path.is_dir() else ''}: {fix}")
    state, kwargs = export_timm(model, info, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    common.save_checkpoint(state, path)  # atomic: a temporary file, then a rename
    values = sum(v.numel() for v in state.values()) / 1e6
    what = f"{len(state)} tensors, {values:.2f}M values, the {info['method']} encoder without its decoder"
    console.print(f"wrote {path}: {what}. Load it with", highlight=False)
    load = f"vit.load_state_dict(torch.load({str(path)!r}, weights_only=True), strict=True)"
    code = f"import functools, timm, torch\nvit = {timm_constructor(kwargs)}\n{load}"
    console.print(code, highlight=False, markup=False, soft_wrap=True)
    return path


# Data, features, kNN, the probe and the fine-tuning classifier


def eval_datasets(ecfg, info, splits=("train", "val")):
    """(data name, *the splits' data sets) following EvalConfig, defaulting to the pre-training data."""
    pre, cfg = info["train"], info["config"]
    data = ecfg.data or pre.get("data") or "imagenet"
    same = data == pre.get("data")
    if data_sets.channels(data) != cfg.in_chans:
        raise ValueError(f"{data} has {data_sets.channels(data)} channel(s) but the model takes {cfg.in_chans}")
    data_dir = ecfg.data_dir or (pre.get("data_dir") if same else None) or "data"
    sizes = {"train": ecfg.train_size, "val": ecfg.val_size}
    sizes = {k: v if v >= 0 else (pre.get(f"{k}_size", 0) if same else 0) for k, v in sizes.items()}
    return data, *(data_sets.load_dataset(data, s, data_dir, sizes[s], cfg.img_size, ecfg.download) for s in splits)


def loader_for(dataset, tf, batch_size, num_workers, device, shuffle=False, seed=0, epoch=0, rank=0, world=1):
    """This process's share of `dataset`, `tf` applied with its random draws seeded by (seed, epoch, index); shuffled
    in a seeded order without the last partial batch (loader.sampler.set_epoch starts each epoch)."""
    sampler = data_sets.EpochSampler(len(dataset), shuffle, seed=seed, rank=rank, world=world)
    sampler.set_epoch(epoch)
    data = data_sets.SeededDataset(dataset, tf, None, seed)
    return data_sets.make_loader(data, batch_size, sampler, num_workers, shuffle, device)


@torch.no_grad()
def extract_features(model, dataset, data, batch_size, ecfg, augment=False, epoch=0, bar=None, label="", pixels=False):
    """The protocol's features of a whole data set in order, the model in eval mode: forward_features (B, N, D)
    mean-pooled over the N tokens, (M, D), or the pixels (M, C*H*W); and the labels (M,). Augmented crops are seeded by
    (seed, epoch, index)."""
    device, tf = next(model.parameters()).device, data_sets.transform(data, model.cfg.img_size, augment)
    loader = loader_for(dataset, tf, batch_size, ecfg.num_workers, device, seed=ecfg.seed, epoch=epoch)
    dtype, feats, labels = common.autocast_dtype("bf16", device), [], []
    for imgs, y, _ in bar.track(loader, description=f"{label} features") if bar else loader:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            imgs = imgs.to(device, non_blocking=True)
            feats.append((imgs.flatten(1) if pixels else model.eval().forward_features(imgs).mean(1)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def accuracy(scores, labels, topk=(1, 5)):
    """Fraction of rows whose label is among the k highest scores, for each k (k capped at the classes)."""
    hit = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices == labels.unsqueeze(1)  # (M, k)
    return [hit[:, :k].any(1).float().mean().item() for k in topk]


def knn_scores(train_feats, train_labels, test_feats, classes, k=20, temperature=0.07, chunk=1024):
    """Weighted kNN votes (M_test, classes): the k training features nearest by cosine similarity vote for their
    label with weight exp(similarity / temperature)."""
    train_feats, votes = F.normalize(train_feats.float(), dim=1), []
    for part in F.normalize(test_feats.float(), dim=1).split(chunk):
        sim, idx = (part @ train_feats.T).topk(min(k, len(train_feats)), dim=1)  # (b, k)
        votes.append(torch.zeros(len(part), classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp()))
    return torch.cat(votes)  # (M_test, classes)


def init_head(module, std):  # a classifier head: trunc normal weights, zero bias (official)
    nn.init.trunc_normal_(module.weight, std=std)
    nn.init.zeros_(module.bias)
    return module


class Classifier(nn.Module):
    """The pooled features, then the global-pool head LayerNorm + Linear (official models_vit.py, std 2e-5)."""

    def __init__(self, encoder, dim, classes):
        super().__init__()
        self.encoder, self.fc_norm = encoder, nn.LayerNorm(dim, eps=1e-6)
        self.head = init_head(nn.Linear(dim, classes), 2e-5)

    def forward(self, imgs):
        return self.head(self.fc_norm(self.encoder.forward_features(imgs).mean(dim=1)))  # (B, classes)


def layer_decay_groups(model, weight_decay, layer_decay):
    """AdamW groups with an "lr_scale" each (official util/lr_decay.py): layer 0 is the embeddings, layer i + 1
    blocks.i, then come the trainable decoder_blocks.i (RevColV2's top-down columns), and layer L + 1 is the rest
    (final norm, head); layer l learns at lr * layer_decay ** (L + 1 - l). No weight decay on 1-d, token, pos_embed."""
    named = [(n, n.removeprefix("encoder.").split("."), p) for n, p in model.named_parameters() if p.requires_grad]
    blocks = {s: len({parts[1] for _, parts, _ in named if parts[0] == s}) for s in ("blocks", "decoder_blocks")}
    depth, groups = sum(blocks.values()), {}
    first = {"patch_embed": 0, "cls_token": 0, "pos_embed": 0, "blocks": 1, "decoder_blocks": blocks["blocks"] + 1}
    for name, parts, p in named:
        # DEVIATION: a RevColV2 column (blocks.i, decoder_blocks.i) is one layer; RevCol v1 ranks level + column
        layer = first.get(parts[0], depth + 1) + (int(parts[1]) if parts[0] in blocks else 0)
        decay = 0.0 if p.ndim <= 1 or "token" in name or "pos_embed" in name else weight_decay
        scale = layer_decay ** (depth + 1 - layer)
        group = groups.setdefault((layer, decay), {"params": [], "names": [], "lr_scale": scale, "weight_decay": decay})
        group["params"].append(p)
        group["names"].append(name)
    return list(groups.values())


def finetune_transform(data, img_size, fcfg):
    """The MAE fine-tuning augmentation (official util/datasets.py through timm's create_transform)."""
    from torchvision.transforms import InterpolationMode, v2

    crop = v2.RandomResizedCrop(img_size, scale=(fcfg.min_crop, 1.0), interpolation=InterpolationMode.BICUBIC)
    steps = [v2.ToImage(), crop, v2.RandomHorizontalFlip()]
    if fcfg.randaug_n:
        steps += [v2.ToDtype(torch.uint8, scale=True), v2.RandAugment(fcfg.randaug_n, fcfg.randaug_m)]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(*data_sets.DATASETS[data][1])]
    return v2.Compose(steps + ([v2.RandomErasing(p=fcfg.reprob, value="random")] if fcfg.reprob else []))


def soft_targets(imgs, labels, classes, fcfg):
    """Mixup or cutmix (one of the two, chosen per batch) and label smoothing: (images, (B, classes))."""
    from torchvision.transforms import v2

    mixers = [mix(alpha=a, num_classes=classes) for mix, a in ((v2.MixUp, fcfg.mixup), (v2.CutMix, fcfg.cutmix)) if a]
    imgs, targets = v2.RandomChoice(mixers)(imgs, labels) if mixers else (imgs, F.one_hot(labels, classes).float())
    return imgs, targets * (1 - fcfg.smoothing) + fcfg.smoothing / classes  # smoothing commutes with mixing


@torch.no_grad()
def evaluate_classifier(model, loader, device, world, dtype, prefix=""):
    """{top1, top5, val_loss} (mean cross-entropy) over a loader, summed across processes; names after `prefix`."""
    model.eval()
    total = torch.zeros(4, dtype=torch.float64, device=device)  # top-1 hits, top-5 hits, loss sum, images
    for imgs, labels, _ in loader:
        imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            logits = model(imgs).float()  # (B, classes)
        (top1, top5), n = accuracy(logits, labels), len(labels)
        loss = F.cross_entropy(logits, labels, reduction="sum").item()
        total += torch.tensor([top1 * n, top5 * n, loss, n], dtype=torch.float64, device=device)
    model.train()
    if world > 1:
        torch.distributed.all_reduce(total)
    return {prefix + k: v for k, v in zip(("top1", "top5", "val_loss"), (total[:3] / total[3].clamp(min=1)).tolist())}


# Reconstruction pictures

NORM_PIX_NOTES = {  # how a norm-pix model's predictions are shown
    "denorm": "norm-pix target: predictions de-normalised with each patch's TRUE mean and std (from the original)",
    "raw": "norm-pix target: predictions and pasted patches in the normalised space, shown as 0.5 + value / 4",
}


@torch.no_grad()
def reconstructions(model, dataset, data, img_size, sample_inputs, n=8, seed=0, norm_pix="denorm"):
    """The columns (label, (n, 3, H, W) in [0, 1]) of the picture of the first n images: original, masked input,
    reconstruction, reconstruction + visible patches, then each boolean (N,) input of `sample_inputs` (seeded by
    (seed, index); e.g. the tokens a method throws away) in red; and a note on how norm-pix predictions are shown."""
    ds = data_sets.SeededDataset(dataset, data_sets.transform(data, img_size, False), sample_inputs, seed)
    imgs, labels, inputs = torch.utils.data.default_collate([ds[(0, i)] for i in range(min(n, len(dataset)))])
    if "labels" in inspect.signature(model.forward).parameters:
        inputs = {**inputs, "labels": labels}
    device, was_training = next(model.parameters()).device, model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # for a method that draws randomness inside forward
        _, pred, mask = model.eval()(imgs.to(device), **{k: v.to(device) for k, v in inputs.items()})
    model.train(was_training)
    C, H, W = imgs.shape[1:]
    pred, mask = pred.float().cpu(), mask.float().cpu()
    pred = common.patchify(pred, model.cfg.patch_size) if pred.shape == imgs.shape else pred  # whole-image predictions
    if pred.ndim != 3 or pred.shape[-1] % C or pred[0].numel() != C * H * W:
        shapes = f"of shape {tuple(pred.shape)} for images of shape {tuple(imgs.shape)}"
        raise ValueError(f"forward returned pred {shapes}: visualize draws (B, N, P*P*C) or (B, C, H, W) pixels")
    p = math.isqrt(pred.shape[-1] // C)
    target = common.patchify(imgs, p)  # (B, N, P*P*C)
    raw, note = False, "reconstructions are in the input's pixel space"
    if getattr(model.cfg, "norm_pix_loss", False):  # the official field name of a per-patch normalised target
        mean, std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        raw, note = norm_pix == "raw", NORM_PIX_NOTES[norm_pix]
        target, pred = ((target - mean) / std, pred) if raw else (target, pred * std + mean)
    data_mean, data_std = (torch.tensor(s).view(1, -1, 1, 1) for s in data_sets.DATASETS[data][1])

    def show(x, raw=False):  # (B, N, P*P*C) patches or (B, C, H, W) images -> (B, 3, H, W) in [0, 1]
        x = common.unpatchify(x, p, C) if x.ndim == 3 else x
        return (0.5 + x / 4 if raw else x * data_std + data_mean).clamp(0, 1).expand(-1, 3, -1, -1)

    def pixels(values):  # (B, M) values on a square grid -> (B, 1, H, W), nearest
        g = math.isqrt(values.shape[1])
        if g * g != values.shape[1] or H % g:
            raise ValueError(f"a (B, {values.shape[1]}) mask is not a square grid dividing {H} px")
        return F.interpolate(values.float().view(-1, 1, g, g), size=(H, W), mode="nearest")

    original, recon, m = show(imgs), show(pred, raw), pixels(mask)  # m: 1 = masked
    masked = original * (1 - m) + 0.5 * m  # masked patches grey
    columns = [("original", original), (f"masked ({mask.mean().item():.0%})", masked), ("reconstruction", recon)]
    columns.append(("recon + visible", recon * m + show(target, raw) * (1 - m)))
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    for key, o in ((k, 0.6 * pixels(v)) for k, v in inputs.items() if v.dtype == torch.bool and v.ndim == 2):
        columns.append((f"{key} (red)", masked * (1 - o) + red * o))
    return columns, note


def save_grid(columns, path, title="", scale=0):
    """Write the columns (label, (rows, 3, H, W) in [0, 1]) side by side as a PNG, each image enlarged `scale` times
    (0: to about 128 px), under up to 3 lines of `title` and a label over each column; (width, height)."""
    from PIL import Image, ImageDraw
    from torchvision.transforms.functional import to_pil_image
    from torchvision.utils import make_grid

    pad, line_h, title_lines = 2, 12, 3
    cells = torch.stack([imgs for _, imgs in columns], 1).flatten(0, 1)  # (rows * columns, 3, H, W), row by row
    scale = scale or max(1, round(128 / cells.shape[-1]))
    cells = cells.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)  # nearest: pixels stay visible
    grid = to_pil_image(make_grid(cells, nrow=len(columns), padding=pad, pad_value=1.0).mul(255).round().byte())
    top = (title_lines + 1) * line_h
    canvas = Image.new("RGB", (grid.width, top + grid.height), "white")
    canvas.paste(grid, (0, top))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(textwrap.wrap(title, grid.width // 6)[:title_lines]):  # the default font: ~6 px a letter
        draw.text((pad, i * line_h), line, fill="black")
    for c, (label, _) in enumerate(columns):
        draw.text((pad + c * (cells.shape[-1] + pad), top - line_h), label, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, format="PNG")
    return canvas.size


# Result folders: config, code and git hash beside every number


def machine():
    """A short description of where a number was measured."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), cpu)
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def pretraining_summary(info):
    """What the encoder was pre-trained on, from the run folder's log.jsonl: (text, seconds or None)."""
    if info["official"]:
        return "official checkpoint", None
    log, train = info["run_dir"] / "log.jsonl", info["train"]
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []
    epochs = max((r["epoch"] for r in rows if "epoch" in r), default=0)
    if info["ckpt"].get("finetune"):
        return f"fine-tuned {epochs:g} ep, see {info['run_dir']}", None
    images = f"{train['train_size']:,}" if train.get("train_size") else "all"
    clock = [r["elapsed_s"] for r in rows if "elapsed_s" in r]  # restarts at each --resume: sum each part's last
    seconds = sum(last for last, after in zip(clock, clock[1:] + [0]) if after < last) or None
    return f"{epochs:g} ep x {images} img, batch {train.get('batch_size', '?')}", seconds


def default_out(info, command, ecfg, data, pixels=False):
    init = "-pixels" if pixels else "-random-init" if ecfg.random_init else ""
    return info["run_dir"] / "eval" / f"{command}{init}-{data}-s{ecfg.seed}"


def start_result(out, command, settings, ecfg, ccfg, info, data, code_files, world=1, fresh=True):
    """Create the result folder with config.json and code/ (this code and the pre-training code the checkpoint
    carries); the metadata result.json repeats. fresh: drop an earlier result and log (not on --resume)."""
    cfg, ckpt = info["config"], info["ckpt"]
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a result folder: pass a folder")
    (out / "code" / "pretrain").mkdir(parents=True, exist_ok=True)
    for f in ("result.json", "log.jsonl") if fresh else ("result.json",):
        (out / f).unlink(missing_ok=True)
    for f in code_files:
        shutil.copy(f, out / "code")
    for name, text in (ckpt.get("code") or {}).items():
        (out / "code" / "pretrain" / name).write_text(text)
    pixels = getattr(ccfg, "pixels", False)
    pretraining, pretrain_s = ("none (random init)", None) if ecfg.random_init else pretraining_summary(info)
    pretraining, method = ("none (raw pixels)", "raw pixels") if pixels else (pretraining, info["method"])
    meta = dict(command=command, method=method, data=data, random_init=ecfg.random_init and not pixels, seed=ecfg.seed)
    meta.update(pretrain_seed=info["train"].get("seed"), pretraining=pretraining, pretrain_wall_s=pretrain_s)
    encoder = f"{cfg.in_chans * cfg.img_size**2:,} values" if pixels else f"{info['encoder_params'] / 1e6:.2f}M params"
    meta.update(encoder=f"{encoder}, {cfg.img_size} px")
    meta.update(settings=settings, source=str(info["run_dir"]), git=common.git_hash())
    meta.update(pretrain_git=ckpt.get("git"), machine=machine(), world_size=world, torch=torch.__version__)
    config = {**meta, "eval": asdict(ecfg), command: asdict(ccfg), "model_config": asdict(cfg)}
    config["pretrain_train"] = info["train"]
    if ckpt.get("args") is not None:  # an official checkpoint's argparse options
        config["official_args"] = {k: repr(v) for k, v in vars(ckpt["args"]).items()}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    return meta


def finish_result(out, meta, metrics, start, train_set, val_set):
    """Write result.json (the metadata, the metrics, the images, the wall time since `start`); (result, out)."""
    metrics = {**metrics, "train_images": len(train_set), "val_images": len(val_set)}
    result = {**meta, "metrics": metrics, "wall_s": round(time.perf_counter() - start, 1)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result, out


# The commands (cli.py parses the options, loads the model with load_model and calls these)


def run_knn(model, info, ecfg, kcfg, code_files, console):
    """Weighted kNN top-1 / top-5 of the validation split against the training split's features."""
    start = time.perf_counter()
    data, train_set, val_set = eval_datasets(ecfg, info)
    out = Path(ecfg.out or default_out(info, "knn", ecfg, data, kcfg.pixels))
    meta = start_result(out, "knn", f"kNN k={kcfg.k}, T={kcfg.temperature}", ecfg, kcfg, info, data, code_files)
    model.to(common.pick_device(ecfg.device))
    with Progress(console=console, transient=True) as bar:
        settings = dict(data=data, batch_size=kcfg.batch_size, ecfg=ecfg, bar=bar, pixels=kcfg.pixels)
        train_f, train_y = extract_features(model, train_set, label="train", **settings)
        val_f, val_y = extract_features(model, val_set, label="val", **settings)
    top1, top5 = accuracy(knn_scores(train_f, train_y, val_f, len(train_set.classes), kcfg.k, kcfg.temperature), val_y)
    return finish_result(out, meta, {"top1": top1, "top5": top5}, start, train_set, val_set)


def run_linprobe(model, info, ecfg, lcfg, code_files, console):
    """Frozen encoder, BatchNorm (no affine) + Linear on the pooled features; top-1 / top-5 per epoch."""
    start = time.perf_counter()
    data, train_set, val_set = eval_datasets(ecfg, info)
    out = Path(ecfg.out or default_out(info, "linprobe", ecfg, data, lcfg.pixels))
    settings = f"linear probe {lcfg.epochs} ep{', augmented' if lcfg.augment else ''}"
    meta = start_result(out, "linprobe", settings, ecfg, lcfg, info, data, code_files)
    device = common.pick_device(ecfg.device)
    model.to(device).requires_grad_(False)
    torch.manual_seed(ecfg.seed)
    dim = info["config"].in_chans * info["config"].img_size ** 2 if lcfg.pixels else info["dim"]
    bn, head = nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, len(train_set.classes))
    probe = nn.Sequential(OrderedDict(bn=bn, head=init_head(head, 0.01))).to(device)  # official main_linprobe.py
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0, momentum=0.9, weight_decay=lcfg.weight_decay)
    steps = max(len(train_set) // lcfg.batch_size, 1)  # per epoch; the last partial batch is dropped, as official
    total, warmup = lcfg.epochs * steps, lcfg.warmup_epochs * steps
    peak_lr = lcfg.blr * min(lcfg.batch_size, len(train_set)) / 256
    order = torch.Generator().manual_seed(ecfg.seed)  # the order of the training features, every epoch
    with Progress(console=console, transient=True) as bar:
        settings = dict(data=data, batch_size=lcfg.batch_size, ecfg=ecfg, pixels=lcfg.pixels)
        val_f, val_y = extract_features(model, val_set, bar=bar, label="val", **settings)
        if not lcfg.augment:  # the cache: one pass over the training images, then only the head trains
            train_f, train_y = extract_features(model, train_set, bar=bar, label="train", **settings)
        task = bar.add_task("probe", total=lcfg.epochs)
        for epoch in range(lcfg.epochs):
            if lcfg.augment:  # new crops every epoch
                train_f, train_y = extract_features(model, train_set, augment=True, epoch=epoch, **settings)
            probe.train()
            batches = torch.randperm(len(train_f), generator=order)[: steps * lcfg.batch_size].view(steps, -1)
            for i, idx in enumerate(batches):
                optimizer.param_groups[0]["lr"] = common.lr_at(epoch * steps + i, total, warmup, peak_lr, 0.0)
                loss = F.cross_entropy(probe(train_f[idx].to(device)), train_y[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            with torch.no_grad():
                scores = torch.cat([probe.eval()(f.to(device)).cpu() for f in val_f.split(4096)])
            top1, top5 = accuracy(scores, val_y)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "train_loss": loss.item(), "top1": top1, "top5": top5}) + "\n")
            bar.update(task, advance=1, description=f"probe: top-1 {top1:.3f}")
    torch.save({"probe": probe.state_dict()}, out / "probe.pt")
    return finish_result(out, meta, {"top1": top1, "top5": top5}, start, train_set, val_set)


def run_finetune(model, info, ecfg, fcfg, code_files, console):
    """The MAE fine-tuning recipe on the encoder + a global-pool head, top-1 / top-5 after every epoch; one process
    or many under torchrun (rank 0 writes the result folder); --resume continues it exactly."""
    start = time.perf_counter()
    data, train_set, val_set = eval_datasets(ecfg, info)
    out = Path(ecfg.out or default_out(info, "finetune", ecfg, data))
    tcfg = train_config(fcfg, data=data, seed=ecfg.seed, num_workers=ecfg.num_workers, device=ecfg.device, out=str(out))
    rank, world, device = common.setup(tcfg)
    steps = common.epoch_steps(len(train_set), world, tcfg)  # before anything is written
    ckpt = common.load_checkpoint(out / "checkpoint.pt") if fcfg.resume else None
    if ckpt is not None:  # the options it was started with, but those that do not change what it computes
        if "finetune" not in ckpt:
            raise ValueError(f"{out / 'checkpoint.pt'} is not a fine-tuning checkpoint that can be continued")
        options, saved = {**asdict(ecfg), **asdict(fcfg)}, {**ckpt["eval"], **ckpt["finetune"]}
        differ = [k for k, v in saved.items() if k not in common.RESUME_MAY_CHANGE and v != options.get(k, v)]
        if differ:
            changed = ", ".join(f"--{k.replace('_', '-')} {saved[k]} there, {options[k]} here" for k in differ)
            raise ValueError(f"--resume continues {out} with the options it was started with; these differ: {changed}")
    settings = f"fine-tune {fcfg.epochs} ep"
    meta = None  # rank 0 writes the result folder
    if rank == 0:
        meta = start_result(out, "finetune", settings, ecfg, fcfg, info, data, code_files, world, fresh=not ckpt)
    classes, img_size = len(train_set.classes), info["config"].img_size
    for name, p in model.named_parameters():  # train what the features use; decoders stay frozen and unused
        p.requires_grad_(name in info["needed"])
    torch.manual_seed(ecfg.seed)
    clf = Classifier(model, info["dim"], classes).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        clf.fc_norm.load_state_dict(ckpt["head"]["fc_norm"])
        clf.head.load_state_dict(ckpt["head"]["head"])
    groups = layer_decay_groups(clf, fcfg.weight_decay, fcfg.layer_decay)
    opt = torch.optim.AdamW(groups, lr=0.0, fused=device.type == "cuda")  # betas (0.9, 0.999): official
    ema = AveragedModel(clf, multi_avg_fn=get_ema_multi_avg_fn(fcfg.ema), use_buffers=True) if fcfg.ema else None
    train_tf, val_tf = finetune_transform(data, img_size, fcfg), data_sets.transform(data, img_size, False)
    dtype = common.autocast_dtype(fcfg.amp, device)
    loader = loader_for(train_set, train_tf, fcfg.batch_size, ecfg.num_workers, device, True, ecfg.seed, 0, rank, world)
    val_loader = loader_for(val_set, val_tf, fcfg.batch_size, min(ecfg.num_workers, 2), device, rank=rank, world=world)

    def loss_of(net, imgs, labels, inputs):
        imgs, targets = soft_targets(imgs, labels, classes, fcfg)  # mixup / cutmix + smoothing, drawn per step
        return F.cross_entropy(net(imgs).float(), targets)

    def evaluate(epoch):
        metrics = evaluate_classifier(clf, val_loader, device, world, dtype)
        return {**metrics, **(evaluate_classifier(ema.module, val_loader, device, world, dtype, "ema_") if ema else {})}

    saved = dict(method=info["method"], config=asdict(info["config"]), train=info["train"])
    saved.update(code=info["ckpt"].get("code"), git=common.git_hash(), finetune=asdict(fcfg), eval=asdict(ecfg))

    def state():  # the encoder under its own names: the evaluations read it as they read a pre-training checkpoint
        heads = {k: getattr(clf, k).state_dict() for k in ("fc_norm", "head")}
        return {"model": model.state_dict(), "head": heads, **saved}

    common.train(clf, opt, tcfg, loader, loss_of, evaluate, state, ckpt, ema, title="finetune")
    # the final weights' numbers: the last epoch's in the log, or, if --max-steps stopped the run inside an epoch,
    # computed now (on every process: the evaluation sums over them)
    final = evaluate(0) if min(tcfg.max_steps or math.inf, tcfg.epochs * steps) % steps else None
    if rank != 0:
        return None, out
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    final = final or {k: v for k, v in [r for r in rows if "top1" in r][-1].items() if k not in ("epoch", "elapsed_s")}
    return finish_result(out, meta, final, start, train_set, val_set)


def run_visualize(model, info, ecfg, vcfg, sample_inputs, console):
    """A PNG grid of the first images (see reconstructions); the picture's path and (width, height)."""
    data, dataset = eval_datasets(ecfg, info, (vcfg.split,))
    init = "-random-init" if ecfg.random_init else ""
    path = Path(ecfg.out or info["run_dir"] / f"reconstructions{init}-{data}-{vcfg.split}-s{ecfg.seed}.png")
    model.to(common.pick_device(ecfg.device))
    columns, note = reconstructions(
        model, dataset, data, info["config"].img_size, sample_inputs, vcfg.num_images, ecfg.seed, vcfg.norm_pix
    )
    title = f"{info['method']}{' (random init)' if init else ''}, {data} {vcfg.split}. {note}; masks seed {ecfg.seed}"
    return path, save_grid(columns, path, title, vcfg.scale)
