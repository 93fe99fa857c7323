"""SimMIM: A Simple Framework for Masked Image Modeling.

Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu, CVPR 2022. https://arxiv.org/abs/2111.09886
Official code: https://github.com/microsoft/SimMIM (models/simmim.py, data/data_simmim.py).
README section: README.md#simmim

Idea: mask random 32-px squares of the image (60% of them) by swapping their patch embeddings for
one learned mask token, run the whole ViT encoder on every position, and predict the raw pixels of
the masked squares with a single linear layer; the loss is L1 on the masked pixels. There is no
decoder: the encoder both understands the visible part and fills in the rest, so the "prediction
head" can be as light as a 1x1 convolution. Masking squares bigger than a patch keeps neighbouring
visible pixels far enough away that copying them does not solve the task.

Changes relative to mae.py:
- Masks come from `simmim_masking`: random over mask patches (32 px at 224), upsampled to model
  patches, drawn by the loader as the official data pipeline does; the ratio is 0.6.
- The encoder sees all N patches: masked patch embeddings are replaced by a learned `mask_token`
  of the encoder's width; the cls token stays in the encoder (as the official ViT) and is dropped
  before the head.
- No decoder: one 1x1 Conv2d to P*P*C channels and a PixelShuffle (`decoder`, the official name)
  predict raw pixels, and the loss is L1 on the masked pixels, normalised as the official code:
  sum / (masked pixels + 1e-5) / in_chans. No `norm_pix_loss`.
- `forward(imgs, mask=None)`: a given (B, N) mask at model-patch granularity (1 = masked) is used
  as is.

Deviations from the paper and the official code:
- The encoder is mae.py's (fixed 2D sin-cos position embedding, no layer scale, MAE's xavier /
  normal init), so its state-dict names are identical to mae.py's and the same fine-tune, probe
  and timm export work; the official ViT-B config uses a shared relative position bias and layer
  scale 0.1.
- The mask patch is 32 px at 224 px and scales with the image (32 x img_size / 224, rounded to a
  multiple of the patch, at least one patch): on 32-px images with 4-px patches it is one patch.
- The training recipe is common.py's MAE loop (blr 1.5e-4 x batch / 256, RandomResizedCrop scale
  0.2-1), not SimMIM's (blr 8e-4 x batch / 512, scale 0.67-1, 10 warm-up epochs).
- `pred` is returned in mae.py's patch layout (B, N, P*P*C): the head's pixels, patchified.
- The `cpu` preset masks half of the mask patches (`PRESET_CHANGES`), as it does for MAE.

Usage: python cli.py pretrain simmim
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from einops import rearrange, repeat

import common


@dataclass
class Config:
    img_size: int = 224  # input resolution (MAE paper, Sec. 4)
    patch_size: int = 16  # ViT-B/16 patches
    in_chans: int = 3  # image channels; set from the data set
    embed_dim: int = 768  # ViT-B width (official mae_vit_base_patch16)
    depth: int = 12  # ViT-B encoder blocks
    num_heads: int = 12  # ViT-B attention heads
    mlp_ratio: float = 4.0  # MLP hidden width / width
    mask_ratio: float = 0.6  # fraction of mask patches masked (SimMIM Tab. 1, official config)
    mask_patch_size: int = 0  # mask patch side in px (SimMIM Tab. 1: 32 at 224); 0: scaled
    drop_path: float = 0.0  # stochastic depth of the encoder: 0 to pre-train, 0.1 to fine-tune

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_patch_size == 0:  # DEVIATION: 32 x img_size / 224, a multiple of the patch
            patches = max(1, round(32 * self.img_size / 224 / self.patch_size))
            self.mask_patch_size = self.patch_size * patches
        if self.mask_patch_size % self.patch_size or self.img_size % self.mask_patch_size:
            raise ValueError(
                f"--mask-patch-size {self.mask_patch_size} must be a multiple of --patch-size "
                f"{self.patch_size} and divide --img-size {self.img_size}: choose another"
            )


# DEVIATION: the cpu preset hides half of the patches, not 75 % (see the docstring)
PRESET_CHANGES = {"cpu": dict(mask_ratio=0.5)}


def simmim_masking(cfg, noise):
    """Random masking over mask patches, upsampled to model patches (official data_simmim.py,
    MaskGenerator).

    The image is cut into M = (img_size / mask_patch_size)^2 mask patches; ceil(M * mask_ratio)
    of them, those of the largest noise (B, M), are masked, each covering (mask_patch_size /
    patch_size)^2 model patches. Returns the mask (B, N) with 0 = visible, 1 = masked, in grid
    order."""
    rand_size = cfg.img_size // cfg.mask_patch_size
    scale = cfg.mask_patch_size // cfg.patch_size
    mask_count = math.ceil(rand_size**2 * cfg.mask_ratio)  # official: np.ceil
    ids_mask = torch.argsort(noise, dim=1)[:, :mask_count]  # a random permutation's head (official)
    mask = torch.zeros(noise.shape, device=noise.device)
    mask = mask.scatter_(1, ids_mask, 1.0)  # (B, M)
    # each mask patch covers scale x scale model patches
    return repeat(mask, "b (h w) -> b (h s1 w s2)", h=rand_size, s1=scale, s2=scale)  # (B, N)


def sample_inputs(cfg, draws):
    """A batch's random inputs, drawn for the whole batch on the device, each sample's fixed by its
    place in the run (draws(*shape) -> (B, *shape) uniform): the mask (B, N), 1 = masked."""
    mask_patches = (cfg.img_size // cfg.mask_patch_size) ** 2
    return {"mask": simmim_masking(cfg, draws(mask_patches))}


class SimMIM(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # --- SimMIM encoder: a ViT on all patches, the masked ones replaced by a mask token ---
        self.patch_embed = common.PatchEmbed(
            cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim
        )
        self.num_patches = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        pos_embed = common.sincos_pos_embed(cfg.embed_dim, grid, cls_token=True)  # (1, 1 + N, D)
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)  # fixed sin-cos (A.1)
        drop_path = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            [common.Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, dp) for dp in drop_path]
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))  # encoder width (3.1)
        # --- SimMIM prediction head: a linear layer per patch (a 1x1 conv), pixels put in place ---
        patch_pixels = cfg.patch_size**2 * cfg.in_chans
        self.decoder = nn.Sequential(  # official models/simmim.py: Conv2d(D, stride**2 * 3, 1)
            nn.Conv2d(cfg.embed_dim, patch_pixels, kernel_size=1),  # (B, P*P*C, H/P, W/P)
            nn.PixelShuffle(cfg.patch_size),  # (B, C, H, W): encoder stride = patch (Sec. 3.3)
        )
        # --- initialisation (official MAE initialize_weights) ---
        common.init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_encoder(self, imgs, mask):
        x = self.patch_embed(imgs)  # (B, N, D)
        w = mask.unsqueeze(-1).type_as(x)  # (B, N, 1), 1 where masked
        x = x * (1 - w) + self.mask_token * w  # masked patches become the mask token (official)
        x = x + self.pos_embed[:, 1:, :]  # after the swap, so each mask token knows its place
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat((cls_tokens, x), dim=1)  # (B, 1 + N, D): cls kept in the encoder (official)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x

    def forward_decoder(self, x):
        grid = self.patch_embed.grid_size
        x = rearrange(x[:, 1:, :], "b (h w) d -> b d h w", h=grid)  # (B, D, H/P, W/P), no cls
        x = self.decoder(x)  # (B, C, H, W): raw pixels (SimMIM Sec. 3.3, a linear head)
        return common.patchify(x, self.cfg.patch_size)  # (B, N, P*P*C), mae.py's pred layout

    def forward_loss(self, imgs, pred, mask):
        """imgs: (B, C, H, W); pred: (B, N, P*P*C); mask: (B, N), 0 is keep, 1 is remove."""
        target = common.patchify(imgs, self.cfg.patch_size)  # (B, N, P*P*C), raw pixels (Tab. 4)
        loss = (pred - target).abs()  # L1 per pixel (SimMIM Sec. 3.4)
        loss = loss.sum(dim=-1)  # (B, N), summed over each patch's pixels and channels
        masked_pixels = mask.sum() * self.cfg.patch_size**2  # the official mask, upsampled, summed
        # official models/simmim.py: divided by the masked pixels and the channels
        return (loss * mask).sum() / (masked_pixels + 1e-5) / self.cfg.in_chans

    def forward(self, imgs, mask=None):
        if mask is None:  # not drawn by the loader: drawn here
            mask_patches = (self.cfg.img_size // self.cfg.mask_patch_size) ** 2
            noise = torch.rand(imgs.shape[0], mask_patches, device=imgs.device)  # (B, M)
            mask = simmim_masking(self.cfg, noise)  # (B, N)
        mask = mask.float()
        latent = self.forward_encoder(imgs, mask)  # (B, 1 + N, D)
        pred = self.forward_decoder(latent)  # (B, N, P*P*C)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def forward_features(self, imgs):
        """Evaluation features: the encoder on the whole image, (B, N, D) patch tokens in grid
        order after the final norm (the protocol in docs/evaluation.md pools them)."""
        nothing_masked = imgs.new_zeros(imgs.shape[0], self.num_patches)
        latent = self.forward_encoder(imgs, nothing_masked)  # (B, 1 + N, D)
        return latent[:, 1:, :]  # (B, N, D)


if __name__ == "__main__":  # python this_file.py ARGS = python cli.py pretrain this_file.py ARGS
    import sys

    import cli

    cli.main(["pretrain", __file__, *sys.argv[1:]])
