"""Linear separability of two images in the latent of their mixture: OUR definition, for any
encoder. The i-MAE paper (Zhang & Shen, arXiv 2210.11470) asks whether MAE latents are linearly
separable, but its metric's formula was not available to us; ours follows linear probing (Alain &
Bengio, arXiv 1610.01644): what a linear map reads off a frozen encoder E (its forward_features, (B,
N, D) tokens). Held-out images are split into a fit and a test half; in each, every image is paired
with the next in a seeded random cycle (once subordinate, once dominant) and mixed as i-MAE does
(after normalisation): α·x_sub + (1 − α)·x_dom, α <= 0.5. One ridge regression, shared by all token
positions (like i-MAE's linear heads; tokens centred per position, so the position embedding
explains nothing), maps the tokens of E(x_mix) to those of R(x_sub), fitted on the fit half, scored
on the test half by R^2 = 1 − SSE / SST; likewise R(x_dom). The reference R is E itself (does E's
latent of the mixture hold E's latents of the two images?), or one fixed encoder for all, to compare
encoders on common ground. The separability of E is the mean R^2 of the subordinate image over α in
{0.1, 0.2, 0.3, 0.4}. The floor is raw pixels as E and R: for independent components of equal spread
the best linear map reaches R^2 = α² / (α² + (1 − α)²), 0.06 at α = 0.2 and 0.31 at α = 0.4.
"""

import dataclasses
import functools
import json

import torch
from rich.table import Table

import common
import data_sets
from evaluation.loading import load_model

ALPHAS = (0.1, 0.2, 0.3, 0.4)


@dataclasses.dataclass
class SeparabilityConfig:
    random_init: bool = False  # score the run's architecture with random weights (the floor)
    reference: str = ""  # the clean images' latents from this run's encoder (e.g. a teacher's)
    images: int = 1024  # held-out images: half to fit the linear maps, half to test them
    alphas: str = ",".join(map(str, ALPHAS))  # subordinate weights α, in (0, 0.5]
    seed: int = 0  # seeds the pairs (and the random weights of --random-init)
    batch_size: int = 256  # images per forward pass
    json: bool = False  # print one JSON object instead of the table

    def __post_init__(self):
        try:
            self.alpha_values = [float(a) for a in self.alphas.split(",")]
        except ValueError:
            numbers = f"--alphas must be numbers separated by commas, got {self.alphas!r}"
            raise ValueError(numbers) from None
        valid = all(0 < a <= 0.5 for a in self.alpha_values)
        if not valid or self.images < 4 or self.batch_size < 1:
            rule = "--alphas must be subordinate weights in (0, 0.5], --images at least 4"
            raise ValueError(f"{rule}, --batch-size 1")


def run(source, s, find_method, console):
    """The separability command: RUN's encoder (and the --reference's) loaded with
    loading.load_model, measured beside the pixel floor on the first --images held-out images of
    its data; a table or JSON printed."""
    # "mae": the method of official checkpoints, which name none
    model, info = load_model(source, find_method, "mae", s.random_init, s.seed)
    cfg = info["config"]
    train = {"data": "patterns", "data_dir": "", **info["train"]}
    data = train["data"]
    dataset = data_sets.load_dataset(data, "val", train["data_dir"], s.images, cfg.img_size)
    if len(dataset) < 4:
        raise ValueError(
            f"separability needs at least 4 held-out images, {data} has {len(dataset)}"
        )
    transform = data_sets.transform(data, cfg.img_size, False)
    n = min(s.images, len(dataset))
    imgs = torch.stack([transform(dataset[i][0]) for i in range(n)])  # (n, C, H, W)
    ref = None
    if s.reference:
        ref = load_model(s.reference, find_method, "mae")[0].eval()
        if (ref.cfg.img_size, ref.cfg.patch_size) != (cfg.img_size, cfg.patch_size):
            sizes = f"another image or patch size than {source}: its tokens differ"
            raise ValueError(f"--reference {s.reference} has {sizes}")
        ref = ref.forward_features
    # the floor: pixels as tokens, (B, N, P*P*C)
    pixels = functools.partial(common.patchify, p=cfg.patch_size)
    settings = (s.alpha_values, s.seed, s.batch_size)
    rows, score = measure(model.eval().forward_features, imgs, *settings, ref)
    pixel_rows, pixel_score = measure(pixels, imgs, *settings, ref or pixels)
    name = f"{info['method']} {'random init' if s.random_init else 'trained'}"
    if s.json:
        report = dict(
            run=source,
            method=info["method"],
            random_init=s.random_init,
            reference=s.reference or "itself",
            step=info["ckpt"].get("step"),
            data=data,
            images=len(imgs),
            separability=score,
            rows=rows,
            pixels=pixel_score,
            pixel_rows=pixel_rows,
        )
        return console.print_json(json.dumps(report))
    title = f"linear separability (ours): {name}, {source}, {len(imgs)} held-out {data} images, "
    title += f"latents of the clean images from {s.reference or 'the same encoder'}"
    table = Table(title=title)
    for column in ("α (subordinate)", "R² sub", "R² dom", "pixels: R² sub", "pixels: R² dom"):
        table.add_column(column, justify="right")
    for r, p in zip(rows, pixel_rows):
        scores = (r["sub"], r["dom"], p["sub"], p["dom"])
        table.add_row(f"{r['alpha']:.2f}", *(f"{x:.3f}" for x in scores))
    console.print(table)
    summary = f"separability (mean R² of the subordinate image): {score:.3f} ({name})"
    console.print(f"{summary}; raw pixels {pixel_score:.3f}")


def ridge_r2(x_fit, y_fit, x_test, y_test, ridge=1e-3):
    """Out-of-sample R^2 of a ridge regression y = x W fitted on (x_fit, y_fit). x: (B, N, D_in), y:
    (B, N, D_out), centred per position with the fit half's means; the ridge is `ridge` times the
    mean eigenvalue of x_fit^T x_fit."""
    x_mean = x_fit.mean(0)  # (N, D_in): per-position means
    y_mean = y_fit.mean(0)  # (N, D_out)
    xf = (x_fit - x_mean).flatten(0, 1).double()  # (B*N, D_in)
    yf = (y_fit - y_mean).flatten(0, 1).double()  # (B*N, D_out)
    gram = xf.T @ xf  # (D_in, D_in)
    eye = torch.eye(len(gram), dtype=gram.dtype)
    w = torch.linalg.solve(gram + ridge * gram.trace() / len(gram) * eye, xf.T @ yf)
    x_centred = (x_test - x_mean).flatten(0, 1).double()
    y_centred = (y_test - y_mean).flatten(0, 1).double()
    sse = (y_centred - x_centred @ w).pow(2).sum()
    sst = (y_test - y_test.mean(0)).double().pow(2).sum()
    return (1 - sse / sst.clamp(min=1e-12)).item()


def linear_separability(z_mix, z_sub, z_dom, fit, test):
    """R^2 of the subordinate and of the dominant image's latent, read linearly from the mixture's
    latent. z_*: (M, N, D) latents of M mixtures and of their clean components; fit, test: index
    tensors into M."""
    latents = {"sub": z_sub, "dom": z_dom}
    return {name: ridge_r2(z_mix[fit], z[fit], z_mix[test], z[test]) for name, z in latents.items()}


@torch.no_grad()
def measure(features, imgs, alphas=ALPHAS, seed=0, batch_size=256, reference=None):
    """Our separability of the encoder `features` (imgs (B, C, H, W) -> (B, N, D)) on held-out
    `imgs`, with the clean images' latents from `reference` (another such function with the same N;
    default: `features`). Returns one row per α: {"alpha", "sub", "dom"} (R^2 on the test half), and
    the mean R^2 of "sub"."""
    g = torch.Generator().manual_seed(seed)
    n = len(imgs)
    halves = ((0, n // 2), (n // 2, n))
    cycles = [lo + torch.randperm(hi - lo, generator=g) for lo, hi in halves]  # one per half
    sub = torch.cat(cycles)
    dom = torch.cat([c.roll(-1) for c in cycles])  # each image mixed with the next in its cycle
    fit = torch.arange(n // 2)
    test = torch.arange(n // 2, n)

    def encode(f, x):  # f(x) -> (B, N, D), batch by batch, as one float32 tensor on the CPU
        return torch.cat([f(batch).float().cpu() for batch in x.split(batch_size)])

    z = encode(reference or features, imgs)  # (n, N, D_ref): each image alone
    rows = []
    for alpha in alphas:
        z_mix = encode(features, alpha * imgs[sub] + (1 - alpha) * imgs[dom])  # (M, N, D)
        rows.append({"alpha": alpha, **linear_separability(z_mix, z[sub], z[dom], fit, test)})
    return rows, sum(r["sub"] for r in rows) / len(rows)
