"""``direct-logits``: the ablation that asks whether PASS's hypernetwork earns its place.

A learned logit per unit replaces the prompt-conditioned recurrent walk; everything else is PASS's:
the same log-magnitude prior (with a learned gain per group), the same scale across groups
(``--hypernet-scores``: raw, or standardised per group with a learned offset), the prompt and the new head trained with it, the straight-through
global selection and the budget warm-up (``pass_.search.search`` runs it). If this matches PASS, the
hypernetwork adds nothing over learning the scores directly.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..graph.cost_model import count_params
from .pass_.hypernet import _log_ratio, _standardise
from .pass_.method import chance_check
from .pass_.search import search
from ..method_registry import Method, MethodContext, MethodResult, register_method


class DirectLogits(nn.Module):
    """Scores ``s_iu = theta_iu + prior_i * log(stat_iu / mean stat_i)``; with ``scores="group"`` that sum
    is standardised per group and a learned offset per group added."""

    def __init__(self, units: Sequence[int], use_prior: bool = True, scores: str = "raw"):
        super().__init__()
        self.units = [int(u) for u in units]
        self.use_prior, self.grouped = use_prior, scores == "group"
        # with the prior the search starts from the magnitude ranking; without it from a random one
        self.logits = nn.ParameterList(nn.Parameter(torch.zeros(u) if use_prior else torch.randn(u) * 0.01)
                                       for u in self.units)
        if self.grouped:
            self.offset = nn.Parameter(torch.zeros(len(self.units)))
        if use_prior:
            self.prior_gain = nn.Parameter(torch.ones(len(self.units)))
        self.register_buffer("threshold", torch.zeros(()))  # the walk's provisional threshold (see search)

    def forward(self, prompt_image: torch.Tensor,
                stats_fn: Callable[[int, List[Optional[torch.Tensor]]], torch.Tensor]) -> List[torch.Tensor]:
        scores: List[torch.Tensor] = []
        provisional: List[Optional[torch.Tensor]] = []
        for i, theta in enumerate(self.logits):
            s = theta
            if self.use_prior:  # the prior reads the weights with earlier groups' inputs masked, as PASS's does
                raw = stats_fn(i, provisional).to(theta.device, theta.dtype)
                s = s + self.prior_gain[i] * _log_ratio(raw.detach())
            if self.grouped:
                s = _standardise(s) + self.offset[i]
            scores.append(s)
            provisional.append((s.detach() > self.threshold).to(s.dtype))
        return scores


def build_direct_logits(seq, cfg) -> DirectLogits:
    return DirectLogits([g.units for g in seq.groups], use_prior=cfg.use_prior, scores=cfg.scores)


@register_method
class DirectLogitsMethod(Method):
    name = "direct-logits"
    tag = "direct"
    baseline = False
    metric_keys = ("scorer_params", "search_loss_final", "search_loss_chance", "search_at_chance",
                   "search_recoveries", "search_pinned_at")
    summary = "learned per-channel logits (PASS without its hypernetwork)"

    def produce(self, ctx: MethodContext) -> MethodResult:
        cfg = ctx.config
        result = search(ctx.backbone, ctx.seq, ctx.prompt, ctx.train_loader, ctx.selection_budget(), cfg.search,
                        ctx.accelerator, train_head=ctx.new_head, checkpoints=ctx.checkpoints,
                        build=build_direct_logits)
        record = {"search_losses": result.losses, "scorer_params": count_params(result.hypernet), "search_recoveries": result.recoveries,
                  "search_pinned_at": result.pinned_at}
        record.update(chance_check(result.losses, ctx.backbone.num_classes))
        return MethodResult(result.masks, record=record)
