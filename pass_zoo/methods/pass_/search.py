"""Stage 1 -- learning to prune: train prompt + hypernetwork with the backbone frozen.

Every optimisation step: the hypernetwork walks the groups and scores every unit; the global
budgeted selection turns the scores into hard masks (exact MACs <= budget); the masks gate the
frozen network through straight-through estimators; cross-entropy of the prompted, masked
network trains the prompt (SGD + cosine) and the hypernetwork (AdamW + cosine). A second
cross-entropy, of a classifier that needs no training (``ClassPrototypes``: running class means of
the masked network's pooled features), gives the masks a task signal while a new head still learns.
Over the first ``budget_warmup`` of the steps the budget tightens from the dense network to the
target; the final masks are always selected at the target. ``max_churn`` and ``max_group_change`` (off by
default) bound how many kept units one step may swap, and how far it may move each group. When the loss,
having learned, climbs most of the way back to chance, the search returns to its best state and pins it:
that state's scores select the masks from then on (``recoveries`` first returns with halved learning rates;
see ``Recovery``).

``cfg`` everywhere is the run's ``config.SearchConfig`` (read, never built here).
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .hypernet import PassHyperNetwork
from .stats import WeightStats
from ..frozen_bn import KeepRunningStats, batch_norms
from ...errors import BudgetError, PassZooError
from ...graph.budget import Budget, as_budget
from ...graph.masks import Masks, select_units, to_channel_masks
from ...graph.sequence import LayerSequence
from ...train.checkpoint import StageCheckpoints
from ...train.loop import (Batches, LoopState, check_same_across_processes, cosine_lambda, global_loss,
                           progress, take_step)


class LastMasks(nn.Module):
    """The hard masks of the last search step as one flat buffer: what the churn limit of the next
    selection compares with. A module, so the loop's checkpoints carry it and a resumed search selects
    exactly as the interrupted one would have."""

    def __init__(self, units: List[int]):
        super().__init__()
        self.units = [int(u) for u in units]
        self.register_buffer("kept", torch.zeros(sum(self.units), dtype=torch.bool))
        self.register_buffer("valid", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def store(self, masks: List[torch.Tensor]) -> None:
        self.kept.copy_(torch.cat([m.to(self.kept.device).bool().flatten() for m in masks]))
        self.valid.fill_(True)

    def masks(self) -> Optional[List[torch.Tensor]]:
        return [m.cpu() for m in torch.split(self.kept, self.units)] if bool(self.valid) else None


FAMILY_RECOVERIES = 2  # halved-rate returns of a budget-conditioned search, which cannot pin


class Recovery(nn.Module):
    """Returns a search that breaks down to its best state.

    A search that learned can still break as the budget tightens: single steps swap half the kept units,
    the head faces a different network, the loss climbs back to chance and the next gradients are noise,
    so it never comes back (1 of 5 B3 seeds at 10 % MACs). Recovery watches a moving average of the
    cross-entropy. When it has fallen under ``learned`` of chance and then climbs back ``rise`` of the way
    from its best to chance, the trained parameters return to the state of that best average, the
    optimisers' moments (which carry the breaking direction) are cleared and every learning rate is halved;
    the budget schedule goes on. Given ``units``, a break after the last of the ``allowed`` returns pins that
    state instead: its scores (``scores()``) select every later step's masks, and the learning rates go back
    to full, decaying over the steps left, so head and prompt learn the pinned network. Searches that learn climb back at most half the way (0.05-0.51 over 12
    held-out runs; the broken one, best at 71 % of chance, all the way), so a search that does not break
    never triggers it and runs exactly as without it. A search that never got far from chance is left
    alone: its best state holds little, and restoring it at a tighter budget did harm (direct-logits at
    10 % MACs, best at 90 % of chance: 2.15 -> 2.31). Its state is buffers, so checkpoints carry it and a
    resumed search recovers alike.
    """

    def __init__(self, params: List[nn.Parameter], allowed: int, rise: float = 0.75, learned: float = 0.8,
                 smoothing: float = 0.9, settle: int = 20, units: Optional[List[int]] = None):
        super().__init__()
        object.__setattr__(self, "params", list(params))  # the optimisers' parameters, not owned here
        self.allowed, self.rise, self.learned = int(allowed), rise, learned
        self.smoothing, self.settle = smoothing, settle
        self.units = None if units is None else [int(u) for u in units]  # given: pin after the last recovery
        self.register_buffer("snapshot", torch.cat([p.detach().flatten().cpu() for p in self.params]).clone())
        # moving average, its best value (none yet: a huge finite number, as checkpoints refuse non-finite
        # values), steps seen, recoveries made
        self.register_buffer("state", torch.tensor([0, 1e300, 0, 0], dtype=torch.float64))
        if self.units is not None:
            self.register_buffer("pinned_scores", torch.zeros(sum(self.units)))
            self.register_buffer("pinned_at", torch.tensor(-1, dtype=torch.long))  # the step; -1: not pinned

    @property
    def recoveries(self) -> int:
        return int(self.state[3])

    @property
    def pinned(self) -> bool:
        return self.units is not None and int(self.pinned_at) >= 0

    def scores(self) -> List[torch.Tensor]:
        """The pinned scores, per group."""
        return list(torch.split(self.pinned_scores, self.units))

    def observe(self, ce: float, chance: float) -> bool:
        """Record one step's cross-entropy; True when the search broke down and should recover."""
        ema, best, seen, made = self.state.tolist()
        ema = ce if seen == 0 else self.smoothing * ema + (1 - self.smoothing) * ce
        seen += 1
        broke = False
        if seen >= self.settle:
            if ema < best:
                best = ema
                with torch.no_grad():
                    self.snapshot.copy_(torch.cat([p.detach().flatten().cpu() for p in self.params]))
            may = made < self.allowed or (self.units is not None and not self.pinned)
            broke = may and best < self.learned * chance and ema > best + self.rise * (chance - best)
        self.state.copy_(torch.tensor([ema, best, seen, made], dtype=torch.float64))
        return broke

    @torch.no_grad()
    def recover(self, optimizers, schedulers, step: int = 0, scores=None) -> None:
        """Return to the best state. While recoveries are left, with halved learning rates; once they are
        spent, by pinning: ``scores()`` (the restored scorer's, a callable) select every later step's masks,
        so the head and prompt train on that state's masks for the rest of the search."""
        offset = 0
        for p in self.params:
            p.copy_(self.snapshot[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype))
            offset += p.numel()
        for opt in optimizers:
            getattr(opt, "optimizer", opt).state.clear()
        self.state[0] = self.state[1]  # the average restarts at the restored state's
        if self.recoveries >= self.allowed:
            self.pinned_scores.copy_(torch.cat([s.detach().flatten().cpu() for s in scores()]))
            self.pinned_at.fill_(step)
            for sched in schedulers:  # head and prompt learn again at full rate, decaying over what is left
                _divide_rates(sched, max(sched.lr_lambdas[0](sched.last_epoch), 1e-3))
            return
        for sched in schedulers:
            _divide_rates(sched, 2)
        self.state[3] += 1


def _divide_rates(sched, by: float) -> None:
    """Divide a LambdaLR's base rates, and its optimiser's current rates, by ``by``; the base rates are in the
    scheduler's state, so a checkpoint keeps the change."""
    sched.base_lrs = [lr / by for lr in sched.base_lrs]
    for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
        group["lr"] = lr / by


def churn(masks: List[torch.Tensor], previous: List[torch.Tensor]) -> float:
    """Units that changed state, as a fraction of the units kept before."""
    changed = sum(int((m.cpu() != p.cpu()).sum()) for m, p in zip(masks, previous))
    return changed / max(1, sum(int(p.sum()) for p in previous))


class MaskedSearchModel(nn.Module):
    """Frozen backbone, gated by the masks the hypernetwork proposes on every forward pass."""

    def __init__(self, backbone: nn.Module, seq: LayerSequence, prompt: nn.Module,
                 hypernet: PassHyperNetwork, target, cfg):
        super().__init__()
        self.backbone, self.prompt, self.hypernet = backbone, prompt, hypernet
        object.__setattr__(self, "seq", seq)  # plain reference, not a submodule
        object.__setattr__(self, "weight_stats", WeightStats(seq))
        # the run's Budget (a plain number: a MACs fraction); the warm-up scales it by fractions of dense
        object.__setattr__(self, "target", as_budget(seq, target))
        self.round_to, self.selection, self.max_prune_ratio = cfg.round_to, cfg.selection, cfg.max_prune_ratio
        self.budget = self.target  # the budget of the current step (see SearchConfig.budget_warmup)
        self.next_budget = self.target  # the budget of the step after it: what the provisional threshold is for
        self.bn_mode = cfg.bn_mode
        self.max_churn = cfg.max_churn
        self.max_group_change = cfg.max_group_change
        # only the churn and group-change limits read the last step's masks back (and checkpoints them)
        limited = cfg.max_churn < 1.0 or cfg.max_group_change > 0
        self.previous = LastMasks([g.units for g in seq.groups]) if limited else None
        self.last_masks: Optional[List[torch.Tensor]] = None
        # a Recovery that may pin the scores (plain reference: the loop's modules checkpoint it)
        object.__setattr__(self, "recovery", None)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # weights and dropout frozen
        if mode and self.bn_mode == "batch":
            # A masked network is far from the dense one's BN statistics; normalising with batch
            # statistics keeps it in a working regime, so the loss judges the mask, not the drift.
            for bn in batch_norms(self.backbone):
                bn.train()
        return self

    def propose(self):
        """(straight-through unit masks, hard unit masks) for the current prompt and hypernetwork."""
        pinned = self.recovery is not None and self.recovery.pinned
        scores = [s.to(self.hypernet.threshold.device) for s in self.recovery.scores()] if pinned else self.scores()
        flat = torch.cat(scores)
        # One shared scale over all groups keeps scores comparable across groups for the STE.
        mu, sd = flat.mean(), flat.std() + 1e-8
        hard = self._limit_churn(scores, self.select(scores, self.budget, self._bounds()), float(sd.detach()))
        ste = []
        for s, h in zip(scores, hard):
            z = (s - mu) / sd
            ste.append(h.to(z.device, z.dtype) + z - z.detach())
        # The walk of the next step reads provisional masks under this threshold: these scores selected
        # at the *next* step's budget, so that during the warm-up the masks the walk reads are (up to one
        # step's change of the scores) the masks that step applies. It lives in a buffer, so a resumed
        # search continues with exactly the threshold the interrupted one would have used.
        scores = [s.detach() for s in scores]
        if self.next_budget != self.budget:
            nxt = self.select(scores, self.next_budget)
            self._set_threshold(scores, nxt)
        else:
            self._set_threshold(scores, hard)
        return ste, hard

    def scores(self) -> List[torch.Tensor]:
        """Every unit's score, per group, from the hypernetwork."""
        # a budget-conditioned hypernetwork scores for this step's budget (the direct-logits scorer has no range)
        conditioned = getattr(self.hypernet, "budget_range", None) is not None
        return self.hypernet(self.prompt.image(), self.weight_stats,
                             **({"budget": self.budget.fraction} if conditioned else {}))

    def _limit_churn(self, scores, hard, sd: float) -> List[torch.Tensor]:
        """``hard``, or -- where it swaps more than ``max_churn`` of the last step's kept units -- the
        selection in which last step's units get the smallest bonus (in score standard deviations) that
        brings the swaps under the limit: the strongest changes happen, the rest wait a step.

        A one-step shift of a group's score offset can move hundreds of units across the global threshold
        at once; the head then faces a different network, the loss jumps to chance and the next gradients
        are noise. Steady learning changes a few percent of the units per step and is left alone."""
        previous = self.previous.masks() if self.previous is not None else None
        if previous is None or churn(hard, previous) <= self.max_churn:
            return hard
        detached = [s.detach() for s in scores]

        def sticky(bonus):
            return self.select([s + bonus * sd * p.to(s.device, s.dtype) for s, p in zip(detached, previous)],
                               self.budget)

        lo, hi = 0.0, 1.0
        while churn(sticky(hi), previous) > self.max_churn and hi < 1e3:
            lo, hi = hi, 2 * hi
        for _ in range(8):  # bisection to 1/256 of the bracket: the bonus need not be exact
            mid = (lo + hi) / 2
            if churn(sticky(mid), previous) > self.max_churn:
                lo = mid
            else:
                hi = mid
        return sticky(hi)

    def select(self, scores, budget, bounds=None) -> List[torch.Tensor]:
        return select_units(scores, self.seq, budget, self.round_to, self.selection, self.max_prune_ratio, bounds)

    def _bounds(self):
        """How far each group's kept units may move from the last step's: ``max_group_change`` of them (at
        least one rounding step) either way, or None (no limit, or no last step).

        At a tight budget, wide cheap groups held at the cap's floor can jump from it to three times as many
        units in one step, taking the budget from every other group, and fall back a few steps later: the head
        faces a different network each time and the loss returns to chance (Lite0 at 10 % MACs: the four
        1,152-unit groups of its sixth stage and the head's 1,280, 120 -> 300-500 -> 120 units). A group that
        must move gradually lets the loss answer before the budget has moved."""
        previous = self.previous.masks() if self.previous is not None and self.max_group_change > 0 else None
        if previous is None:
            return None
        kept = [int(p.sum()) for p in previous]
        moves = [max(1, math.ceil(self.max_group_change * k)) for k in kept]
        return [(k - d, k + d) for k, d in zip(kept, moves)]

    def set_budget(self, budget, next_budget=None) -> None:
        """The budget of this step, and of the next one (default: the same): a ``Budget``, or a fraction
        of the dense cost of the run's budget."""
        self.budget = self._at(budget)
        self.next_budget = self.budget if next_budget is None else self._at(next_budget)

    def _at(self, budget):
        return budget if isinstance(budget, Budget) else self.target.at(float(budget))

    @torch.no_grad()
    def _set_threshold(self, scores: List[torch.Tensor], hard: List[torch.Tensor]) -> None:
        kept = torch.cat([s[h.to(s.device)] for s, h in zip(scores, hard)])
        dropped = torch.cat([s[~h.to(s.device)] for s, h in zip(scores, hard)])
        if dropped.numel():
            self.hypernet.threshold.fill_(float((kept.min() + dropped.max()) / 2))
        else:
            self.hypernet.threshold.fill_(float(kept.min()) - 1.0)

    @torch.no_grad()
    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The unmasked network's logits on the prompted input (the distillation target)."""
        return self.backbone(self.prompt(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ste, hard = self.propose()
        self.last_masks = hard
        if self.previous is not None:
            self.previous.store(hard)
        with self.seq.gated(ste):
            return self.backbone(self.prompt(x))


def build_hypernet(seq: LayerSequence, cfg, budget_range: Optional[List[float]] = None) -> PassHyperNetwork:
    """``budget_range``: (lowest, highest) fractions of the dense cost for a budget-conditioned hypernetwork."""
    return PassHyperNetwork([g.units for g in seq.groups], hidden=cfg.hidden, core=cfg.core, use_prompt=cfg.use_prompt,
                            use_weights=cfg.use_weights, use_prior=cfg.use_prior, rank=cfg.rank,
                            scores=cfg.scores, budget_range=budget_range)


@dataclass
class SearchResult:
    masks: Masks
    unit_masks: List[torch.Tensor]
    hypernet: PassHyperNetwork
    losses: List[float] = field(default_factory=list)
    recoveries: int = 0  # times the search returned to its best state (``Recovery``)
    pinned_at: Optional[int] = None  # the step from which the best state's scores selected the masks


def search(backbone: nn.Module, seq: LayerSequence, prompt: nn.Module, loader, target,
           cfg, accelerator, train_head: bool = False,
           hypernet: Optional[PassHyperNetwork] = None, checkpoints=None, build=None) -> SearchResult:
    """Run stage 1; ``prompt`` is trained in place. Returns the final masks and the hypernetwork.

    ``target``: the run's ``Budget`` (MACs, parameters or latency), or a plain MACs fraction.

    With ``hypernet`` given (transfer: a hypernetwork trained on another task), it stays frozen and
    only the new task's prompt (and a new head) is learned; the masks then follow from that prompt.
    ``checkpoints`` (a ``checkpoint.RunCheckpoints``) saves the loop every N steps, on Ctrl-C and at
    the end, and continues from its newest search checkpoint when the run is resumed.
    ``build(seq, cfg)``: what scores the units when no ``hypernet`` is given (default: PASS's hypernetwork;
    the direct-logits ablation passes its own scorer, trained the same way).
    """

    for p in backbone.parameters():
        p.requires_grad_(False)
    head_params = []
    if train_head:
        head_params = list(backbone.get_classifier().parameters())
        for p in head_params:
            p.requires_grad_(True)
    frozen_hypernet = hypernet is not None
    if hypernet is None and build is not None:
        hypernet = build(seq, cfg)
    elif hypernet is None:
        # cfg.budget_range is in the budget's own terms (milliseconds for latency); the hypernetwork reads fractions
        fractions = None if cfg.budget_range is None else [as_budget(seq, target).fraction_of(b)
                                                           for b in cfg.budget_range]
        hypernet = build_hypernet(seq, cfg, fractions)
    elif hypernet.units != [g.units for g in seq.groups]:
        raise PassZooError("the transferred hypernetwork was trained on another architecture "
                           f"({len(hypernet.units)} groups, this model has {len(seq.groups)})")
    for p in hypernet.parameters():
        p.requires_grad_(not frozen_hypernet)
    model = MaskedSearchModel(backbone, seq, prompt, hypernet, target, cfg)
    target = model.target.fraction  # the warm-up tightens fractions of the dense cost towards it
    family = getattr(hypernet, "budget_range", None)
    if family is not None:
        _check_in_range(target, family)
    with torch.no_grad():  # at the target first: an unreachable budget fails before any step
        model.propose()
        if family is not None:  # and the family's lowest budget
            model.set_budget(family[0])
            model.propose()
        model.set_budget(budget_at(0, cfg, target))
        model.propose()  # a first selection sets the walk's provisional threshold

    opt_prompt = torch.optim.SGD(prompt.parameters(), lr=cfg.lr_prompt, momentum=0.9)
    groups = [] if frozen_hypernet else [{"params": list(hypernet.parameters()), "lr": cfg.lr_hypernet}]
    if head_params:
        groups.append({"params": head_params, "lr": cfg.lr_head})
    # A frozen hypernetwork and no new head leave nothing for AdamW: the prompt alone is trained.
    opt_hyper = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay) if groups else None
    optimizers = {"prompt": opt_prompt, "hypernet": opt_hyper} if opt_hyper else {"prompt": opt_prompt}
    names = list(optimizers)
    wrapped, *prepared, loader = accelerator.prepare(model, *optimizers.values(), loader)
    optimizers = dict(zip(names, prepared))
    # Schedulers stay unprepared: accelerate would step them once per process.
    schedulers = {k: torch.optim.lr_scheduler.LambdaLR(o, cosine_lambda(cfg.steps)) for k, o in optimizers.items()}
    modules = {"prompt": prompt, "hypernet": hypernet}
    if model.previous is not None:
        modules["previous_masks"] = model.previous
    if train_head:
        modules["head"] = backbone.get_classifier()
    prototypes = None
    if cfg.prototypes > 0:
        prototypes = modules["prototypes"] = ClassPrototypes().to(accelerator.device)
    recovery = None
    # A budget-conditioned hypernetwork's scores change with every step's budget: nothing to pin. Such a
    # search returns to its best state with halved rates instead, up to twice (what it did before the pin).
    pin = cfg.pin_masks and family is None
    allowed = cfg.recoveries
    if cfg.pin_masks and family is not None:
        allowed = max(allowed, FAMILY_RECOVERIES)
    if (allowed > 0 or pin) and not frozen_hypernet:
        trained = [p for o in optimizers.values() for g in o.param_groups for p in g["params"]]
        recovery = modules["recovery"] = Recovery(trained, allowed,
                                                  units=[g.units for g in seq.groups] if pin else None)
        object.__setattr__(model, "recovery", recovery)
    loop = LoopState("search", cfg.steps, modules, optimizers, schedulers, Batches(loader))
    wrapped.train()
    with StageCheckpoints(checkpoints, loop, accelerator) as ckpt:
        bar = progress(accelerator, cfg.steps, "search", initial=loop.step)
        try:
            watched = prototypes.watching(backbone) if prototypes is not None else nullcontext()
            with KeepRunningStats(backbone), watched:
                _search_loop(wrapped, model, loop, accelerator, bar, ckpt,
                             lambda step: model.set_budget(*(budget_at(k, cfg, step_target(k, family, target))
                                                             for k in (step, step + 1))), cfg, recovery, prototypes)
        finally:
            bar.close()

    model = accelerator.unwrap_model(wrapped)
    model.eval()
    model.set_budget(model.target)
    if family is not None:  # the member at the run's budget, as masks_at_budget reads every other one
        hard = _member(model)
    else:
        with torch.no_grad():
            _, hard = model.propose()
    for p in head_params:
        p.requires_grad_(False)
    # Every process selected its own masks; they must agree bit for bit, or the saved result
    # would silently depend on which process wrote it.
    check_same_across_processes(accelerator, "search masks and prompt",
                                [*hard, *(t for t in prompt.state_dict().values())])
    return SearchResult(to_channel_masks(hard, seq), [h.clone() for h in hard], hypernet, loop.losses,
                        recovery.recoveries if recovery is not None else 0,
                        int(recovery.pinned_at) if recovery is not None and recovery.pinned else None)


GOLDEN = (5 ** 0.5 - 1) / 2


def step_target(step: int, family: Optional[List[float]], target: float) -> float:
    """The target a search step tightens towards: the run's, or -- budget-conditioned over ``family`` =
    (lowest, highest) -- a budget drawn log-uniformly from the range. The draws are the golden-ratio
    sequence, not random numbers: evenly spread over any stretch of steps, and the same after a resume."""
    if family is None:
        return target
    lo, hi = family
    return lo * (hi / lo) ** ((step * GOLDEN) % 1.0)


def _check_in_range(fraction: float, family: List[float]) -> None:
    lo, hi = family
    if not lo * (1 - 1e-9) <= fraction <= hi * (1 + 1e-9):
        raise BudgetError(f"a budget of {fraction:.4g} of the dense cost is outside the range this hypernetwork was "
                          f"searched over ({lo:g} to {hi:g})")


def masks_at_budget(hypernet: PassHyperNetwork, backbone: nn.Module, seq: LayerSequence, prompt: nn.Module,
                    budget, cfg) -> Masks:
    """Masks for ``budget`` (a ``Budget`` or a MACs fraction) from a budget-conditioned hypernetwork, in one
    forward pass: any budget in the range it was searched over, without searching again.

    ``prompt``: the prompt the search ended with (the hypernetwork reads its image)."""
    if getattr(hypernet, "budget_range", None) is None:
        raise PassZooError("this hypernetwork was searched for a single budget; masks for other budgets need a "
                           "budget-conditioned search (a range of budgets)")
    model = MaskedSearchModel(backbone, seq, prompt, hypernet, budget, cfg)
    _check_in_range(model.target.fraction, hypernet.budget_range)
    model.eval()
    return to_channel_masks(_member(model), seq)


@torch.no_grad()
def _member(model: MaskedSearchModel) -> List[torch.Tensor]:
    """Hard masks at the model's budget as a function of the hypernetwork, prompt and weights alone: the walk's
    provisional threshold starts from the same place (0) whatever the last selection left in it, then the
    first selection sets it for this budget and the second selects."""
    model.hypernet.threshold.zero_()
    model.propose()
    return model.propose()[1]


def budget_at(step: int, cfg, target: float) -> float:
    """The budget of search step ``step`` as a fraction of the dense cost: dense -> target geometrically
    over the warm-up, then target."""
    warm = cfg.budget_warmup * cfg.steps
    if step >= warm:
        return target
    return target ** (step / warm)


class ClassPrototypes(nn.Module):
    """A classifier that needs no training: running means (momentum ``momentum``) of the masked network's
    L2-normalised pooled features, one per class; an image's logits are its cosine similarities to them over
    ``temperature``. The means follow the network within a few steps, so their cross-entropy judges the
    current masks even while a new head is still learning. Buffers, so checkpoints carry them."""

    def __init__(self, momentum: float = 0.9, temperature: float = 0.1, floor: float = 0.05):
        super().__init__()
        self.momentum, self.temperature, self.floor = momentum, temperature, floor
        # shaped (classes, features) on the first batch
        self.register_buffer("means", torch.zeros(0, 0))
        self.register_buffer("seen", torch.zeros(0, dtype=torch.bool))
        self._read: Optional[torch.Tensor] = None  # what the classifier read in the last forward pass (``watching``)

    @contextmanager
    def watching(self, backbone: nn.Module):
        """Within it, every forward pass of ``backbone`` leaves what its classifier read (timm: the pooled
        features) for ``read``; a model without a single classifier module leaves nothing."""
        head = backbone.get_classifier() if hasattr(backbone, "get_classifier") else None
        if not isinstance(head, nn.Module):
            yield
            return
        handle = head.register_forward_hook(lambda _m, args, _out: setattr(self, "_read", args[0]) if args else None)
        try:
            yield
        finally:
            handle.remove()
            self._read = None

    def read(self, logits: torch.Tensor) -> torch.Tensor:
        """The features of the forward pass that gave ``logits`` (the logits themselves where none were left)."""
        features, self._read = self._read, None
        return logits if features is None else features

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("means", "seen"):  # a resumed search restores them at the shape they had
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def loss(self, features: torch.Tensor, labels: torch.Tensor, classes: int, accelerator) -> torch.Tensor:
        f = features.flatten(1).float()
        norm = f.norm(dim=1, keepdim=True)
        # A narrow head convolution can leave an image no positive channel, so its pooled features are zero;
        # F.normalize would then scale its gradient by 1 / 1e-12. Dividing by at least a share of the batch's
        # median norm bounds it (and leaves every image above that share exactly as before).
        f = f / torch.maximum(norm, self.floor * norm.detach().median().clamp_min(1e-12))
        with torch.no_grad():
            if self.means.shape != (classes, f.shape[1]):
                self.means = torch.zeros(classes, f.shape[1], device=f.device)
                self.seen = torch.zeros(classes, dtype=torch.bool, device=f.device)
            onehot = F.one_hot(labels, classes).to(f.dtype)
            # summed over processes, so that every process keeps the same means (and selects the same masks)
            sums, counts = accelerator.reduce(onehot.t() @ f, "sum"), accelerator.reduce(onehot.sum(0), "sum")
            present = counts > 0
            batch = sums[present] / counts[present, None]
            blended = self.momentum * self.means[present] + (1 - self.momentum) * batch
            self.means[present] = torch.where(self.seen[present, None], blended, batch)
            self.seen |= present
        return F.cross_entropy(f @ F.normalize(self.means, dim=1).t() / self.temperature, labels)


def _search_loop(wrapped, model, loop, accelerator, bar, ckpt, set_budget, cfg,
                 recovery: Optional[Recovery] = None, prototypes: Optional[ClassPrototypes] = None) -> None:
    for step in range(loop.step, loop.total):
        set_budget(step)
        x, y = next(loop.batches)
        logits = wrapped(x)
        masked = prototypes.read(logits) if prototypes is not None else None  # before a dense pass replaces it
        loss = ce = F.cross_entropy(logits, y)
        if cfg.distill:
            target = F.log_softmax(model.dense_logits(x).float(), 1)
            loss = loss + cfg.distill * F.kl_div(F.log_softmax(logits.float(), 1), target, log_target=True,
                                                 reduction="batchmean")
        if prototypes is not None:
            loss = loss + cfg.prototypes * prototypes.loss(masked, y, logits.shape[-1], accelerator)
        ce = global_loss(ce, accelerator)
        take_step(loop, loss, accelerator, bar, ckpt, "search",
                  "lower --search-lr-prompt/--search-lr-hypernet and start again", record=ce)
        if recovery is not None and recovery.observe(ce, math.log(logits.shape[-1])):
            recovery.recover(loop.optimizers.values(), loop.schedulers.values(), loop.step, model.scores)
            with torch.no_grad():  # the walk's provisional threshold, for the restored scores
                set_budget(loop.step)
                model.propose()
