"""Torch-Pruning's internals stay behind ``pass_zoo/graph/tp_compat.py``, which knows the versions it
was tested with."""
import ast
import re
import warnings
from pathlib import Path

import pytest

from pass_zoo.graph import tp_compat

PACKAGE = Path(__file__).resolve().parents[1] / "pass_zoo"
COMPAT = PACKAGE / "graph" / "tp_compat.py"
# Torch-Pruning's submodules that are no part of its public API
INTERNAL_MODULES = {"ops", "_helpers"}
INTERNAL_SUBMODULES = {("dependency", "index_mapping"), ("dependency", "graph"), ("dependency", "node")}


# ------------------------------------------------------------------------------ version range
def test_the_installed_torch_pruning_is_in_the_tested_range():
    from importlib import metadata

    assert tp_compat.installed_version() == metadata.version("torch-pruning")
    assert tp_compat.untested_version() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp_compat.warn_if_untested()


@pytest.mark.parametrize("version", ["1.6.0", "1.6.1", "1.6.9rc1", "1.6.2+local"])
def test_versions_inside_the_range_pass(version):
    assert tp_compat.untested_version(version) is None


@pytest.mark.parametrize("version", ["1.5.2", "1.7.0", "2.0", "0.6.1"])
def test_a_version_outside_the_range_warns_once_naming_the_range(monkeypatch, version):
    monkeypatch.setattr(tp_compat, "installed_version", lambda: version)
    with pytest.warns(tp_compat.UntestedTorchPruningWarning) as caught:
        tp_compat.warn_if_untested()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "\n" not in message
    assert message.startswith(f"torch-pruning {version} is installed; pass-zoo is tested with "
                              "torch-pruning>=1.6,<1.7")


def test_pyproject_pins_the_tested_range():
    pyproject = (PACKAGE.parent / "pyproject.toml").read_text()
    pins = re.findall(r'"torch-pruning([^"]*)"', pyproject)
    assert pins == [tp_compat.TESTED_RANGE.removeprefix("torch-pruning")]


# ------------------------------------------------------------------------------ source scan
def _defined_private_names(paths) -> set:
    """Single-underscore names a package defines: functions, classes, module globals, ``self._x``."""
    names = set()
    for path in paths:
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def _torch_pruning_private_names() -> set:
    """Torch-Pruning's private names that pass-zoo does not define itself (``graph._module2name``,
    ``op._grad_fn``, ``_build_dependency``, ...): reached on an object, no import shows them."""
    import torch_pruning

    return (_defined_private_names(Path(torch_pruning.__file__).parent.rglob("*.py"))
            - _defined_private_names(p for p in PACKAGE.rglob("*.py") if p != COMPAT))


def _scan(source: str, private_names=frozenset()):
    """``(line, name)`` of every Torch-Pruning name a module reaches that is private (a part starting
    with ``_``) or in one of its internal submodules: the imports of ``torch_pruning[.x]``, attribute
    chains on the names they bind, methods a subclass of a Torch-Pruning class overrides, and any
    attribute (or ``getattr`` string) in ``private_names``."""
    tree = ast.parse(source)
    bound, found = {}, []

    def check(line, parts):
        if any(p.startswith("_") and not p.startswith("__") for p in parts[1:]) \
                or (len(parts) > 1 and parts[1] in INTERNAL_MODULES) or tuple(parts[1:3]) in INTERNAL_SUBMODULES:
            found.append((line, ".".join(parts)))

    def chain_of(node):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.insert(0, node.attr)
            node = node.value
        return bound[node.id] + chain if isinstance(node, ast.Name) and node.id in bound else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "torch_pruning":
                    check(node.lineno, parts)
                    bound[alias.asname or "torch_pruning"] = parts if alias.asname else ["torch_pruning"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "torch_pruning":
            for alias in node.names:
                parts = node.module.split(".") + [alias.name]
                check(node.lineno, parts)
                bound[alias.asname or alias.name] = parts
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and id(node) not in inner and chain_of(node):
            check(node.lineno, chain_of(node))
        if isinstance(node, ast.ClassDef) and any(chain_of(b) for b in node.bases):
            base = next(chain_of(b) for b in node.bases if chain_of(b))
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    check(item.lineno, base + [item.name])
        if isinstance(node, ast.Attribute) and node.attr in private_names:
            found.append((node.lineno, f".{node.attr}"))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args[1:] \
                and node.func.id in ("getattr", "setattr", "hasattr", "delattr") \
                and isinstance(node.args[1], ast.Constant) and node.args[1].value in private_names:
            found.append((node.lineno, f".{node.args[1].value}"))
    return sorted(found)


def test_the_scan_finds_every_kind_of_reach():
    source = """
import torch_pruning as tp
import torch_pruning.dependency.graph as g
from torch_pruning.ops import OPTYPE
from torch_pruning import _helpers
from torch_pruning.dependency import Group
isinstance(x, tp.ops._SplitOp)
tp.dependency.index_mapping.update_reshape_index_mapping = f
graph._module2name.get(m)
getattr(op, "_grad_fn", None)
class G(tp.DependencyGraph):
    def _build_dependency(self, nodes):
        pass
    def get_pruning_group(self, *args):
        pass
tp.importance.GroupMagnitudeImportance(p=1)
tp.pruner.GroupNormPruner
Group()
"""
    assert _scan(source, {"_module2name", "_grad_fn"}) == [
        (3, "torch_pruning.dependency.graph"), (4, "torch_pruning.ops.OPTYPE"), (5, "torch_pruning._helpers"),
        (7, "torch_pruning.ops._SplitOp"), (8, "torch_pruning.dependency.index_mapping.update_reshape_index_mapping"),
        (9, "._module2name"), (10, "._grad_fn"), (12, "torch_pruning.DependencyGraph._build_dependency")]


def test_torch_pruning_private_names_are_known():
    names = _torch_pruning_private_names()
    assert {"_module2name", "_build_dependency", "_grad_fn", "_stride", "_SplitOp"} <= names


def test_only_the_compat_module_touches_torch_pruning_internals():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert COMPAT in modules and len(modules) > 40
    private = _torch_pruning_private_names()
    reaches = {str(path.relative_to(PACKAGE)): _scan(path.read_text(), private) for path in modules if path != COMPAT}
    assert {path: found for path, found in reaches.items() if found} == {}
    assert _scan(COMPAT.read_text(), private)  # the scan sees what the compat module does reach
