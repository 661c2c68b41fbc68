"""Unstructured baselines: one-shot weight masks under the same density budget as VPNs.

* ``magnitude``      -- global magnitude pruning: the largest |W| over all prunable layers at once.
* ``random-weights`` -- uniformly random weights (a floor every method must clear). Named apart from
  ``random``, the channel baseline under a MACs budget, because the two prune different things.

Both read only the weights for their masks. Their stage 1 is VPNs' with the scores frozen: the
prompt (and a new task head) learn on the masked network for the same steps, optimiser and BatchNorm
regime, so a comparison with VPNs measures the learned masks, not extra prompt training.
"""
from __future__ import annotations

from typing import Dict

import torch

from .vpns import search_weight_masks
from .weight_masks import WeightMaskMethod, prunable_weights
from ..method_registry import MethodContext, MethodResult, register_method


class OneShotWeights(WeightMaskMethod):
    """Scores from the weights alone; the prompt (and a new head) learn on the masked network."""

    def scores(self, weights: Dict[str, torch.Tensor], seed: int) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def produce(self, ctx: MethodContext) -> MethodResult:
        cfg = ctx.config
        weights = {n: w.detach() for n, w in prunable_weights(ctx.backbone).items()}
        # the masks are the top |score| of these frozen scores (select_weights' rule); stage 1 checks
        # them and the prompt across processes
        masks, _, losses = search_weight_masks(ctx.backbone, ctx.prompt, ctx.train_loader, cfg.density,
                                               cfg.search, ctx.accelerator, train_head=ctx.new_head,
                                               checkpoints=ctx.checkpoints,
                                               fixed_scores=self.scores(weights, cfg.seed))
        return MethodResult(masks, record={"search_losses": losses})


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
