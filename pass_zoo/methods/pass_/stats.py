"""PASS's weight statistics: what the hypernetwork reads about each group at every walk step."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ...graph.groups import ChannelGroup, _is_depthwise


class WeightStats:
    """``stats(i, unit_masks)``: group i's statistics given the masks chosen so far in the walk."""

    def __init__(self, seq):
        self.seq = seq
        # module name -> ((weight id, version), |W| summed over k, k, unmasked per-output mean)
        self._abs_cache: Dict[str, tuple] = {}
        self._gain_cache: Dict[str, tuple] = {}  # group name -> (BN tensor versions, BN output scale)

    def __call__(self, index: int, unit_masks: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
        """Mean |W| per unit of group ``index``, over (c_in, k, k) with masked inputs removed (all of them
        counted where the masks remove every input).

        Averaged over every layer producing the group's channels (all branches of a residual sum),
        and scaled by the BatchNorm output scale |gamma| * sqrt(var / (var + eps)) of those channels
        where there is one: BN rescales every output channel, so the folded weight is what the next
        layer actually sees, and a channel with no variance passes on nothing but a constant.
        """
        g = self.seq.groups[index]
        stats = []
        for slot in g.producers:
            mod = self.seq.model.get_submodule(slot.module_name)
            # (out, in): |W| summed over k; (out,): its mean over every input
            summed, kernel, dense = self._kernel_summed_abs(slot.module_name, mod)
            gate = self.seq.gates.input_gate(slot.module_name, unit_masks)
            if gate is not None and not _is_depthwise(mod) and summed.shape[1] == gate.numel():
                kept = gate.sum()
                per_out = (summed @ gate.to(summed.dtype)) / (kept.clamp_min(1) * kernel)
                # A walk whose provisional mask keeps no input of this layer would read all-zero statistics;
                # the hypernetwork standardises them by their spread (zero), which scales their gradient by
                # 1e8 or more and sends one step's update of prompt and hypernetwork to ~1e4 (a search that
                # then ends at chance, and a model that predicts one class). With nothing kept there is nothing
                # to read: the layer reads as unmasked, and no gradient flows through the empty mask.
                per_out = torch.where(kept.detach() >= 0.5, per_out, dense)
            else:
                per_out = dense
            per_unit = torch.zeros(g.units, dtype=per_out.dtype, device=per_out.device)
            per_unit = per_unit.index_add(0, slot.units.to(per_out.device), per_out[slot.positions.to(per_out.device)])
            stats.append(per_unit / (len(slot.positions) // g.units))
        if not stats:  # a group with no weighted producer (e.g. only a BN): nothing to read
            return torch.zeros(g.units)
        out = torch.stack(stats).mean(0)
        if g.norms:
            out = out * self._bn_gain(g)
        return out

    def _kernel_summed_abs(self, name: str, mod: nn.Module) -> Tuple[torch.Tensor, int, torch.Tensor]:
        """|W| summed over the kernel, the kernel's size, and the unmasked per-output mean, cached until the
        weight changes (the search reads them every step)."""
        w = mod.weight
        key = (id(w), w._version)
        cached = self._abs_cache.get(name)
        if cached is None or cached[0] != key:
            a = w.detach().abs()
            summed = a.flatten(2).sum(2) if a.dim() > 2 else a
            kernel = a[0, 0].numel() if a.dim() > 2 else 1
            cached = (key, summed, kernel, summed.sum(1) / (summed.shape[1] * kernel))
            self._abs_cache[name] = cached
        return cached[1:]

    def _bn_gain(self, g: ChannelGroup) -> torch.Tensor:
        """The group's BN output scale, cached until a BN weight or variance changes (read every step)."""
        bns = [self.seq.model.get_submodule(slot.module_name) for slot in g.norms]
        key = tuple((id(t), t._version) for bn in bns for t in (bn.weight, bn.running_var) if t is not None)
        cached = self._gain_cache.get(g.name)
        if cached is None or cached[0] != key:
            cached = (key, self._compute_bn_gain(g))
            self._gain_cache[g.name] = cached
        return cached[1]

    def _compute_bn_gain(self, g: ChannelGroup) -> torch.Tensor:
        gains = []
        for slot in g.norms:
            bn = self.seq.model.get_submodule(slot.module_name)
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
