"""Plumbing shared by every method file: ViT pieces, presets, the training loop and checkpoints.

Nothing in here is any paper's contribution: masking, targets, decoders and losses live in the method files, even
where that repeats a few lines. The data (data sets, augmentation, seeded loaders) is in data_sets/.

Shape legend, used in every file:
    B batch, C channels, H = W image size, P patch size, N patches (H/P * W/P),
    N_vis visible patches, N_mask masked patches, D encoder width, D_dec decoder width.
    mask: (B, N), 0 = visible (kept), 1 = masked (removed): the facebookresearch/mae convention.
"""

import argparse
import contextlib
import dataclasses
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

# ----------------------------------------------------------------------------------------------------
# ViT pieces under timm's VisionTransformer names, as the official MAE code: official checkpoints load, ours go to timm


class PatchEmbed(nn.Module):
    """Image to patch tokens with one Conv2d whose kernel = stride = P: (B, C, H, W) -> (B, N, D)."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {patch_size}: fix --img-size")
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2  # N
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            shape = f"(B, {', '.join(map(str, expected))})"
            raise ValueError(f"expected images of shape {shape}, got {tuple(x.shape)}: resize them or fix --img-size")
        return rearrange(self.proj(x), "b d h w -> b (h w) d")  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with fused qkv, computed by F.scaled_dot_product_attention."""

    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads: change --num-heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        # the (three h d) order is timm's qkv layout, so official weights split into q, k, v correctly
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D/heads)
        return self.proj(rearrange(x, "b h n d -> b n (h d)"))  # (B, N, D)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). LayerNorm eps 1e-6."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        fc1, fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)
        self.mlp = nn.Sequential(OrderedDict(fc1=fc1, act=nn.GELU(), fc2=fc2))  # timm's Mlp names
        if drop_path:  # fine-tuning: only then is torchvision imported (its import takes seconds)
            from torchvision.ops import StochasticDepth

        self.drop_path = StochasticDepth(drop_path, mode="row") if drop_path else nn.Identity()  # a sample's branch

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sincos_pos_embed(embed_dim, grid_size, cls_token=False):
    """Fixed 2D sin-cos position embedding, (1, [1 +] N, D), laid out as the official util/pos_embed.py: the first
    D/2 channels encode the column, the last D/2 the row; a zero row is prepended for the cls token."""
    if embed_dim % 4:
        raise ValueError(f"width {embed_dim} must be a multiple of 4 for the 2D sin-cos embedding")
    omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
    coords = torch.arange(grid_size, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # (G, G) each, patches in row-major order

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
    """The official MAE initialisation: xavier-uniform Linear layers, zero biases, the patch projection as a Linear."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))


# ----------------------------------------------------------------------------------------------------
# Model sizes, and presets: the scale of a run (image size, widths, batch, epochs); Configs hold everything else

MAE_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)  # the official one, 512-d x 8
VIT_SIZES = {  # ViT-Ti/S (DeiT), ViT-B/L/H (ViT paper), each with the official MAE decoder
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, **MAE_DECODER),
    "small": dict(embed_dim=384, depth=12, num_heads=6, **MAE_DECODER),
    "base": dict(embed_dim=768, depth=12, num_heads=12, **MAE_DECODER),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, **MAE_DECODER),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, patch_size=14, **MAE_DECODER),
}

# fmt: off
PRESETS = {
    # seconds on a CPU: for tests and for trying a code change
    "tiny": dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32,
                 decoder_depth=1, decoder_num_heads=4, data="patterns", train_size=256, val_size=64,
                 batch_size=32, epochs=2, warmup_epochs=0, blr=1.5e-3, num_workers=0, log_every=1),
    # the default, minutes on a CPU. DEVIATION: 50 % masked, blr 4e-3; else MAE stalls ~700 steps (docs/learning.md)
    "cpu": dict(img_size=32, patch_size=8, embed_dim=128, depth=6, num_heads=4, decoder_embed_dim=128, decoder_depth=2,
                decoder_num_heads=4, mask_ratio=0.5, throw=0.25, data="patterns", train_size=8192, val_size=1024,
                batch_size=128, epochs=24, warmup_epochs=2, blr=4e-3, num_workers=1, log_every=8),
    # one GPU, hours: ViT-Tiny width on the 8x8 grid of 32-px CIFAR images
    "cifar": dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3, decoder_embed_dim=128,
                  decoder_depth=4, decoder_num_heads=4, data="cifar10", batch_size=256, epochs=400,
                  warmup_epochs=20, num_workers=8),
    # one GPU, about a day: ViT-S/8 at 64 px (8x8 grid), the small model of the i-MAE code
    "tiny-imagenet": dict(img_size=64, patch_size=8, embed_dim=384, depth=12, num_heads=6,
                          decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
                          data="tiny-imagenet", batch_size=256, epochs=400, warmup_epochs=20,
                          num_workers=8),
    # the paper recipe: ViT-B/16 at 224 px, 4096 images per step (64 per GPU x 64 GPUs, or accumulate)
    "imagenet": dict(img_size=224, **VIT_SIZES["base"], data="imagenet", batch_size=64, epochs=800,
                     warmup_epochs=40, num_workers=10),
}
# fmt: on

# ----------------------------------------------------------------------------------------------------
# Devices, processes, checkpoints


def gather_batch(*tensors):
    """Each (B_r, ...) tensor of every process r concatenated in rank order (the B_r may differ), and the index of this
    process's first row, so N processes mix a batch as one would; one process: the tensors and 0. No gradients."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return (*tensors, 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [torch.empty(1, dtype=torch.long, device=tensors[0].device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([len(tensors[0])], device=tensors[0].device))
    sizes, gathered = [int(s) for s in sizes], []
    for x in tensors:
        padded = torch.cat([x.detach(), x.new_zeros(max(sizes) - len(x), *x.shape[1:])])
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        gathered.append(torch.cat([part[:n] for part, n in zip(parts, sizes)]))
    return (*gathered, sum(sizes[:rank]))


def check_device(name):
    """A ValueError unless `name` is auto or a device torch can use here (cpu, cuda, cuda:N, ...)."""
    try:
        device = torch.device("cpu" if name == "auto" else name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: choose auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu or auto")


def pick_device(name="auto", local_rank=0):
    """The device of --device; `auto` and `cuda` mean this process's GPU if there is one."""
    check_device(name)
    device = torch.device("cuda" if name == "auto" and torch.cuda.is_available() else name.replace("auto", "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def git_hash():
    git = ["git", "-C", str(Path(__file__).resolve().parent)]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return head + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_checkpoint(obj, path):
    """Write atomically (a temporary file, flushed, renamed over the old one): a crash never leaves half a file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint of ours or an official MAE one ({"model": state_dict, "args": Namespace, ...}), loaded with
    weights_only=True: only tensors and plain containers, so a crafted file cannot run code."""
    path = Path(path) / "checkpoint.pt" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path}: pass a run folder (runs/NAME) or a .pt/.pth file")
    # the official MAE scripts pickle their args; older checkpoints of ours hold torch's version string class
    torch.serialization.add_safe_globals([argparse.Namespace, torch.torch_version.TorchVersion])
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused, reason = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e)), (str(e).splitlines() or [""])[0]
        if refused:
            problem = f"holds pickled objects that safe loading refuses ({refused[1]}): it is not a checkpoint of ours"
        elif not path.read_bytes()[:4].startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip (old torch: pickle)
            problem = "is not a checkpoint (not a file torch.save wrote): pass a run folder or a .pt/.pth checkpoint"
        else:
            problem = f"is not a readable checkpoint, truncated or corrupt ({reason.split('. ')[0][:160]}): restore it"
        raise ValueError(f"{path} {problem}") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path} holds no 'model' state dict: it is not a checkpoint of ours or of MAE's")
    return ckpt


def load_weights(model, state, source="the checkpoint"):
    """model.load_state_dict(state), a mismatch (another architecture or size) told in one line, not torch's report."""
    own = model.state_dict()
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if wrong or missing or unexpected:
        k = (wrong or missing or unexpected)[0]
        why = f"{k} is {tuple(state[k].shape)} there and {tuple(own[k].shape)} here" if wrong else f"e.g. {k}"
        counts = f"{len(wrong)} of another shape, {len(missing)} tensor(s) missing, {len(unexpected)} unexpected"
        raise ValueError(f"{source} does not fit this model ({counts}; {why}): it is of another size or method")
    model.load_state_dict(state)


# ----------------------------------------------------------------------------------------------------
# The training loop


@dataclasses.dataclass
class TrainConfig:
    data: str = "imagenet"  # patterns | fashion-mnist | cifar10 | cifar100 | tiny-imagenet | imagenet | folder
    data_dir: str = "data"  # where data sets live; for imagenet / folder: the folder holding train/ and val/
    download: bool = False  # let torchvision download CIFAR / Fashion-MNIST into --data-dir
    train_size: int = 0  # use N training images, a fixed random subset (0 = all; patterns: how many to draw)
    val_size: int = 0  # use N held-out images for the per-epoch reconstruction loss (0 = all)
    epochs: int = 800  # MAE paper Sec. 4: 800 epochs for the ablations, 1600 for the best results
    warmup_epochs: int = 40  # MAE paper, Appendix A.1: 40 warm-up epochs
    batch_size: int = 64  # images per process and step (official: 64 per GPU x 64 GPUs = 4096)
    accum_iter: int = 1  # gradient accumulation: effective batch = batch_size * accum_iter * processes
    blr: float = 1.5e-4  # base learning rate, lr = blr * effective batch / 256 (MAE paper, Appendix A.1)
    lr: float = 0.0  # absolute learning rate; 0 = derive it from --blr
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.05  # AdamW weight decay (MAE paper, Appendix A.1); never on norms, biases, tokens
    clip_grad: float = 0.0  # clip the gradient norm to this value (0 = off; the MAE recipe does not clip)
    seed: int = 0  # seeds the initialisation, data order, augmentation and masks
    num_workers: int = 8  # data-loading processes per training process
    amp: str = "bf16"  # autocast on GPU: bf16 | fp16 (with a gradient scaler) | fp32; CPU runs are fp32
    compile: bool = False  # torch.compile the model
    log_every: int = 20  # write a line to log.jsonl every N steps
    ckpt_every: int = 0  # also save a checkpoint every N steps (0 = only at epoch ends and the last step)
    vis_every: int = 0  # also save a reconstruction picture, vis-epochNNNN.png, every N epochs (0 = never)
    max_steps: int = 0  # stop after N steps of the full schedule (0 = run all epochs); for budgets and tests
    out: str = ""  # run folder for log and checkpoint (default runs/<method>-<data>-<time>)
    resume: bool = False  # continue the run in --out from its checkpoint, exactly
    overwrite: bool = False  # replace a run already in --out
    device: str = "auto"  # auto (GPU if there is one) | cpu | cuda | cuda:N

    def __post_init__(self):
        non_negative = "warmup_epochs train_size val_size lr min_lr weight_decay clip_grad num_workers ckpt_every"
        check_options(self, "epochs batch_size accum_iter log_every", non_negative + " max_steps vis_every")
        if self.blr <= 0 and self.lr <= 0:
            raise ValueError(f"--blr must be positive, got {self.blr}")
        if self.amp not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"--amp must be bf16, fp16 or fp32, got {self.amp!r}")
        check_device(self.device)


# options that may change when a run (pre-training or fine-tuning) is resumed: they do not change what it computes
RESUME_MAY_CHANGE = set("out resume max_steps num_workers log_every ckpt_every vis_every compile device".split())


def check_options(cfg, positive="", non_negative=""):
    """A ValueError naming the first of the fields `positive` (space-separated) below 1 or `non_negative` below 0."""
    for names, low, words in ((positive, 1, "be at least 1"), (non_negative, 0, "not be negative")):
        for name in names.split():
            if getattr(cfg, name) < low:
                raise ValueError(f"--{name.replace('_', '-')} must {words}, got {getattr(cfg, name)}")


def param_groups(model, weight_decay):
    """AdamW parameter groups: no weight decay on biases and norms (1-d) or on tokens and embeddings."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or "token" in name or "pos_embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step, total_steps, warmup_steps, lr, min_lr):
    """Linear warm-up, then a half-cycle cosine to min_lr, per step (official util/lr_sched.py)."""
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def setup(tcfg):
    """(rank, world size, device) of this process from torchrun's environment (joins the process group once)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return int(os.environ.get("RANK", 0)), world, pick_device(tcfg.device, int(os.environ.get("LOCAL_RANK", 0)))


def prepare_run(method, cfg, tcfg, given):
    """(Config, TrainConfig) of a run in tcfg.out (default runs/<method>-<data>-<time>): never two runs in one folder;
    on --resume exactly the saved run, but for the options in RESUME_MAY_CHANGE (`given`: the options passed)."""
    if tcfg.resume and not tcfg.out:
        raise ValueError("--resume needs --out, the folder of the run to continue")
    out = Path(tcfg.out or f"runs/{method}-{tcfg.data}-{time.strftime('%Y%m%d-%H%M%S')}")
    tcfg.out = str(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder: pass a folder")
    if not tcfg.resume:
        if ((out / "checkpoint.pt").exists() or (out / "log.jsonl").exists()) and not tcfg.overwrite:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, --overwrite, or another --out")
        return cfg, tcfg
    ckpt = load_checkpoint(out / "checkpoint.pt")
    if ckpt.get("method") != method:
        raise ValueError(f"{out} holds a {ckpt.get('method')!r} run, not {method!r}")
    saved = {**ckpt["config"], **ckpt["train"]}
    changed = ", ".join(
        "--" + k.replace("_", "-") for k in sorted(given) if k not in RESUME_MAY_CHANGE and saved.get(k) != given[k]
    )
    if changed:
        raise ValueError(f"--resume continues {out} with its saved settings; drop {changed}")
    train = {**ckpt["train"], **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}}
    return type(cfg)(**ckpt["config"]), TrainConfig(**train)


def autocast_dtype(amp, device):
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[amp] if device.type == "cuda" else None


def epoch_steps(images, world, tcfg):
    """Optimiser steps in an epoch of `images` training images; a ValueError if not even one."""
    per_step = tcfg.batch_size * tcfg.accum_iter * world
    if images // per_step == 0:
        raise ValueError(f"{images} training images are fewer than one step needs ({per_step}): lower --batch-size")
    return images // per_step


def train(
    model, optimizer, tcfg, loader, loss_of, end_of_epoch, state, ckpt=None, ema=None, evaluate_first=False, title=""
):
    """The loop of pre-training and fine-tuning (one process, or many under torchrun: DDP, rank 0 writes); returns
    tcfg.out. loss_of(net, imgs, labels, inputs) -> a micro-batch's loss; end_of_epoch(epoch) -> metrics, after each
    epoch (and before training if evaluate_first); state() -> the checkpoint but the loop's part; ckpt: the one to
    continue (its model loaded); ema: an AveragedModel. Every draw is seeded by its place in the run, so a resumed run
    is bitwise the whole one; the loss and the stop flag reach the host at logged steps (and before saves) only."""
    from rich import get_console
    from rich.progress import MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    # set-up: processes, the schedule, the run folder
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device, main, console = next(model.parameters()).device, rank == 0, get_console()
    out, sampler = Path(tcfg.out), loader.sampler
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    amp_dtype = autocast_dtype(tcfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    images_per_step = tcfg.batch_size * tcfg.accum_iter  # per process
    steps_per_epoch = epoch_steps(sampler.n, world, tcfg)
    total_steps, warmup_steps = tcfg.epochs * steps_per_epoch, tcfg.warmup_epochs * steps_per_epoch
    stop = min(total_steps, tcfg.max_steps or total_steps)
    peak_lr = tcfg.lr or tcfg.blr * images_per_step * world / 256
    step = ckpt["step"] if ckpt else 0
    if ckpt:
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:
            ema.module.load_state_dict(ckpt["ema"])
            ema.n_averaged.fill_(step)
    ids = [device.index] if device.type == "cuda" else None
    net = nn.parallel.DistributedDataParallel(model, device_ids=ids) if world > 1 else model
    net = torch.compile(net) if tcfg.compile else net
    if main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_path.with_name("checkpoint.pt.tmp").unlink(missing_ok=True)  # left by a run killed mid-save
        rows = log_path.read_text().splitlines() if ckpt and log_path.exists() else []
        # keep what the log says up to the checkpoint (a killed run may have gone on); a new run starts afresh
        log_path.write_text("".join(r + "\n" for r in rows if r.endswith("}") and json.loads(r)["step"] <= step))
        if not ckpt:
            ckpt_path.unlink(missing_ok=True)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
        console.print(
            f"{title}: {trained:.2f}M trained parameters, {steps_per_epoch} steps/epoch x {tcfg.epochs} epochs, "
            f"{world} process(es) on {device}, lr {peak_lr:.2e} (batch {images_per_step * world}), folder {out}"
        )

    def log(say="", metrics=None, **row):  # a line of log.jsonl; with `say`, also printed with the metrics
        if main:
            with open(log_path, "a") as f:
                f.write(json.dumps({**row, **(metrics or {})}) + "\n")
            if say:
                console.print(say + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def save():  # the one save: the caller's state, the optimiser, scaler, step and EMA
        if main:
            ema_state = ema.module.state_dict() if ema is not None else None
            loop = dict(optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step, ema=ema_state)
            save_checkpoint({**state(), **loop}, ckpt_path)
        if world > 1:
            dist.barrier()

    signals = []  # SIGTERM (preemption) or Ctrl-C: stop at the next logged step and save; a second Ctrl-C aborts

    def on_signal(signum, frame):
        if signals and signum == signal.SIGINT:
            raise KeyboardInterrupt
        signals.append(signum)

    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    fields = TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}  {task.fields[ips]:.0f} img/s")
    columns = (*Progress.get_default_columns()[:-1], MofNCompleteColumn(), fields, TimeRemainingColumn())
    progress = Progress(*columns, console=console, disable=not main or step >= stop)  # no bar if nothing is left
    task = progress.add_task(title, total=stop, completed=step, loss=float("nan"), lr=0.0, ips=0.0)
    if evaluate_first and step == 0:  # before training: the floor every later number is read against
        log("before training: ", end_of_epoch(0), step=0, epoch=0)

    # the loop over optimiser steps, with an inner loop over micro-batches
    batches, saved_step, stop_asked = None, step if ckpt else -1, False
    loss_sum, logged_step, start = torch.zeros((), device=device), step, time.perf_counter()
    tick = start  # of the logged interval
    progress.start()
    try:
        while step < stop:
            epoch = step // steps_per_epoch
            if batches is None or step % steps_per_epoch == 0:  # a new epoch, or the rest of the resumed one
                sampler.set_epoch(epoch, start=(step % steps_per_epoch) * images_per_step)
                batches = iter(loader)
                progress.update(task, description=f"epoch {epoch + 1}/{tcfg.epochs}")
            lr = lr_at(step, total_steps, warmup_steps, peak_lr, tcfg.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            for micro in range(tcfg.accum_iter):
                imgs, labels, inputs = next(batches)
                imgs, labels = imgs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
                # every draw here (drop path, mixup, a method's noise) seeded by its place, not by what ran before
                torch.manual_seed(hash((tcfg.seed, step, micro, rank)) % 2**63)
                last = micro == tcfg.accum_iter - 1
                with net.no_sync() if world > 1 and not last else contextlib.nullcontext():  # DDP: sync at the last
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                        loss = loss_of(net, imgs, labels, inputs)
                    scaler.scale(loss / tcfg.accum_iter).backward()
                loss_sum += loss.detach().float() / tcfg.accum_iter
            if tcfg.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), tcfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            epoch_end = step % steps_per_epoch == 0
            save_now = epoch_end or step == stop or (tcfg.ckpt_every and step % tcfg.ckpt_every == 0)
            if step % tcfg.log_every == 0 or save_now:  # the one host sync: logged steps, and before every save
                stats = torch.stack([loss_sum / world, torch.tensor(float(bool(signals)), device=device)])
                if world > 1:
                    dist.all_reduce(stats)
                loss_total, asked = stats.tolist()
                loss_mean, stop_asked = loss_total / (step - logged_step), asked > 0
                if not math.isfinite(loss_mean):
                    kept = f"the checkpoint of step {saved_step} is kept" if saved_step >= 0 else "no checkpoint"
                    raise FloatingPointError(
                        f"loss is {loss_mean} between steps {logged_step + 1} and {step} (epoch {epoch + 1}); "
                        f"stopped, {kept} ({ckpt_path}). Try a lower --blr, --clip-grad 1.0 or --amp fp32"
                    )
                ips = (step - logged_step) * images_per_step * world / (time.perf_counter() - tick)
                log(step=step, epoch=round(step / steps_per_epoch, 4), loss=loss_mean, lr=lr, img_per_s=round(ips, 1))
                progress.update(task, completed=step, loss=loss_mean, lr=lr, ips=ips)
                loss_sum.zero_()
                logged_step, tick = step, time.perf_counter()
            if epoch_end:  # the end of an epoch: held-out metrics, then a checkpoint
                elapsed = round(time.perf_counter() - start, 1)
                log(f"epoch {epoch + 1}: ", end_of_epoch(epoch + 1), step=step, epoch=epoch + 1, elapsed_s=elapsed)
            if save_now or stop_asked:
                save()
                saved_step = step
            if stop_asked:
                break
    finally:
        progress.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stop_asked:
        raise InterruptedError(f"stopped by a signal at step {step} and saved: continue with --resume --out {out}")
    return out


@torch.no_grad()
def evaluate_loss(model, loader, device, amp_dtype, world, seed=0):
    """Mean loss over a held-out loader, the global RNG fixed (and restored after): comparable across epochs."""
    model.eval()
    total = torch.zeros(2, device=device, dtype=torch.float64)  # (sum of losses x images, images)
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    count = torch.tensor(len(loader), device=device)
    if world > 1:  # a process may hold one batch fewer
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        batches, batch = iter(loader), None
        for _ in range(int(count)):
            # a process out of batches runs the model on an empty one, for methods that gather_batch across processes
            batch = next(batches, None) or [batch[0][:0], batch[1][:0], {k: v[:0] for k, v in batch[2].items()}]
            imgs, labels, inputs = batch
            inputs = {**inputs, "labels": labels} if takes_labels else inputs
            imgs, inputs = imgs.to(device), {k: v.to(device) for k, v in inputs.items()}
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = model(imgs, **inputs)[0]
            if len(imgs):
                total += torch.stack([loss.double() * len(imgs), torch.tensor(len(imgs), device=device)])
    model.train()
    if world > 1:
        dist.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def pretrain(model, cfg, tcfg, loader, val_loader, method, code_files, picture=None):
    """Pre-train `model`, model(imgs, **inputs [, labels]) -> (loss, pred, mask), on `loader`; the held-out loss before
    training and after each epoch, picture(model, path or None, title) every --vis-every epochs. Writes config.json,
    log.jsonl and checkpoint.pt (model, optimiser, step, configs, code_files' code, git hash) in tcfg.out."""
    rank, world, device = setup(tcfg)
    epoch_steps(loader.sampler.n, world, tcfg)  # before anything is written
    out, ckpt = Path(tcfg.out), load_checkpoint(Path(tcfg.out) / "checkpoint.pt") if tcfg.resume else None
    if ckpt:
        load_weights(model, ckpt["model"], str(out / "checkpoint.pt"))
    model.to(device)
    groups = param_groups(model, tcfg.weight_decay)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=device.type == "cuda")  # MAE paper, Appendix A.1
    takes_labels = "labels" in inspect.signature(model.forward).parameters  # e.g. a method pairing images by class
    meta = dict(method=method, config=dataclasses.asdict(cfg), train=dataclasses.asdict(tcfg), git=git_hash())
    meta.update(torch=str(torch.__version__), world_size=world)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    meta["code"] = {Path(f).name: Path(f).read_text() for f in code_files}

    def loss_of(net, imgs, labels, inputs):
        return net(imgs, **inputs, **({"labels": labels} if takes_labels else {}))[0]

    def end_of_epoch(epoch):
        val_loss = evaluate_loss(model, val_loader, device, autocast_dtype(tcfg.amp, device), world, seed=tcfg.seed)
        if picture and tcfg.vis_every and epoch and epoch % tcfg.vis_every == 0:  # every process runs the model
            path = out / f"vis-epoch{epoch:04d}.png" if rank == 0 else None
            picture(model, path, f"{method}, epoch {epoch}, held-out images.")
        return {"val_loss": val_loss}

    def state():
        return {"model": model.state_dict(), **meta}

    return train(model, optimizer, tcfg, loader, loss_of, end_of_epoch, state, ckpt, evaluate_first=True, title=method)
