"""Torch-Pruning's internals, in one place.

pass-zoo reads Torch-Pruning through its public API -- ``DependencyGraph`` (``build_dependency``,
``get_pruning_group``, ``get_pruner_of_module``, ``get_out_channels``, ``is_out_channel_pruning_fn``,
``pruning_history``, ``load_pruning_history``, ``module2node``, ``IGNORED_LAYERS_IN_TRACING``), its
``Node``, ``Dependency`` and ``Group`` objects (a group's items: ``dep.target.module``, ``dep.handler``,
``idxs``, ``root_idxs``), ``tp.importance`` and ``tp.pruner``. Where the adapter must correct or bound
what Torch-Pruning does (``groups.py``), that API has no hook, and it reaches the internals below. Each is
named here with the reason, and nothing else in pass-zoo touches them; all were written against the
versions in ``TESTED_RANGE``, and another version warns once, on import.

Not used: ``DependencyGraph.register_customized_layer``, the public hook for a layer type's pruner. It
would carry the gains of weight-standardised convs (``groups._Graph.get_pruning_group`` slices them
instead), but a customised pruner turns the layer's handler into one Torch-Pruning's importance
criteria do not know: they skip the layer (``GroupMagnitudeImportance`` scores an NF-ResNet conv group
as None), and the regularising pruners (group-norm, growreg) leave its weights alone. The scores of the
Torch-Pruning methods on NF-ResNet and BiT would change.
"""
from __future__ import annotations

import contextlib
import re
import warnings
from typing import Callable, Iterable, List, Optional, Tuple

import torch_pruning as tp
import torch_pruning.dependency.graph as _tp_graph
import torch_pruning.dependency.index_mapping as _tp_index_mapping

# The Torch-Pruning versions this module was written and tested against (pinned in pyproject.toml).
TESTED_LOW, TESTED_BELOW = (1, 6), (1, 7)
TESTED_RANGE = "torch-pruning>=1.6,<1.7"


class UntestedTorchPruningWarning(UserWarning):
    """Torch-Pruning outside ``TESTED_RANGE``: the internals below may have moved or changed meaning."""


def installed_version() -> str:
    """The installed distribution's version (``tp.__version__`` lags behind it: 1.6.1 says 1.6.0)."""
    from importlib import metadata

    try:
        return metadata.version("torch-pruning")
    except metadata.PackageNotFoundError:  # a source checkout on the path
        return str(getattr(tp, "__version__", "0"))


def _release(version: str) -> Tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def untested_version(version: Optional[str] = None) -> Optional[str]:
    """The warning for ``version`` (default: the installed one) outside ``TESTED_RANGE``; None inside it."""
    version = installed_version() if version is None else version
    if TESTED_LOW <= _release(version)[:2] < TESTED_BELOW:
        return None
    return (f"torch-pruning {version} is installed; pass-zoo is tested with {TESTED_RANGE} and relies on its "
            f"internals (pass_zoo/graph/tp_compat.py): channel groups may differ or fail to build")


def warn_if_untested(version: Optional[str] = None) -> None:
    message = untested_version(version)
    if message is not None:
        warnings.warn(message, UntestedTorchPruningWarning, stacklevel=2)


warn_if_untested()


# ---- node and op types
# ``Node.type`` holds a ``tp.ops.OPTYPE``, and a node's ``module`` is one of ``tp.ops``'s private op
# classes for functional ops: the adapter corrects splits, reshapes and concatenations, so it must
# know which node is which.

def is_split(node) -> bool:
    return node.type == tp.ops.OPTYPE.SPLIT


def is_reshape(node) -> bool:
    return node.type == tp.ops.OPTYPE.RESHAPE


def is_concat(node) -> bool:
    return node.type == tp.ops.OPTYPE.CONCAT


def is_split_op(op) -> bool:
    """``tp.ops._SplitOp``: the uneven-split check reads its part offsets."""
    return isinstance(op, tp.ops._SplitOp)


def is_slice_op(op) -> bool:
    """``tp.ops._SliceOp``: a slice with fixed bounds on the channel axis keeps its group dense."""
    return isinstance(op, tp.ops._SliceOp)


def elementwise_name(op) -> Optional[str]:
    """The autograd name (``MulBackward0``, ...) of a ``tp.ops._ElementWiseOp`` (its ``_grad_fn``), else
    None: Torch-Pruning files every op it does not know as element-wise, so only the name tells a true
    product or sum, where two parts of a group join into one unit, from a matmul."""
    return op._grad_fn if isinstance(op, tp.ops._ElementWiseOp) else None


# ---- attributes of the op classes

def split_sizes(op) -> Optional[List[int]]:
    """``_SplitOp.split_sizes``: narrowed by Torch-Pruning when it prunes through the split."""
    return getattr(op, "split_sizes", None)


def split_offsets(op) -> Optional[List[int]]:
    """``_SplitOp.offsets``: the part boundaries its index mapping reads."""
    return getattr(op, "offsets", None)


def set_split_offsets(op, offsets: List[int]) -> None:
    """Torch-Pruning leaves ``offsets`` at the dense widths after pruning through a split."""
    op.offsets = list(offsets)


def concat_widths(op) -> Optional[List[int]]:
    """``_ConcatOp.concat_sizes``: the input widths its index mapping reads (None: not inferred)."""
    return op.concat_sizes


def set_concat_widths(op, sizes: List[int]) -> None:
    """The traced widths, replacing what Torch-Pruning's shape inference guesses."""
    op.concat_sizes = list(sizes)


def slice_bounds(op) -> Optional[Tuple[int, int, int, int, Tuple[int, ...]]]:
    """``(dim, start, end, step, input shape)`` of a ``_SliceOp`` (its ``dim/start/end/step`` and its
    autograd node's ``_saved_self_sym_sizes``), None where the input shape was not saved."""
    sizes = tuple(getattr(op.grad_fn, "_saved_self_sym_sizes", ()) or ())
    if not sizes:
        return None
    return op.dim, op.start, op.end, op.step, sizes


# ---- index mappings

def flatten_stride(dep) -> Optional[int]:
    """The stride of a dependency's first index mapping if it is a flatten/unflatten
    (``index_mapping._FlattenIndexMapping._stride``), else None: a reshape that splits the channel
    axis is mapped as ``(channels, stride)``, which the adapter checks against the traced shape."""
    mapping = dep.index_mapping[0]
    return mapping._stride if isinstance(mapping, _tp_index_mapping._FlattenIndexMapping) else None


def wrap_reshape_index_mapping(wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``index_mapping.update_reshape_index_mapping`` (looked up by ``update_index_mapping`` on
    every group) with ``wrap(original)``, once per process: there is no hook for a reshape Torch-Pruning
    cannot size."""
    current = _tp_index_mapping.update_reshape_index_mapping
    if not getattr(current, "pass_zoo_guard", False):
        wrapped = wrap(current)
        wrapped.pass_zoo_guard = True
        _tp_index_mapping.update_reshape_index_mapping = wrapped


def wrap_index_mapping(wrap: Callable[[Callable], Callable]) -> None:
    """Replace ``index_mapping.update_index_mapping`` (run by ``get_pruning_group`` before every group)
    with ``wrap(original)``, once per process: the only point after Torch-Pruning has (re)built every
    mapping and before a group walks them."""
    current = _tp_index_mapping.update_index_mapping
    if not getattr(current, "pass_zoo_guard", False):
        wrapped = wrap(current)
        wrapped.pass_zoo_guard = True
        _tp_index_mapping.update_index_mapping = wrapped


def read_concat_before_split(dep) -> None:
    """On an edge from a concatenation back to a split that feeds it, the split's mapping (part -> whole,
    ``_SplitIndexMapping``) sits in the first slot and the concatenation's (whole -> part,
    ``_ConcatIndexMapping``) in the second, and Torch-Pruning applies them in slot order; swapped, the
    edge reads back through the concatenation first."""
    first, second = dep.index_mapping[0], dep.index_mapping[1]
    if isinstance(first, _tp_index_mapping._SplitIndexMapping) and first.reverse \
            and isinstance(second, _tp_index_mapping._ConcatIndexMapping) and second.reverse:
        dep.index_mapping[0], dep.index_mapping[1] = second, first


def drop_split_mapping(op) -> None:
    """No part sizes, no offsets: Torch-Pruning then maps nothing through the split (and its size
    inference does not index past the parts)."""
    op.split_sizes, op.offsets = None, None


def quiet_shape_inference() -> None:
    """Torch-Pruning's shape inference warns when a walk through splits and concatenations runs long;
    where the adapter traced the widths, its answer is not needed."""
    warnings.filterwarnings("ignore", message="Maximum recursive depth reached", module="torch_pruning")


# ---- the graph and its groups

class DependencyGraph(tp.DependencyGraph):
    """``tp.DependencyGraph`` with a hook after its dependencies are built (it overrides the private
    ``_build_dependency``: the only point where the nodes exist and the index mappings are not yet
    inferred) and the name of a traced layer (the private ``_module2name``)."""

    def dependencies_built(self, nodes: Iterable) -> None:
        """Called with the graph's nodes once their dependencies exist."""

    def _build_dependency(self, module2node):
        super()._build_dependency(module2node)
        self.dependencies_built(module2node.values())

    def layer_name(self, module) -> Optional[str]:
        return self._module2name.get(module)


def index_pairs(idxs) -> List[Tuple[int, int]]:
    """``(index, root index)`` of the indices ``Group.add_dep`` receives (private ``_HybridIndex``)."""
    return [(int(i.idx), int(i.root_idx)) for i in idxs]


@contextlib.contextmanager
def group_class(cls: type):
    """``get_pruning_group`` builds its group with the ``Group`` of its own module, one ``add_dep`` per
    dependency it follows: swapped for ``cls`` (a ``tp.Group`` subclass) within this block, the only way
    to bound a walk that never closes."""
    saved, _tp_graph.Group = _tp_graph.Group, cls
    try:
        yield
    finally:
        _tp_graph.Group = saved
