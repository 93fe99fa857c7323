"""bench.py and `cli.py bench`: FLOPs against a hand count, the grouped-conv correction, saved bytes
counted once per storage, ratios, BENCH_VARIANTS rows, and the command line."""

import ast
import json
import os
import subprocess
import sys
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
from evaluation import bench

ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models: one thread is faster, above all on a busy machine


class Wrap(nn.Module):
    """A layer behind the forward contract bench expects: forward(imgs) -> (loss, pred, mask)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, imgs):
        out = self.layer(imgs)
        return (out**2).sum(), out, None


def test_flops_of_mae_match_a_hand_count():
    cfg, _ = cli.resolve(mae, "tiny", None, {})  # 32 px, patch 8: N = 16, 4 visible; 64-d x 2, decoder 32-d x 1
    torch.manual_seed(0)
    fwd, total = bench.count_flops(mae.MAE(cfg), torch.randn(2, 3, 32, 32), {"noise": torch.rand(2, 16)})
    N, P, D, Dd = 16, 8, 64, 32
    T, Td = 1 + 4, 1 + N  # tokens in the encoder and in the decoder

    def block(t, d):  # qkv, q @ k^T and attn @ v (run on the MATH backend), proj, MLP; 2 FLOPs a multiply-add
        return 2 * t * d * 3 * d + 2 * 2 * t * t * d + 2 * t * d * d + 2 * 2 * t * d * 4 * d

    patch_embed = 2 * N * D * P * P * 3
    forward = patch_embed + 2 * block(T, D) + 2 * T * D * Dd + block(Td, Dd) + 2 * Td * Dd * P * P * 3
    assert fwd == 2 * forward
    assert total == 2 * (3 * forward - patch_embed)  # backward twice the forward; the image needs no gradient


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
    fused, math = bench.saved_bytes(block, x, {}), bench.saved_bytes(block, x, {}, math_attention=True)
    assert math - fused > 0.99 * 2 * 4 * 256 * 256 * 4  # fp32 maps of 2 images x 4 heads


def test_bench_never_names_a_method():
    words = {"mae", "simmim", "pr_mim", "pr-mim", "prmim", "imae", "i-mae", "revcol", "revcolv2"}
    for node in ast.walk(ast.parse((ROOT / "evaluation" / "bench.py").read_text())):
        text = node.id if isinstance(node, ast.Name) else node.value if isinstance(node, ast.Constant) else ""
        if isinstance(text, str):
            assert not words & set(text.lower().replace("(", " ").replace(")", " ").split()), text


def test_cli_bench_compare_with_variants_as_json():
    result = run_cli(
        "bench",
        "pr-mim",
        "--preset",
        "tiny",
        "--compare",
        "mae",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "1",
        "--json",
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert list(rows)[:2] == ["mae", "pr-mim"] and "pr-mim: throw 0.65, no progressive" in rows  # BENCH_VARIANTS rows
    assert all(r["ratio"]["gflops"] == r["gflops"] / rows["mae"]["gflops"] for r in rows.values())
    # throwing more tokens costs fewer FLOPs and saves fewer activations; progressive adds a little
    g = {name: r["gflops"] for name, r in rows.items()}
    assert g["pr-mim: throw 0.65"] < g["pr-mim"] < g["pr-mim: throw 0.25"] < g["mae"]
    assert g["pr-mim: throw 0.5, no progressive"] < g["pr-mim"]
    assert rows["pr-mim"]["saved_mb"] < rows["mae"]["saved_mb"]
    assert rows["pr-mim"]["step_ms"] > 0 and rows["pr-mim"]["inputs_ms"] > 0
    for r in rows.values():  # images/s: the batch over the median step; no MFU on a CPU (no peak to divide by)
        assert r["images_per_s"] == pytest.approx(2 / (r["step_ms"] / 1e3)) and r["mfu"] is None


def test_cli_bench_table_skips_impossible_variants_and_refuses_bad_options():
    result = run_cli(
        "bench",
        "pr-mim",
        "--preset",
        "tiny",
        "--mask-ratio",
        "0.6",
        "--compare",
        "simmim",
        "--batch-size",
        "2",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--rounds",
        "1",
        env=ONE_THREAD,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "GFLOPs/img fwd+bwd" in result.stdout and "simmim" in result.stdout
    assert "skipped pr-mim: throw 0.65" in result.stdout  # above the mask ratio 0.6
    with pytest.raises(ValueError, match="--steps"):
        bench.BenchConfig(steps=0)
    result = run_cli("bench", "mae", "--preset", "tiny", "--amp", "fp8", env=ONE_THREAD)
    assert result.returncode == 2 and result.stderr.strip() == "error: --amp must be bf16, fp16 or fp32, got 'fp8'"


def test_the_timed_step_is_trains_step_with_the_optimizer_step_inside(monkeypatch):
    """bench.measure times forward, backward and AdamW's step (betas and groups of common.pretrain, not fused on a CPU),
    under torch.compile with --compile: each AdamW step made 50 ms slower here must show in every timed step, the
    parameters must move, and the compiled module must be the one run."""
    cfg, _ = cli.resolve(mae, "tiny", None, {})
    torch.manual_seed(0)
    model, made, steps, compiled = mae.MAE(cfg), [], [], []
    before = [p.detach().clone() for p in model.parameters()]

    class Slow(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            made.append((self, kwargs))

        def step(self, closure=None):
            time.sleep(0.05)
            steps.append(1)
            return super().step(closure)

    def fake_compile(module):  # the wiring only; a real compile is slow on a CPU: the slow test below
        compiled.append(module)
        return lambda *args, **kwargs: module(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", Slow)
    monkeypatch.setattr(torch, "compile", fake_compile)
    row = bench.measure(
        lambda c: model, cfg, mae.sample_inputs, 2, 3, 1, torch.device("cpu"), static=False, compile=True
    )
    ((optimizer, kwargs),) = made
    assert len(steps) == 1 + 3 and len(row["times"]) == 3 and min(row["times"]) >= 0.05 and compiled == [model]
    assert kwargs["betas"] == (0.9, 0.95) and kwargs["fused"] is False
    assert [g["weight_decay"] for g in optimizer.param_groups] == [common.TrainConfig.weight_decay, 0.0]
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()) if p.requires_grad)


def test_images_per_s_and_mfu_of_a_row_from_the_peak_table(monkeypatch):
    cfg, _ = cli.resolve(mae, "tiny", None, {})
    rows = [("mae", mae.MAE, cfg, mae.sample_inputs)]
    monkeypatch.setattr(bench, "peak_flops", lambda device: 1e12)  # as a GPU of 1 TFLOP/s would be
    (row,) = bench.run(rows, batch_size=2, steps=2, warmup=0, rounds=1, log=lambda *a: None)
    assert row["images_per_s"] == pytest.approx(2 / (row["step_ms"] / 1e3))
    assert row["mfu"] == pytest.approx(row["gflops"] * 1e9 * row["images_per_s"] / 1e12)


def test_peak_flops_by_device_name(monkeypatch):
    names = {"NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA H100 80GB HBM3": 989e12}
    names |= {"NVIDIA H100 PCIe": 756e12, "NVIDIA H200": 989e12, "NVIDIA H100 NVL": None, "NVIDIA H200 NVL": None}
    names |= {"NVIDIA GeForce RTX 4090": None, "NVIDIA RTX A1000": None}  # not in the table: "-"
    for name, peak in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert bench.peak_flops(torch.device("cuda", 0)) == peak, name
    assert bench.peak_flops(torch.device("cpu")) is None


@pytest.mark.slow
def test_cli_bench_accepts_compile():
    args = ["--preset", "tiny", "--batch-size", "2", "--steps", "1", "--rounds", "1", "--no-variants", "--json"]
    result = run_cli("bench", "mae", *args, "--compile", env=ONE_THREAD)
    assert result.returncode == 0, result.stderr + result.stdout
    (row,) = json.loads(result.stdout)
    assert row["images_per_s"] > 0 and row["mfu"] is None


def test_gpu_check_compares_every_step_of_the_losses():
    from experiments import gpu_check

    eager = {1: 2.0, 2: 1.5}
    assert gpu_check.compare(eager, {1: 2.02, 2: 1.51}) == (pytest.approx(0.01), True)
    assert not gpu_check.compare(eager, {1: 2.0, 2: 1.6})[1] and not gpu_check.compare(eager, {1: 2.0})[1]
    assert not gpu_check.compare({}, {})[1]  # no logged loss at all is a failure, not a pass


@pytest.mark.slow
def test_gpu_check_small_form_runs_on_a_cpu(tmp_path):
    """experiments/gpu_check.py with GPU_CHECK_SMALL=1: every step of the GPU check, on the tiny preset, in fp32."""
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "OUT": str(tmp_path), **ONE_THREAD}
    r = subprocess.run([sys.executable, "experiments/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    report, figures = (tmp_path / "gpu_check.txt").read_text(), json.loads((tmp_path / "gpu_check.json").read_text())
    assert "OK: compiled losses equal eager ones" in report and "img/s" in report
    assert len(figures["pretrain losses"]["eager"]) == 4 and len([k for k in figures if "batch" in k]) == 4


def test_cli_bench_data_measures_the_loader_alone():
    """`bench --data`: images per second of the pre-training loader (augmentation and masks in a worker).
    Checked against the wall time this test measures around the command: the timed part lies inside it, so
    the rate is at least the images counted over the whole command's time. The rate itself against a known
    per-batch time: the next test. (A missing data folder and other bad --data input: tests/test_cli_errors.py.)"""
    tick = time.perf_counter()
    result = run_cli(
        "bench",
        "mae",
        "--preset",
        "tiny",
        "--data",
        "patterns",
        "--num-workers",
        1,
        "--batches",
        3,
        "--json",
        env=ONE_THREAD,
    )
    wall = time.perf_counter() - tick
    assert result.returncode == 0, result.stderr + result.stdout
    row = json.loads(result.stdout)
    assert row["data"] == "patterns" and row["batch_size"] == 32 and row["num_workers"] == 1  # the preset's batch
    assert row["batches"] == 3 and row["warmup_batches"] == 2  # 2 per worker are not timed
    assert row["images"] == 256 and row["img_size"] == 32  # the tiny preset's training set and size
    assert 0 < row["seconds"] < wall and row["images_per_s"] > 3 * 32 / wall
    assert row["images_per_s"] * row["seconds"] == pytest.approx(3 * 32)  # images counted: batches x batch size
    assert row["ms_per_batch"] == pytest.approx(row["seconds"] / 3 * 1e3)
    assert [p["path"] for p in row["paths"]] == ["batched", "workers"] and row["path"] == "batched"  # side by side


def test_loader_throughput_times_the_pretraining_loaders_batches_after_the_warmup(monkeypatch):
    """bench.loader_throughput on the real pre-training loader (data_sets.pretrain_loader), slowed by a known delay per
    batch: 0.5 s for each warm-up batch, 0.1 s for each timed one, and each batch's real time measured here. The
    rate must be the timed batches' images over their time (so warm-up is left out and every image counts),
    within 25% for the overhead between batches; the batches bench pulls are the loader's augmented images, with
    the method's masks, across an epoch boundary (64 images, batch 32: 2 batches an epoch)."""
    cfg, _ = cli.resolve(mae, "tiny", None, {})
    train_set = data_sets.load_dataset("patterns", "train", "data", 64, cfg.img_size)
    real_loader, pulled, warmup, timed = data_sets.pretrain_loader, [], 2, 3

    class Slowed:  # the loader, each batch `delay` seconds later; records what was pulled and how long it took
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
    result = bench.loader_throughput(train_set, cfg, tcfg, lambda g: mae.sample_inputs(cfg, g), timed, warmup, "cpu")
    assert len(pulled) == warmup + timed  # exactly the warm-up and the timed batches were drawn
    expected = timed * 32 / sum(seconds for _, seconds in pulled[warmup:])
    assert expected / 1.25 < result["images_per_s"] <= expected * 1.001, (result, expected)
    assert result["images_per_s"] * result["seconds"] == pytest.approx(timed * 32)
    evaluation = data_sets.transform("patterns", cfg.img_size, False)
    plain = torch.stack([evaluation(train_set[i][0]) for i in range(len(train_set))])  # (64, 3, 32, 32), un-augmented
    for (imgs, labels, inputs), _ in pulled:
        assert imgs.shape == (32, 3, 32, 32) and labels.shape == (32,) and inputs["noise"].shape == (32, 16)
        assert torch.isfinite(imgs).all() and 0.3 < imgs.std() < 3  # normalised images
        nearest = (imgs[:, None] - plain[None]).abs().flatten(2).amax(-1).min(1).values  # (32,)
        assert (nearest > 1e-3).float().mean() > 0.8  # random crops and flips (a few whole, unflipped images)
    assert not torch.equal(pulled[0][0][0], pulled[2][0][0])  # epoch 1 is another epoch's draw


def test_flops_of_a_reversible_backward_count_its_recomputed_forward():
    import revcolv2  # its backward recomputes the forward with torch.autograd.grad inside a custom Function

    torch.manual_seed(0)
    cfg = dict(img_size=16, patch_size=4, embed_dim=32, num_heads=2)
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    counts = {}
    for reversible in (True, False):
        model = revcolv2.RevColV2(revcolv2.Config(**cfg, reversible=reversible))
        counts[reversible] = bench.count_flops(model, imgs, {"noise": noise})
    (fwd_rev, total_rev), (fwd_plain, total_plain) = counts[True], counts[False]
    assert fwd_rev == fwd_plain > 0
    stem_and_head = 2 * (2 * 2 * 16 * (4 * 4 * 3) * 32)  # patch embedding and pixel head: B N (P P C) D MACs each
    assert total_rev == total_plain + fwd_plain - stem_and_head  # plus one recomputed forward of every column
