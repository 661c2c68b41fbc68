"""VPNs (Jin et al., *Visual Prompting Upgrades Neural Network Sparsification*, arXiv 2312.01397):
a visual prompt and per-weight scores learned jointly with the backbone frozen.

Stage 1, every step: one global threshold over |scores| of all prunable weights keeps the top
``density`` fraction (``weight_masks.top_fraction``); the frozen network runs with ``W * mask``,
the mask's gradient passing straight through to the scores; cross-entropy of the prompted, masked
network trains the scores and the prompt with Adam (cosine). The final masks are the top
``density`` of the trained scores. Stage 2 (shared with every method) fine-tunes weights and
prompt with the masks held fixed.

Choices: scores start proportional to |W| on a Kaiming-uniform scale (``kaiming_scores``), so the
search refines a layer-relative magnitude ranking; the classifier stays dense; BatchNorm runs on
batch statistics with its running statistics untouched (``--search-bn``), as in PASS's search; the
label mapping (or a new head, trained here as in PASS) is the pipeline's, made before stage 1.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .frozen_bn import KeepRunningStats, batch_norms
from .weight_masks import WeightMaskMethod, WeightMasks, kaiming_scores, prunable_weights, top_fraction
from ..method_registry import MethodContext, MethodResult, register_method
from ..train.checkpoint import StageCheckpoints
from ..train.loop import Batches, LoopState, check_same_across_processes, cosine_lambda, progress, take_step


class WeightScores(nn.Module):
    """One score tensor per prunable weight, initialised proportional to |W| (``kaiming_scores``),
    or to ``initial`` (a one-shot criterion's scores, held fixed)."""

    def __init__(self, weights: Dict[str, torch.Tensor], initial: Optional[Dict[str, torch.Tensor]] = None):
        super().__init__()
        self.names: List[str] = list(weights)
        start = [initial[n].detach().float().clone() if initial is not None else kaiming_scores(w)
                 for n, w in weights.items()]
        self.scores = nn.ParameterList([nn.Parameter(s, requires_grad=initial is None) for s in start])

    def hard(self, density: float) -> List[torch.Tensor]:
        """The binary masks: the top ``density`` of |scores|, one global threshold."""
        return top_fraction([s.detach().abs() for s in self.scores], density)

    def masks(self, density: float) -> WeightMasks:
        return {n: m.cpu() for n, m in zip(self.names, self.hard(density))}


class MaskedWeightsModel(nn.Module):
    """prompt -> frozen backbone with ``W * mask`` (straight-through to the scores) on every forward."""

    def __init__(self, backbone: nn.Module, prompt: nn.Module, scores: WeightScores, density: float,
                 bn_mode: str = "batch"):
        super().__init__()
        self.backbone, self.prompt, self.scores = backbone, prompt, scores
        self.density, self.bn_mode = density, bn_mode

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen weights, no dropout
        if mode and self.bn_mode == "batch":
            for bn in batch_norms(self.backbone):  # a masked network is far from the dense BN statistics
                bn.train()
        return self

    def masked_weights(self) -> Dict[str, torch.Tensor]:
        weights = dict(self.backbone.named_parameters())
        hard = self.scores.hard(self.density)
        out = {}
        for name, s, h in zip(self.scores.names, self.scores.scores, hard):
            a = s.abs()
            out[name] = weights[name] * (h.to(a.dtype) + a - a.detach())  # forward: h; backward: d/d|s|
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.backbone, self.masked_weights(), (self.prompt(x),))


def search_weight_masks(backbone: nn.Module, prompt: nn.Module, loader, density: float, cfg, accelerator,
                        train_head: bool = False, checkpoints=None,
                        fixed_scores: Optional[Dict[str, torch.Tensor]] = None):
    """Stage 1 of VPNs; ``prompt`` (and a new head) are trained in place.

    Returns ``(masks, initial masks, losses)``. ``cfg`` is the run's ``SearchConfig``; ``checkpoints``
    saves and resumes the loop exactly as PASS's search does. ``fixed_scores``: the masks come from
    these scores and do not learn; only the prompt (and head) do -- the one-shot baselines' stage 1,
    so that they differ from VPNs in the masks alone.
    """

    for p in backbone.parameters():
        p.requires_grad_(False)
    head = list(backbone.get_classifier().parameters()) if train_head else []
    for p in head:
        p.requires_grad_(True)
    scores = WeightScores({n: w.detach() for n, w in prunable_weights(backbone).items()}, fixed_scores)
    initial = scores.masks(density)
    model = MaskedWeightsModel(backbone, prompt, scores, density, cfg.bn_mode)
    learned = [] if fixed_scores is not None else [{"params": list(scores.parameters()), "lr": cfg.lr_scores}]
    groups = learned + [{"params": list(prompt.parameters()), "lr": cfg.lr_scores}]
    if head:
        groups.append({"params": head, "lr": cfg.lr_head})
    opt = torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    wrapped, opt, loader = accelerator.prepare(model, opt, loader)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(cfg.steps))  # unprepared: stepped once
    modules = {"prompt": prompt, "scores": scores}
    if train_head:
        modules["head"] = backbone.get_classifier()
    loop = LoopState("search", cfg.steps, modules, {"adam": opt}, {"cosine": sched}, Batches(loader))
    wrapped.train()
    with StageCheckpoints(checkpoints, loop, accelerator) as ckpt:
        bar = progress(accelerator, cfg.steps, "vpns" if fixed_scores is None else "prompt on masks",
                       initial=loop.step)
        try:
            with KeepRunningStats(backbone):
                for _ in range(loop.step, loop.total):
                    x, y = next(loop.batches)
                    take_step(loop, F.cross_entropy(wrapped(x), y), accelerator, bar, ckpt, "search",
                              "lower --search-lr-scores and start again")
        finally:
            bar.close()
    accelerator.unwrap_model(wrapped).eval()
    for p in head:
        p.requires_grad_(False)
    masks = scores.masks(density)
    check_same_across_processes(accelerator, "vpns masks and prompt",
                                [*masks.values(), *(t for t in prompt.state_dict().values())])
    return masks, initial, loop.losses


@register_method
class VPNs(WeightMaskMethod):
    name = "vpns"
    baseline = False
    summary = ("VPNs (Jin et al., *Visual Prompting Upgrades Neural Network Sparsification: A Data-Model "
               "Perspective*, [arXiv 2312.01397](https://arxiv.org/abs/2312.01397)), per-weight scores learned "
               "jointly with a visual prompt on the frozen network,")
    metric_keys = ("mask_change_from_init",)

    def produce(self, ctx: MethodContext) -> MethodResult:
        cfg = ctx.config
        masks, initial, losses = search_weight_masks(ctx.backbone, ctx.prompt, ctx.train_loader, cfg.density,
                                                     cfg.search, ctx.accelerator, train_head=ctx.new_head,
                                                     checkpoints=ctx.checkpoints)
        total = sum(m.numel() for m in masks.values())
        changed = sum(int((masks[n] != initial[n]).sum()) for n in masks)
        # how far the learned masks moved from the |W|-proportional start (0: the search changed nothing)
        return MethodResult(masks, record={"search_losses": losses, "mask_change_from_init": changed / total})
