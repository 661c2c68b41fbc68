"""Weight masks: the object unstructured methods produce (VPNs, global magnitude, random weights).

A weight-mask set is a plain ``{parameter name: bool tensor of the weight's shape}`` over the
*prunable* weights: every conv and linear weight of the backbone except the classifier, which stays
dense (its rows are the task's classes, and after the label mapping they are the only link to the
pretrained head). Nothing is slimmed: a masked weight is a zero in the dense-shaped network, and
fine-tuning keeps it at zero (``hold_weight_masks``).

``select_weights`` is the one budgeted selection every unstructured method shares: one global
ranking of all prunable weights, keeping exactly ``round(density * total)`` of them; such a method
subclasses ``WeightMaskMethod``.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List

import torch
import torch.nn as nn

from ..errors import BudgetError
from ..fileio import atomic_write_bytes, atomic_write_text, safetensors_bytes
from ..method_registry import Method

WeightMasks = Dict[str, torch.Tensor]
FORMAT = "pass-zoo-weight-masks/1"


class WeightMaskMethod(Method):
    """Base of the methods whose masks are per weight (``mask_kind`` weight, budget density)."""

    mask_kind = "weight"
    budget = "density"
    prompt = "pad"  # VPNs' prompt; the baselines share it so that only the masks differ


def prunable_weights(model: nn.Module) -> Dict[str, nn.Parameter]:
    """``{name: weight}`` of every conv/linear layer in module order, the classifier excluded."""
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    out = {}
    for name, module in model.named_modules():
        if module is classifier or not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            continue
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            out[f"{name}.weight" if name else "weight"] = module.weight
    if not out:
        raise BudgetError(f"{type(model).__name__} has no conv or linear weight besides its classifier to prune")
    return out


def kaiming_scores(weight: torch.Tensor) -> torch.Tensor:
    """A score tensor proportional to |W|, on the scale of a Kaiming-uniform init (bound sqrt(6 / fan_in)).

    Per layer: ``sqrt(6 / fan_in) * |W| / max |W|``. The ranking across layers is therefore the
    weights' magnitude relative to their own layer, scaled by the layer's init bound.
    """
    w = weight.detach().float()
    fan_in = w[0].numel() if w.dim() > 1 else w.numel()
    top = w.abs().max()
    scale = math.sqrt(6.0 / max(1, fan_in)) / (float(top) if top > 0 else 1.0)
    return w.abs() * scale


def _keep_count(density: float, total: int) -> int:
    if not 0.0 < density <= 1.0:
        raise BudgetError(f"--target-density must be in (0, 1], got {density}")
    return min(total, max(1, round(density * total)))


def top_fraction(values: List[torch.Tensor], density: float) -> List[torch.Tensor]:
    """Bool masks keeping the largest ``round(density * total)`` entries over all ``values`` at once.

    One global threshold (the k-th largest value); entries equal to it are kept in flat order until
    exactly k are kept, so the count never depends on ties.
    """
    flat = torch.cat([v.detach().flatten().float() for v in values])  # on the values' device
    k = _keep_count(density, flat.numel())
    if k == flat.numel():
        keep = torch.ones_like(flat, dtype=torch.bool)
    else:
        threshold = torch.kthvalue(flat, flat.numel() - k + 1).values
        keep = flat > threshold
        short = k - int(keep.sum())
        if short > 0:
            keep[torch.nonzero(flat == threshold).flatten()[:short]] = True
    out, start = [], 0
    for v in values:
        out.append(keep[start:start + v.numel()].view(v.shape))
        start += v.numel()
    return out


def select_weights(scores: Dict[str, torch.Tensor], density: float) -> WeightMasks:
    """``{name: mask}`` keeping the top ``density`` fraction of all weights by |score|, globally."""
    names = list(scores)
    return {n: m.cpu() for n, m in zip(names, top_fraction([scores[n].abs() for n in names], density))}


def check_weight_masks(masks: WeightMasks, model: nn.Module) -> WeightMasks:
    """``masks`` in the model's layer order, after checking they fit its prunable weights."""
    weights = prunable_weights(model)
    missing = [n for n in weights if n not in masks]
    extra = sorted(set(masks) - set(weights))
    if missing or extra:
        raise BudgetError(f"weight masks do not fit this model: missing {missing[:3]}, unknown {extra[:3]}")
    for name, w in weights.items():
        if tuple(masks[name].shape) != tuple(w.shape):
            raise BudgetError(f"weight mask '{name}' is {tuple(masks[name].shape)}, the weight is {tuple(w.shape)}")
    return {n: masks[n].bool() for n in weights}


@torch.no_grad()
def apply_weight_masks(model: nn.Module, masks: WeightMasks) -> None:
    """Zero the masked weights of ``model`` in place."""
    params = dict(model.named_parameters())
    for name, m in masks.items():
        params[name].mul_(m.to(params[name].device, params[name].dtype))


def hold_weight_masks(model: nn.Module, masks: WeightMasks) -> List:
    """Keep the masked weights of ``model`` at zero while it trains; returns the hook handles.

    Two hooks per masked weight: its gradient is masked (so momentum and weight decay never move a
    zero), and the mask is re-applied before every forward pass (after every optimiser step, whatever
    the optimiser does). The masks follow the model to another device (``accelerate.prepare``).
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    handles = []
    for name, m in masks.items():
        p = params[name]
        p.requires_grad_(True)  # it is about to be trained (a frozen tensor takes no gradient hook)
        keep = _DeviceMask(m.to(p.dtype))
        handles.append(p.register_hook(lambda g, keep=keep: g * keep.on(g.device)))
        module = modules[name.rsplit(".", 1)[0]] if "." in name else model

        def reapply(_module, _inputs, p=p, keep=keep):
            with torch.no_grad():
                p.mul_(keep.on(p.device))

        handles.append(module.register_forward_pre_hook(reapply))
    return handles


class _DeviceMask:
    """A mask moved to a device once, when first needed there."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def on(self, device) -> torch.Tensor:
        if self.mask.device != device:
            self.mask = self.mask.to(device)
        return self.mask


def weight_masks_summary(masks: WeightMasks) -> dict:
    """JSON-able per-layer kept/total and the overall density the masks imply."""
    layers = [{"name": n, "order": i, "kept": int(m.sum()), "total": m.numel(), "shape": list(m.shape)}
              for i, (n, m) in enumerate(masks.items())]
    kept, total = sum(layer["kept"] for layer in layers), sum(layer["total"] for layer in layers)
    return {"format": FORMAT, "kind": "weight", "kept": kept, "total": total, "density": kept / max(1, total),
            "layers": layers}


def save_weight_masks(masks: WeightMasks, summary: dict, folder) -> None:
    """``masks.safetensors`` (uint8 per weight) + ``masks.json``, both written atomically."""

    tensors = {name: m.to(torch.uint8).contiguous() for name, m in masks.items()}
    atomic_write_bytes(folder / "masks.safetensors", safetensors_bytes(tensors, {"format": FORMAT}))
    atomic_write_text(folder / "masks.json", json.dumps(summary, indent=2))
