"""The one command line of the project.

    python cli.py pretrain mae --preset cifar       # presets: tiny, cpu (the default), cifar, tiny-imagenet, imagenet
    python cli.py pretrain mae --help               # every field of mae.Config and common.TrainConfig is an option
    python cli.py pretrain my_idea.py --my-knob 1   # a fork, e.g. an edited copy of mae.py; or `python my_idea.py`
    python cli.py knn runs/NAME                     # also linprobe, finetune, visualize, separability, export
    python cli.py bench pr-mim --compare mae        # parameters, FLOPs, memory and time of a step (--data: the loader)
    python cli.py results runs/ --readme README.md  # rebuild the README's results table from result folders

Every option is a field of a dataclass (a method's Config, common.TrainConfig, evaluate.py's EvalConfig and one
per command, the few below), written once with its default; the comment beside it is its --help text. Values:
the default < --preset < --model < the options given (`--field-name VALUE`, `--flag`, `--no-flag`).

A method is a built-in name (METHODS) or a method file anywhere: a .py file with a dataclass `Config` and an
nn.Module class with a `forward_features` method (its own or inherited; of several, the most derived), the model:
cls(cfg), forward(imgs, **inputs) -> (loss, pred, mask); optional: sample_inputs(cfg, generator), BENCH_VARIANTS
(extra bench rows), a model method prepare_pretrain(say, resume). A run records its method (the built-in name or
the file's stem) and carries its code, from which the evaluation commands rebuild a fork's model.
"""

import ast
import dataclasses
import functools
import inspect
import json
import sys
import tokenize
import types
import typing
from datetime import datetime
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

import common
import data_sets
import imae
import mae
import pr_mim
import revcolv2
import simmim
from evaluation import evaluate
from evaluation import separability as separability_lib

console, err_console = Console(), Console(stderr=True)
OFFICIAL = "mae"  # the method of checkpoints that do not name one (those of facebookresearch/mae)


def model_class(module):
    """A method file's model: its nn.Module class with a forward_features method (of several, the most derived)."""
    found = [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__]
    found = [c for c in found if issubclass(c, common.torch.nn.Module) and hasattr(c, "forward_features")]
    found = [c for c in found if not any(issubclass(d, c) for d in found if d is not c)]
    if len(found) != 1 or not dataclasses.is_dataclass(getattr(module, "Config", None)):
        raise ValueError(f"{module.__file__} needs a dataclass Config and one model class with forward_features")
    return found[0]


METHODS = {  # command-line name: (method file, model class)
    name: (module, model_class(module))
    for name, module in {"mae": mae, "simmim": simmim, "pr-mim": pr_mim, "i-mae": imae, "revcolv2": revcolv2}.items()
}


def load_method(name, source, filename):
    """(module, model class) of a method file's source, run as the module `name` and kept in sys.modules, where
    data-loading workers find its functions."""
    if name not in sys.modules and name not in METHODS:
        code = compile(source, filename, "exec")  # a SyntaxError: bad input, for main
        module = sys.modules[name] = types.ModuleType(name)
        module.__file__, module.__source__ = filename, source
        exec(code, vars(module))
    if getattr(sys.modules.get(name), "__source__", None) != source:
        raise ValueError(f"{filename}: the name {name!r} is taken by a method or a module: rename the file")
    return sys.modules[name], model_class(sys.modules[name])


def find_method(name_or_path, what="method"):
    """(name, module, model class) of a built-in method's name or of a method file's path."""
    path = Path(name_or_path)
    builtin = {Path(module.__file__).resolve(): name for name, (module, _) in METHODS.items()}
    name_or_path = builtin.get(path.resolve(), name_or_path)  # `python mae.py` is `pretrain mae`
    if name_or_path in METHODS:
        return name_or_path, *METHODS[name_or_path]
    if path.suffix != ".py" or not path.is_file():
        raise ValueError(f"unknown {what} {name_or_path!r}: choose one of {', '.join(METHODS)}, or a method file")
    return path.stem, *load_method(path.stem, path.read_text(), str(path))


def method_of(name, ckpt):
    """evaluate.load_model's resolver: a built-in method, else the method file that the checkpoint carries."""
    source = (ckpt.get("code") or {}).get(f"{name}.py")
    if name not in METHODS and source is None:
        raise ValueError(f"the checkpoint's method {name!r} is none of {', '.join(METHODS)} and its code is missing")
    return METHODS[name] if name in METHODS else load_method(name, source, f"{name}.py")


# ----------------------------------------------------------------------------------------------------
# Options: the fields of dataclasses, `--field-name VALUE`, `--flag`, `--no-flag`


def field_help(cls):
    """{field: the comment on its line} in the source of dataclass `cls`: its --help text."""
    source = inspect.getsource(cls)
    tokens = tokenize.generate_tokens(iter(source.splitlines(True)).__next__)
    comments = {t.start[0]: t.string.lstrip("# ") for t in tokens if t.type == tokenize.COMMENT}
    fields = [node for node in ast.parse(source).body[0].body if isinstance(node, ast.AnnAssign)]
    return {f.target.id: comments.get(f.end_lineno, comments.get(f.lineno, "")) for f in fields}


def field_types(classes):
    """{field: type} of the dataclasses `classes` (X for `X | None`)."""
    hints = {name: t for cls in classes for name, t in typing.get_type_hints(cls).items()}
    return {name: next((a for a in typing.get_args(t) if a is not type(None)), t) for name, t in hints.items()}


def show_help(usage, doc, classes, preset_for):
    """Every field of `classes` as an option: type, help, default (and the default preset's value, for preset_for)."""
    kinds, preset = field_types(classes), common.PRESETS[Scale.preset]
    typer.echo(f"Usage: {usage} [OPTIONS]\n\n{doc}")
    for cls in classes:
        typer.echo(f"\n{cls.__name__} ({Path(inspect.getfile(cls)).name}):")
        help_text = field_help(cls)
        for f in dataclasses.fields(cls):
            flag, kind = "--" + f.name.replace("_", "-"), kinds[f.name]
            flag = f"{flag}/--no-{flag[2:]}" if kind is bool else f"{flag} {kind.__name__.upper()}"
            default = f"{f.default!r}"
            if cls in preset_for and f.name in preset:
                default = f"{preset[f.name]!r} from --preset {Scale.preset}, {default} without"
            typer.echo(f"  {flag:<36} {help_text[f.name]} [default: {default}]")
    raise typer.Exit()


def parse(args, usage, doc, classes, preset_for=()):
    """(positional arguments, {field: value given}) of ARGS; with --help, show_help."""
    if "--help" in args:
        show_help(usage, doc, classes, preset_for)
    kinds, see = field_types(classes), f" (see `{usage} --help`)"
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
            value = value if eq else args.pop(0)
            try:
                given[name] = kinds[name](value)
            except ValueError:
                raise ValueError(
                    f"Invalid value for '{flag}': {value!r} is not a {kinds[name].__name__}{see}"
                ) from None
    return positional, given


def build(cls, values):
    """cls(**the values that are its fields); a ValueError names the bad option."""
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


@dataclasses.dataclass
class Scale:  # options of pretrain and bench
    preset: str = "cpu"  # scale preset: tiny | cpu | cifar | tiny-imagenet | imagenet (common.PRESETS)
    model: str = ""  # ViT size: tiny | small | base | large | huge (common.VIT_SIZES), over the preset's widths


POSITIVE_SIZES = {"img_size", "patch_size", "embed_dim", "num_heads", "decoder_embed_dim", "decoder_num_heads"}


def resolve(module, preset, model, given):
    """Config and TrainConfig from: the dataclass defaults < the preset < the model size < the options."""
    if preset not in common.PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(common.PRESETS)}")
    if model and model not in common.VIT_SIZES:
        raise ValueError(f"unknown model size {model!r}: choose one of {', '.join(common.VIT_SIZES)}")
    values = {**common.PRESETS[preset], **common.VIT_SIZES.get(model, {}), **given}
    tcfg = build(common.TrainConfig, values)
    if tcfg.data not in data_sets.DATASETS:
        raise ValueError(f"unknown data set {tcfg.data!r}: choose one of {', '.join(data_sets.DATASETS)}")
    channels = data_sets.DATASETS[tcfg.data][0]
    if values.setdefault("in_chans", channels) != channels:
        raise ValueError(
            f"--in-chans {values['in_chans']} does not match {tcfg.data}, which has {channels} channel(s): drop "
            "--in-chans, it is set from the data"
        )
    for name in (f.name for f in dataclasses.fields(module.Config) if f.name in values):
        value, flag = values[name], "--" + name.replace("_", "-")
        if type(value) in (int, float) and value < 0:  # sizes, ratios, rates: none means anything below zero
            raise ValueError(f"{flag} must not be negative, got {value}")
        if name in POSITIVE_SIZES and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    return build(module.Config, values), tcfg


def prepare_out(method, tcfg, given):
    """The run folder: refuse to mix two runs in one folder; on --resume, the saved configs."""
    if not tcfg.out and tcfg.resume:
        raise ValueError("--resume needs --out, the folder of the run to continue")
    out = Path(tcfg.out or f"runs/{method}-{tcfg.data}-{datetime.now():%Y%m%d-%H%M%S}")
    tcfg.out = str(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder: pass a folder")
    if not tcfg.resume:
        if ((out / "checkpoint.pt").exists() or (out / "log.jsonl").exists()) and not tcfg.overwrite:
            raise ValueError(f"{out} already holds a run: pass --resume to continue it, --overwrite, or another --out")
        return None
    ckpt = common.load_checkpoint(out / "checkpoint.pt")
    if ckpt.get("method") != method:
        raise ValueError(f"{out} holds a {ckpt.get('method')!r} run, not {method!r}")
    saved = {**ckpt["config"], **ckpt["train"]}
    changed = [k for k in sorted(given) if k not in common.RESUME_MAY_CHANGE and saved.get(k) != given[k]]
    if changed:
        drop = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ValueError(f"--resume continues {out} with its saved settings; drop {drop}")
    return ckpt["config"], {**ckpt["train"], **{k: v for k, v in given.items() if k in common.RESUME_MAY_CHANGE}}


def bound_inputs(module, cfg):
    """The method's sample_inputs(cfg, generator) with cfg bound, picklable for data workers (None if it has none)."""
    return functools.partial(module.sample_inputs, cfg) if hasattr(module, "sample_inputs") else None


# ----------------------------------------------------------------------------------------------------
# The commands: each reads its own arguments (ctx.args), so its options come from the dataclasses above

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Masked image modeling: one file per method, one command line.",
)
RAW = dict(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False)


def method_args(ctx, classes):
    """(name, module, model class, {field: value}) of `COMMAND NAME_OR_PATH [OPTIONS]`."""
    if not ctx.args or ctx.args == ["--help"]:
        typer.echo(ctx.get_help())
        raise typer.Exit()
    name, module, model_cls = find_method(ctx.args[0])
    usage = f"python cli.py {ctx.info_name} {ctx.args[0]}"
    doc = f"{(module.__doc__ or name).strip().splitlines()[0]}\n{ctx.command.help}"
    positional, given = parse(ctx.args[1:], usage, doc, [Scale, *classes, module.Config], (module.Config, *classes))
    if positional:
        raise ValueError(
            f"{ctx.info_name} takes one method, then options; got {positional[0]!r} (see `{usage} --help`)"
        )
    return name, module, model_cls, given


def run_args(ctx, classes):
    """(RUN_OR_CKPT, {field: value}) of `COMMAND RUN_OR_CKPT [OPTIONS]`; the command alone prints its help."""
    usage = f"python cli.py {ctx.info_name} RUN_OR_CKPT"  # a run folder, a checkpoint of ours or of official MAE
    positional, given = parse(ctx.args or ["--help"], usage, ctx.command.help, classes)
    if len(positional) != 1:
        raise ValueError(
            f"{ctx.info_name} takes one run folder or checkpoint, got {len(positional)} (see `{usage} --help`)"
        )
    return positional[0], given


@app.command(**RAW)
def pretrain(ctx: typer.Context):
    """Pre-train NAME_OR_PATH: mae, simmim, pr-mim, i-mae, revcolv2 or a method file; `--help` after it lists the
    options."""
    name, module, model_cls, given = method_args(ctx, [common.TrainConfig])
    scale, given = build(Scale, given), {k: v for k, v in given.items() if k not in ("preset", "model")}
    cfg, tcfg = resolve(module, scale.preset, scale.model, given)
    saved = prepare_out(name, tcfg, given)
    if saved:  # --resume: rebuild exactly the saved run
        cfg, tcfg = module.Config(**saved[0]), common.TrainConfig(**saved[1])
    train_set = data_sets.load_dataset(tcfg.data, "train", tcfg.data_dir, tcfg.train_size, cfg.img_size, tcfg.download)
    val_set = data_sets.load_dataset(tcfg.data, "val", tcfg.data_dir, tcfg.val_size, cfg.img_size, tcfg.download)
    common.torch.manual_seed(tcfg.seed)
    net, sample_inputs, rank = model_cls(cfg), bound_inputs(module, cfg), common.distributed()[0]
    if hasattr(net, "prepare_pretrain"):  # e.g. i-MAE loads its frozen teacher; evaluation never calls it
        net.prepare_pretrain(console.print if rank == 0 else (lambda *a, **k: None), resume=tcfg.resume)

    def picture(model, path, title):  # --vis-every: reconstructions of the first held-out images; path on rank 0
        columns, note = evaluate.reconstructions(model, val_set, tcfg.data, cfg.img_size, sample_inputs, seed=tcfg.seed)
        if path:
            evaluate.save_grid(columns, path, f"{title} {note}; masks seed {tcfg.seed}")

    code = [module.__file__, common.__file__]
    try:
        rank, world, device = common.setup(tcfg)
        loaders = data_sets.pretrain_loaders(
            train_set, val_set, tcfg.data, cfg.img_size, sample_inputs, tcfg, device, rank, world
        )
        out = common.pretrain(net, cfg, tcfg, *loaders, name, code, picture)
    except ValueError as e:  # found in training (e.g. too few images for a step): exit 1, as a diverged run
        raise typer.Exit(error(str(e), 1)) from None
    if rank == 0:
        console.print(f"done: log {out / 'log.jsonl'}, checkpoint {out / 'checkpoint.pt'}")


@dataclasses.dataclass
class BenchConfig:
    batch_size: int | None = None  # images per step for memory and time (None: 8; with --data: the preset's)
    steps: int = 3  # timed steps per row and round; the median over all rounds is shown
    warmup: int = 1  # untimed steps before them (with --data: untimed batches, at least 2 per worker)
    rounds: int = 3  # rounds over all rows, so load changes on the machine hit every row alike
    compare: str = ""  # a base method measured first, every figure a ratio to it: a built-in name or a method file
    variants: bool = True  # also the rows of the method's BENCH_VARIANTS
    json: bool = False  # print JSON instead of a table
    device: str = "auto"  # auto (GPU if there is one) | cpu | cuda | cuda:N
    data: str = ""  # measure the images/s of the pre-training data loader alone on this data set instead
    data_dir: str = "data"  # with --data: where data sets live
    num_workers: int | None = None  # with --data: data-loading processes (None: the preset's)
    batches: int = 50  # with --data: timed batches


@app.command(**RAW)
def bench(ctx: typer.Context):
    """Measure the costs of a training step of NAME_OR_PATH; rows: the --compare base, the method, its
    BENCH_VARIANTS. With --data: the images/s of its pre-training data loader alone."""
    from evaluation import bench as measure

    name, module, model_cls, given = method_args(ctx, [BenchConfig])
    b, scale = build(BenchConfig, given), build(Scale, given)
    given, device = {k: v for k, v in given.items() if k in field_types([module.Config])}, common.pick_device(b.device)
    log = err_console.print if b.json else console.print
    if b.data:  # the loader alone, with the preset's batch size and workers unless given
        loader = {"data": b.data, "data_dir": b.data_dir, "num_workers": b.num_workers, "batch_size": b.batch_size}
        cfg, tcfg = resolve(
            module, scale.preset, scale.model, given | {k: v for k, v in loader.items() if v is not None}
        )
        train_set = data_sets.load_dataset(tcfg.data, "train", tcfg.data_dir, tcfg.train_size, cfg.img_size)
        warmup, inputs = max(b.warmup, 2 * tcfg.num_workers), bound_inputs(module, cfg)
        args = train_set, tcfg.data, cfg.img_size, inputs, tcfg.batch_size, b.batches, warmup, tcfg.num_workers
        result = {"method": name, "data": tcfg.data, "img_size": cfg.img_size}
        result |= measure.loader_throughput(*args, device, tcfg.seed)
        title = f"{name}'s pre-training data loader alone: {result['images']} images, augmentation + sample_inputs"
        table = measure.loader_table(
            result, f"{title} in the workers, {result['warmup_batches']} batches untimed first"
        )
    else:
        rows = []
        for n, m, c in [find_method(b.compare, "--compare")] if b.compare else []:
            rows.append((n, c, resolve(m, scale.preset, scale.model, given)[0], getattr(m, "sample_inputs", None)))
        variants = getattr(module, "BENCH_VARIANTS", {}) if b.variants else {}
        for label, overrides in [(name, {}), *((f"{name}: {k}", v) for k, v in variants.items())]:
            try:
                cfg = resolve(module, scale.preset, scale.model, {**given, **overrides})[0]
            except ValueError as e:
                if not overrides:
                    raise
                log(f"[dim]skipped {escape(label)}: {escape(str(e))}[/]")
                continue
            rows.append((label, model_cls, cfg, getattr(module, "sample_inputs", None)))
        batch_size = 8 if b.batch_size is None else b.batch_size
        result = measure.run(rows, batch_size, b.steps, b.warmup, b.rounds, device, log)
        threads = common.torch.get_num_threads()
        title = f"{cfg.img_size} px, patch {cfg.patch_size}, batch {batch_size}, {device}, {threads} threads"
        table = measure.table(result, f"{title}; ratios to the first row, measured in this run")
    if b.json:
        return typer.echo(json.dumps(result, indent=2))
    console.print(table)


# ----------------------------------------------------------------------------------------------------
# Evaluation: thin commands over evaluate.py (the protocol is in its docstring and README.md#evaluation)


def evaluation_command(command, ccls, run):
    """`COMMAND RUN_OR_CKPT [OPTIONS]`: the options of evaluate.EvalConfig and `ccls`, then run(model, info, ...)."""

    def evaluation(ctx: typer.Context):
        source, given = run_args(ctx, [evaluate.EvalConfig, ccls])
        ecfg, ccfg = build(evaluate.EvalConfig, given), build(ccls, given)
        overrides = {"drop_path": ccfg.drop_path} if command == "finetune" else {}
        need_all = command == "visualize" and not ecfg.random_init  # reconstructions need the decoder
        method = ecfg.method or OFFICIAL
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

    app.command(command, help=run.__doc__.strip().splitlines()[0], **RAW)(evaluation)


evaluation_command("knn", evaluate.KnnConfig, evaluate.run_knn)
evaluation_command("linprobe", evaluate.LinprobeConfig, evaluate.run_linprobe)
evaluation_command("finetune", evaluate.FinetuneConfig, evaluate.run_finetune)
evaluation_command("visualize", evaluate.VisualizeConfig, evaluate.run_visualize)


@dataclasses.dataclass
class SeparabilityConfig:
    random_init: bool = False  # score the run's architecture with random weights (the floor)
    reference: str = ""  # the clean images' latents from this run's encoder, not RUN's (e.g. i-MAE's MAE teacher)
    images: int = 1024  # held-out images: half to fit the linear maps, half to test them
    alphas: str = ",".join(map(str, separability_lib.ALPHAS))  # subordinate weights α, in (0, 0.5]
    seed: int = 0  # seeds the pairs (and the random weights of --random-init)
    batch_size: int = 256  # images per forward pass
    json: bool = False  # print one JSON object instead of the table

    def __post_init__(self):
        try:
            self.alpha_values = [float(a) for a in self.alphas.split(",")]
        except ValueError:
            raise ValueError(f"--alphas must be numbers separated by commas, got {self.alphas!r}") from None
        if not all(0 < a <= 0.5 for a in self.alpha_values) or self.images < 4 or self.batch_size < 1:
            raise ValueError("--alphas must be subordinate weights in (0, 0.5], --images at least 4, --batch-size 1")


@app.command(**RAW)
def separability(ctx: typer.Context):
    """Linear separability of two images in the latent of their mixture (OUR metric; see separability.py)."""
    from rich.table import Table

    run, given = run_args(ctx, [SeparabilityConfig])
    s = build(SeparabilityConfig, given)
    model, info = evaluate.load_model(run, method_of, OFFICIAL, s.random_init, s.seed)
    cfg, train = info["config"], {"data": "shapes", "data_dir": "", **info["train"]}
    imgs = separability_lib.held_out_images(train["data"], train["data_dir"], cfg.img_size, s.images)
    ref = evaluate.load_model(s.reference, method_of, OFFICIAL)[0].eval() if s.reference else None
    if ref and (ref.cfg.img_size, ref.cfg.patch_size) != (cfg.img_size, cfg.patch_size):
        raise ValueError(f"--reference {s.reference} has another image or patch size than {run}: its tokens differ")
    ref, pixels = ref and ref.forward_features, separability_lib.pixel_features(cfg.patch_size)
    rows, score = separability_lib.measure(
        model.eval().forward_features, imgs, s.alpha_values, s.seed, s.batch_size, ref
    )
    pixel_rows, pixel_score = separability_lib.measure(
        pixels, imgs, s.alpha_values, s.seed, s.batch_size, ref or pixels
    )
    name = f"{info['method']} {'random init' if s.random_init else 'trained'}"
    if s.json:
        report = dict(run=run, method=info["method"], random_init=s.random_init, reference=s.reference or "itself")
        report.update(step=info["ckpt"].get("step"), data=train["data"], images=len(imgs), separability=score)
        return console.print_json(json.dumps(dict(report, rows=rows, pixels=pixel_score, pixel_rows=pixel_rows)))
    table = Table(
        title=f"linear separability (ours): {name}, {run}, {len(imgs)} held-out {train['data']} images, "
        f"latents of the clean images from {s.reference or 'the same encoder'}"
    )
    for column in ("α (subordinate)", "R² sub", "R² dom", "pixels: R² sub", "pixels: R² dom"):
        table.add_column(column, justify="right")
    for r, p in zip(rows, pixel_rows):
        table.add_row(f"{r['alpha']:.2f}", *(f"{x:.3f}" for x in (r["sub"], r["dom"], p["sub"], p["dom"])))
    console.print(table)
    console.print(
        f"separability (mean R² of the subordinate image): {score:.3f} ({name}); raw pixels {pixel_score:.3f}"
    )


@app.command(**RAW)
def export(ctx: typer.Context):
    """Write the encoder as a plain state dict in timm VisionTransformer names; print the timm call that loads it."""
    source, given = run_args(ctx, [evaluate.ExportConfig])
    evaluate.run_export(source, build(evaluate.ExportConfig, given), method_of, console)


@dataclasses.dataclass
class ResultsConfig:
    readme: str = ""  # rewrite the results table in this file (between its markers)
    fresh: bool = False  # drop the table's rows that the given folders do not rebuild


@app.command(**RAW)
def results(ctx: typer.Context):
    """Build the results table (mean ± std over seeds) from result folders (default: runs); print it or put it in
    README."""
    from evaluation import results as results_lib

    paths, given = parse(ctx.args, "python cli.py results [FOLDERS]", ctx.command.help, [ResultsConfig])
    r, rows = build(ResultsConfig, given), results_lib.collect(paths or ["runs"])
    if r.readme:
        results_lib.update_readme(r.readme, rows, r.fresh)
        return console.print(f"updated {r.readme} from {len(rows)} result(s)")
    console.print(results_lib.table(rows), highlight=False, soft_wrap=True, markup=False)


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
    except Exception as e:  # click's usage errors (no such command, ...), told by their format_message and exit_code
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        code = error(e.format_message() + (f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""), e.exit_code)
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
