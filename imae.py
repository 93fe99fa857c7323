"""i-MAE: Are Latent Representations in Masked Autoencoders Linearly Separable?

Zhang, Shen, CVPR 2024 Workshops. https://arxiv.org/abs/2210.11470
Official code: https://github.com/VILA-Lab/i-mae (models_mae.py, engine_pretrain.py). README section: README.md#i-mae

Idea: feed MAE a mixture of two images, imgs_mix = λ·x_a + (1 − λ)·x_b with one λ ~ U[0, 1] per batch; the
image with the smaller weight min(λ, 1 − λ) is the subordinate one, the other the dominant one. The mixture
is masked and encoded once; two linear layers split the latent into a subordinate and a dominant stream;
MAE's decoder, shared by both, reconstructs each image from its stream, and two distillation terms pull each
stream toward a frozen vanilla MAE's latent of that clean image under the same mask. If one linear layer can
pull each image back out of the mixture's latent, the two are linearly separable in it (`python cli.py
separability RUN` measures that for any encoder).

Changes relative to mae.py:
- `sample_inputs` also draws `pairing` (3,): a sort key and a same-class coin that pick each image's
  partner in the batch (`pair_up`, with `--same-class-prob`), and a λ draw; `mix` mixes.
- Two heads, `decoder_embed1` (subordinate) and `decoder_embed2` (dominant), replace `decoder_embed`; the
  decoder runs on both streams; the loss is both reconstructions plus both distillation terms.
- `load_teacher`: the frozen teacher (`--teacher`), loaded by `prepare_pretrain`, which only `cli.py
  pretrain` calls: it stays out of the state dict, so evaluating a checkpoint needs no teacher.

Deviations from the paper and the official code:
- The teacher sees the clean subordinate and dominant images; the released engine feeds it the mixture
  for both terms, which its own variable names contradict (and which crashes before running).
- `norm_pix_loss` applies to both reconstructions, as in MAE; the released i-MAE loss ignores the flag.
- Partners are other images of the batch, picked by per-sample draws from the data workers (the official
  paired data set, `classmixINPair`, is not in the repository); `--same-class-prob` defaults to 0, not the
  released 1.0, which pairs by ground-truth labels that a self-supervised run must not see.
- λ is the λ draw of the sample with the smallest pairing key, not np.random.beta(1, 1) in the loop: the
  same U[0, 1], fixed by the samples so runs resume exactly; the batch is gathered from every process, so N
  processes pair and mix as one would with the same global batch (official: a λ per process).
- Without `--teacher`, no distillation terms (the paper's "i-MAE without distillation", Fig. 3c), said at
  start; the student starts from scratch unless `--init-from-teacher` (the official ImageNet recipe).
- No unused `decoder_embed` in the student (the official one keeps it, so strict loading fails); the
  teacher is this class with the MAE's weights, both heads its `decoder_embed` (official: MAE_Teacher).

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
    drop_path: float = 0.0  # stochastic depth of the encoder; 0 in pre-training, 0.1 to fine-tune ViT-B
    same_class_prob: float = 0.0  # P(partner of the same class); uses labels; official --same_prob, released 1.0
    teacher: str = ""  # frozen MAE for the distillation terms: a `pretrain mae` run or checkpoint ("" = none)
    init_from_teacher: bool = False  # start from the teacher's weights (official ImageNet recipe, main_pretrain.py)
    distill_weight: float = 1.0  # weight of the two distillation terms (official engine_pretrain.py: 1)

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        if not 0 <= self.same_class_prob <= 1:
            raise ValueError(f"--same-class-prob must be in [0, 1], got {self.same_class_prob}")
        if self.distill_weight < 0:
            raise ValueError(f"--distill-weight must not be negative, got {self.distill_weight}")
        if self.init_from_teacher and not self.teacher:
            raise ValueError("--init-from-teacher needs --teacher PATH, the MAE checkpoint to start from")


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


def sample_inputs(cfg, generator):
    """Random inputs of one sample, drawn in the data workers: the masking noise (N,), `pair_up`'s draws (3,)."""
    noise = torch.rand((cfg.img_size // cfg.patch_size) ** 2, generator=generator)  # (N,)
    return {"noise": noise, "pairing": torch.rand(3, generator=generator)}  # pairing (3,)


def pair_up(pairing, labels, same_class_prob):
    """Each image's partner in the batch and the batch's λ, fixed by the per-sample draws alone. pairing: (B, 3)
    uniform draws (sort key, same-class coin, λ draw); labels: (B,). An image's partner is the next image in key
    order (cyclically), or, when its coin is below `same_class_prob`, the next of its own class in that order
    (official --same_prob), if the batch has one. λ is the λ draw of the image with the smallest key: U[0, 1],
    independent of batch order. Returns partner (B,) indices into the batch and λ, a 0-d tensor."""
    key, coin, lam_draw = pairing.double().unbind(1)  # (B,) each
    arange = torch.arange(key.shape[0], device=key.device)
    order = key.argsort()  # (B,), a uniformly random order of the batch
    partner = torch.empty_like(order)
    partner[order] = order.roll(-1)  # the next image in that order: a random partner, never itself if B > 1
    by_class = (labels.double() * 2 + key).argsort()  # (B,), grouped by class, random order within each class
    cls = labels[by_class].contiguous()
    first, end = torch.searchsorted(cls, cls), torch.searchsorted(cls, cls, right=True)  # each class's run
    same = torch.empty_like(order)
    same[by_class] = by_class[torch.where(arange + 1 < end, arange + 1, first)]  # next of the class, cyclically
    partner = torch.where((coin < same_class_prob) & (same != arange), same, partner)  # semantics-enhanced sampling
    return partner, lam_draw[order[0]].float()


def mix(imgs, imgs_b, lam):
    """The mixture after normalisation (official engine_pretrain.py), the subordinate image (weight min(λ, 1 − λ),
    official weak_idx) and the dominant one. imgs, imgs_b: (B, C, H, W), images and partners; lam: 0-d, in [0, 1]."""
    sub_first = lam < 0.5
    return lam * imgs + (1 - lam) * imgs_b, torch.where(sub_first, imgs, imgs_b), torch.where(sub_first, imgs_b, imgs)


ARCH = (  # what a teacher must share with the student
    "img_size patch_size in_chans embed_dim depth num_heads mlp_ratio decoder_embed_dim decoder_depth decoder_num_heads"
)


def load_teacher(path, cfg):
    """The frozen teacher (Fig. 2, branch 2) of a `pretrain mae` run or official *_full.pth: an IMAE, both heads the
    MAE's `decoder_embed`. A ValueError names the architecture fields that differ from `cfg` (official checkpoints:
    those of the size args.model names, e.g. mae_vit_base_patch16), else the first tensor that does not fit."""
    ckpt = common.load_checkpoint(path)
    state = ckpt["model"]
    if ckpt.get("method", "mae") != "mae" or "decoder_embed.weight" not in state:
        raise ValueError(
            f"{path} is not a full MAE checkpoint: train one with `cli.py pretrain mae` or use an official *_full.pth"
        )
    name = str(getattr(ckpt.get("args"), "model", ""))  # official checkpoints: {"model", "args"}
    arch = ckpt.get("config") or next((common.VIT_SIZES[s] for s in common.VIT_SIZES if f"_{s}_" in name), {})
    ours = vars(cfg)
    diff = [f"{k} {arch[k]} (this run {ours[k]})" for k in ARCH.split() if k in arch and arch[k] != ours[k]]
    if diff:
        raise ValueError(
            f"teacher {path} does not match this run: {', '.join(diff)}; use the teacher's --preset / --model / sizes"
        )
    for p in ("weight", "bias"):  # MAE's one head as both of ours
        state[f"decoder_embed1.{p}"] = state[f"decoder_embed2.{p}"] = state.pop(f"decoder_embed.{p}")
    teacher = IMAE(cfg).requires_grad_(False).eval()  # frozen (official: eval(), requires_grad False)
    common.load_weights(teacher, state, f"teacher {path}")
    return teacher


class IMAE(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # --- MAE encoder specifics: a ViT on the visible patches ---
        self.patch_embed = common.PatchEmbed(cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim)
        num_patches, grid = self.patch_embed.num_patches, self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        pos_embed = common.sincos_pos_embed(cfg.embed_dim, grid, cls_token=True)  # (1, 1 + N, D)
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)  # fixed sin-cos (MAE paper, A.1)
        drop_path = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(
            [common.Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, drop_path=dp) for dp in drop_path]
        )
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        # --- i-MAE disentanglement: two linear layers split the latent (Fig. 2; official MAEDouble) ---
        self.decoder_embed1 = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)  # the subordinate image's stream
        self.decoder_embed2 = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)  # the dominant image's stream
        # --- MAE decoder specifics: a lighter ViT on all patches, shared by both streams ---
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))  # shared, learned (Sec. 3)
        decoder_pos_embed = common.sincos_pos_embed(cfg.decoder_embed_dim, grid, cls_token=True)
        self.decoder_pos_embed = nn.Parameter(decoder_pos_embed, requires_grad=False)  # (1, 1 + N, D_dec)
        self.decoder_blocks = nn.ModuleList(
            [
                common.Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio)
                for _ in range(cfg.decoder_depth)
            ]
        )
        self.decoder_norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size**2 * cfg.in_chans)  # to pixels
        # --- initialisation (official initialize_weights) ---
        common.init_weights(self)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.num_patches = num_patches
        self.teacher = None  # set by prepare_pretrain; a plain attribute, never a submodule

    def prepare_pretrain(self, log, resume=False):
        """Called by `cli.py pretrain` only, never in evaluation: load the frozen teacher, or say it is absent."""
        if not self.cfg.teacher:
            log("i-mae: no --teacher, so this run trains without the two distillation terms (Fig. 3c; imae.py)")
            return
        object.__setattr__(self, "teacher", load_teacher(self.cfg.teacher, self.cfg))  # not registered: no teacher.*
        log(f"i-mae: distilling from the frozen MAE teacher {self.cfg.teacher}")  # keys, no gradients, no AdamW
        if self.cfg.init_from_teacher and not resume:  # official main_pretrain.py: both heads from decoder_embed
            self.load_state_dict(self.teacher.state_dict())
            log("i-mae: the student starts from the teacher's weights")

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs)  # (B, N, D)
        x = x + self.pos_embed[:, 1:, :]  # position embedding before masking, so kept tokens keep theirs
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (B, N_vis, D): only visible patches (Sec. 3)
        cls_tokens = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)  # (B, 1, D)
        x = torch.cat((cls_tokens, x), dim=1)  # (B, 1 + N_vis, D)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """x: one stream, already through its head, (B, 1 + N_vis, D_dec)."""
        # one mask token per removed patch, then unshuffle to grid order (Sec. 3, "MAE decoder")
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)  # (B, N_mask, D_dec)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, N, D_dec), shuffled order, no cls
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # (B, N, D_dec), grid order
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
        if self.cfg.norm_pix_loss:  # normalise each target patch by its own mean and variance (Tab. 1c)
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = (pred - target) ** 2
        loss = loss.mean(dim=-1)  # (B, N), mean loss per patch
        return (loss * mask).sum() / mask.sum()  # mean loss on removed patches only (Sec. 3)

    def forward(self, imgs, mask_ratio=None, noise=None, pairing=None, labels=None):
        mask_ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        B = imgs.shape[0]
        noise = torch.rand(B, self.num_patches, device=imgs.device) if noise is None else noise  # (B, N)
        pairing = torch.rand(B, 3, device=imgs.device) if pairing is None else pairing  # (B, 3)
        labels = torch.arange(B, device=imgs.device) if labels is None else labels  # no labels: no class pairs
        # partners come from the batch of every process (training and held-out loss): N processes pair as one would
        all_imgs, all_labels, all_pairing, start = common.gather_batch(imgs, labels, pairing)  # one process: start 0
        partner, lam = pair_up(all_pairing, all_labels, self.cfg.same_class_prob)  # (B_all,), one λ per batch
        imgs_mix, x_sub, x_dom = mix(imgs, all_imgs[partner[start : start + B]], lam)  # (B, C, H, W) each
        latent, mask, ids_restore = self.forward_encoder(imgs_mix, mask_ratio, noise)  # one mask on the mixture
        latent_sub, latent_dom = self.decoder_embed1(latent), self.decoder_embed2(latent)  # (B, 1 + N_vis, D_dec)
        pred = self.forward_decoder(torch.cat([latent_sub, latent_dom]), ids_restore.repeat(2, 1))  # (2B, N, P*P*C)
        pred_sub, pred_dom = pred.chunk(2)  # (B, N, P*P*C) each: the shared decoder on both streams (official dec_func)
        loss = self.forward_loss(x_sub, pred_sub, mask) + self.forward_loss(x_dom, pred_dom, mask)  # two-way, weight 1
        if self.teacher is not None:  # latent distillation: plain MSE over all tokens, cls too (official engine)
            teacher = self.teacher.to(imgs.device)  # not a submodule, so it follows the input's device here
            target = teacher.forward_encoder(torch.cat([x_sub, x_dom]), mask_ratio, noise.repeat(2, 1))[0]  # frozen
            target_sub, target_dom = teacher.decoder_embed1(target).chunk(2)  # clean images, the student's mask
            distill = F.mse_loss(latent_sub, target_sub) + F.mse_loss(latent_dom, target_dom)
            loss = loss + self.cfg.distill_weight * distill
        return loss, torch.where(lam < 0.5, pred_sub, pred_dom), mask  # pred: the reconstruction of imgs itself

    def forward_features(self, imgs):
        """Evaluation features: the encoder on the whole image, (B, N, D) patch tokens in grid order
        after the final norm (the protocol in docs/evaluation.md pools them)."""
        noise = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)  # keeps grid order
        latent, _, _ = self.forward_encoder(imgs, 0.0, noise)  # (B, 1 + N, D)
        return latent[:, 1:, :]  # (B, N, D)


if __name__ == "__main__":  # python this_file.py ARGS = python cli.py pretrain this_file.py ARGS
    import sys

    import cli

    cli.main(["pretrain", __file__, *sys.argv[1:]])
