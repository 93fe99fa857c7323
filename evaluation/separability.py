"""Linear separability of two images in the latent of their mixture: OUR definition, for any encoder.

The i-MAE paper (Zhang & Shen, arXiv 2210.11470) asks whether the latents of masked autoencoders are linearly
separable and proposes a metric for it, but its formula was not available to us (only the abstract; a
third-party summary calls the metric "linear regression-based"). This is our operational definition, built
on that premise and on linear probing (Alain & Bengio, "Understanding intermediate layers using linear
classifier probes", arXiv 1610.01644): what a linear map can read off a frozen representation.

For a frozen encoder E (its `forward_features`: (B, N, D) tokens of the whole image, no masking):
1. Take held-out images, split into a fit half and a test half; within each half, pair every image with a
   partner by a seeded random cycle (each image is once subordinate, once dominant).
2. For a subordinate weight α <= 0.5, mix as i-MAE does (after normalisation): x_mix = α·x_sub + (1 − α)·x_dom.
3. Fit one ridge regression, shared by all token positions (like i-MAE's linear heads), from the tokens of
   E(x_mix) to the tokens of R(x_sub) at the same position, on the fit half; likewise to R(x_dom). The reference
   R is E itself by default (the paper's question: does E's latent of the mixture hold E's latents of the two
   images?); to compare encoders on common ground, R can be one fixed encoder for all (e.g. the MAE that was
   i-MAE's teacher). Tokens are centred per position first, so the position embedding explains nothing.
4. Score the test half by R^2 = 1 − SSE / SST (all output dimensions pooled, per-position test means).

The separability of E is the mean R^2 of the subordinate image over α in {0.1, 0.2, 0.3, 0.4}: 1 means one linear
map recovers the weaker image's latent from the mixture's. The dominant image's R^2 is reported beside it.
As a floor we score raw pixels as E (the patches as "tokens", same R): there the mixture is exactly linear, so
only the statistics of the images help; for independent components of equal spread and R = pixels, the
best linear map reaches R^2 = α² / (α² + (1 − α)²), 0.06 at α = 0.2 and 0.31 at α = 0.4.
"""
import torch

import common

ALPHAS = (0.1, 0.2, 0.3, 0.4)


def pair_indices(n, seed=0):
    """Fit and test pairs over n images: (sub, dom) index tensors for each half, from a seeded random cycle."""
    g = torch.Generator().manual_seed(seed)
    halves = []
    for lo, hi in ((0, n // 2), (n // 2, n)):
        cycle = lo + torch.randperm(hi - lo, generator=g)  # a random order of the half
        halves.append((cycle, cycle.roll(-1)))  # each image is mixed with the next one in that order
    return halves


def ridge_r2(x_fit, y_fit, x_test, y_test, ridge=1e-3):
    """Out-of-sample R^2 of a ridge regression y = x W fitted on (x_fit, y_fit).

    x: (B, N, D_in), y: (B, N, D_out) token features, centred per position with the fit half's means; the
    ridge is `ridge` times the mean eigenvalue of x_fit^T x_fit. R^2 pools every output dimension."""
    x_mean, y_mean = x_fit.mean(0), y_fit.mean(0)  # (N, D_in), (N, D_out): per-position means
    xf, yf = (x_fit - x_mean).flatten(0, 1).double(), (y_fit - y_mean).flatten(0, 1).double()  # (B*N, D)
    gram = xf.T @ xf  # (D_in, D_in)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram + ridge * gram.trace() / gram.shape[0] * eye, xf.T @ yf)  # (D_in, D_out)
    pred = (x_test - x_mean).flatten(0, 1).double() @ w  # (B*N, D_out)
    yt = (y_test - y_mean).flatten(0, 1).double()
    sse = ((yt - pred) ** 2).sum()
    sst = ((y_test - y_test.mean(0)) ** 2).sum().double()
    return (1 - sse / sst.clamp(min=1e-12)).item()


def linear_separability(z_mix, z_sub, z_dom, fit, test):
    """R^2 of the subordinate and of the dominant image's latent, read linearly from the mixture's latent.
    z_*: (M, N, D) latents of M mixtures and of their clean components; fit, test: index tensors into M."""
    return {name: ridge_r2(z_mix[fit], z[fit], z_mix[test], z[test]) for name, z in (("sub", z_sub), ("dom", z_dom))}


@torch.no_grad()
def encode(features, imgs, batch_size=256):
    """features(imgs) -> (B, N, D), batch by batch, as one float32 tensor on the CPU."""
    return torch.cat([features(imgs[i : i + batch_size]).float().cpu() for i in range(0, len(imgs), batch_size)])


def measure(features, imgs, alphas=ALPHAS, seed=0, batch_size=256, reference=None):
    """Our separability of the encoder `features` (imgs (B, C, H, W) -> (B, N, D)) on held-out `imgs`, with the
    clean images' latents from `reference` (another such function with the same N; default: `features`).
    Returns one row per α: {"alpha", "sub", "dom"} (R^2 on the test half), and the mean R^2 of "sub"."""
    (fit_sub, fit_dom), (test_sub, test_dom) = pair_indices(len(imgs), seed)
    sub, dom = torch.cat([fit_sub, test_sub]), torch.cat([fit_dom, test_dom])  # (M,) mixture components
    fit, test = torch.arange(len(fit_sub)), torch.arange(len(fit_sub), len(sub))
    z = encode(reference or features, imgs, batch_size)  # (n, N, D_ref): each image alone
    rows = []
    for alpha in alphas:
        z_mix = encode(features, alpha * imgs[sub] + (1 - alpha) * imgs[dom], batch_size)  # (M, N, D)
        rows.append({"alpha": alpha, **linear_separability(z_mix, z[sub], z[dom], fit, test)})
    return rows, sum(r["sub"] for r in rows) / len(rows)


def pixel_features(patch_size):
    """The floor: raw normalised pixels as tokens, (B, C, H, W) -> (B, N, P*P*C)."""
    return lambda imgs: common.patchify(imgs, patch_size)


def held_out_images(data, data_dir, img_size, n):
    """The first n held-out images of a data set, evaluation transform applied: (n, C, H, W)."""
    dataset = common.load_dataset(data, "val", data_dir, n, img_size)
    if len(dataset) < 4:
        raise ValueError(f"separability needs at least 4 held-out images, {data} has {len(dataset)}")
    transform = common.transform(data, img_size, False)
    return torch.stack([transform(dataset[i][0]) for i in range(min(n, len(dataset)))])
