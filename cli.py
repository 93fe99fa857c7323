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
import mae
import revcolv2

METHODS = {"mae": (mae, mae.MAE), "revcolv2": (revcolv2, revcolv2.RevColV2)}  # command-line name: (method file, model class)
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


if __name__ == "__main__":
    app()
