"""Linear separability of two images in the latent of their mixture: OUR definition, for any encoder. The i-MAE
paper (Zhang & Shen, arXiv 2210.11470) asks whether MAE latents are linearly separable, but its metric's formula was
not available to us; ours follows linear probing (Alain & Bengio, arXiv 1610.01644): what a linear map reads off a
frozen encoder E (its forward_features, (B, N, D) tokens). Held-out images are split into a fit and a test half; in
each, every image is paired with the next in a seeded random cycle (once subordinate, once dominant) and mixed as i-MAE
does (after normalisation): α·x_sub + (1 − α)·x_dom, α <= 0.5. One ridge regression, shared by all token positions
(like i-MAE's linear heads; tokens centred per position, so the position embedding explains nothing), maps the tokens
of E(x_mix) to those of R(x_sub), fitted on the fit half, scored on the test half by R^2 = 1 − SSE / SST; likewise
R(x_dom). The reference R is E itself (does E's latent of the mixture hold E's latents of the two images?), or one
fixed encoder for all, to compare encoders on common ground. The separability of E is the mean R^2 of the subordinate
image over α in {0.1, 0.2, 0.3, 0.4}. The floor is raw pixels as E and R: for independent components of equal spread
the best linear map reaches R^2 = α² / (α² + (1 − α)²), 0.06 at α = 0.2 and 0.31 at α = 0.4.
"""

import dataclasses
import functools
import json

import torch
from rich.table import Table

import common
import data_sets
from evaluation import evaluate

ALPHAS = (0.1, 0.2, 0.3, 0.4)


@dataclasses.dataclass
class SeparabilityConfig:
    random_init: bool = False  # score the run's architecture with random weights (the floor)
    reference: str = ""  # the clean images' latents from this run's encoder, not RUN's (e.g. i-MAE's MAE teacher)
    images: int = 1024  # held-out images: half to fit the linear maps, half to test them
    alphas: str = ",".join(map(str, ALPHAS))  # subordinate weights α, in (0, 0.5]
    seed: int = 0  # seeds the pairs (and the random weights of --random-init)
    batch_size: int = 256  # images per forward pass
    json: bool = False  # print one JSON object instead of the table

    def __post_init__(self):
        try:
            self.alpha_values = [float(a) for a in self.alphas.split(",")]
        except ValueError:
            raise ValueError(f"--alphas must be numbers separated by commas, got {self.alphas!r}") from None
        if not all(0 < a <= 0.5 for a in self.alpha_values) or self.images < 4 or self.batch_size < 1:
            raise ValueError("--alphas must be subordinate weights in (0, 0.5], --images at least 4, --batch-size 1")


def run(source, s, find_method, console):
    """The separability command: RUN's encoder (and the --reference's) loaded with evaluate.load_model, measured
    beside the pixel floor on the first --images held-out images of its data; a table or JSON printed."""
    model, info = evaluate.load_model(source, find_method, "mae", s.random_init, s.seed)  # mae: official checkpoints
    cfg, train = info["config"], {"data": "patterns", "data_dir": "", **info["train"]}
    dataset = data_sets.load_dataset(train["data"], "val", train["data_dir"], s.images, cfg.img_size)
    if len(dataset) < 4:
        raise ValueError(f"separability needs at least 4 held-out images, {train['data']} has {len(dataset)}")
    transform = data_sets.transform(train["data"], cfg.img_size, False)
    imgs = torch.stack([transform(dataset[i][0]) for i in range(min(s.images, len(dataset)))])  # (n, C, H, W)
    ref = evaluate.load_model(s.reference, find_method, "mae")[0].eval() if s.reference else None
    if ref and (ref.cfg.img_size, ref.cfg.patch_size) != (cfg.img_size, cfg.patch_size):
        raise ValueError(f"--reference {s.reference} has another image or patch size than {source}: its tokens differ")
    ref = ref and ref.forward_features
    pixels = functools.partial(common.patchify, p=cfg.patch_size)  # the floor: pixels as tokens, (B, N, P*P*C)
    rows, score = measure(model.eval().forward_features, imgs, s.alpha_values, s.seed, s.batch_size, ref)
    pixel_rows, pixel_score = measure(pixels, imgs, s.alpha_values, s.seed, s.batch_size, ref or pixels)
    name = f"{info['method']} {'random init' if s.random_init else 'trained'}"
    if s.json:
        report = dict(run=source, method=info["method"], random_init=s.random_init, reference=s.reference or "itself")
        report |= dict(step=info["ckpt"].get("step"), data=train["data"], images=len(imgs), separability=score)
        return console.print_json(json.dumps(report | dict(rows=rows, pixels=pixel_score, pixel_rows=pixel_rows)))
    title = f"linear separability (ours): {name}, {source}, {len(imgs)} held-out {train['data']} images, "
    table = Table(title=title + f"latents of the clean images from {s.reference or 'the same encoder'}")
    for column in ("α (subordinate)", "R² sub", "R² dom", "pixels: R² sub", "pixels: R² dom"):
        table.add_column(column, justify="right")
    for r, p in zip(rows, pixel_rows):
        table.add_row(f"{r['alpha']:.2f}", *(f"{x:.3f}" for x in (r["sub"], r["dom"], p["sub"], p["dom"])))
    console.print(table)
    console.print(
        f"separability (mean R² of the subordinate image): {score:.3f} ({name}); raw pixels {pixel_score:.3f}"
    )


def ridge_r2(x_fit, y_fit, x_test, y_test, ridge=1e-3):
    """Out-of-sample R^2 of a ridge regression y = x W fitted on (x_fit, y_fit). x: (B, N, D_in), y: (B, N, D_out),
    centred per position with the fit half's means; the ridge is `ridge` times the mean eigenvalue of x_fit^T x_fit."""
    x_mean, y_mean = x_fit.mean(0), y_fit.mean(0)  # (N, D_in), (N, D_out): per-position means
    xf, yf = (x_fit - x_mean).flatten(0, 1).double(), (y_fit - y_mean).flatten(0, 1).double()  # (B*N, D)
    gram = xf.T @ xf  # (D_in, D_in)
    w = torch.linalg.solve(gram + ridge * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype), xf.T @ yf)
    sse = ((y_test - y_mean).flatten(0, 1).double() - (x_test - x_mean).flatten(0, 1).double() @ w).pow(2).sum()
    sst = (y_test - y_test.mean(0)).double().pow(2).sum()
    return (1 - sse / sst.clamp(min=1e-12)).item()


def linear_separability(z_mix, z_sub, z_dom, fit, test):
    """R^2 of the subordinate and of the dominant image's latent, read linearly from the mixture's latent.
    z_*: (M, N, D) latents of M mixtures and of their clean components; fit, test: index tensors into M."""
    return {name: ridge_r2(z_mix[fit], z[fit], z_mix[test], z[test]) for name, z in (("sub", z_sub), ("dom", z_dom))}


@torch.no_grad()
def measure(features, imgs, alphas=ALPHAS, seed=0, batch_size=256, reference=None):
    """Our separability of the encoder `features` (imgs (B, C, H, W) -> (B, N, D)) on held-out `imgs`, with the
    clean images' latents from `reference` (another such function with the same N; default: `features`).
    Returns one row per α: {"alpha", "sub", "dom"} (R^2 on the test half), and the mean R^2 of "sub"."""
    g, n = torch.Generator().manual_seed(seed), len(imgs)
    cycles = [lo + torch.randperm(hi - lo, generator=g) for lo, hi in ((0, n // 2), (n // 2, n))]  # one per half
    sub, dom = torch.cat(cycles), torch.cat([c.roll(-1) for c in cycles])  # each image mixed with the next in its cycle
    fit, test = torch.arange(n // 2), torch.arange(n // 2, n)

    def encode(f, x):  # f(x) -> (B, N, D), batch by batch, as one float32 tensor on the CPU
        return torch.cat([f(batch).float().cpu() for batch in x.split(batch_size)])

    z, rows = encode(reference or features, imgs), []  # (n, N, D_ref): each image alone
    for alpha in alphas:
        z_mix = encode(features, alpha * imgs[sub] + (1 - alpha) * imgs[dom])  # (M, N, D)
        rows.append({"alpha": alpha, **linear_separability(z_mix, z[sub], z[dom], fit, test)})
    return rows, sum(r["sub"] for r in rows) / len(rows)
