"""Physical slimming: masks -> a real, smaller ``nn.Module`` (Torch-Pruning removes the channels)."""
from __future__ import annotations

import copy
import math
from typing import List, Tuple

import torch
import torch.nn as nn

from .adapter import build_layer_sequence
from .masks import Masks, to_unit_masks


def slim(model: nn.Module, masks: Masks, example_input: torch.Tensor) -> Tuple[nn.Module, List]:
    """Return ``(slim_model, pruning_history)``; ``model`` itself is left untouched.

    The pruning history is Torch-Pruning's JSON-able list of ``[root layer, is_out, indices]``;
    replaying it on a fresh base model rebuilds the slim shape (see ``pass_zoo.export``).
    """
    model = copy.deepcopy(model)
    seq = build_layer_sequence(model, example_input)
    to_unit_masks(masks, seq)  # validates names, sizes and grouped-conv structure
    for g in seq.groups:
        drop = torch.nonzero(~masks[g.name].bool()).flatten().tolist()
        if drop:
            seq.graph.get_pruning_group(g.root, g.root_fn, drop).prune()
    history = [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in seq.graph.pruning_history()]
    return model, history


def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Conv + linear multiply-accumulates for one sample (the same count the budget uses)."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += out[:1].numel() * mod.in_features
        else:
            total += out[:1].numel() * math.prod(mod.kernel_size) * (mod.in_channels // mod.groups)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
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
