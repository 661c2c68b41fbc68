"""Physical slimming: masks -> a real, smaller ``nn.Module`` (Torch-Pruning removes the channels)."""
from __future__ import annotations

import copy
import math
from typing import List, Tuple

import torch
import torch.nn as nn

from .adapter import build_layer_sequence
from .families import attention_family, attention_modules
from .masks import Masks, to_unit_masks


class PruningHistory(list):
    """Torch-Pruning's JSON-able ``[[layer, is_out, indices], ...]`` plus the attention fixups.

    A plain list to every existing caller; ``fixups`` holds what replaying the list alone cannot
    restore -- per attention module, the heads kept (``{"module", "family", "kept_heads"}``) -- so
    an export can fix ``num_heads`` and per-head parameters after the replay.
    """

    def __init__(self, steps=(), fixups=()):
        super().__init__(steps)
        self.fixups = list(fixups)


def slim(model: nn.Module, masks: Masks, example_input: torch.Tensor) -> Tuple[nn.Module, PruningHistory]:
    """Return ``(slim_model, pruning_history)``; ``model`` itself is left untouched.

    The pruning history is Torch-Pruning's JSON-able list of ``[root layer, is_out, indices]`` with
    the head fixups attached (``PruningHistory.fixups``); replaying both on a fresh base model
    rebuilds the slim shape (see ``pass_zoo.export``).
    """
    model = copy.deepcopy(model)
    seq = build_layer_sequence(model, example_input)
    units = to_unit_masks(masks, seq)  # validates names, sizes and grouped-conv / head structure
    fixups = []
    for g, unit in zip(seq.groups, units):
        drop = torch.nonzero(~masks[g.name].bool()).flatten().tolist()
        if drop:
            seq.graph.get_pruning_group(g.root, g.root_fn, drop).prune()
            if g.kind == "heads":
                fixups.append(apply_head_fixup(model, g.attention, torch.nonzero(unit).flatten().tolist(),
                                               g.head_dim))
    history = [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in seq.graph.pruning_history()]
    return model, PruningHistory(history, fixups)


def apply_head_fixup(model: nn.Module, module_name: str, kept_heads: List[int], head_dim: int) -> dict:
    """Fix one attention module after its heads' rows/columns were pruned; returns the spec record."""
    attn = model.get_submodule(module_name)
    fam = attention_family(attn)
    fam.set_heads(attn, kept_heads, head_dim)
    return {"module": module_name, "family": fam.name, "head_dim": int(head_dim),
            "kept_heads": [int(k) for k in kept_heads]}


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
