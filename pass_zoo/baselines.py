"""Baselines as mask producers: Torch-Pruning's criteria scored on the *same* layer sequence.

Every method returns one score vector per group; the same budgeted global selection
(``masks.select_units``) turns them into masks, and the same slimming, fine-tuning and evaluation
follow. The only difference between methods is how the scores were obtained.

Criteria (Torch-Pruning importances, each normalised by its group mean as Torch-Pruning does for
global pruning):

* ``l1``         -- group L1 magnitude, one shot (Li et al.).
* ``taylor``     -- first-order Taylor |w * dL/dw| on the task loss, gradients over ``steps`` batches.
* ``random``     -- random scores (a floor every method must clear).
* ``group-norm`` -- DepGraph: sparse training with the group-norm regulariser, then group L2 norm.
* ``bn-scale``   -- Slim: L1 on BatchNorm scales during training, then |gamma|.
* ``growreg``    -- GrowReg: a growing L2 penalty on unimportant groups, then group L2 norm.

The regularised methods train the backbone weights for the same number of steps PASS searches for
(with the task head and prompt in place), which is how they are meant to be used.
"""
from __future__ import annotations

from typing import Callable, List

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from .adapter import LayerSequence
from .errors import PassZooError
from .training import cosine_lambda, cycle, progress

METHODS = ("pass", "l1", "group-norm", "bn-scale", "taylor", "random", "growreg")
TRAINS_WEIGHTS = ("group-norm", "bn-scale", "growreg")  # stage 1 trains the backbone weights


def _importance(method: str):
    if method in ("l1",):
        return tp.importance.GroupMagnitudeImportance(p=1, normalizer="mean")
    if method in ("group-norm", "growreg"):
        return tp.importance.GroupMagnitudeImportance(p=2, normalizer="mean")
    if method == "bn-scale":
        return tp.importance.BNScaleImportance(normalizer="mean")
    if method == "taylor":
        return tp.importance.GroupTaylorImportance(normalizer="mean")
    if method == "random":
        return tp.importance.RandomImportance()
    raise PassZooError(f"unknown method '{method}' (choose from {', '.join(METHODS)})")


def group_scores(seq: LayerSequence, importance: Callable) -> List[torch.Tensor]:
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


def _regulariser(method: str, model: nn.Module, seq: LayerSequence, importance):
    kwargs = dict(importance=importance, ignored_layers=seq.ignored, global_pruning=True)
    if method == "group-norm":
        return tp.pruner.GroupNormPruner(model, seq.example_input, reg=5e-4, **kwargs)
    if method == "bn-scale":
        return tp.pruner.BNScalePruner(model, seq.example_input, reg=1e-5, **kwargs)
    if method == "growreg":
        return tp.pruner.GrowingRegPruner(model, seq.example_input, reg=1e-5, delta_reg=1e-5, **kwargs)
    return None


def baseline_scores(method: str, model: nn.Module, seq: LayerSequence, prompt: nn.Module, loader,
                    steps: int, accelerator, lr: float = 0.01, train_head: bool = False,
                    lr_head: float = 1e-3) -> List[torch.Tensor]:
    """Scores for ``method`` on ``model`` (regularised methods train it in place for ``steps``).

    ``train_head``: a new task head learns during stage 1 as it does in PASS's search (AdamW at
    ``lr_head``, cosine, frozen backbone): Taylor trains it over its gradient batches, the one-shot
    criteria (l1, random) over as many batches of a linear probe; the regularised methods train every
    weight, the head included, anyway.
    """
    importance = _importance(method)
    if method == "taylor":
        _accumulate_gradients(model, prompt, loader, max(1, steps), accelerator, lr_head if train_head else None)
    elif method in TRAINS_WEIGHTS:
        _sparse_training(method, model, seq, prompt, loader, steps, accelerator, lr, importance)
    elif train_head:
        _accumulate_gradients(model, prompt, loader, steps, accelerator, lr_head, only_head=True)
    with torch.no_grad() if method != "taylor" else torch.enable_grad():
        scores = group_scores(seq, importance)
    model.zero_grad(set_to_none=True)
    return scores


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


def _sparse_training(method, model, seq, prompt, loader, steps, accelerator, lr, importance) -> None:
    """Train the weights with the method's regulariser; its criterion then reads the result."""
    reg = _regulariser(method, model, seq, importance)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    bar = progress(accelerator, steps, method)
    for step, (x, y) in zip(range(steps), cycle(loader)):
        loss = F.cross_entropy(model(prompt(x.to(accelerator.device))), y.to(accelerator.device))
        if not torch.isfinite(loss):
            raise PassZooError(f"{method} sparse training diverged at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        reg.regularize(model)
        if method == "growreg" and step % 10 == 9:
            reg.update_reg()
        opt.step()
        bar.update(1)
    bar.close()
    model.eval()
