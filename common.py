"""Plumbing shared by every method file: ViT pieces, presets, checkpoints and the training loop.

Nothing in here is any paper's contribution: masking, targets, decoders and losses live in the
method files, even where that repeats a few lines. The data (data sets, augmentation, seeded
loaders) is in data_sets/.

Shape legend, used in every file:
    B batch, C channels, H = W image size, P patch size, N patches (H/P * W/P),
    N_vis visible patches, N_mask masked patches, D encoder width, D_dec decoder width.
    mask: (B, N), 0 = visible (kept), 1 = masked (removed): the facebookresearch/mae convention.
"""

import argparse
import contextlib
import dataclasses
import difflib
import functools
import inspect
import json
import math
import os
import re
import signal
import subprocess
import time
from collections import OrderedDict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# --------------------------------------------------------------------------------------------------
# ViT pieces, under timm's VisionTransformer names as in the official MAE code: official
# checkpoints load into our models, and our encoders load into timm.


class PatchEmbed(nn.Module):
    """Image to patch tokens, one Conv2d with kernel = stride = P: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"--img-size {img_size} is not a multiple of --patch-size {patch_size}"
            )
        self.image_shape = (in_chans, img_size, img_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2  # N
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        if tuple(x.shape[1:]) != self.image_shape:  # one line, not a convolution's error
            expected = f"(B, {', '.join(map(str, self.image_shape))})"
            raise ValueError(f"expected images {expected}, got {tuple(x.shape)}: fix --img-size")
        return rearrange(self.proj(x), "b d h w -> b (h w) d")  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, computed by F.scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        qkv = self.qkv(x)  # (B, N, 3 * D)
        # (three h d) is timm's qkv layout, so official weights split into q, k, v correctly
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D / heads)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))  # (B, N, D)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). LayerNorm eps 1e-6.
    drop_path: the probability that a sample skips each branch (stochastic depth)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        fc1 = nn.Linear(dim, hidden)
        fc2 = nn.Linear(hidden, dim)
        self.mlp = nn.Sequential(OrderedDict(fc1=fc1, act=nn.GELU(), fc2=fc2))  # timm's Mlp names
        self.drop_path = nn.Identity()
        if drop_path:  # fine-tuning: only then is torchvision imported (its import takes seconds)
            from torchvision.ops import StochasticDepth

            self.drop_path = StochasticDepth(drop_path, mode="row")

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Fixed 2D sin-cos position embedding, (1, [1 +] N, D), laid out as the official
    util/pos_embed.py: the first D/2 channels encode the column, the last D/2 the row; a zero row
    is prepended for the cls token."""
    if embed_dim % 4:
        raise ValueError(f"width {embed_dim} must be a multiple of 4 for the 2D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each, row-major patches

    def embed_1d(pos):
        angles = pos.reshape(-1, 1) * omega  # (N, D/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (N, D/2)

    emb = torch.cat([embed_1d(col), embed_1d(row)], dim=1)  # (N, D)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb])  # (1 + N, D)
    return emb.float().unsqueeze(0)


def patchify(imgs, p):
    """(B, C, H, W) -> (B, N, P*P*C), pixels in (p1 p2 c) order: the official einsum layout."""
    return rearrange(imgs, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=p, p2=p)


def unpatchify(x, p, c=3):
    """(B, N, P*P*C) -> (B, C, H, W), the inverse of patchify for a square grid."""
    h = int(x.shape[1] ** 0.5)
    return rearrange(x, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=h, p1=p, p2=p, c=c)


def init_weights(model):
    """The official MAE initialisation: xavier-uniform Linear layers and zero biases; the patch
    projection initialised as a Linear layer."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))


# --------------------------------------------------------------------------------------------------
# Model sizes, and presets: the scale of a run (image size, widths, data, batch, epochs). A method
# file may change a preset for itself (its PRESET_CHANGES); its Config holds everything else.

MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)  # the official
VIT_SIZES = {  # ViT-Ti/S (DeiT), ViT-B/L/H (ViT paper), each with the official MAE decoder
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, **MAE_DECODER),
    "small": dict(embed_dim=384, depth=12, num_heads=6, **MAE_DECODER),
    "base": dict(embed_dim=768, depth=12, num_heads=12, **MAE_DECODER),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, **MAE_DECODER),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14, **MAE_DECODER),
}

PRESETS = {
    # seconds on a CPU: for tests and for trying a code change
    "tiny": dict(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=2,
        num_heads=4,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=4,
        data="patterns",
        train_size=256,
        val_size=64,
        batch_size=32,
        epochs=2,
        warmup_epochs=0,
        blr=1.5e-3,
        num_workers=0,
        log_every=1,
    ),
    # the default, minutes on a CPU: a 4 x 4 grid of 32-px images. DEVIATION: blr 4e-3, not
    # 1.5e-3, so that MAE learns within the 1,536 steps (docs/learning.md)
    "cpu": dict(
        img_size=32,
        patch_size=8,
        embed_dim=128,
        depth=6,
        num_heads=4,
        decoder_embed_dim=128,
        decoder_depth=2,
        decoder_num_heads=4,
        data="patterns",
        train_size=8192,
        val_size=1024,
        batch_size=128,
        epochs=24,
        warmup_epochs=2,
        blr=4e-3,
        num_workers=1,
        log_every=8,
        knn_every=3,  # the kNN curve: 9 points, about 5 % of the run's time (docs/training.md)
        knn_train_size=2048,
    ),
    # one GPU, hours: ViT-Tiny width on the 8 x 8 grid of 32-px CIFAR images
    "cifar": dict(
        img_size=32,
        patch_size=4,
        embed_dim=192,
        depth=12,
        num_heads=3,
        decoder_embed_dim=128,
        decoder_depth=4,
        decoder_num_heads=4,
        data="cifar10",
        batch_size=256,
        epochs=400,
        warmup_epochs=20,
        num_workers=8,
    ),
    # one GPU, about a day: ViT-S/8 at 64 px (an 8 x 8 grid), the small model of the i-MAE code
    "tiny-imagenet": dict(
        img_size=64,
        patch_size=8,
        embed_dim=384,
        depth=12,
        num_heads=6,
        decoder_embed_dim=256,
        decoder_depth=4,
        decoder_num_heads=8,
        data="tiny-imagenet",
        batch_size=256,
        epochs=400,
        warmup_epochs=20,
        num_workers=8,
    ),
    # the paper's recipe, ViT-B/16 at 224 px and 4,096 images a step, sized for one node of 8
    # H100s: 256 images per GPU x 8 GPUs x 2 accumulated; 6 workers per GPU read the files, the
    # GPU decodes them (docs/training.md, "One node of 8 GPUs")
    "imagenet": dict(
        img_size=224,
        **VIT_SIZES["base"],
        data="imagenet",
        batch_size=256,
        accum_iter=2,
        epochs=800,
        warmup_epochs=40,
        num_workers=6,
    ),
}

# --------------------------------------------------------------------------------------------------
# The options of a training run


def check_options(cfg, positive="", non_negative=""):
    """A ValueError naming the first of the fields `positive` (space-separated) below 1, or of
    `non_negative` below 0."""
    for names, low, words in ((positive, 1, "be at least 1"), (non_negative, 0, "not be negative")):
        for name in names.split():
            if getattr(cfg, name) < low:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must {words}, got {getattr(cfg, name)}")


def check_device(name):
    """A ValueError unless `name` is auto or a device torch can use here (cpu, cuda, cuda:N)."""
    try:
        device = torch.device("cpu" if name == "auto" else name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu or auto")


@dataclasses.dataclass
class TrainConfig:
    data: str = "imagenet"  # patterns | fashion-mnist | cifar10 | cifar100 | tiny-imagenet | ...
    data_dir: str = "data"  # where data sets live; imagenet / folder: the folder of train/, val/
    download: bool = False  # let torchvision download CIFAR / Fashion-MNIST into --data-dir
    train_size: int = 0  # use N training images, a fixed random subset (0 = all)
    val_size: int = 0  # use N held-out images for the per-epoch reconstruction loss (0 = all)
    epochs: int = 800  # MAE paper Sec. 4: 800 epochs for the ablations, 1600 for the best results
    warmup_epochs: int = 40  # MAE paper, Appendix A.1: 40 warm-up epochs
    batch_size: int = 64  # images per process and step (official: 64 per GPU x 64 GPUs = 4096)
    accum_iter: int = 1  # gradient accumulation: batch = batch_size * accum_iter * processes
    blr: float = 1.5e-4  # base learning rate, lr = blr * batch / 256 (MAE paper, Appendix A.1)
    lr: float = 0.0  # absolute learning rate; 0 = derive it from --blr
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.05  # AdamW weight decay (MAE, A.1); never on norms, biases, tokens
    clip_grad: float = 0.0  # clip the gradient norm to this value (0 = off, as the MAE recipe)
    seed: int = 0  # seeds the initialisation, data order, augmentation and masks
    num_workers: int = 8  # data-loading processes per training process
    amp: str = "bf16"  # autocast on GPU: bf16 | fp16 (with a gradient scaler) | fp32; CPU: fp32
    compile: bool | None = None  # torch.compile the model (default: on a GPU, not on a CPU)
    log_every: int = 20  # write a line to log.jsonl every N steps
    ckpt_every: int = 0  # also save a checkpoint every N steps (0 = at epoch ends and the end)
    vis_every: int = 0  # also save a picture, vis-epochNNNN.png, every N epochs (0 = never)
    knn_every: int = 0  # kNN top-1 of the encoder before training and every N epochs (0 = never)
    knn_train_size: int = 0  # its memory bank: N of the training images (0 = --train-size's)
    max_steps: int = 0  # stop after N steps of the full schedule (0 = run all epochs)
    out: str = ""  # run folder for log and checkpoint (default runs/<method>-<data>-<time>)
    resume: bool = False  # continue the run in --out from its checkpoint, exactly
    overwrite: bool = False  # replace a run already in --out
    device: str = "auto"  # auto (GPU if there is one) | cpu | cuda | cuda:N
    skip_bad_images: bool = False  # skip images that cannot be read (logged) instead of stopping

    def __post_init__(self):
        positive = "epochs batch_size accum_iter log_every"
        non_negative = "warmup_epochs train_size val_size lr min_lr weight_decay clip_grad"
        non_negative += " num_workers ckpt_every max_steps vis_every knn_every knn_train_size"
        check_options(self, positive, non_negative)
        if self.blr <= 0 and self.lr <= 0:
            raise ValueError(f"--blr must be positive, got {self.blr}")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"--amp must be bf16, fp16 or fp32, got {self.amp!r}")
        check_device(self.device)


# options that may change when a run is resumed: they do not change what it computes
RESUME_MAY_CHANGE = {
    "out",
    "resume",
    "max_steps",
    "num_workers",
    "log_every",
    "ckpt_every",
    "vis_every",
    "knn_every",
    "knn_train_size",
    "compile",
    "device",
    "skip_bad_images",
}

# --------------------------------------------------------------------------------------------------
# Devices, processes, run folders and checkpoints


def pick_device(name="auto", local_rank=0):
    """The device of --device; `auto` and `cuda` mean this process's GPU if there is one."""
    check_device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def setup(tcfg):
    """(rank, world size, device) of this process from torchrun's environment; joins the process
    group once."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    rank = int(os.environ.get("RANK", 0))
    return rank, world, pick_device(tcfg.device, int(os.environ.get("LOCAL_RANK", 0)))


def git_hash():
    """The commit of the code, with -dirty if tracked files have changed; unknown outside git."""
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        head = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        )
        status = [*git, "status", "--porcelain", "--untracked-files=no"]
        dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty else "")


def save_checkpoint(obj, path):
    """Write atomically (a temporary file, flushed, renamed over the old one): a crash never leaves
    half a file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint of ours or an official MAE one ({"model": state_dict, "args": Namespace}),
    loaded with weights_only=True: only tensors and plain containers, so a crafted file cannot run
    code."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}: {runs_nearby(path)}")
    # the official MAE scripts pickle their args; older checkpoints of ours hold torch's version
    torch.serialization.add_safe_globals([argparse.Namespace, torch.torch_version.TorchVersion])
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} {unreadable_checkpoint(path, e)}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} holds no 'model' state dict: not a checkpoint of ours or MAE's")
    return ckpt


def runs_nearby(path):
    """What to pass instead of a path that holds no checkpoint: the run folders beside it whose
    names are nearest to it (those with a checkpoint), or what a run folder is."""
    folder = path.parent if path.name == "checkpoint.pt" else path
    if folder.is_dir() and (folder / "log.jsonl").exists():
        return "its run stopped before its first checkpoint: run it again (the same --out)"
    parent = folder.parent
    runs = (
        sorted({p.parent.name for p in parent.glob("*/checkpoint.pt")}) if parent.is_dir() else []
    )
    close = difflib.get_close_matches(folder.name, runs, n=3, cutoff=0.4)
    if close:
        return "did you mean " + ", ".join(str(parent / name) for name in close) + "?"
    return "pass a run folder (runs/NAME) or a .pt/.pth file"


def unreadable_checkpoint(path, error):
    """What is wrong with a file torch.load refused, and what to do about it."""
    refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
    if refused:
        what = f"holds pickled objects that safe loading refuses ({refused[1]})"
        return f"{what}: it is not a checkpoint of ours"
    if not path.read_bytes()[:4].startswith((b"PK\x03\x04", b"\x80")):  # a zip, or old pickle
        fix = "pass a run folder or a .pt/.pth checkpoint"
        return f"is not a checkpoint (not a file torch.save wrote): {fix}"
    reason = (str(error).splitlines() or [""])[0].split(". ")[0][:160]
    return f"is not a readable checkpoint, truncated or corrupt ({reason}): restore it"


def load_weights(model, state, source="the checkpoint"):
    """model.load_state_dict(state), a mismatch (another architecture or size) told in one line
    instead of torch's report."""
    own = model.state_dict()
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    if wrong or missing or unexpected:
        k = (wrong or missing or unexpected)[0]
        if wrong:
            example = f"{k} is {tuple(state[k].shape)} there and {tuple(own[k].shape)} here"
        else:
            example = f"e.g. {k}"
        counts = f"{len(wrong)} of another shape, {len(missing)} tensor(s) missing"
        counts += f", {len(unexpected)} unexpected"
        raise ValueError(
            f"{source} does not fit this model ({counts}; {example}): "
            "it is of another size or method"
        )
    model.load_state_dict(state)


def prepare_run(method, cfg, tcfg, given):
    """(Config, TrainConfig) of a run in tcfg.out (default runs/<method>-<data>-<time>): never two
    runs in one folder; on --resume exactly the saved run, but for the options in
    RESUME_MAY_CHANGE (`given`: the options passed)."""
    if tcfg.resume and not tcfg.out:
        raise ValueError("--resume needs --out, the folder of the run to continue")
    out = Path(tcfg.out or f"runs/{method}-{tcfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
    tcfg.out = str(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder: pass a folder")
    if not tcfg.resume:  # a folder whose run stopped before its first checkpoint is taken again
        if (out / "checkpoint.pt").exists() and not tcfg.overwrite:
            raise ValueError(
                f"{out} already holds a run: pass --resume to continue it, --overwrite, "
                "or another --out"
            )
        return cfg, tcfg
    if not (out / "checkpoint.pt").exists():
        raise ValueError(
            f"{out} holds no checkpoint to continue (a run that stopped before its first one): "
            "run the same command without --resume"
        )
    ckpt = load_checkpoint(out / "checkpoint.pt")
    if ckpt.get("method") != method:
        raise ValueError(f"{out} holds a {ckpt.get('method')!r} run, not {method!r}")
    saved = {**ckpt["config"], **ckpt["train"]}
    changed = [k for k in sorted(given) if k not in RESUME_MAY_CHANGE and saved.get(k) != given[k]]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ValueError(f"--resume continues {out} with its saved settings; drop {flags}")
    may_change = {k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}
    return type(cfg)(**ckpt["config"]), TrainConfig(**{**ckpt["train"], **may_change})


# --------------------------------------------------------------------------------------------------
# The training loop, and the pieces it is set up with


def param_groups(model, weight_decay):
    """AdamW parameter groups: no weight decay on biases and norms (1-d), tokens and embeddings."""
    decay = []
    no_decay = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or "token" in name or "pos_embed" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step, total_steps, warmup_steps, lr, min_lr):
    """Linear warm-up, then a half-cycle cosine to min_lr, per step (official util/lr_sched.py)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def autocast_dtype(amp, device):
    """The autocast dtype of --amp on a GPU; None (no autocast) on a CPU and with fp32."""
    if device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp]


def epoch_steps(images, world, tcfg):
    """Optimiser steps in an epoch of `images` training images; a ValueError if not even one."""
    per_step = tcfg.batch_size * tcfg.accum_iter * world
    if images < per_step:
        raise ValueError(
            f"{images} training images are fewer than one step needs ({per_step}): "
            "lower --batch-size"
        )
    return images // per_step


def world_and_rank():
    """(processes, this one's rank): (1, 0) without torchrun."""
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(), dist.get_rank()


@dataclasses.dataclass
class Schedule:
    """The steps of a run and their learning rate."""

    steps_per_epoch: int
    total_steps: int  # of the whole schedule, which the lr follows
    warmup_steps: int
    stop: int  # the step the run ends at: the schedule's last, or --max-steps
    peak_lr: float
    min_lr: float

    def lr(self, step):
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, self.min_lr)


def schedule_of(tcfg, images, world):
    """The Schedule of a run over `images` training images on `world` processes."""
    steps_per_epoch = epoch_steps(images, world, tcfg)
    total_steps = tcfg.epochs * steps_per_epoch
    warmup_steps = tcfg.warmup_epochs * steps_per_epoch
    stop = min(total_steps, tcfg.max_steps or total_steps)
    batch = tcfg.batch_size * tcfg.accum_iter * world
    peak_lr = tcfg.lr or tcfg.blr * batch / 256  # the linear scaling rule (MAE, Appendix A.1)
    return Schedule(steps_per_epoch, total_steps, warmup_steps, stop, peak_lr, tcfg.min_lr)


def restore_loop(ckpt, optimizer, scaler, ema):
    """The loop's part of a checkpoint put back (optimiser, scaler, EMA); the step to go on from."""
    if ckpt is None:
        return 0
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    if ema is not None:
        ema.module.load_state_dict(ckpt["ema"])
        ema.n_averaged.fill_(ckpt["step"])
    return ckpt["step"]


def wrap_model(model, device, world, compile):
    """The model as the loop runs it: in DDP on several processes, compiled if asked (None: on a
    GPU, not on a CPU, where compiling takes longer than these runs train)."""
    net = model
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if compile or (compile is None and device.type == "cuda"):
        net = torch.compile(net)
    return net


def open_run_folder(out, resumed_step):
    """Make the run folder ready: a new run starts with no log and no checkpoint; a resumed one
    keeps what its log says up to the checkpoint's step (a killed run may have gone further)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint.pt.tmp").unlink(missing_ok=True)  # left by a run killed mid-save
    log_path = out / "log.jsonl"
    rows = []
    if resumed_step is not None and log_path.exists():
        rows = log_path.read_text().splitlines()
    kept = [r for r in rows if r.endswith("}") and json.loads(r)["step"] <= resumed_step]
    log_path.write_text("".join(r + "\n" for r in kept))
    if resumed_step is None:
        (out / "checkpoint.pt").unlink(missing_ok=True)


def describe_run(title, model, schedule, tcfg, world, device):
    """The line a run starts with: its size, steps, processes and learning rate."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    steps = f"{schedule.steps_per_epoch} steps/epoch x {tcfg.epochs} epochs"
    batch = tcfg.batch_size * tcfg.accum_iter * world
    where = f"{world} process(es) on {device}"
    lr = f"lr {schedule.peak_lr:.2e} (batch {batch})"
    return f"{title}: {trained:.2f}M trained parameters, {steps}, {where}, {lr}"


@contextlib.contextmanager
def stop_signals():
    """SIGTERM (preemption) or a Ctrl-C asks the loop to stop at its next logged step and save; a
    second Ctrl-C aborts at once. Yields the list of the signals received."""
    received = []

    def on_signal(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def progress_bar(title, step, stop, console, visible=True):
    """A rich progress bar over the steps, with the loss, lr and images/s; yields its update
    function. Hidden on other processes than the first, and when no step is left."""
    from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    fields = "loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s"
    fields += "{task.fields[metrics]}"  # the last end of epoch's, e.g. the held-out loss
    columns = [*Progress.get_default_columns()[:-1], MofNCompleteColumn(), TextColumn(fields)]
    columns.append(TimeRemainingColumn())
    start = dict(total=stop, completed=step, loss=math.nan, lr=0.0, ips=0.0, metrics="")
    with Progress(*columns, console=console, disable=not visible or step >= stop) as progress:
        task = progress.add_task(title, **start)
        yield functools.partial(progress.update, task)


def to_device(batch, device):
    """(images, labels, {name: input}) of a loader on `device`, copied without the host waiting."""
    imgs, labels, inputs = batch
    imgs = imgs.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return imgs, labels, inputs


@contextlib.contextmanager
def saved_before_unreadable(save, out, world):
    """An image the loader cannot read (an OSError naming a file, not one of the run folder's)
    stops the run after the state of the last completed step is saved, with one line saying how
    to go on. Under torchrun only the process that read it knows: it stops at once (a save would
    wait for the others, which wait in the step's all-reduce), torchrun stops the others, and the
    run continues from its last checkpoint (the last epoch's end or --ckpt-every)."""
    try:
        yield
    except OSError as e:
        if e.filename is None or Path(e.filename).parent == out:
            raise
        if world == 1:
            save()
        last = "" if world == 1 else " from its last checkpoint"
        fix = f"replace or remove it, then continue{last} with --resume --out {out}"
        raise ValueError(f"{e}: {fix} (or pass --skip-bad-images)") from None


def set_lr(optimizer, lr):
    """The step's learning rate in every parameter group, times the group's `lr_scale`
    (fine-tuning's layer-wise decay); returns lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def skipped_images(loader):
    """{"skipped_images": count} of the images the loader could not read and skipped, else {}."""
    skipped = getattr(loader, "skipped", None)
    return {"skipped_images": len(skipped)} if skipped else {}


def gradient_sync(net, sync):
    """DDP's no_sync unless `sync`: micro-batches add up their gradients locally, and the
    processes average them at the last one."""
    if sync or not isinstance(net, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return net.no_sync()


def optimizer_step(model, optimizer, scaler, clip_grad, ema):
    """The step of the gradients the micro-batches added up: clipped if asked, skipped by the fp16
    scaler if they overflowed; then the EMA of the weights follows."""
    if clip_grad:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update_parameters(model)


def shown(metrics):
    """The end of an epoch's metrics as the progress line shows them."""
    names = {"val_loss": "held-out", "knn_top1": "kNN"}
    return "".join(f"  {names.get(k, k)} {v:.4g}" for k, v in metrics.items())


def write_log(path, console, say="", metrics=None, **row):
    """A line of log.jsonl (row and metrics); with `say`, the metrics printed after it. Nothing on
    other processes than the first (console None)."""
    if console is None:
        return
    with open(path, "a") as f:
        f.write(json.dumps({**row, **(metrics or {})}) + "\n")
    if say:
        console.print(say + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def save_run(path, checkpoint, main, world):
    """The one save: the checkpoint written by the first process; the others wait for it."""
    if main:
        save_checkpoint(checkpoint(), path)
    if world > 1:
        dist.barrier()


def interval_mean(loss_sum, steps, stop_asked, world):
    """The mean loss of the steps since the last logged one and whether any process was asked to
    stop, over all processes: the loop's one host sync."""
    stats = torch.stack([loss_sum / world, torch.full_like(loss_sum, float(stop_asked))])
    if world > 1:
        dist.all_reduce(stats)
    loss_total, asked = stats.tolist()
    return loss_total / steps, asked > 0


def diverged(loss, first, last, epoch, saved_step, out):
    """The error of a run whose loss is not finite between steps `first` and `last`."""
    kept = f"the checkpoint of step {saved_step} is kept" if saved_step >= 0 else "no checkpoint"
    return FloatingPointError(
        f"loss is {loss} between steps {first} and {last} (epoch {epoch}); stopped, {kept} "
        f"({out / 'checkpoint.pt'}). Try a lower --blr, --clip-grad 1.0 or --amp fp32"
    )


def train(
    model,
    optimizer,
    tcfg,
    loader,
    loss_of,
    end_of_epoch,
    state,
    *,
    ckpt=None,
    ema=None,
    evaluate_first=False,
    title="",
):
    """The loop of pre-training and fine-tuning, on one process or many under torchrun (DDP; rank
    0 writes); returns the run folder. loss_of(net, imgs, labels, inputs) -> a micro-batch's loss;
    end_of_epoch(epoch) -> metrics, after each epoch (and before training if evaluate_first);
    state() -> the checkpoint but the loop's part; ckpt: a checkpoint to continue (its model
    loaded); ema: an AveragedModel. Every draw is seeded by its place in the run, so a resumed run
    is bitwise the whole one. The loss and the stop flag reach the host at logged steps only."""
    from rich import get_console

    # set-up: processes, the schedule, what a resumed run continues, the run folder
    world, rank = world_and_rank()
    main = rank == 0
    console = get_console()
    device = next(model.parameters()).device
    out = Path(tcfg.out)
    amp_dtype = autocast_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    schedule = schedule_of(tcfg, loader.sampler.n, world)
    step = restore_loop(ckpt, optimizer, scaler, ema)
    net = wrap_model(model, device, world, tcfg.compile)
    if main:
        open_run_folder(out, step if ckpt else None)
        console.print(describe_run(title, model, schedule, tcfg, world, device) + f", {out}")

    log = functools.partial(write_log, out / "log.jsonl", console if main else None)

    def forward(imgs, labels, inputs):  # a micro-batch's loss, under autocast on a GPU
        with torch.autocast(device.type, amp_dtype, enabled=amp_dtype is not None):
            return loss_of(net, imgs, labels, inputs)

    def checkpoint():  # the caller's state and the loop's
        ema_state = ema.module.state_dict() if ema is not None else None
        loop = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step)
        return {**state(), **loop, "ema": ema_state}

    steps_per_epoch = schedule.steps_per_epoch
    images_per_step = tcfg.batch_size * tcfg.accum_iter  # per process
    batches = None
    saved_step = step if ckpt else -1
    logged_step = step
    loss_sum = torch.zeros((), device=device)
    start = tick = time.perf_counter()
    save = functools.partial(save_run, out / "checkpoint.pt", checkpoint, main, world)
    bar = progress_bar(title, step, schedule.stop, console, main)
    with stop_signals() as signals, bar as bar, saved_before_unreadable(save, out, world):
        if evaluate_first and step == 0:  # before training: the floor of every later number
            metrics = end_of_epoch(0)
            log("before training: ", metrics, step=0, epoch=0)
            bar(metrics=shown(metrics))
        # the steps, each over tcfg.accum_iter micro-batches
        while step < schedule.stop:
            epoch = step // steps_per_epoch
            if batches is None or step % steps_per_epoch == 0:  # a new epoch, or a resumed one
                loader.sampler.set_epoch(epoch, start=(step % steps_per_epoch) * images_per_step)
                batches = iter(loader)
                bar(description=f"epoch {epoch + 1}/{tcfg.epochs}")
            lr = set_lr(optimizer, schedule.lr(step))
            for micro in range(tcfg.accum_iter):
                imgs, labels, inputs = to_device(next(batches), device)
                # every draw here (drop path, mixup, a method's noise) is seeded by its place
                torch.manual_seed(hash((tcfg.seed, step, micro, rank)) % 2**63)
                with gradient_sync(net, micro == tcfg.accum_iter - 1):
                    loss = forward(imgs, labels, inputs)
                    scaler.scale(loss / tcfg.accum_iter).backward()
                loss_sum += loss.detach().float() / tcfg.accum_iter
            optimizer_step(model, optimizer, scaler, tcfg.clip_grad, ema)
            step += 1
            # the end of a step: the log every tcfg.log_every steps, an epoch's end, the save
            epoch_end = step % steps_per_epoch == 0
            save_now = epoch_end or step == schedule.stop
            save_now = save_now or (tcfg.ckpt_every and step % tcfg.ckpt_every == 0)
            stop_asked = False
            if step % tcfg.log_every == 0 or save_now:
                steps = step - logged_step
                loss_mean, stop_asked = interval_mean(loss_sum, steps, bool(signals), world)
                if not math.isfinite(loss_mean):
                    raise diverged(loss_mean, logged_step + 1, step, epoch + 1, saved_step, out)
                ips = steps * images_per_step * world / (time.perf_counter() - tick)
                rates = dict(lr=lr, img_per_s=round(ips, 1), **skipped_images(loader))
                log(step=step, epoch=round(step / steps_per_epoch, 4), loss=loss_mean, **rates)
                bar(completed=step, loss=loss_mean, lr=lr, ips=ips)
                loss_sum.zero_()
                logged_step = step
                tick = time.perf_counter()
            if epoch_end:  # held-out metrics, then a checkpoint
                elapsed = round(time.perf_counter() - start, 1)
                metrics = end_of_epoch(epoch + 1)
                log(f"epoch {epoch + 1}: ", metrics, step=step, epoch=epoch + 1, elapsed_s=elapsed)
                bar(metrics=shown(metrics))
            if save_now or stop_asked:
                save()
                saved_step = step
            if stop_asked:
                how = f"continue with --resume --out {out}"
                raise InterruptedError(f"stopped by a signal at step {step} and saved: {how}")
    return out


# --------------------------------------------------------------------------------------------------
# Pre-training: the loop with the held-out reconstruction loss after every epoch


@torch.no_grad()
def evaluate_loss(model, loader, device, amp_dtype, world, seed=0):
    """Mean loss over a held-out loader, the global RNG fixed (and restored after): comparable
    across epochs. Summed over the processes, each holding its share of the images."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # sum of losses x images, images
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for imgs, labels, inputs in loader:
            if takes_labels:
                inputs = {**inputs, "labels": labels}
            imgs = imgs.to(device)
            inputs = {k: v.to(device) for k, v in inputs.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = model(imgs, **inputs)[0]
            total[0] += loss.double() * len(imgs)
            total[1] += len(imgs)
    model.train()
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def pretrain(model, cfg, tcfg, loader, val_loader, method, code_files, picture=None, knn=None):
    """Pre-train `model`, model(imgs, **inputs [, labels]) -> (loss, pred, mask), on `loader`;
    the held-out loss before training and after each epoch, picture(model, path or None, title)
    every --vis-every epochs, knn(model) -> {"knn_top1": ...} before training and every
    --knn-every epochs. Writes config.json, log.jsonl and checkpoint.pt (model, optimiser, step,
    configs, the code of `code_files`, git hash) in tcfg.out."""
    rank, world, device = setup(tcfg)
    epoch_steps(loader.sampler.n, world, tcfg)  # before anything is written
    out = Path(tcfg.out)
    ckpt = load_checkpoint(out / "checkpoint.pt") if tcfg.resume else None
    if ckpt:
        load_weights(model, ckpt["model"], str(out / "checkpoint.pt"))
    model.to(device)
    groups = param_groups(model, tcfg.weight_decay)
    # AdamW with the MAE paper's betas (Appendix A.1)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=True)
    # a method whose forward takes the labels gets them (e.g. one pairing images by class)
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    config = dict(config=dataclasses.asdict(cfg), train=dataclasses.asdict(tcfg))
    meta = dict(method=method, **config, git=git_hash(), torch=str(torch.__version__))
    meta["world_size"] = world
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    meta["code"] = {Path(f).name: Path(f).read_text() for f in code_files}

    def loss_of(net, imgs, labels, inputs):
        if takes_labels:
            inputs = {**inputs, "labels": labels}
        return net(imgs, **inputs)[0]

    def end_of_epoch(epoch):
        amp_dtype = autocast_dtype(tcfg.amp, device)
        val_loss = evaluate_loss(model, val_loader, device, amp_dtype, world, seed=tcfg.seed)
        metrics = {"val_loss": val_loss}
        if picture and tcfg.vis_every and epoch and epoch % tcfg.vis_every == 0:
            path = out / f"vis-epoch{epoch:04d}.png" if rank == 0 else None
            picture(model, path, f"{method}, epoch {epoch}, held-out images.")  # on every process
        if knn and tcfg.knn_every and epoch % tcfg.knn_every == 0:  # on every process, alike
            metrics.update(knn(model))
        return metrics

    def state():
        return {"model": model.state_dict(), **meta}

    args = (model, optimizer, tcfg, loader, loss_of, end_of_epoch, state)
    return train(*args, ckpt=ckpt, evaluate_first=True, title=method)
