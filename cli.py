"""The one command line of the project.

    python cli.py pretrain mae --preset cifar       # presets: tiny, cpu (the default), cifar, tiny-imagenet, imagenet
    python cli.py pretrain my_idea.py --my-knob 1   # a fork, e.g. an edited copy of mae.py; or `python my_idea.py`
    python cli.py knn runs/NAME                     # also linprobe, finetune, visualize, separability, export
    python cli.py bench pr-mim --compare mae        # parameters, FLOPs, memory and time of a step (--data: the loader)

Every option is a dataclass field (a method's Config, common.TrainConfig, one per command), its comment the --help
text. Values: the default < --preset < --model < the options given. A method is a built-in name or a method file
(the contract: docs/design.md); a run carries its code, from which the evaluation commands rebuild a fork's model.
"""

import ast
import dataclasses
import functools
import inspect
import sys
import tokenize
import typing
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

import common
import data_sets
import evaluation.bench
import evaluation.separability
import imae
import mae
import pr_mim
import revcolv2
import simmim
from evaluation import evaluate

console, err_console = Console(), Console(stderr=True)
ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")  # typer vendors click
MODULES = {"mae": mae, "simmim": simmim, "pr-mim": pr_mim, "i-mae": imae, "revcolv2": revcolv2}
METHODS = {name: (module, evaluate.model_class(module)) for name, module in MODULES.items()}  # (file, model)


def find_method(name_or_path, what="method"):
    """(name, module, model class) of a built-in method's name or of a method file's path."""
    path = Path(name_or_path)
    builtin = {Path(module.__file__).resolve(): name for name, module in MODULES.items()}
    name = builtin.get(path.resolve(), name_or_path)  # `python mae.py` is `pretrain mae`
    if name in METHODS:
        return name, *METHODS[name]
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"unknown {what} {name!r}: choose one of {', '.join(METHODS)}, or a method file")
    return path.stem, *evaluate.load_method(path.stem, path.read_text(), str(path))


def method_of(name, ckpt):
    """evaluate.load_model's resolver: a built-in method, else the method file that the checkpoint carries."""
    source = (ckpt.get("code") or {}).get(f"{name}.py")
    if name not in METHODS and source is None:
        raise ValueError(f"the checkpoint's method {name!r} is none of {', '.join(METHODS)} and its code is missing")
    return METHODS[name] if name in METHODS else evaluate.load_method(name, source, f"{name}.py")


def bound_inputs(module, cfg):
    """The method's sample_inputs(cfg, generator) with cfg bound, picklable for data workers (None if it has none)."""
    return functools.partial(module.sample_inputs, cfg) if hasattr(module, "sample_inputs") else None


# ----------------------------------------------------------------------------------------------------
# Options: the fields of dataclasses, `--field-name VALUE`, `--flag`, `--no-flag`


def field_help(cls):
    """{field: the comment on its line} in the source of dataclass `cls`: its --help text."""
    source = inspect.getsource(cls)
    tokens = tokenize.generate_tokens(iter(source.splitlines(True)).__next__)
    comments = {t.start[0]: t.string.lstrip("# ") for t in tokens if t.type == tokenize.COMMENT}
    fields = [node for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)]
    return {f.target.id: comments.get(f.end_lineno, comments.get(f.lineno, "")) for f in fields}


def parse(args, usage, doc, classes, preset):
    """(positional arguments, {field: value given}) of ARGS, the options being the fields of `classes`; with --help,
    print each with its type, help text and default (and `preset`'s value)."""
    hints = {name: t for cls in classes for name, t in typing.get_type_hints(cls).items()}
    kinds = {name: next((a for a in typing.get_args(t) if a is not type(None)), t) for name, t in hints.items()}
    see = f" (see `{usage} --help`)"
    if "--help" in args:
        typer.echo(f"Usage: {usage} [OPTIONS]\n\n{doc}")
        for cls in classes:
            typer.echo(f"\n{cls.__name__} ({Path(inspect.getfile(cls)).name}):")
            help_text = field_help(cls)
            for f in dataclasses.fields(cls):
                flag, kind, default = "--" + f.name.replace("_", "-"), kinds[f.name], repr(f.default)
                flag = f"{flag}/--no-{flag[2:]}" if kind is bool else f"{flag} {kind.__name__.upper()}"
                if f.name in preset:
                    default = f"{preset[f.name]!r} from --preset {Scale.preset}, {default} without"
                typer.echo(f"  {flag:<36} {help_text[f.name]} [default: {default}]")
        raise typer.Exit()
    positional, given, args = [], {}, list(args)
    while args:
        arg = args.pop(0)
        flag, eq, value = arg.partition("=")
        name = flag[2:].replace("-", "_")
        if not arg.startswith("--"):
            positional.append(arg)
        elif not eq and kinds.get(name.removeprefix("no_")) is bool:  # --flag, --no-flag
            given[name.removeprefix("no_")] = not name.startswith("no_")
        elif name not in kinds:
            raise ValueError(f"no such option {flag}{see}")
        elif kinds[name] is bool:
            raise ValueError(f"{flag} is a flag: pass {flag} or --no-{flag[2:]}{see}")
        elif not (eq or args):
            raise ValueError(f"{flag} needs a value{see}")
        else:
            value, kind = value if eq else args.pop(0), kinds[name]
            try:
                given[name] = kind(value)
            except ValueError:
                raise ValueError(f"Invalid value for '{flag}': {value!r} is not a {kind.__name__}{see}") from None
    return positional, given


def build(cls, values):  # cls(**the values that are its fields); a ValueError names the bad option
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclasses.dataclass
class Scale:  # options of pretrain and bench
    preset: str = "cpu"  # scale preset: tiny | cpu | cifar | tiny-imagenet | imagenet (common.PRESETS)
    model: str = ""  # ViT size: tiny | small | base | large | huge (common.VIT_SIZES), over the preset's widths


POSITIVE_SIZES = {"img_size", "patch_size", "embed_dim", "num_heads", "decoder_embed_dim", "decoder_num_heads"}


def preset_values(module, preset):  # the preset's values, with the method's PRESET_CHANGES (RevColV2's cpu rate)
    return {**common.PRESETS[preset], **getattr(module, "PRESET_CHANGES", {}).get(preset, {})}


def resolve(module, preset, model, given, overrides=None):
    """Config and TrainConfig from: the dataclass defaults < the preset < the model size < the options < overrides."""
    if preset not in common.PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(common.PRESETS)}")
    if model and model not in common.VIT_SIZES:
        raise ValueError(f"unknown model size {model!r}: choose one of {', '.join(common.VIT_SIZES)}")
    values = {**preset_values(module, preset), **common.VIT_SIZES.get(model, {}), **given, **(overrides or {})}
    tcfg = build(common.TrainConfig, values)
    channels = data_sets.channels(tcfg.data)
    if values.setdefault("in_chans", channels) != channels:
        mismatch = f"--in-chans {values['in_chans']} does not match {tcfg.data}, which has {channels} channel(s)"
        raise ValueError(f"{mismatch}: drop --in-chans, it is set from the data")
    for name in (f.name for f in dataclasses.fields(module.Config) if f.name in values):
        value, flag = values[name], "--" + name.replace("_", "-")
        if type(value) in (int, float) and value < 0:  # sizes, ratios, rates: none means anything below zero
            raise ValueError(f"{flag} must not be negative, got {value}")
        if name in POSITIVE_SIZES and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    return build(module.Config, values), tcfg


# ----------------------------------------------------------------------------------------------------
# The commands: each reads its own arguments (ctx.args), so its options come from the dataclasses above

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.splitlines()[0])
RAW = dict(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)


def method_args(ctx, classes):
    """(name, module, model class, Scale, {field: value} of the other options) of `COMMAND NAME_OR_PATH [OPTIONS]`."""
    if not ctx.args or ctx.args == ["--help"]:
        typer.echo(ctx.get_help())
        raise typer.Exit()
    name, module, model_cls = find_method(ctx.args[0])
    usage = f"python cli.py {ctx.info_name} {ctx.args[0]}"
    doc = f"{(module.__doc__ or name).strip().splitlines()[0]}\n{ctx.command.help}"
    options, preset = [Scale, *classes, module.Config], preset_values(module, Scale.preset)  # --help shows the preset
    positional, given = parse(ctx.args[1:], usage, doc, options, preset)
    if positional:
        raise ValueError(f"{ctx.info_name} takes one method then options, got {positional[0]!r} (see `{usage} --help`)")
    scale, given = build(Scale, given), {k: v for k, v in given.items() if k not in ("preset", "model")}
    return name, module, model_cls, scale, given


def run_args(ctx, classes):
    """(RUN_OR_CKPT, [each of `classes` built]) of `COMMAND RUN_OR_CKPT [OPTIONS]`; the command alone: its help."""
    usage = f"python cli.py {ctx.info_name} RUN_OR_CKPT"  # a run folder, a checkpoint of ours or of official MAE
    positional, given = parse(ctx.args or ["--help"], usage, ctx.command.help, classes, {})
    if len(positional) != 1:
        raise ValueError(f"{ctx.info_name} takes one run or checkpoint, got {len(positional)} (see `{usage} --help`)")
    return positional[0], [build(cls, given) for cls in classes]


@app.command(**RAW)
def pretrain(ctx: typer.Context):
    """Pre-train NAME_OR_PATH: mae, simmim, pr-mim, i-mae, revcolv2 or a method file; `--help` after it lists the
    options."""
    name, module, model_cls, scale, given = method_args(ctx, [common.TrainConfig])
    cfg, tcfg = common.prepare_run(name, *resolve(module, scale.preset, scale.model, given), given)
    rank, world, device = common.setup(tcfg)
    common.torch.manual_seed(tcfg.seed)
    net, sample_inputs = model_cls(cfg), bound_inputs(module, cfg)
    if hasattr(net, "prepare_pretrain"):  # e.g. i-MAE loads its frozen teacher; evaluation never calls it
        net.prepare_pretrain(console.print if rank == 0 else (lambda *a, **k: None), resume=tcfg.resume)
    loader, val_loader = data_sets.pretrain_loaders(tcfg, cfg.img_size, sample_inputs, device, rank, world)
    val_set = tcfg.vis_every and data_sets.load_dataset(tcfg.data, "val", tcfg.data_dir, tcfg.val_size, cfg.img_size)

    def picture(model, path, title):  # --vis-every: reconstructions of the first held-out images; path on rank 0
        columns, note = evaluate.reconstructions(model, val_set, tcfg.data, cfg.img_size, sample_inputs, seed=tcfg.seed)
        if path:
            evaluate.save_grid(columns, path, f"{title} {note}; masks seed {tcfg.seed}")

    try:  # an error found in training (e.g. too few images for a step) exits 1, as a diverged run
        out = common.pretrain(net, cfg, tcfg, loader, val_loader, name, [module.__file__, common.__file__], picture)
    except ValueError as e:
        raise typer.Exit(error(str(e), 1)) from None
    if rank == 0:
        console.print(f"done: log {out / 'log.jsonl'}, checkpoint {out / 'checkpoint.pt'}")


@app.command(**RAW)
def bench(ctx: typer.Context):
    """Measure the costs of a training step of NAME_OR_PATH; rows: the --compare base, the method, its
    BENCH_VARIANTS. With --data: the images/s of its pre-training data loader alone."""
    name, module, model_cls, scale, given = method_args(ctx, [evaluation.bench.BenchConfig])
    own = {k: v for k, v in given.items() if k in module.Config.__dataclass_fields__}  # the Config's options
    configs = functools.partial(resolve, preset=scale.preset, model=scale.model, given=own)
    b = build(evaluation.bench.BenchConfig, given)
    evaluation.bench.main(b, name, module, model_cls, configs, find_method, console, err_console)


# Evaluation: thin commands over evaluation/ (the protocol is in evaluate.py's docstring and docs/evaluation.md)


def evaluation_command(command, ccls, run):
    """`COMMAND RUN_OR_CKPT [OPTIONS]`: the options of evaluate.EvalConfig and `ccls`, then run(model, info, ...)."""

    def evaluation_body(ctx: typer.Context):
        source, (ecfg, ccfg) = run_args(ctx, [evaluate.EvalConfig, ccls])
        overrides = {"drop_path": ccfg.drop_path} if command == "finetune" else {}
        need_all = command == "visualize" and not ecfg.random_init  # reconstructions need the decoder
        method = ecfg.method or "mae"  # of checkpoints that do not name one (those of facebookresearch/mae)
        model, info = evaluate.load_model(source, method_of, method, ecfg.random_init, ecfg.seed, overrides, need_all)
        if command == "visualize":
            path, (width, height) = run(model, info, ecfg, ccfg, bound_inputs(info["module"], info["config"]), console)
            return console.print(f"wrote {path} ({width} x {height} px)")
        files = [evaluate.__file__, common.__file__, __file__]
        if info["method"] in METHODS:  # a fork's code is the checkpoint's, which the result folder holds too
            files.append(info["module"].__file__)
        result, out = run(model, info, ecfg, ccfg, files, console)
        if result:
            m, init = result["metrics"], " (random init)" if ecfg.random_init else ""
            top = f"top-1 {m['top1']:.4f}, top-5 {m['top5']:.4f} ({result['wall_s']:.0f} s)"
            console.print(f"{command} {result['method']}{init} on {result['data']}: {top}; result folder {out}")

    app.command(command, help=run.__doc__.strip().splitlines()[0], **RAW)(evaluation_body)


evaluation_command("knn", evaluate.KnnConfig, evaluate.run_knn)
evaluation_command("linprobe", evaluate.LinprobeConfig, evaluate.run_linprobe)
evaluation_command("finetune", evaluate.FinetuneConfig, evaluate.run_finetune)
evaluation_command("visualize", evaluate.VisualizeConfig, evaluate.run_visualize)


@app.command(**RAW)
def separability(ctx: typer.Context):
    """Linear separability of two images in the latent of their mixture (OUR metric; see separability.py)."""
    source, (scfg,) = run_args(ctx, [evaluation.separability.SeparabilityConfig])
    evaluation.separability.run(source, scfg, method_of, console)


@app.command(**RAW)
def export(ctx: typer.Context):
    """Write the encoder as a plain state dict in timm VisionTransformer names; print the timm call that loads it."""
    source, (xcfg,) = run_args(ctx, [evaluate.ExportConfig])
    evaluate.run_export(source, xcfg, method_of, console)


def error(message, code=2):
    """Print a one-line error; return the exit code."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return code


def main(args=None):
    """app(ARGS), each error one line: bad input (a ValueError, a usage error of click's) exits 2, a diverged run 1,
    a stopped one 130. `python cli.py` alone prints the help."""
    try:
        code = app(list(sys.argv[1:] if args is None else args) or ["--help"], standalone_mode=False)
    except (ValueError, SyntaxError, FloatingPointError, InterruptedError) as e:
        code = error(str(e), {FloatingPointError: 1, InterruptedError: 130}.get(type(e), 2))
    except typer.Abort:
        code = 130
    except ClickError as e:  # click's usage errors: no such command, ...
        ctx = getattr(e, "ctx", None)
        code = error(e.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx else ""), e.exit_code)
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
