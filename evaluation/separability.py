"""Linear separability of two images in the latent of their mixture: OUR definition, for any encoder.

The i-MAE paper (Zhang & Shen, arXiv 2210.11470) asks whether the latents of masked autoencoders are linearly
separable, but its metric's formula was not available to us (a third-party summary calls it "linear regression-based").
This is our operational definition, on that premise and on linear probing (Alain & Bengio, arXiv 1610.01644): what a
linear map can read off a frozen representation. For a frozen encoder E (its forward_features, (B, N, D) tokens):
1. Held-out images are split into a fit and a test half; within each, every image is paired with a partner by a
   seeded random cycle (each image is once subordinate, once dominant).
2. For a subordinate weight α <= 0.5 they are mixed as i-MAE does (after normalisation): α·x_sub + (1 − α)·x_dom.
3. One ridge regression, shared by all token positions (like i-MAE's linear heads), maps the tokens of E(x_mix) to
   those of R(x_sub) at the same position, fitted on the fit half; likewise to R(x_dom). The reference R is E itself by
   default (does E's latent of the mixture hold E's latents of the two images?), or one fixed encoder for all, to
   compare encoders on common ground. Tokens are centred per position, so the position embedding explains nothing.
4. The test half is scored by R^2 = 1 − SSE / SST (all output dimensions pooled, per-position test means).
The separability of E is the mean R^2 of the subordinate image over α in {0.1, 0.2, 0.3, 0.4}, the dominant image's
R^2 beside it. The floor is raw pixels as E (the patches as tokens, same R): for independent components of equal spread
and R = pixels, the best linear map reaches R^2 = α² / (α² + (1 − α)²), 0.06 at α = 0.2 and 0.31 at α = 0.4.
"""

import torch

import common
import data_sets

ALPHAS = (0.1, 0.2, 0.3, 0.4)


def pair_indices(n, seed=0):
    """Fit and test pairs over n images: (sub, dom) index tensors for each half, from a seeded random cycle."""
    g, halves = torch.Generator().manual_seed(seed), []
    for lo, hi in ((0, n // 2), (n // 2, n)):
        cycle = lo + torch.randperm(hi - lo, generator=g)  # a random order of the half
        halves.append((cycle, cycle.roll(-1)))  # each image is mixed with the next one in that order
    return halves


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
def encode(features, imgs, batch_size=256):
    """features(imgs) -> (B, N, D), batch by batch, as one float32 tensor on the CPU."""
    return torch.cat([features(batch).float().cpu() for batch in imgs.split(batch_size)])


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
    dataset = data_sets.load_dataset(data, "val", data_dir, n, img_size)
    if len(dataset) < 4:
        raise ValueError(f"separability needs at least 4 held-out images, {data} has {len(dataset)}")
    transform = data_sets.transform(data, img_size, False)
    return torch.stack([transform(dataset[i][0]) for i in range(min(n, len(dataset)))])
