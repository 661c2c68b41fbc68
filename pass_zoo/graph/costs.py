"""The MACs model: exact MACs of any masks without building the slim model, and ``count_macs``.

``LayerCost`` -- every conv/linear layer with the groups that own its input/output channels -- and
``AttentionCost`` -- every attention module's matmuls, owned by its head group. ``count_macs``
counts the same MACs on a real (dense or slim) model with hooks; the two must agree exactly.
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
