"""Physical slimming: masks -> a real, smaller ``nn.Module`` (Torch-Pruning removes the channels)."""
from __future__ import annotations

import copy
from typing import List, Tuple

import torch
import torch.nn as nn

from ..errors import AdapterError, one_line
from .families import attention_family, fix_split_sizes
from .masks import Masks, to_unit_masks
from .sequence import build_layer_sequence


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
    rebuilds the slim shape (see ``pass_zoo.export.timm_model``).
    """
    original = model
    model, history = _slim(original, masks, example_input)
    if _forward_error(model, example_input) is not None:
        _name_the_broken_group(original, masks, example_input)
    return model, history


def _slim(model: nn.Module, masks: Masks, example_input: torch.Tensor, stop_after=None, check=None):
    """Prune a copy group by group (``check(model, group)`` after each, if given)."""
    model = copy.deepcopy(model)
    seq = build_layer_sequence(model, example_input)
    units = to_unit_masks(masks, seq)  # validates names, sizes and grouped-conv / head structure
    fixups = []
    for g, unit in zip(seq.groups, units):
        drop = torch.nonzero(~masks[g.name].bool()).flatten().tolist()
        if drop:
            seq.graph.get_pruning_group(g.root, g.root_fn, drop).prune()
            fix_split_sizes(model)
            if g.kind == "heads":
                fixups.append(apply_head_fixup(model, g.attention, torch.nonzero(unit).flatten().tolist(),
                                               g.head_dim))
            if check is not None:
                check(model, g)
    history = [[name, bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in seq.graph.pruning_history()]
    return model, PruningHistory(history, fixups)


def _forward_error(model: nn.Module, example_input: torch.Tensor):
    """The first line of the error a forward pass raises (None: it runs)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input)
    except Exception as exc:  # a shape mismatch Torch-Pruning left behind
        return one_line(exc)
    finally:
        model.train(was_training)
    return None


def _name_the_broken_group(model: nn.Module, masks: Masks, example_input: torch.Tensor):
    """Slim again with a forward pass after each group: the first one that breaks it is named."""
    def check(slimmed, group):
        error = _forward_error(slimmed, example_input)
        if error is not None:
            raise AdapterError(f"slimming group '{group.name}' breaks the model's forward pass ({error[:160]}): "
                               "Torch-Pruning maps its channels onto a layer inconsistently; this "
                               "architecture cannot be slimmed with these masks")
    _slim(model, masks, example_input, check=check)
    raise AdapterError("the slim model's forward pass fails only once every group is pruned")


def apply_head_fixup(model: nn.Module, module_name: str, kept_heads: List[int], head_dim: int) -> dict:
    """Fix one attention module after its heads' rows/columns were pruned; returns the spec record."""
    attn = model.get_submodule(module_name)
    fam = attention_family(attn)
    fam.set_heads(attn, kept_heads, head_dim)
    return {"module": module_name, "family": fam.name, "head_dim": int(head_dim),
            "kept_heads": [int(k) for k in kept_heads]}
