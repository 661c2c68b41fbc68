"""The cost models: exact MACs (and parameters, latency features) of any masks without building the
slim model, and ``count_macs``.

``LayerCost`` -- every conv/linear layer with the groups that own its input/output channels -- and
``AttentionCost`` -- every attention module's matmuls, owned by its head group. ``count_macs``
counts the same MACs on a real (dense or slim) model with hooks; the two must agree exactly.
``ParamModel`` and ``LatencyFeatures`` are built from the same layer costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .families import attention_modules
from .groups import _GATEABLE, ChannelGroup, _is_depthwise


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


def layer_costs(model: nn.Module, groups: List[ChannelGroup], out_positions: Dict[str, int]) -> List[LayerCost]:
    owners_out: Dict[str, List[Tuple[int, int]]] = {}
    owners_in: Dict[str, List[Tuple[int, int]]] = {}
    for gi, g in enumerate(groups):
        for slot in g.producers:
            owners_out.setdefault(slot.module_name, []).append((gi, len(slot.positions) // g.units))
        for slot in g.consumers:
            owners_in.setdefault(slot.module_name, []).append((gi, len(slot.positions) // g.units))
    costs = []
    for name, mod in model.named_modules():
        if not isinstance(mod, _GATEABLE) or name not in out_positions:
            continue
        if isinstance(mod, nn.Linear):
            out_d, in_d, kernel, conv_groups = mod.out_features, mod.in_features, 1, 1
        else:
            out_d, in_d, conv_groups = mod.out_channels, mod.in_channels, mod.groups
            kernel = math.prod(mod.kernel_size)
        costs.append(LayerCost(name, out_d, in_d, out_positions[name], kernel, conv_groups, _is_depthwise(mod),
                               owners_out.get(name, []), owners_in.get(name, [])))
    return costs


def attention_costs(model: nn.Module, groups: List[ChannelGroup], attn_per_head: Dict[str, int]) -> List[AttentionCost]:
    owner = {g.attention: gi for gi, g in enumerate(groups) if g.kind == "heads"}
    return [AttentionCost(name, attn_per_head[name], fam.heads(mod), owner.get(name))
            for name, mod, fam in attention_modules(model) if name in attn_per_head]


class CostModel:
    """MACs of the network as a function of the units each group keeps."""

    def __init__(self, groups: List[ChannelGroup], costs: List):
        self.groups, self.costs = groups, costs
        self.dense_macs = self.macs([g.units for g in groups])

    def macs(self, kept_units: Sequence[int]) -> int:
        """Exact MACs of the slim network that keeps ``kept_units[i]`` units of group i: conv + linear
        MACs, plus attention matmuls (q @ k^T, attn @ v) -- the same count as ``count_macs``."""
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


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """MACs for one sample: conv + linear layers, plus the attention matmuls (``q @ k^T`` and
    ``attn @ v``) of every registered attention module -- the same count the budget uses."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += out.numel() * mod.in_features
        else:
            total += out.numel() * math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)

    def attention_hook(fam):
        def _fn(mod, inp, out):
            nonlocal total
            total += fam.matmul_macs(mod, inp[0])
        return _fn

    # batch 1, so every output element (all windows of a Swin stage included) belongs to the sample
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    handles += [m.register_forward_hook(attention_hook(f)) for _, m, f in attention_modules(model)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return int(total)


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


class LinearCost:
    """A cost affine in the kept units: ``constant + sum_g per_unit[g] * kept[g]`` (exact in integers)."""

    def __init__(self, n_groups: int):
        self.constant = 0
        self.per_unit = [0] * n_groups

    def add(self, dense: int, owners: Sequence[Tuple[int, int]], groups: Sequence[ChannelGroup], scale: int = 1):
        """A dimension of ``dense`` entries of which ``owners`` (group, entries per unit) are pruned."""
        self.constant += scale * (dense - sum(n * groups[g].units for g, n in owners))
        for g, n in owners:
            self.per_unit[g] += scale * n

    def value(self, kept_units: Sequence[int]) -> int:
        return self.constant + sum(a * k for a, k in zip(self.per_unit, kept_units))

    def batch(self, kept_units: torch.Tensor) -> torch.Tensor:
        return self.constant + kept_units.long() @ torch.tensor(self.per_unit, dtype=torch.long)


class ParamModel:
    """Parameters of the slim network as a function of the units each group keeps.

    Conv/linear weights are bilinear in the kept channels on both sides (the MACs model with one
    output position), biases, BatchNorm affines and per-head attention parameters are linear in the
    group that owns them; everything no pruned group reaches (embeddings, layer scales, norms of
    dense groups) is a constant. A parameter the model does not know to follow a group counts as
    dense, so the estimate is never below the real slim count.
    """

    def __init__(self, model: nn.Module, groups: List[ChannelGroup], costs: List):
        layers = [c for c in costs if isinstance(c, LayerCost)]
        weights = [LayerCost(c.name, c.out_dense, c.in_dense, 1, c.kernel, c.groups, c.depthwise,
                             c.out_owners, c.in_owners) for c in layers]
        self.weights = CostModel(groups, weights)
        self.linear = LinearCost(len(groups))
        modelled = self.weights.dense_macs
        for c in layers:
            if getattr(model.get_submodule(c.name), "bias", None) is not None:
                self.linear.add(c.out_dense, c.out_owners, groups)
                modelled += c.out_dense
        for gi, g in enumerate(groups):
            for slot in g.norms:
                bn = model.get_submodule(slot.module_name)
                if getattr(bn, "affine", False):
                    n = len(slot.positions) // g.units
                    self.linear.per_unit[gi] += 2 * n
                    self.linear.constant += 2 * (bn.num_features - n * g.units)
                    modelled += 2 * bn.num_features
        owner = {g.attention: gi for gi, g in enumerate(groups) if g.kind == "heads"}
        for name, mod, fam in attention_modules(model):
            if name in owner:
                for p in fam.per_head_params(mod):
                    self.linear.per_unit[owner[name]] += p.numel() // fam.heads(mod)
                    modelled += p.numel()
        self.linear.constant += count_params(model) - modelled  # what no group reaches
        self.dense = self.params([g.units for g in groups])

    def params(self, kept_units: Sequence[int]) -> int:
        return self.weights.macs(kept_units) + self.linear.value(kept_units)

    def params_batch(self, kept_units: torch.Tensor) -> torch.Tensor:
        return self.weights.macs_batch(kept_units) + self.linear.batch(kept_units)


# What a latency model may read of a network: exact cost features, each non-decreasing in the kept
# units, so a non-negative fit of them is monotone and the budgeted selection's binary search holds.
LATENCY_FEATURES = ("constant", "gemm_macs", "depthwise_macs", "attention_macs", "output_elements",
                    "input_elements")


class LatencyFeatures:
    """``LATENCY_FEATURES`` of the slim network as a function of the units each group keeps."""

    def __init__(self, groups: List[ChannelGroup], costs: List):
        layers = [c for c in costs if isinstance(c, LayerCost)]
        self.gemm = CostModel(groups, [c for c in layers if not c.depthwise])
        self.depthwise = CostModel(groups, [c for c in layers if c.depthwise])
        self.attention = CostModel(groups, [c for c in costs if isinstance(c, AttentionCost)])
        self.outputs, self.inputs = LinearCost(len(groups)), LinearCost(len(groups))
        for c in layers:  # activations written and read: what BN, activations and adds cost
            self.outputs.add(c.out_dense, c.out_owners, groups, scale=c.positions)
            self.inputs.add(c.in_dense, c.in_owners, groups, scale=c.positions)

    def batch(self, kept_units: torch.Tensor) -> torch.Tensor:
        """(N, groups) kept units -> (N, len(LATENCY_FEATURES)) float64 features."""
        kept_units = kept_units.long()
        cols = [torch.ones(len(kept_units), dtype=torch.long)]
        for part in (self.gemm, self.depthwise, self.attention):
            cols.append(part.macs_batch(kept_units) if part.costs else torch.zeros(len(kept_units), dtype=torch.long))
        cols += [self.outputs.batch(kept_units), self.inputs.batch(kept_units)]
        return torch.stack(cols, 1).double()
