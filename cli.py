"""The one command line of the project.

    python cli.py pretrain mae --preset cifar      # presets: tiny, cpu (default), cifar, ...
    python cli.py pretrain my_idea.py --my-knob 1  # a fork: an edited copy of mae.py
    python cli.py knn runs/NAME                    # also linprobe, finetune, visualize, export
    python cli.py bench pr-mim --compare mae       # FLOPs, memory and time of a training step

Every option is a dataclass field (a method's Config, common.TrainConfig, one per command), its
comment the --help text. Values: the default < --preset < --model < the options given. A method
is a built-in name or a method file (the contract: docs/design.md); a run carries its code, from
which the evaluation commands rebuild a fork's model.
"""

import ast
import dataclasses
import difflib
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
import evaluation.export
import evaluation.separability
import imae
import mae
import pr_mim
import revcolv2
import simmim
from evaluation import finetune, loading, pictures, plots, probes, tables

console = Console()
err_console = Console(stderr=True)
# typer vendors click instead of requiring it: its usage errors are of typer's copy of click
ClickError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
MODULES = {"mae": mae, "simmim": simmim, "pr-mim": pr_mim, "i-mae": imae, "revcolv2": revcolv2}
METHODS = {name: (module, loading.model_class(module)) for name, module in MODULES.items()}


def find_method(name_or_path, what="method"):
    """(name, module, model class) of a built-in method's name or of a method file's path."""
    path = Path(name_or_path)
    builtin = {Path(module.__file__).resolve(): name for name, module in MODULES.items()}
    name = builtin.get(path.resolve(), name_or_path)  # `python mae.py` is `pretrain mae`
    if name in METHODS:
        return name, *METHODS[name]
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"unknown {what} {name!r}: {method_hint(path)}")
    return path.stem, *loading.load_method(path.stem, path.read_text(), str(path))


def method_hint(path):
    """What an unknown method name probably meant: its method file, or the nearest built-in names
    and method files of its folder; else the choices."""
    if path.with_suffix(".py").is_file() and path.suffix != ".py":
        return f"did you mean {path.with_suffix('.py')}?"
    folder = path.parent if path.parent.is_dir() else Path(".")
    files = {p.name: str(p) for p in folder.glob("*.py") if p.stem not in ("cli", "common")}
    names = [*METHODS, *files]
    close = difflib.get_close_matches(path.name, names, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(files.get(c, c) for c in close) + "?"
    return f"choose one of {', '.join(METHODS)}, or a method file"


def method_of(name, ckpt):
    """loading.load_model's resolver: a built-in method, else the method file that the
    checkpoint carries."""
    if name in METHODS:
        return METHODS[name]
    source = (ckpt.get("code") or {}).get(f"{name}.py")
    if source is None:
        choices = ", ".join(METHODS)
        raise ValueError(f"the checkpoint's method {name!r} is none of {choices}; no code in it")
    return loading.load_method(name, source, f"{name}.py")


def load_whole_model(source):
    """(model, info) of a run or checkpoint, decoder included, as the evaluation commands load it
    (an official MAE one too): the loader that pretrain hands a method's prepare_pretrain."""
    return loading.load_model(source, method_of, method="mae", need_all=True)


def bound_inputs(module, cfg):
    """The method's sample_inputs(cfg, generator) with cfg bound, picklable for data workers; None
    if it has none."""
    if not hasattr(module, "sample_inputs"):
        return None
    return functools.partial(module.sample_inputs, cfg)


def normalized_target(cfg):
    """Whether the model predicts per-patch normalised pixels, which pictures put back."""
    return getattr(cfg, "norm_pix_loss", False)


# --------------------------------------------------------------------------------------------------
# Options: the fields of dataclasses, `--field-name VALUE`, `--flag`, `--no-flag`


def field_help(cls):
    """{field: the comment on its line} in the source of dataclass `cls`: its --help text."""
    source = inspect.getsource(cls)
    tokens = tokenize.generate_tokens(iter(source.splitlines(True)).__next__)
    comments = {t.start[0]: t.string.lstrip("# ") for t in tokens if t.type == tokenize.COMMENT}
    fields = [node for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)]
    return {f.target.id: comments.get(f.end_lineno, comments.get(f.lineno, "")) for f in fields}


def field_types(classes):
    """{field: its type} of the dataclasses `classes`, `int | None` read as int."""
    types = {}
    for cls in classes:
        for name, hint in typing.get_type_hints(cls).items():
            types[name] = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    return types


def print_help(usage, doc, classes, preset):
    """Every option of `classes` with its type, help text and default (and `preset`'s value)."""
    types = field_types(classes)
    typer.echo(f"Usage: {usage} [OPTIONS]\n\n{doc}")
    for cls in classes:
        typer.echo(f"\n{cls.__name__} ({Path(inspect.getfile(cls)).name}):")
        help_text = field_help(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if types[f.name] is bool:
                flag = f"{flag}/--no-{flag[2:]}"
            else:
                flag = f"{flag} {types[f.name].__name__.upper()}"
            default = repr(f.default)
            if f.name in preset:
                default = f"{preset[f.name]!r} from --preset {Scale.preset}, {default} without"
            typer.echo(f"  {flag:<36} {help_text[f.name]} [default: {default}]")


def parse(args, usage, doc, classes, preset):
    """(positional arguments, {field: value given}) of ARGS, the options being the fields of
    `classes`; with --help, print_help and exit."""
    if "--help" in args:
        print_help(usage, doc, classes, preset)
        raise typer.Exit()
    types = field_types(classes)
    see = f" (see `{usage} --help`)"
    positional = []
    given = {}
    args = list(args)
    while args:
        arg = args.pop(0)
        flag, eq, value = arg.partition("=")
        name = flag[2:].replace("-", "_")
        if not arg.startswith("--"):
            positional.append(arg)
        elif not eq and types.get(name.removeprefix("no_")) is bool:  # --flag, --no-flag
            given[name.removeprefix("no_")] = not name.startswith("no_")
        elif name not in types:
            close = difflib.get_close_matches(name, types, n=1)
            hint = f": did you mean --{close[0].replace('_', '-')}?" if close else ""
            raise ValueError(f"no such option {flag}{hint}{see}")
        elif types[name] is bool:
            raise ValueError(f"{flag} is a flag: pass {flag} or --no-{flag[2:]}{see}")
        elif not (eq or args):
            raise ValueError(f"{flag} needs a value{see}")
        else:
            value = value if eq else args.pop(0)
            try:
                given[name] = types[name](value)
            except ValueError:
                kind = types[name].__name__
                raise ValueError(
                    f"Invalid value for '{flag}': {value!r} is not a {kind}{see}"
                ) from None
    return positional, given


def build(cls, values):
    """cls(**the values that are its fields); a ValueError names a bad option."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclasses.dataclass
class Scale:  # options of pretrain and bench
    preset: str = "cpu"  # scale preset: tiny | cpu | cifar | tiny-imagenet | imagenet
    model: str = ""  # ViT size: tiny | small | base | large | huge, over the preset's widths


POSITIVE_SIZES = {
    "img_size",
    "patch_size",
    "embed_dim",
    "num_heads",
    "decoder_embed_dim",
    "decoder_num_heads",
}


def preset_values(module, preset):
    """The preset's values, with the method's own changes to it (its PRESET_CHANGES)."""
    changes = getattr(module, "PRESET_CHANGES", {}).get(preset, {})
    return {**common.PRESETS[preset], **changes}


def resolve(module, preset, model, given, overrides=None):
    """Config and TrainConfig from: the dataclass defaults < the preset < the model size < the
    options < overrides."""
    if preset not in common.PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(common.PRESETS)}")
    if model and model not in common.VIT_SIZES:
        sizes = ", ".join(common.VIT_SIZES)
        raise ValueError(f"unknown model size {model!r}: choose one of {sizes}")
    values = {**preset_values(module, preset), **common.VIT_SIZES.get(model, {})}
    values.update(given)
    values.update(overrides or {})
    tcfg = build(common.TrainConfig, values)
    channels = data_sets.channels(tcfg.data)
    if values.setdefault("in_chans", channels) != channels:
        raise ValueError(
            f"--in-chans {values['in_chans']} does not match {tcfg.data}, which has {channels} "
            "channel(s): drop --in-chans, it is set from the data"
        )
    for name in (f.name for f in dataclasses.fields(module.Config) if f.name in values):
        value = values[name]
        flag = "--" + name.replace("_", "-")
        if type(value) in (int, float) and value < 0:  # sizes, ratios, rates: never below zero
            raise ValueError(f"{flag} must not be negative, got {value}")
        if name in POSITIVE_SIZES and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        if heads in values and width in values and values[width] % values[heads]:
            flags = f"--{width.replace('_', '-')} {values[width]}"
            raise ValueError(f"{flags} is not divisible by {values[heads]} heads: change one")
    return build(module.Config, values), tcfg


# --------------------------------------------------------------------------------------------------
# The commands: each reads its own arguments (ctx.args), its options from the dataclasses above

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    help=__doc__.split("\n")[0],
)
RAW = dict(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)


def method_args(ctx, classes):
    """(name, module, model class, Scale, {field: value} of the other options) of
    `COMMAND NAME_OR_PATH [OPTIONS]`."""
    if not ctx.args or ctx.args == ["--help"]:
        typer.echo(ctx.get_help())
        raise typer.Exit()
    name, module, model_cls = find_method(ctx.args[0])
    usage = f"python cli.py {ctx.info_name} {ctx.args[0]}"
    doc = f"{(module.__doc__ or name).strip().splitlines()[0]}\n{ctx.command.help}"
    options = [Scale, *classes, module.Config]
    preset = preset_values(module, Scale.preset)  # what --help shows
    positional, given = parse(ctx.args[1:], usage, doc, options, preset)
    if positional:
        got = f"got {positional[0]!r} (see `{usage} --help`)"
        raise ValueError(f"{ctx.info_name} takes one method then options, {got}")
    scale = build(Scale, given)
    given = {k: v for k, v in given.items() if k not in ("preset", "model")}
    return name, module, model_cls, scale, given


def run_args(ctx, classes):
    """(RUN_OR_CKPT, [each of `classes` built]) of `COMMAND RUN_OR_CKPT [OPTIONS]`; the command
    alone: its help. RUN_OR_CKPT: a run folder, a checkpoint of ours or of the official MAE."""
    usage = f"python cli.py {ctx.info_name} RUN_OR_CKPT"
    positional, given = parse(ctx.args or ["--help"], usage, ctx.command.help, classes, {})
    if len(positional) != 1:
        got = f"got {len(positional)} (see `{usage} --help`)"
        raise ValueError(f"{ctx.info_name} takes one run or checkpoint, {got}")
    return positional[0], [build(cls, given) for cls in classes]


@app.command(**RAW)
def pretrain(ctx: typer.Context):
    """Pre-train NAME_OR_PATH: mae, simmim, pr-mim, i-mae, revcolv2 or a method file; `--help`
    after it lists the options."""
    name, module, model_cls, scale, given = method_args(ctx, [common.TrainConfig])
    cfg, tcfg = resolve(module, scale.preset, scale.model, given)
    cfg, tcfg = common.prepare_run(name, cfg, tcfg, given)
    rank, world, device = common.setup(tcfg)
    common.torch.manual_seed(tcfg.seed)
    net = model_cls(cfg)
    sample_inputs = bound_inputs(module, cfg)
    if hasattr(net, "prepare_pretrain"):  # e.g. i-MAE's frozen teacher; evaluation never calls it
        say = console.print if rank == 0 else lambda *args: None
        net.prepare_pretrain(load_whole_model, say, resume=tcfg.resume)
    loaders = data_sets.pretrain_loaders(tcfg, cfg.img_size, sample_inputs, device, rank, world)
    picture = None
    if tcfg.vis_every:  # reconstructions of the first held-out images, every --vis-every epochs
        val_set = data_sets.load_dataset(
            tcfg.data, "val", tcfg.data_dir, tcfg.val_size, cfg.img_size
        )
        picture = functools.partial(
            save_picture, val_set, tcfg, cfg.img_size, sample_inputs, normalized_target(cfg)
        )
    code_files = [module.__file__, common.__file__]
    knn = probes.knn_monitor(tcfg, cfg.img_size)  # --knn-every: kNN top-1 while it trains
    try:  # an error found in training (e.g. too few images for a step) exits 1, as a diverged run
        out = common.pretrain(net, cfg, tcfg, *loaders, name, code_files, picture, knn)
    except ValueError as e:
        raise typer.Exit(error(str(e), 1)) from None
    if rank == 0:
        console.print(f"done: log {out / 'log.jsonl'}, checkpoint {out / 'checkpoint.pt'}")


def save_picture(val_set, tcfg, img_size, sample_inputs, normalized, model, path, title):
    """pretrain --vis-every's picture: every process runs the model, the first (path) saves."""
    shown = (model, val_set, tcfg.data, img_size, sample_inputs, normalized)
    columns, note = pictures.reconstructions(*shown, seed=tcfg.seed)
    if path:
        pictures.save_grid(columns, path, f"{title} {note}; masks seed {tcfg.seed}")


@app.command(**RAW)
def bench(ctx: typer.Context):
    """Measure the costs of a training step of NAME_OR_PATH; rows: the --compare base, the
    method, the --vary rows. With --data: the images/s of its pre-training data loader alone."""
    name, module, model_cls, scale, given = method_args(ctx, [evaluation.bench.BenchConfig])
    own = {k: v for k, v in given.items() if k in module.Config.__dataclass_fields__}
    configs = functools.partial(resolve, preset=scale.preset, model=scale.model, given=own)
    b = build(evaluation.bench.BenchConfig, given)
    evaluation.bench.main(b, name, module, model_cls, configs, find_method, console, err_console)


# Evaluation: thin commands over evaluation/ (the protocol: docs/evaluation.md)


def evaluation_command(command, options, run):
    """`COMMAND RUN_OR_CKPT [OPTIONS]`: the options of loading.EvalConfig and of `options`, then
    run(model, info, ...)."""

    def evaluation_body(ctx: typer.Context):
        source, (ecfg, ccfg) = run_args(ctx, [loading.EvalConfig, options])
        overrides = {"drop_path": ccfg.drop_path} if command == "finetune" else {}
        need_all = command == "visualize" and not ecfg.random_init  # pictures need the decoder
        method = ecfg.method or "mae"  # of checkpoints that name none (facebookresearch/mae's)
        load = (source, method_of, method, ecfg.random_init, ecfg.seed, overrides, need_all)
        model, info = loading.load_model(*load)
        if command == "visualize":
            cfg = info["config"]
            inputs = bound_inputs(info["module"], cfg)
            shown = run(model, info, ecfg, ccfg, inputs, normalized_target(cfg), console)
            path, (width, height) = shown
            return console.print(f"wrote {path} ({width} x {height} px)")
        files = [common.__file__, __file__]  # and evaluation/'s, which start_result copies
        if info["method"] in METHODS:  # a fork's code is the checkpoint's, copied too
            files.append(info["module"].__file__)
        result, out = run(model, info, ecfg, ccfg, files, console)
        if result:
            m = result["metrics"]
            init = " (random init)" if ecfg.random_init else ""
            top = f"top-1 {m['top1']:.4f}, top-5 {m['top5']:.4f} ({result['wall_s']:.0f} s)"
            what = f"{command} {result['method']}{init} on {result['data']}"
            console.print(f"{what}: {top}; result folder {out}")

    summary = run.__doc__.strip().split("\n\n")[0]  # its docstring's first paragraph
    app.command(command, help=summary, **RAW)(evaluation_body)


evaluation_command("knn", probes.KnnConfig, probes.run_knn)
evaluation_command("linprobe", probes.LinprobeConfig, probes.run_linprobe)
evaluation_command("finetune", finetune.FinetuneConfig, finetune.run_finetune)
evaluation_command("visualize", pictures.VisualizeConfig, pictures.run_visualize)


@app.command(**RAW)
def separability(ctx: typer.Context):
    """Linear separability of two images in the latent of their mixture (OUR metric; see
    evaluation/separability.py)."""
    source, (scfg,) = run_args(ctx, [evaluation.separability.SeparabilityConfig])
    evaluation.separability.run(source, scfg, method_of, console)


@app.command(**RAW)
def export(ctx: typer.Context):
    """Write the encoder as a plain state dict in timm VisionTransformer names; print the timm
    call that loads it."""
    source, (xcfg,) = run_args(ctx, [evaluation.export.ExportConfig])
    evaluation.export.run_export(source, xcfg, method_of, console)


@app.command(**RAW)
def table(ctx: typer.Context):
    """Runs side by side: their knn, linprobe and finetune top-1 beside the random-init floors,
    with the seeds behind each, and their held-out loss (evaluation/tables.py)."""
    usage = "python cli.py table RUN [RUN ...]"
    options = [tables.TableConfig]
    folders, given = parse(ctx.args or ["--help"], usage, ctx.command.help, options, {})
    if not folders:
        raise ValueError(f"table takes run folders, got none (see `{usage} --help`)")
    tcfg = build(tables.TableConfig, given)
    text = tables.table(tables.collect(folders), first=list(METHODS))
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    if tcfg.readme:
        tables.update_readme(tcfg.readme, text)
        console.print(f"updated {tcfg.readme}")


@app.command(**RAW)
def plot(ctx: typer.Context):
    """Runs side by side in one picture: the training loss, the held-out loss and the kNN curve of
    each (evaluation/plots.py)."""
    usage = "python cli.py plot RUN [RUN ...] --out FILE.png"
    options = [plots.PlotConfig]
    folders, given = parse(ctx.args or ["--help"], usage, ctx.command.help, options, {})
    if not folders:
        raise ValueError(f"plot takes run folders, got none (see `{usage} --help`)")
    pcfg = build(plots.PlotConfig, given)
    plots.plot(folders, pcfg.out)
    console.print(f"wrote {pcfg.out}: {len(folders)} run(s)")


def error(message, code=2):
    """Print a one-line error; return the exit code."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return code


EXIT_CODES = {FloatingPointError: 1, InterruptedError: 130}  # a diverged run, a stopped one


def main(args=None):
    """app(ARGS), each error one line: bad input (a ValueError, a usage error of click's) exits
    2, a diverged run 1, a stopped one 130. `python cli.py` alone prints the help."""
    args = list(sys.argv[1:] if args is None else args)
    try:
        code = app(args or ["--help"], standalone_mode=False)
    except (ValueError, SyntaxError, FloatingPointError, InterruptedError) as e:
        code = error(str(e), EXIT_CODES.get(type(e), 2))
    except typer.Abort:
        code = 130
    except ClickError as e:  # click's usage errors: no such command, ...
        ctx = getattr(e, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx else ""
        code = error(e.format_message() + see, e.exit_code)
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
