"""The design rules of the code base (README "How the code is organised"), checked for every method
file registered in cli.METHODS, so a new method file is covered as soon as it is registered."""

import ast
import dataclasses
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import drawn_inputs

import cli
import common

ROOT = Path(__file__).resolve().parents[1]
METHODS = sorted(cli.METHODS)
MODULE_FILES = {name: Path(module.__file__).name for name, (module, _) in cli.METHODS.items()}
METHOD_WORDS = {
    "mae",
    "simmim",
    "pr_mim",
    "pr-mim",
    "prmim",
    "imae",
    "i-mae",
    "i_mae",
    "revcol",
    "revcolv2",
}


def tree(filename):
    return ast.parse((ROOT / filename).read_text())


@pytest.mark.parametrize("method", METHODS)
def test_method_file_imports_only_torch_einops_common(method):
    allowed = {"torch", "einops", "common"} | set(sys.stdlib_module_names)
    # top level only: the __main__ hand-off may import cli
    for node in tree(MODULE_FILES[method]).body:
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else ([node.module] if isinstance(node, ast.ImportFrom) else [])
        )
        for name in names:
            assert name.split(".")[0] in allowed, f"{MODULE_FILES[method]} imports {name}"


@pytest.mark.parametrize("method", METHODS)
def test_method_file_skeleton_and_docstring(method):
    filename = MODULE_FILES[method]
    source = (ROOT / filename).read_text()
    module = tree(filename)
    doc = ast.get_docstring(module)
    for part in ("arxiv.org", "Changes relative to mae.py", "Deviations"):
        assert part.lower() in doc.lower() or (part == "arxiv.org" and "seed" in doc.lower()), (
            filename,
            part,
        )
    classes = {n.name: n for n in module.body if isinstance(n, ast.ClassDef)}
    assert "Config" in classes
    model_cls = cli.METHODS[method][1].__name__
    methods = [n.name for n in classes[model_cls].body if isinstance(n, ast.FunctionDef)]
    order = [
        "__init__",
        "forward_encoder",
        "forward_decoder",
        "forward_loss",
        "forward",
        "forward_features",
    ]
    assert [m for m in methods if m in order] == order, f"{filename}: {methods}"
    if "DEVIATION:" in source:
        assert "Deviations" in doc


def test_classes_subclass_only_module_function_or_are_dataclasses():
    for filename in {*MODULE_FILES.values(), "common.py", "cli.py"}:
        for node in ast.walk(tree(filename)):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                is_dataclass = any("dataclass" in ast.unparse(d) for d in node.decorator_list)
                assert is_dataclass or bases <= {
                    "nn.Module",
                    "torch.autograd.Function",
                    "object",
                    "torch.utils.data.Dataset",
                    "torch.utils.data.Sampler",
                }, (filename, node.name, bases)


def test_common_never_names_a_method():
    module = tree("common.py")
    docstrings = {
        id(n.body[0].value)
        for n in ast.walk(module)
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(n)
    }
    for node in ast.walk(module):
        words = []
        if isinstance(node, ast.Name):
            words = [node.id]
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            words = [node.name]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
        ):
            words = node.value.replace("/", " ").split()
        for word in words:
            assert word.lower().strip(".,:;()'\"") not in METHOD_WORDS, (
                f"common.py names a method: {word!r}"
            )


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_one_step_and_gives_features(method):
    """Every method at the tiny preset: pred (B, N, P*P*C), mask (B, N) with some patches masked, a
    finite scalar loss; every trainable parameter gets a finite, non-zero gradient (a parameter the
    loss never reaches would also stop DDP); one AdamW step moves every trainable parameter and
    lowers the loss on the same batch; and forward_features gives (B, N, embed_dim) for the
    evaluation commands, N = (img_size / patch_size)^2."""
    module, model_cls = cli.METHODS[method]
    cfg, tcfg = cli.resolve(module, "tiny", None, {})
    B = 4
    N = (cfg.img_size // cfg.patch_size) ** 2
    torch.manual_seed(0)
    model = model_cls(cfg)
    imgs = torch.randn(B, cfg.in_chans, cfg.img_size, cfg.img_size)
    inputs = drawn_inputs(module, cfg, B)
    loss, pred, mask = model(imgs, **inputs)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    assert pred.shape == (B, N, cfg.patch_size**2 * cfg.in_chans) and mask.shape == (B, N)
    assert ((mask == 0) | (mask == 1)).all() and 0 < mask.sum() < B * N
    loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("patch_embed") for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"{method}: no gradient reaches {no_grad}"
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    before = {n: p.detach().clone() for n, p in trainable.items()}
    torch.optim.AdamW(trainable.values(), lr=1e-3, weight_decay=0.0).step()
    unchanged = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert not unchanged, f"{method}: one step left {unchanged} unchanged"
    with torch.no_grad():
        # the same batch, masks and pairs: a step down the gradient
        assert model(imgs, **inputs)[0] < loss
        feats = model.eval().forward_features(imgs)
    assert feats.shape == (B, N, cfg.embed_dim) and torch.isfinite(feats).all()


@pytest.mark.parametrize("method", METHODS)
def test_readme_and_help_cover_every_method(method):
    readme = (ROOT / "README.md").read_text()
    assert MODULE_FILES[method] in readme
    module = cli.METHODS[method][0]
    help_text = cli.field_help(module.Config)
    missing = [f.name for f in dataclasses.fields(module.Config) if not help_text.get(f.name)]
    assert not missing, (
        f"{MODULE_FILES[method]} Config fields without a trailing comment: {missing}"
    )
    assert set(common.PRESETS) >= {"tiny", "cpu", "cifar", "tiny-imagenet", "imagenet"}


OURS = {"common", "cli", "data_sets", "evaluation", "experiments"}
OURS |= {Path(f).stem for f in MODULE_FILES.values()}
PACKAGES = ("data_sets", "evaluation")
# the code a run uses (not tests/ or experiments/), and the part of it that is plumbing
CODE_FILES = [
    p for pattern in ("*.py", "data_sets/*.py", "evaluation/*.py") for p in ROOT.glob(pattern)
]
PLUMBING = [ROOT / "common.py", *(p for package in PACKAGES for p in (ROOT / package).glob("*.py"))]


def imports(path):
    """The top-level packages that a file imports anywhere in it (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def our_imports(path):
    """The modules of ours that a file imports anywhere in it."""
    return imports(path) & OURS


def test_imports_go_one_way():
    """Methods -> common; evaluation plumbing -> common and data_sets; only cli.py (and experiments)
    import method files; common and data_sets import nothing of ours."""
    assert our_imports(ROOT / "common.py") == set()
    for path in (ROOT / "data_sets").glob("*.py"):
        assert our_imports(path) <= {"data_sets"}, path.name
    for path in (ROOT / "evaluation").glob("*.py"):
        assert our_imports(path) <= {"common", "data_sets", "evaluation"}, path.name
    for filename in MODULE_FILES.values():
        # cli: the __main__ hand-off only
        assert our_imports(ROOT / filename) <= {"common", "cli"}, filename


def test_the_code_imports_only_what_a_fresh_install_has():
    """Every import of the code a run uses (at the top or inside a function) is the standard
    library, ours, or a dependency pyproject.toml declares (PIL: torchvision's). `import click`
    passed here while a test dependency pulled click in, and failed on the README's fresh install:
    typer 0.29 vendors click instead of requiring it."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [re.match(r"[\w-]+", d).group(0) for d in project["dependencies"]]
    allowed = set(declared) | {"PIL"}
    allowed |= set(sys.stdlib_module_names) | OURS
    for path in CODE_FILES:
        assert imports(path) <= allowed, (
            f"{path.name} imports {sorted(imports(path) - allowed)}, not in pyproject.toml"
        )


def test_top_level_holds_the_design_cards_files():
    import subprocess

    listing = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True)
    if listing.returncode or not listing.stdout:
        pytest.skip("not a git checkout")
    top = {line.split("/")[0] for line in listing.stdout.splitlines()}
    design_card = {*MODULE_FILES.values(), "common.py", "cli.py", "tests", "README.md"}
    packaging = {
        "pyproject.toml",
        "requirements.txt",
        "requirements-test.txt",
        ".ci",
        "LICENSE",
        ".gitignore",
    }
    folders = {
        "data_sets",
        "evaluation",
        "experiments",
        "docs",
    }  # data; evaluation and costs; forks and runs; write-ups
    assert top - design_card - packaging - folders == set()
    assert design_card <= top


# The fields of a method's Config that the plumbing may read or set: the shape of the ViT a preset
# or --model sets (and export and official checkpoints read), the channels set from the data, and
# the stochastic depth that fine-tuning sets (docs/design.md, "Plumbing shared, method duplicated").
CONTRACT = {
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "decoder_embed_dim",
    "decoder_depth",
    "decoder_num_heads",
    "drop_path",
}


def method_fields():
    """{field: the methods whose Config has it} of every field outside the contract."""
    fields = {}
    for name, (module, _) in cli.METHODS.items():
        for f in dataclasses.fields(module.Config):
            if f.name not in CONTRACT:
                fields.setdefault(f.name, []).append(name)
    return fields


def names_of_fields(path, fields):
    """The places where a file names one of `fields`: an attribute (cfg.throw), a keyword of
    dict(...) (a preset), a string that is the field or its --flag (getattr, a dict key, an error
    message), or a variable."""
    found = []
    for node in ast.walk(ast.parse(Path(path).read_text())):
        names = []
        if isinstance(node, ast.Attribute):
            names = [node.attr]
        elif isinstance(node, ast.Name):
            names = [node.id]
        elif isinstance(node, ast.Call) and ast.unparse(node.func) == "dict":
            names = [k.arg for k in node.keywords]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            flags = re.findall(r"--([a-z][a-z-]*)", node.value)
            names = [node.value.strip(), *(flag.replace("-", "_") for flag in flags)]
        found += [(getattr(node, "lineno", 0), n) for n in names if n in fields]
    return found


def test_the_plumbing_names_no_field_of_a_methods_config():
    """A method's own fields (mask_ratio, norm_pix_loss, throw, ...) live in its file: a preset
    that changes one does it there (PRESET_CHANGES), a picture that needs one is told by cli.py."""
    fields = method_fields()
    assert {"mask_ratio", "norm_pix_loss", "throw", "teacher", "reversible"} <= set(fields)
    for path in PLUMBING:
        named = [
            f"line {line}: {name} ({', '.join(fields[name])})"
            for line, name in names_of_fields(path, fields)
        ]
        assert not named, f"{path.relative_to(ROOT)} names method fields: {named}"


def test_no_statement_packs_unrelated_assignments():
    """`a, b = x, y` is two statements written as one; only a swap of the same names is one."""
    for path in CODE_FILES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
                target = node.targets[0]
                if isinstance(target, ast.Tuple) and len(target.elts) > 1:
                    swap = sorted(map(ast.unparse, target.elts)) == sorted(
                        map(ast.unparse, node.value.elts)
                    )
                    assert swap, f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}"
