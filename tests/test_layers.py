"""The house rule: data flows one way, and each layer imports only from layers below it.

The order is written down once, here. A module's layer is the first entry of LAYERS
that names it (a module path, or a package prefix ending in "."); every import of a
``modelsoup`` module, at the top or inside a function, must name the same or a lower
layer. Within one layer, modules may import each other, but no circle is allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "modelsoup"

#: bottom to top: sources -> ingredients -> accumulator -> writer/soup -> tasting with
#: recipes -> cook (report) -> demo -> cli
LAYERS = [
    ["modelsoup.errors"],
    ["modelsoup._util", "modelsoup._options"],
    ["modelsoup.formats."],
    ["modelsoup.ingredients"],
    ["modelsoup.accumulator"],
    ["modelsoup.merge."],
    ["modelsoup.writer"],
    ["modelsoup.soup"],
    ["modelsoup.memory", "modelsoup.evaluators", "modelsoup.journal"],
    ["modelsoup.repair."],
    ["modelsoup.tasting"],
    ["modelsoup.distributed"],
    ["modelsoup.recipes."],
    ["modelsoup.hf."],
    ["modelsoup.cook."],
    ["modelsoup.integrations."],
    ["modelsoup.demo."],
    ["modelsoup.cli"],
    ["modelsoup", "modelsoup._compat"],  # the package face: re-exports only
    ["modelsoup.__main__"],  # python -m modelsoup: the console script's launcher
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    for level, entries in enumerate(LAYERS):
        for entry in entries:
            if name == entry or (entry.endswith(".") and (name + ".").startswith(entry)):
                return level
    raise AssertionError(f"{name} has no layer: add it to LAYERS in {__file__}")


def imports_of(path: Path, text: str | None = None) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text() if text is None else text)
    package = module_name(path)
    base = package if path.name == "__init__.py" else package.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # from package import submodule: the submodule counts
                sub = f"{mod}.{a.name}"
                found.append((sub if _known(sub) == sub else mod, node.lineno))
    return [(m, line) for m, line in found if m == "modelsoup" or m.startswith("modelsoup.")]


MODULES = sorted(SRC.rglob("*.py"))


def _known(name: str) -> str:
    # "modelsoup.cook.run.cook" style names resolve to the longest existing module
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        path = SRC.parent.joinpath(*parts)
        if path.with_suffix(".py").exists() or (path / "__init__.py").exists():
            return candidate
        parts.pop()
    return name


def upward_imports(path: Path, text: str | None = None) -> list[str]:
    mine = layer_of(module_name(path))
    upward = []
    for target, line in imports_of(path, text):
        target = _known(target)
        if layer_of(target) > mine:
            upward.append(f"line {line}: {target} (layer {layer_of(target)} > {mine})")
    return upward


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_only_run_downward(path):
    upward = upward_imports(path)
    assert not upward, f"{module_name(path)} imports upward: " + "; ".join(upward)


def test_no_import_circles():
    graph = {module_name(p): {_known(t) for t, _ in imports_of(p)} for p in MODULES}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_check_sees_upward_imports_in_functions_and_relative_forms():
    # the check itself can fail: the accumulator importing cook, three ways
    path = SRC / "accumulator.py"
    text = (
        "from modelsoup.cook.run import cook\n"
        "def f():\n    from modelsoup import cli\n"
        "from .cook import report\n"
    )
    found = upward_imports(path, text)
    assert sorted(f.split(":")[1].split()[0] for f in found) == [
        "modelsoup.cli",
        "modelsoup.cook.report",
        "modelsoup.cook.run",
    ]
