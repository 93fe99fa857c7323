"""Evaluation: finetune, linprobe, knn, visualize, the results table, official checkpoints, bad input."""

import argparse
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, ForkedCli, run_cli, run_torchrun

import cli
import common
import data_sets
import mae
from evaluation import evaluate
from experiments import results

TINY = {k: v for k, v in common.PRESETS["tiny"].items() if k in mae.Config.__dataclass_fields__}
FAST = ["--train-size", "64", "--val-size", "32", "--num-workers", "0"]


@pytest.fixture(scope="module")
def cli_run():
    """run_cli's twin: `python cli.py ARGS` as a process of its own, forked from one that has imported cli.py, so
    the ~3-6 s import of torch is paid once for the module's commands (conftest.ForkedCli)."""
    with ForkedCli() as server:
        yield server.run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cli_run):
    """One epoch of the tiny preset (8 steps) with a reconstruction picture at the end of the epoch."""
    out = tmp_path_factory.mktemp("eval") / "run"
    r = cli_run("pretrain", "mae", "--preset", "tiny", "--epochs", "1", "--vis-every", "1", "--out", out)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def read_result(folder):
    result = json.loads((Path(folder) / "result.json").read_text())
    assert (Path(folder) / "config.json").is_file() and result["git"]
    assert (Path(folder) / "code" / "evaluate.py").is_file() and (
        Path(folder) / "code" / "pretrain" / "mae.py"
    ).is_file()
    return result


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def read_log(folder):
    """The epoch rows of a result folder's log.jsonl (those with validation numbers), in order."""
    rows = [json.loads(line) for line in (Path(folder) / "log.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if "top1" in row]


def write_folder(root, draw, classes, sizes=(("train", 16), ("val", 8)), seed=0):
    """A tiny ImageFolder of 32-px PNGs, root/{train,val}/<class>/<i>.png; draw(k, generator) -> (3, 32, 32) in
    [0, 1] is an image of class k."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, n in sizes:
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                img = (draw(k, g).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


def colour_image(k, g):  # red, green, blue or yellow, a random tint and a little pixel noise
    base = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1]])[k].view(3, 1, 1)
    return 0.7 * base + 0.3 * torch.rand(3, 1, 1, generator=g) + 0.05 * torch.randn(3, 32, 32, generator=g)


def grain_image(k, g):  # a flat random colour, smooth (0) or grainy (1): the colour, which varies most, is no clue
    return 0.2 + 0.6 * torch.rand(3, 1, 1, generator=g) + 0.25 * k * torch.randn(3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Four classes that differ by colour: any encoder's features separate them, so a head that learns, learns."""
    return write_folder(tmp_path_factory.mktemp("colours"), colour_image, ("red", "green", "blue", "yellow"))


COLOURS = ["--data", "folder", "--train-size", "0", "--val-size", "0", "--num-workers", "0"]


@pytest.fixture(scope="module")
def knn_results(tiny_run, cli_run):
    """knn of the tiny run, and of a random-init encoder of its architecture (seed 1)."""
    for extra in ([], ["--random-init", "--seed", "1"]):
        r = cli_run("knn", tiny_run, *FAST, *extra)
        assert r.returncode == 0, r.stdout + r.stderr
    return tiny_run / "eval"


def test_knn_cli_and_random_init(knn_results):
    trained = read_result(knn_results / "knn-patterns-s0")
    floor = read_result(knn_results / "knn-random-init-patterns-s1")
    assert trained["metrics"]["val_images"] == 32 and trained["metrics"]["train_images"] == 64
    assert 0 <= trained["metrics"]["top1"] <= trained["metrics"]["top5"] <= 1
    assert trained["pretraining"].startswith("1 ep x 256 img") and floor["pretraining"] == "none (random init)"
    assert trained["encoder"] == floor["encoder"] and floor["seed"] == 1


def test_knn_sees_what_training_taught_the_encoder(tmp_path, cli_run):
    """Smooth or grainy flat colours: the features of a random-init encoder follow the colour, which is no
    clue, so its kNN is near chance; the same encoder after 100 supervised steps on the grain (in this
    process: the fastest way to give a tiny ViT a real feature) must score far above it. Both through the CLI;
    the floor is the trained encoder's own init (seed 0)."""
    import dataclasses

    import torch.nn.functional as F

    data = write_folder(tmp_path / "grain", grain_image, ("smooth", "grainy"), (("train", 32), ("val", 32)))
    train = data_sets.load_dataset("folder", "train", data)
    tf = data_sets.transform("folder", 32, False)  # the images as knn sees them
    imgs, labels = torch.stack([tf(img) for img, _ in train]), torch.tensor([label for _, label in train])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: faster on one thread, the more so on a shared machine
    try:
        torch.manual_seed(0)
        model = mae.MAE(mae.Config(**TINY))
        clf = evaluate.Classifier(model, model.cfg.embed_dim, 2)
        optimizer = torch.optim.AdamW(clf.parameters(), lr=3e-3)
        for _ in range(100):
            idx = torch.randint(0, len(imgs), (32,))
            loss = F.cross_entropy(clf(imgs[idx]), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    (tmp_path / "run").mkdir()
    torch.save(
        {
            "model": model.state_dict(),
            "method": "mae",
            "config": dataclasses.asdict(model.cfg),
            "train": {"data": "folder", "data_dir": str(data)},
            "code": {"mae.py": Path(mae.__file__).read_text()},
        },
        tmp_path / "run" / "checkpoint.pt",
    )
    for extra in ([], ["--random-init"]):
        r = cli_run("knn", tmp_path / "run", "--num-workers", "0", *extra)
        assert r.returncode == 0, r.stdout + r.stderr
    trained = read_result(tmp_path / "run" / "eval" / "knn-folder-s0")["metrics"]
    floor = read_result(tmp_path / "run" / "eval" / "knn-random-init-folder-s0")["metrics"]
    assert trained["train_images"] == 64 and trained["val_images"] == 64  # chance: 0.5
    # (measured, 5 seeds of data and init: floor 0.48-0.64, trained 0.84-1.0)
    assert floor["top1"] <= 0.75 and trained["top1"] >= 0.8 and trained["top1"] >= floor["top1"] + 0.2, (trained, floor)


@pytest.fixture(scope="module")
def probes(tiny_run, colours, tmp_path_factory, cli_run):
    """linprobe of the tiny run on the colours, 4 epochs of 4 steps, without and with --augment (the same seed)."""
    out = tmp_path_factory.mktemp("probes")
    for name, extra in (("plain", []), ("augment", ["--augment"])):
        r = cli_run(
            "linprobe",
            tiny_run,
            *COLOURS,
            "--data-dir",
            colours,
            "--epochs",
            "4",
            "--warmup-epochs",
            "0",
            "--batch-size",
            "16",
            "--blr",
            "1",
            *extra,
            "--out",
            out / name,
        )
        assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_linprobe_cli(probes):
    """The probe learns: its training loss falls far below that of a head that guesses (ln 4), its accuracy is
    far above chance (0.25), and its saved weights are far from their init (trunc normal, std 0.01)."""
    result, log = read_result(probes / "plain"), read_log(probes / "plain")
    assert [row["epoch"] for row in log] == [1, 2, 3, 4] and log[-1]["top1"] == result["metrics"]["top1"]
    assert result["settings"] == "linear probe 4 ep" and result["metrics"]["train_images"] == 64
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"] and log[-1]["train_loss"] < 0.2 * math.log(4), log
    assert result["metrics"]["top1"] >= 0.9, log
    head = torch.load(probes / "plain" / "probe.pt", weights_only=True)["probe"]["head.weight"]  # (4, D)
    assert head.shape == (4, 64) and head.std() > 0.05


def test_linprobe_augment(probes):
    """--augment runs, logs every epoch and is marked; with the same seed (the same probe init and batch order)
    only its new crops every epoch tell it from the plain run, so every epoch's training loss differs."""
    result, log, plain = read_result(probes / "augment"), read_log(probes / "augment"), read_log(probes / "plain")
    assert [row["epoch"] for row in log] == [1, 2, 3, 4] and log[-1]["top1"] == result["metrics"]["top1"]
    assert result["settings"] == "linear probe 4 ep, augmented" and (probes / "augment" / "probe.pt").is_file()
    assert all(a["train_loss"] != b["train_loss"] for a, b in zip(log, plain)), (log, plain)
    assert result["metrics"]["top1"] >= 0.9 and log[-1]["train_loss"] < 0.5 * log[0]["train_loss"], log


def test_finetune_cli_with_ema(tiny_run, tmp_path, cli_run):
    """One step per epoch, and the warm-up starts at lr 0, so step 1 leaves the weights at their start p0 and
    step 2 moves them to p2: the EMA with decay 0.9 is then exactly 0.9 p0 + 0.1 p2 (whether it starts from the
    weights after step 1, as torch's AveragedModel, or from the initial ones, as timm's ModelEma)."""
    r = cli_run(
        "finetune",
        tiny_run,
        "--train-size",
        "32",
        "--val-size",
        "32",
        "--num-workers",
        "0",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--warmup-epochs",
        "1",
        "--blr",
        "5e-2",
        "--ema",
        "0.9",
        "--out",
        tmp_path / "ft",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    result = read_result(tmp_path / "ft")
    log = read_log(tmp_path / "ft")
    assert [row["step"] for row in log] == [1, 2]  # 32 images / 32 per step, 2 epochs
    assert all(0 <= row["top1"] <= row["top5"] <= 1 and 0 <= row["ema_top1"] <= row["ema_top5"] <= 1 for row in log)
    ckpt = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)
    start = torch.load(tiny_run / "checkpoint.pt", weights_only=False)["model"]
    live, ema = ckpt["model"], ckpt["ema"]
    for name in ("blocks.0.attn.qkv.weight", "norm.weight"):  # the encoder was trained (Adam: ~lr = 6e-3 per weight)
        assert (live[name] - start[name]).abs().mean() > 5e-4, name
    for name in live:  # trained and frozen weights alike (decoder, buffers)
        assert torch.allclose(ema[f"encoder.{name}"], 0.9 * start[name] + 0.1 * live[name], atol=1e-6, rtol=0), name
    fc_norm = ckpt["head"]["fc_norm"]  # the head's LayerNorm starts at weight 1, bias 0
    assert torch.allclose(ema["fc_norm.weight"], 0.9 + 0.1 * fc_norm["weight"], atol=1e-6, rtol=0)
    assert torch.allclose(ema["fc_norm.bias"], 0.1 * fc_norm["bias"], atol=1e-6, rtol=0)
    # the EMA numbers are the EMA's: the same weights as the live ones after step 1, others after step 2
    assert log[0]["ema_val_loss"] == pytest.approx(log[0]["val_loss"], abs=1e-6)
    assert log[1]["ema_val_loss"] != pytest.approx(log[1]["val_loss"], abs=1e-5)
    assert result["metrics"]["ema_top1"] == log[1]["ema_top1"]
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["model_config"]["drop_path"] == 0.1
    # the fine-tuned encoder is a checkpoint of ours: the other evaluations read it
    model, info = evaluate.load_model(tmp_path / "ft", cli.method_of)
    assert info["ckpt"]["head"]["head"]["weight"].shape == (10, model.cfg.embed_dim)
    assert evaluate.pretraining_summary(info)[0].startswith("fine-tuned 2 ep")


def test_pretraining_time_of_a_resumed_run_sums_its_parts(tmp_path):
    """The result's pre-train time is the run's training time; a --resume restarts the logged clock (elapsed_s), so
    a run killed after epoch 3 and resumed to epoch 5 took the first part's 30 s plus the second's 25 s."""
    rows = [dict(step=0, val_loss=1.0), dict(step=1, loss=1.0)]
    rows += [dict(step=s, epoch=s, elapsed_s=t, val_loss=0.5) for s, t in [(1, 10.0), (2, 20.0), (3, 30.0)]]
    rows += [dict(step=s, epoch=s, elapsed_s=t, val_loss=0.5) for s, t in [(4, 12.5), (5, 25.0)]]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = dict(official=False, run_dir=tmp_path, train=dict(train_size=64, batch_size=8), ckpt={})
    assert evaluate.pretraining_summary(info) == ("5 ep x 64 img, batch 8", 55.0)
    rows = rows[:5]  # not resumed: its last time
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert evaluate.pretraining_summary(info) == ("3 ep x 64 img, batch 8", 30.0)


def test_finetune_learns_a_learnable_task(tiny_run, colours, tmp_path, cli_run):
    """3 epochs of 4 steps on the colours (no mixup, cutmix, RandAugment or erasing, to learn fast): far above
    chance (0.25), and the validation loss falls well below that of a head that guesses (ln 4)."""
    r = cli_run(
        "finetune",
        tiny_run,
        *COLOURS,
        "--data-dir",
        colours,
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--warmup-epochs",
        "0",
        "--blr",
        "3e-2",
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--randaug-n",
        "0",
        "--reprob",
        "0",
        "--smoothing",
        "0",
        "--out",
        tmp_path / "ft",
    )
    assert r.returncode == 0, r.stdout + r.stderr
    result, log = read_result(tmp_path / "ft"), read_log(tmp_path / "ft")
    assert [row["epoch"] for row in log] == [1, 2, 3] and result["metrics"]["top1"] == log[-1]["top1"]
    assert result["metrics"]["top1"] >= 0.9, log
    assert log[-1]["val_loss"] < min(log[0]["val_loss"] - 0.1, 0.75 * math.log(4)), log


def test_visualize_cli_writes_png_of_the_right_size(tiny_run, tmp_path, cli_run):
    r = cli_run("visualize", tiny_run, "--num-images", "3", "--out", tmp_path / "v.png", *FAST)
    assert r.returncode == 0, r.stdout + r.stderr
    # 3 rows x 4 columns of 32-px images enlarged 4x (the default: about 128 px), 2 px apart, under a header of text
    width, height = png_size(tmp_path / "v.png")
    assert width == 4 * 128 + 5 * 2 and 3 * 128 + 4 * 2 + 24 <= height <= 3 * 128 + 4 * 2 + 64, (width, height)
    from PIL import Image

    Image.open(tmp_path / "v.png").verify()  # the whole file decodes
    # the pretraining hook drew the same kind of picture at the end of the epoch (8 rows), with the same header
    assert png_size(tiny_run / "vis-epoch0001.png") == (width, height + 5 * (128 + 2))


def test_visualize_masks_are_seedable_and_norm_pix_is_labelled():
    torch.manual_seed(0)
    model = mae.MAE(mae.Config(**TINY, in_chans=3))
    data = data_sets.load_dataset("patterns", "val", size=4, img_size=32)
    draw = cli.bound_inputs(mae, model.cfg)
    cols0, note = evaluate.reconstructions(model, data, "patterns", 32, draw, n=4, seed=0)
    cols0b, _ = evaluate.reconstructions(model, data, "patterns", 32, draw, n=4, seed=0)
    cols1, _ = evaluate.reconstructions(model, data, "patterns", 32, draw, n=4, seed=1)
    assert torch.equal(cols0[1][1], cols0b[1][1]) and not torch.equal(cols0[1][1], cols1[1][1])
    assert "TRUE mean and std" in note  # norm_pix_loss is on: de-normalised with the true statistics
    _, raw_note = evaluate.reconstructions(model, data, "patterns", 32, draw, n=4, seed=0, norm_pix="raw")
    assert "normalised space" in raw_note
    # the columns against a mask the test chooses: every image keeps the 4 patches of least noise (mask ratio
    # 0.75), here patches 1, 4, 6 and 15 of the 4 x 4 grid of 8-px patches (row-major)
    noise = torch.ones(16)
    noise[[1, 4, 6, 15]] = 0
    columns, _ = evaluate.reconstructions(model, data, "patterns", 32, lambda g: {"noise": noise}, n=4)
    (label, original), (_, masked), (_, recon), (_, pasted) = columns[:4]
    assert label == "original" and columns[1][0] == "masked (75%)"
    visible = torch.zeros(32, 32, dtype=torch.bool)
    for j in (1, 4, 6, 15):
        visible[8 * (j // 4) : 8 * (j // 4 + 1), 8 * (j % 4) : 8 * (j % 4 + 1)] = True
    images = torch.stack([data[i][0] for i in range(4)])  # (4, 3, 32, 32): the raw images, in [0, 1]
    assert torch.allclose(original, images, atol=1e-5)
    assert torch.allclose(masked[..., visible], images[..., visible], atol=1e-5)
    assert (masked[..., ~visible] == 0.5).all()  # masked patches grey
    assert torch.allclose(pasted[..., visible], images[..., visible], atol=1e-5)  # recon + the visible patches
    assert torch.equal(pasted[..., ~visible], recon[..., ~visible])
    assert (recon - images).abs()[..., visible].mean() > 0.05  # (so the pasting shows: an untrained model's guess)


def test_boolean_inputs_are_drawn_as_an_overlay():
    model = mae.MAE(mae.Config(**TINY))
    data = data_sets.load_dataset("patterns", "val", size=2, img_size=32)

    thrown = torch.zeros(16, dtype=torch.bool)
    thrown[[1, 2]] = True  # patches 1 and 2: the first row, second and third columns

    def draw(generator):  # a method whose per-sample inputs include a boolean (N,) tensor
        return {**mae.sample_inputs(model.cfg, generator), "thrown": thrown}

    model.forward = lambda imgs, noise, thrown: mae.MAE.forward(model, imgs, noise=noise)
    columns, _ = evaluate.reconstructions(model, data, "patterns", 32, draw, n=2)
    assert [c[0] for c in columns][-1] == "thrown (red)" and len(columns) == 5
    masked, overlay = columns[1][1], columns[-1][1]
    where = torch.zeros(32, 32, dtype=torch.bool)
    where[:8, 8:24] = True
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)
    assert torch.equal(overlay[..., ~where], masked[..., ~where])
    assert torch.allclose(overlay[..., where], 0.4 * masked[..., where] + 0.6 * red, atol=1e-6)


def test_finetune_crops_keep_at_least_min_crop_of_the_image():
    """--min-crop 1: every training crop is the whole image, flipped or not; the official 0.08 zooms in."""
    img = torch.rand(3, 32, 32)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data_sets.DATASETS["patterns"][1])
    whole = (img - mean) / std

    def is_whole(min_crop):
        fcfg = evaluate.FinetuneConfig(min_crop=min_crop, randaug_n=0, reprob=0)
        tf = evaluate.finetune_transform("patterns", 32, fcfg)
        torch.manual_seed(0)
        crops = [tf(img) for _ in range(16)]
        return [any(torch.allclose(c, w, atol=1e-4) for w in (whole, whole.flip(-1))) for c in crops]

    assert all(is_whole(1.0)) and not any(is_whole(0.08))


def test_layer_decay_assigns_the_documented_lr_to_each_block():
    depth, decay = 3, 0.5
    model = mae.MAE(mae.Config(**{**TINY, "depth": depth}))
    needed, _ = evaluate.feature_param_names(model)
    for name, p in model.named_parameters():  # as run_finetune: the decoder is not fine-tuned
        p.requires_grad_(name in needed)
    clf = evaluate.Classifier(model, model.cfg.embed_dim, 8)
    groups = evaluate.layer_decay_groups(clf, 0.05, decay)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    for i in range(depth):  # block i learns at lr * decay ** (depth - i)
        assert scale[f"encoder.blocks.{i}.attn.qkv.weight"] == decay ** (depth - i)
        assert scale[f"encoder.blocks.{i}.norm1.bias"] == decay ** (depth - i)
    for name in ("encoder.patch_embed.proj.weight", "encoder.cls_token"):
        assert scale[name] == decay ** (depth + 1)
    for name in ("encoder.norm.weight", "fc_norm.weight", "head.weight", "head.bias"):
        assert scale[name] == 1.0
    decayed = {name for g in groups if g["weight_decay"] for name in g["names"]}
    assert "head.weight" in decayed and "head.bias" not in decayed and "encoder.cls_token" not in decayed


def test_layer_decay_continues_through_the_columns_a_model_uses_for_its_features():
    import revcolv2  # its features run the top-down columns (decoder_blocks) after the bottom-up ones (blocks)

    decay = 0.5
    model = revcolv2.RevColV2(revcolv2.Config(img_size=32, patch_size=8, embed_dim=32, num_heads=2))
    needed, dim = evaluate.feature_param_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in needed)
    groups = evaluate.layer_decay_groups(evaluate.Classifier(model, dim, 8), 0.05, decay)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    depth = model.cfg.encoder_columns + model.cfg.decoder_columns  # 2 + 2 columns, one layer each
    assert scale["encoder.patch_embed.proj.weight"] == decay ** (depth + 1)
    for j in range(model.cfg.encoder_columns):
        assert all(v == decay ** (depth - j) for k, v in scale.items() if k.startswith(f"encoder.blocks.{j}."))
    for j in range(model.cfg.decoder_columns):
        col = model.cfg.encoder_columns + j
        assert all(
            v == decay ** (depth - col) for k, v in scale.items() if k.startswith(f"encoder.decoder_blocks.{j}.")
        )
    assert scale["head.weight"] == 1.0


def test_knn_recovers_labels_of_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 10
    labels = torch.arange(500) % 5
    feats = centres[labels] + torch.randn(500, 32, generator=g)
    train, test = slice(0, 400), slice(400, 500)
    scores = evaluate.knn_scores(feats[train], labels[train], feats[test], 5, k=20, temperature=0.07)
    assert evaluate.accuracy(scores, labels[test])[0] == 1.0
    shuffled = labels[train][torch.randperm(400, generator=g)]  # the same features, labels scrambled
    scores = evaluate.knn_scores(feats[train], shuffled, feats[test], 5)
    assert evaluate.accuracy(scores, labels[test])[0] < 0.5


def official_checkpoint(path, full=False):
    """A checkpoint in the official MAE format: {"model": state dict, "args": Namespace}."""
    cfg = mae.Config(
        img_size=32,
        patch_size=8,
        embed_dim=192,
        depth=2,
        num_heads=3,
        decoder_embed_dim=64,
        decoder_depth=1,
        decoder_num_heads=16,
    )
    model = mae.MAE(cfg)
    state = {k: v for k, v in model.state_dict().items() if full or not (k.startswith("decoder") or k == "mask_token")}
    args = argparse.Namespace(model="mae_vit_tiny", input_size=32, mask_ratio=0.75, norm_pix_loss=True, epochs=800)
    torch.save({"model": state, "args": args, "epoch": 799}, path)
    return model


def test_official_encoder_only_checkpoint(tmp_path, cli_run):
    ours = official_checkpoint(tmp_path / "official.pth")
    loaded, info = evaluate.load_model(tmp_path / "official.pth", cli.method_of, "mae")
    assert info["official"] and loaded.cfg.embed_dim == 192 and loaded.cfg.num_heads == 3 and loaded.cfg.depth == 2
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.allclose(loaded.eval().forward_features(imgs), ours.eval().forward_features(imgs), atol=1e-6)
    r = cli_run("knn", tmp_path / "official.pth", "--data", "patterns", *FAST, "--out", tmp_path / "knn")
    assert r.returncode == 0, r.stdout + r.stderr
    assert json.loads((tmp_path / "knn" / "result.json").read_text())["pretraining"] == "official checkpoint"
    full = official_checkpoint(tmp_path / "full.pth", full=True)  # official *_full.pth: with the decoder
    loaded, _ = evaluate.load_model(tmp_path / "full.pth", cli.method_of, "mae", need_all=True)
    assert loaded.cfg.decoder_depth == 1 and loaded.cfg.decoder_embed_dim == 64 and loaded.cfg.norm_pix_loss is True
    noise = torch.rand(2, 16)
    assert torch.equal(loaded.eval()(imgs, noise=noise)[1], full.eval()(imgs, noise=noise)[1])
    r = cli_run("visualize", tmp_path / "official.pth", "--data", "patterns", *FAST)
    assert (
        r.returncode == 2 and "lacks weights of the whole model" in r.stderr and "Traceback" not in r.stdout + r.stderr
    )


def test_bad_input_gets_a_clear_error(tiny_run):
    """(The command-line cases are in tests/test_cli_errors.py.)"""
    model, info = evaluate.load_model(tiny_run, cli.method_of)
    with pytest.raises(ValueError, match=r"fashion-mnist has 1 channel\(s\) but the model takes 3"):
        evaluate.eval_datasets(evaluate.EvalConfig(data="fashion-mnist"), info)
    with pytest.raises(ValueError, match="--k"):
        evaluate.KnnConfig(k=0)
    with pytest.raises(ValueError, match="has no field 'nonsense'"):
        evaluate.load_model(tiny_run, cli.method_of, overrides={"nonsense": 1})


def fake_result(method, data, seed, top1, random_init=False, command="knn"):
    return {
        "command": command,
        "method": method,
        "data": data,
        "seed": seed,
        "random_init": random_init,
        "encoder": "0.10M params, 32 px",
        "pretraining": "none (random init)" if random_init else "4 ep x 4,096 img",
        "settings": "kNN k=20, T=0.07",
        "metrics": {"top1": top1},
        "wall_s": 60.0,
        "pretrain_wall_s": 120.0,
        "machine": "test machine",
    }


def test_results_table_and_readme(tmp_path):
    found = [fake_result("mae", "patterns", s, t) for s, t in enumerate([0.5, 0.6, 0.7])]
    found += [fake_result("mae", "patterns", s, 0.2, random_init=True) for s in range(3)]
    text = results.table(found)
    assert (
        "| mae | patterns | 0.10M params, 32 px | 4 ep x 4,096 img | kNN k=20, T=0.07 | 60.0 ± 10.0 | 20.0 ± 0.0 | 3 (0, 1, 2) | 2.0 min | 1.0 min | test machine |"  # noqa: E501
        in text
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{results.BEGIN}\nold\n{results.END}\noutro\n")
    other = [fake_result("simmim", "patterns", 0, 0.9)]
    results.update_readme(readme, other)
    results.update_readme(readme, found)  # adding a method keeps the rows of the other
    body = readme.read_text()
    assert body.startswith("intro\n") and body.endswith("outro\n") and "| simmim |" in body and "60.0 ± 10.0" in body
    results.update_readme(readme, found, fresh=True)
    assert "| simmim |" not in readme.read_text()


def test_results_tool_reads_result_folders(knn_results, tmp_path):
    r = subprocess.run(
        [sys.executable, "experiments/results.py", knn_results], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("knn-patterns-s0", "knn-random-init-patterns-s1"):  # one row: the trained number beside its floor
        top1 = json.loads((knn_results / name / "result.json").read_text())["metrics"]["top1"]
        assert f"| {100 * top1:.1f} |" in r.stdout
    with pytest.raises(ValueError, match="does not exist"):
        results.collect([tmp_path / "nothing-here"])


@pytest.mark.skipif(not data_sets.FASHION_MNIST_DEBIAN.is_dir(), reason="needs `apt install dataset-fashion-mnist`")
def test_random_init_encoder_evaluates_worse_than_a_briefly_trained_one(tmp_path):
    """The evaluation must see training. The briefly trained encoder here is trained for 150 steps with
    labels (the fastest way to give a tiny ViT real features on CPU; see README.md#results for what a
    short MAE gives); both are saved as checkpoints of ours and go through knn and linprobe. Fashion-MNIST,
    because on `patterns` 150 steps on 512 images learn next to nothing that holds on held-out images."""
    import dataclasses
    import io

    import torch.nn.functional as F
    from rich.console import Console

    torch.manual_seed(0)
    model = mae.MAE(mae.Config(**{**TINY, "in_chans": 1}))
    train = data_sets.load_dataset("fashion-mnist", "train", size=512, img_size=32)
    tf = data_sets.transform("fashion-mnist", 32, False)
    imgs, labels = torch.stack([tf(train[i][0]) for i in range(512)]), torch.tensor([train[i][1] for i in range(512)])
    clf = evaluate.Classifier(model, model.cfg.embed_dim, 10)
    optimizer = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    for _ in range(150):
        idx = torch.randint(0, 512, (64,))
        loss = F.cross_entropy(clf(imgs[idx]), labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ckpt = {
        "model": model.state_dict(),
        "method": "mae",
        "config": dataclasses.asdict(model.cfg),
        "train": {"data": "fashion-mnist", "train_size": 512, "val_size": 256},
    }
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    top1 = {}
    for random_init in (False, True):
        loaded, info = evaluate.load_model(tmp_path, cli.method_of, random_init=random_init)
        ecfg = evaluate.EvalConfig(random_init=random_init, num_workers=0, out=str(tmp_path / f"knn{random_init}"))
        knn, _ = evaluate.run_knn(loaded, info, ecfg, evaluate.KnnConfig(), [], Console(file=io.StringIO()))
        ecfg.out = str(tmp_path / f"probe{random_init}")
        probe, _ = evaluate.run_linprobe(
            loaded, info, ecfg, evaluate.LinprobeConfig(epochs=20, warmup_epochs=2), [], Console(file=io.StringIO())
        )
        top1[random_init] = knn["metrics"]["top1"], probe["metrics"]["top1"]
    assert top1[False][0] > top1[True][0] + 0.05, top1  # knn
    assert top1[False][1] > top1[True][1] + 0.05, top1  # linear probe


@pytest.mark.slow
def test_finetune_on_two_processes_matches_one(tiny_run, tmp_path):
    """torchrun with 2 processes x 16 images = 1 process x 32: the same samples, crops and weights (gloo, CPU)."""

    plain = [
        "--train-size",
        "64",
        "--val-size",
        "32",
        "--num-workers",
        "0",
        "--epochs",
        "2",
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--drop-path",
        "0",
        "--reprob",
        "0",
        "--blr",
        "1e-2",
        "--warmup-epochs",
        "0",
    ]
    r = run_cli("finetune", tiny_run, *plain, "--batch-size", "32", "--out", tmp_path / "one")
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_torchrun("finetune", tiny_run, *plain, "--batch-size", "16", "--out", tmp_path / "two", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    one, two = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two"))
    start = torch.load(tiny_run / "checkpoint.pt", weights_only=False)["model"]
    assert (
        one["model"]["blocks.0.attn.qkv.weight"] - start["blocks.0.attn.qkv.weight"]
    ).abs().max() > 1e-3  # it trained
    for name in one["model"]:
        assert torch.allclose(one["model"][name], two["model"][name], atol=1e-5), name
    assert torch.allclose(one["head"]["head"]["weight"], two["head"]["head"]["weight"], atol=1e-5)


def test_knn_and_linprobe_on_raw_pixels(tiny_run, cli_run, tmp_path):
    """--pixels: the normalised pixels of the same images as features (the floor of no encoder). kNN's top-1 equals a
    brute-force weighted kNN written here (cosine similarity, the 20 nearest vote with exp(sim / 0.07))."""
    r = cli_run("knn", tiny_run, "--pixels", "--out", tmp_path / "knn")
    assert r.returncode == 0, r.stdout + r.stderr
    result = read_result(tmp_path / "knn")
    assert result["method"] == "raw pixels" and result["encoder"].startswith("3,072 values")
    tf = data_sets.transform("patterns", 32, train=False)
    splits = [data_sets.load_dataset("patterns", s, size=n, img_size=32) for s, n in (("train", 256), ("val", 64))]
    (train_x, train_y), (val_x, val_y) = [
        (
            torch.stack([tf(ds[i][0]).flatten() for i in range(len(ds))]),
            torch.tensor([ds[i][1] for i in range(len(ds))]),
        )
        for ds in splits
    ]
    hits = 0
    for x, y in zip(val_x, val_y):
        sim = torch.nn.functional.cosine_similarity(train_x, x[None], dim=1)
        votes = {}
        for i in sim.argsort(descending=True)[:20].tolist():
            votes[int(train_y[i])] = votes.get(int(train_y[i]), 0.0) + math.exp(sim[i].item() / 0.07)
        hits += max(votes, key=votes.get) == int(y)
    assert result["metrics"]["top1"] == pytest.approx(hits / len(val_y))
    r = cli_run("linprobe", tiny_run, "--pixels", "--epochs", "3", "--out", tmp_path / "probe")
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_result(tmp_path / "probe")["pretraining"] == "none (raw pixels)"
