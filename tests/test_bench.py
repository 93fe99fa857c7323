"""bench.py and `cli.py bench`: FLOPs against a hand count, the grouped-conv correction, saved bytes
counted once per storage, ratios, the --vary rows, and the command line."""

import ast
import dataclasses
import functools
import json
import re
import time

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, run_cli
from torch.utils.flop_counter import FlopCounterMode

import cli
import common
import data_sets
import mae
import pr_mim
from evaluation import bench, loader_bench

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: one thread is faster, on a busy machine most


class Wrap(nn.Module):
    """A layer behind the forward contract bench expects: forward(imgs) -> (loss, pred, mask)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, imgs):
        out = self.layer(imgs)
        return (out**2).sum(), out, None


def test_flops_of_mae_match_a_hand_count():
    cfg, _ = cli.resolve(mae, "tiny", None, {})  # 32 px, patch 8; 64-d x 2, decoder 32-d x 1
    torch.manual_seed(0)
    imgs = torch.randn(2, 3, 32, 32)
    fwd, total = bench.count_flops(mae.MAE(cfg), imgs, {"noise": torch.rand(2, 16)})
    N = 16  # patches, 4 of them visible
    P = 8
    D = 64
    Dd = 32
    T = 1 + 4  # tokens in the encoder
    Td = 1 + N  # tokens in the decoder

    def block(t, d):  # qkv, q @ k^T and attn @ v (MATH backend), proj, MLP; 2 FLOPs a multiply-add
        return 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d

    patch_embed = 2 * N * D * P * P * 3
    encoder = patch_embed + 2 * block(T, D)
    decoder = 2 * T * D * Dd + block(Td, Dd) + 2 * Td * Dd * P * P * 3
    forward = encoder + decoder
    assert fwd == 2 * forward
    assert total == 2 * (3 * forward - patch_embed)  # backward: twice; the image needs no gradient


def test_grouped_conv_backward_is_counted_as_twice_its_forward():
    conv = nn.Conv2d(512, 512, 7, padding=3, groups=512)  # the note's example: ~9.8 MFLOPs forward
    x = torch.randn(1, 512, 14, 14, requires_grad=True)
    fwd, total = bench.count_flops(Wrap(conv), x, {})
    assert fwd == 2 * 196 * 512 * 49 and total == 3 * fwd
    with FlopCounterMode(display=False) as plain:  # torch's own count is ~500x too high here
        conv(x).sum().backward()
    assert plain.get_total_flops() > 100 * total
    dense = nn.Conv2d(64, 32, 3, padding=1)  # and for an ordinary conv, the same count as torch's
    x = torch.randn(2, 64, 14, 14, requires_grad=True)
    with FlopCounterMode(display=False) as plain:
        dense(x).sum().backward()
    assert bench.count_flops(Wrap(dense), x, {})[1] == plain.get_total_flops()


def test_saved_bytes_count_each_storage_once_and_leave_parameters_out():
    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1000))

        def forward(self, imgs):
            y = imgs * imgs  # saves imgs twice: one storage
            z = y * self.scale  # saves y (new) and the parameter (left out)
            return z.sum(), z, None

    x = torch.randn(1000, requires_grad=True)
    assert bench.saved_bytes(Square(), x, {}) == 2 * 1000 * 4
    # the math attention keeps the (B, heads, N, N) attention map; the fused kernel does not
    block = Wrap(common.Attention(64, 4))
    x = torch.randn(2, 256, 64, requires_grad=True)
    fused = bench.saved_bytes(block, x, {})
    math = bench.saved_bytes(block, x, {}, math_attention=True)
    assert math - fused > 0.99 * 2 * 4 * 256 * 256 * 4  # fp32 maps of 2 images x 4 heads


CONTRACT = set(
    "img_size patch_size in_chans embed_dim depth num_heads mlp_ratio decoder_embed_dim"
    " decoder_depth decoder_num_heads drop_path".split()
)  # the Config fields the plumbing may name


def test_bench_never_names_a_method():
    """bench.py names no method; no file of evaluation/ names a method's own Config field (one
    outside the contract): not in its code (a name, an attribute, a keyword, a string), nor, for the
    fields with an underscore (unmistakable: norm_pix_loss), in a comment or docstring."""
    words = {"mae", "simmim", "pr_mim", "pr-mim", "prmim", "imae", "i-mae", "revcol", "revcolv2"}
    for node in ast.walk(ast.parse((ROOT / "evaluation" / "bench.py").read_text())):
        text = ""
        if isinstance(node, ast.Name):
            text = node.id
        elif isinstance(node, ast.Constant):
            text = node.value
        if isinstance(text, str):
            assert not words & set(text.lower().replace("(", " ").replace(")", " ").split()), text
    configs = [module.Config for module, _ in cli.METHODS.values()]
    own = {f.name for cfg in configs for f in dataclasses.fields(cfg)} - CONTRACT
    assert {"norm_pix_loss", "mask_ratio", "throw", "reversible"} <= own
    for path in sorted((ROOT / "evaluation").glob("*.py")):
        source = path.read_text()
        named = {w for w in re.findall(r"\w+", source) if "_" in w}
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name):
                named.add(node.id)
            elif isinstance(node, ast.Attribute):
                named.add(node.attr)
            elif isinstance(node, ast.keyword):
                named.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                named.add(node.value)
        assert not named & own, (path.name, sorted(named & own))


FAST = ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0", "--rounds", "1"]


def test_cli_bench_compare_with_vary_rows_as_json():
    vary = "throw=0.25; throw=0.65; throw=0.5,progressive=false; throw=0.65, progressive=0"
    args = ["pr-mim", *FAST, "--compare", "mae", "--vary", vary, "--json"]
    result = run_cli("bench", *args, env=ONE_THREAD)
    assert result.returncode == 0, result.stderr + result.stdout
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    varied = ["throw=0.25", "throw=0.65", "throw=0.5, progressive=False"]
    varied.append("throw=0.65, progressive=False")
    assert list(rows) == ["mae", "pr-mim", *(f"pr-mim: {v}" for v in varied)]
    assert all(r["ratio"]["gflops"] == r["gflops"] / rows["mae"]["gflops"] for r in rows.values())
    # throwing more tokens costs fewer FLOPs and saves fewer activations; progressive adds a little
    g = {name: r["gflops"] for name, r in rows.items()}
    assert g["pr-mim: throw=0.65"] < g["pr-mim"] < g["pr-mim: throw=0.25"] < g["mae"]
    assert g["pr-mim: throw=0.5, progressive=False"] < g["pr-mim"]
    assert rows["pr-mim"]["saved_mb"] < rows["mae"]["saved_mb"]
    assert rows["pr-mim"]["step_ms"] > 0 and rows["pr-mim"]["inputs_ms"] > 0
    # images/s: the batch over the median step; no MFU on a CPU (no peak to divide by)
    for r in rows.values():
        assert r["images_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3)) and r["mfu"] is None


def test_vary_reads_each_value_as_its_fields_type():
    text = " progressive=0 ; ; progressive=TRUE, sampling=random;"
    assert bench.vary_rows(text, pr_mim.Config, "x") == [
        ("progressive=False", {"progressive": False}),
        ("progressive=True, sampling=random", {"progressive": True, "sampling": "random"}),
    ]
    assert bench.vary_rows("kernel_size=3,throw=0.25", pr_mim.Config, "x") == [
        ("kernel_size=3, throw=0.25", {"kernel_size": 3, "throw": 0.25})
    ]
    assert bench.vary_rows("", pr_mim.Config, "x") == []
    for bad in ("nonsense=1", "throw", "throw=abc", "progressive=maybe", "kernel_size=3.5"):
        with pytest.raises(ValueError, match="x's Config fields: img_size, .*, throw, "):
            bench.vary_rows(bad, pr_mim.Config, "x")


def test_cli_bench_table_skips_impossible_rows_and_refuses_bad_options():
    args = ["pr-mim", *FAST, "--mask-ratio", "0.6", "--compare", "simmim"]
    result = run_cli("bench", *args, "--vary", "throw=0.65; throw=0.25", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "GFLOPs/img fwd+bwd" in result.stdout and "simmim" in result.stdout
    assert "skipped pr-mim: throw=0.65" in result.stdout  # above the mask ratio 0.6
    assert "pr-mim: throw=0.25" in result.stdout
    with pytest.raises(ValueError, match="--steps"):
        bench.BenchConfig(steps=0)
    result = run_cli("bench", "mae", "--preset", "tiny", "--amp", "fp8", env=ONE_THREAD)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --amp must be bf16, fp16 or fp32, got 'fp8'"
    for vary, problem in (("nonsense=1", "has no field 'nonsense'"), ("throw=abc", "throw='abc'")):
        result = run_cli("bench", "pr-mim", "--preset", "tiny", "--vary", vary)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: --vary: ") and problem in line, line
        assert "pr-mim's Config fields: img_size" in line and "throw, sampling" in line


def test_the_timed_step_is_trains_step_with_the_optimizer_step_inside(monkeypatch):
    """bench.measure times forward, backward and AdamW's step (betas and groups of common.pretrain,
    fused, as on a GPU), under torch.compile with --compile: each AdamW step made 50 ms slower here
    must show in every timed step, the parameters must move, and the compiled module must be the one
    run."""
    cfg, _ = cli.resolve(mae, "tiny", None, {})
    torch.manual_seed(0)
    model = mae.MAE(cfg)
    made = []
    steps = []
    compiled = []
    before = [p.detach().clone() for p in model.parameters()]

    class Slow(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append((self, kwargs))

        def step(self, closure=None):
            time.sleep(0.05)
            steps.append(1)
            return super().step(closure)

    def fake_compile(module):  # the wiring only; a real compile is slow on a CPU: the slow test
        compiled.append(module)
        return lambda *args, **kwargs: module(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Slow)
    monkeypatch.setattr(torch, "compile", fake_compile)
    timing = (2, 3, 1, torch.device("cpu"))  # batch, steps, warm-up steps, device
    row = bench.measure(
        lambda c: model, cfg, mae.sample_inputs, *timing, static=False, compile=True
    )
    ((optimizer, kwargs),) = made
    assert len(steps) == 1 + 3 and len(row["times"]) == 3 and min(row["times"]) >= 0.05
    assert compiled == [model]
    assert kwargs["betas"] == (0.9, 0.95) and kwargs["fused"] is True  # as pretrain
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    assert decays == [common.TrainConfig.weight_decay, 0.0]
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.requires_grad)


def test_images_per_s_and_mfu_of_a_row_from_the_peak_table(monkeypatch):
    cfg, _ = cli.resolve(mae, "tiny", None, {})
    rows = [("mae", mae.MAE, cfg, mae.sample_inputs)]
    monkeypatch.setattr(bench, "peak_flops", lambda device: 1e12)  # as a GPU of 1 TFLOP/s would be
    (row,) = bench.run(rows, batch_size=2, steps=2, warmup=0, rounds=1, log=lambda *a: None)
    assert row["images_per_s"] == pytest.approx(2 / (row["step_ms"] / 1e3))
    assert row["mfu"] == pytest.approx(row["gflops"] * 1e9 * row["images_per_s"] / 1e12)


def test_peak_flops_by_device_name(monkeypatch):
    names = {
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA A100 80GB PCIe": 312e12,
        "NVIDIA H100 80GB HBM3": 989e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H200": 989e12,
        "NVIDIA H100 NVL": None,
        "NVIDIA H200 NVL": None,
        "NVIDIA GeForce RTX 4090": None,  # not in the table: "-"
        "NVIDIA RTX A1000": None,
    }
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench.peak_flops(torch.device("cuda", 0)) == peak, name
    assert bench.peak_flops(torch.device("cpu")) is None


@pytest.mark.slow
def test_cli_bench_accepts_compile():
    args = ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--rounds", "1", "--json"]
    result = run_cli("bench", "mae", *args, "--compile", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr + result.stdout
    (row,) = json.loads(result.stdout)
    assert row["images_per_s"] > 0 and row["mfu"] is None


def test_cli_bench_data_measures_the_loader_alone():
    """`bench --data`: images per second of the pre-training loader (augmentation and masks in a
    worker). Checked against the wall time this test measures around the command: the timed part
    lies inside it, so the rate is at least the images counted over the whole command's time. The
    rate itself against a known per-batch time: the next test. (A missing data folder and other bad
    --data input: tests/test_cli_errors.py.)"""
    tick = time.perf_counter()
    args = ["--preset", "tiny", "--data", "patterns", "--num-workers", 1, "--batches", 3, "--json"]
    result = run_cli("bench", "mae", *args, env=ONE_THREAD)
    wall = time.perf_counter() - tick
    assert result.returncode == 0, result.stderr + result.stdout
    row = json.loads(result.stdout)
    assert row["data"] == "patterns" and row["num_workers"] == 1
    assert row["batch_size"] == 32  # the preset's
    assert row["batches"] == 3 and row["warmup_batches"] == 2  # 2 per worker are not timed
    assert row["images"] == 256 and row["img_size"] == 32  # the tiny preset's training set and size
    assert 0 < row["seconds"] < wall and row["images_per_s"] > 3 * 32 / wall
    # the images counted: batches x batch size
    assert row["images_per_s"] * row["seconds"] == pytest.approx(3 * 32)
    assert row["ms_per_batch"] == pytest.approx(row["seconds"] / 3 * 1e3)
    assert [p["path"] for p in row["paths"]] == ["batched", "workers"]  # side by side
    assert row["path"] == "batched"


def test_loader_throughput_times_the_pretraining_loaders_batches_after_the_warmup(monkeypatch):
    """loader_bench.loader_throughput on the real pre-training loader (data_sets.pretrain_loader),
    slowed by a known delay per batch: 0.5 s for each warm-up batch, 0.1 s for each timed one, and
    each batch's real time measured here. The rate must be the timed batches' images over their time
    (so warm-up is left out and every image counts), within 25% for the overhead between batches;
    the batches bench pulls are the loader's augmented images, with the method's masks, across an
    epoch boundary (64 images, batch 32: 2 batches an epoch)."""
    cfg, _ = cli.resolve(mae, "tiny", None, {})
    train_set = data_sets.load_dataset("patterns", "train", "data", 64, cfg.img_size)
    real_loader = data_sets.pretrain_loader
    pulled = []
    warmup = 2
    timed = 3

    class Slowed:  # the loader, each batch later; records what was pulled and how long it took
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            it = iter(self.loader)
            while True:
                tick = time.perf_counter()
                batch = next(it, None)
                if batch is None:
                    return
                time.sleep(0.5 if len(pulled) < warmup else 0.1)
                pulled.append((batch, time.perf_counter() - tick))
                yield batch

    def slowed_pretrain_loader(*args, **kwargs):
        loader, sampler = real_loader(*args, **kwargs)
        return Slowed(loader), sampler

    monkeypatch.setattr(data_sets, "pretrain_loader", slowed_pretrain_loader)
    tcfg = common.TrainConfig(data="patterns", batch_size=32, num_workers=0)
    inputs = functools.partial(mae.sample_inputs, cfg)
    result = loader_bench.loader_throughput(train_set, cfg, tcfg, inputs, timed, warmup, "cpu")
    assert len(pulled) == warmup + timed  # exactly the warm-up and the timed batches were drawn
    expected = timed * 32 / sum(seconds for _, seconds in pulled[warmup:])
    assert expected / 1.25 < result["images_per_s"] <= expected * 1.001, (result, expected)
    assert result["images_per_s"] * result["seconds"] == pytest.approx(timed * 32)
    evaluation = data_sets.transform("patterns", cfg.img_size, False)
    plain = [evaluation(train_set[i][0]) for i in range(len(train_set))]
    plain = torch.stack(plain)  # (64, 3, 32, 32), un-augmented
    for (imgs, labels, inputs), _ in pulled:
        assert imgs.shape == (32, 3, 32, 32) and labels.shape == (32,)
        assert inputs["noise"].shape == (32, 16)
        assert torch.isfinite(imgs).all() and 0.3 < imgs.std() < 3  # normalised images
        nearest = (imgs[:, None] - plain[None]).abs().flatten(2).amax(-1).min(1).values  # (32,)
        # random crops and flips (a few whole, unflipped images)
        assert (nearest > 1e-3).float().mean() > 0.8
    assert not torch.equal(pulled[0][0][0], pulled[2][0][0])  # epoch 1 is another epoch's draw


def test_flops_of_a_reversible_backward_count_its_recomputed_forward():
    import revcolv2  # its backward recomputes the forward (torch.autograd.grad in a Function)

    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2)
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    counts = {}
    for reversible in (True, False):
        model = revcolv2.RevColV2(revcolv2.Config(**cfg, reversible=reversible))
        counts[reversible] = bench.count_flops(model, imgs, {"noise": noise})
    fwd_rev, total_rev = counts[True]
    fwd_plain, total_plain = counts[False]
    assert fwd_rev == fwd_plain > 0
    # patch embedding and pixel head: B N (P P C) D multiply-adds each
    stem_and_head = 2 * (2 * 2 * 16 * (4 * 4 * 3) * 32)
    # plus one recomputed forward of every column
    assert total_rev == total_plain + fwd_plain - stem_and_head
