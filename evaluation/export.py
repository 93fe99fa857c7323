"""Export: a checkpoint's encoder as a plain state dict that timm's VisionTransformer loads with
strict=True, checked to compute the same features; the `export` command prints the timm code that
loads it."""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import common
from evaluation.loading import load_model, vit_shape


@dataclass
class ExportConfig:
    out: str = ""  # the file to write (default: <run folder>/encoder_timm.pth)
    overwrite: bool = False  # replace --out if it exists
    method: str = ""  # method of a checkpoint that names none (official MAE ones; default mae)


class TimmViT(nn.Module):
    """timm's VisionTransformer encoder (cls token, learned pos_embed over 1 + N tokens, pre-norm
    blocks, final norm) from common's pieces under timm's names: export_timm checks in it that the
    exported tensors compute our features."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, mlp_ratio, num_heads):
        super().__init__()
        self.patch_embed = common.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        tokens = 1 + self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, embed_dim))
        blocks = [common.Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)]
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, imgs):
        x = self.patch_embed(imgs)  # (B, N, D)
        cls = self.cls_token.expand(len(x), -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed  # (B, 1 + N, D)
        # the patch tokens after the final norm, as forward_features
        return self.norm(self.blocks(x))[:, 1:]  # (B, N, D)


# the tensors of a timm ViT encoder, and those every one of them has
TIMM_NAME = (
    r"cls_token|pos_embed"
    r"|(patch_embed\.proj|norm|blocks\.\d+\.(norm[12]|attn\.(qkv|proj)|mlp\.fc[12]))\.(weight|bias)"
)
TIMM_NEEDS = [
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "blocks.0.attn.qkv.weight",
    "blocks.0.mlp.fc1.weight",
    "norm.weight",
]


def export_timm(model, info, source):
    """(state, kwargs): the encoder's tensors under timm's names (nothing else) and the
    VisionTransformer arguments that load them. A model whose features are not those of such a ViT
    is refused with a one-line ValueError."""
    own = model.state_dict()
    state = {k: v.detach().clone() for k, v in own.items() if re.fullmatch(TIMM_NAME, k)}
    others = sorted(n for n in info["needed"] if n not in state and n in own)
    other = ", ".join(others[:3]) or "other computations"
    lacking = [k for k in TIMM_NEEDS if k not in state]
    if not hasattr(model.cfg, "num_heads"):
        lacking.append("num_heads in its config")
    refused = f"export writes plain ViT encoders only ({source}: the {info['method']} features"
    refused += f" use {other})"
    if lacking:
        names = f"not a ViT with timm's VisionTransformer names, no {', '.join(lacking)}"
        raise ValueError(f"{names}: {refused}")
    kwargs = {**vit_shape(state), "img_size": model.cfg.img_size}
    kwargs["num_heads"] = int(model.cfg.num_heads)
    vit = TimmViT(**kwargs)
    # a one-line error on a mismatch
    common.load_weights(vit, state, f"the {info['method']} encoder of {source}")
    size = kwargs["img_size"]
    generator = torch.Generator().manual_seed(0)
    imgs = torch.randn(2, kwargs["in_chans"], size, size, generator=generator)
    was_training = model.training
    with torch.no_grad():
        ours = model.eval().forward_features(imgs)  # (B, N, D)
        theirs = vit.eval()(imgs)  # (B, N, D)
    model.train(was_training)
    same = ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    if not same:
        not_vit = "the features are not those of a plain ViT over its timm-named tensors"
        raise ValueError(f"{not_vit}: {refused}")
    return state, kwargs


def timm_constructor(kwargs):
    """The Python expression that builds the timm model an exported state dict loads into."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    norm = "norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)"
    vit = "timm.models.vision_transformer.VisionTransformer"
    return f"{vit}({args}, qkv_bias=True, num_classes=0, {norm})"


def run_export(source, xcfg, find_method, console):
    """Write the encoder of `source` with export_timm (atomically) and print the timm code that
    loads it; the path."""
    model, info = load_model(source, find_method, xcfg.method or "mae")
    path = Path(xcfg.out) if xcfg.out else info["run_dir"] / "encoder_timm.pth"
    if path.is_dir() or (path.exists() and not xcfg.overwrite):
        if path.is_dir():
            problem = "already exists and is a folder: pass another --out"
        else:
            problem = "already exists: pass --overwrite to replace it, or another --out"
        raise ValueError(f"{path} {problem}")
    state, kwargs = export_timm(model, info, source)
    path.parent.mkdir(parents=True, exist_ok=True)
    common.save_checkpoint(state, path)  # atomic: a temporary file, then a rename
    values = sum(v.numel() for v in state.values()) / 1e6
    what = f"{len(state)} tensors, {values:.2f}M values"
    what += f", the {info['method']} encoder without its decoder"
    console.print(f"wrote {path}: {what}. Load it with", highlight=False)
    load = f"vit.load_state_dict(torch.load({str(path)!r}, weights_only=True), strict=True)"
    code = f"import functools, timm, torch\nvit = {timm_constructor(kwargs)}\n{load}"
    console.print(code, highlight=False, markup=False, soft_wrap=True)
    return path
