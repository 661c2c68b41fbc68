"""Stage 2 -- fine-tune the slim network jointly with its prompt (masks are now the architecture)."""
from __future__ import annotations

import logging
from typing import List

import torch
import torch.nn.functional as F

from .checkpoint import StageCheckpoints
from .loop import Batches, LoopState, cosine_lambda, progress, take_step
from ..errors import PassZooError
from ..prompt import PromptedModel

log = logging.getLogger(__name__)


def finetune(model: PromptedModel, loader, cfg, accelerator, checkpoints=None) -> List[float]:
    """Train ``model`` (slim network + prompt) in place with ``cfg`` (a ``config.FinetuneConfig``);
    returns the loss per step.

    ``checkpoints`` (a ``checkpoint.RunCheckpoints``) saves the loop every N steps, on Ctrl-C and at
    the end, and continues from its newest fine-tune checkpoint when the run is resumed.
    """

    if cfg.steps <= 0:
        return []
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD([
        {"params": list(model.model.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": list(model.prompt.parameters()), "lr": cfg.lr_prompt, "weight_decay": 0.0},
    ], momentum=cfg.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(cfg.steps))
    wrapped, opt, loader = accelerator.prepare(model, opt, loader)
    loop = LoopState("finetune", cfg.steps, {"model": model}, {"sgd": opt}, {"cosine": sched}, Batches(loader))
    wrapped.train()
    with StageCheckpoints(checkpoints, loop, accelerator) as ckpt:
        bar = progress(accelerator, cfg.steps, "finetune", initial=loop.step)
        try:
            for _ in range(loop.step, cfg.steps):
                x, y = next(loop.batches)
                take_step(loop, F.cross_entropy(wrapped(x), y), accelerator, bar, ckpt, "fine-tune",
                          "lower --finetune-lr/--finetune-lr-prompt and start again")
        finally:
            bar.close()
    accelerator.unwrap_model(wrapped).eval()
    return loop.losses


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, loader, batches: int = 20) -> None:
    """Re-estimate BatchNorm running statistics of a slimmed network on training batches.

    Removing channels changes what every BN downstream sees; the dense network's running
    statistics no longer fit. A forward pass over a few batches (cumulative average) fixes that.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return
    saved = [bn.momentum for bn in bns]
    was_training = model.training
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the calibration batches
        bn.train()
    try:
        for _, (x, _) in zip(range(batches), loader):
            model(x)
    finally:
        for bn, m in zip(bns, saved):
            bn.momentum = m
        model.train(was_training)


@torch.no_grad()
def check_finite_norms(model: torch.nn.Module) -> None:
    """BN running statistics must be finite: a NaN variance makes every logit NaN, and argmax of NaN
    logits is class 0 for every image -- a top-1 of exactly 1/classes that looks like a result."""
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
            for what in ("running_mean", "running_var"):
                t = getattr(mod, what)
                if t is not None and not torch.isfinite(t).all():
                    raise PassZooError(f"cannot evaluate: BatchNorm '{name}' has a non-finite {what} "
                                       f"(the network diverged or a channel's statistics overflowed)")


def evaluate(model: torch.nn.Module, loader, accelerator=None, warn_collapse: bool = False) -> float:
    """Top-1 accuracy (fraction) over ``loader``; gathered over processes when an accelerator is given.

    Refuses, in one line, non-finite BN statistics or logits instead of reporting a number. With
    ``warn_collapse``, a network that gives every image the same class says so in one warning line: its
    accuracy is then that class's share of the images, not a measure of the pruned network."""
    was_training = model.training
    model.eval()
    check_finite_norms(model)
    correct = total = 0
    predicted, labels = set(), set()
    for x, y in loader:
        logits = model(x)
        if not torch.isfinite(logits).all():
            model.train(was_training)
            raise PassZooError("cannot evaluate: the network's logits are not finite (NaN or inf) on the "
                               "evaluation images; the run diverged")
        pred = logits.argmax(1)
        if accelerator is not None:
            pred, y = accelerator.gather_for_metrics((pred, y))
        correct += int((pred == y).sum())
        total += int(y.numel())
        if warn_collapse:
            predicted.update(pred.unique().tolist())
            labels.update(y.unique().tolist())
    model.train(was_training)
    if warn_collapse and len(predicted) == 1 and len(labels) > 1:
        log.warning(f"the network predicts class {predicted.pop()} for all {total} evaluation images, so its top-1 "
                    f"({correct / total:.2%}) is that class's share of them: the run collapsed; rerun it with another "
                    "--seed")
    return correct / max(total, 1)
