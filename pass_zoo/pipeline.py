"""``prune``: backbone -> data -> layer sequence -> PASS search -> slim -> fine-tune -> run folder.

Each stage is one public function over plain objects; this module only wires them together, so a
user who wants a different loop can call the stages directly.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .adapter import build_layer_sequence
from .checkpoint import RunCheckpoints
from .baselines import METHODS, TRAINS_WEIGHTS, baseline_scores
from .backbone import BUNDLED_ARCH, create_backbone, fixed_size_kwargs
from .data import DataSpec, hold_out, load_task_data, make_loader, subset
from .errors import BudgetError, PassZooError
from .export import check_rebuild
from .finetune import FinetuneConfig, evaluate, finetune, recalibrate_bn
from .label_mapping import fold_label_mapping, frequency_label_mapping, prediction_counts
from .hypernet import load_hypernet, save_hypernet
from .masks import load_masks, masks_summary, save_masks, select_units, to_channel_masks, to_unit_masks
from .prompt import PromptedModel, create_prompt
from .runio import atomic_write_json, prepare_run_dir, unlock_run_dir
from .search import SearchConfig, search
from .slim import count_macs, count_params, slim
from .training import check_same_across_processes

log = logging.getLogger(__name__)


@dataclass
class PruneConfig:
    """Everything a ``prune`` run depends on (the CLI flags and recipe keys map 1:1 onto it)."""

    model: str = BUNDLED_ARCH
    pretrained: str = "auto"  # auto = bundled for tf_efficientnet_lite0, timm's weights otherwise
    dataset: str = "fashion-mnist"
    target_macs: float = 0.5
    img_size: Optional[int] = None  # None = the backbone's own input size
    # extra timm.create_model kwargs, recorded in the export (e.g. {"img_size": 64} for a ViT/Swin,
    # whose patch grid / windows are fixed at creation)
    model_kwargs: dict = field(default_factory=dict)
    out: Optional[str] = None
    overwrite: bool = False
    resume: bool = False  # continue the run in ``out`` from its newest checkpoint
    checkpoint_every: int = 50  # steps between checkpoints (0: only at stage ends and on Ctrl-C)
    method: str = "pass"
    head: str = "auto"  # auto | flm | new
    prompt: str = "additive"  # additive | pad
    prompt_size: Optional[int] = None  # None = 16 px at 224, scaled with the input size
    batch_size: int = 64
    train_subset: Optional[int] = None
    val_subset: Optional[int] = None
    holdout: Optional[int] = None  # validate on N held-out training images instead of the test set
    flm_samples: int = 2000
    transfer_from: Optional[str] = None  # a PASS run folder of another task (see pass-zoo transfer)
    transfer_mode: str = "hypernet"  # hypernet: its hypernetwork + a new prompt | masks: its masks
    bn_calibration_batches: int = 20  # re-estimate BN statistics of the slim network before fine-tuning
    # Re-estimate the dense backbone's BN statistics on the target data (prompted) before the label
    # mapping, so that mapping, search (batch statistics) and evaluation (recalibrated statistics) all
    # see target-domain normalisation; with ImageNet statistics the mapping no longer fits once the
    # statistics are recalibrated.
    adapt_bn: bool = True
    # Methods that train the weights in stage 1 (group-norm, bn-scale, growreg) fine-tune for that many
    # steps fewer, so every method gets the same number of weight updates in total.
    equal_updates: bool = True
    workers: int = 0
    seed: int = 0
    mixed_precision: str = "no"
    onnx: bool = True  # export + verify model.onnx at the end (False: --no-onnx)
    search: SearchConfig = field(default_factory=SearchConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def validate(self) -> None:
        if not 0.0 < self.target_macs <= 1.0:
            raise BudgetError(f"--target-macs must be in (0, 1], got {self.target_macs}")
        if self.head not in ("auto", "flm", "new"):
            raise PassZooError(f"--head must be auto, flm or new, got '{self.head}'")
        if self.method not in METHODS:
            raise PassZooError(f"unknown --method '{self.method}' (choose from {', '.join(METHODS)})")
        for flag, value, least in (("--img-size", self.img_size, 1), ("--prompt-size", self.prompt_size, 0),
                                   ("--workers", self.workers, 0), ("--hidden-size", self.search.hidden, 1)):
            if value is not None and value < least:
                raise PassZooError(f"{flag} must be at least {least}, got {value}")
        if self.batch_size <= 0 or self.search.steps < 0 or self.finetune.steps < 0:
            raise PassZooError("batch size must be positive and step counts non-negative")
        if self.transfer_mode not in ("hypernet", "masks"):
            raise PassZooError(f"transfer mode must be hypernet or masks, got '{self.transfer_mode}'")
        if self.search.round_to < 1:
            raise PassZooError(f"--round-to must be >= 1, got {self.search.round_to}")
        if self.search.bn_mode not in ("batch", "frozen"):
            raise PassZooError(f"--search-bn must be batch or frozen, got '{self.search.bn_mode}'")
        if not 0.0 <= self.search.budget_warmup <= 1.0:
            raise PassZooError(f"--budget-warmup must be in [0, 1], got {self.search.budget_warmup}")
        if self.search.rank < 1:
            raise PassZooError(f"--hypernet-rank must be >= 1, got {self.search.rank}")
        if not self.search.distill >= 0.0:
            raise PassZooError(f"--distill must be >= 0, got {self.search.distill}")
        if self.checkpoint_every < 0:
            raise PassZooError(f"--checkpoint-every must be >= 0, got {self.checkpoint_every}")
        if self.resume and self.overwrite:
            raise PassZooError("--resume continues the run in --out and --overwrite deletes it: pass one of them")

    def default_out(self) -> str:
        data = self.dataset.split(":")[0]
        return f"runs/{self.model}-{data}-pass{round(self.target_macs * 100)}"


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


_SECTIONS = {"search": SearchConfig, "finetune": FinetuneConfig}


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
        want = next((a for a in typing.get_args(hint) if a is not type(None)), hint) \
            if typing.get_origin(hint) is typing.Union else hint
        ok = {bool: lambda v: isinstance(v, bool),
              int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              str: lambda v: isinstance(v, str),
              dict: lambda v: isinstance(v, dict)}.get(want, lambda v: True)
        if not ok(value):
            raise error(f"{where}: '{prefix}{key}' must be {getattr(want, '__name__', want)}, got {value!r}")
        out[key] = float(value) if want is float else value
    return out


def _resolve_pretrained(cfg: PruneConfig) -> str:
    if cfg.pretrained != "auto":
        return cfg.pretrained
    return "bundled" if cfg.model == BUNDLED_ARCH else "timm"


def data_spec_for(model, img_size: Optional[int]) -> DataSpec:
    from timm.data import resolve_data_config

    args = {"input_size": (3, img_size, img_size)} if img_size else {}
    dc = resolve_data_config(args, model=model)
    return DataSpec(img_size=dc["input_size"][-1], mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                    interpolation=dc.get("interpolation", "bilinear"), crop_pct=dc.get("crop_pct", 1.0))


def prune(cfg: PruneConfig, accelerator=None, command: Optional[str] = None, recipe: Optional[dict] = None) -> dict:
    """Run the whole pipeline and write the run folder; returns the metrics dict.

    ``recipe``: where the settings came from (``{"path", "name", "hub_id", "values"}``), recorded in
    metrics.json so a model card can show it.
    """
    from accelerate.utils import set_seed

    from .training import make_accelerator

    cfg.validate()
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    main = accelerator.is_main_process
    out = Path(cfg.out or cfg.default_out())
    if main:
        prepare_run_dir(out, cfg.overwrite, cfg.resume)
    accelerator.wait_for_everyone()
    ckpts = RunCheckpoints(out, accelerator, cfg.checkpoint_every, asdict(cfg), cfg.resume)
    carry = ckpts.carry  # stage results a resumed run takes from its checkpoint instead of recomputing
    set_seed(cfg.seed)
    t0 = time.time()

    # backbone + data
    # a ViT/Swin asked for another input size is created at it (and the export records the kwarg)
    model_kwargs = {**fixed_size_kwargs(cfg.model, cfg.img_size), **cfg.model_kwargs}
    backbone = create_backbone(cfg.model, _resolve_pretrained(cfg), **model_kwargs).eval()
    created_size = model_kwargs.get("img_size")  # timm leaves pretrained_cfg's input_size at 224
    spec = data_spec_for(backbone, cfg.img_size or (created_size if isinstance(created_size, int) else None))
    prompt_size = cfg.prompt_size if cfg.prompt_size is not None else max(1, round(spec.img_size * 16 / 224))
    try:  # before any data is read: a typo should fail in a second, as one line
        prompt = create_prompt(cfg.prompt, spec.img_size, prompt_size)
    except ValueError as exc:
        raise PassZooError(f"--prompt-size: {exc}") from exc
    task = load_task_data(cfg.dataset, spec)
    if cfg.holdout:
        task = hold_out(task, cfg.holdout)
    check_rebuild(cfg.model, model_kwargs, task.num_classes)  # the export must load again: fail before stage 1
    train_ds = subset(task.train, cfg.train_subset, cfg.seed)
    val_ds = subset(task.val, cfg.val_subset, cfg.seed + 1)
    train_loader = make_loader(train_ds, cfg.batch_size, True, cfg.seed, cfg.workers)
    val_loader = accelerator.prepare(make_loader(val_ds, cfg.batch_size * 2, False, cfg.seed, cfg.workers))

    # task head: fold the frequency label mapping into the classifier, or a fresh head
    head = cfg.head
    if head == "auto":
        head = "flm" if backbone.num_classes == 1000 and task.num_classes <= 1000 else "new"
    metrics: dict = {}
    if cfg.adapt_bn:  # target-domain BN statistics for everything that follows (same batches on every process)
        recalibrate_bn(PromptedModel(backbone, prompt),
                       make_loader(train_ds, cfg.batch_size * accelerator.num_processes, True, cfg.seed + 4),
                       cfg.bn_calibration_batches)
    if head == "flm":
        if backbone.num_classes < task.num_classes:
            raise PassZooError(f"--head flm needs at least {task.num_classes} source classes, "
                               f"the backbone has {backbone.num_classes}; use --head new")
        if "label_mapping" not in carry:
            flm_loader = accelerator.prepare(make_loader(subset(task.train, cfg.flm_samples, cfg.seed + 2),
                                                         cfg.batch_size * 2, False, cfg.seed, cfg.workers))
            counts = prediction_counts(backbone, flm_loader, task.num_classes, backbone.num_classes, accelerator)
            carry["label_mapping"] = frequency_label_mapping(counts)
            fold_label_mapping(backbone, carry["label_mapping"])
            carry["top1_dense_zero_shot"] = evaluate(backbone, val_loader, accelerator)
        else:
            fold_label_mapping(backbone, carry["label_mapping"])
        metrics["label_mapping"] = carry["label_mapping"]
        metrics["top1_dense_zero_shot"] = carry["top1_dense_zero_shot"]
    else:
        backbone.reset_classifier(task.num_classes)

    # layer sequence + mask search (PASS, or a baseline criterion under the same budget)
    example = torch.zeros(1, 3, spec.img_size, spec.img_size)
    seq = build_layer_sequence(backbone, example)
    # An unreachable budget fails now, not after a stage-1 run (selection raises the BudgetError).
    select_units([torch.zeros(g.units) for g in seq.groups], seq, cfg.target_macs, cfg.search.round_to,
                 cfg.search.selection)
    t_search = time.time()
    masks = ckpts.load_searched(backbone, prompt, seq)  # resumed after the search: its result
    hypernet = getattr(ckpts, "searched_hypernet", None) if masks is not None else None
    if masks is None:
        if cfg.transfer_from and cfg.transfer_mode == "masks":  # (a) masks found on another task
            masks = load_masks(Path(cfg.transfer_from) / "masks.safetensors")
            to_unit_masks(masks, seq)  # same architecture, or a clear error
        elif cfg.method == "pass":
            source = load_hypernet(cfg.transfer_from) if cfg.transfer_from else None  # (b) another task's
            result = search(backbone, seq, prompt, train_loader, cfg.target_macs, cfg.search, accelerator,
                            train_head=(head == "new"), hypernet=source, checkpoints=ckpts)
            masks, hypernet = result.masks, result.hypernet
            carry.update(search_losses=result.losses, hypernet_params=count_params(hypernet))
        else:
            scores = baseline_scores(cfg.method, backbone, seq, prompt, train_loader, cfg.search.steps, accelerator,
                                     train_head=(head == "new"), lr_head=cfg.search.lr_head)
            masks = to_channel_masks(select_units(scores, seq, cfg.target_macs, cfg.search.round_to,
                                                  cfg.search.selection), seq)
            check_same_across_processes(accelerator, f"{cfg.method} masks", list(masks.values()))
        carry["search_seconds"] = round(time.time() - t_search, 2)
        ckpts.save_searched(backbone, prompt, masks, hypernet)
    search_losses, hypernet_params = carry.get("search_losses", []), carry.get("hypernet_params")

    # slim + fine-tune
    slim_model, history = slim(backbone, masks, example)
    prompted = PromptedModel(slim_model, prompt)
    # Same batches on every process (unsharded loader, same seed): BN statistics stay identical, and
    # with the global batch size they equal those of a one-process run.
    recalibrate_bn(prompted, make_loader(train_ds, cfg.batch_size * accelerator.num_processes, True, cfg.seed + 3),
                   cfg.bn_calibration_batches)
    top1_after_search = evaluate(prompted, val_loader, accelerator)
    ft_cfg = cfg.finetune
    if ft_cfg.epochs:  # batches per epoch as each process sees them
        per_epoch = len(accelerator.prepare(make_loader(train_ds, cfg.batch_size, True, cfg.seed)))
        ft_cfg = dataclasses.replace(ft_cfg, steps=max(1, round(ft_cfg.epochs * per_epoch)))
    stage1_updates = cfg.search.steps if cfg.method in TRAINS_WEIGHTS and not cfg.transfer_from else 0
    if cfg.equal_updates and stage1_updates:
        ft_cfg = dataclasses.replace(ft_cfg, steps=max(0, ft_cfg.steps - stage1_updates))
    t_ft = time.time()
    ft_losses = finetune(prompted, train_loader, ft_cfg, accelerator, checkpoints=ckpts)
    t_ft = time.time() - t_ft
    prompted = accelerator.unwrap_model(prompted).eval()
    top1 = evaluate(prompted, val_loader, accelerator)

    metrics.update({
        "model": cfg.model,
        "dataset": cfg.dataset,
        "method": cfg.method,
        "head": head,
        "target_macs": cfg.target_macs,
        "img_size": spec.img_size,
        "macs_dense": count_macs(backbone, example),
        "macs_slim": count_macs(slim_model, example),
        "params_dense": count_params(backbone),
        "params_slim": count_params(slim_model),
        "hypernet_params": hypernet_params,
        "top1": top1,
        "top1_after_search": top1_after_search,
        "search_loss_first": search_losses[0] if search_losses else None,
        "search_loss_last": search_losses[-1] if search_losses else None,
        "finetune_steps": ft_cfg.steps,
        "compute": compute_spent(cfg, head, stage1_updates, ft_cfg.steps, accelerator.num_processes),
        "finetune_loss_last": ft_losses[-1] if ft_losses else None,
        "search_seconds": carry["search_seconds"],
        "finetune_seconds": round(t_ft, 2),
        "total_seconds": round(time.time() - t0, 2),
        "train_images": len(train_ds),
        "val_images": len(val_ds),
        "world_size": accelerator.num_processes,
        "resumed_from": ckpts.resumed_from,
        "seed": cfg.seed,
        "command": command or "pass_zoo.prune(...)",
        "config": asdict(cfg),
        "class_names": task.class_names,
    })
    if recipe is not None:
        metrics["recipe"] = recipe
    metrics["macs_ratio"] = metrics["macs_slim"] / metrics["macs_dense"]

    onnx_error = None

    if main:
        save_masks(masks, masks_summary(masks, seq), out)
        if hypernet is not None:
            save_hypernet(hypernet, out)
        from .export import save_slim_model, verify_reload
        save_slim_model(prompted, out, base_arch=cfg.model, history=history, num_classes=task.num_classes,
                        label_names=task.class_names, base_pretrained_cfg=dict(backbone.pretrained_cfg),
                        img_size=spec.img_size, model_kwargs=model_kwargs)
        verify_reload(out)  # no metrics.json (a finished run) for an export that cannot be loaded
        if cfg.onnx:
            onnx_error = _export_onnx(out, val_ds, metrics)
        atomic_write_json(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    ckpts.finish()  # the run folder is complete
    unlock_run_dir(out)  # (taken by prepare_run_dir) another process may use the folder now
    if onnx_error is not None:  # raised after the barrier so other processes are not left waiting
        raise onnx_error
    return metrics


def compute_spent(cfg: PruneConfig, head: str, stage1_updates: int, finetune_steps: int, world: int) -> dict:
    """What a run spent, in images and backward passes per stage (the budget every method shares).

    Stage 1: PASS searches for ``search.steps`` batches, Taylor accumulates gradients over as many,
    the regularised methods train the weights for as many; l1 and random read only the weights.
    """
    batch = cfg.batch_size * world
    if cfg.transfer_from and cfg.transfer_mode == "masks":
        stage1 = 0
    elif cfg.method == "taylor":
        stage1 = max(1, cfg.search.steps)
    elif cfg.method == "pass" or cfg.method in TRAINS_WEIGHTS or head == "new":  # new head: l1/random train it
        stage1 = cfg.search.steps
    else:
        stage1 = 0
    calibration = cfg.bn_calibration_batches * batch * (2 if cfg.adapt_bn else 1)
    return {
        "stage1_batches": stage1, "stage1_images": stage1 * batch, "stage1_backward_passes": stage1,
        "finetune_steps": finetune_steps, "finetune_images": finetune_steps * batch,
        "finetune_backward_passes": finetune_steps,
        "weight_updates": stage1_updates + finetune_steps,
        "label_mapping_images": cfg.flm_samples if head == "flm" else 0,
        "bn_calibration_images": calibration,
    }


def _export_onnx(out: Path, val_ds, metrics: dict) -> Optional[PassZooError]:
    """Write the verified model.onnx; record the parity (or the failure) in ``metrics``."""
    from .onnx_export import export_onnx

    real = torch.stack([val_ds[i][0] for i in range(min(32, len(val_ds)))])  # what the run evaluated on
    try:
        report = export_onnx(out, real_inputs=real)
    except PassZooError as exc:
        report, error = getattr(exc, "report", {}), exc
        metrics["onnx_error"] = str(exc)
    else:
        error = None
    diffs = [d for d in (report.get("max_abs_diff_random"), report.get("max_abs_diff_real")) if d is not None]
    metrics["onnx_max_abs_diff"] = max(diffs) if diffs else None
    return error
