"""The package's layer rule, checked on its source: an import -- at module level or inside a function --
points only to an earlier layer, or within its own (CONTRIBUTING.md, "Layout rules")."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Iterator, List, Tuple

PACKAGE = Path(__file__).resolve().parents[1] / "pass_zoo"

# CONTRIBUTING.md's layers, first to last; a module belongs to the first entry it equals or lies under
LAYERS = [
    ["errors", "fileio", "validate", "integrity", "method_registry"],
    ["backbone", "data", "prompt", "label_mapping", "config"],
    ["graph"],
    ["train"],
    ["methods"],
    ["export"],
    ["pipeline", "transfer", "family"],
    ["recipes", "publish", "tools"],
    ["cli"],
]


def layer_of(module: str) -> int:
    """The layer of ``pass_zoo.X.Y`` (given as ``X.Y``); the package itself (its face) is above all."""
    for i, names in enumerate(LAYERS):
        if any(module == n or module.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"module '{module}' is in no layer: add it to CONTRIBUTING.md and LAYERS")


def own_imports(source: str, module: str, is_package: bool) -> Iterator[Tuple[str, int]]:
    """``(imported pass_zoo module, line)`` for every import in ``source``, module level or not."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pass_zoo."):
                    yield alias.name[len("pass_zoo."):], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("pass_zoo"):
                target = node.module[len("pass_zoo."):] if node.module != "pass_zoo" else ""
            else:
                continue
            for alias in node.names:  # `from . import x` imports the submodule x
                sub = f"{target}.{alias.name}" if target else alias.name
                path = PACKAGE / sub.replace(".", "/")
                yield (sub if path.with_suffix(".py").is_file() or path.is_dir() else target), node.lineno


def violations(source: str, module: str, is_package: bool = False) -> List[str]:
    mine = layer_of(module)
    return [f"{module}:{line} imports {target} (layer {layer_of(target) + 1} > {mine + 1})"
            for target, line in own_imports(source, module, is_package)
            if target and layer_of(target) > mine]


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        if parts:  # pass_zoo/__init__.py is the package's face: it hands every layer's names on
            yield ".".join(parts), is_package, path.read_text(encoding="utf-8")


def test_every_import_points_to_an_earlier_layer_or_its_own():
    found = [v for module, is_package, source in _modules() for v in violations(source, module, is_package)]
    assert found == []


def test_a_back_import_is_caught_even_inside_a_function():
    planted = "def defaults():\n    from ..methods import get_method\n    return get_method('pass')\n"
    assert violations(planted, "train.checkpoint") == \
        ["train.checkpoint:2 imports methods (layer 5 > 4)"]
    assert violations("from .pipeline import prune\n", "config") == ["config:1 imports pipeline (layer 7 > 2)"]
    assert violations("from .graph.masks import select_units\n", "pipeline") == []  # downwards is fine


def test_every_module_has_a_layer():
    for module, _, _ in _modules():
        layer_of(module)


def deferred_imports(source: str) -> List[Tuple[int, str]]:
    """``(line, text)`` of own-package imports inside a function that give no reason on their line."""
    tree, lines = ast.parse(source), source.splitlines()
    found = []
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                own = (isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("pass_zoo"))) \
                    or (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "pass_zoo" for a in node.names))
                if own and "#" not in lines[node.lineno - 1]:
                    found.append((node.lineno, lines[node.lineno - 1].strip()))
    return found


def test_own_imports_sit_at_module_level_unless_a_comment_says_why():
    # a deferred import hides a dependency from the reader; it is kept only where it buys something
    # (start-up time, an optional package), and says so on its line
    found = [f"{module}:{line}: {text}" for module, _, source in _modules() for line, text in deferred_imports(source)]
    assert found == []
    assert deferred_imports("def f():\n    from .graph import slim\n") == [(2, "from .graph import slim")]
    assert deferred_imports("def f():\n    from .graph import slim  # saves 2 s of start-up\n") == []
