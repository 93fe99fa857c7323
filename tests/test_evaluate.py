"""Evaluation: finetune, linprobe, knn, visualize, the results table, official checkpoints, bad
input, and the layer-wise learning-rate decay as the optimiser sees it."""

import argparse
import json
import math
import struct
from pathlib import Path

import pytest
import torch
from conftest import ForkedCli, run_cli, run_torchrun

import cli
import common
import data_sets
import mae
from evaluation import finetune, loading, pictures, probes, result_folders, tables

TINY = {k: v for k, v in common.PRESETS["tiny"].items() if k in mae.Config.__dataclass_fields__}
FAST = ["--train-size", "64", "--val-size", "32", "--num-workers", "0"]


@pytest.fixture(scope="module")
def cli_run():
    """run_cli's twin: `python cli.py ARGS` as a process of its own, forked from one that has
    imported cli.py, so the ~3-6 s import of torch is paid once for the module's commands
    (conftest.ForkedCli)."""
    with ForkedCli() as server:
        yield server.run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cli_run):
    """One epoch of the tiny preset (8 steps) with a reconstruction picture at its end."""
    out = tmp_path_factory.mktemp("eval") / "run"
    args = ["--preset", "tiny", "--epochs", "1", "--vis-every", "1", "--out", out]
    r = cli_run("pretrain", "mae", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


def read_result(folder):
    result = json.loads((Path(folder) / "result.json").read_text())
    assert (Path(folder) / "config.json").is_file() and result["git"]
    code = Path(folder) / "code"
    assert (code / "loading.py").is_file() and (code / "result_folders.py").is_file()
    assert (code / "pretrain" / "mae.py").is_file()
    return result


def png_size(path):
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def read_log(folder):
    """The epoch rows of a result folder's log.jsonl (those with validation numbers), in order."""
    lines = (Path(folder) / "log.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [row for row in rows if "top1" in row]


def write_folder(root, draw, classes, sizes=(("train", 16), ("val", 8)), seed=0):
    """A tiny ImageFolder of 32-px PNGs, root/{train,val}/<class>/<i>.png; draw(k, generator) ->
    (3, 32, 32) in [0, 1] is an image of class k."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for split, n in sizes:
        for k, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = (draw(k, g).clamp(0, 1) * 255).round().to(torch.uint8)
                img = pixels.permute(1, 2, 0).numpy()  # (32, 32, 3)
                Image.fromarray(img).save(root / split / name / f"{i}.png")
    return root


COLOUR_BASES = [[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1]]


def colour_image(k, g):  # red, green, blue or yellow, a random tint and a little pixel noise
    base = torch.tensor(COLOUR_BASES[k]).view(3, 1, 1)
    tint = torch.rand(3, 1, 1, generator=g)
    return 0.7 * base + 0.3 * tint + 0.05 * torch.randn(3, 32, 32, generator=g)


def grain_image(k, g):  # a flat random colour, smooth (0) or grainy (1): the colour is no clue
    colour = torch.rand(3, 1, 1, generator=g)
    return 0.2 + 0.6 * colour + 0.25 * k * torch.randn(3, 32, 32, generator=g)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    """Four classes that differ by colour: any encoder's features separate them, so a head that
    learns, learns."""
    classes = ("red", "green", "blue", "yellow")
    return write_folder(tmp_path_factory.mktemp("colours"), colour_image, classes)


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
    assert trained["pretraining"].startswith("1 ep x 256 img")
    assert floor["pretraining"] == "none (random init)"
    assert trained["encoder"] == floor["encoder"] and floor["seed"] == 1


def test_knn_sees_what_training_taught_the_encoder(tmp_path, cli_run):
    """Smooth or grainy flat colours: the features of a random-init encoder follow the colour, which
    is no clue, so its kNN is near chance; the same encoder after 100 supervised steps on the grain
    (in this process: the fastest way to give a tiny ViT a real feature) must score far above it.
    Both through the CLI; the floor is the trained encoder's own init (seed 0)."""
    import dataclasses

    import torch.nn.functional as F

    sizes = (("train", 32), ("val", 32))
    data = write_folder(tmp_path / "grain", grain_image, ("smooth", "grainy"), sizes)
    train = data_sets.load_dataset("folder", "train", data)
    tf = data_sets.transform("folder", 32, False)  # the images as knn sees them
    imgs = torch.stack([tf(img) for img, _ in train])
    labels = torch.tensor([label for _, label in train])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: faster on one thread, the more so on a shared machine
    try:
        torch.manual_seed(0)
        model = mae.MAE(mae.Config(**TINY))
        clf = finetune.Classifier(model, model.cfg.embed_dim, 2)
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
    assert floor["top1"] <= 0.75 and trained["top1"] >= 0.8, (trained, floor)
    assert trained["top1"] >= floor["top1"] + 0.2, (trained, floor)


@pytest.fixture(scope="module")
def linprobe_runs(tiny_run, colours, tmp_path_factory, cli_run):
    """linprobe of the tiny run on the colours, 4 epochs of 4 steps, without and with --augment
    (the same seed)."""
    out = tmp_path_factory.mktemp("probes")
    recipe = ["--epochs", "4", "--warmup-epochs", "0", "--batch-size", "16", "--blr", "1"]
    for name, extra in (("plain", []), ("augment", ["--augment"])):
        args = [*COLOURS, "--data-dir", colours, *recipe, *extra, "--out", out / name]
        r = cli_run("linprobe", tiny_run, *args)
        assert r.returncode == 0, r.stdout + r.stderr
    return out


def test_linprobe_cli(linprobe_runs):
    """The probe learns: its training loss falls far below that of a head that guesses (ln 4), its
    accuracy is far above chance (0.25), and its saved weights are far from their init (trunc
    normal, std 0.01)."""
    result = read_result(linprobe_runs / "plain")
    log = read_log(linprobe_runs / "plain")
    assert [row["epoch"] for row in log] == [1, 2, 3, 4]
    assert log[-1]["top1"] == result["metrics"]["top1"]
    assert result["settings"] == "linear probe 4 ep" and result["metrics"]["train_images"] == 64
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"], log
    assert log[-1]["train_loss"] < 0.2 * math.log(4), log
    assert result["metrics"]["top1"] >= 0.9, log
    probe = torch.load(linprobe_runs / "plain" / "probe.pt", weights_only=True)["probe"]
    head = probe["head.weight"]  # (4, D)
    assert head.shape == (4, 64) and head.std() > 0.05


def test_linprobe_augment(linprobe_runs):
    """--augment runs, logs every epoch and is marked; with the same seed (the same probe init and
    batch order) only its new crops every epoch tell it from the plain run, so every epoch's
    training loss differs."""
    result = read_result(linprobe_runs / "augment")
    log = read_log(linprobe_runs / "augment")
    plain = read_log(linprobe_runs / "plain")
    assert [row["epoch"] for row in log] == [1, 2, 3, 4]
    assert log[-1]["top1"] == result["metrics"]["top1"]
    assert result["settings"] == "linear probe 4 ep, augmented"
    assert (linprobe_runs / "augment" / "probe.pt").is_file()
    assert all(a["train_loss"] != b["train_loss"] for a, b in zip(log, plain)), (log, plain)
    assert result["metrics"]["top1"] >= 0.9, log
    assert log[-1]["train_loss"] < 0.5 * log[0]["train_loss"], log


def test_finetune_cli_with_ema(tiny_run, tmp_path, cli_run):
    """One step per epoch, and the warm-up starts at lr 0, so step 1 leaves the weights at their
    start p0 and step 2 moves them to p2: the EMA with decay 0.9 is then exactly 0.9 p0 + 0.1 p2
    (whether it starts from the weights after step 1, as torch's AveragedModel, or from the initial
    ones, as timm's ModelEma)."""
    data = ["--train-size", "32", "--val-size", "32", "--num-workers", "0"]
    recipe = ["--epochs", "2", "--batch-size", "32", "--warmup-epochs", "1", "--blr", "5e-2"]
    r = cli_run("finetune", tiny_run, *data, *recipe, "--ema", "0.9", "--out", tmp_path / "ft")
    assert r.returncode == 0, r.stdout + r.stderr
    result = read_result(tmp_path / "ft")
    log = read_log(tmp_path / "ft")
    assert [row["step"] for row in log] == [1, 2]  # 32 images / 32 per step, 2 epochs
    assert all(0 <= row["top1"] <= row["top5"] <= 1 for row in log)
    assert all(0 <= row["ema_top1"] <= row["ema_top5"] <= 1 for row in log)
    ckpt = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)
    start = torch.load(tiny_run / "checkpoint.pt", weights_only=False)["model"]
    live = ckpt["model"]
    ema = ckpt["ema"]
    for name in ("blocks.0.attn.qkv.weight", "norm.weight"):  # trained (Adam: ~lr = 6e-3 each)
        assert (live[name] - start[name]).abs().mean() > 5e-4, name
    for name in live:  # trained and frozen weights alike (decoder, buffers)
        average = 0.9 * start[name] + 0.1 * live[name]
        assert torch.allclose(ema[f"encoder.{name}"], average, atol=1e-6, rtol=0), name
    fc_norm = ckpt["head"]["fc_norm"]  # the head's LayerNorm starts at weight 1, bias 0
    assert torch.allclose(ema["fc_norm.weight"], 0.9 + 0.1 * fc_norm["weight"], atol=1e-6, rtol=0)
    assert torch.allclose(ema["fc_norm.bias"], 0.1 * fc_norm["bias"], atol=1e-6, rtol=0)
    # the EMA numbers are the EMA's: the live weights after step 1, others after step 2
    assert log[0]["ema_val_loss"] == pytest.approx(log[0]["val_loss"], abs=1e-6)
    assert log[1]["ema_val_loss"] != pytest.approx(log[1]["val_loss"], abs=1e-5)
    assert result["metrics"]["ema_top1"] == log[1]["ema_top1"]
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["model_config"]["drop_path"] == 0.1
    # the fine-tuned encoder is a checkpoint of ours: the other evaluations read it
    model, info = loading.load_model(tmp_path / "ft", cli.method_of)
    assert info["ckpt"]["head"]["head"]["weight"].shape == (10, model.cfg.embed_dim)
    assert result_folders.pretraining_summary(info)[0].startswith("fine-tuned 2 ep")


def test_pretraining_time_of_a_resumed_run_sums_its_parts(tmp_path):
    """The result's pre-train time is the run's training time; a --resume restarts the logged clock
    (elapsed_s), so a run killed after epoch 3 and resumed to epoch 5 took the first part's 30 s
    plus the second's 25 s."""
    rows = [dict(step=0, val_loss=1.0), dict(step=1, loss=1.0)]
    clock = [(1, 10.0), (2, 20.0), (3, 30.0), (4, 12.5), (5, 25.0)]  # (epoch, elapsed_s)
    rows += [dict(step=s, epoch=s, elapsed_s=t, val_loss=0.5) for s, t in clock]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = dict(official=False, run_dir=tmp_path, train=dict(train_size=64, batch_size=8), ckpt={})
    assert result_folders.pretraining_summary(info) == ("5 ep x 64 img, batch 8", 55.0)
    rows = rows[:5]  # not resumed: its last time
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert result_folders.pretraining_summary(info) == ("3 ep x 64 img, batch 8", 30.0)


def test_finetune_learns_a_learnable_task(tiny_run, colours, tmp_path, cli_run):
    """3 epochs of 4 steps on the colours (no mixup, cutmix, RandAugment or erasing, to learn fast):
    far above chance (0.25), and the validation loss falls well below that of a head that guesses
    (ln 4)."""
    recipe = ["--epochs", "3", "--batch-size", "16", "--warmup-epochs", "0", "--blr", "3e-2"]
    plain = [
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
    ]
    args = [*COLOURS, "--data-dir", colours, *recipe, *plain, "--out", tmp_path / "ft"]
    r = cli_run("finetune", tiny_run, *args)
    assert r.returncode == 0, r.stdout + r.stderr
    result = read_result(tmp_path / "ft")
    log = read_log(tmp_path / "ft")
    assert [row["epoch"] for row in log] == [1, 2, 3]
    assert result["metrics"]["top1"] == log[-1]["top1"]
    assert result["metrics"]["top1"] >= 0.9, log
    assert log[-1]["val_loss"] < min(log[0]["val_loss"] - 0.1, 0.75 * math.log(4)), log


def test_visualize_cli_writes_png_of_the_right_size(tiny_run, tmp_path, cli_run):
    r = cli_run("visualize", tiny_run, "--num-images", "3", "--out", tmp_path / "v.png", *FAST)
    assert r.returncode == 0, r.stdout + r.stderr
    # 3 rows x 4 columns of 32-px images enlarged 4x (the default: about 128 px), 2 px apart,
    # under a header of text
    width, height = png_size(tmp_path / "v.png")
    grid = 3 * 128 + 4 * 2
    assert width == 4 * 128 + 5 * 2 and grid + 24 <= height <= grid + 64, (width, height)
    from PIL import Image

    Image.open(tmp_path / "v.png").verify()  # the whole file decodes
    # the pretraining hook drew the same kind of picture at the end of the epoch (8 rows), with
    # the same header
    assert png_size(tiny_run / "vis-epoch0001.png") == (width, height + 5 * (128 + 2))


def test_visualize_masks_are_seedable_and_norm_pix_is_labelled():
    """The caller says whether the model predicts per-patch normalised pixels (MAE's norm_pix_loss):
    then the predictions are de-normalised (or shown raw), and the picture's note says so."""
    torch.manual_seed(0)
    model = mae.MAE(mae.Config(**TINY, in_chans=3))
    assert model.cfg.norm_pix_loss
    data = data_sets.load_dataset("patterns", "val", size=4, img_size=32)
    draw = cli.bound_inputs(mae, model.cfg)
    shown = (model, data, "patterns", 32, draw, True)
    cols0, note = pictures.reconstructions(*shown, n=4, seed=0)
    cols0b, _ = pictures.reconstructions(*shown, n=4, seed=0)
    cols1, _ = pictures.reconstructions(*shown, n=4, seed=1)
    assert torch.equal(cols0[1][1], cols0b[1][1]) and not torch.equal(cols0[1][1], cols1[1][1])
    assert "TRUE mean and std" in note  # de-normalised with the true statistics
    raw, raw_note = pictures.reconstructions(*shown, n=4, seed=0, norm_pix="raw")
    assert "normalised space" in raw_note
    plain, plain_note = pictures.reconstructions(*shown[:-1], False, n=4, seed=0)
    assert plain_note == "reconstructions are in the input's pixel space"
    recon = {name: columns[2][1] for name, columns in (("denorm", cols0), ("raw", raw))}
    recon["plain"] = plain[2][1]
    assert not torch.equal(recon["denorm"], recon["plain"])
    assert not torch.equal(recon["raw"], recon["plain"])
    # the columns against a mask the test chooses: every image keeps the 4 patches of least noise
    # (mask ratio 0.75), here patches 1, 4, 6 and 15 of the 4 x 4 grid of 8-px patches (row-major)
    noise = torch.ones(16)
    noise[[1, 4, 6, 15]] = 0
    fixed = (model, data, "patterns", 32, lambda draws: {"noise": noise.expand(4, -1)}, True)
    columns, _ = pictures.reconstructions(*fixed, n=4)
    (label, original), (_, masked), (_, recon), (_, pasted) = columns[:4]
    assert label == "original" and columns[1][0] == "masked (75%)"
    visible = torch.zeros(32, 32, dtype=torch.bool)
    for j in (1, 4, 6, 15):
        visible[8 * (j // 4) : 8 * (j // 4 + 1), 8 * (j % 4) : 8 * (j % 4 + 1)] = True
    images = torch.stack([data[i][0] for i in range(4)])  # (4, 3, 32, 32): raw, in [0, 1]
    assert torch.allclose(original, images, atol=1e-5)
    assert torch.allclose(masked[..., visible], images[..., visible], atol=1e-5)
    assert (masked[..., ~visible] == 0.5).all()  # masked patches grey
    # recon + the visible patches
    assert torch.allclose(pasted[..., visible], images[..., visible], atol=1e-5)
    assert torch.equal(pasted[..., ~visible], recon[..., ~visible])
    guess = (recon - images).abs()[..., visible]  # an untrained model's: so the pasting shows
    assert guess.mean() > 0.05


def test_boolean_inputs_are_drawn_as_an_overlay():
    model = mae.MAE(mae.Config(**TINY))
    data = data_sets.load_dataset("patterns", "val", size=2, img_size=32)

    thrown = torch.zeros(2, 16, dtype=torch.bool)
    thrown[:, [1, 2]] = True  # patches 1 and 2: the first row, second and third columns

    def draw(draws):  # a method whose inputs include a boolean (B, N) tensor
        return {**mae.sample_inputs(model.cfg, draws), "thrown": thrown}

    model.forward = lambda imgs, noise, thrown: mae.MAE.forward(model, imgs, noise=noise)
    columns, _ = pictures.reconstructions(model, data, "patterns", 32, draw, True, n=2)
    assert [c[0] for c in columns][-1] == "thrown (red)" and len(columns) == 5
    masked = columns[1][1]
    overlay = columns[-1][1]
    where = torch.zeros(32, 32, dtype=torch.bool)
    where[:8, 8:24] = True
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1)
    assert torch.equal(overlay[..., ~where], masked[..., ~where])
    assert torch.allclose(overlay[..., where], 0.4 * masked[..., where] + 0.6 * red, atol=1e-6)


def test_finetune_crops_keep_at_least_min_crop_of_the_image():
    """--min-crop 1: every training crop is the whole image, flipped or not; the official 0.08
    zooms in."""
    img = torch.rand(3, 32, 32)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in data_sets.DATASETS["patterns"][1])
    whole = (img - mean) / std

    def is_whole(min_crop):
        fcfg = finetune.FinetuneConfig(min_crop=min_crop, randaug_n=0, reprob=0)
        tf = finetune.finetune_transform("patterns", 32, fcfg)
        torch.manual_seed(0)
        crops = [tf(img) for _ in range(16)]
        wholes = (whole, whole.flip(-1))
        return [any(torch.allclose(c, w, atol=1e-4) for w in wholes) for c in crops]

    assert all(is_whole(1.0)) and not any(is_whole(0.08))


def test_layer_decay_assigns_the_documented_lr_to_each_block():
    depth = 3
    decay = 0.5
    model = mae.MAE(mae.Config(**{**TINY, "depth": depth}))
    needed, _ = loading.feature_param_names(model)
    for name, p in model.named_parameters():  # as run_finetune: the decoder is not fine-tuned
        p.requires_grad_(name in needed)
    clf = finetune.Classifier(model, model.cfg.embed_dim, 8)
    groups = finetune.layer_decay_groups(clf, 0.05, decay)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    for i in range(depth):  # block i learns at lr * decay ** (depth - i)
        assert scale[f"encoder.blocks.{i}.attn.qkv.weight"] == decay ** (depth - i)
        assert scale[f"encoder.blocks.{i}.norm1.bias"] == decay ** (depth - i)
    for name in ("encoder.patch_embed.proj.weight", "encoder.cls_token"):
        assert scale[name] == decay ** (depth + 1)
    for name in ("encoder.norm.weight", "fc_norm.weight", "head.weight", "head.bias"):
        assert scale[name] == 1.0
    decayed = {name for g in groups if g["weight_decay"] for name in g["names"]}
    assert "head.weight" in decayed
    assert "head.bias" not in decayed and "encoder.cls_token" not in decayed


def test_layer_decay_continues_through_the_columns_a_model_uses_for_its_features():
    import revcolv2  # its features run the top-down columns (decoder_blocks) after the bottom-up

    decay = 0.5
    cfg = revcolv2.Config(img_size=32, patch_size=8, embed_dim=32, num_heads=2)
    model = revcolv2.RevColV2(cfg)
    needed, dim = loading.feature_param_names(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in needed)
    groups = finetune.layer_decay_groups(finetune.Classifier(model, dim, 8), 0.05, decay)
    scale = {name: g["lr_scale"] for g in groups for name in g["names"]}
    depth = model.cfg.encoder_columns + model.cfg.decoder_columns  # 2 + 2 columns, one layer each
    assert scale["encoder.patch_embed.proj.weight"] == decay ** (depth + 1)
    for j in range(model.cfg.encoder_columns):
        column = [v for k, v in scale.items() if k.startswith(f"encoder.blocks.{j}.")]
        assert column and all(v == decay ** (depth - j) for v in column)
    for j in range(model.cfg.decoder_columns):
        col = model.cfg.encoder_columns + j
        column = [v for k, v in scale.items() if k.startswith(f"encoder.decoder_blocks.{j}.")]
        assert column and all(v == decay ** (depth - col) for v in column)
    assert scale["head.weight"] == 1.0


def test_layer_decay_reaches_the_optimizer(tiny_run, tmp_path):
    """Fine-tuning's layer-wise learning-rate decay reaches AdamW: at every step each parameter
    group's lr is the schedule's (common.lr_at) times layer_decay ** (L + 1 - layer), the layer read
    off the group's parameter names as layer_decay_groups documents (0: the embeddings, i + 1:
    blocks.i, L + 1: the rest). Recorded in the optimiser's step, so a loop that ignores the groups'
    lr_scale fails here (the rest of the suite passed with one)."""
    import io

    from rich.console import Console
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    decay = 0.5
    model, info = loading.load_model(tiny_run, cli.method_of)
    out = str(tmp_path / "ft")
    ecfg = loading.EvalConfig(train_size=32, val_size=16, num_workers=0, out=out)
    recipe = dict(mixup=0, cutmix=0, randaug_n=0, reprob=0, layer_decay=decay)
    fcfg = finetune.FinetuneConfig(epochs=2, warmup_epochs=1, batch_size=16, **recipe)
    seen = []  # per step: [(lr, parameter names)] of each group

    def record(optimizer, args, kwargs):
        seen.append([(group["lr"], group["names"]) for group in optimizer.param_groups])

    hook = register_optimizer_step_pre_hook(record)
    try:
        finetune.run_finetune(model, info, ecfg, fcfg, [], Console(file=io.StringIO()))
    finally:
        hook.remove()
    depth = info["config"].depth

    def layer(name):
        parts = name.removeprefix("encoder.").split(".")
        if parts[0] in ("patch_embed", "cls_token", "pos_embed"):
            return 0
        return int(parts[1]) + 1 if parts[0] == "blocks" else depth + 1

    steps = 2  # 32 images, 16 a step
    peak = fcfg.blr * fcfg.batch_size / 256
    assert len(seen) == fcfg.epochs * steps
    for step, groups in enumerate(seen):
        scheduled = common.lr_at(step, len(seen), steps, peak, fcfg.min_lr)
        for lr, names in groups:
            (group_layer,) = {layer(name) for name in names}
            assert lr == pytest.approx(scheduled * decay ** (depth + 1 - group_layer), rel=1e-6)
    # after the warm-up's first step (lr 0) the layers learn at depth + 2 different rates
    assert len({lr for lr, _ in seen[2]}) == depth + 2 and all(lr > 0 for lr, _ in seen[2])


def test_knn_recovers_labels_of_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 10
    labels = torch.arange(500) % 5
    feats = centres[labels] + torch.randn(500, 32, generator=g)
    train = slice(0, 400)
    test = slice(400, 500)
    scores = probes.knn_scores(feats[train], labels[train], feats[test], 5, k=20, temperature=0.07)
    assert probes.accuracy(scores, labels[test])[0] == 1.0
    shuffled = labels[train][
        torch.randperm(400, generator=g)
    ]  # the same features, labels scrambled
    scores = probes.knn_scores(feats[train], shuffled, feats[test], 5)
    assert probes.accuracy(scores, labels[test])[0] < 0.5


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
    state = model.state_dict()
    if not full:
        state = {
            k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"
        }
    options = dict(input_size=32, mask_ratio=0.75, norm_pix_loss=True, epochs=800)
    args = argparse.Namespace(model="mae_vit_tiny", **options)
    torch.save({"model": state, "args": args, "epoch": 799}, path)
    return model


def test_official_encoder_only_checkpoint(tmp_path, cli_run):
    ours = official_checkpoint(tmp_path / "official.pth")
    loaded, info = loading.load_model(tmp_path / "official.pth", cli.method_of, "mae")
    assert info["official"] and loaded.cfg.embed_dim == 192
    assert loaded.cfg.num_heads == 3 and loaded.cfg.depth == 2
    imgs = torch.randn(2, 3, 32, 32)
    theirs = ours.eval().forward_features(imgs)
    assert torch.allclose(loaded.eval().forward_features(imgs), theirs, atol=1e-6)
    args = ["--data", "patterns", *FAST, "--out", tmp_path / "knn"]
    r = cli_run("knn", tmp_path / "official.pth", *args)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((tmp_path / "knn" / "result.json").read_text())
    assert result["pretraining"] == "official checkpoint"
    full = official_checkpoint(tmp_path / "full.pth", full=True)  # *_full.pth: with the decoder
    loaded, _ = loading.load_model(tmp_path / "full.pth", cli.method_of, "mae", need_all=True)
    assert loaded.cfg.decoder_depth == 1 and loaded.cfg.decoder_embed_dim == 64
    assert loaded.cfg.norm_pix_loss is True
    noise = torch.rand(2, 16)
    assert torch.equal(loaded.eval()(imgs, noise=noise)[1], full.eval()(imgs, noise=noise)[1])
    r = cli_run("visualize", tmp_path / "official.pth", "--data", "patterns", *FAST)
    assert r.returncode == 2 and "lacks weights of the whole model" in r.stderr
    assert "Traceback" not in r.stdout + r.stderr


def test_bad_input_gets_a_clear_error(tiny_run):
    """(The command-line cases are in tests/test_cli_errors.py.)"""
    model, info = loading.load_model(tiny_run, cli.method_of)
    with pytest.raises(ValueError, match=r"fashion-mnist has 1 channel\(s\) but the model takes 3"):
        loading.eval_datasets(loading.EvalConfig(data="fashion-mnist"), info)
    with pytest.raises(ValueError, match="--k"):
        probes.KnnConfig(k=0)
    with pytest.raises(ValueError, match="has no field 'nonsense'"):
        loading.load_model(tiny_run, cli.method_of, overrides={"nonsense": 1})


def fake_result(method, data, seed, top1, random_init=False, command="knn", source="run"):
    return {
        "command": command,
        "method": method,
        "data": data,
        "seed": seed,
        "random_init": random_init,
        "encoder": "0.10M params, 32 px",
        "pretraining": "none (random init)" if random_init else "4 ep x 4,096 img",
        "settings": "kNN k=20, T=0.07",
        "metrics": {"top1": top1, "train_images": 4096},
        "wall_s": 60.0,
        "pretrain_wall_s": 120.0,
        "machine": "test machine",
        "source": source,
    }


def test_results_table_cells_hold_the_mean_the_floor_and_the_seeds(tmp_path):
    """A cell: the trained runs' mean ± std (the random-init floor's mean) n=seeds; a floor with
    other seeds says so; the raw pixels come last; the held-out loss is the runs' last one."""
    runs = []
    for seed, loss in enumerate([0.5, 0.7]):
        run = tmp_path / f"mae-s{seed}"
        run.mkdir()
        rows = [
            {"step": 0, "val_loss": 2.0},
            {"step": 8, "loss": 1.0},
            {"step": 8, "val_loss": loss},
        ]
        (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        runs.append(str(run))
    found = [fake_result("mae", "patterns", s, t, source=runs[s]) for s, t in enumerate([0.5, 0.7])]
    found += [fake_result("mae", "patterns", s, 0.2, random_init=True) for s in range(2)]
    found += [fake_result("simmim", "patterns", 0, 0.9)]
    found += [fake_result("simmim", "patterns", s, 0.1, random_init=True) for s in range(3)]
    found += [fake_result("raw pixels", "patterns", 0, 0.3)]
    text = tables.table(found, first=["mae", "simmim"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | patterns kNN | patterns held-out loss |"
    assert rows[1] == "| mae | 60.0 ± 14.1 (20.0 ± 0.0) n=2 | 0.600 ± 0.141 n=2 |"
    assert rows[2].startswith("| simmim | 90.0 n=1 (10.0 ± 0.0 n=3) |")
    assert rows[3] == "| raw pixels | 30.0 n=1 |  |"
    assert "kNN k=20, T=0.07 on 4,096 images" in text and "test machine" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{tables.BEGIN}\nold\n{tables.END}\noutro\n")
    tables.update_readme(readme, text)
    body = readme.read_text()
    assert body == f"intro\n{tables.BEGIN}\n{text}\n{tables.END}\noutro\n"


def test_table_command_reads_result_folders(knn_results, tmp_path):
    r = run_cli("table", knn_results)
    assert r.returncode == 0, r.stdout + r.stderr
    # one row: the trained number beside its floor
    trained = read_result(knn_results / "knn-patterns-s0")["metrics"]["top1"]
    floor = read_result(knn_results / "knn-random-init-patterns-s1")["metrics"]["top1"]
    assert f"| mae | {100 * trained:.1f} ({100 * floor:.1f}) n=1 |" in r.stdout
    with pytest.raises(ValueError, match="does not exist"):
        tables.collect([tmp_path / "nothing-here"])


NO_FASHION_MNIST = not data_sets.FASHION_MNIST_DEBIAN.is_dir()


@pytest.mark.skipif(NO_FASHION_MNIST, reason="needs `apt install dataset-fashion-mnist`")
def test_random_init_encoder_evaluates_worse_than_a_briefly_trained_one(tmp_path):
    """The evaluation must see training. The briefly trained encoder here is trained for 150 steps
    with labels (the fastest way to give a tiny ViT real features on CPU; see README.md#results for
    what a short MAE gives); both are saved as checkpoints of ours and go through knn and linprobe.
    Fashion-MNIST, because on `patterns` 150 steps on 512 images learn next to nothing that holds on
    held-out images."""
    import dataclasses
    import io

    import torch.nn.functional as F
    from rich.console import Console

    torch.manual_seed(0)
    model = mae.MAE(mae.Config(**{**TINY, "in_chans": 1}))
    train = data_sets.load_dataset("fashion-mnist", "train", size=512, img_size=32)
    tf = data_sets.transform("fashion-mnist", 32, False)
    imgs = torch.stack([tf(train[i][0]) for i in range(512)])
    labels = torch.tensor([train[i][1] for i in range(512)])
    clf = finetune.Classifier(model, model.cfg.embed_dim, 10)
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
        loaded, info = loading.load_model(tmp_path, cli.method_of, random_init=random_init)
        out = str(tmp_path / f"knn{random_init}")
        ecfg = loading.EvalConfig(random_init=random_init, num_workers=0, out=out)
        quiet = Console(file=io.StringIO())
        knn, _ = probes.run_knn(loaded, info, ecfg, probes.KnnConfig(), [], quiet)
        ecfg.out = str(tmp_path / f"probe{random_init}")
        lcfg = probes.LinprobeConfig(epochs=20, warmup_epochs=2)
        probe, _ = probes.run_linprobe(loaded, info, ecfg, lcfg, [], quiet)
        top1[random_init] = knn["metrics"]["top1"], probe["metrics"]["top1"]
    assert top1[False][0] > top1[True][0] + 0.05, top1  # knn
    assert top1[False][1] > top1[True][1] + 0.05, top1  # linear probe


@pytest.mark.slow
def test_finetune_on_two_processes_matches_one(tiny_run, tmp_path):
    """torchrun with 2 processes x 16 images = 1 process x 32: the same samples, crops and weights
    (gloo, CPU)."""
    plain = ["--train-size", "64", "--val-size", "32", "--num-workers", "0", "--epochs", "2"]
    plain += ["--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--reprob", "0"]
    plain += ["--blr", "1e-2", "--warmup-epochs", "0"]
    r = run_cli("finetune", tiny_run, *plain, "--batch-size", "32", "--out", tmp_path / "one")
    assert r.returncode == 0, r.stdout + r.stderr
    args = [*plain, "--batch-size", "16", "--out", tmp_path / "two"]
    r = run_torchrun("finetune", tiny_run, *args, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    one = torch.load(tmp_path / "one" / "checkpoint.pt", weights_only=True)
    two = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)
    start = torch.load(tiny_run / "checkpoint.pt", weights_only=False)["model"]
    qkv = "blocks.0.attn.qkv.weight"
    assert (one["model"][qkv] - start[qkv]).abs().max() > 1e-3  # it trained
    for name in one["model"]:
        assert torch.allclose(one["model"][name], two["model"][name], atol=1e-5), name
    assert torch.allclose(one["head"]["head"]["weight"], two["head"]["head"]["weight"], atol=1e-5)


def test_knn_and_linprobe_on_raw_pixels(tiny_run, cli_run, tmp_path):
    """--pixels: the normalised pixels of the same images as features (the floor of no encoder).
    kNN's top-1 equals a brute-force weighted kNN written here (cosine similarity, the 20 nearest
    vote with exp(sim / 0.07))."""
    r = cli_run("knn", tiny_run, "--pixels", "--out", tmp_path / "knn")
    assert r.returncode == 0, r.stdout + r.stderr
    result = read_result(tmp_path / "knn")
    assert result["method"] == "raw pixels" and result["encoder"].startswith("3,072 values")
    tf = data_sets.transform("patterns", 32, train=False)

    def pixels_and_labels(split, size):
        ds = data_sets.load_dataset("patterns", split, size=size, img_size=32)
        x = torch.stack([tf(ds[i][0]).flatten() for i in range(len(ds))])
        return x, torch.tensor([ds[i][1] for i in range(len(ds))])

    train_x, train_y = pixels_and_labels("train", 256)
    val_x, val_y = pixels_and_labels("val", 64)
    hits = 0
    for x, y in zip(val_x, val_y):
        sim = torch.nn.functional.cosine_similarity(train_x, x[None], dim=1)
        votes = {}
        for i in sim.argsort(descending=True)[:20].tolist():
            label = int(train_y[i])
            votes[label] = votes.get(label, 0.0) + math.exp(sim[i].item() / 0.07)
        hits += max(votes, key=votes.get) == int(y)
    assert result["metrics"]["top1"] == pytest.approx(hits / len(val_y))
    r = cli_run("linprobe", tiny_run, "--pixels", "--epochs", "3", "--out", tmp_path / "probe")
    assert r.returncode == 0, r.stdout + r.stderr
    assert read_result(tmp_path / "probe")["pretraining"] == "none (raw pixels)"
