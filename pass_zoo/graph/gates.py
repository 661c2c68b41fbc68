"""Search-time gates: every consumer's input multiplied by its group's unit mask.

Zeroing an input channel of a conv/linear is exactly the same function as removing it, so a gated
network equals the physically slimmed one (BN in eval mode). Two kinds of layer see the zeroed
channel in a statistic, so their gated output is recomputed over the kept channels: channel norms
(GRN) and weight-standardised convs.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .families import channel_norm_family
from .groups import _WEIGHT_STANDARDISED, ChannelGroup, _Slot


def _channels_in(mod: nn.Module) -> int:
    if isinstance(mod, nn.Linear):
        return mod.in_features
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
        return mod.in_channels
    return channel_norm_family(mod).per_channel_params(mod)[0].numel()


def standardised_over_kept(mod: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """A weight-standardised conv's output with each filter standardised over the kept inputs only
    (``keep``: 0/1, or soft during the search) -- what the slimmed conv computes."""
    from timm.layers.padding import pad_same

    w = mod.weight
    k = keep.to(w.dtype).view(1, -1, 1, 1)
    n = (keep.to(w.dtype).sum() * w[0, 0].numel()).clamp_min(1e-12)
    mean = (w * k).sum((1, 2, 3), keepdim=True) / n
    var = ((w - mean).square() * k).sum((1, 2, 3), keepdim=True) / n
    w = (w - mean) * torch.rsqrt(var + mod.eps)
    if getattr(mod, "gain", None) is not None:
        w = w * (mod.gain * mod.scale)
    if getattr(mod, "same_pad", False):
        x = pad_same(x, mod.kernel_size, mod.stride, mod.dilation)
    return F.conv2d(x, w.to(x.dtype), mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups)


class Gates:
    """Input gates of every layer that reads a group's channels."""

    def __init__(self, model: nn.Module, groups: List[ChannelGroup]):
        self.model = model
        self._consumer_slots: Dict[str, List[Tuple[int, _Slot]]] = {}
        self._norm_slots: Dict[str, List[Tuple[int, _Slot]]] = {}  # registered channel norms (GRN)
        for gi, g in enumerate(groups):
            for slot in g.consumers:
                self._consumer_slots.setdefault(slot.module_name, []).append((gi, slot))
            for slot in g.channel_norms:
                self._norm_slots.setdefault(slot.module_name, []).append((gi, slot))

    def _module(self, name: str) -> nn.Module:
        return self.model.get_submodule(name)

    def input_gate(self, name: str, unit_masks: Sequence[Optional[torch.Tensor]],
                   slots: Optional[Dict[str, List[Tuple[int, _Slot]]]] = None) -> Optional[torch.Tensor]:
        """The input gate of one layer from the masks known so far (None: nothing masked)."""
        gate = None
        for gi, slot in (self._consumer_slots if slots is None else slots).get(name, ()):
            if gi >= len(unit_masks) or unit_masks[gi] is None:
                continue
            mask = unit_masks[gi]
            if gate is None:
                mod = self._module(name)
                n_in = _channels_in(mod)
                gate = torch.ones(n_in, dtype=mask.dtype, device=mask.device)
            gate = gate.index_put((slot.positions.to(mask.device),), mask[slot.units.to(mask.device)])
        return gate

    def input_gates(self, unit_masks: Sequence[Optional[torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """Per consumer layer, a multiplier over its input channels (1 where no mask says otherwise)."""
        gates = {name: self.input_gate(name, unit_masks) for name in self._consumer_slots}
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
        # channel norms: the output the slimmed norm computes over the kept channels
        for name in self._norm_slots:
            keep = self.input_gate(name, unit_masks, self._norm_slots)
            if keep is not None:
                mod = self._module(name)
                handles.append(mod.register_forward_hook(
                    lambda m, inp, out, keep=keep: channel_norm_family(m).gated_forward(m, inp[0], keep)))
        # weight-standardised convs: their filters standardised over the kept inputs, as once slimmed
        for name, gate_values in gates.items():
            mod = self._module(name)
            if isinstance(mod, _WEIGHT_STANDARDISED):
                handles.append(mod.register_forward_hook(
                    lambda m, inp, out, keep=gate_values: standardised_over_kept(m, inp[0], keep)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
