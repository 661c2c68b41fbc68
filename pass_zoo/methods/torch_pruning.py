"""Torch-Pruning's criteria as mask producers, scored on the *same* layer sequence as PASS.

Each criterion is one small class: the Torch-Pruning importance it reads and, where the method
needs one, what stage 1 does before scoring. Every criterion is normalised by its group mean, as
Torch-Pruning does for global pruning; the same budgeted global selection (``masks.select_units``)
turns the scores into masks.

* ``l1``         -- group L1 magnitude, one shot (Li et al.).
* ``taylor``     -- first-order Taylor |w * dL/dw| on the task loss, gradients over ``steps`` batches.
* ``random``     -- random scores (a floor every method must clear).
* ``group-norm`` -- DepGraph: sparse training with the group-norm regulariser, then group L2 norm.
* ``bn-scale``   -- Slim: L1 on BatchNorm scales during training, then |gamma|.
* ``growreg``    -- GrowReg: a growing L2 penalty on unimportant groups, then group L2 norm.

Every criterion's scores are normalised per group (``--score-normalizer``: Torch-Pruning's mean, max
or LAMP) before the global ranking, and ``--max-prune-ratio`` caps what any group may lose.

Stage 1 is the same for every method (``--baseline-probe masked``, the default): after the
criterion has chosen its masks, the task head (a new one; the label-mapped classifier stays fixed, as
in PASS) and the prompt learn on the method's *own masked* network for the search's ``steps``
batches, with PASS's optimisers and BN regime (``train_on_masks``). What the criterion itself needs
comes first: Taylor probes a new head on the dense network for half its gradient batches and sums
gradients through that trained head over the other half; the regularised methods train the backbone
weights for ``steps`` (how they are meant to be used). ``--baseline-probe dense`` is the older,
weaker stage 1: a linear probe on the dense network and no prompt training.
"""
from __future__ import annotations

import copy
from typing import Callable, List

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from ..errors import PassZooError
from ..graph.budget import as_budget
from ..graph.masks import select_units, to_channel_masks
from ..graph.sequence import build_layer_sequence
from ..graph.slim import slim
from ..train.loop import check_same_across_processes, cosine_lambda, cycle, global_loss, progress
from .frozen_bn import KeepRunningStats, batch_norms
from ..method_registry import Method, MethodContext, MethodResult, get_method, register_method


def group_scores(seq, importance: Callable) -> List[torch.Tensor]:
    """One score per unit of every group, from a Torch-Pruning importance criterion."""
    scores = []
    for g in seq.groups:
        tp_group = seq.graph.get_pruning_group(g.root, g.root_fn, list(range(g.channels)))
        imp = importance(tp_group)
        if imp is None:  # the criterion has nothing to read in this group (e.g. no BN for Slim)
            imp = torch.ones(g.channels)
        imp = imp.detach().float().cpu().flatten()
        if imp.numel() != g.channels:
            raise PassZooError(f"{type(importance).__name__} returned {imp.numel()} scores for group "
                               f"'{g.name}' of {g.channels} channels")
        unit = g.unit_of_channel()  # mean over the channels of a unit (conv-group slices, a head's rows)
        per_unit = torch.zeros(g.units).index_add_(0, unit, imp)
        # A group whose criterion is zero everywhere (e.g. no gradient reaches it yet) normalises to 0/0:
        # all its units are equally unimportant, not NaN, which would scramble the global ranking.
        scores.append(torch.nan_to_num(per_unit / torch.bincount(unit, minlength=g.units).float(), nan=0.0))
    return scores


# What only a search loop reads (PASS's walk and loop, methods/pass_/search.py; VPNs' weight scores): the
# criteria score once and train head and prompt on fixed masks (``train_on_masks``), so these never reach them.
SEARCH_LOOP_SETTINGS = ("lr_hypernet", "lr_scores", "hidden", "rank", "core", "use_prompt", "use_weights", "use_prior",
                        "scores", "bn_mode", "budget_warmup", "max_churn", "max_group_change", "recoveries",
                        "pin_masks", "budget_range", "distill", "prototypes")


class TorchPruningCriterion(Method):
    """Scores from ``importance()``; stage 1 (``prepare``) trains a new head as a linear probe."""

    ignored_search_settings = SEARCH_LOOP_SETTINGS

    # the masks need no stage 1 of their own: only the weights are read
    one_shot: bool = False

    def importance(self, normalizer: str = "mean"):
        raise NotImplementedError

    def scoring_batches(self, steps: int, new_head: bool) -> int:
        """Batches the criterion reads before its masks exist (weights-only criteria: none)."""
        return 0

    def stage1_batches(self, search, new_head: bool) -> int:
        if search.probe == "masked":  # the criterion's own batches, then head + prompt on its masks
            return self.scoring_batches(search.steps, new_head) + max(1, search.steps)
        return self.scoring_batches(search.steps, new_head) or (search.steps if new_head else 0)

    def prepare(self, model, seq, prompt, loader, steps, accelerator, lr, importance, train_head, lr_head) -> None:
        if train_head:
            _accumulate_gradients(model, prompt, loader, steps, accelerator, lr_head, only_head=True)

    def scoring(self):
        return torch.no_grad()

    def scores(self, model: nn.Module, seq, prompt: nn.Module, loader, steps: int, accelerator, lr: float = 0.01,
               train_head: bool = False, lr_head: float = 1e-3, normalizer: str = "mean") -> List[torch.Tensor]:
        """Scores on ``model`` (methods that train the weights do so in place for ``steps``)."""
        importance = self.importance(normalizer)
        self.prepare(model, seq, prompt, loader, steps, accelerator, lr, importance, train_head, lr_head)
        with self.scoring():
            scores = group_scores(seq, importance)
        model.zero_grad(set_to_none=True)
        return scores

    def produce(self, ctx: MethodContext) -> MethodResult:
        cfg = ctx.config
        on_masks = cfg.search.probe == "masked"
        # a one-shot criterion probes no head before scoring when its head learns on its masks anyway
        probe = ctx.new_head and not (on_masks and self.one_shot)
        if cfg.search.iterative_steps > 1:
            units = self.iterative_units(ctx, probe)
        else:
            scores = self.scores(ctx.backbone, ctx.seq, ctx.prompt, ctx.train_loader, cfg.search.steps,
                                 ctx.accelerator, train_head=probe, lr_head=cfg.search.lr_head,
                                 normalizer=cfg.search.normalizer)
            units = select_units(scores, ctx.seq, ctx.selection_budget(), cfg.search.round_to, cfg.search.selection,
                                 cfg.search.max_prune_ratio)
        record = {}
        if on_masks:
            record["probe_losses"] = train_on_masks(ctx.backbone, ctx.seq, ctx.prompt, ctx.train_loader, units,
                                                    cfg.search, ctx.accelerator, train_head=ctx.new_head)
        masks = to_channel_masks(units, ctx.seq)
        check_same_across_processes(ctx.accelerator, f"{self.name} masks", list(masks.values()))
        return MethodResult(masks, record=record)


    def iterative_units(self, ctx: MethodContext, probe: bool) -> List[torch.Tensor]:
        """Torch-Pruning's iterative pruning: round r of N selects under the budget at 1 - (1 - target) r / N
        of the dense cost, scoring a copy slimmed by the previous round (what Torch-Pruning re-reads after
        each of its steps); removed units stay removed. The criterion's batches are split over the rounds."""
        cfg, seq = ctx.config.search, ctx.seq
        budget = as_budget(seq, ctx.selection_budget())
        rounds = cfg.iterative_steps
        steps = max(1, cfg.steps // rounds) if cfg.steps else 0
        units = [torch.ones(g.units, dtype=torch.bool) for g in seq.groups]
        example = next(iter(ctx.train_loader))[0][:1].to(ctx.accelerator.device)
        for r in range(1, rounds + 1):
            model, prompt = copy.deepcopy(ctx.backbone), copy.deepcopy(ctx.prompt)
            if not all(bool(u.all()) for u in units):
                model, _ = slim(model, to_channel_masks(units, seq), example)
            slim_seq = build_layer_sequence(model, example)
            slim_scores = dict(zip(slim_seq.names, self.scores(
                model, slim_seq, prompt, ctx.train_loader, steps, ctx.accelerator, train_head=probe,
                lr_head=cfg.lr_head, normalizer=cfg.normalizer)))
            scores = []
            for g, kept in zip(seq.groups, units):  # the slim group's units are the kept ones, in order
                score = torch.full((g.units,), -1e30)  # removed units stay removed
                mine = slim_scores.get(g.name)
                score[kept] = mine.to(score.dtype) if mine is not None and len(mine) == int(kept.sum()) else 0.0
                scores.append(score)
            units = select_units(scores, seq, budget.at(1 - (1 - budget.fraction) * r / rounds), cfg.round_to,
                                 cfg.selection, cfg.max_prune_ratio)
        return units


@register_method
class L1(TorchPruningCriterion):
    name = "l1"
    one_shot = True

    def importance(self, normalizer: str = "mean"):
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer=normalizer)


class SparseTraining(TorchPruningCriterion):
    """Train the weights with the method's regulariser; its criterion then reads the result."""

    trains_weights = True
    reg = 0.0

    def scoring_batches(self, steps: int, new_head: bool) -> int:
        return steps

    def regulariser(self, model, seq, importance):
        raise NotImplementedError

    def after_step(self, reg, step: int) -> None:
        pass

    def prepare(self, model, seq, prompt, loader, steps, accelerator, lr, importance, train_head, lr_head) -> None:
        reg = self.regulariser(model, seq, importance)
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        model.train()
        bar = progress(accelerator, steps, self.name)
        for step, (x, y) in zip(range(steps), cycle(loader)):
            loss = F.cross_entropy(model(prompt(x.to(accelerator.device))), y.to(accelerator.device))
            if not torch.isfinite(loss):
                raise PassZooError(f"{self.name} sparse training diverged at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            reg.regularize(model)
            self.after_step(reg, step)
            opt.step()
            bar.update(1)
        bar.close()
        model.eval()

    @staticmethod
    def _pruner_kwargs(seq, importance) -> dict:
        return dict(importance=importance, ignored_layers=seq.ignored, global_pruning=True)


@register_method
class GroupNorm(SparseTraining):
    name = "group-norm"

    def importance(self, normalizer: str = "mean"):
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=normalizer)

    def regulariser(self, model, seq, importance):
        return tp.pruner.GroupNormPruner(model, seq.example_input, reg=5e-4, **self._pruner_kwargs(seq, importance))


@register_method
class BNScale(SparseTraining):
    name = "bn-scale"

    def importance(self, normalizer: str = "mean"):
        return tp.importance.BNScaleImportance(normalizer=normalizer)

    def regulariser(self, model, seq, importance):
        return tp.pruner.BNScalePruner(model, seq.example_input, reg=1e-5, **self._pruner_kwargs(seq, importance))


@register_method
class Taylor(TorchPruningCriterion):
    name = "taylor"

    def importance(self, normalizer: str = "mean"):
        return tp.importance.GroupTaylorImportance(normalizer=normalizer)

    def scoring_batches(self, steps: int, new_head: bool) -> int:
        return max(2 if new_head else 1, steps)  # with a new head: at least one probe and one gradient batch

    def prepare(self, model, seq, prompt, loader, steps, accelerator, lr, importance, train_head, lr_head) -> None:
        if not train_head:
            _accumulate_gradients(model, prompt, loader, max(1, steps), accelerator)
            return
        # Gradients through a random head rank channels by noise: probe the head first, then sum the
        # gradients through the trained head.
        total = self.scoring_batches(steps, new_head=True)
        _accumulate_gradients(model, prompt, loader, total // 2, accelerator, lr_head, only_head=True)
        model.zero_grad(set_to_none=True)
        _accumulate_gradients(model, prompt, loader, total - total // 2, accelerator)

    def scoring(self):
        return torch.enable_grad()


@register_method
class Random(TorchPruningCriterion):
    name = "random"
    one_shot = True

    def importance(self, normalizer: str = "mean"):
        return tp.importance.RandomImportance()


@register_method
class GrowReg(SparseTraining):
    name = "growreg"

    def importance(self, normalizer: str = "mean"):
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer=normalizer)

    def regulariser(self, model, seq, importance):
        return tp.pruner.GrowingRegPruner(model, seq.example_input, reg=1e-5, delta_reg=1e-5,
                                          **self._pruner_kwargs(seq, importance))

    def after_step(self, reg, step: int) -> None:
        if step % 10 == 9:
            reg.update_reg()


def baseline_scores(method: str, model: nn.Module, seq, prompt: nn.Module, loader, steps: int, accelerator,
                    lr: float = 0.01, train_head: bool = False, lr_head: float = 1e-3,
                    normalizer: str = "mean") -> List[torch.Tensor]:
    """Scores of the criterion ``method`` (see ``TorchPruningCriterion.scores``)."""
    criterion = get_method(method)
    if not isinstance(criterion, TorchPruningCriterion):
        raise PassZooError(f"'{method}' is not a Torch-Pruning criterion")
    return criterion.scores(model, seq, prompt, loader, steps, accelerator, lr, train_head, lr_head, normalizer)


def _accumulate_gradients(model, prompt, loader, batches: int, accelerator, lr_head=None, only_head=False) -> None:
    """Sum dL/dw over ``batches`` batches (weights unchanged): what Taylor importance reads.

    ``lr_head``: the classifier also learns over these batches, each step from its own batch's gradient;
    its summed gradient is what it holds at the end, as Taylor reads the classifier's input columns too.
    ``only_head``: nothing but the classifier (a linear probe for the one-shot criteria).
    """
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    head = list(model.get_classifier().parameters()) if lr_head is not None else []
    for p in params:
        p.requires_grad_(not only_head)
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(head, lr=lr_head) if head else None
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(batches)) if opt else None
    model.zero_grad(set_to_none=True)
    bar = progress(accelerator, batches, "head probe" if only_head else "taylor")
    summed = [torch.zeros_like(p) for p in head]
    for _, (x, y) in zip(range(batches), cycle(loader)):
        F.cross_entropy(model(prompt(x.to(accelerator.device))), y.to(accelerator.device)).backward()
        if opt is not None:
            opt.step()
            sched.step()
            for p, total in zip(head, summed):
                total.add_(p.grad)
                p.grad = None
        bar.update(1)
    bar.close()
    for p, total in zip(head, summed):
        p.grad = total
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    model.train(was_training)


def train_on_masks(model: nn.Module, seq, prompt: nn.Module, loader, unit_masks, cfg, accelerator,
                   train_head: bool = True) -> List[float]:
    """PASS's stage 1 with fixed masks: the prompt (SGD) and a new head (AdamW; ``train_head``) learn on
    the gated network for ``cfg.steps`` batches, BN on batch statistics; the backbone's weights and
    running statistics do not change. ``cfg`` is the run's SearchConfig (its learning rates and steps).
    Returns every step's cross-entropy: set against a search's, it tells a search that did not learn from
    masks that leave a frozen network little to learn."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    head = list(model.get_classifier().parameters()) if train_head else []
    for p in head:
        p.requires_grad_(True)
    steps = max(1, cfg.steps)
    optimizers = [torch.optim.SGD(prompt.parameters(), lr=cfg.lr_prompt, momentum=0.9)]
    if head:
        optimizers.append(torch.optim.AdamW(head, lr=cfg.lr_head, weight_decay=cfg.weight_decay))
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, cosine_lambda(steps)) for o in optimizers]
    masks = [m.float().to(accelerator.device) for m in unit_masks]
    model.eval()
    for bn in batch_norms(model):  # a masked network is far from the dense one's statistics (as in PASS)
        bn.train()
    bar = progress(accelerator, steps, "head + prompt on masks")
    losses = []
    with KeepRunningStats(model), seq.gated(masks):
        for _, (x, y) in zip(range(steps), cycle(loader)):
            loss = F.cross_entropy(model(prompt(x.to(accelerator.device))), y.to(accelerator.device))
            losses.append(global_loss(loss, accelerator))  # it detaches
            for o in optimizers:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, sched in zip(optimizers, schedulers):
                o.step()
                sched.step()
            bar.update(1)
    bar.close()
    for p, f in zip(params, flags):
        p.requires_grad_(f)
    model.zero_grad(set_to_none=True)
    prompt.zero_grad(set_to_none=True)
    model.train(was_training)
    return losses
