"""simmim.py: the official loss normalisation, mask-token substitution, masking granularity, encoder
names."""

import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli

import common
import mae
import simmim

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def official_loss(imgs, x_rec, mask, patch_size, in_chans):
    """microsoft/SimMIM models/simmim.py, SimMIM.forward, on a (B, H/P, W/P) mask."""
    mask = (
        mask.repeat_interleave(patch_size, 1)
        .repeat_interleave(patch_size, 2)
        .unsqueeze(1)
        .contiguous()
    )
    loss_recon = F.l1_loss(imgs, x_rec, reduction="none")
    return (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans


def test_loss_equals_the_official_formula_on_fixed_tensors():
    torch.manual_seed(0)
    model = simmim.SimMIM(simmim.Config(**TINY))
    imgs = torch.randn(3, 3, 32, 32)
    pred = torch.randn(3, 16, 8 * 8 * 3)
    mask = (torch.rand(3, 16) < 0.6).float()
    ours = model.forward_loss(imgs, pred, mask)
    theirs = official_loss(imgs, common.unpatchify(pred, 8), mask.view(3, 4, 4), 8, 3)
    torch.testing.assert_close(ours, theirs)
    # and through the whole model: the head's pixels against the official loss
    loss, pred, mask = model(imgs)
    torch.testing.assert_close(
        loss, official_loss(imgs, common.unpatchify(pred, 8), mask.view(3, 4, 4), 8, 3)
    )
    # masked pixels only: changing the prediction of visible patches does not move the loss
    visible = (mask == 0).unsqueeze(-1)
    torch.testing.assert_close(model.forward_loss(imgs, pred + 5.0 * visible, mask), loss)


def test_mask_token_replaces_masked_patches_only():
    torch.manual_seed(0)
    model = simmim.SimMIM(simmim.Config(**TINY)).eval()
    imgs = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16)
    mask[:, [0, 5, 10, 15]] = 1
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    latent = model.forward_encoder(imgs, mask)
    tokens = seen[0][:, 1:, :]  # (B, N, D), what the first block sees, cls removed
    expected = (model.mask_token + model.pos_embed[:, 1:, :]).expand(2, -1, -1)
    torch.testing.assert_close(tokens[mask.bool()], expected[mask.bool()])
    assert not torch.allclose(tokens[~mask.bool()], expected[~mask.bool()])
    assert seen[0].shape == (2, 17, 64)  # every patch plus the cls token
    # the pixels of masked patches never reach the encoder; those of visible patches do
    noisy = common.patchify(imgs, 8)
    noisy[mask.bool()] = torch.randn_like(noisy[mask.bool()])
    torch.testing.assert_close(model.forward_encoder(common.unpatchify(noisy, 8), mask), latent)
    other = imgs.clone()
    other[:, :, :8, 8:16] += 1.0  # patch 1, visible
    assert not torch.allclose(model.forward_encoder(other, mask), latent)


def test_masking_is_over_mask_patches_upsampled_to_model_patches():
    cfg = simmim.Config()  # ViT-B/16 at 224: 32-px mask patches, ratio 0.6
    assert cfg.mask_patch_size == 32
    mask = simmim.simmim_masking(cfg, torch.rand(4, 49, generator=torch.Generator().manual_seed(0)))
    assert mask.shape == (4, 196)
    assert (mask.sum(1) == 30 * 4).all()  # ceil(49 * 0.6) mask patches of 2 x 2 model patches
    blocks = mask.view(4, 7, 2, 7, 2)
    assert (blocks == blocks[:, :, :1, :, :1]).all()  # constant over each mask patch
    small = simmim.Config(img_size=32, patch_size=4)  # scaled for small images: one model patch
    assert small.mask_patch_size == 4
    with pytest.raises(ValueError, match="--mask-patch-size"):
        simmim.Config(img_size=32, patch_size=4, mask_patch_size=12)


def test_given_mask_is_used_as_is():
    model = simmim.SimMIM(simmim.Config(**TINY))
    mask = torch.zeros(2, 16)
    mask[0, :3] = 1
    mask[1, 7] = 1
    assert torch.equal(model(torch.randn(2, 3, 32, 32), mask=mask)[2], mask)


def test_encoder_names_match_mae_so_the_same_weights_load():
    torch.manual_seed(0)
    teacher = mae.MAE(
        mae.Config(**TINY, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    )
    model = simmim.SimMIM(simmim.Config(**TINY))
    encoder = {
        k: v
        for k, v in teacher.state_dict().items()
        if not k.startswith("decoder") and k != "mask_token"
    }
    ours = {k for k in model.state_dict() if not k.startswith("decoder") and k != "mask_token"}
    assert ours == set(encoder)
    model.load_state_dict(encoder, strict=False)
    imgs = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(
        model.eval().forward_features(imgs), teacher.eval().forward_features(imgs)
    )


def test_cli_pretrain_simmim_two_steps(tmp_path):
    out = tmp_path / "run"
    result = run_cli(
        "pretrain",
        "simmim",
        "--preset",
        "tiny",
        "--max-steps",
        "2",
        "--out",
        out,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and ckpt["method"] == "simmim" and "simmim.py" in ckpt["code"]
