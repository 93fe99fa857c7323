"""i-MAE: Are Latent Representations in Masked Autoencoders Linearly Separable?

Zhang, Shen, CVPR 2024 Workshops. https://arxiv.org/abs/2210.11470
Official code: https://github.com/VILA-Lab/i-mae (models_mae.py, engine_pretrain.py).
README section: README.md#i-mae

Idea: feed MAE a mixture of two images, imgs_mix = λ·x_a + (1 − λ)·x_b with one λ ~ U[0, 1] per
batch; the image with the smaller weight min(λ, 1 − λ) is the subordinate one, the other the
dominant one. The mixture is masked and encoded once; two linear layers split the latent into a
subordinate and a dominant stream; MAE's decoder, shared by both, reconstructs each image from its
stream, and two distillation terms pull each stream toward a frozen vanilla MAE's latent of that
clean image under the same mask. If one linear layer can pull each image back out of the
mixture's latent, the two are linearly separable in it (`python cli.py separability RUN` measures
that for any encoder).

Changes relative to mae.py:
- `sample_inputs` also draws `pairing` (B, 3): a sort key and a same-class coin that pick each
  image's partner in the batch (`pair_up`, with `--same-class-prob`), and a λ draw; `mix` mixes.
- Two heads, `decoder_embed1` (subordinate) and `decoder_embed2` (dominant), replace
  `decoder_embed`; the decoder runs on both streams; the loss is both reconstructions plus both
  distillation terms.
- `prepare_pretrain` takes the frozen MAE teacher (`--teacher`), which the plumbing loads as `knn`
  loads a run; only `cli.py pretrain` calls it, so evaluating a checkpoint needs no teacher.

Deviations from the paper and the official code:
- The teacher sees the clean subordinate and dominant images; the released engine feeds it the
  mixture for both terms, which its own variable names contradict (and which crashes before
  running).
- `norm_pix_loss` applies to both reconstructions, as in MAE; the released i-MAE loss ignores it.
- Partners are other images of the process's batch, picked by per-sample draws of the loader
  (the official paired data set, `classmixINPair`, is not in the repository);
  `--same-class-prob` defaults to 0, not the released 1.0, which pairs by ground-truth labels
  that a self-supervised run must not see.
- λ is the λ draw of the sample with the smallest pairing key, not np.random.beta(1, 1) in the
  loop: the same U[0, 1], fixed by the samples so runs resume exactly (a λ per process, as the
  official code).
- Without `--teacher`, no distillation terms (the paper's "i-MAE without distillation", Fig. 3c),
  said at start; the student starts from scratch unless `--init-from-teacher` (the official
  ImageNet recipe).
- No unused `decoder_embed` in the student (the official one keeps it, so strict loading fails).
- The `cpu` preset hides half of the patches (`PRESET_CHANGES`), as it does for MAE.

Usage: python cli.py pretrain mae --out runs/mae && python cli.py pretrain i-mae --teacher runs/mae
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import common


@dataclass
class Config:
    img_size: int = 224  # input resolution (MAE paper, Sec. 4)
    patch_size: int = 16  # ViT-B/16 patches
    in_chans: int = 3  # image channels; set from the data set
    embed_dim: int = 768  # ViT-B width (official mae_vit_base_patch16)
    depth: int = 12  # ViT-B encoder blocks
    num_heads: int = 12  # ViT-B attention heads
    decoder_embed_dim: int = 512  # decoder width (MAE paper, Tab. 1b)
    decoder_depth: int = 8  # decoder blocks (MAE paper, Tab. 1a)
    decoder_num_heads: int = 16  # decoder heads (official models_mae.py)
    mlp_ratio: float = 4.0  # MLP hidden width / width
    norm_pix_loss: bool = True  # per-patch normalised pixels as the target (MAE paper, Tab. 1c)
    mask_ratio: float = 0.75  # fraction of patches removed (MAE paper, Fig. 5)
    drop_path: float = 0.0  # stochastic depth of the encoder: 0 to pre-train, 0.1 to fine-tune
    same_class_prob: float = 0.0  # P(partner of its class); reads labels; official same_prob 1
    teacher: str = ""  # frozen MAE of the distillation terms: a `pretrain mae` run or checkpoint
    init_from_teacher: bool = False  # start from the teacher's weights (official ImageNet recipe)
    distill_weight: float = 1.0  # weight of both distillation terms (official engine_pretrain)

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 <= self.same_class_prob <= 1:
            raise ValueError(f"--same-class-prob must be in [0, 1], got {self.same_class_prob}")
        if self.distill_weight < 0:
            raise ValueError(f"--distill-weight must not be negative, got {self.distill_weight}")
        if self.init_from_teacher and not self.teacher:
            raise ValueError("--init-from-teacher needs --teacher PATH, the MAE to start from")


# DEVIATION: the cpu preset hides half of the patches, not 75 % (see the docstring)
PRESET_CHANGES = {"cpu": dict(mask_ratio=0.5)}


def random_masking(x, mask_ratio, noise=None):
    """Per-sample random masking by sorting noise (official models_mae.py, random_masking).

    x: (B, N, D) tokens; noise: (B, N) in [0, 1), drawn here if not given: the patches with the
    smallest noise are kept. Returns the kept tokens (B, N_vis, D), the mask (B, N) with 0 = keep,
    1 = remove, and ids_restore (B, N), which puts shuffled tokens back in grid order."""
    B, N, D = x.shape
    len_keep = int(N * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, N, device=x.device)  # (B, N)
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # (B, N)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, N_vis)
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))  # (B, N_vis, D)
    mask = torch.ones(B, N, device=x.device)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # (B, N), unshuffled to grid order
    return x_masked, mask, ids_restore


def sample_inputs(cfg, draws):
    """A batch's random inputs, drawn for the whole batch on the device, each sample's fixed by its
    place in the run (draws(*shape) -> (B, *shape) uniform): the masking noise (B, N) and
    `pair_up`'s draws (B, 3)."""
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    return {"noise": draws(num_patches), "pairing": draws(3)}


def pair_up(pairing, labels, same_class_prob):
    """Each image's partner in the batch and the batch's λ, fixed by the per-sample draws alone.

    pairing: (B, 3) uniform draws (sort key, same-class coin, λ draw); labels: (B,). An image's
    partner is the next image in key order (cyclically), or, when its coin is below
    `same_class_prob`, the next of its own class in that order (official --same_prob), if the batch
    has one. λ is the λ draw of the image with the smallest key: U[0, 1], independent of batch
    order. Returns partner (B,) indices into the batch and λ, a 0-d tensor."""
    key, coin, lam_draw = pairing.double().unbind(1)  # (B,) each
    arange = torch.arange(key.shape[0], device=key.device)
    order = key.argsort()  # (B,), a uniformly random order of the batch
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)  # the next image in that order: never itself if B > 1
    by_class = (labels.double() * 2 + key).argsort()  # (B,), by class, random order within
    cls = labels[by_class].contiguous()
    first = torch.searchsorted(cls, cls)  # where each image's class starts in by_class
    end = torch.searchsorted(cls, cls, right=True)  # and where it ends
    same = torch.empty_like(order)
    same[by_class] = by_class[torch.where(arange + 1 < end, arange + 1, first)]  # next, cyclically
    semantic = (coin < same_class_prob) & (same != arange)  # semantics-enhanced sampling
    partner = torch.where(semantic, same, partner)
    return partner, lam_draw[order[:1]].squeeze(0).float()  # [:1], not [0]: no host sync


def mix(imgs, imgs_b, lam):
    """The mixture after normalisation (official engine_pretrain.py), the subordinate image
    (weight min(λ, 1 − λ), official weak_idx) and the dominant one. imgs, imgs_b: (B, C, H, W),
    the images and their partners; lam: 0-d, in [0, 1]."""
    sub_first = lam < 0.5
    imgs_mix = lam * imgs + (1 - lam) * imgs_b
    return imgs_mix, torch.where(sub_first, imgs, imgs_b), torch.where(sub_first, imgs_b, imgs)


class IMAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # --- MAE encoder specifics: a ViT on the visible patches ---
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
        # --- i-MAE: two linear layers split the latent into two streams (Fig. 2, MAEDouble) ---
        self.decoder_embed1 = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)  # subordinate stream
        self.decoder_embed2 = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)  # dominant stream
        # --- MAE decoder specifics: a lighter ViT on all patches, shared by both streams ---
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))  # shared (Sec. 3)
        pos_embed = common.sincos_pos_embed(cfg.decoder_embed_dim, grid, cls_token=True)
        self.decoder_pos_embed = nn.Parameter(pos_embed, requires_grad=False)  # (1, 1 + N, D_dec)
        self.decoder_blocks = nn.ModuleList(
            [
                common.Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio)
                for _ in range(cfg.decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        patch_pixels = cfg.patch_size**2 * cfg.in_chans
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, patch_pixels)  # to pixels
        # --- initialisation (official initialize_weights) ---
        common.init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.teacher = None  # set by prepare_pretrain

    def prepare_pretrain(self, load_model, log, resume=False):
        """Called by `cli.py pretrain` alone, never in evaluation: the frozen teacher (Fig. 2,
        branch 2), loaded by load_model(path) -> (model, info) as `knn` loads a run."""
        if not self.cfg.teacher:
            return log("i-mae: no --teacher, so no distillation terms (Fig. 3c; imae.py)")
        teacher, info = load_model(self.cfg.teacher)
        if info["method"] != "mae":
            raise ValueError(f"--teacher {self.cfg.teacher} is a {info['method']} run: pass an MAE")
        shared = ["img_size", "patch_size", "in_chans", "decoder_embed_dim"]  # masks, latent width
        if self.cfg.init_from_teacher:  # and every size, to start from the teacher's weights
            shared += ["embed_dim", "depth", "num_heads", "mlp_ratio"]
            shared += ["decoder_depth", "decoder_num_heads"]
        differ = [k for k in shared if getattr(teacher.cfg, k) != getattr(self.cfg, k)]
        if differ:
            teacher_of = f"--teacher {self.cfg.teacher} is another {', '.join(differ)}"
            raise ValueError(f"{teacher_of}: pass an MAE of this size")
        teacher.requires_grad_(False).eval()  # frozen (official: eval(), requires_grad False)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: not trained, not saved
        log(f"i-mae: distilling from the frozen MAE teacher {self.cfg.teacher}")
        if self.cfg.init_from_teacher and not resume:  # official main_pretrain.py
            state = teacher.state_dict()
            head = {p: state.pop(f"decoder_embed.{p}") for p in ("weight", "bias")}
            for p, value in head.items():  # MAE's one head as both of ours
                state[f"decoder_embed1.{p}"] = value
                state[f"decoder_embed2.{p}"] = value
            self.load_state_dict(state)
            log("i-mae: the student starts from the teacher's weights")

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs)  # (B, N, D)
        x = x + self.pos_embed[:, 1:, :]  # before masking, so kept tokens keep their position
        # only the visible patches enter the encoder (Sec. 3)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (B, N_vis, D)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        cls_tokens = cls_token.expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat((cls_tokens, x), dim=1)  # (B, 1 + N_vis, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """x: one stream, already through its head, (B, 1 + N_vis, D_dec)."""
        # one mask token per removed patch, then unshuffle to grid order (Sec. 3, "MAE decoder")
        num_masked = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.repeat(x.shape[0], num_masked, 1)  # (B, N_mask, D_dec)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, N, D_dec), shuffled, no cls
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])
        x_ = torch.gather(x_, 1, index)  # (B, N, D_dec), grid order
        x = torch.cat([x[:, :1, :], x_], dim=1)  # (B, 1 + N, D_dec), cls first
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        x = self.decoder_pred(x)  # (B, 1 + N, P*P*C)
        return x[:, 1:, :]  # (B, N, P*P*C), cls removed

    def forward_loss(self, imgs, pred, mask):
        """imgs: (B, C, H, W); pred: (B, N, P*P*C); mask: (B, N), 0 is keep, 1 is remove."""
        target = common.patchify(imgs, self.cfg.patch_size)  # (B, N, P*P*C)
        if self.cfg.norm_pix_loss:  # each target patch normalised by its mean and var (Tab. 1c)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # (B, N), mean loss per patch
        return (loss * mask).sum() / mask.sum()  # mean loss on removed patches only (Sec. 3)

    def forward(self, imgs, mask_ratio=None, noise=None, pairing=None, labels=None):
        mask_ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        B = imgs.shape[0]
        if noise is None:
            noise = torch.rand(B, self.num_patches, device=imgs.device)  # (B, N)
        if pairing is None:
            pairing = torch.rand(B, 3, device=imgs.device)  # (B, 3)
        if labels is None:  # no labels: no pairs by class
            labels = torch.arange(B, device=imgs.device)
        partner, lam = pair_up(pairing, labels, self.cfg.same_class_prob)  # (B,), one λ
        imgs_mix, x_sub, x_dom = mix(imgs, imgs[partner], lam)  # (B, C, H, W) each
        latent, mask, ids_restore = self.forward_encoder(imgs_mix, mask_ratio, noise)  # one mask
        latent_sub = self.decoder_embed1(latent)  # (B, 1 + N_vis, D_dec)
        latent_dom = self.decoder_embed2(latent)  # (B, 1 + N_vis, D_dec)
        latents = torch.cat([latent_sub, latent_dom])  # (2B, 1 + N_vis, D_dec)
        pred = self.forward_decoder(latents, ids_restore.repeat(2, 1))  # (2B, N, P*P*C)
        pred_sub, pred_dom = pred.chunk(2)  # the shared decoder on both streams (official dec_func)
        loss_sub = self.forward_loss(x_sub, pred_sub, mask)
        loss_dom = self.forward_loss(x_dom, pred_dom, mask)
        loss = loss_sub + loss_dom  # the two-way reconstruction, weight 1 each
        if self.teacher is not None:  # latent distillation: MSE over all tokens, cls too (official)
            teacher = self.teacher.to(imgs.device)  # not a submodule: follows the input here
            clean = torch.cat([x_sub, x_dom])  # the clean images, under the student's mask
            target = teacher.forward_encoder(clean, mask_ratio, noise.repeat(2, 1))[0]
            target_sub, target_dom = teacher.decoder_embed(target).chunk(2)  # frozen
            distill = F.mse_loss(latent_sub, target_sub) + F.mse_loss(latent_dom, target_dom)
            loss = loss + self.cfg.distill_weight * distill
        pred = torch.where(lam < 0.5, pred_sub, pred_dom)  # the reconstruction of imgs itself
        return loss, pred, mask

    def forward_features(self, imgs):
        """Evaluation features: the encoder on the whole image, (B, N, D) patch tokens in grid
        order after the final norm (the protocol in docs/evaluation.md pools them)."""
        noise = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        latent, _, _ = self.forward_encoder(imgs, 0.0, noise)  # (B, 1 + N, D), grid order
        return latent[:, 1:, :]  # (B, N, D)


if __name__ == "__main__":  # python this_file.py ARGS = python cli.py pretrain this_file.py ARGS
    import sys

    import cli

    cli.main(["pretrain", __file__, *sys.argv[1:]])
