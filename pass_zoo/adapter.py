"""Layer sequence: any timm model as an ordered list of prunable channel groups.

Torch-Pruning's ``DependencyGraph`` finds the *coupled* channels of a network (a conv, its BN, the
convs that read it, every branch of a residual sum, ...). Each coupled group is one step of the
PASS walk. This module turns the graph into plain data the rest of the pipeline needs:

* ``ChannelGroup`` -- name, channel count, units (what one mask entry controls), producers
  (layers whose output channels are the group) and consumers (layers that read them);
* ``LayerCost`` -- every conv/linear layer with the groups that own its input/output channels,
  and ``AttentionCost`` -- every attention module's matmuls, owned by its head group -- so the MACs
  of any mask can be computed exactly without building the slim model;
* a search-time gate that multiplies every consumer's input by the group mask. Zeroing an input
  channel of a conv/linear is exactly the same function as removing it, so a gated network equals
  the physically slimmed one (BN in eval mode).

Transformers: a registered attention module (``pass_zoo.families``) turns its ``qkv`` group into a
*head* group -- one unit per head (its q, k, v rows and its ``proj`` columns), gated at ``proj``'s
input. MLP hidden units (fc1 out / fc2 in) are ordinary channel groups.

Groups that cannot be gated exactly -- their channels pass through LayerNorm/GroupNorm, a bare
parameter (layer scale, position embeddings), a weight-standardised conv, a split/concatenation
Torch-Pruning maps unevenly, or are the network's output -- are *excluded*: they stay dense, are
listed in ``LayerSequence.excluded`` with the reason, and the rest of the network is still pruned.
Only a model with nothing prunable is refused (``AdapterError`` naming the layers).
"""
from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from .errors import AdapterError
from .families import attention_family, attention_modules

log = logging.getLogger(__name__)

# Layers whose channel dimension we can gate exactly at their input.
_GATEABLE = (nn.Conv2d, nn.Conv1d, nn.Linear)
# Per-channel layers: pruning them is exact whatever happens upstream.
_PER_CHANNEL = (nn.BatchNorm1d, nn.BatchNorm2d, nn.PReLU)


def _weight_standardised():
    """Convs that standardise each filter over its inputs: a zeroed input still counts in the mean
    and variance, so gating an input channel is *not* removing it (NF-ResNets, BiT); the scaled ones
    also carry a per-filter gain outside Torch-Pruning's conv pruner."""
    from timm.layers import std_conv

    return tuple(getattr(std_conv, n) for n in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d",
                                                "ScaledStdConv2dSame") if hasattr(std_conv, n))


_WEIGHT_STANDARDISED = _weight_standardised()


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


@dataclass
class LayerCost:
    """MACs of one conv/linear layer as a function of the kept channels on both sides."""

    name: str
    out_dense: int
    in_dense: int
    positions: int  # output positions per sample (H*W, tokens, or 1)
    kernel: int  # kernel area
    groups: int
    depthwise: bool
    out_owners: List[Tuple[int, int]] = field(default_factory=list)  # (group idx, positions/unit)
    in_owners: List[Tuple[int, int]] = field(default_factory=list)

    def macs(self, kept_units: Sequence[int], groups: Sequence[ChannelGroup]) -> int:
        out_kept = self.out_dense - sum(n * (groups[g].units - kept_units[g]) for g, n in self.out_owners)
        in_kept = self.in_dense - sum(n * (groups[g].units - kept_units[g]) for g, n in self.in_owners)
        if self.depthwise:
            return self.positions * self.kernel * out_kept
        return self.positions * self.kernel * out_kept * in_kept // self.groups


@dataclass
class AttentionCost:
    """MACs of one attention module's ``q @ k^T`` and ``attn @ v``: linear in its kept heads."""

    name: str
    per_head: int  # MACs per head per sample (2 * windows * tokens^2 * head_dim)
    heads: int  # dense heads
    owner: Optional[int] = None  # the head group, None when its heads are not pruned

    def macs(self, kept_units: Sequence[int], groups: Sequence[ChannelGroup]) -> int:
        return self.per_head * (self.heads if self.owner is None else kept_units[self.owner])


def build_graph(model: nn.Module, example_input: torch.Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's dependency graph with per-head parameters left to the attention families.

    Used for the layer sequence *and* when an export replays its pruning history, so both see the
    same groups. Torch-Pruning would cut e.g. Swin's bias table along its rows with qkv indices.
    """
    per_head = [p for _, mod, fam in attention_modules(model) for p in fam.per_head_params(mod)]
    return tp.DependencyGraph().build_dependency(model, example_input, ignored_params=per_head, verbose=False)


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
                # all of the sample's outputs: Swin runs its linears on (batch * windows, tokens, C)
                positions[name] = out.numel() // (ch * batch)
            if name in families and name not in attn_per_head:
                fam = families[name]
                attn_per_head[name] = fam.matmul_macs(mod, inp[0]) // (fam.heads(mod) * batch)
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


def _each_within(groups, seconds: float, names: Dict[nn.Module, str]):
    """Yield from Torch-Pruning's group generator, giving up if one group takes longer than ``seconds``.

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
                group = next(groups)
            except StopIteration:
                return
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            last[0] = names.get(group[0].dep.target.module)
            yield group
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _Excluded(Exception):
    """A group that cannot be gated exactly: it stays dense (the reason is kept for the log)."""


class LayerSequence:
    """An ordered list of ``ChannelGroup`` over one model, with exact MACs and search-time gates."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignored_layers: Iterable[nn.Module] = ()):
        self.model = model
        self.example_input = example_input
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        ignored = list(ignored_layers)
        if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
            ignored.append(classifier)  # the classifier's outputs are the task's classes: never pruned
        self.ignored = ignored
        was_training = model.training
        frozen = [p for p in model.parameters() if not p.requires_grad]
        model.eval()
        try:
            for p in frozen:  # the graph is traced through autograd: frozen weights would hide every layer
                p.requires_grad_(True)
            self.graph = build_graph(model, example_input)
            order, out_positions, attn_per_head = _module_positions(model, example_input)
        finally:
            model.train(was_training)
            for p in frozen:
                p.requires_grad_(False)
        self.module_names = {m: n for n, m in model.named_modules()}
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
        self.excluded: List[Tuple[str, str]] = []  # (group root, why it stays dense)
        self.groups: List[ChannelGroup] = self._collect_groups(order)
        self.costs: List = self._collect_costs(out_positions) + self._attention_costs(attn_per_head)
        self._consumer_slots: Dict[str, List[Tuple[int, _Slot]]] = {}
        for gi, g in enumerate(self.groups):
            for slot in g.consumers:
                self._consumer_slots.setdefault(slot.module_name, []).append((gi, slot))
        self.dense_macs = self.macs([g.units for g in self.groups])
        self._abs_cache: Dict[str, tuple] = {}  # module name -> ((weight id, version), |W| summed over k, k)
        self._gain_cache: Dict[str, tuple] = {}  # group name -> (BN tensor versions, BN output scale)

    # ------------------------------------------------------------------ construction
    def _collect_groups(self, order: Dict[str, int]) -> List[ChannelGroup]:
        groups = []
        all_groups = self.graph.get_all_groups(ignored_layers=self.ignored, root_module_types=_GATEABLE)
        for tp_group in _each_within(all_groups, GROUP_TIME_LIMIT_S, self.module_names):
            root_name = self.module_names[tp_group[0].dep.target.module]
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
        for item in tp_group.items:
            mod = item.dep.target.module
            if not isinstance(mod, nn.Module) or mod not in self.module_names:
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
                if isinstance(mod, _WEIGHT_STANDARDISED):
                    raise _Excluded(f"layer '{name}' ({type(mod).__name__}) standardises its weights over "
                                    "input channels (a gated input is not a removed one) and has a per-filter "
                                    "gain Torch-Pruning does not slice")
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
        group = ChannelGroup(root_name, min(seen_orders) if seen_orders else 10**9, n, ch_groups,
                             root, tp_group[0].dep.handler, producers, consumers, norms)
        units = group.units
        for slot in producers + consumers + norms:
            slot.units = slot.units % units
        read = torch.unique(torch.cat([s.units for s in consumers]))
        if read.numel() < units:  # e.g. q/k rows of an attention type without a registered family
            raise _Excluded(f"{units - read.numel()} of its {units} units reach no conv/linear input that "
                            "could gate them (an unregistered attention module?)")
        for slots, side in ((producers, 0), (consumers, 1), (norms, 0)):
            for slot in slots:
                self._check_slot(slot, units, _dims(self._module(slot.module_name))[side])
        return group

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

    def _collect_costs(self, out_positions: Dict[str, int]) -> List[LayerCost]:
        owners_out: Dict[str, List[Tuple[int, int]]] = {}
        owners_in: Dict[str, List[Tuple[int, int]]] = {}
        for gi, g in enumerate(self.groups):
            for slot in g.producers:
                owners_out.setdefault(slot.module_name, []).append((gi, len(slot.positions) // g.units))
            for slot in g.consumers:
                owners_in.setdefault(slot.module_name, []).append((gi, len(slot.positions) // g.units))
        costs = []
        for name, mod in self.model.named_modules():
            if not isinstance(mod, _GATEABLE) or name not in out_positions:
                continue
            if isinstance(mod, nn.Linear):
                out_d, in_d, kernel, groups = mod.out_features, mod.in_features, 1, 1
            else:
                out_d, in_d, groups = mod.out_channels, mod.in_channels, mod.groups
                kernel = math.prod(mod.kernel_size)
            costs.append(LayerCost(name, out_d, in_d, out_positions[name], kernel, groups, _is_depthwise(mod),
                                   owners_out.get(name, []), owners_in.get(name, [])))
        return costs

    def _attention_costs(self, attn_per_head: Dict[str, int]) -> List[AttentionCost]:
        owner = {g.attention: gi for gi, g in enumerate(self.groups) if g.kind == "heads"}
        return [AttentionCost(name, attn_per_head[name], fam.heads(mod), owner.get(name))
                for name, mod, fam in attention_modules(self.model) if name in attn_per_head]

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    @property
    def names(self) -> List[str]:
        return [g.name for g in self.groups]

    @property
    def max_units(self) -> int:
        return max(g.units for g in self.groups)

    def macs(self, kept_units: Sequence[int]) -> int:
        """Exact MACs of the slim network that keeps ``kept_units[i]`` units of group i: conv + linear
        MACs, plus attention matmuls (q @ k^T, attn @ v) -- the same count as ``slim.count_macs``."""
        return sum(c.macs(kept_units, self.groups) for c in self.costs)

    def macs_batch(self, kept_units: torch.Tensor) -> torch.Tensor:
        """``macs`` for many candidates at once: ``kept_units`` is (N, groups), the result (N,), exact."""
        if not hasattr(self, "_cost_tables"):
            self._cost_tables = self._build_cost_tables()
        t = self._cost_tables
        removed = torch.tensor([g.units for g in self.groups], dtype=torch.long) - kept_units.long()
        out_kept = t["out_dense"] - removed @ t["out_owners"].T
        in_kept = torch.where(t["depthwise"], 1, t["in_dense"] - removed @ t["in_owners"].T)
        groups = torch.where(t["depthwise"], 1, t["groups"])
        total = (t["coef"] * out_kept * in_kept).div(groups, rounding_mode="floor").sum(1)
        if t["attn_per_head"].numel():
            owned = t["attn_owner"] >= 0
            heads = t["attn_heads"].expand(len(kept_units), -1).clone()
            heads[:, owned] = kept_units.long()[:, t["attn_owner"][owned]]
            total = total + (t["attn_per_head"] * heads).sum(1)
        return total

    def _build_cost_tables(self) -> Dict[str, torch.Tensor]:
        layers = [c for c in self.costs if isinstance(c, LayerCost)]
        attn = [c for c in self.costs if isinstance(c, AttentionCost)]
        n_groups = len(self.groups)
        out_owners = torch.zeros(len(layers), n_groups, dtype=torch.long)
        in_owners = torch.zeros(len(layers), n_groups, dtype=torch.long)
        for i, c in enumerate(layers):
            for g, n in c.out_owners:
                out_owners[i, g] += n
            for g, n in c.in_owners:
                in_owners[i, g] += n
        long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
        return {"out_dense": long([c.out_dense for c in layers]), "in_dense": long([c.in_dense for c in layers]),
                "coef": long([c.positions * c.kernel for c in layers]), "groups": long([c.groups for c in layers]),
                "depthwise": torch.tensor([c.depthwise for c in layers], dtype=torch.bool),
                "out_owners": out_owners, "in_owners": in_owners,
                "attn_per_head": long([c.per_head for c in attn]), "attn_heads": long([c.heads for c in attn]),
                "attn_owner": long([-1 if c.owner is None else c.owner for c in attn])}

    def unit_macs(self) -> List[float]:
        """Dense MACs one unit of each group costs (removing one unit, all else dense)."""
        full = [g.units for g in self.groups]
        out = []
        for i, g in enumerate(self.groups):
            kept = list(full)
            kept[i] -= 1
            out.append(float(self.dense_macs - self.macs(kept)))
        return out

    # ------------------------------------------------------------------ gates
    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def _input_gate(self, name: str, unit_masks: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
        """The input gate of one layer from the masks known so far (None: nothing masked)."""
        gate = None
        for gi, slot in self._consumer_slots.get(name, ()):
            if gi >= len(unit_masks) or unit_masks[gi] is None:
                continue
            mask = unit_masks[gi]
            if gate is None:
                mod = self._module(name)
                n_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
                gate = torch.ones(n_in, dtype=mask.dtype, device=mask.device)
            gate = gate.index_put((slot.positions.to(mask.device),), mask[slot.units.to(mask.device)])
        return gate

    def input_gates(self, unit_masks: Sequence[Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Per consumer layer, a multiplier over its input channels (1 where no mask says otherwise)."""
        gates = {name: self._input_gate(name, unit_masks) for name in self._consumer_slots}
        return {name: g for name, g in gates.items() if g is not None}

    @contextlib.contextmanager
    def gated(self, unit_masks: Sequence[Optional[torch.Tensor]]):
        """Within the block every consumer's input is multiplied by its gate (masks may carry grads)."""
        gates = self.input_gates(unit_masks)

        def gate(name):
            def _fn(mod, inp):
                x = inp[0]
                shape = [1] * x.dim()
                shape[-1 if isinstance(mod, nn.Linear) else 1] = -1
                return (x * gates[name].view(shape).to(x.dtype),) + tuple(inp[1:])
            return _fn

        handles = [self._module(name).register_forward_pre_hook(gate(name)) for name in gates]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ weight statistics
    def weight_stats(self, index: int, unit_masks: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """Mean |W| per unit of group ``index``, over (c_in, k, k) with masked inputs removed.

        Averaged over every layer producing the group's channels (all branches of a residual sum),
        and scaled by the BatchNorm output scale |gamma| * sqrt(var / (var + eps)) of those channels
        where there is one: BN rescales every output channel, so the folded weight is what the next
        layer actually sees, and a channel with no variance passes on nothing but a constant.
        """
        g = self.groups[index]
        stats = []
        for slot in g.producers:
            mod = self._module(slot.module_name)
            summed, kernel = self._kernel_summed_abs(slot.module_name, mod)  # (out, in): |W| summed over k
            gate = self._input_gate(slot.module_name, unit_masks)
            if gate is not None and not _is_depthwise(mod) and summed.shape[1] == gate.numel():
                per_out = (summed @ gate.to(summed.dtype)) / (gate.sum().clamp_min(1) * kernel)
            else:
                per_out = summed.sum(1) / (summed.shape[1] * kernel)
            per_unit = torch.zeros(g.units, dtype=per_out.dtype, device=per_out.device)
            per_unit = per_unit.index_add(0, slot.units.to(per_out.device), per_out[slot.positions.to(per_out.device)])
            stats.append(per_unit / (len(slot.positions) // g.units))
        if not stats:  # a group with no weighted producer (e.g. only a BN): nothing to read
            return torch.zeros(g.units)
        out = torch.stack(stats).mean(0)
        if g.norms:
            out = out * self._bn_gain(g)
        return out

    def _kernel_summed_abs(self, name: str, mod: nn.Module) -> Tuple[torch.Tensor, int]:
        """|W| summed over the kernel, cached until the weight changes (the search reads it every step)."""
        w = mod.weight
        key = (id(w), w._version)
        cached = self._abs_cache.get(name)
        if cached is None or cached[0] != key:
            a = w.detach().abs()
            summed = a.flatten(2).sum(2) if a.dim() > 2 else a
            cached = (key, summed, a[0, 0].numel() if a.dim() > 2 else 1)
            self._abs_cache[name] = cached
        return cached[1], cached[2]

    def _bn_gain(self, g: ChannelGroup) -> torch.Tensor:
        """The group's BN output scale, cached until a BN weight or variance changes (read every step)."""
        bns = [self._module(slot.module_name) for slot in g.norms]
        key = tuple((id(t), t._version) for bn in bns for t in (bn.weight, bn.running_var) if t is not None)
        cached = self._gain_cache.get(g.name)
        if cached is None or cached[0] != key:
            cached = (key, self._compute_bn_gain(g))
            self._gain_cache[g.name] = cached
        return cached[1]

    def _compute_bn_gain(self, g: ChannelGroup) -> torch.Tensor:
        gains = []
        for slot in g.norms:
            bn = self._module(slot.module_name)
            if bn.weight is None or bn.running_var is None:
                continue
            var = bn.running_var.detach().clamp_min(0)
            # The scale of what the channel passes on: |gamma| * sqrt(var / (var + eps)), ~|gamma| for
            # a live channel and ~0 for a dead one (zero variance: a constant, which the next BN
            # absorbs). Folding |gamma| / sigma into the weight instead would rank channels with the
            # least signal (smallest sigma) first.
            gain = (bn.weight.detach().abs() * torch.sqrt(var / (var + bn.eps)))[slot.positions]
            per_unit = torch.zeros(g.units, dtype=gain.dtype).index_add_(0, slot.units, gain)
            gains.append(per_unit / (len(slot.positions) // g.units))
        return torch.stack(gains).mean(0) if gains else torch.ones(g.units)


def build_layer_sequence(model: nn.Module, example_input: torch.Tensor,
                         ignored_layers: Iterable[nn.Module] = ()) -> LayerSequence:
    """The one entry point: a model and an example input -> its ordered prunable groups."""
    try:
        return LayerSequence(model, example_input, ignored_layers)
    except AdapterError:
        raise
    except Exception as exc:  # tracing failures inside Torch-Pruning
        raise AdapterError(f"cannot build the dependency graph of {type(model).__name__}: {exc}") from exc
