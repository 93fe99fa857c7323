"""`cli.py export`: our encoders (and official MAE checkpoints) as plain state dicts that timm's
VisionTransformer loads with strict=True and that compute the same features."""

import argparse
import dataclasses

import pytest
import torch
from conftest import run_cli

import cli
import mae
import revcolv2
from evaluation import export, loading

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two-step tiny runs of MAE and of SimMIM (whose encoder also holds a mask token)."""
    root = tmp_path_factory.mktemp("export")
    for method in ("mae", "simmim"):
        args = ["--preset", "tiny", "--max-steps", 2, "--out", root / method]
        r = run_cli("pretrain", method, *args)
        assert r.returncode == 0, r.stdout + r.stderr
    return root


def load_printed_vit(stdout):
    """Run the three lines the command prints for the user; return the timm model they build."""
    lines = stdout.splitlines()
    first = "import functools, timm, torch"
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    code = "\n".join(lines[start : start + 3])
    assert lines[start + 2].startswith("vit.load_state_dict(") and "strict=True" in code
    scope = {}
    exec(code, scope)  # the snippet is what a user would paste
    return scope["vit"]


@pytest.mark.parametrize("method", ["mae", "simmim"])
def test_export_loads_into_timm_and_computes_the_same_features(runs, method):
    r = run_cli("export", runs / method)
    assert r.returncode == 0, r.stdout + r.stderr
    path = runs / method / "encoder_timm.pth"
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    # no decoder, no method-only tensor
    assert not any(k.startswith("decoder") or k == "mask_token" for k in state)
    vit = load_printed_vit(r.stdout).eval()  # strict=True: every timm tensor, nothing else
    assert set(state) == set(vit.state_dict())
    model, _ = loading.load_model(runs / method, cli.method_of)
    imgs = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = vit.forward_features(imgs)  # (B, 1 + N, D) after the final norm, cls token first
        ours = model.eval().forward_features(imgs)  # (B, N, D)
    assert theirs.shape == (3, 1 + ours.shape[1], ours.shape[2])
    assert torch.allclose(theirs[:, 1:], ours, atol=1e-5)


def test_export_of_an_official_mae_checkpoint_keeps_its_tensors(tmp_path):
    """Also: --overwrite replaces a file (without it the file is refused: test_cli_errors.py)."""
    torch.manual_seed(0)
    sizes = dict(img_size=32, patch_size=8, embed_dim=192, depth=2, num_heads=3)
    decoder = dict(decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=16)
    model = mae.MAE(mae.Config(**sizes, **decoder))
    state = model.state_dict()
    encoder = {k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"}
    options = dict(input_size=32, mask_ratio=0.75, norm_pix_loss=True)
    args = argparse.Namespace(model="mae_vit_tiny", **options)
    torch.save({"model": encoder, "args": args, "epoch": 799}, tmp_path / "official.pth")
    (tmp_path / "timm.pth").write_bytes(b"an older export")
    r = run_cli("export", tmp_path / "official.pth", "--out", tmp_path / "timm.pth", "--overwrite")
    assert r.returncode == 0, r.stdout + r.stderr
    # written through a temporary file, then renamed
    assert not (tmp_path / "timm.pth.tmp").exists()
    exported = torch.load(tmp_path / "timm.pth", weights_only=True)
    assert set(exported) == set(encoder)
    assert all(torch.equal(exported[k], encoder[k]) for k in encoder)
    assert "num_heads=3" in r.stdout and "embed_dim=192" in r.stdout


def test_a_model_that_is_not_a_timm_vit_is_refused_in_one_line(tmp_path):
    cfg, _ = cli.resolve(revcolv2, "tiny", None, {})
    model = revcolv2.RevColV2(cfg)
    ckpt = {"model": model.state_dict(), "method": "revcolv2", "config": dataclasses.asdict(cfg)}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    (tmp_path / "encoder_timm.pth").write_bytes(b"an older export")
    r = run_cli("export", tmp_path, "--overwrite")
    assert r.returncode == 2 and "Traceback" not in r.stdout + r.stderr
    (line,) = [line for line in r.stderr.splitlines() if line.strip()]
    assert "not a ViT with timm's VisionTransformer names" in line, r.stderr
    assert (tmp_path / "encoder_timm.pth").read_bytes() == b"an older export"


def test_export_checks_the_features_not_only_the_names():
    """A model with timm's names whose forward_features does something else is refused."""
    torch.manual_seed(0)
    sizes = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)
    decoder = dict(decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    model = mae.MAE(mae.Config(**sizes, **decoder))
    info = {"method": "changed", "needed": loading.feature_param_names(model)[0]}
    # e.g. a scaled output
    model.forward_features = lambda imgs: mae.MAE.forward_features(model, imgs) * 2
    with pytest.raises(ValueError, match="not those of a plain ViT"):
        export.export_timm(model, info, "x.pt")


@pytest.mark.parametrize("method", list(cli.METHODS))
def test_every_method_exports_to_timm_or_is_refused(method):
    """In one process, on a fresh tiny model of each method: a plain-ViT encoder loads into timm and
    gives the same features; any other is refused with the one-line error."""
    import functools

    module, model_cls = cli.METHODS[method]
    cfg, _ = cli.resolve(module, "tiny", None, {})
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    info = {"method": method, "needed": loading.feature_param_names(model)[0]}
    if not any(k.startswith("blocks.0.attn.") for k in model.state_dict()):
        with pytest.raises(ValueError, match="not a ViT with timm's VisionTransformer names") as e:
            export.export_timm(model, info, "x.pt")
        assert "\n" not in str(e.value)
        return
    state, kwargs = export.export_timm(model, info, "x.pt")
    norm = functools.partial(torch.nn.LayerNorm, eps=1e-6)
    vit = timm.models.vision_transformer.VisionTransformer(
        **kwargs, qkv_bias=True, num_classes=0, norm_layer=norm
    ).eval()
    vit.load_state_dict(state, strict=True)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = vit.forward_features(imgs)[:, 1:]  # (B, N, D): the cls token dropped
        assert torch.allclose(theirs, model.forward_features(imgs), atol=1e-5)
