"""The mask producers' registry: one class per method, looked up by name.

A method turns a context (backbone with its task head, layer sequence, prompt, loader, config,
accelerator, checkpoints) into masks plus named artefacts (files written beside the masks, e.g.
PASS's hypernetwork). Everything after the masks -- slimming, fine-tuning, export -- is shared, so
the only difference between methods is how the masks were chosen.

Two kinds of masks (``Method.mask_kind``), each with its own budget (``Method.budget``):

* ``channel`` masks (``{group: bool channel mask}``) under a channel budget (``--target-macs``,
  ``--target-params`` or ``--target-latency``): the network is physically slimmed (PASS and the
  Torch-Pruning criteria);
* ``weight`` masks (``{weight name: bool mask of the weight's shape}``) under ``--target-density``:
  nothing is slimmed, the masked weights are zeros in the dense-shaped network (VPNs, magnitude,
  random-weights).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Type

import torch.nn as nn

from .errors import PassZooError

_METHODS: Dict[str, Type["Method"]] = {}
# (mask kind, budget) pairs the pipeline knows how to apply
_KINDS = (("channel", "macs"), ("weight", "density"))


@dataclass
class MethodContext:
    """What a method may read (and, for weight-training methods, update in place)."""

    backbone: nn.Module  # dense, with its task head (folded label mapping or a new head)
    seq: Any  # the layer sequence of ``backbone`` (None for weight-mask methods: they need no channel groups)
    prompt: nn.Module  # trained in place by methods that learn it
    train_loader: Any
    config: Any  # the run's PruneConfig
    accelerator: Any
    checkpoints: Any = None  # a RunCheckpoints, or None (no run folder)
    head: str = "flm"  # flm | new
    # The run's budget (graph.budget.Budget: MACs, parameters or latency); select masks under it with
    # ``select_units(scores, ctx.seq, ctx.budget, ...)``. None: a MACs budget of config.target_macs.
    # Weight-mask methods get None and select under ``config.target_density``.
    budget: Any = None

    def selection_budget(self):
        """``budget``, or the config's MACs fraction when the context was built without one."""
        return self.budget if self.budget is not None else self.config.target_macs

    @property
    def new_head(self) -> bool:
        return self.head == "new"


@dataclass
class MethodResult:
    masks: Dict[str, Any]  # {group name: bool channel mask}, walk order; or {weight name: bool weight mask}
    artefacts: Dict[str, bytes] = field(default_factory=dict)  # file name -> content, written beside the masks
    record: Dict[str, Any] = field(default_factory=dict)  # carried into metrics.json (and resumed runs)


class Method:
    """Base class of a mask producer; subclasses set ``name`` and implement ``produce``."""

    name: str = ""
    # Run-folder and card naming: runs/MODEL-DATA-{tag}{percent}, card tag ``tag``.
    tag: Optional[str] = None
    # Stage 1 updates the backbone weights: under equal_updates fine-tuning gets that many steps fewer.
    trains_weights: bool = False
    # A Torch-Pruning baseline (what a learned method is compared against in bench tables).
    baseline: bool = True
    # Files of ``MethodResult.artefacts``: published with the run, and what transfer reuses.
    artefacts: Tuple[str, ...] = ()
    # What a budget-conditioned search adds, from which ``member_masks`` reads other budgets (none: no family).
    family_artefacts: Tuple[str, ...] = ()
    # metrics.json keys the method fills from its record (None when it is absent).
    metric_keys: Tuple[str, ...] = ()
    # ``SearchConfig`` fields the method never reads: a finished bench cell of it is reused when only these
    # changed (a search-only option's new default), rather than run again to the same masks.
    ignored_search_settings: Tuple[str, ...] = ()
    # What its masks are ("channel": slimmed; "weight": zeros in the dense shape) and the budgets it
    # takes ("macs": the channel budgets --target-macs/--target-params/--target-latency; "density":
    # --target-density only).
    mask_kind: str = "channel"
    budget: str = "macs"
    # The prompt ``--prompt auto`` gives it.
    prompt: str = "additive"
    # How a model card names it (Markdown; default: its name).
    summary: str = ""

    @property
    def run_tag(self) -> str:
        return self.tag or self.name

    @property
    def transferable(self) -> bool:
        """Its artefacts can drive a run on another task (``--transfer-mode hypernet``)."""
        return bool(self.artefacts)

    def stage1_batches(self, search, new_head: bool) -> int:
        """Batches (each one backward pass) stage 1 spends under the run's ``SearchConfig`` ``search``
        (its budget is ``search.steps``)."""
        return search.steps

    def produce(self, ctx: MethodContext) -> MethodResult:
        raise NotImplementedError

    def member_masks(self, run_dir, backbone, seq, prompt, budget, search) -> Dict[str, Any]:
        """Masks for another ``budget`` from a finished run's budget-conditioned search, without searching
        again (``pass-zoo masks``); ``prompt`` is a fresh prompt of the run's kind, ``search`` the run's
        ``SearchConfig``. Only a method that searches one model for a range of budgets has them."""
        raise PassZooError(f"'{self.name}' runs hold masks for their own budget only; other budgets need a new run")


def register_method(cls: Type[Method]) -> Type[Method]:
    """Class decorator: make ``cls`` available as ``--method cls.name``."""
    if not cls.name:
        raise PassZooError(f"method class {cls.__name__} has no name")
    if (cls.mask_kind, cls.budget) not in _KINDS:
        raise PassZooError(f"method '{cls.name}': {cls.mask_kind} masks under a {cls.budget} budget are not "
                           f"supported (supported: {', '.join(f'{k} masks under {b}' for k, b in _KINDS)})")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> List[str]:
    """Registered method names, in registration order."""
    return list(_METHODS)


def methods_of_budget(budget: str) -> List[str]:
    """Registered methods that take ``budget`` ("macs": the channel budgets, or "density")."""
    return [n for n, cls in _METHODS.items() if cls.budget == budget]


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]()
    except KeyError:
        raise PassZooError(f"unknown method '{name}' (choose from {', '.join(_METHODS)})") from None
