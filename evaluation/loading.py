"""What every evaluation command starts from: the options they share (EvalConfig), the model of a
checkpoint (ours or an official MAE one) and the data to evaluate it on. Nothing here names a
method: a checkpoint's model is used only through forward_features(imgs) -> (B, N, D) and
forward(imgs, **inputs) -> (loss, pred, mask). Protocol: docs/evaluation.md."""

import math
import sys
import types
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import torch
import torch.nn as nn

import common
import data_sets


def train_config(cfg, **values):
    """common.TrainConfig from the fields `cfg` shares with it (so it checks them, with its errors)
    and `values`."""
    names = {f.name for f in fields(common.TrainConfig)}
    shared = {k: v for k, v in asdict(cfg).items() if k in names}
    return common.TrainConfig(**shared, **values)


@dataclass
class EvalConfig:
    data: str = ""  # data set (default: the pre-training data; official checkpoints: imagenet)
    data_dir: str = ""  # where data sets live (default: the checkpoint's --data-dir, else data)
    download: bool = False  # let torchvision download CIFAR / Fashion-MNIST into --data-dir
    train_size: int = -1  # training images (-1: as pre-training on the same data, else all; 0: all)
    val_size: int = -1  # validation images (-1: as pre-training on the same data, else all; 0: all)
    seed: int = 0  # seeds the random init, the data order, augmentation and masks
    random_init: bool = False  # the architecture with random weights: the floor of every number
    method: str = ""  # method of a checkpoint that names none (official MAE ones; default mae)
    num_workers: int = 2  # data-loading processes
    device: str = "auto"  # auto (GPU if there is one) | cpu | cuda | cuda:N
    out: str = ""  # result folder (default: <run>/eval/<command>[-random-init]-<data>-s<seed>)

    def __post_init__(self):  # checked before any result folder is written
        common.check_options(self, non_negative="num_workers")
        common.check_device(self.device)


# Models from checkpoints: ours ({"model", "method", "config", ...}) and official MAE ones
# ({"model", "args"}).


def model_class(module):
    """A method file's model: its nn.Module class with a forward_features method (of several, the
    most derived)."""
    found = [c for c in vars(module).values() if isinstance(c, type)]
    found = [c for c in found if c.__module__ == module.__name__ and issubclass(c, nn.Module)]
    found = [c for c in found if hasattr(c, "forward_features")]
    found = [c for c in found if not any(issubclass(d, c) for d in found if d is not c)]
    if len(found) != 1 or not is_dataclass(getattr(module, "Config", None)):
        needs = "needs a dataclass Config and one model class with forward_features"
        raise ValueError(f"{module.__file__} {needs}")
    return found[0]


def load_method(name, source, filename):
    """(module, model class) of a method file's source, run as the module `name` and kept in
    sys.modules, where data-loading workers find its functions."""
    if name not in sys.modules:
        code = compile(source, filename, "exec")  # a SyntaxError: bad input, for main
        module = types.ModuleType(name)
        sys.modules[name] = module
        module.__file__ = filename
        module.__source__ = source
        exec(code, vars(module))
    if getattr(sys.modules.get(name), "__source__", None) != source:
        taken = f"the name {name!r} is taken by a method or a module: rename the file"
        raise ValueError(f"{filename}: {taken}")
    return sys.modules[name], model_class(sys.modules[name])


def vit_shape(state):
    """The sizes of a ViT but num_heads, read off its state dict (a position embedding over 1 + N
    tokens)."""
    weight = state["patch_embed.proj.weight"]  # (D, C, P, P)
    embed_dim, in_chans, patch = map(int, weight.shape[:3])
    tokens = state["pos_embed"].shape[1]  # pos_embed: (1, 1 + N, D)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return dict(
        img_size=math.isqrt(tokens - 1) * patch,
        patch_size=patch,
        in_chans=in_chans,
        embed_dim=embed_dim,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        depth=depth,
    )


def official_config(state, args, names):
    """Config values of an official MAE checkpoint: the sizes from its tensors, the other `names`
    from its args."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            neither = "it is neither ours nor an official MAE/timm ViT one"
            raise ValueError(f"the checkpoint has no {key!r}: {neither}")
    shape = vit_shape(state)
    heads = {s["embed_dim"]: s["num_heads"] for s in common.VIT_SIZES.values()}
    if shape["embed_dim"] not in heads:
        known = ", ".join(map(str, heads))
        width = f"a {shape['embed_dim']}-d ViT"
        raise ValueError(f"cannot tell the heads of {width}: common.VIT_SIZES knows {known}")
    # the method's own options the checkpoint's args hold (drop path is the fine-tuning's)
    options = vars(args) if args else {}
    given = {k: v for k, v in options.items() if k in names and k != "drop_path"}
    values = {**given, **shape, "num_heads": heads[shape["embed_dim"]]}
    if "decoder_embed.weight" in state:  # a full checkpoint (official *_full.pth): the decoder too
        decoder_blocks = {k.split(".")[1] for k in state if k.startswith("decoder_blocks.")}
        values["decoder_embed_dim"] = state["decoder_embed.weight"].shape[0]
        values["decoder_depth"] = len(decoder_blocks)
        values["decoder_num_heads"] = 16  # the official decoder's
    return values


def feature_param_names(model):
    """(names, D): the parameters that get a gradient through forward_features and every buffer (the
    rest, decoders and mask tokens, is not evaluated); D, the width of the features."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    flags = [p.requires_grad for p in params.values()]
    was_training = model.training
    imgs = torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size).to(next(model.parameters()))
    out = model.requires_grad_(True).eval().forward_features(imgs)
    if out.ndim != 3:
        shape = f"forward_features returned shape {tuple(out.shape)}, not (B, N, D)"
        raise ValueError(f"{shape}: see docs/evaluation.md")
    grads = torch.autograd.grad(out.float().sum(), list(params.values()), allow_unused=True)
    for p, flag in zip(params.values(), flags):
        p.requires_grad_(flag)
    model.train(was_training)
    used = {n for n, g in zip(params, grads) if g is not None}
    return used | {n for n, _ in model.named_buffers()}, out.shape[-1]


def config_values(ckpt, source, name, names, overrides):
    """The Config values of a checkpoint (an official one's from its tensors and args), with
    `overrides` that are fields of the method's Config (`names`)."""
    official = "config" not in ckpt
    if official:
        values = official_config(ckpt["model"], ckpt.get("args"), names)
    else:
        values = dict(ckpt["config"])
    for key, value in (overrides or {}).items():
        if key in names:
            values[key] = value
        elif value:  # (--drop-path 0 is fine for a method without drop path)
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{name}'s Config has no field {key!r}, so {flag} cannot be set")
    unknown = ", ".join(sorted(set(values) - names))
    if unknown:
        lacks = f"Config fields that {name}'s Config lacks ({unknown})"
        raise ValueError(f"{source} has {lacks}: another version wrote it")
    return values


def load_model(
    source, find_method, method="", random_init=False, seed=0, overrides=None, need_all=False
):
    """(model, info) from a run folder or checkpoint file; find_method(name, checkpoint) -> (method
    module, model class), e.g. cli.method_of. random_init: weights left random (seeded); need_all:
    the decoder must be there too."""
    ckpt = common.load_checkpoint(source)
    name = ckpt.get("method") or method
    if not name:
        raise ValueError(f"{source} does not say which method made it: pass --method")
    module, model_cls = find_method(name, ckpt)
    names = {f.name for f in fields(module.Config)}
    cfg = module.Config(**config_values(ckpt, source, name, names, overrides))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(cfg)
    needed, dim = feature_param_names(model)
    if not random_init:
        own = model.state_dict()
        state = ckpt["model"]
        lost = [k for k in own if k not in state and (need_all or k in needed)]
        if lost:
            what = "the whole model (decoder included)" if need_all else "the encoder"
            listed = ", ".join(lost[:4]) + (" ..." if len(lost) > 4 else "")
            hint = "a fine-tuned or encoder-only checkpoint? use a full pre-training checkpoint"
            raise ValueError(f"{source} lacks weights of {what}: {listed} ({hint})")
        loaded = {**own, **{k: v for k, v in state.items() if k in own}}
        common.load_weights(model, loaded, source)  # one-line errors
    run_dir = Path(source) if Path(source).is_dir() else Path(source).parent
    params = sum(p.numel() for n, p in model.named_parameters() if n in needed)
    info = dict(
        method=name,
        module=module,
        config=cfg,
        official="config" not in ckpt,
        run_dir=run_dir,
        ckpt=ckpt,
        needed=needed,
        train=ckpt.get("train") or {},
        dim=dim,
        encoder_params=params,
    )
    return model, info


def eval_datasets(ecfg, info, splits=("train", "val")):
    """(data name, *the splits' data sets) following EvalConfig, defaulting to the pre-training
    data."""
    pre = info["train"]
    cfg = info["config"]
    data = ecfg.data or pre.get("data") or "imagenet"
    same = data == pre.get("data")
    channels = data_sets.channels(data)
    if channels != cfg.in_chans:
        raise ValueError(f"{data} has {channels} channel(s) but the model takes {cfg.in_chans}")
    data_dir = ecfg.data_dir or (pre.get("data_dir") if same else None) or "data"
    sizes = {"train": ecfg.train_size, "val": ecfg.val_size}
    # -1: as in pre-training if the data is the same, else all (0)
    sizes = {k: v if v >= 0 else (pre.get(f"{k}_size", 0) if same else 0) for k, v in sizes.items()}
    loaded = [
        data_sets.load_dataset(data, s, data_dir, sizes[s], cfg.img_size, ecfg.download)
        for s in splits
    ]
    return data, *loaded
