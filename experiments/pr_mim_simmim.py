"""PR-MIM on SimMIM: simmim.py with PR-MIM's partial and progressive reconstruction (Sec. 4.2).

A fork of simmim.py (`diff simmim.py experiments/pr_mim_simmim.py` shows PR-MIM's part); pr_mim.py
is PR-MIM on MAE.
PR-MIM: Li, Li, Fan, Cheng, 2024. https://arxiv.org/abs/2411.15746 (no official code).
SimMIM: Xie, Zhang, Cao, Lin, Bao, Yao, Dai, Hu, CVPR 2022. https://arxiv.org/abs/2111.09886
Official code: https://github.com/microsoft/SimMIM (models/simmim.py, data/data_simmim.py).
README section: README.md#pr-mim

Idea: mask random 32-px squares of the image (60% of them) by swapping their patch embeddings for
one learned mask token, run the whole ViT encoder on every position, and predict the raw pixels of
the masked squares with a single linear layer; the loss is L1 on the masked pixels. There is no
decoder: the encoder both understands the visible part and fills in the rest, so the "prediction
head" can be as light as a 1x1 convolution. Masking squares bigger than a patch keeps neighbouring
visible pixels far enough away that copying them does not solve the task.

PR-MIM on SimMIM (PR-MIM Sec. 4.2): SimMIM's encoder also does the reconstruction, so the masked
tokens are thrown from the encoder: a fraction gamma of all N tokens, chosen among the masked ones
so that the retained ones lie spread out ("furthest sampling", in the loader), leaves the
encoder input; after the encoder, the thrown positions are filled with zeros and one depth-wise
convolution over the 2D grid rebuilds them from their neighbours ("spatial aggregation"), so the
head predicts, and the loss covers, every masked token again ("progressive reconstruction").

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

PR-MIM's changes relative to simmim.py (pr_mim.py makes the same ones to mae.py):
- Config: `throw` (gamma, a fraction of all N tokens, 0 <= gamma <= mask ratio), `sampling`
  (furthest | random), `progressive`, `kernel_size`.
- `throw_tokens` (as pr_mim.py) picks the thrown tokens among the masked ones; `sample_inputs`
  runs it in the loader and hands `thrown` (B, N) bool to `forward` with the mask.
- The encoder runs on the cls token plus the (1 - gamma) N visible and retained tokens; its output
  is put back on the grid with zeros at the thrown positions and a depth-wise conv aggregates it
  before the head; the loss covers all masked tokens (`--no-progressive`: no conv, loss on the
  retained masked tokens only).

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
- The `cpu` preset masks half of the mask patches and throws a quarter of them (`PRESET_CHANGES`),
  as pr_mim.py.
- PR-MIM's, as in pr_mim.py: `kernel_size` 7 (Tab. 11's sizes are lost from the text) at every
  preset; the conv's output replaces every token (no residual); furthest sampling breaks ties at
  random; gamma N is rounded down. The paper gives no further detail of its SimMIM variant (e.g.
  its head or schedule).

Usage: python cli.py pretrain experiments/pr_mim_simmim.py --throw 0.5
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
    throw: float = 0.5  # gamma: masked tokens thrown, a fraction of ALL N tokens (Sec. 3.1, Tab. 4)
    sampling: str = "furthest"  # which masked tokens are retained: furthest | random (Sec. 3.3)
    progressive: bool = True  # rebuild thrown tokens by a depth-wise conv (Sec. 3.2); off: partial
    kernel_size: int = 7  # depth-wise conv kernel of the spatial aggregation (Tab. 11; Deviations)

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 <= self.throw <= self.mask_ratio:
            raise ValueError(
                f"--throw must be in [0, {self.mask_ratio}] (a fraction of all patches, thrown "
                f"from the masked ones, so at most --mask-ratio), got {self.throw}"
            )
        if not self.progressive and self.throw == self.mask_ratio:
            raise ValueError(
                "--no-progressive with --throw equal to --mask-ratio leaves no token to "
                "reconstruct: lower --throw or drop --no-progressive"
            )
        if self.sampling not in ("furthest", "random"):
            raise ValueError(f"--sampling must be furthest or random, got {self.sampling!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"--kernel-size must be a positive odd number, got {self.kernel_size}")
        if self.mask_patch_size == 0:  # DEVIATION: 32 x img_size / 224, a multiple of the patch
            patches = max(1, round(32 * self.img_size / 224 / self.patch_size))
            self.mask_patch_size = self.patch_size * patches
        if self.mask_patch_size % self.patch_size or self.img_size % self.mask_patch_size:
            raise ValueError(
                f"--mask-patch-size {self.mask_patch_size} must be a multiple of --patch-size "
                f"{self.patch_size} and divide --img-size {self.img_size}: choose another"
            )


# DEVIATION: the cpu preset hides half of the patches, and throws a quarter of them
PRESET_CHANGES = {"cpu": dict(mask_ratio=0.5, throw=0.25)}


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


def throw_tokens(mask, num_keep, sampling, rand=None):
    """Which masked tokens to throw (PR-MIM Sec. 3.3 and supplementary Alg. 1).

    mask: (B, N) with 1 = masked. Of the masked tokens, num_keep are retained: `random` at random;
    `furthest` greedily, the first at random, then again and again the masked token furthest
    (Euclidean, grid coordinates) from all retained so far (Eq. 1). Vectorised over the batch and
    the candidates: one small step per retained token. rand: (B, 2, N) uniform draws, drawn here
    if not given. Returns thrown (B, N) bool."""
    B, N = mask.shape
    masked = mask.bool()
    if rand is None:
        rand = torch.rand(B, 2, N, device=mask.device)  # (B, 2, N)
    rand = rand.transpose(0, 1)  # (2, B, N)
    if sampling == "random" or num_keep == 0:
        order = torch.where(masked, rand[0], 2.0).argsort(dim=1)  # (B, N), masked ones first
        kept = torch.zeros_like(masked).scatter(1, order[:, :num_keep], True)  # (B, N)
        return masked & ~kept
    side = torch.arange(int(N**0.5), device=mask.device, dtype=torch.float32)
    coords = torch.stack(torch.meshgrid(side, side, indexing="ij"), dim=-1).reshape(N, 2)
    dist = ((coords[:, None, :] - coords[None, :, :]) ** 2).sum(-1)  # (N, N), squared
    rows = torch.arange(B, device=mask.device)
    first = torch.where(masked, rand[0], -1.0).argmax(dim=1)  # (B,) the first: random (Alg. 1)
    # free (B, N): masked and not yet retained; a draw in [0, 0.5) breaks ties between distances
    free = torch.where(masked, 0.5 * rand[1], -math.inf)
    free[rows, first] = -math.inf
    min_dist = dist[first]  # (B, N): distance to the nearest retained token
    for _ in range(num_keep - 1):
        nxt = (min_dist + free).argmax(dim=1)  # (B,) the furthest from all retained (Eq. 1)
        free[rows, nxt] = -math.inf
        min_dist = torch.minimum(min_dist, dist[nxt])
    return masked & (free > -math.inf)  # (B, N), the masked tokens never retained


def retained(cfg):
    """The masked tokens retained for the encoder, per image: the masked ones (ceil(M ratio) mask
    patches of (mask_patch_size / patch_size)^2 tokens each) less gamma N (PR-MIM Sec. 3.1)."""
    mask_count = math.ceil((cfg.img_size // cfg.mask_patch_size) ** 2 * cfg.mask_ratio)
    num_masked = mask_count * (cfg.mask_patch_size // cfg.patch_size) ** 2
    return num_masked - int((cfg.img_size // cfg.patch_size) ** 2 * cfg.throw)


def sample_inputs(cfg, draws):
    """A batch's random inputs, drawn by the loader, where the paper runs furthest sampling
    (Sec. 3.3), for the whole batch on the device, each sample's fixed by its place in the run
    (draws(*shape) -> (B, *shape) uniform): the mask (B, N), 1 = masked, and the thrown tokens."""
    mask_patches = (cfg.img_size // cfg.mask_patch_size) ** 2
    mask = simmim_masking(cfg, draws(mask_patches))  # (B, N)
    thrown = throw_tokens(mask, retained(cfg), cfg.sampling, draws(2, mask.shape[1]))  # (B, N)
    return {"mask": mask, "thrown": thrown}


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
        # --- PR-MIM progressive reconstruction: a depth-wise conv after the encoder (Sec. 4.2) ---
        k = cfg.kernel_size  # DEVIATION: 7 at every preset (see the docstring)
        width = cfg.embed_dim
        progressive = cfg.progressive and cfg.throw > 0  # throw 0 is plain SimMIM
        conv = nn.Conv2d(width, width, k, padding=k // 2, groups=width)  # depth-wise (Tab. 12)
        self.spatial_aggregation = conv if progressive else None
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
        self.num_throw = int(self.num_patches * cfg.throw)  # gamma N thrown tokens (Sec. 3.1)

    def forward_encoder(self, imgs, mask, ids_dec):
        x = self.patch_embed(imgs)  # (B, N, D)
        w = mask.unsqueeze(-1).type_as(x)  # (B, N, 1), 1 where masked
        x = x * (1 - w) + self.mask_token * w  # masked patches become the mask token (official)
        x = x + self.pos_embed[:, 1:, :]  # after the swap, so each mask token knows its place
        # partial reconstruction: the thrown tokens leave the encoder input (PR-MIM Sec. 4.2)
        index = ids_dec.unsqueeze(-1).expand(-1, -1, x.shape[2])
        x = torch.gather(x, 1, index)  # (B, N_dec, D), grid order
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat((cls_tokens, x), dim=1)  # (B, 1 + N_dec, D): cls kept (official ViT)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x

    def forward_decoder(self, x, ids_dec):
        # progressive reconstruction (Sec. 3.2): thrown tokens are zeros, all back on the 2D grid
        x_ = x.new_zeros(x.shape[0], self.num_patches, x.shape[2])  # (B, N, D)
        index = ids_dec.unsqueeze(-1).expand(-1, -1, x.shape[2])
        x = x_.scatter(1, index, x[:, 1:, :])  # (B, N, D), cls dropped
        grid = self.patch_embed.grid_size
        x = rearrange(x, "b (h w) d -> b d h w", h=grid)  # (B, D, H/P, W/P)
        if self.spatial_aggregation is not None:  # a depth-wise conv rebuilds the thrown tokens
            x = self.spatial_aggregation(x)  # DEVIATION: every token through it
        x = self.decoder(x)  # (B, C, H, W): raw pixels (SimMIM Sec. 3.3, a linear head)
        return common.patchify(x, self.cfg.patch_size)  # (B, N, P*P*C), mae.py's pred layout

    def forward_loss(self, imgs, pred, mask, thrown):
        """imgs: (B, C, H, W); pred: (B, N, P*P*C); mask: (B, N), 0 is keep, 1 is remove;
        thrown: (B, N) bool."""
        target = common.patchify(imgs, self.cfg.patch_size)  # (B, N, P*P*C), raw pixels (Tab. 4)
        loss = (pred - target).abs()  # L1 per pixel (SimMIM Sec. 3.4)
        loss = loss.sum(dim=-1)  # (B, N), summed over each patch's pixels and channels
        if self.spatial_aggregation is None:  # partial: thrown tokens are not supervised (3.1)
            mask = mask * ~thrown  # (B, N), the retained masked tokens
        masked_pixels = mask.sum() * self.cfg.patch_size**2  # the official mask, upsampled, summed
        # official models/simmim.py: divided by the masked pixels and the channels
        return (loss * mask).sum() / (masked_pixels + 1e-5) / self.cfg.in_chans

    def forward(self, imgs, mask=None, thrown=None):
        if mask is None:  # not drawn by the loader: drawn here
            mask_patches = (self.cfg.img_size // self.cfg.mask_patch_size) ** 2
            noise = torch.rand(imgs.shape[0], mask_patches, device=imgs.device)  # (B, M)
            mask = simmim_masking(self.cfg, noise)  # (B, N)
        mask = mask.float()
        if thrown is None:  # not drawn by the loader: drawn here
            thrown = throw_tokens(mask, retained(self.cfg), self.cfg.sampling)  # (B, N) bool
        num_dec = self.num_patches - self.num_throw  # the visible and retained tokens
        ids_dec = torch.argsort(thrown.int(), dim=1, stable=True)[:, :num_dec]  # (B, N_dec)
        latent = self.forward_encoder(imgs, mask, ids_dec)  # (B, 1 + N_dec, D)
        pred = self.forward_decoder(latent, ids_dec)  # (B, N, P*P*C)
        loss = self.forward_loss(imgs, pred, mask, thrown)
        return loss, pred, mask

    def forward_features(self, imgs):
        """Evaluation features: the encoder on the whole image, (B, N, D) patch tokens in grid
        order after the final norm (the protocol in docs/evaluation.md pools them)."""
        nothing_masked = imgs.new_zeros(imgs.shape[0], self.num_patches)
        ids_all = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        latent = self.forward_encoder(imgs, nothing_masked, ids_all)  # (B, 1 + N, D)
        return latent[:, 1:, :]  # (B, N, D)


if __name__ == "__main__":  # python this_file.py ARGS = python cli.py pretrain this_file.py ARGS
    import sys

    import cli

    cli.main(["pretrain", __file__, *sys.argv[1:]])
