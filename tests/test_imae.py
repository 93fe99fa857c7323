"""i-MAE (imae.py) and our separability metric (separability.py): the mixing rule, the loss terms,
the frozen teacher, and the CLI (`pretrain i-mae`, `--teacher`, `separability`)."""

import argparse
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import drawn_inputs, run_cli, run_torchrun

import cli
import common
import imae
import mae
from evaluation import separability

TEACHER_OF = cli.load_whole_model  # how `cli.py pretrain` hands prepare_pretrain its loader


def tiny_config(**overrides):
    return cli.resolve(imae, "tiny", None, overrides)[0]


def batch_inputs(cfg, n, seed=0):
    return drawn_inputs(imae, cfg, n, seed=seed)


def write_mae_checkpoint(path, **overrides):
    """A `pretrain mae`-style checkpoint of a tiny, randomly initialised MAE."""
    cfg = cli.resolve(mae, "tiny", None, overrides)[0]
    torch.manual_seed(1)
    model = mae.MAE(cfg)
    torch.save(
        {"model": model.state_dict(), "method": "mae", "config": dataclasses.asdict(cfg)}, path
    )
    return model


# --------------------------------------------------------------------------------------------------
# ------------- mixing and pairing


def test_lambda_is_one_uniform_draw_per_batch_and_mixing_follows_the_rule():
    lams = []
    for seed in range(2000):
        pairing = torch.rand(8, 3, generator=torch.Generator().manual_seed(seed))
        _, lam = imae.pair_up(pairing, torch.zeros(8, dtype=torch.long), 0.0)
        assert lam.ndim == 0
        assert lam.item() == pytest.approx(pairing[pairing[:, 0].argmin(), 2].item())
        lams.append(lam.item())
    lams = torch.tensor(lams)
    hist = torch.histc(lams, bins=4, min=0, max=1) / len(lams)  # U[0, 1]: a quarter in each quarter
    assert (hist - 0.25).abs().max() < 0.04 and lams.min() >= 0 and lams.max() <= 1
    imgs = torch.randn(4, 3, 8, 8)
    imgs_b = torch.randn(4, 3, 8, 8)
    for lam in (0.0, 0.2, 0.5, 0.7, 1.0):
        imgs_mix, x_sub, x_dom = imae.mix(imgs, imgs_b, torch.tensor(lam))
        alpha = min(lam, 1 - lam)  # the subordinate image's weight
        assert alpha <= 0.5
        torch.testing.assert_close(imgs_mix, lam * imgs + (1 - lam) * imgs_b)
        torch.testing.assert_close(imgs_mix, alpha * x_sub + (1 - alpha) * x_dom)
        assert torch.equal(x_sub, imgs if lam < 0.5 else imgs_b)
        assert torch.equal(x_dom, imgs_b if lam < 0.5 else imgs)


def test_partners_are_a_random_cycle_fixed_by_the_draws_and_independent_of_batch_order():
    g = torch.Generator().manual_seed(0)
    pairing = torch.rand(12, 3, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    partner, lam = imae.pair_up(pairing, labels, 0.0)
    assert sorted(partner.tolist()) == list(range(12)) and (partner != torch.arange(12)).all()
    # one cycle through the whole batch: every image is once subordinate-or-dominant partner
    seen = []
    i = 0
    while i not in seen:
        seen.append(i)
        i = partner[i].item()
    assert len(seen) == 12
    # the same samples in another order (e.g. gathered from 2 processes)
    perm = torch.randperm(12, generator=g)
    partner_p, lam_p = imae.pair_up(pairing[perm], labels[perm], 0.0)
    assert torch.equal(perm[partner_p], partner[perm]) and lam_p == lam


def test_same_class_probability_pairs_by_label_and_falls_back_for_lone_images():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 1, 0])  # class 3 has a single image
    pairing = torch.rand(10, 3, generator=g)
    partner, _ = imae.pair_up(pairing, labels, 1.0)
    lone = labels == 3
    assert (labels[partner] == labels)[~lone].all() and (partner != torch.arange(10)).all()
    assert labels[partner][lone].ne(3).all()  # no same-class partner in the batch: a random one
    partner_random, _ = imae.pair_up(pairing, labels, 0.0)
    assert not (labels[partner_random] == labels).all()  # p = 0 ignores the labels
    partner_half = torch.stack(
        [imae.pair_up(torch.rand(10, 3, generator=g), labels, 0.5)[0] for _ in range(400)]
    )
    same = (labels[partner_half] == labels)[:, ~lone].float().mean()
    assert 0.5 < same < 0.75  # 0.5 by the coin, plus random partners that happen to share the class


# --------------------------------------------------------------------------------------------------
# ------------- the loss and the teacher


def norm_pix_masked_mse(pred, imgs, mask, p):
    target = common.patchify(imgs, p)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


@pytest.fixture()
def student_and_teacher(tmp_path):
    write_mae_checkpoint(tmp_path / "mae.pt")
    cfg = tiny_config(teacher=str(tmp_path / "mae.pt"))
    torch.manual_seed(0)
    model = imae.IMAE(cfg)
    messages = []
    model.prepare_pretrain(TEACHER_OF, messages.append)
    return model, messages


def partners_by_hand(pairing, labels, same_class_prob):
    """The documented pairing rule, with Python lists: sort the images by key; an image's partner is
    the next one in that order, cyclically, or, when its coin is below same_class_prob, the next
    image of its own class in that order, cyclically, if its class has another image. λ is the λ
    draw of the image with the smallest key."""
    key, coin, lam_draw = (pairing[:, c].tolist() for c in range(3))
    labels, order = labels.tolist(), sorted(range(len(key)), key=lambda i: key[i])
    partner = []
    for i in range(len(key)):
        same = [j for j in order if labels[j] == labels[i]]  # its class, in key order
        if coin[i] < same_class_prob and len(same) > 1:
            partner.append(same[(same.index(i) + 1) % len(same)])
        else:
            partner.append(order[(order.index(i) + 1) % len(order)])
    return partner, lam_draw[order[0]]


def test_loss_is_both_reconstructions_plus_distill_weight_times_both_distillation_terms(tmp_path):
    """The i-MAE loss derived independently: partners and λ from the documented rule (by hand), the
    mixture, the subordinate / dominant images, and every network pass transcribed from the official
    MAE (tests/test_mae.py) on the student's and the teacher's own weights; nothing of imae.py
    computes the expectation. In float64; at three distillation weights, so the weight must scale
    exactly the distillation."""
    from test_mae import official_decoder, official_encoder, official_loss

    write_mae_checkpoint(tmp_path / "mae.pt")
    torch.manual_seed(0)
    model = imae.IMAE(tiny_config(teacher=str(tmp_path / "mae.pt"), same_class_prob=0.5)).double()
    messages = []
    model.prepare_pretrain(TEACHER_OF, messages.append)
    assert model.teacher is not None and any("distilling" in m for m in messages)
    model.teacher.double()
    with torch.no_grad():  # no zero bias or zero-initialised head can hide a term
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.1 * torch.randn_like(param))
    cfg = model.cfg
    B = 6
    r = model.cfg.mask_ratio
    sd = model.state_dict()
    teacher_sd = {
        k: v.double()
        for k, v in torch.load(tmp_path / "mae.pt", weights_only=True)["model"].items()
    }
    imgs = torch.randn(B, 3, cfg.img_size, cfg.img_size, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    head = lambda name, x: F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])  # noqa: E731
    seen_sides = set()
    seen_same_class = False
    for seed in range(40):
        inputs = batch_inputs(cfg, B, seed)
        partner, lam = partners_by_hand(inputs["pairing"], labels, cfg.same_class_prob)
        if (lam < 0.5) in seen_sides:
            continue  # one batch with the first image subordinate (λ < 0.5), one with it dominant
        seen_sides.add(lam < 0.5)
        assert all(p != i for i, p in enumerate(partner))
        seen_same_class |= any(labels[p] == labels[i] for i, p in enumerate(partner))
        x_b = imgs[partner]  # each image's partner
        mixture = lam * imgs + (1 - lam) * x_b
        # the subordinate weight is min(λ, 1 - λ)
        x_sub, x_dom = (imgs, x_b) if lam < 0.5 else (x_b, imgs)
        latent, mask, ids_restore = official_encoder(sd, cfg, mixture, inputs["noise"], r)
        h_sub = head("decoder_embed1", latent)
        h_dom = head("decoder_embed2", latent)
        pred_sub, pred_dom = (official_decoder(sd, cfg, h, ids_restore) for h in (h_sub, h_dom))
        recon = official_loss(cfg, x_sub, pred_sub, mask) + official_loss(
            cfg, x_dom, pred_dom, mask
        )
        teacher_embed = teacher_sd["decoder_embed.weight"], teacher_sd["decoder_embed.bias"]
        t_sub, t_dom = (
            F.linear(official_encoder(teacher_sd, cfg, x, inputs["noise"], r)[0], *teacher_embed)
            for x in (x_sub, x_dom)
        )  # the teacher's latents of the clean images, under the same mask
        # plain MSE, cls token included
        distill = ((h_sub - t_sub) ** 2).mean() + ((h_dom - t_dom) ** 2).mean()
        assert recon > 1e-2 and distill > 1e-3
        for weight in (1.0, 0.25, 3.0):
            model.cfg = dataclasses.replace(cfg, distill_weight=weight)
            with torch.no_grad():
                loss, pred, mask_ = model(imgs, labels=labels, **inputs)
            assert torch.equal(mask_.float(), mask.float())
            expected = (recon + weight * distill).item()
            assert abs(loss.item() - expected) < 1e-6 * expected, (weight, loss, recon, distill)
            # the reconstruction of imgs
            assert (pred - (pred_sub if lam < 0.5 else pred_dom)).abs().max() < 1e-6
        # without a teacher the distillation terms vanish and the reconstructions stay
        teacher, model.teacher = model.teacher, None
        with torch.no_grad():
            assert (
                abs(model(imgs, labels=labels, **inputs)[0].item() - recon.item())
                < 1e-6 * recon.item()
            )
        object.__setattr__(model, "teacher", teacher)
        model.cfg = cfg
    assert seen_sides == {True, False} and seen_same_class


def test_teacher_is_frozen_out_of_state_dict_and_optimizer(student_and_teacher):
    model, _ = student_and_teacher
    before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    assert not any(k.startswith("teacher") for k in model.state_dict())
    teacher_ids = {id(p) for p in model.teacher.parameters()}
    groups = common.param_groups(model, 0.05)
    assert not teacher_ids & {id(p) for g in groups for p in g["params"]}
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    head = model.decoder_embed1.weight.detach().clone()
    imgs = torch.randn(4, 3, model.cfg.img_size, model.cfg.img_size)
    for _ in range(2):
        loss = model(imgs, labels=torch.arange(4), **batch_inputs(model.cfg, 4))[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    assert not torch.equal(head, model.decoder_embed1.weight)  # the student did train
    fresh = imae.IMAE(model.cfg)  # an i-MAE checkpoint loads strictly with no teacher at hand
    fresh.load_state_dict(model.state_dict())


def test_init_from_teacher_copies_the_mae_and_both_heads_from_decoder_embed(tmp_path):
    teacher_mae = write_mae_checkpoint(tmp_path / "mae.pt")
    model = imae.IMAE(tiny_config(teacher=str(tmp_path / "mae.pt"), init_from_teacher=True))
    model.prepare_pretrain(TEACHER_OF, lambda message: None)
    state = model.state_dict()
    ref = teacher_mae.state_dict()
    assert all(torch.equal(state[k], ref[k]) for k in state if not k.startswith("decoder_embed"))
    for head in ("decoder_embed1", "decoder_embed2"):
        assert torch.equal(state[f"{head}.weight"], ref["decoder_embed.weight"])


def test_teacher_that_does_not_match_names_the_difference(tmp_path):
    write_mae_checkpoint(tmp_path / "mae.pt", patch_size=4)
    with pytest.raises(ValueError, match="is another patch_size: pass an MAE of this size"):
        imae.IMAE(tiny_config(teacher=str(tmp_path / "mae.pt"))).prepare_pretrain(TEACHER_OF, print)
    write_mae_checkpoint(tmp_path / "wide.pt", decoder_embed_dim=64)
    with pytest.raises(ValueError, match="is another decoder_embed_dim"):
        imae.IMAE(tiny_config(teacher=str(tmp_path / "wide.pt"))).prepare_pretrain(
            TEACHER_OF, print
        )
    simmim_run = tmp_path / "simmim.pt"
    cfg = cli.resolve(cli.simmim, "tiny", None, {})[0]
    state = cli.simmim.SimMIM(cfg).state_dict()
    torch.save({"model": state, "method": "simmim", "config": dataclasses.asdict(cfg)}, simmim_run)
    with pytest.raises(ValueError, match="is a simmim run: pass an MAE"):
        imae.IMAE(tiny_config(teacher=str(simmim_run))).prepare_pretrain(TEACHER_OF, print)
    # an official checkpoint's layout, {"model", "args"}: its sizes read off the tensors, the heads
    # from the width (ViT-Ti's 192-d, 3 heads), the decoder's official 16 heads
    official_sizes = dict(embed_dim=192, depth=1, num_heads=3, decoder_num_heads=16)
    official = write_mae_checkpoint(tmp_path / "official.pth", **official_sizes).state_dict()
    args = argparse.Namespace(model="mae_vit_tiny_patch8")
    torch.save({"model": official, "args": args}, tmp_path / "official.pth")
    model = imae.IMAE(tiny_config(teacher=str(tmp_path / "official.pth")))
    model.prepare_pretrain(TEACHER_OF, print)
    assert torch.equal(model.teacher.decoder_embed.weight, official["decoder_embed.weight"])
    with pytest.raises(ValueError, match="--init-from-teacher needs --teacher"):
        tiny_config(init_from_teacher=True)
    with pytest.raises(ValueError, match="--same-class-prob"):
        tiny_config(same_class_prob=1.5)


# --------------------------------------------------------------------------------------------------
# ------------- the separability metric


def test_separability_is_high_for_separable_latents_and_low_for_entangled_ones():
    g = torch.Generator().manual_seed(0)
    M = 400
    N = 4
    D = 16
    z_sub = torch.randn(M, N, D, generator=g)
    z_dom = torch.randn(M, N, D, generator=g)
    rotation = torch.linalg.qr(torch.randn(2 * D, 2 * D, generator=g))[0]
    # both images intact, in mixed-up directions
    separable = torch.cat([z_sub, z_dom], -1) @ rotation
    entangled = 0.3 * z_sub + 0.7 * z_dom  # summed in the same directions, as raw pixels are
    fit = torch.arange(M // 2)
    test = torch.arange(M // 2, M)
    good = separability.linear_separability(separable, z_sub, z_dom, fit, test)
    bad = separability.linear_separability(entangled, z_sub, z_dom, fit, test)
    assert good["sub"] > 0.99 and good["dom"] > 0.99
    assert bad["sub"] < 0.25 and bad["sub"] == pytest.approx(0.3**2 / (0.3**2 + 0.7**2), abs=0.05)
    assert bad["dom"] > 0.75  # the dominant image is most of the mixture


# --------------------------------------------------------------------------------------------------
# ------------- the command line


def test_cli_pretrain_i_mae_with_and_without_teacher_and_separability(tmp_path):
    teacher = tmp_path / "mae"
    plain = tmp_path / "imae-plain"
    distilled = tmp_path / "imae"
    assert (
        run_cli(
            "pretrain", "mae", "--preset", "tiny", "--max-steps", 2, "--out", teacher
        ).returncode
        == 0
    )
    r = run_cli("pretrain", "i-mae", "--preset", "tiny", "--max-steps", 2, "--out", plain)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("no --teacher, so no distillation terms") == 1
    r = run_cli(
        "pretrain",
        "i-mae",
        "--preset",
        "tiny",
        "--max-steps",
        2,
        "--out",
        distilled,
        "--teacher",
        teacher,
    )
    assert r.returncode == 0, r.stderr
    assert "distilling from the frozen MAE teacher" in r.stdout and "no --teacher" not in r.stdout
    ckpt = common.load_checkpoint(distilled)
    assert ckpt["step"] == 2 and not any(k.startswith("teacher") for k in ckpt["model"])
    shutil.rmtree(teacher)  # the i-MAE checkpoint is self-contained: evaluating it needs no teacher
    r = run_cli(
        "separability",
        distilled,
        "--images",
        64,
        "--alphas",
        "0.2,0.4",
        "--json",
        "--reference",
        plain,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["reference"] == str(plain)
    assert [row["alpha"] for row in out["rows"]] == [0.2, 0.4]
    assert out["method"] == "i-mae"
    assert out["images"] == 64
    assert out["separability"] == pytest.approx(sum(row["sub"] for row in out["rows"]) / 2)
    assert out["pixels"] == pytest.approx(sum(row["sub"] for row in out["pixel_rows"]) / 2)
    # the values themselves are checked where the truth is known:
    # test_cli_separability_of_a_linear_encoder_...


def test_cli_separability_of_a_linear_encoder_is_the_closed_form_of_the_pixel_floor(tmp_path):
    """A case with a known answer, through the command line. The mixture of two independent images
    of one distribution is z_mix = α z_sub + (1 − α) z_dom for any linear encoder z = A p (and for
    raw pixels), so the best linear read-out of z_sub is a scalar times z_mix and R² = α² / (α² + (1
    − α)²) (0.059 at α = 0.2, 0.308 at 0.4; the dominant image: (1 − α)² / (α² + (1 − α)²)),
    whatever A is. The checkpoint is an MAE whose encoder is linear in the pixels: patch embedding
    [A p, −A p, K, −K] (zero mean per token, norm fixed by K >> |A p|, so the final LayerNorm only
    rescales), no position embedding, every residual branch zeroed. Margins: the finite-sample
    shrinkage measured at 1,024 images (at most 0.012 below the closed form for this encoder, 0.031
    for pixels)."""
    cfg = cli.resolve(mae, "tiny", None, {})[0]  # 32 px, patch 8: 16 tokens of 192 pixels, 64-d
    state = mae.MAE(cfg).state_dict()
    g = torch.Generator().manual_seed(0)
    A = torch.randn(31, 3, 8, 8, generator=g) / 192**0.5  # 31 random linear read-outs of a patch
    weight = torch.zeros(64, 3, 8, 8)
    bias = torch.zeros(64)
    weight[:31] = A
    weight[31:62] = -A
    bias[62] = 1000.0
    bias[63] = -1000.0
    state.update(
        {
            "patch_embed.proj.weight": weight,
            "patch_embed.proj.bias": bias,
            "pos_embed": torch.zeros_like(state["pos_embed"]),
        }
    )
    for key in state:
        if key.startswith("blocks.") and (".attn.proj." in key or ".mlp.fc2." in key):
            state[key] = torch.zeros_like(state[key])  # each block is the identity
    torch.save(
        {"model": state, "method": "mae", "config": dataclasses.asdict(cfg)}, tmp_path / "linear.pt"
    )
    r = run_cli(
        "separability",
        tmp_path / "linear.pt",
        "--alphas",
        "0.2,0.4",
        "--json",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["images"] == 1024 and out["reference"] == "itself"
    for rows, margin in ((out["rows"], 0.025), (out["pixel_rows"], 0.045)):
        for row in rows:
            a = row["alpha"]
            sub = a**2 / (a**2 + (1 - a) ** 2)
            dom = (1 - a) ** 2 / (a**2 + (1 - a) ** 2)
            assert (
                sub - margin < row["sub"] <= sub + 0.01 and dom - margin < row["dom"] <= dom + 0.01
            ), (row, sub, dom)
    # a linear encoder is exactly as separable as pixels
    assert abs(out["separability"] - out["pixels"]) < 0.04


def test_two_processes_pair_within_their_batches_and_train(tmp_path):
    """On 2 processes each pairs and mixes the images of its own batch, as the official code does:
    the run trains, its held-out loss is summed over uneven shares (65 images: 33 and 32, so rank 1
    has a batch fewer), the picture of --vis-every runs the model on both, rank 0 alone writes."""
    teacher = tmp_path / "mae.pt"
    write_mae_checkpoint(teacher)
    args = ("pretrain", "i-mae", "--preset", "tiny", "--epochs", 1, "--log-every", 1)
    args += ("--teacher", teacher, "--train-size", 16, "--val-size", 65, "--vis-every", 1)
    two = tmp_path / "two"
    r = run_torchrun(*args, "--batch-size", 8, "--out", two)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("distilling from") == 1  # rank 0 alone reports
    rows = [json.loads(line) for line in (two / "log.jsonl").read_text().splitlines()]
    val = [(row["step"], row["val_loss"]) for row in rows if "val_loss" in row]
    assert [step for step, _ in val] == [0, 1] and all(0 < loss < 100 for _, loss in val), val
    assert (two / "vis-epoch0001.png").is_file()
