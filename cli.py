"""The one command line of the project.

    python cli.py pretrain mae                      # a short real run on the built-in data, on CPU
    python cli.py pretrain mae --preset cifar       # scale presets: tiny, cpu, cifar, tiny-imagenet, imagenet
    python cli.py pretrain mae --help               # every Config and TrainConfig field is an option

Options are built from the dataclasses (a method's Config and common.TrainConfig), so every default
is written once, in the dataclass; the comment beside each field is its --help text.
"""
import dataclasses
import inspect
import re
import typing
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

import common
import imae
import mae
import separability as separability_lib

METHODS = {"mae": (mae, mae.MAE), "i-mae": (imae, imae.IMAE)}  # command-line name: (method file, model class)
DEFAULT_PRESET = "cpu"

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Masked image modeling: one file per method, one command line.")
pretrain_app = typer.Typer(no_args_is_help=True, help="Pre-train a method: `pretrain METHOD [OPTIONS]`.")
app.add_typer(pretrain_app, name="pretrain")
console, err_console = Console(), Console(stderr=True)


def fail(message, code=2):
    """Print a one-line error and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def field_help(cls):
    """The trailing comment of each dataclass field in `cls`'s source, used as its --help text."""
    lines = inspect.getsource(cls).splitlines()
    return {m[1]: m[2] for m in (re.match(r"\s+(\w+): [^#]+#\s*(.*)$", line) for line in lines) if m}


def dataclass_options(*classes):
    """Typer parameters for the fields of `classes`, all defaulting to None (= not given)."""
    params = []
    for cls in classes:
        help_text = field_help(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = f.type if isinstance(f.type, type) else typing.get_args(f.type)[0]
            decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
            default = f"(default: {f.default})"
            if f.name in common.PRESETS[DEFAULT_PRESET]:
                default = f"(default: {common.PRESETS[DEFAULT_PRESET][f.name]} from --preset {DEFAULT_PRESET}; {f.default} without a preset)"
            option = typer.Option(None, *decls, help=f"{help_text.get(f.name, '')} {default}",
                                  show_default=False, rich_help_panel=cls.__module__ + "." + cls.__name__)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                            annotation=typing.Optional[kind]))
    return params


def build(cls, values):
    """cls(**the values that are its fields); a ValueError names the bad option."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def resolve(module, preset, model, given):
    """Config and TrainConfig from: the dataclass defaults < the preset < the model size < the options."""
    if preset not in common.PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(common.PRESETS)}")
    if model is not None and model not in common.VIT_SIZES:
        raise ValueError(f"unknown model size {model!r}: choose one of {', '.join(common.VIT_SIZES)}")
    values = {**common.PRESETS[preset], **common.VIT_SIZES.get(model, {}), **given}
    tcfg = build(common.TrainConfig, values)
    channels = common.DATASETS[tcfg.data][0]
    if values.setdefault("in_chans", channels) != channels:
        raise ValueError(f"--in-chans {values['in_chans']} does not match {tcfg.data}, which has {channels} "
                         f"channel(s): drop --in-chans, it is set from the data")
    return build(module.Config, values), tcfg


# options that may change when a run is resumed: they do not change what the run computes
RESUME_MAY_CHANGE = {"out", "resume", "max_steps", "num_workers", "log_every", "ckpt_every", "compile", "device"}


def prepare_out(method, tcfg, given):
    """The run folder: refuse to mix two runs in one folder; on --resume, the saved configs."""
    if not tcfg.out:
        if tcfg.resume:
            raise ValueError("--resume needs --out, the folder of the run to continue")
        tcfg.out = f"runs/{method}-{tcfg.data}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(tcfg.out)
    if tcfg.resume:
        ckpt = common.load_checkpoint(out / "checkpoint.pt")
        if ckpt.get("method") != method:
            raise ValueError(f"{out} holds a {ckpt.get('method')!r} run, not {method!r}")
        changed = sorted(k for k in given if k not in RESUME_MAY_CHANGE and ckpt["train"].get(k, ckpt["config"].get(k)) != given[k])
        if changed:
            raise ValueError(f"--resume continues {out} with its saved settings; drop "
                             + ", ".join("--" + k.replace("_", "-") for k in changed))
        return ckpt["config"], {**ckpt["train"], **{k: v for k, v in given.items() if k in RESUME_MAY_CHANGE}}
    if (out / "checkpoint.pt").exists() or (out / "log.jsonl").exists():
        if not tcfg.overwrite:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, --overwrite to "
                             f"replace it, or another --out")
    return None


def run_pretrain(method, preset, model, **options):
    module, model_cls = METHODS[method]
    given = {k: v for k, v in options.items() if v is not None}
    try:
        cfg, tcfg = resolve(module, preset or DEFAULT_PRESET, model, given)
        saved = prepare_out(method, tcfg, given)
        if saved:  # --resume: rebuild exactly the saved run
            cfg, tcfg = module.Config(**saved[0]), common.TrainConfig(**saved[1])
        train_set = common.load_dataset(tcfg.data, "train", tcfg.data_dir, tcfg.train_size, cfg.img_size, tcfg.download)
        val_set = common.load_dataset(tcfg.data, "val", tcfg.data_dir, tcfg.val_size, cfg.img_size, tcfg.download)
        common.torch.manual_seed(tcfg.seed)
        net = model_cls(cfg)
        if hasattr(net, "prepare_pretrain"):  # e.g. i-MAE loads its frozen teacher; evaluation never calls it
            net.prepare_pretrain(console.print if common.distributed()[0] == 0 else print_nothing, resume=tcfg.resume)
    except ValueError as e:
        fail(str(e))
    sample_inputs = getattr(module, "sample_inputs", None)
    sample_inputs = sample_inputs and _Bound(sample_inputs, cfg)
    files = [module.__file__, common.__file__]
    try:
        out = common.train(net, cfg, tcfg, train_set, val_set, method, files, sample_inputs, console)
    except (FloatingPointError, ValueError) as e:
        fail(str(e), code=1)
    except InterruptedError as e:
        fail(str(e), code=130)
    if common.distributed()[0] == 0:
        console.print(f"done: log {out / 'log.jsonl'}, checkpoint {out / 'checkpoint.pt'}")


class _Bound:
    """sample_inputs(cfg, generator) with cfg bound; a class, not a lambda, so data workers can pickle it."""

    def __init__(self, fn, cfg):
        self.fn, self.cfg = fn, cfg

    def __call__(self, generator):
        return self.fn(self.cfg, generator)


def add_pretrain_command(method):
    module, _ = METHODS[method]

    def command(**kwargs):
        run_pretrain(method, **kwargs)

    head = [inspect.Parameter("preset", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[str],
                              default=typer.Option(None, help=f"scale preset: {', '.join(common.PRESETS)} "
                                                             f"[default: {DEFAULT_PRESET}]", show_default=False)),
            inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=typing.Optional[str],
                              default=typer.Option(None, help=f"ViT size: {', '.join(common.VIT_SIZES)} "
                                                             "(overrides the preset's widths)")),]
    command.__signature__ = inspect.Signature(head + dataclass_options(module.Config, common.TrainConfig))
    command.__doc__ = module.__doc__.strip().splitlines()[0]
    pretrain_app.command(method)(command)


for _method in METHODS:
    add_pretrain_command(_method)


def print_nothing(*args, **kwargs):
    pass


def load_model(path, random_init=False, seed=0):
    """The model of a `pretrain` checkpoint (its method and config) in eval mode, with the checkpoint's weights
    or, with random_init, freshly initialised ones; and the checkpoint."""
    ckpt = common.load_checkpoint(path)
    if ckpt.get("method") not in METHODS or "config" not in ckpt:
        raise ValueError(f"{path} is not a `python cli.py pretrain` checkpoint of this project "
                         f"(method {ckpt.get('method')!r}; known: {', '.join(METHODS)})")
    module, model_cls = METHODS[ckpt["method"]]
    common.torch.manual_seed(seed)
    model = model_cls(module.Config(**ckpt["config"]))
    if not random_init:
        common.load_weights(model, ckpt["model"], str(path))  # strict; i-MAE's teacher, for one, is not in it
    return model.eval(), ckpt


@app.command()
def separability(
    run: str = typer.Argument(..., help="a `pretrain` run folder or checkpoint"),
    random_init: bool = typer.Option(False, help="score the run's architecture with random weights (the floor)"),
    reference: str = typer.Option("", help="read the clean images' latents from this run's encoder, not RUN's "
                                           "(common ground for comparing encoders, e.g. i-MAE's MAE teacher)"),
    images: int = typer.Option(1024, help="held-out images: half to fit the linear maps, half to test them"),
    alphas: str = typer.Option(",".join(map(str, separability_lib.ALPHAS)), help="subordinate weights α, in (0, 0.5]"),
    seed: int = typer.Option(0, help="seeds the pairs (and the random weights of --random-init)"),
    batch_size: int = typer.Option(256, help="images per forward pass"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object instead of the table"),
):
    """Linear separability of two images in the latent of their mixture (OUR metric; see separability.py)."""
    import json

    from rich.table import Table

    try:
        alpha_values = [float(a) for a in alphas.split(",")]
        if not all(0 < a <= 0.5 for a in alpha_values) or images < 4:
            raise ValueError(f"--alphas must be subordinate weights in (0, 0.5] and --images at least 4, got "
                             f"{alphas!r} and {images}")
        model, ckpt = load_model(run, random_init, seed)
        cfg, train = ckpt["config"], ckpt["train"]
        imgs = separability_lib.held_out_images(train["data"], train["data_dir"], cfg["img_size"], images)
        ref = load_model(reference)[0] if reference else None
        if ref and (ref.cfg.img_size, ref.cfg.patch_size) != (model.cfg.img_size, model.cfg.patch_size):
            raise ValueError(f"--reference {reference} has another image or patch size than {run}: its tokens "
                             f"do not line up with RUN's")
        ref = ref and ref.forward_features
    except ValueError as e:
        fail(str(e))
    rows, score = separability_lib.measure(model.forward_features, imgs, alpha_values, seed, batch_size, ref)
    pixels = separability_lib.pixel_features(cfg["patch_size"])
    pixel_rows, pixel_score = separability_lib.measure(pixels, imgs, alpha_values, seed, batch_size, ref or pixels)
    name = f"{ckpt['method']} {'random init' if random_init else 'trained'}"
    if json_out:
        console.print_json(json.dumps({"run": str(run), "method": ckpt["method"], "random_init": random_init,
                                       "reference": reference or "itself",
                                       "step": ckpt.get("step"), "data": train["data"], "images": len(imgs),
                                       "separability": score, "rows": rows, "pixels": pixel_score,
                                       "pixel_rows": pixel_rows}))
        return
    table = Table(title=f"linear separability (ours): {name}, {run}, {len(imgs)} held-out {train['data']} images, "
                        f"latents of the clean images from {reference or 'the same encoder'}")
    for column in ("α (subordinate)", "R² sub", "R² dom", "pixels: R² sub", "pixels: R² dom"):
        table.add_column(column, justify="right")
    for r, p in zip(rows, pixel_rows):
        table.add_row(f"{r['alpha']:.2f}", f"{r['sub']:.3f}", f"{r['dom']:.3f}", f"{p['sub']:.3f}", f"{p['dom']:.3f}")
    console.print(table)
    console.print(f"separability (mean R² of the subordinate image): {score:.3f} ({name}); "
                  f"raw pixels {pixel_score:.3f}")


if __name__ == "__main__":
    app()
