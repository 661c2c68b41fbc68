"""Unstructured baselines: one-shot weight masks under the same density budget as VPNs.

* ``magnitude``      -- global magnitude pruning: the largest |W| over all prunable layers at once.
* ``random-weights`` -- uniformly random weights (a floor every method must clear). Named apart from
  ``random``, the channel baseline under a MACs budget, because the two prune different things.

Both read only the weights. With a new task head they train it as a linear probe over the stage-1
step budget on the *masked* network (the masks are known before the probe), as the channel
baselines probe theirs.
"""
from __future__ import annotations

from typing import Dict

import torch

from ..graph.weights import apply_weight_masks, prunable_weights, select_weights
from ..train.loop import check_same_across_processes
from .registry import Method, MethodContext, MethodResult, register_method


class WeightMaskMethod(Method):
    """Base of the methods whose masks are per weight (``mask_kind`` weight, budget density)."""

    mask_kind = "weight"
    budget = "density"
    prompt = "pad"  # VPNs' prompt; the baselines share it so that only the masks differ


class OneShotWeights(WeightMaskMethod):
    """Scores from the weights alone; a new head is probed on the masked network."""

    def stage1_batches(self, steps: int, new_head: bool) -> int:
        return steps if new_head else 0

    def scores(self, weights: Dict[str, torch.Tensor], seed: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def produce(self, ctx: MethodContext) -> MethodResult:
        from .torch_pruning import _accumulate_gradients

        cfg = ctx.config
        weights = prunable_weights(ctx.backbone)
        masks = select_weights(self.scores({n: w.detach() for n, w in weights.items()}, cfg.seed), cfg.density)
        check_same_across_processes(ctx.accelerator, f"{self.name} masks", list(masks.values()))
        if ctx.new_head:
            apply_weight_masks(ctx.backbone, masks)  # the probe sees the network it will be fine-tuned as
            _accumulate_gradients(ctx.backbone, ctx.prompt, ctx.train_loader, cfg.search.steps, ctx.accelerator,
                                  cfg.search.lr_head, only_head=True)
            ctx.backbone.zero_grad(set_to_none=True)
        return MethodResult(masks)


@register_method
class Magnitude(OneShotWeights):
    name = "magnitude"
    summary = "global magnitude pruning (the largest |W| over all layers at once)"

    def scores(self, weights, seed):
        return {n: w.abs() for n, w in weights.items()}


@register_method
class RandomWeights(OneShotWeights):
    name = "random-weights"
    summary = "a uniformly random choice"

    def scores(self, weights, seed):
        # its own generator: the masks depend on the seed only, not on what drew random numbers before
        g = torch.Generator().manual_seed(seed + 7919)
        return {n: torch.rand(w.shape, generator=g) for n, w in weights.items()}
