"""RevColV2: Exploring Disentangled Representations in Masked Image Modeling.

Han, Cai, Zhang, NeurIPS 2023. https://arxiv.org/abs/2309.01005. README section: README.md#revcolv2
Official code: https://github.com/megvii-research/RevCol (v1 only; V2's was never released).

Idea: MAE throws its decoder away, so the features it fine-tunes are not the ones it reconstructed
from; RevColV2 keeps the whole autoencoder: columns of L levels (ViT blocks, one width, one token
grid). Level k of column j reads the level below it in its column and the level above it in the
previous column, plus alpha times its own previous value: y = F(lower, upper_prev) + alpha * y_prev.
The previous column is then recomputed exactly from the next, y_prev = (y - F) / alpha, so backward
keeps only each column's outputs. Bottom-up columns see the visible patches, top-down ones all, with
a mask token per level; level 0 of the last column predicts the pixels, its top level gives the
features.

Changes relative to mae.py:
- Config: `num_levels`, `level_depth`, `encoder_columns`, `decoder_columns` (one width everywhere);
  `alpha_init`, `alpha_min`, `reversible`.
- `Level`, `column_forward`, its exact inverse `column_inverse`, `ReversibleColumn`; the encoder is
  bottom-up columns (no cls token), the decoder top-down ones with a mask token per level.

Deviations from the paper and the official code (the reasons: docs/revcolv2.md):
- V2's internals are our reading: isotropic ViT levels, the fusion LN(W_a a) + LN(W_b b), top-down
  columns mirroring bottom-up ones, the column counts; MAE's mask ratio and norm-pix target.
- alpha is clamped to |alpha| >= 0.1, not 1e-3; no cls token (the features: the top level after a
  LayerNorm without weights); backward returns the parameter gradients (official: accumulates them);
  fine-tuning's layer decay gives each column one rate; no CLIP teacher or intermediate supervision.
- The `cpu` preset hides half of the patches at blr 1.5e-3 (`PRESET_CHANGES`): at its 4e-3 the top
  level collapses (docs/learning.md).

Usage: python cli.py pretrain revcolv2 --preset cifar
"""

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn

import common


@dataclass
class Config:
    img_size: int = 224  # input resolution (MAE paper, Sec. 4)
    patch_size: int = 16  # ViT-B/16 patches
    in_chans: int = 3  # image channels; set from the data set
    embed_dim: int = 768  # width of every level of every column (ViT-B's; V2-B's unverified)
    num_heads: int = 12  # ViT-B attention heads
    num_levels: int = 4  # levels per column, all on the full token grid (article: levels 0-3)
    level_depth: int = 1  # ViT blocks per level (article: "each level is one transformer block")
    encoder_columns: int = 2  # bottom-up columns, on the visible patches (count unverified)
    decoder_columns: int = 2  # top-down columns, on all patches (count unverified)
    mlp_ratio: float = 4.0  # MLP hidden width / width
    norm_pix_loss: bool = True  # per-patch normalised pixels as the target (MAE Tab. 1c; assumed)
    mask_ratio: float = 0.75  # fraction of patches removed (MAE Fig. 5; assumed for V2)
    drop_path: float = 0.0  # stochastic depth, by block position within a column (official)
    alpha_init: float = 0.5  # initial reversible scale alpha (official: shortcut_scale_init_value)
    alpha_min: float = 0.1  # |alpha| is clamped to at least this, sign kept (official: 1e-3)
    reversible: bool = True  # recompute activations in backward from the inverse (save_memory)

    def __post_init__(self):
        if not 0 < self.mask_ratio < 1:
            raise ValueError(f"--mask-ratio must be in (0, 1), got {self.mask_ratio}")
        least = dict(num_levels=2, level_depth=1, encoder_columns=1, decoder_columns=1)
        for name, low in least.items():
            if getattr(self, name) < low:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be at least {low}, got {getattr(self, name)}")
        if not 0 < self.alpha_min <= abs(self.alpha_init):
            raise ValueError(
                f"need 0 < --alpha-min <= |--alpha-init|, got {self.alpha_min}, {self.alpha_init}"
            )


# DEVIATION: the cpu preset hides half of the patches, not 75 %, at blr 1.5e-3 (see the docstring)
PRESET_CHANGES = {"cpu": dict(mask_ratio=0.5, blr=1.5e-3)}


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
    place in the run (draws(*shape) -> (B, *shape) uniform): the masking noise (B, N)."""
    num_patches = (cfg.img_size // cfg.patch_size) ** 2
    return {"noise": draws(num_patches)}


class Level(nn.Module):
    """F(a, b) = Blocks(LN(W_a a) + LN(W_b b)): a is the level before it in its column (or the
    patch tokens), b the level after it in the previous column, either may be absent; alpha scales
    the reversible shortcut per channel (official revcol.py: Fusion, Level, SubNet.alpha*).
    DEVIATION: isotropic levels, so a projection replaces the official resampling."""

    def __init__(self, cfg, has_a, has_b, has_alpha, drop_path):
        super().__init__()
        D = cfg.embed_dim
        self.fuse_a = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D, eps=1e-6)) if has_a else None
        self.fuse_b = nn.Sequential(nn.Linear(D, D), nn.LayerNorm(D, eps=1e-6)) if has_b else None
        blocks = [common.Block(D, cfg.num_heads, cfg.mlp_ratio, p) for p in drop_path]
        self.blocks = nn.Sequential(*blocks)
        self.alpha = nn.Parameter(torch.full((D,), cfg.alpha_init)) if has_alpha else None

    def forward(self, a, b):
        inputs = ((self.fuse_a, a), (self.fuse_b, b))
        fused = sum(fuse(t) for fuse, t in inputs if fuse is not None)  # (B, N_x, D)
        return self.blocks(fused)


def column_forward(column, x, prev, rng=None):
    """One column in computation order k = 0..L-1 (RevCol paper, Fig. 2b; official revcol.py,
    SubNet): y_k = F_k(y_{k-1}, prev_{k+1}) + alpha_k * prev_k, with y_{-1} = x (None in top-down
    columns) and prev the previous column's outputs (None for the first column).
    Returns L x (B, N_x, D)."""
    ys = []
    stream = x if x is not None else prev[0]
    for k, level in enumerate(column):
        if rng is not None:  # the RNG state before the level, CPU and GPU, for the recompute
            cuda_state = torch.cuda.get_rng_state(stream.device) if stream.is_cuda else None
            rng.append((torch.get_rng_state(), cuda_state))
        a = ys[-1] if k else x
        b = prev[k + 1] if prev is not None and k + 1 < len(column) else None
        y = level(a, b).to(stream.dtype)  # (B, N_x, D), in the stream's dtype under autocast
        if prev is not None:
            y = y + level.alpha * prev[k]  # the reversible update (RevCol paper, Fig. 2b)
        ys.append(y)
    return ys


def column_inverse(column, x, ys, recompute=None):
    """The previous column's outputs from this one's (official revcol_function.py,
    ReverseFunction.backward): prev_k = (y_k - F_k(y_{k-1}, prev_{k+1})) / alpha_k, last position
    first. `recompute(k, a, b)` may stand in for F_k."""
    L = len(column)
    prev = [None] * L
    for k in reversed(range(L)):
        a = ys[k - 1] if k else x
        b = prev[k + 1] if k + 1 < L else None
        f = recompute(k, a, b) if recompute else column[k](a, b)  # (B, N_x, D)
        if column[k].alpha is not None:  # the first column has no previous one
            prev[k] = (ys[k] - f) / column[k].alpha
    return prev


@contextlib.contextmanager
def rng_restored(ctx, k):
    """The RNG as the forward left it before level k, so the recompute draws its drop-path masks
    (official: the same); nothing to do without drop path."""
    if ctx.rng is None:
        yield
        return
    cpu_rng, cuda_rng = ctx.rng[k]
    with torch.random.fork_rng([ctx.device] if cuda_rng is not None else []):
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, ctx.device)
        yield


class ReversibleColumn(torch.autograd.Function):
    """A column that keeps only its outputs (and x); backward recovers its inputs by column_inverse,
    one level at a time (official ReverseFunction). Inputs: column, keep_rng (drop path draws:
    keep the RNG state before each level for the recompute), x or None, the previous column's
    outputs, column.parameters()."""

    @staticmethod
    def forward(ctx, column, keep_rng, x, *tensors):
        prev = list(tensors[: len(column)]) if column[0].alpha is not None else None
        ctx.column = column
        ctx.rng = [] if keep_rng else None
        ctx.device = (x if x is not None else tensors[0]).device
        t = ctx.device.type  # the forward's autocast state, for the recompute (official: the same)
        dtype = torch.get_autocast_dtype(t)
        ctx.autocast = (t, dtype, torch.is_autocast_enabled(t), torch.is_autocast_cache_enabled())
        ys = column_forward(column, x, prev, ctx.rng)  # runs without grad: nothing is kept
        ctx.save_for_backward(x, *ys)
        return tuple(ys)

    @staticmethod
    def backward(ctx, *g_ys):
        x, *ys = ctx.saved_tensors
        column = ctx.column
        g_ys = list(g_ys)
        L = len(ys)
        g_in = [None] * (L + 1)  # the grads of x and of prev_0 .. prev_{L-1}
        grads = {}  # id(parameter) -> its grad

        def add(grad_list, i, g):
            grad_list[i] = g if grad_list[i] is None else grad_list[i] + g

        def recompute(k, a, b):  # F_k with grad, its grads handed on; k goes L-1 .. 0
            a, b = [t.detach().requires_grad_() if t is not None else None for t in (a, b)]
            with torch.enable_grad(), rng_restored(ctx, k), torch.autocast(*ctx.autocast):
                f = column[k](a, b)  # (B, N_x, D)
            named = column[k].named_parameters()
            params = [p for name, p in named if name != "alpha" and p.requires_grad]
            leaves = [t for t in (a, b) if t is not None] + params
            g = list(torch.autograd.grad(f, leaves, g_ys[k], allow_unused=True))
            if a is not None:  # a is y_{k-1} of this column, or x at k = 0
                add(g_ys if k else g_in, max(k - 1, 0), g.pop(0))
            if b is not None:  # b is prev_{k+1}
                add(g_in, k + 2, g.pop(0))
            grads.update({id(p): gp for p, gp in zip(params, g)})
            return f.detach()

        prev = column_inverse(column, x, ys, recompute)
        for k, level in enumerate(column):
            if level.alpha is not None:  # y_k = ... + alpha_k * prev_k
                add(g_in, k + 1, level.alpha * g_ys[k])
                batch_dims = tuple(range(prev[k].ndim - 1))
                grads[id(level.alpha)] = (g_ys[k] * prev[k]).sum(dim=batch_dims)
        n_prev = L if column[0].alpha is not None else 0
        g_params = [grads.get(id(p)) for p in column.parameters()]  # DEVIATION: not accumulated
        return None, None, g_in[0], *g_in[1 : 1 + n_prev], *g_params


class RevColV2(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        # --- patch tokens (shared by every bottom-up column, as the official stem output) ---
        self.patch_embed = common.PatchEmbed(
            cfg.img_size, cfg.patch_size, cfg.in_chans, cfg.embed_dim
        )
        self.num_patches = self.patch_embed.num_patches
        grid = self.patch_embed.grid_size
        pos_embed = common.sincos_pos_embed(cfg.embed_dim, grid)  # (1, N, D)
        self.pos_embed = nn.Parameter(pos_embed, requires_grad=False)  # fixed sin-cos (A.1)
        # --- columns: bottom-up on the visible patches, then top-down on all (V2 paper, Fig. 2) ---
        L = cfg.num_levels
        d = cfg.level_depth
        drop_path = torch.linspace(0, cfg.drop_path, L * d).tolist()

        def column(bottom_up, first):  # position k: level k bottom-up, level L-1-k top-down
            levels = []
            for k in range(L):
                has_a = bottom_up or k > 0  # the level before it in this column, or the patches
                has_b = not first and k < L - 1  # the level after it in the previous column
                levels.append(Level(cfg, has_a, has_b, not first, drop_path[k * d : k * d + d]))
            return nn.ModuleList(levels)

        self.blocks = nn.ModuleList([column(True, j == 0) for j in range(cfg.encoder_columns)])
        mask_tokens = torch.zeros(L, 1, 1, cfg.embed_dim)
        self.mask_token = nn.Parameter(mask_tokens)  # one per level (V2 paper, Fig. 2)
        decoder_columns = [column(False, False) for _ in range(cfg.decoder_columns)]
        self.decoder_blocks = nn.ModuleList(decoder_columns)
        self.decoder_norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)  # pixel head on level 0
        patch_pixels = cfg.patch_size**2 * cfg.in_chans
        self.decoder_pred = nn.Linear(cfg.embed_dim, patch_pixels)  # to pixels
        # --- initialisation (official MAE initialize_weights; alpha keeps alpha_init) ---
        common.init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def run_column(self, column, x, prev):
        """One column: reversible (only its outputs kept) or plain autograd (--no-reversible)."""
        for level in column:  # |alpha| >= alpha_min, sign kept: the inverse exists (official)
            if level.alpha is not None:  # DEVIATION: 0.1, not 1e-3 (fp32 inverse error)
                alpha = level.alpha.data
                alpha.copy_(alpha.abs().clamp(min=self.cfg.alpha_min).copysign(alpha))
        if self.cfg.reversible and torch.is_grad_enabled():
            keep_rng = self.training and self.cfg.drop_path > 0  # drop path draws in training
            inputs = (x, *(prev or []), *column.parameters())
            return list(ReversibleColumn.apply(column, keep_rng, *inputs))
        return column_forward(column, x, prev)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs)  # (B, N, D)
        x = x + self.pos_embed  # before masking, so kept tokens keep their position
        # only the visible patches enter the encoder (Sec. 3)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)  # (B, N_vis, D)
        levels = None  # no previous column (official: 0). DEVIATION: no cls token (docstring)
        for column in self.blocks:  # bottom-up: x feeds level 0 of every column (official FullNet)
            levels = self.run_column(column, x, levels)  # L x (B, N_vis, D), level 0 first
        return levels, mask, ids_restore

    def forward_decoder(self, levels, ids_restore):
        full = []  # every level gets its own mask token at the hidden positions (article, Fig. 3)
        for k, x in enumerate(levels):
            num_masked = ids_restore.shape[1] - x.shape[1]
            mask_tokens = self.mask_token[k].repeat(x.shape[0], num_masked, 1)  # (B, N_mask, D)
            x_ = torch.cat([x, mask_tokens], dim=1)  # (B, N, D), shuffled order
            index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])
            x_ = torch.gather(x_, 1, index)  # (B, N, D), grid order
            full.append(x_ + self.pos_embed)
        levels = full[::-1]  # top-down columns compute the top level first
        for column in self.decoder_blocks:
            levels = self.run_column(column, None, levels)  # L x (B, N, D), top level first
        x = self.decoder_norm(levels[-1])  # level 0 of the last column reconstructs (Fig. 2)
        x = self.decoder_pred(x)  # (B, N, P*P*C)
        return x, levels

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

    def forward(self, imgs, mask_ratio=None, noise=None):
        mask_ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred, _ = self.forward_decoder(latent, ids_restore)  # (B, N, P*P*C)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def forward_features(self, imgs):
        """Evaluation features: the whole model on the whole image (no mask token), (B, N, D) tokens
        of the top level of the last column (V2 paper, Fig. 2), after the final norm; the protocol
        in docs/evaluation.md pools them."""
        noise = torch.arange(self.num_patches, device=imgs.device).expand(imgs.shape[0], -1)
        latent, _, ids_restore = self.forward_encoder(imgs, 0.0, noise)  # L x (B, N, D)
        _, levels = self.forward_decoder(latent, ids_restore)  # L x (B, N, D), top level first
        top = levels[0]  # (B, N, D)
        return nn.functional.layer_norm(top, top.shape[-1:], eps=1e-6)  # DEVIATION: no weights


if __name__ == "__main__":  # python this_file.py ARGS = python cli.py pretrain this_file.py ARGS
    import sys

    import cli

    cli.main(["pretrain", __file__, *sys.argv[1:]])
