"""The one command line of the project.

    python cli.py pretrain mae                      # a short real run on the built-in data, on CPU
    python cli.py pretrain mae --preset cifar       # scale presets: tiny, cpu, cifar, tiny-imagenet, imagenet
    python cli.py pretrain mae --help               # every Config and TrainConfig field is an option
    python cli.py knn runs/NAME                     # evaluate: knn, linprobe, finetune (--random-init for the floor)
    python cli.py visualize runs/NAME               # a PNG of masked inputs and reconstructions
    python cli.py results runs/ --readme README.md  # rebuild the README's results table from result folders
    python cli.py bench pr-mim --compare mae        # parameters, FLOPs, memory and time of a step, as ratios
    python cli.py bench mae --data imagenet         # images/s of the pre-training data loader alone
    python cli.py export runs/NAME                  # the encoder as a state dict that timm's VisionTransformer loads

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
import pr_mim
import revcolv2
import simmim
from evaluation import evaluate
from evaluation import separability as separability_lib

METHODS = {  # command-line name: (method file, model class)
    "mae": (mae, mae.MAE),
    "simmim": (simmim, simmim.SimMIM),
    "pr-mim": (pr_mim, pr_mim.PRMIM),
    "i-mae": (imae, imae.IMAE),
    "revcolv2": (revcolv2, revcolv2.RevColV2),
}
DEFAULT_PRESET = "cpu"
OFFICIAL_CHECKPOINT_METHOD = "mae"  # checkpoints of facebookresearch/mae do not name their method

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Masked image modeling: one file per method, one command line.")
pretrain_app = typer.Typer(no_args_is_help=True, help="Pre-train a method: `pretrain METHOD [OPTIONS]`.")
app.add_typer(pretrain_app, name="pretrain")
bench_app = typer.Typer(no_args_is_help=True, help="Measure the costs of a training step: `bench METHOD [OPTIONS]`.")
app.add_typer(bench_app, name="bench")
console, err_console = Console(), Console(stderr=True)


def fail(message, code=2):
    """Print a one-line error and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def field_help(cls):
    """The trailing comment of each dataclass field in `cls`'s source, used as its --help text."""
    lines = inspect.getsource(cls).splitlines()
    return {m[1]: m[2] for m in (re.match(r"\s+(\w+): [^#]+#\s*(.*)$", line) for line in lines) if m}


def dataclass_options(*classes, presets=True):
    """Typer parameters for the fields of `classes`, all defaulting to None (= not given); with
    presets, the help names the default preset's value where it sets one."""
    params = []
    for cls in classes:
        help_text = field_help(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            kind = f.type if isinstance(f.type, type) else typing.get_args(f.type)[0]
            decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
            default = f"(default: {f.default})"
            if presets and f.name in common.PRESETS[DEFAULT_PRESET]:
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


POSITIVE_SIZES = {"img_size", "patch_size", "embed_dim", "num_heads", "decoder_embed_dim", "decoder_num_heads"}


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
    for name in (f.name for f in dataclasses.fields(module.Config) if f.name in values):
        value, flag = values[name], "--" + name.replace("_", "-")
        if type(value) in (int, float) and value < 0:  # sizes, ratios, rates: none means anything below zero
            raise ValueError(f"{flag} must not be negative, got {value}")
        if name in POSITIVE_SIZES and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    return build(module.Config, values), tcfg


# options that may change when a run is resumed: they do not change what the run computes
RESUME_MAY_CHANGE = {"out", "resume", "max_steps", "num_workers", "log_every", "ckpt_every", "compile", "device",
                     "vis_every"}


def prepare_out(method, tcfg, given):
    """The run folder: refuse to mix two runs in one folder; on --resume, the saved configs."""
    if not tcfg.out:
        if tcfg.resume:
            raise ValueError("--resume needs --out, the folder of the run to continue")
        tcfg.out = f"runs/{method}-{tcfg.data}-{datetime.now():%Y%m%d-%H%M%S}"
    out = Path(tcfg.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a run folder: pass a folder")
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
            say = console.print if common.distributed()[0] == 0 else (lambda *a, **k: None)
            net.prepare_pretrain(say, resume=tcfg.resume)
    except ValueError as e:
        fail(str(e))
    sample_inputs = getattr(module, "sample_inputs", None)
    sample_inputs = sample_inputs and _Bound(sample_inputs, cfg)
    files = [module.__file__, common.__file__]

    def picture(model, path, title):  # --vis-every: reconstructions of the first held-out images; path on rank 0
        columns, note = evaluate.reconstructions(model, val_set, tcfg.data, cfg.img_size, sample_inputs, seed=tcfg.seed)
        if path:
            evaluate.save_grid(columns, path, f"{title} {note}; masks seed {tcfg.seed}")

    try:
        out = common.pretrain(net, cfg, tcfg, train_set, val_set, method, files, sample_inputs, console, picture)
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


def run_bench(method, preset, model, batch_size, steps, warmup, rounds, compare, variants, json_out, device,
              data, data_dir, num_workers, batches, **options):
    """Rows: the --compare base, the method's defaults, then its BENCH_VARIANTS; all from the same options.
    With --data: the images per second of the method's training data loader instead."""
    import json

    from evaluation import bench

    given = {k: v for k, v in options.items() if v is not None}
    if data is not None:
        run_bench_loader(method, preset, model, batch_size, warmup, json_out, device, data, data_dir, num_workers,
                         batches, given)
        return
    batch_size = 8 if batch_size is None else batch_size
    log = Console(stderr=True).print if json_out else console.print
    try:
        if compare is not None and compare not in METHODS:
            raise ValueError(f"unknown --compare {compare!r}: choose one of {', '.join(METHODS)}")
        rows = []
        for name in [compare] if compare else []:
            base_module, base_cls = METHODS[name]
            rows.append((name, base_cls, resolve(base_module, preset or DEFAULT_PRESET, model, given)[0],
                         getattr(base_module, "sample_inputs", None)))
        module, model_cls = METHODS[method]
        extra = getattr(module, "BENCH_VARIANTS", {}) if variants else {}
        for label, overrides in [(method, {}), *((f"{method}: {k}", v) for k, v in extra.items())]:
            try:
                cfg = resolve(module, preset or DEFAULT_PRESET, model, {**given, **overrides})[0]
            except ValueError as e:
                if not overrides:
                    raise
                log(f"[dim]skipped {escape(label)}: {escape(str(e))}[/]")
                continue
            rows.append((label, model_cls, cfg, getattr(module, "sample_inputs", None)))
        device = common.pick_device(device)
        results = bench.run(rows, batch_size, steps, warmup, rounds, device, log)
    except ValueError as e:
        fail(str(e))
    if json_out:
        typer.echo(json.dumps(results, indent=2))
        return
    cfg = rows[-1][2]
    console.print(bench.table(results, f"{cfg.img_size} px, patch {cfg.patch_size}, batch {batch_size}, "
                                       f"{device}, {common.torch.get_num_threads()} threads; "
                                       f"ratios to the first row, measured in this run"))


def run_bench_loader(method, preset, model, batch_size, warmup, json_out, device, data, data_dir, num_workers,
                     batches, given):
    """`bench METHOD --data NAME`: images per second of the loader pre-training would use, alone."""
    import json

    from evaluation import bench

    module, _ = METHODS[method]
    try:
        extra = {"data": data, "data_dir": data_dir, **({"num_workers": num_workers} if num_workers is not None else {})}
        cfg, tcfg = resolve(module, preset or DEFAULT_PRESET, model, {**given, **extra})
        batch_size = tcfg.batch_size if batch_size is None else batch_size
        train_set = common.load_dataset(tcfg.data, "train", tcfg.data_dir, tcfg.train_size, cfg.img_size)
        sample_inputs = getattr(module, "sample_inputs", None)
        sample_inputs = sample_inputs and _Bound(sample_inputs, cfg)
        result = bench.loader_throughput(train_set, tcfg.data, cfg.img_size, sample_inputs, batch_size, batches,
                                         max(warmup, 2 * tcfg.num_workers), tcfg.num_workers,
                                         common.pick_device(device), tcfg.seed)
    except ValueError as e:
        fail(str(e))
    result = {"method": method, "data": tcfg.data, "img_size": cfg.img_size, **result}
    if json_out:
        typer.echo(json.dumps(result, indent=2))
        return
    console.print(bench.loader_table(result, f"{method}'s pre-training data loader alone: {result['images']} images, "
                                             f"augmentation + sample_inputs in the workers, "
                                             f"{result['warmup_batches']} batches untimed first"))


def add_bench_command(method):
    module, _ = METHODS[method]

    def command(**kwargs):
        run_bench(method, **kwargs)

    def option(name, kind, default, help_text, *decls):
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind,
                                 default=typer.Option(default, *decls, help=help_text))

    presets = f"scale preset: {', '.join(common.PRESETS)} [default: {DEFAULT_PRESET}]"
    head = [option("preset", typing.Optional[str], None, presets),
            option("model", typing.Optional[str], None, f"ViT size: {', '.join(common.VIT_SIZES)}"),
            option("batch_size", typing.Optional[int], None, "images per step for memory and time [default: 8; "
                   "with --data: the preset's batch size]"),
            option("steps", int, 3, "timed steps per row and round; the median over all rounds is shown"),
            option("warmup", int, 1, "untimed steps before them (with --data: untimed batches, at least 2 per worker)"),
            option("rounds", int, 3, "rounds over all rows, so load changes on the machine hit every row alike"),
            option("compare", typing.Optional[str], None, f"a base method measured first, every figure a ratio to it: "
                                                        f"{', '.join(METHODS)}"),
            option("variants", bool, True, "also the rows of the method's BENCH_VARIANTS", "--variants/--no-variants"),
            option("json_out", bool, False, "print JSON instead of a table", "--json"),
            option("device", str, "auto", "auto (GPU if there is one) | cpu | cuda | cuda:N"),
            option("data", typing.Optional[str], None, f"measure the images/s of the pre-training data loader alone "
                                                      f"on this data set instead: {', '.join(common.DATASETS)}"),
            option("data_dir", str, "data", "with --data: where data sets live"),
            option("num_workers", typing.Optional[int], None, "with --data: data-loading processes [default: the "
                                                              "preset's]"),
            option("batches", int, 50, "with --data: timed batches")]
    command.__signature__ = inspect.Signature(head + dataclass_options(module.Config))
    command.__doc__ = module.__doc__.strip().splitlines()[0]
    bench_app.command(method)(command)


for _method in METHODS:
    add_pretrain_command(_method)
    add_bench_command(_method)


# ----------------------------------------------------------------------------------------------------
# Evaluation: thin commands over evaluate.py (the protocol is in its docstring and README.md#evaluation)

EVAL_COMMANDS = {  # command: (its options dataclass, the evaluate.py function that runs it)
    "knn": (evaluate.KnnConfig, evaluate.run_knn),
    "linprobe": (evaluate.LinprobeConfig, evaluate.run_linprobe),
    "finetune": (evaluate.FinetuneConfig, evaluate.run_finetune),
    "visualize": (evaluate.VisualizeConfig, evaluate.run_visualize),
}


def run_eval(command, source, **options):
    ccls, run = EVAL_COMMANDS[command]
    given = {k: v for k, v in options.items() if v is not None}
    try:
        ecfg, ccfg = build(evaluate.EvalConfig, given), build(ccls, given)
        overrides = {"drop_path": ccfg.drop_path} if command == "finetune" else {}
        needs_decoder = command == "visualize" and not ecfg.random_init
        model, info = evaluate.load_model(source, METHODS, ecfg.method or OFFICIAL_CHECKPOINT_METHOD, ecfg.random_init,
                                          ecfg.seed, overrides, need_all=needs_decoder)
        if command == "visualize":
            sample_inputs = getattr(info["module"], "sample_inputs", None)
            sample_inputs = sample_inputs and _Bound(sample_inputs, info["config"])
            path, (width, height) = run(model, info, ecfg, ccfg, sample_inputs, console)
            console.print(f"wrote {path} ({width} x {height} px)")
            return
        files = [evaluate.__file__, common.__file__, __file__, info["module"].__file__]
        result, out = run(model, info, ecfg, ccfg, files, console)
    except (FloatingPointError, ValueError) as e:
        fail(str(e), code=1 if isinstance(e, FloatingPointError) else 2)
    if result:
        m = result["metrics"]
        init = " (random init)" if ecfg.random_init else ""
        console.print(f"{command} {result['method']}{init} on {result['data']}: "
                      f"top-1 {m['top1']:.4f}, top-5 {m['top5']:.4f} ({result['wall_s']:.0f} s); result folder {out}")


def add_eval_command(command):
    ccls, run = EVAL_COMMANDS[command]

    def cmd(source: str = typer.Argument(..., metavar="RUN_OR_CKPT", help="a run folder, or a checkpoint file of ours "
                                          "or of the official MAE code"), **kwargs):
        run_eval(command, source, **kwargs)

    head = [inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=str,
                              default=inspect.signature(cmd).parameters["source"].default)]
    cmd.__signature__ = inspect.Signature(head + dataclass_options(evaluate.EvalConfig, ccls, presets=False))
    cmd.__doc__ = run.__doc__.strip().splitlines()[0]
    app.command(command)(cmd)


for _command in EVAL_COMMANDS:
    add_eval_command(_command)


@app.command()
def results(paths: list[str] = typer.Argument(None, help="folders searched for result.json (default: runs)"),
            readme: str = typer.Option("", help="rewrite the results table in this file (between its markers)"),
            fresh: bool = typer.Option(False, help="drop the table's rows that the given folders do not rebuild")):
    """Build the results table (mean ± std over seeds) from result folders; print it or put it in README."""
    from evaluation import results as results_table

    try:
        rows = results_table.collect(paths or ["runs"])
        text = results_table.table(rows)
        if readme:
            results_table.update_readme(readme, rows, fresh)
            console.print(f"updated {readme} from {len(rows)} result(s)")
        else:
            console.print(text, highlight=False, soft_wrap=True, markup=False)
    except ValueError as e:
        fail(str(e))


@app.command()
def export(source: str = typer.Argument(..., metavar="RUN_OR_CKPT", help="a run folder, or a checkpoint file of ours "
                                        "or of the official MAE code"),
           out: str = typer.Option("", help="the file to write (default: <run folder>/encoder_timm.pth)"),
           overwrite: bool = typer.Option(False, help="replace --out if it exists"),
           method: str = typer.Option("", help="method of a checkpoint that does not name one (official MAE "
                                               "checkpoints; default mae)")):
    """Write the encoder as a plain state dict in timm VisionTransformer names; print the timm call that loads it."""
    try:
        model, info = evaluate.load_model(source, METHODS, method or OFFICIAL_CHECKPOINT_METHOD)
        path = Path(out) if out else info["run_dir"] / "encoder_timm.pth"
        if path.is_dir() or (path.exists() and not overwrite):
            raise ValueError(f"{path} already exists{' and is a folder' if path.is_dir() else ''}: "
                             f"pass --overwrite to replace it, or another --out")
        state, kwargs = evaluate.export_timm(model, info, source)
        path.parent.mkdir(parents=True, exist_ok=True)
        common.save_checkpoint(state, path)  # atomic: a temporary file, then a rename
    except ValueError as e:
        fail(str(e))
    console.print(f"wrote {path}: {len(state)} tensors, {sum(v.numel() for v in state.values()) / 1e6:.2f}M values, "
                  f"the {info['method']} encoder without its decoder. Load it with", highlight=False)
    console.print(f"import functools, timm, torch\nvit = {evaluate.timm_constructor(kwargs)}\n"
                  f"vit.load_state_dict(torch.load({str(path)!r}, weights_only=True), strict=True)",
                  highlight=False, markup=False, soft_wrap=True)


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
        try:
            alpha_values = [float(a) for a in alphas.split(",")]
        except ValueError:
            raise ValueError(f"--alphas must be numbers separated by commas, got {alphas!r}") from None
        if not all(0 < a <= 0.5 for a in alpha_values) or images < 4 or batch_size < 1:
            raise ValueError(f"--alphas must be subordinate weights in (0, 0.5], --images at least 4 and --batch-size "
                             f"at least 1, got {alphas!r}, {images} and {batch_size}")
        model, info = evaluate.load_model(run, METHODS, OFFICIAL_CHECKPOINT_METHOD, random_init, seed)
        model.eval()
        cfg, train = info["config"], {"data": "shapes", "data_dir": "", **info["train"]}
        imgs = separability_lib.held_out_images(train["data"], train["data_dir"], cfg.img_size, images)
        ref = evaluate.load_model(reference, METHODS, OFFICIAL_CHECKPOINT_METHOD)[0].eval() if reference else None
        if ref and (ref.cfg.img_size, ref.cfg.patch_size) != (model.cfg.img_size, model.cfg.patch_size):
            raise ValueError(f"--reference {reference} has another image or patch size than {run}: its tokens "
                             f"do not line up with RUN's")
        ref = ref and ref.forward_features
    except ValueError as e:
        fail(str(e))
    rows, score = separability_lib.measure(model.forward_features, imgs, alpha_values, seed, batch_size, ref)
    pixels = separability_lib.pixel_features(cfg.patch_size)
    pixel_rows, pixel_score = separability_lib.measure(pixels, imgs, alpha_values, seed, batch_size, ref or pixels)
    name = f"{info['method']} {'random init' if random_init else 'trained'}"
    if json_out:
        console.print_json(json.dumps({"run": str(run), "method": info["method"], "random_init": random_init,
                                       "reference": reference or "itself",
                                       "step": info["ckpt"].get("step"), "data": train["data"], "images": len(imgs),
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


def main(args=None):
    """app(args), with click's usage errors (unknown command or option, a value of the wrong type) printed
    as one line like every other error, instead of typer's framed box."""
    try:
        from typer._click import exceptions as click  # typer >= 0.20 carries its own click
    except ImportError:
        from click import exceptions as click

    try:
        code = app(args, standalone_mode=False)
    except getattr(click, "NoArgsIsHelpError", ()) as e:  # `python cli.py` alone: the help, as before
        e.show()
        code = e.exit_code
    except click.ClickException as e:
        where = f" (see `python {e.ctx.command_path} --help`)" if getattr(e, "ctx", None) else ""
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())}{escape(where)}", highlight=False,
                          soft_wrap=True)
        code = e.exit_code
    except typer.Abort:
        code = 130
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
