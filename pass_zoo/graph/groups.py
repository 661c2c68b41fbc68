"""Coupled channel groups: Torch-Pruning's dependency graph as plain ``ChannelGroup`` data.

Torch-Pruning's ``DependencyGraph`` finds the *coupled* channels of a network (a conv, its BN, the
convs that read it, every branch of a residual sum, ...). ``GroupBuilder`` turns each coupled group
into a ``ChannelGroup`` -- name, channel count, units (what one mask entry controls), producers
(layers whose output channels are the group) and consumers (layers that read them) -- or leaves it
dense with the reason (the exclusion policy below).

Transformers: a registered attention module (``families``) turns its ``qkv`` group into a *head*
group -- one unit per head (its q, k, v rows and its ``proj`` columns), gated at ``proj``'s input.
MLP hidden units (fc1 out / fc2 in) are ordinary channel groups.

Groups that cannot be gated exactly -- their channels pass through LayerNorm/GroupNorm, a bare
parameter (layer scale, position embeddings), a grouped weight-standardised conv, a slice with fixed
bounds or a split/concatenation Torch-Pruning maps unevenly, or are the network's output -- are
*excluded*: they stay dense, are listed with the reason, and the rest of the network is still
pruned. Only a model with nothing prunable is refused (``AdapterError`` naming the layers).
"""
from __future__ import annotations

import itertools
import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.overrides import TorchFunctionMode

from ..errors import AdapterError
from . import tp_compat
from .families import (attention_family, attention_modules, channel_norm_family, splits_equal_parts,
                       stores_split_sizes)

log = logging.getLogger(__name__)

# Layers whose channel dimension we can gate exactly at their input.
_GATEABLE = (nn.Conv2d, nn.Conv1d, nn.Linear)
# Per-channel layers: pruning them is exact whatever happens upstream.
_PER_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU)


def _weight_standardised():
    """Convs that standardise each filter over its inputs (NF-ResNets, BiT): a zeroed input still
    counts in the mean and variance, so their search-time gate standardises over the kept inputs
    (``gates``); the scaled ones carry a per-filter gain that ``_Graph.get_pruning_group`` slices."""
    from timm.layers import std_conv

    return tuple(getattr(std_conv, n) for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                                "ScaledStdConv2dSame") if hasattr(std_conv, n))


_WEIGHT_STANDARDISED = _weight_standardised()


def _fixed_channel_slice(op) -> bool:
    """A tensor slice that keeps only part of the channel dimension (DPN's ``x[:, :num_1x1_c]``):
    its bounds are integers in the model's code, so once channels are removed the slice cuts in the
    wrong place. Channels sit where Torch-Pruning expects them: dim 1 (NCHW, NC), or the last of three."""
    bounds = tp_compat.slice_bounds(op)
    if bounds is None:
        return False
    dim, start, end, step, sizes = bounds
    dim %= len(sizes)
    if dim != (2 if len(sizes) == 3 else 1):
        return False
    return start > 0 or step != 1 or end < int(sizes[dim])

def _reshape_mapping_or_none(update):
    """Torch-Pruning's reshape index mapping divides by the channel count it infers past the reshape,
    which is 0 where a residual path reaches the model's input (SHViT): no mapping, as for any reshape
    it cannot size, instead of a ZeroDivisionError that stops the whole graph build."""
    def _update(graph, node):
        if getattr(node, "pass_zoo_keeps_last_dim", False):
            return  # merges the leading dims of a channels-last tensor: channel i stays channel i
        try:
            update(graph, node)
        except ZeroDivisionError:
            pass  # raised before any mapping is set: the node keeps its identity mapping
    return _update


def _misread_unflattens(graph, view_shapes) -> Dict[object, Tuple[int, int]]:
    """Reshape op -> ``(parts, width)`` for the reshapes whose channel mapping pairs wrong channels.

    Torch-Pruning maps a reshape that splits the channel axis in two as ``(channels, parts)``:
    channel ``i`` -> ``i // parts``. Selective-kernel attention splits it the other way, ``(paths,
    channels)`` -- channel ``i`` is ``i % channels`` -- so the adapter leaves their groups dense.
    ``view_shapes``: each traced reshape's (input, output) shape, by autograd node."""
    misread = {}
    for node in graph.module2node.values():
        shapes = view_shapes.get(node.grad_fn) if tp_compat.is_reshape(node) else None
        if shapes is None:
            continue
        stride = next((s for s in map(tp_compat.flatten_stride, node.dependencies) if s is not None), None)
        (before, after), channels = shapes, shapes[0][1] if len(shapes[0]) > 1 else 0
        if stride is not None and len(after) > len(before) >= 2 and after[1] * after[2] == channels \
                and stride > 1 and channels // stride != after[1]:
            misread[node.module] = (int(after[1]), int(after[2]))
    return misread


def _concat_before_split(update):
    """A split part that feeds a concatenation directly (FasterNet's ``cat(conv(x1), x2)``): Torch-Pruning
    maps the edge from the concatenation back to the split through the split first, so the first
    input's channels leak into the split; it now reads through the concatenation first. A split whose
    readers do not pair with its parts (``_order_split_outputs``) gets no mapping at all."""
    def _update(graph):
        for node in graph.module2node.values():
            if getattr(node, "pass_zoo_unpaired", False):
                tp_compat.drop_split_mapping(node.module)
        update(graph)
        for node in graph.module2node.values():
            if tp_compat.is_concat(node):
                for dep in node.dependencies:
                    tp_compat.read_concat_before_split(dep)
    return _update


tp_compat.wrap_index_mapping(_concat_before_split)
tp_compat.wrap_reshape_index_mapping(_reshape_mapping_or_none)
tp_compat.quiet_shape_inference()  # the traced concatenation widths (``_CatSizes``) replace its answer


@dataclass
class _Slot:
    """Positions of one layer dimension owned by a group, and the unit each position belongs to."""

    module_name: str
    positions: torch.Tensor  # long, indices into the layer's channel dimension
    units: torch.Tensor  # long, the group unit controlling each position


@dataclass
class ChannelGroup:
    """One coupled set of channels: the unit of the PASS walk and of a mask."""

    name: str  # root layer name (stable for a given architecture)
    order: int  # position in forward-execution order
    channels: int  # channels of the root layer
    ch_groups: int  # grouped convs force the same pattern in each of ch_groups slices
    root: nn.Module = field(repr=False)
    root_fn: object = field(repr=False)
    producers: List[_Slot] = field(default_factory=list, repr=False)  # out-channel layers
    consumers: List[_Slot] = field(default_factory=list, repr=False)  # in-channel layers
    norms: List[_Slot] = field(default_factory=list, repr=False)  # BatchNorms over the group's channels
    kind: str = "channels"  # channels | heads
    head_dim: int = 0  # heads: channels of proj's input per head
    attention: Optional[str] = None  # heads: the attention module's name
    unit_index: Optional[torch.Tensor] = field(default=None, repr=False)  # root channel -> unit (heads)
    channel_norms: List[_Slot] = field(default_factory=list, repr=False)  # registered channel norms (GRN)

    def __post_init__(self):
        # cached: MACs queries read it for every layer of every candidate during selection
        self._units = int(self.unit_index.max()) + 1 if self.unit_index is not None else self.channels // self.ch_groups

    @property
    def units(self) -> int:
        return self._units

    @property
    def unit_width(self) -> int:
        """Channels of the pruned width per unit (what ``round_to`` rounds): conv groups or head_dim."""
        return self.head_dim if self.kind == "heads" else self.ch_groups

    def unit_of_channel(self) -> torch.Tensor:
        """Root channel -> unit. Grouped convs prune the same position of every slice; a head's q, k, v
        rows all belong to the head."""
        if self.unit_index is not None:
            return self.unit_index
        return torch.arange(self.channels) % self.units

    def first_channels(self) -> torch.Tensor:
        """One root channel per unit (the first), to read a unit mask off a channel mask."""
        first = torch.full((self.units,), self.channels, dtype=torch.long)
        return first.scatter_reduce(0, self.unit_of_channel(), torch.arange(self.channels), "amin")

    def expand(self, unit_mask: torch.Tensor) -> torch.Tensor:
        """Unit mask -> root-channel mask."""
        return unit_mask[self.unit_of_channel().to(unit_mask.device)]


_CATS = (torch.cat, torch.concat, torch.concatenate)
_CHUNKS = (torch.chunk, torch.Tensor.chunk)
_VIEWS = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape)


def _linear_input_views(grad_fn):
    """The view that merges a >2-d input's leading dims in ``linear``: out = view(addmm(b, view(x), w^T))."""
    for mm, _ in getattr(grad_fn, "next_functions", ()):
        if mm is not None and type(mm).__name__ in ("AddmmBackward0", "MmBackward0"):
            for view, _ in mm.next_functions:
                if view is not None and type(view).__name__ in ("ViewBackward0", "UnsafeViewBackward0"):
                    yield view


class _CatSizes(TorchFunctionMode):
    """Records, per concatenation's autograd node, the sizes of its inputs along the cat dimension.

    Torch-Pruning infers a concatenation's input widths by walking the graph back to a layer; through
    channel slices and nested splits (CSPNet's cross-stage split, DPN's dual paths) it gets them
    wrong -- the index mapping then slims a reader of the concatenation to a width its input does not
    have -- or gives up (None, and its own sum() raises a TypeError). The traced sizes are exact.
    """

    def __init__(self):
        super().__init__()
        self.sizes: Dict[object, List[int]] = {}
        self.channel_chunks: set = set()  # autograd nodes of chunks along the last (a linear's) dim
        self.view_shapes: Dict[object, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}  # reshapes: (in, out)
        self.linear_views: set = set()  # autograd nodes of the views inside linear layers on >2-d inputs

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _CHUNKS and isinstance(out, tuple) and out and out[0].grad_fn is not None:
            dim = args[2] if len(args) > 2 else kwargs.get("dim", 0)
            ndim = out[0].dim()
            if ndim >= 2 and dim % ndim == ndim - 1:
                self.channel_chunks.add(out[0].grad_fn)
        if func in _VIEWS and isinstance(out, torch.Tensor) and out.grad_fn is not None and args \
                and isinstance(args[0], torch.Tensor):
            self.view_shapes[out.grad_fn] = (tuple(args[0].shape), tuple(out.shape))
        if func is F.linear and isinstance(out, torch.Tensor) and out.grad_fn is not None \
                and isinstance(args[0], torch.Tensor) and args[0].dim() >= 3:
            # a linear layer on [..., C] merges the leading dims inside aten: record that view too
            self.linear_views.update(_linear_input_views(out.grad_fn))
        if func in _CATS and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            tensors = args[0] if args else kwargs.get("tensors", ())
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            # an input without grad is no node of Torch-Pruning's graph: the sizes would not line up
            if all(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
                self.sizes[out.grad_fn] = [int(t.shape[dim]) for t in tensors]
        return out


class _Graph(tp_compat.DependencyGraph):
    """``DependencyGraph`` whose concatenations carry their traced input widths (see ``_CatSizes``)
    and whose groups slice weight-standardised convs' gains."""

    cat_sizes: Dict[object, List[int]] = {}
    channel_chunks: set = set()
    linear_views: set = set()
    misread_reshapes: Dict[object, Tuple[int, int]] = {}  # set by build_graph, see _misread_unflattens

    def get_pruning_group(self, module, pruning_fn, idxs):
        """Torch-Pruning's group, mapped through splits at their current widths; pruning it also
        slices the gains of the scaled weight-standardised convs whose filters it removes (Torch-
        Pruning's conv pruner knows only weight and bias). Not a customised pruner registered with
        ``register_customized_layer``: Torch-Pruning's criteria would skip such convs (see ``tp_compat``)."""
        self._refresh_split_offsets()
        group = super().get_pruning_group(module, pruning_fn, idxs)
        gains = [(item.dep.target.module, list(item.idxs)) for item in group.items
                 if isinstance(item.dep.target.module, _WEIGHT_STANDARDISED)
                 and isinstance(getattr(item.dep.target.module, "gain", None), nn.Parameter)
                 and self.is_out_channel_pruning_fn(item.dep.handler)]
        if gains:
            prune = group.prune

            def prune_with_gains(*args, **kwargs):
                keep = [sorted(set(range(conv.gain.shape[0])) - set(drop)) for conv, drop in gains]
                prune(*args, **kwargs)
                for (conv, _), kept in zip(gains, keep):
                    conv.gain = nn.Parameter(conv.gain.data[kept].clone(), requires_grad=conv.gain.requires_grad)
            group.prune = prune_with_gains
        return group

    def _refresh_split_offsets(self):
        """Torch-Pruning narrows a split's ``split_sizes`` when it prunes through it but leaves the
        ``offsets`` its index mapping reads at the dense widths: a later group would map its channels
        onto the wrong part. Rebuilt from the sizes before each group is formed."""
        for node in self.module2node.values():
            sizes = tp_compat.split_sizes(node.module) if tp_compat.is_split(node) else None
            if sizes is not None:
                tp_compat.set_split_offsets(node.module, [0] + [int(v) for v in itertools.accumulate(sizes)])

    def dependencies_built(self, nodes):
        for node in nodes:
            # Torch-Pruning turns off the index mapping of every split below a 3-d parameter (a ViT's
            # position embedding), meant for the token concatenation; a GLU's chunk of fc1's features
            # is a channel split and needs its mapping
            if tp_compat.is_split(node) and node.grad_fn in self.channel_chunks:
                node.enable_index_mapping = True
            if tp_compat.is_split(node):
                _order_split_outputs(node)
            # a linear layer on [B, H, W, C] (MambaOut) views it as [B*H*W, C]; Torch-Pruning reads the
            # 4-d input as NCHW and maps the view as a flatten, pairing the wrong channels
            if tp_compat.is_reshape(node) and node.grad_fn in self.linear_views:
                node.pass_zoo_keeps_last_dim = True
            sizes = self.cat_sizes.get(node.grad_fn) if tp_compat.is_concat(node) else None
            # node.inputs follows the cat's argument order; a repeated input is one node (no mapping)
            if sizes is not None and len(sizes) == len(node.inputs) == len(set(node.inputs)):
                tp_compat.set_concat_widths(node.module, sizes)


def _order_split_outputs(node) -> None:
    """Torch-Pruning maps a split's i-th part onto ``node.outputs[i]``, but lists the outputs in the
    order its trace met them (MixNet's mixed conv: last part first), which pairs a part's channels with
    another part's reader. Autograd says which part each reader takes: the edge's output number."""
    def part(out):
        taken = [nr for fn, nr in getattr(out.grad_fn, "next_functions", ()) if fn is node.grad_fn]
        return min(taken) if taken else None
    parts = [part(out) for out in node.outputs]
    if None not in parts and len(set(parts)) == len(parts):
        node.outputs = [out for _, out in sorted(zip(parts, node.outputs), key=lambda po: po[0])]
    if None in parts or len(set(parts)) != len(parts) or sorted(parts) != list(range(len(parts))):
        # one part read by two layers, or a part nobody reads: outputs and parts do not pair up, and
        # Torch-Pruning's size inference indexes past its part sizes; groups through it stay dense
        node.pass_zoo_unpaired = True


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph with per-head parameters left to the attention families and
    concatenations mapped with their traced widths.

    Used for the layer sequence *and* when an export replays its pruning history, so both see the
    same groups. Torch-Pruning would cut e.g. Swin's bias table along its rows with qkv indices.
    """
    per_head = [p for _, mod, fam in attention_modules(model) for p in fam.per_head_params(mod)]
    recorder, graph = _CatSizes(), _Graph()
    graph.cat_sizes, graph.channel_chunks, graph.linear_views = recorder.sizes, recorder.channel_chunks, recorder.linear_views
    with recorder:
        try:
            graph.build_dependency(model, example_input, ignored_params=per_head, verbose=False)
            graph.misread_reshapes = _misread_unflattens(graph, recorder.view_shapes)
            return graph
        except TypeError as exc:
            if "NoneType" not in str(exc):
                raise
            cats = [n for n in graph.__dict__.get("module2node", {}).values() if tp_compat.is_concat(n)
                    and tp_compat.concat_widths(n.module) is None]
            raise AdapterError("Torch-Pruning cannot tell the widths of a concatenation"
                               + (f" reading {_node_layer(graph, cats[0])}" if cats else "")
                               + " (an input without gradient, or one tensor concatenated twice)") from exc
        finally:
            # the autograd nodes hold the traced activations
            graph.cat_sizes, graph.channel_chunks, graph.linear_views, recorder.view_shapes = {}, set(), set(), {}


def _node_layer(graph: tp_compat.DependencyGraph, node) -> str:
    """'layer NAME': the nearest named layer feeding a Torch-Pruning graph node."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop(0)
        if n in seen:
            continue
        seen.add(n)
        name = graph.layer_name(n.module)
        if isinstance(n.module, nn.Module) and name:
            return f"layer '{name}'"
        stack.extend(n.inputs)
    return "an unnamed layer"


def _module_positions(model: nn.Module, example_input: torch.Tensor):
    """Execution order of every module, output positions per sample of every conv/linear, and the
    matmul MACs per head and sample of every registered attention module."""
    order: Dict[str, int] = {}
    positions: Dict[str, int] = {}
    attn_per_head: Dict[str, int] = {}
    batch = int(example_input.shape[0])
    handles = []
    families = {name: fam for name, _, fam in attention_modules(model)}

    def hook(name):
        def _fn(mod, inp, out):
            order.setdefault(name, len(order))
            if isinstance(mod, _GATEABLE) and isinstance(out, torch.Tensor):
                ch = mod.out_channels if isinstance(mod, (nn.Conv1d, nn.Conv2d)) else mod.out_features
                # all of the sample's outputs: Swin runs its linears on (batch * windows, tokens, C);
                # summed over calls, since a shared module (CoaT's position encodings) runs once per user
                positions[name] = positions.get(name, 0) + out.numel() // (ch * batch)
            if name in families:
                fam = families[name]
                attn_per_head[name] = (attn_per_head.get(name, 0)
                                       + fam.matmul_macs(mod, inp[0]) // (fam.heads(mod) * batch))
        return _fn

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
    return order, positions, attn_per_head


def _ch_groups(module: nn.Module) -> int:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1 and module.groups != module.out_channels:
        return module.groups
    if isinstance(module, nn.GroupNorm):
        return module.num_groups
    return 1


def _dims(module: nn.Module) -> Tuple[int, int]:
    """(output, input) channel counts of a conv/linear/per-channel layer."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.out_channels, module.in_channels
    if isinstance(module, nn.PReLU):
        return (module.weight.numel(),) * 2
    return (module.num_features,) * 2


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1 and module.groups == module.out_channels


# Torch-Pruning resolves one group in well under a second; on some graphs (ReXNet's in-place adds
# into a channel slice) it never finishes. Past this many seconds on one group: a clear AdapterError.
GROUP_TIME_LIMIT_S = 60

# Torch-Pruning walks a group by following index mappings until nothing new appears. Through some
# reshapes (Visformer's and EfficientViT's conv attention, ...) every lap maps the indices to a new
# set, so the walk never closes. One dependency followed this many times means it has looped.
MAX_DEP_REPEATS = 64


class _WalkLooped(Exception):
    pass


_LOOPED = "Torch-Pruning's walk of its coupled channels loops (an index mapping through a reshape it cannot close)"


# Truly element-wise products and sums: channel j of the output depends on channel j of each input.
# Torch-Pruning files every op it does not know as element-wise, matmuls included, whose "channels"
# are contracted (q @ k^T), so only these may join parts of a group into one unit.
_JOINING_OPS = {"MulBackward0", "AddBackward0", "SubBackward0", "DivBackward0"}


class _BoundedGroup(tp.Group):
    """A ``Group`` that stops a walk which follows one dependency more than ``MAX_DEP_REPEATS`` times,
    or whose indices outgrow every layer of the model (``max_indices``: a reshape mapped channels onto
    channels x positions, and each later step is that much slower)."""

    max_indices = 0
    # element-wise op -> (position, root channel) of every visit during one root's walk: the merged
    # group keeps one root per position, so where two parts of the group meet (a GLU's product) only
    # the walk shows it
    joins: Dict[object, List[Tuple[int, int]]] = {}

    def add_dep(self, dep, idxs):
        counts = self.__dict__.setdefault("_dep_counts", {})
        key = (id(dep.source), id(dep.target), dep.handler)
        counts[key] = counts.get(key, 0) + 1
        if counts[key] > MAX_DEP_REPEATS or (self.max_indices and len(idxs) > self.max_indices):
            raise _WalkLooped()
        if tp_compat.elementwise_name(dep.target.module) in _JOINING_OPS:
            type(self).joins.setdefault(dep.target.module, []).extend(tp_compat.index_pairs(idxs))
        super().add_dep(dep, idxs)


def _widest(model: nn.Module) -> int:
    """The largest channel / feature count of any conv or linear layer (a flatten's input included)."""
    return max([max(_dims(m)) for m in model.modules() if isinstance(m, _GATEABLE)] or [0])


def _coupled_groups(graph: tp.DependencyGraph, ignored: List[nn.Module], root_types):
    """``(root, group)`` for every coupled group, as Torch-Pruning's ``get_all_groups`` finds them (the
    first unvisited conv/linear as root, its output channels whole), one root at a time, so that a root
    whose walk loops or fails comes as ``(root, why)`` and the other groups still come."""
    ignored = {id(m) for m in list(ignored) + list(graph.IGNORED_LAYERS_IN_TRACING)}
    visited = set()
    bounded = type("_Bounded", (_BoundedGroup,), {"max_indices": 2 * _widest(graph.model)})
    for module in list(graph.module2node):
        if id(module) in ignored or not isinstance(module, root_types) or id(module) in visited:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            bounded.joins = {}
            # the bounded group for one call (not across the generator's yields, where other code may walk groups)
            with tp_compat.group_class(bounded):
                group = graph.get_pruning_group(module, pruner.prune_out_channels,
                                                list(range(pruner.get_out_channels(module))))
            group.joins, bounded.joins = bounded.joins, {}
        except _WalkLooped:
            yield module, _LOOPED
            continue
        except (IndexError, KeyError, ValueError, TypeError, ZeroDivisionError, RuntimeError) as exc:
            # Torch-Pruning's index mapping fails on this group alone; the others still come
            yield module, f"Torch-Pruning cannot map its coupled channels ({type(exc).__name__}: {exc})"
            continue
        prunable = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(id(dep.target.module))
                prunable = prunable and id(dep.target.module) not in ignored
        if prunable:
            yield module, group


def _each_within(groups, seconds: float, names: Dict[nn.Module, str]):
    """Yield ``(root, group)`` from ``groups``, giving up if one group takes longer than ``seconds``.

    Uses SIGALRM, so only in the main thread of a Unix process; elsewhere there is no limit.
    """
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield from groups
        return
    groups, last = iter(groups), [None]

    def _timeout(signum, frame):
        after = f" after group '{last[0]}'" if last[0] else ""
        raise AdapterError(f"Torch-Pruning's dependency analysis did not finish within {seconds:g} s{after} "
                           "(channel slicing or in-place ops it cannot follow)")

    previous = signal.signal(signal.SIGALRM, _timeout)
    try:
        while True:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            try:
                item = next(groups)
            except StopIteration:
                return
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            last[0] = names.get(item[0])
            yield item
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Excluded(Exception):
    """A group that cannot be gated exactly: it stays dense (the reason is kept for the log)."""


def _shared_position_units(channels: int, slots: List[_Slot]) -> Optional[torch.Tensor]:
    """Root channel -> unit where root channels share a position of some layer or element-wise op,
    else None.

    A gated linear unit (timm's ``GluMlp``: ``fc1``'s output chunked in two halves, multiplied, read by
    ``fc2``) joins ``fc1``'s rows ``j`` and ``hidden + j`` in the product's channel ``j``, which only
    ``fc2``'s input ``j`` reads: gating that input removes both rows, so the two are one unit
    (Torch-Pruning's group reaches ``fc2`` through one half only; the product shows the join). Every
    unit must own as many root channels."""
    parent = list(range(channels))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    merged = False
    for slot in slots:
        first: Dict[int, int] = {}
        for pos, root in zip(slot.positions.tolist(), slot.units.tolist()):
            other = first.setdefault(pos, root)
            a, b = find(other), find(root)
            if a != b:
                parent[max(a, b)] = min(a, b)
                merged = True
    if not merged:
        return None
    ids: Dict[int, int] = {}
    index = torch.tensor([ids.setdefault(find(c), len(ids)) for c in range(channels)], dtype=torch.long)
    sizes = torch.bincount(index)
    if bool((sizes != sizes[0]).any()):
        raise _Excluded("its layers couple unequal numbers of its channels into one unit "
                        f"({int(sizes.min())} to {int(sizes.max())})")
    return index


def _sized_split(node) -> bool:
    """A ``split`` by a list of sizes (``torch.split(x, [a, b])``): models keep such sizes as attributes
    (FasterNet's partial conv, InceptionNeXt's branches), unlike ``chunk``, which recomputes its parts."""
    return type(node.grad_fn).__name__ == "SplitWithSizesBackward0"


def _split_readers(module_names, node) -> str:
    names = [module_names[n.module] for n in node.outputs if n.module in module_names]
    return f"'{names[0]}'" if names else "an unnamed operation"


def _check_even_splits(tp_group, unit_index: torch.Tensor, resized=lambda node: False) -> None:
    """Each unit must own as many channels in every part of a split its group passes (chunk(2) of a
    GLU): pruning whole units then keeps the parts equal, as ``chunk`` recomputes them. A split whose
    sizes a registered module rewrites after slimming (``resized(node)``) may come out uneven."""
    for item in tp_group.items:
        op = item.dep.target.module
        offsets = tp_compat.split_offsets(op)
        if not tp_compat.is_split_op(op) or not offsets or len(offsets) < 3 or resized(item.dep.target):
            continue
        idxs = torch.as_tensor(item.idxs, dtype=torch.long)
        part = torch.bucketize(idxs, torch.as_tensor(offsets[1:-1]), right=True)
        units = unit_index[torch.as_tensor(item.root_idxs, dtype=torch.long)]
        counts = torch.zeros(int(unit_index.max()) + 1, len(offsets) - 1, dtype=torch.long)
        counts.index_put_((units, part), torch.ones_like(units), accumulate=True)
        if bool((counts != counts[:, :1]).any()):
            raise _Excluded("its units fall unevenly into the parts of a split (pruning them would "
                            "change the split's sizes)")


class GroupBuilder:
    """Torch-Pruning's groups of one traced model -> ``ChannelGroup`` list (walk order) + ``excluded``."""

    def __init__(self, model: nn.Module, graph: tp.DependencyGraph, ignored: List[nn.Module]):
        self.model, self.graph, self.ignored = model, graph, ignored
        self.module_names = {m: n for n, m in model.named_modules()}
        # modules whose stored split sizes are rewritten after slimming (MixNet's mixed conv, ...)
        self._split_holders = tuple(f"{n}." for n, m in model.named_modules() if n and stores_split_sizes(m))
        self._equal_parts = [f"{n}." for n, m in model.named_modules() if n and splits_equal_parts(m)]
        self.param_names = {p: n for n, p in model.named_parameters()}
        # qkv layer -> (attention module name, module, family), for the head groups
        self._attention = {}
        self._attention_skip: Dict[str, str] = {}
        for name, mod, fam in attention_modules(model):
            reason = fam.check(mod)
            if reason:
                self._attention_skip[name] = reason
            else:
                self._attention[fam.qkv(mod)] = (name, mod, fam)
        # Attention modules without a registered family (CaiT's class attention, talking heads): their
        # forward reshapes q/k/v by widths read off the input, so a slimmed inner layer breaks it
        # even where the gated network is exact. Their inner widths stay dense.
        self._opaque_attention: Dict[str, str] = {
            name: type(mod).__name__ for name, mod in model.named_modules()
            if isinstance(getattr(mod, "num_heads", None), int) and attention_family(mod) is None
            and any(isinstance(c, _GATEABLE) for c in mod.children())}
        # per-channel parameters of registered channel norms (GRN) -> the norm's name: gated exactly
        self._channel_norm_params: Dict[nn.Parameter, str] = {
            p: name for name, mod in model.named_modules() if channel_norm_family(mod) is not None
            for p in channel_norm_family(mod).per_channel_params(mod)}
        self.excluded: List[Tuple[str, str]] = []  # (group root, why it stays dense)

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def collect(self, order: Dict[str, int]) -> List[ChannelGroup]:
        groups = []
        all_groups = _coupled_groups(self.graph, self.ignored, _GATEABLE)
        for root, tp_group in _each_within(all_groups, GROUP_TIME_LIMIT_S, self.module_names):
            root_name = self.module_names[root]
            if isinstance(tp_group, str):  # its walk looped or failed: it stays dense
                self.excluded.append((root_name, tp_group))
                continue
            try:
                groups.append(self._make_group(tp_group, order))
            except _Excluded as exc:
                self.excluded.append((root_name, str(exc)))
                log.info("adapter: group '%s' is not pruned: %s", root_name, exc)
        self.excluded.sort(key=lambda e: (order.get(e[0], 10**9), e[0]))  # forward order reads best
        if not groups:
            if not self.excluded:
                raise AdapterError("no prunable channel group found (the model has no conv/linear outside the classifier)")
            why = "; ".join(f"group '{n}': {r}" for n, r in self.excluded[:2])
            more = f"; and {len(self.excluded) - 2} more" if len(self.excluded) > 2 else ""
            raise AdapterError(f"no prunable channel group found: all {len(self.excluded)} must stay dense ({why}{more})")
        if self.excluded:
            log.info("adapter: %d groups pruned, %d left dense", len(groups), len(self.excluded))
        groups.sort(key=lambda g: (g.order, g.name))
        for i, g in enumerate(groups):
            g.order = i
        return groups

    def _make_group(self, tp_group, order: Dict[str, int]) -> ChannelGroup:
        """One Torch-Pruning group -> a ``ChannelGroup``, or ``_Excluded`` if it cannot be gated exactly."""
        root = tp_group[0].dep.target.module
        root_name = self.module_names[root]
        n = self.graph.get_out_channels(root)
        attention = self._attention.get(root)
        if attention is None and root_name.rsplit(".", 1)[0] in self._attention_skip:
            raise _Excluded(f"attention heads of '{root_name.rsplit('.', 1)[0]}' cannot be pruned: "
                            f"{self._attention_skip[root_name.rsplit('.', 1)[0]]}")
        allowed_params = set(attention[2].per_head_params(attention[1])) if attention else set()
        producers, consumers, norms, seen_orders, ch_groups = [], [], [], [], 1
        channel_norms: Dict[str, _Slot] = {}
        for item in tp_group.items:
            mod = item.dep.target.module
            if mod in self.graph.misread_reshapes:
                parts, width = self.graph.misread_reshapes[mod]
                raise _Excluded(f"its channels are reshaped into ({parts}, {width}) with the channel axis "
                                f"inner, which Torch-Pruning maps as ({width}, {parts}): slimming "
                                f"'{root_name}' would pair the wrong channels")
            if tp_compat.is_split_op(mod) and getattr(item.dep.target, "pass_zoo_unpaired", False):
                raise _Excluded("its channels pass a split whose parts Torch-Pruning cannot pair with the layers "
                                f"reading them ({_split_readers(self.module_names, item.dep.target)} and others)")
            if tp_compat.is_split_op(mod) and _sized_split(item.dep.target) \
                    and not self._split_resized(item.dep.target):
                raise _Excluded(f"its channels pass a split by sizes stored in the model (read by "
                                f"{_split_readers(self.module_names, item.dep.target)}): slimming '{root_name}' "
                                "would leave them at the dense widths")
            if tp_compat.is_slice_op(mod) and _fixed_channel_slice(mod):
                raise _Excluded("its channels are sliced with fixed bounds in the model's code (a partial "
                                f"channel slice of a tensor the group reaches): slimming '{root_name}' "
                                "would shift the slice")
            if not isinstance(mod, nn.Module) or mod not in self.module_names:
                if isinstance(mod, nn.Parameter) and mod in self._channel_norm_params:
                    name = self._channel_norm_params[mod]  # a registered channel norm's weight or bias
                    channel_norms.setdefault(name, _Slot(name, torch.as_tensor(item.idxs, dtype=torch.long),
                                                         torch.as_tensor(item.root_idxs, dtype=torch.long)))
                    continue
                if isinstance(mod, nn.Parameter) and mod not in allowed_params:
                    raise _Excluded(f"its channels reach the bare parameter '{self.param_names.get(mod, '?')}'")
                continue  # functional ops (add, cat, flatten): no weights
            name = self.module_names[mod]
            if name in order:
                seen_orders.append(order[name])
            is_out = self.graph.is_out_channel_pruning_fn(item.dep.handler)
            ch_groups = max(ch_groups, _ch_groups(mod))
            slot = _Slot(name, torch.as_tensor(item.idxs, dtype=torch.long),
                         torch.as_tensor(item.root_idxs, dtype=torch.long))
            if isinstance(mod, _GATEABLE):
                parent = name.rsplit(".", 1)[0] if "." in name else ""
                if is_out and parent in self._opaque_attention:
                    raise _Excluded(f"layer '{name}' is inside the attention module '{parent}' "
                                    f"({self._opaque_attention[parent]}), whose head layout pass-zoo does not "
                                    "know: slimming it would break the module's reshapes")
                if not is_out and parent in self._opaque_attention:
                    # a group reaching an inner layer's input from outside is the module's input, and the
                    # module may reshape by its width (LambdaNet's layer: its output to its input's width)
                    raise _Excluded(f"layer '{name}' reads the input of the attention module '{parent}' "
                                    f"({self._opaque_attention[parent]}), whose forward may reshape by that "
                                    "input's width: slimming it would break the module's reshapes")
                if isinstance(mod, _WEIGHT_STANDARDISED) and not is_out and mod.groups > 1:
                    raise _Excluded(f"layer '{name}' ({type(mod).__name__}) standardises grouped filters "
                                    "over their inputs, which its search-time gate does not model")
                (producers if is_out else consumers).append(slot)
            elif isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                norms.append(slot)
            elif not isinstance(mod, _PER_CHANNEL):
                raise _Excluded(f"layer '{name}' ({type(mod).__name__}) mixes its channels")
        if not consumers:
            raise _Excluded("its channels are the network's output (no layer reads them)")
        if attention is not None:
            return self._head_group(root_name, root, tp_group, producers, consumers, norms, seen_orders, attention)
        if n % ch_groups:
            raise _Excluded(f"{n} channels do not split into {ch_groups} conv groups")
        slots = producers + consumers + norms + list(channel_norms.values())
        join_slots = [_Slot("", torch.tensor([p for p, _ in visits], dtype=torch.long),
                            torch.tensor([r for _, r in visits], dtype=torch.long))
                      for visits in getattr(tp_group, "joins", {}).values()]
        for holder in self._equal_parts:  # the same position of every part is one unit
            parts = [c for c in consumers if c.module_name.startswith(holder)]
            if len(parts) > 1:
                join_slots.append(_Slot("", torch.cat([c.positions for c in parts]), torch.cat([c.units for c in parts])))
        unit_index = _shared_position_units(n, slots + join_slots) if ch_groups == 1 else None
        if unit_index is not None:
            _check_even_splits(tp_group, unit_index, self._split_resized)
        group = ChannelGroup(root_name, min(seen_orders) if seen_orders else 10**9, n, ch_groups,
                             root, tp_group[0].dep.handler, producers, consumers, norms,
                             unit_index=unit_index, channel_norms=list(channel_norms.values()))
        units = group.units
        for slot in slots:
            if unit_index is None:
                slot.units = slot.units % units
            else:  # one entry per (position, unit): both halves of a GLU reach fc2's input i once
                pairs = torch.unique(torch.stack([slot.positions, unit_index[slot.units]]), dim=1)
                slot.positions, slot.units = pairs[0].contiguous(), pairs[1].contiguous()
        read = torch.unique(torch.cat([s.units for s in consumers]))
        if read.numel() < units:  # e.g. q/k rows of an attention type without a registered family
            raise _Excluded(f"{units - read.numel()} of its {units} units reach no conv/linear input that "
                            "could gate them (an unregistered attention module?)")
        for slots, side in ((producers, 0), (consumers, 1), (norms, 0)):
            for slot in slots:
                self._check_slot(slot, units, _dims(self._module(slot.module_name))[side])
        for slot in group.channel_norms:
            self._check_slot(slot, units, self._module(slot.module_name).weight.numel())
        return group

    def _split_resized(self, node) -> bool:
        """A split next to a layer inside a module that rewrites its stored split sizes."""
        return any(self.module_names.get(n.module, "").startswith(self._split_holders)
                   for n in list(node.inputs) + list(node.outputs)) if self._split_holders else False

    def _check_slot(self, slot: _Slot, units: int, size: int) -> None:
        """Positions inside the layer, and every unit the same number of times in it: the MACs model
        (removed positions = per-unit count x dropped units) needs it. Splits/concatenations that
        Torch-Pruning cannot follow break one or the other (Res2Net's split, GhostNet's half-cat)."""
        if len(slot.positions) and int(slot.positions.max()) >= size:
            raise _Excluded(f"Torch-Pruning maps its channels outside layer '{slot.module_name}' "
                            "(a split or concatenation it cannot follow)")
        counts = torch.bincount(slot.units, minlength=units)
        if bool((counts != counts[0]).any()):
            raise _Excluded(f"layer '{slot.module_name}' carries only some of its units "
                            "(a concatenation of differently pruned parts)")

    def _head_group(self, root_name, root, tp_group, producers, consumers, norms, seen_orders, attention):
        """The qkv group of a registered attention module: one unit per head, gated at proj's input."""
        attn_name, attn, fam = attention
        proj = fam.proj(attn)
        if norms or [s.module_name for s in producers] != [root_name] or \
                [s.module_name for s in consumers] != [self.module_names[proj]]:
            raise _Excluded(f"attention '{attn_name}': its heads reach layers other than qkv/proj "
                            f"({[s.module_name for s in producers + consumers + norms]})")
        head_of = fam.head_of_qkv_row(attn)
        for slot in producers + consumers:
            slot.units = head_of[slot.units]
        group = ChannelGroup(root_name, min(seen_orders) if seen_orders else 10**9, len(head_of), 1,
                             root, tp_group[0].dep.handler, producers, consumers, [], kind="heads",
                             head_dim=fam.head_dim(attn), attention=attn_name, unit_index=head_of)
        return group
