"""i-MAE (imae.py) and our separability metric (separability.py): the mixing rule, the loss terms, the frozen
teacher, and the CLI (`pretrain i-mae`, `--teacher`, `separability`)."""
import dataclasses
import json
import shutil

import pytest
import torch
import torch.nn.functional as F

import cli
import common
import imae
import mae
import separability
from conftest import run_cli


def tiny_config(**overrides):
    return cli.resolve(imae, "tiny", None, overrides)[0]


def batch_inputs(cfg, n, seed=0):
    samples = [imae.sample_inputs(cfg, torch.Generator().manual_seed(seed * 1000 + i)) for i in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


def write_mae_checkpoint(path, **overrides):
    """A `pretrain mae`-style checkpoint of a tiny, randomly initialised MAE."""
    cfg = cli.resolve(mae, "tiny", None, overrides)[0]
    torch.manual_seed(1)
    model = mae.MAE(cfg)
    torch.save({"model": model.state_dict(), "method": "mae", "config": dataclasses.asdict(cfg)}, path)
    return model


# ---------------------------------------------------------------------------------------------------------------
# mixing and pairing


def test_lambda_is_one_uniform_draw_per_batch_and_mixing_follows_the_rule():
    lams = []
    for seed in range(2000):
        pairing = torch.rand(8, 3, generator=torch.Generator().manual_seed(seed))
        _, lam = imae.pair_up(pairing, torch.zeros(8, dtype=torch.long), 0.0)
        assert lam.ndim == 0 and lam.item() == pytest.approx(pairing[pairing[:, 0].argmin(), 2].item())
        lams.append(lam.item())
    lams = torch.tensor(lams)
    hist = torch.histc(lams, bins=4, min=0, max=1) / len(lams)  # U[0, 1]: a quarter in each quarter
    assert (hist - 0.25).abs().max() < 0.04 and lams.min() >= 0 and lams.max() <= 1
    imgs, imgs_b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    for lam in (0.0, 0.2, 0.5, 0.7, 1.0):
        imgs_mix, x_sub, x_dom = imae.mix(imgs, imgs_b, torch.tensor(lam))
        alpha = min(lam, 1 - lam)  # the subordinate image's weight
        assert alpha <= 0.5
        torch.testing.assert_close(imgs_mix, lam * imgs + (1 - lam) * imgs_b)
        torch.testing.assert_close(imgs_mix, alpha * x_sub + (1 - alpha) * x_dom)
        assert torch.equal(x_sub, imgs if lam < 0.5 else imgs_b) and torch.equal(x_dom, imgs_b if lam < 0.5 else imgs)


def test_partners_are_a_random_cycle_fixed_by_the_draws_and_independent_of_batch_order():
    g = torch.Generator().manual_seed(0)
    pairing, labels = torch.rand(12, 3, generator=g), torch.randint(0, 3, (12,), generator=g)
    partner, lam = imae.pair_up(pairing, labels, 0.0)
    assert sorted(partner.tolist()) == list(range(12)) and (partner != torch.arange(12)).all()
    seen, i = [], 0  # one cycle through the whole batch: every image is once subordinate-or-dominant partner
    while i not in seen:
        seen.append(i)
        i = partner[i].item()
    assert len(seen) == 12
    perm = torch.randperm(12, generator=g)  # the same samples in another order (e.g. gathered from 2 processes)
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
    partner_half = torch.stack([imae.pair_up(torch.rand(10, 3, generator=g), labels, 0.5)[0] for _ in range(400)])
    same = (labels[partner_half] == labels)[:, ~lone].float().mean()
    assert 0.5 < same < 0.75  # 0.5 by the coin, plus random partners that happen to share the class


# ---------------------------------------------------------------------------------------------------------------
# the loss and the teacher


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
    model.prepare_pretrain(messages.append)
    return model, messages


def test_loss_is_both_reconstructions_plus_both_distillation_terms(student_and_teacher):
    model, messages = student_and_teacher
    cfg, B = model.cfg, 6
    assert model.teacher is not None and any("distilling" in m for m in messages)
    imgs, labels = torch.randn(B, 3, cfg.img_size, cfg.img_size), torch.arange(B) % 3
    inputs = batch_inputs(cfg, B)
    loss, pred, mask = model(imgs, labels=labels, **inputs)
    # the same computation, written out from the rule
    partner, lam = imae.pair_up(inputs["pairing"], labels, cfg.same_class_prob)
    imgs_mix, x_sub, x_dom = imae.mix(imgs, imgs[partner], lam)
    latent, mask_, ids_restore = model.forward_encoder(imgs_mix, cfg.mask_ratio, inputs["noise"])
    h_sub, h_dom = model.decoder_embed1(latent), model.decoder_embed2(latent)
    pred_sub, pred_dom = model.forward_decoder(h_sub, ids_restore), model.forward_decoder(h_dom, ids_restore)
    terms = [norm_pix_masked_mse(pred_sub, x_sub, mask, cfg.patch_size),
             norm_pix_masked_mse(pred_dom, x_dom, mask, cfg.patch_size),
             F.mse_loss(h_sub, model.teacher(x_sub, cfg.mask_ratio, inputs["noise"])),
             F.mse_loss(h_dom, model.teacher(x_dom, cfg.mask_ratio, inputs["noise"]))]
    assert torch.equal(mask, mask_) and all(t > 1e-3 for t in terms)
    torch.testing.assert_close(loss, sum(terms), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pred, pred_sub if lam < 0.5 else pred_dom)  # the reconstruction of imgs itself
    # the teacher sees the clean images under the student's mask, not the mixture
    assert not torch.allclose(model.teacher(x_sub, cfg.mask_ratio, inputs["noise"]),
                              model.teacher(imgs_mix, cfg.mask_ratio, inputs["noise"]))
    # without a teacher the distillation terms vanish and the reconstructions stay
    object.__setattr__(model, "teacher", None)
    torch.testing.assert_close(model(imgs, labels=labels, **inputs)[0], terms[0] + terms[1], rtol=1e-5, atol=1e-6)


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
    model.prepare_pretrain(lambda message: None)
    state, ref = model.state_dict(), teacher_mae.state_dict()
    assert all(torch.equal(state[k], ref[k]) for k in state if not k.startswith("decoder_embed"))
    for head in ("decoder_embed1", "decoder_embed2"):
        assert torch.equal(state[f"{head}.weight"], ref["decoder_embed.weight"])


def test_teacher_that_does_not_match_names_the_difference(tmp_path):
    write_mae_checkpoint(tmp_path / "mae.pt", patch_size=4)
    with pytest.raises(ValueError, match=r"patch_size 4 \(this run 8\)"):
        imae.IMAE(tiny_config(teacher=str(tmp_path / "mae.pt"))).prepare_pretrain(print)
    official = write_mae_checkpoint(tmp_path / "official.pth").state_dict()  # official layout: {"model", "args"}
    import argparse

    torch.save({"model": official, "args": argparse.Namespace(model="mae_vit_custom_patch8")}, tmp_path / "official.pth")
    model = imae.IMAE(tiny_config(teacher=str(tmp_path / "official.pth")))
    model.prepare_pretrain(print)  # architecture read off the state dict
    assert torch.equal(model.teacher.decoder_embed.weight, official["decoder_embed.weight"])
    with pytest.raises(ValueError, match="--init-from-teacher needs --teacher"):
        tiny_config(init_from_teacher=True)
    with pytest.raises(ValueError, match="--same-class-prob"):
        tiny_config(same_class_prob=1.5)


# ---------------------------------------------------------------------------------------------------------------
# the separability metric


def test_separability_is_high_for_separable_latents_and_low_for_entangled_ones():
    g = torch.Generator().manual_seed(0)
    M, N, D = 400, 4, 16
    z_sub, z_dom = torch.randn(M, N, D, generator=g), torch.randn(M, N, D, generator=g)
    rotation = torch.linalg.qr(torch.randn(2 * D, 2 * D, generator=g))[0]
    separable = torch.cat([z_sub, z_dom], -1) @ rotation  # both images intact, in mixed-up directions
    entangled = 0.3 * z_sub + 0.7 * z_dom  # summed in the same directions, as raw pixels are
    fit, test = torch.arange(M // 2), torch.arange(M // 2, M)
    good = separability.linear_separability(separable, z_sub, z_dom, fit, test)
    bad = separability.linear_separability(entangled, z_sub, z_dom, fit, test)
    assert good["sub"] > 0.99 and good["dom"] > 0.99
    assert bad["sub"] < 0.25 and bad["sub"] == pytest.approx(0.3**2 / (0.3**2 + 0.7**2), abs=0.05)
    assert bad["dom"] > 0.75  # the dominant image is most of the mixture


# ---------------------------------------------------------------------------------------------------------------
# the command line


def test_cli_pretrain_i_mae_with_and_without_teacher_and_separability(tmp_path):
    teacher, plain, distilled = tmp_path / "mae", tmp_path / "imae-plain", tmp_path / "imae"
    assert run_cli("pretrain", "mae", "--preset", "tiny", "--max-steps", 2, "--out", teacher).returncode == 0
    r = run_cli("pretrain", "i-mae", "--preset", "tiny", "--max-steps", 2, "--out", plain)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("without the two distillation terms") == 1
    r = run_cli("pretrain", "i-mae", "--preset", "tiny", "--max-steps", 2, "--out", distilled, "--teacher", teacher)
    assert r.returncode == 0, r.stderr
    assert "distilling from the frozen MAE teacher" in r.stdout and "without the two" not in r.stdout
    ckpt = common.load_checkpoint(distilled)
    assert ckpt["step"] == 2 and not any(k.startswith("teacher") for k in ckpt["model"])
    shutil.rmtree(teacher)  # the i-MAE checkpoint is self-contained: evaluating it needs no teacher
    r = run_cli("separability", distilled, "--images", 64, "--alphas", "0.2,0.4", "--json", "--reference", plain)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["reference"] == str(plain)
    assert [row["alpha"] for row in out["rows"]] == [0.2, 0.4] and out["method"] == "i-mae" and out["images"] == 64
    assert -1 < out["separability"] < 1 and -1 < out["pixels"] < 1
    assert out["separability"] == pytest.approx(sum(row["sub"] for row in out["rows"]) / 2)


@pytest.mark.slow
def test_two_processes_pair_mix_and_train_exactly_as_one(tmp_path):
    """Partners and λ come from the whole gathered batch, so 2 processes x 8 images = 1 process x 16."""
    import os
    import socket
    import subprocess
    import sys

    from conftest import ROOT

    teacher = tmp_path / "mae.pt"
    write_mae_checkpoint(teacher)
    args = ("pretrain", "i-mae", "--preset", "tiny", "--epochs", 1, "--train-size", 128, "--log-every", 1,
            "--teacher", teacher, "--same-class-prob", 0.5)
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(*args, "--batch-size", 16, "--out", one).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", port, "cli.py", *args, "--batch-size", 8, "--out", two]
    r = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("distilling from") == 1  # rank 0 alone reports

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines() if '"loss"' in line]

    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 8 and all(abs(x - y) < 1e-5 for x, y in zip(a, b)), (a, b)
