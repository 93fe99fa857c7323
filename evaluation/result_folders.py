"""Result folders: every number of an evaluation command lands in a folder beside its config, the
code that computed it (this package's, the caller's, the pre-training code the checkpoint carries),
the git hash and the machine it ran on (result.json, config.json, code/)."""

import json
import os
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

import common

EVALUATION_CODE = Path(__file__).parent  # its *.py files go into every result folder


def machine():
    """A short description of where a number was measured."""
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        names = (line for line in open("/proc/cpuinfo") if "model name" in line)
        cpu = next((line.split(":", 1)[1].strip() for line in names), cpu)
    return f"{cpu}, {os.cpu_count()} cores, no GPU"


def pretraining_summary(info):
    """What the encoder was pre-trained on, from the run folder's log.jsonl: (text, seconds or
    None)."""
    if info["official"]:
        return "official checkpoint", None
    log = info["run_dir"] / "log.jsonl"
    train = info["train"]
    lines = log.read_text().splitlines() if log.is_file() else []
    rows = [json.loads(line) for line in lines if line.strip()]
    epochs = max((r["epoch"] for r in rows if "epoch" in r), default=0)
    if info["ckpt"].get("finetune"):
        return f"fine-tuned {epochs:g} ep, see {info['run_dir']}", None
    images = f"{train['train_size']:,}" if train.get("train_size") else "all"
    # the clock restarts at each --resume: sum the last time of each part
    clock = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    seconds = sum(last for last, after in zip(clock, clock[1:] + [0]) if after < last) or None
    return f"{epochs:g} ep x {images} img, batch {train.get('batch_size', '?')}", seconds


def default_out(info, command, ecfg, data, pixels=False):
    init = "-pixels" if pixels else "-random-init" if ecfg.random_init else ""
    return info["run_dir"] / "eval" / f"{command}{init}-{data}-s{ecfg.seed}"


def start_result(out, command, settings, ecfg, ccfg, info, data, code_files, world=1, fresh=True):
    """Create the result folder with config.json and code/ (this package's code, `code_files` and
    the pre-training code the checkpoint carries); the metadata result.json repeats. fresh: drop an
    earlier result and log (not on --resume)."""
    cfg = info["config"]
    ckpt = info["ckpt"]
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a result folder: pass a folder")
    (out / "code" / "pretrain").mkdir(parents=True, exist_ok=True)
    for f in ("result.json", "log.jsonl") if fresh else ("result.json",):
        (out / f).unlink(missing_ok=True)
    for f in [*sorted(EVALUATION_CODE.glob("*.py")), *code_files]:
        shutil.copy(f, out / "code")
    for name, text in (ckpt.get("code") or {}).items():
        (out / "code" / "pretrain" / name).write_text(text)
    if ecfg.random_init:
        pretraining = "none (random init)"
        pretrain_s = None
    else:
        pretraining, pretrain_s = pretraining_summary(info)
    method = info["method"]
    encoder = f"{info['encoder_params'] / 1e6:.2f}M params"
    pixels = getattr(ccfg, "pixels", False)
    if pixels:  # no encoder: the features are the pixels
        pretraining = "none (raw pixels)"
        pretrain_s = None
        method = "raw pixels"
        encoder = f"{cfg.in_chans * cfg.img_size**2:,} values"
    meta = dict(
        command=command,
        method=method,
        data=data,
        random_init=ecfg.random_init and not pixels,
        seed=ecfg.seed,
        pretrain_seed=info["train"].get("seed"),
        pretraining=pretraining,
        pretrain_wall_s=pretrain_s,
        encoder=f"{encoder}, {cfg.img_size} px",
        settings=settings,
        source=str(info["run_dir"]),
        git=common.git_hash(),
        pretrain_git=ckpt.get("git"),
        machine=machine(),
        world_size=world,
        torch=torch.__version__,
    )
    config = {**meta, "eval": asdict(ecfg), command: asdict(ccfg), "model_config": asdict(cfg)}
    config["pretrain_train"] = info["train"]
    if ckpt.get("args") is not None:  # an official checkpoint's argparse options
        config["official_args"] = {k: repr(v) for k, v in vars(ckpt["args"]).items()}
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    return meta


def finish_result(out, meta, metrics, start, train_set, val_set):
    """Write result.json (the metadata, the metrics, the images, the wall time since `start`);
    (result, out)."""
    metrics = {**metrics, "train_images": len(train_set), "val_images": len(val_set)}
    result = {**meta, "metrics": metrics, "wall_s": round(time.perf_counter() - start, 1)}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result, out
