"""A method's reading path: its file plus the parts of common.py it calls (docs/design.md).

    python experiments/reading_path.py                 # the five methods
    python experiments/reading_path.py my_idea.py      # any method files

The parts of common.py are the top-level functions and classes the method file names as
`common.NAME`, and those they name in turn, each counted whole (decorators and docstring
included). The training loop is not on the path: a method never calls it.
"""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHOD_FILES = ["mae.py", "simmim.py", "pr_mim.py", "imae.py", "revcolv2.py"]


def top_level(tree):
    """{name: node} of the functions, classes and assignments at the top of a module."""
    nodes = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            nodes[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    nodes[target.id] = node
    return nodes


def span(node):
    """The lines of a node, its decorators included."""
    first = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", []))])
    return node.end_lineno - first + 1


def common_parts(method_file):
    """{name: lines} of the parts of common.py that `method_file` calls, transitively."""
    common = top_level(ast.parse((ROOT / "common.py").read_text()))
    method = ast.parse(Path(method_file).read_text())
    wanted = [
        node.attr
        for node in ast.walk(method)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "common"
    ]
    parts = {}
    while wanted:
        name = wanted.pop()
        if name in parts or name not in common:
            continue
        parts[name] = span(common[name])
        used = {n.id for n in ast.walk(common[name]) if isinstance(n, ast.Name)}
        wanted += sorted(used & common.keys())
    return parts


def main(files):
    print(f"{'method file':<28} {'file':>5} {'common':>7} {'path':>5}  parts of common.py")
    for name in files:
        path = Path(name) if Path(name).exists() else ROOT / name
        lines = len(path.read_text().splitlines())
        parts = common_parts(path)
        common = sum(parts.values())
        names = ", ".join(sorted(parts))
        print(f"{path.name:<28} {lines:>5} {common:>7} {lines + common:>5}  {names}")


if __name__ == "__main__":
    main(sys.argv[1:] or METHOD_FILES)
