"""pr_mim.py: what the decoder sees, the reduction to MAE at throw 0, furthest sampling, loss
coverage, bad throw values, and the CLI as the design card types it. Then its fork
experiments/pr_mim_simmim.py (PR-MIM on SimMIM, Sec. 4.2): what the encoder sees, the reduction to
SimMIM, loss coverage, bad values, and `pretrain` and `bench` on the file's path."""

import importlib.util
import json

import pytest
import torch
from conftest import ROOT, ForkedCli, drawn_inputs, run_cli

import common
import mae
import pr_mim
import simmim

spec = importlib.util.spec_from_file_location(
    "pr_mim_simmim", ROOT / "experiments" / "pr_mim_simmim.py"
)
pr_mim_simmim = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pr_mim_simmim)

# ViT-B/16's 14 x 14 grid with narrow widths, so a forward pass costs milliseconds
GRID14 = dict(
    img_size=224,
    patch_size=16,
    embed_dim=32,
    depth=1,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=4,
)
TINY = dict(
    img_size=32,
    patch_size=4,
    embed_dim=32,
    depth=1,
    num_heads=4,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=4,
)


def decoder_input_lengths(model, imgs, **inputs):
    seen = []
    hook = model.decoder_blocks[0].register_forward_hook(
        lambda m, args, out: seen.append(args[0].shape)
    )
    model(imgs, **inputs)
    hook.remove()
    return seen[0]


def test_decoder_sees_98_patch_tokens_plus_cls_at_throw_half_mask_three_quarters():
    model = pr_mim.PRMIM(pr_mim.Config(**GRID14, throw=0.5, mask_ratio=0.75))
    assert decoder_input_lengths(model, torch.randn(2, 3, 224, 224)) == (2, 1 + 98, 32)
    for throw, seen in [(0.0, 196), (0.25, 196 - 49), (0.65, 196 - 127), (0.75, 49)]:
        model = pr_mim.PRMIM(pr_mim.Config(**GRID14, throw=throw))
        assert decoder_input_lengths(model, torch.randn(2, 3, 224, 224)) == (2, 1 + seen, 32), throw


def test_decoder_sees_exactly_the_visible_and_retained_tokens():
    """Tag each decoder position by its position embedding: the tokens the decoder gets are those
    neither thrown nor missing, in grid order."""
    torch.manual_seed(0)
    model = pr_mim.PRMIM(pr_mim.Config(**GRID14))
    inputs = drawn_inputs(pr_mim, model.cfg, 2)
    noise = inputs["noise"]
    thrown = inputs["thrown"]
    with torch.no_grad():
        model.decoder_embed.weight.zero_()
        model.decoder_embed.bias.zero_()
        model.mask_token.zero_()  # every token is now its position embedding alone
    seen = []
    model.decoder_blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    model(torch.randn(2, 3, 224, 224), noise=noise, thrown=thrown)
    for b in range(2):
        expected = model.decoder_pos_embed[0, 1:][~thrown[b]]  # (N_dec, D_dec), grid order
        torch.testing.assert_close(seen[0][b, 1:], expected)


def test_throw_zero_reduces_to_mae_on_the_same_weights_and_noise():
    torch.manual_seed(0)
    reference = mae.MAE(mae.Config(**TINY))
    model = pr_mim.PRMIM(pr_mim.Config(**TINY, throw=0.0))
    model.load_state_dict(reference.state_dict())  # strict: throw 0 has exactly MAE's parameters
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 64)
    loss, pred, mask = model(imgs, noise=noise)
    loss_ref, pred_ref, mask_ref = reference(imgs, noise=noise)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(pred, pred_ref)
    assert torch.equal(mask, mask_ref)


def min_pairwise_distance(kept, grid):
    coords = torch.stack(
        torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1
    ).reshape(-1, 2)
    points = coords[kept].float()
    d = torch.cdist(points, points) + torch.eye(len(points)) * 1e9
    return d.min().item()


def test_furthest_sampling_count_determinism_and_spread():
    cfg = pr_mim.Config(**GRID14)
    noise = torch.rand(20, 196, generator=torch.Generator().manual_seed(0))
    masks = mae.random_masking(torch.zeros(20, 196, 1), 0.75, noise)[1]  # (20, 196)

    def draws(seed):
        return torch.rand(20, 2, 196, generator=torch.Generator().manual_seed(seed))

    thrown = pr_mim.throw_tokens(masks, 147 - 98, "furthest", draws(1))  # 49 of 147 retained
    assert thrown.dtype == torch.bool and (thrown.sum(1) == 98).all()
    assert not (thrown & (masks == 0)).any()  # only masked tokens are thrown
    assert torch.equal(thrown, pr_mim.throw_tokens(masks, 49, "furthest", draws(1)))
    assert not torch.equal(thrown, pr_mim.throw_tokens(masks, 49, "furthest", draws(2)))
    rand = pr_mim.throw_tokens(masks, 49, "random", draws(1))
    assert (rand.sum(1) == 98).all() and not (rand & (masks == 0)).any()
    kept_far = masks.bool() & ~thrown
    kept_rand = masks.bool() & ~rand
    far = sum(min_pairwise_distance(k, 14) for k in kept_far) / 20
    near = sum(min_pairwise_distance(k, 14) for k in kept_rand) / 20
    # furthest: retained tokens never side by side (>= sqrt 2); random: often
    assert far > near + 0.3, (far, near)
    # sample_inputs masks as the model does and hands over a boolean (B, N) `thrown`
    inputs = drawn_inputs(pr_mim, cfg, 3)
    assert inputs["thrown"].shape == (3, 196) and inputs["thrown"].dtype == torch.bool
    model_mask = mae.random_masking(torch.zeros(3, 196, 1), 0.75, inputs["noise"])[1]
    assert (inputs["thrown"].sum(1) == 98).all() and not (
        inputs["thrown"] & (model_mask == 0)
    ).any()


def batch_inputs(module, cfg, batch_size):
    return drawn_inputs(module, cfg, batch_size)


def supervised_tokens(model, module, imgs):
    """(thrown, masked, supervised): (B, N) bool each, supervised where the loss has a gradient
    w.r.t. pred."""
    inputs = batch_inputs(module, model.cfg, imgs.shape[0])
    loss, pred, mask = model(imgs, **inputs)
    pred = pred.detach().requires_grad_()
    model.forward_loss(imgs, pred, mask, inputs["thrown"]).backward()
    return inputs["thrown"], mask.bool(), pred.grad.abs().sum(-1) > 0


def test_loss_covers_every_masked_token_with_progressive_and_retained_ones_without():
    for progressive in (True, False):
        torch.manual_seed(0)
        model = pr_mim.PRMIM(pr_mim.Config(**TINY, progressive=progressive))
        thrown, masked, supervised = supervised_tokens(model, pr_mim, torch.randn(2, 3, 32, 32))
        assert thrown.any() and (masked & ~thrown).any()
        expected = masked if progressive else masked & ~thrown
        assert torch.equal(supervised, expected), progressive


def test_bad_throw_values_give_clear_errors():
    for throw in (-0.1, 0.8, 1.5):
        with pytest.raises(ValueError, match=r"--throw must be in \[0, 0.75\]"):
            pr_mim.Config(throw=throw)
    with pytest.raises(ValueError, match="leaves no token"):
        pr_mim.Config(throw=0.75, progressive=False)
    for bad in (dict(sampling="nearest"), dict(kernel_size=4)):
        with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
            pr_mim.Config(**bad)


def test_cli_pretrain_pr_mim_throw_half_as_typed(tmp_path):
    """The design card's command on the default preset and built-in data (its data worker draws the
    furthest sampling), with a 2-step budget, a small batch and a small held-out set to run in
    seconds."""
    out = tmp_path / "run"
    result = run_cli(
        "pretrain",
        "pr-mim",
        "--throw",
        "0.5",
        "--max-steps",
        "2",
        "--batch-size",
        "16",
        "--val-size",
        "32",
        "--out",
        out,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert ckpt["config"]["throw"] == 0.5
    assert ckpt["config"]["sampling"] == "furthest"
    bad = run_cli(
        "pretrain", "pr-mim", "--preset", "tiny", "--throw", "0.9", "--out", tmp_path / "bad"
    )
    assert bad.returncode == 2 and "--throw must be in [0, 0.75]" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_kernel_size_and_no_progressive_reach_the_checkpoint_and_change_the_model(tmp_path):
    """`--kernel-size 3` and `--no-progressive` as typed: each lands in the checkpoint's config and
    changes the model it trained: a 3 x 3 depth-wise conv (one filter per decoder channel) instead
    of the default 7 x 7, and no conv at all without progressive reconstruction (so the loss covers
    only the retained tokens: the in-process semantics are
    test_loss_covers_every_masked_token_with_progressive_and_retained_ones_without)."""
    # the defaults these options change
    assert pr_mim.Config().kernel_size == 7 and pr_mim.Config().progressive
    runs = {"k3": ("--kernel-size", 3), "plain": ("--no-progressive",)}
    with ForkedCli() as cli_:  # `python cli.py ARGS` in a process of its own, the imports paid once
        for name, options in runs.items():
            result = cli_.run(
                "pretrain",
                "pr-mim",
                "--preset",
                "tiny",
                "--max-steps",
                1,
                "--train-size",
                32,
                "--batch-size",
                16,
                "--val-size",
                16,
                *options,
                "--out",
                tmp_path / name,
            )
            assert result.returncode == 0, result.stderr + result.stdout
    k3, plain = (common.load_checkpoint(tmp_path / name) for name in runs)
    assert k3["step"] == plain["step"] == 1
    assert k3["config"]["kernel_size"] == 3 and k3["config"]["progressive"] is True
    width = k3["config"]["decoder_embed_dim"]
    assert k3["model"]["spatial_aggregation.weight"].shape == (width, 1, 3, 3)
    assert plain["config"]["progressive"] is False and plain["config"]["kernel_size"] == 7
    assert not any(k.startswith("spatial_aggregation") for k in plain["model"])
    assert set(k3["model"]) - set(plain["model"]) == {
        "spatial_aggregation.weight",
        "spatial_aggregation.bias",
    }


# --- the fork experiments/pr_mim_simmim.py: PR-MIM on SimMIM (PR-MIM Sec. 4.2, Tab. 4) ---
SIMMIM_GRID14 = dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=4)
SIMMIM_TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=4)


def test_simmim_fork_encoder_sees_exactly_the_visible_and_retained_tokens():
    """Mask 0.6 and throw 0.5 on the 14 x 14 grid: the encoder gets the cls token and the 98 tokens
    neither thrown nor masked-and-thrown, in grid order. Tagged by the position embedding alone:
    patch embedding and mask token zeroed, so each token the first block gets is its own position's
    embedding."""
    torch.manual_seed(0)
    model = pr_mim_simmim.SimMIM(pr_mim_simmim.Config(**SIMMIM_GRID14))
    assert model.cfg.mask_ratio == 0.6 and model.cfg.mask_patch_size == 32
    inputs = batch_inputs(pr_mim_simmim, model.cfg, 2)
    # ceil(49 * 0.6) mask patches of 2 x 2 model patches
    assert (inputs["mask"].sum(1) == 120).all()
    assert (inputs["thrown"].sum(1) == 98).all()
    assert not (inputs["thrown"] & (inputs["mask"] == 0)).any()
    with torch.no_grad():
        for p in (model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.mask_token):
            p.zero_()
    seen = []
    model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(args[0]))
    loss, pred, mask = model(torch.randn(2, 3, 224, 224), **inputs)
    assert seen[0].shape == (2, 1 + 98, 32)
    assert pred.shape == (2, 196, 16 * 16 * 3)
    assert torch.isfinite(loss)
    for b in range(2):
        torch.testing.assert_close(seen[0][b, 1:], model.pos_embed[0, 1:][~inputs["thrown"][b]])


def test_simmim_fork_throw_zero_reduces_to_simmim_on_the_same_weights_and_mask():
    torch.manual_seed(0)
    reference = simmim.SimMIM(simmim.Config(**SIMMIM_TINY))
    model = pr_mim_simmim.SimMIM(pr_mim_simmim.Config(**SIMMIM_TINY, throw=0.0))
    model.load_state_dict(reference.state_dict())  # strict: throw 0 has exactly SimMIM's parameters
    imgs = torch.randn(3, 3, 32, 32)
    mask_patches = (reference.cfg.img_size // reference.cfg.mask_patch_size) ** 2
    mask = simmim.simmim_masking(reference.cfg, torch.rand(3, mask_patches))
    loss, pred, _ = model(imgs, mask=mask)
    loss_ref, pred_ref, _ = reference(imgs, mask=mask)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(pred, pred_ref)
    torch.testing.assert_close(model.forward_features(imgs), reference.forward_features(imgs))


def test_simmim_fork_loss_covers_every_masked_token_with_progressive_and_retained_ones_without():
    for progressive in (True, False):
        torch.manual_seed(0)
        model = pr_mim_simmim.SimMIM(pr_mim_simmim.Config(**SIMMIM_TINY, progressive=progressive))
        thrown, masked, supervised = supervised_tokens(
            model, pr_mim_simmim, torch.randn(2, 3, 32, 32)
        )
        assert thrown.any() and (masked & ~thrown).any()
        expected = masked if progressive else masked & ~thrown
        assert torch.equal(supervised, expected), progressive


def test_simmim_fork_bad_values_give_clear_errors():
    for throw in (-0.1, 0.65):
        with pytest.raises(ValueError, match=r"--throw must be in \[0, 0.6\]"):
            pr_mim_simmim.Config(throw=throw)
    with pytest.raises(ValueError, match="leaves no token"):
        pr_mim_simmim.Config(throw=0.6, progressive=False)
    for bad in (dict(sampling="nearest"), dict(kernel_size=4), dict(mask_patch_size=24)):
        with pytest.raises(ValueError, match="--" + next(iter(bad)).replace("_", "-")):
            pr_mim_simmim.Config(**bad)


def test_cli_pretrain_simmim_fork_by_path(tmp_path):
    """`pretrain experiments/pr_mim_simmim.py`: the fork trains from its path, and its checkpoint
    holds the fork's model (the depth-wise conv of the encoder's width), config and code."""
    out = tmp_path / "run"
    result = run_cli(
        "pretrain",
        "experiments/pr_mim_simmim.py",
        "--preset",
        "tiny",
        "--max-steps",
        "2",
        "--batch-size",
        "16",
        "--val-size",
        "16",
        "--out",
        out,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2
    assert ckpt["config"]["throw"] == 0.5
    assert ckpt["config"]["mask_ratio"] == 0.6
    width = ckpt["config"]["embed_dim"]
    assert ckpt["model"]["spatial_aggregation.weight"].shape == (width, 1, 7, 7)
    assert "pr_mim_simmim.py" in ckpt["code"]


def test_cli_bench_simmim_fork_by_path_against_simmim():
    """The README's "SimMIM + PR-MIM" rows at the tiny preset: SimMIM first, then the fork's default
    and the rows of --vary. Throwing half of all tokens halves the encoder's (1 + 8 tokens instead
    of 1 + 16 on the 4 x 4 grid; the head still runs on all 16, hence above 0.5), a quarter saves
    less, the conv costs a little."""
    result = run_cli(
        "bench",
        "experiments/pr_mim_simmim.py",
        "--compare",
        "simmim",
        "--preset",
        "tiny",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "1",
        "--json",
        "--vary",
        "throw=0.25; progressive=false",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    rows = [r for r in json.loads(result.stdout)]
    assert len(rows) == 4 and rows[0]["name"] == "simmim", [r["name"] for r in rows]
    assert rows[2]["name"].endswith("throw=0.25") and rows[3]["name"].endswith("progressive=False")
    # simmim, throw 0.5 (default), throw 0.25, throw 0.5 without the conv
    g = [r["gflops"] for r in rows]
    assert 0.5 < g[1] / g[0] < 0.7 and g[1] < g[2] < g[0] and g[3] < g[1]
    assert rows[1]["saved_mb"] < rows[0]["saved_mb"]
