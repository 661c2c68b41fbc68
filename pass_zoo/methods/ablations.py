"""PASS's decisive ablations: do its masks win by the channels they keep, by how they spread the budget
over the layers, or by the head and prompt that learned jointly with them?

Each runs PASS's search unchanged, then changes one thing and gives every variant the same fair
stage 1 baselines get (``train_on_masks``: head and prompt learn on the final masks for the search's
``steps`` batches), starting from the head and prompt as they were *before* the search:

* ``pass-reprobe``       -- PASS's own masks, re-probed from scratch: is the jointly trained head the gain?
* ``pass-counts-random`` -- PASS's kept count per group, the channels drawn at random inside each group.
* ``pass-counts-prior``  -- PASS's kept count per group, the channels of largest L1 magnitude.

The per-group counts fix the cost (MACs, parameters and latency follow from them), so each variant meets
PASS's budget exactly. Their stage 1 costs the search plus the re-probe: they are ablations, not rivals.
"""
from __future__ import annotations

import copy
from typing import List

import torch

from ..graph.masks import to_channel_masks, to_unit_masks
from . import torch_pruning as criteria
from .pass_.method import Pass
from ..method_registry import Method, MethodContext, MethodResult, get_method, register_method


class _PassAblation(Method):
    """PASS's search, ``reassign`` on its unit masks, then the fair stage 1 from the pre-search head/prompt."""

    baseline = False
    metric_keys = Pass.metric_keys[1:]  # the search's, less the hypernetwork's size

    def stage1_batches(self, search, new_head: bool) -> int:
        return 2 * max(1, search.steps)

    def reassign(self, units: List[torch.Tensor], ctx: MethodContext) -> List[torch.Tensor]:
        return units

    def produce(self, ctx: MethodContext) -> MethodResult:
        head, prompt = ctx.backbone.get_classifier(), ctx.prompt
        before = (copy.deepcopy(head.state_dict()), copy.deepcopy(prompt.state_dict()))
        found = Pass().produce(ctx)
        units = self.reassign([u.bool() for u in to_unit_masks(found.masks, ctx.seq)], ctx)
        head.load_state_dict(before[0])
        prompt.load_state_dict(before[1])
        probe = criteria.train_on_masks(ctx.backbone, ctx.seq, prompt, ctx.train_loader, units, ctx.config.search,
                                        ctx.accelerator, train_head=ctx.new_head)
        return MethodResult(to_channel_masks(units, ctx.seq), record={**found.record, "probe_losses": probe})


@register_method
class PassReprobe(_PassAblation):
    name = "pass-reprobe"
    summary = "PASS's masks, head and prompt re-probed from scratch (ablation)"


@register_method
class PassCountsRandom(_PassAblation):
    name = "pass-counts-random"
    summary = "PASS's per-layer counts, random channels inside each layer (ablation)"

    def reassign(self, units, ctx):
        gen = torch.Generator().manual_seed(ctx.config.seed)
        return [_keep(torch.rand(len(u), generator=gen), int(u.sum())) for u in units]


@register_method
class PassCountsPrior(_PassAblation):
    name = "pass-counts-prior"
    summary = "PASS's per-layer counts, the largest-magnitude channels inside each layer (ablation)"

    def reassign(self, units, ctx):
        magnitude = criteria.group_scores(ctx.seq, get_method("l1").importance())
        return [_keep(score, int(u.sum())) for score, u in zip(magnitude, units)]


def _keep(score: torch.Tensor, count: int) -> torch.Tensor:
    """The unit mask keeping the ``count`` highest-scoring units."""
    mask = torch.zeros(len(score), dtype=torch.bool)
    mask[torch.topk(score.float(), count).indices] = True
    return mask
