"""mae.py against the official MAE code's conventions: layout, masking, loss, state-dict names,
timm."""

import argparse
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import mae

SMALL = dict(
    img_size=32,
    patch_size=4,
    embed_dim=64,
    depth=2,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=4,
)


def small_model(**overrides):
    torch.manual_seed(0)
    return mae.MAE(mae.Config(**{**SMALL, **overrides}))


def official_patchify(imgs, p):
    """Transcription of the official einsum patchify (models_mae.py), the reference layout."""
    n = imgs.shape[0]
    c = imgs.shape[1]
    h = imgs.shape[2] // p
    x = imgs.reshape(n, c, h, p, h, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * h, p * p * c)


@pytest.mark.parametrize("c", [1, 3])
def test_patchify_matches_official_layout_and_round_trips(c):
    imgs = torch.randn(2, c, 32, 32)
    x = common.patchify(imgs, 8)
    assert x.shape == (2, 16, 8 * 8 * c)
    assert torch.equal(x, official_patchify(imgs, 8))
    assert torch.equal(common.unpatchify(x, 8, c), imgs)


def official_sincos(d, g):
    """The official util/pos_embed.py with cls_token=True, re-derived: meshgrid(w, h) puts the
    column first. (1 + g*g, d), a zero row for the cls token first."""
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    rows = []
    for i in range(g):  # row
        for j in range(g):  # column
            col = j * omega
            row = i * omega
            rows.append(torch.cat([col.sin(), col.cos(), row.sin(), row.cos()]))
    return torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.stack(rows)]).float()


def test_sincos_pos_embed_matches_official_formula():
    assert torch.allclose(
        common.sincos_pos_embed(16, 3, cls_token=True)[0], official_sincos(16, 3), atol=1e-6
    )


def official_block(x, sd, prefix, num_heads):
    """timm's ViT Block, which the official MAE uses, written out on state-dict tensors: pre-norm
    attention (qkv split as (3, heads, head_dim), softmax(q k^T / sqrt(head_dim)) v, proj), then a
    pre-norm GELU MLP."""
    B, T, D = x.shape
    w = lambda name: (sd[f"{prefix}.{name}.weight"], sd[f"{prefix}.{name}.bias"])  # noqa: E731
    hd = D // num_heads
    qkv = F.linear(F.layer_norm(x, (D,), *w("norm1"), eps=1e-6), *w("attn.qkv"))  # (B, T, 3D)
    q, k, v = qkv.reshape(B, T, 3, num_heads, hd).permute(2, 0, 3, 1, 4)  # (B, heads, T, hd) each
    attn = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)  # (B, heads, T, T)
    x = x + F.linear((attn @ v).transpose(1, 2).reshape(B, T, D), *w("attn.proj"))
    hidden = F.gelu(F.linear(F.layer_norm(x, (D,), *w("norm2"), eps=1e-6), *w("mlp.fc1")))
    return x + F.linear(hidden, *w("mlp.fc2"))


def official_encoder(sd, cfg, imgs, noise, mask_ratio):
    """facebookresearch/mae models_mae.py, forward_encoder with random_masking, transcribed onto a
    state dict with plain torch ops. Returns the latent (B, 1 + len_keep, D), mask (B, L) (1 =
    removed) and ids_restore."""
    p = cfg.patch_size
    L = noise.shape[1]
    # patch embedding (Conv2d, kernel = stride = p), position embedding without the cls slot
    # (B, D, h, w)
    x = F.conv2d(imgs, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"][:, 1:]  # (B, L, D), row-major patches
    B, _, D = x.shape
    # random_masking: ascending noise order, the first len_keep kept; ids_restore undoes the shuffle
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    x = x.gather(1, ids_shuffle[:, :len_keep, None].repeat(1, 1, D))  # (B, len_keep, D)
    mask = torch.cat([torch.zeros(B, len_keep), torch.ones(B, L - len_keep)], 1).gather(
        1, ids_restore
    )
    # the cls token gets pos_embed[:, 0]
    cls = (sd["cls_token"] + sd["pos_embed"][:, :1]).expand(B, 1, D)
    x = torch.cat([cls, x], 1)  # (B, 1 + len_keep, D)
    for i in range(cfg.depth):
        x = official_block(x, sd, f"blocks.{i}", cfg.num_heads)
    return F.layer_norm(x, (D,), sd["norm.weight"], sd["norm.bias"], eps=1e-6), mask, ids_restore


def official_decoder(sd, cfg, x, ids_restore):
    """models_mae.py forward_decoder after decoder_embed (x: (B, 1 + len_keep, Dd)): append L + 1 -
    len(x) mask tokens after the visible ones (cls left out), unshuffle with ids_restore, cls back
    in front, decoder_pos_embed, blocks, norm, pred, cls dropped. Returns pred (B, L, p*p*C)."""
    B = x.shape[0]
    L = ids_restore.shape[1]
    Dd = x.shape[2]
    # (B, L, Dd), shuffled order
    seq = torch.cat([x[:, 1:], sd["mask_token"].repeat(B, L + 1 - x.shape[1], 1)], 1)
    seq = seq.gather(1, ids_restore[:, :, None].repeat(1, 1, Dd))  # grid order
    x = torch.cat([x[:, :1], seq], 1) + sd["decoder_pos_embed"]  # (B, 1 + L, Dd)
    for i in range(cfg.decoder_depth):
        x = official_block(x, sd, f"decoder_blocks.{i}", cfg.decoder_num_heads)
    x = F.layer_norm(x, (Dd,), sd["decoder_norm.weight"], sd["decoder_norm.bias"], eps=1e-6)
    return F.linear(x, sd["decoder_pred.weight"], sd["decoder_pred.bias"])[:, 1:]


def official_loss(cfg, imgs, pred, mask):
    """models_mae.py forward_loss: (norm-pix) target, per-patch MSE, mean over the removed
    patches."""
    target = official_patchify(imgs, cfg.patch_size)
    if cfg.norm_pix_loss:
        target = (target - target.mean(-1, keepdim=True)) / (
            target.var(-1, keepdim=True) + 1.0e-6
        ) ** 0.5
    return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


def official_mae(sd, cfg, imgs, noise, mask_ratio):
    """models_mae.py MaskedAutoencoderViT.forward, transcribed: returns loss, pred, mask."""
    latent, mask, ids_restore = official_encoder(sd, cfg, imgs, noise, mask_ratio)
    x = F.linear(latent, sd["decoder_embed.weight"], sd["decoder_embed.bias"])  # decoder_embed
    pred = official_decoder(sd, cfg, x, ids_restore)
    return official_loss(cfg, imgs, pred, mask), pred, mask


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_forward_equals_a_transcription_of_the_official_models_mae(mask_ratio):
    """Our MAE on its own weights against the official forward written out in this file (no method
    of ours is called for the reference): the same pred, mask and loss. Every trainable weight is
    perturbed first, so zero biases or a zero mask token cannot hide a term; the position embeddings
    are the official sin-cos. In float64, so 1e-6 separates a wrong formula from rounding by many
    orders of magnitude."""
    model = small_model(decoder_depth=2).double()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.2 * torch.randn_like(param))
    sd = model.state_dict()
    g = model.cfg.img_size // model.cfg.patch_size
    assert torch.allclose(sd["pos_embed"][0].float(), official_sincos(64, g), atol=1e-6)
    assert torch.allclose(sd["decoder_pos_embed"][0].float(), official_sincos(32, g), atol=1e-6)
    imgs = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    noise = torch.rand(3, g * g)
    with torch.no_grad():
        loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
        loss_ref, pred_ref, mask_ref = official_mae(sd, model.cfg, imgs, noise, mask_ratio)
    assert torch.equal(mask.float(), mask_ref.float()) and pred.dtype == torch.float64
    assert (pred - pred_ref).abs().max() < 1e-6 and abs(loss - loss_ref) < 1e-6 * loss_ref


def test_random_masking_keeps_exact_count_and_noise_reproduces_mask():
    x = torch.randn(4, 64, 8)
    noise = torch.rand(4, 64)
    x_masked, mask, ids_restore = mae.random_masking(x, 0.75, noise)
    assert x_masked.shape == (4, 16, 8)
    assert (mask.sum(1) == 48).all()  # exactly int(N * ratio) removed in every sample
    # the kept tokens are the 16 with the smallest noise, in noise order
    ids_keep = noise.argsort(1)[:, :16]
    assert torch.equal(x_masked, torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 8)))
    assert torch.equal(mask, (noise.argsort(1).argsort(1) >= 16).float())
    assert torch.equal(ids_restore, noise.argsort(1).argsort(1))
    # the same noise gives the same mask, through the whole model too
    model = small_model()
    imgs = torch.randn(4, 3, 32, 32)
    loss1, _, mask1 = model(imgs, noise=noise)
    loss2, _, mask2 = model(imgs, noise=noise)
    assert torch.equal(mask1, mask) and torch.equal(mask2, mask) and loss1 == loss2


def test_loss_ignores_predictions_on_visible_patches():
    model = small_model()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    _, pred, mask = model(imgs, noise=noise)
    pred = pred.detach().requires_grad_()
    loss = model.forward_loss(imgs, pred, mask)
    changed = pred.detach() + 100.0 * (1 - mask)[..., None]  # perturb only visible patches
    assert torch.allclose(model.forward_loss(imgs, changed, mask), loss)
    loss.backward()
    assert (pred.grad[mask == 0] == 0).all() and (pred.grad[mask == 1] != 0).any()


def test_norm_pix_target_formula():
    model = small_model(norm_pix_loss=True)
    imgs = torch.rand(2, 3, 32, 32)
    mask = torch.zeros(2, 64)
    mask[:, ::2] = 1
    patches = official_patchify(imgs, 4)
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True, unbiased=True)
    target = (patches - mean) / torch.sqrt(var + 1e-6)
    # predicting the target exactly: zero loss
    assert model.forward_loss(imgs, target, mask).abs() < 1e-10
    pred = torch.randn(2, 64, 48)
    by_hand = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert torch.allclose(model.forward_loss(imgs, pred, mask), by_hand)
    raw = small_model(norm_pix_loss=False)
    # without norm_pix, raw pixels are the target
    assert raw.forward_loss(imgs, patches, mask).abs() < 1e-10


def official_vit_b_keys():
    """Names and shapes of facebookresearch/mae's mae_vit_base_patch16_dec512d8b state dict."""
    shapes = {
        "cls_token": (1, 1, 768),
        "pos_embed": (1, 197, 768),
        "patch_embed.proj.weight": (768, 3, 16, 16),
        "patch_embed.proj.bias": (768,),
        "norm.weight": (768,),
        "norm.bias": (768,),
        "decoder_embed.weight": (512, 768),
        "decoder_embed.bias": (512,),
        "mask_token": (1, 1, 512),
        "decoder_pos_embed": (1, 197, 512),
        "decoder_norm.weight": (512,),
        "decoder_norm.bias": (512,),
        "decoder_pred.weight": (768, 512),
        "decoder_pred.bias": (768,),
    }
    for prefix, depth, d in (("blocks", 12, 768), ("decoder_blocks", 8, 512)):
        for i in range(depth):
            block = {
                "norm1.weight": (d,),
                "norm1.bias": (d,),
                "attn.qkv.weight": (3 * d, d),
                "attn.qkv.bias": (3 * d,),
                "attn.proj.weight": (d, d),
                "attn.proj.bias": (d,),
                "norm2.weight": (d,),
                "norm2.bias": (d,),
                "mlp.fc1.weight": (4 * d, d),
                "mlp.fc1.bias": (4 * d,),
                "mlp.fc2.weight": (d, 4 * d),
                "mlp.fc2.bias": (d,),
            }
            shapes.update({f"{prefix}.{i}.{k}": v for k, v in block.items()})
    return shapes


def test_state_dict_has_official_vit_b_names_and_shapes():
    model = mae.MAE(mae.Config())  # the defaults are ViT-B/16 with the 512-d, 8-block decoder
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_vit_b_keys()


def test_official_style_checkpoint_loads_strictly(tmp_path):
    """A file shaped like the official ones: {"model": ..., "args": Namespace, "epoch": ...}."""
    source = small_model()
    path = tmp_path / "mae_pretrain_vit_small.pth"
    torch.save(
        {
            "model": source.state_dict(),
            "args": argparse.Namespace(model="mae_vit_base_patch16"),
            "epoch": 799,
        },
        path,
    )
    # weights_only=True, with the official args Namespace allowed
    ckpt = common.load_checkpoint(path)
    target = mae.MAE(mae.Config(**SMALL))
    target.load_state_dict(ckpt["model"], strict=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(source.state_dict().values(), target.state_dict().values())
    )
    # encoder-only files (like mae_pretrain_vit_base.pth): every encoder key is matched, only the
    # decoder is missing
    encoder_only = {
        k: v for k, v in ckpt["model"].items() if not k.startswith(("decoder", "mask_token"))
    }
    missing, unexpected = target.load_state_dict(encoder_only, strict=False)
    assert unexpected == []
    assert missing
    assert all(k.startswith(("decoder", "mask_token")) for k in missing)


def test_encoder_equals_timm_vision_transformer():
    timm = pytest.importorskip("timm")
    model = small_model().eval()
    vit = timm.models.vision_transformer.VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=2,
        num_heads=4,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
    ).eval()
    encoder = {k: v for k, v in model.state_dict().items() if k in vit.state_dict()}
    vit.load_state_dict(encoder, strict=True)  # every timm parameter comes from our encoder
    assert set(encoder) == {
        k for k in model.state_dict() if not k.startswith(("decoder", "mask_token"))
    }
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # (B, 1 + N, D), grid order
        ours = model.forward_encoder(imgs, 0.0, torch.arange(64).expand(2, -1))[0]
        theirs = vit.forward_features(imgs)
        assert torch.allclose(ours, theirs, atol=1e-5)
        assert torch.allclose(model.forward_features(imgs), theirs[:, 1:], atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="mask-ratio"):
        mae.Config(mask_ratio=1.0)
    with pytest.raises(ValueError, match="is not a multiple of --patch-size"):
        mae.MAE(mae.Config(**{**SMALL, "img_size": 30}))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, 32, 32\)"):
        small_model()(torch.randn(2, 3, 28, 28))


def test_one_step_learns_and_only_decoder_targets_masked_patches():
    """Smoke: finite loss, gradients reach the encoder's first weights, one AdamW step lowers the
    loss."""
    model = small_model()
    imgs = torch.randn(8, 3, 32, 32)
    noise = torch.rand(8, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss, pred, mask = model(imgs, noise=noise)
    assert torch.isfinite(loss) and pred.shape == (8, 64, 48) and mask.shape == (8, 64)
    loss.backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    opt.step()
    assert model(imgs, noise=noise)[0] < loss
