"""``prune``: backbone -> data -> task head -> layer sequence -> masks -> slim -> fine-tune -> run folder.

``prune`` is a list of named stages; each is a public function over plain objects, so a user who
wants a different loop can call the stages directly (``check`` and ``costs`` do).

Weight-mask methods (``Method.mask_kind == "weight"``: VPNs and the unstructured baselines) take the
same stages with two differences: they need no layer sequence (no channel groups), and instead of
slimming, ``slim_stage`` zeroes the masked weights and holds them at zero through fine-tuning; the
export is then the dense-shaped network with those zeros.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn

from .backbone import BUNDLED, create_backbone, fast_layout, fixed_size_kwargs
from .config import PruneConfig
from .data import DataSpec, TaskData, data_spec_for, hold_out, load_task_data, make_loader, subset
from .errors import PassZooError
from .export import latency as latency_mod
from .fileio import atomic_write_bytes, atomic_write_json, prepare_run_dir, unlock_run_dir
from .integrity import PINS, fingerprint, pin_files
from .label_mapping import fold_label_mapping, frequency_label_mapping, prediction_counts
from .methods import Method, MethodContext, get_method
from .prompt import PromptedModel, create_prompt, default_prompt_width
from .transfer import check_transfer_budget, check_transfer_source
from .validate import check_out_vs_inputs, run_inputs
from .export.latency_table import cpu_name, latency_table, table_key
from .export.onnx import export_run_onnx
from .export.sparsity import sparsity_report
from .export.timm_model import check_rebuild, save_slim_model, verify_reload
from .graph.budget import Budget, achieved, latency_budget, macs_budget, params_budget
from .graph.cost_model import count_macs, count_params
from .graph.masks import Masks, load_masks, masks_summary, save_masks, select_units, to_unit_masks
from .graph.sequence import LayerSequence, build_layer_sequence
from .graph.slim import PruningHistory, slim
from .methods.weight_masks import (apply_weight_masks, check_weight_masks, hold_weight_masks,
                                   prunable_weights, save_weight_masks, weight_masks_summary)
from .train.checkpoint import RunCheckpoints
from .train.finetune import evaluate, finetune, recalibrate_bn
from .train.loop import PROGRESS, make_accelerator

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ stages
def open_run(cfg: PruneConfig, accelerator) -> Tuple[Path, RunCheckpoints]:
    """The run folder (new, replaced, or resumed) and its checkpoints."""
    out = Path(cfg.out or cfg.default_out())
    check_out_vs_inputs(out, run_inputs(cfg))  # never write into (or over) what the run reads
    if accelerator.is_main_process:
        prepare_run_dir(out, cfg.overwrite, cfg.resume)
    accelerator.wait_for_everyone()
    # a resume compares its inputs (dataset listing, weights file, source run) as well as its settings
    return out, RunCheckpoints(out, accelerator, cfg.checkpoint_every, {**asdict(cfg), "inputs": fingerprint(cfg)},
                               cfg.resume, defaults=asdict(PruneConfig()))


@dataclass
class Backbone:
    model: nn.Module
    spec: DataSpec  # the preprocessing it expects, at the run's input size
    model_kwargs: dict  # extra timm.create_model arguments (recorded in the export)


@dataclass
class Data:
    task: TaskData
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader
    diagnostic_loader: torch.utils.data.DataLoader  # the progress evaluations' val subset (or val_loader)
    diagnostic_images: int


def resolve_pretrained(model: str, pretrained: str) -> str:
    if pretrained != "auto":
        return pretrained
    return "bundled" if model in BUNDLED else "timm"


def load_backbone(cfg: PruneConfig) -> Backbone:
    """The timm backbone (eval mode) and the preprocessing it expects."""
    # a ViT/Swin asked for another input size is created at it (and the export records the kwarg)
    model_kwargs = {**fixed_size_kwargs(cfg.model, cfg.img_size), **cfg.model_kwargs}
    model = fast_layout(create_backbone(cfg.model, resolve_pretrained(cfg.model, cfg.pretrained), **model_kwargs).eval())
    created_size = model_kwargs.get("img_size")  # timm leaves pretrained_cfg's input_size at 224
    spec = data_spec_for(model, cfg.img_size or (created_size if isinstance(created_size, int) else None))
    return Backbone(model, spec, model_kwargs)


def prompt_kind(cfg: PruneConfig, method: Method) -> str:
    """``--prompt``, with ``auto`` resolved to the method's own prompt."""
    return method.prompt if cfg.prompt == "auto" else cfg.prompt


def make_prompt(kind: str, img_size: int, width: Optional[int] = None) -> nn.Module:
    """The visual prompt (default width: 16 px at 224, scaled); a bad setting is one line."""
    try:
        return create_prompt(kind, img_size, width if width is not None else default_prompt_width(img_size))
    except ValueError as exc:
        raise PassZooError(f"--prompt-size: {exc}") from exc


def load_task(cfg: PruneConfig, spec: DataSpec) -> TaskData:
    """The task's train/val data (validation held out of the training set with ``holdout``)."""
    task = load_task_data(cfg.dataset, spec)
    return hold_out(task, cfg.holdout) if cfg.holdout else task


def load_data(cfg: PruneConfig, task: TaskData, accelerator) -> Data:
    """The task's fixed train/val subsets and their loaders (validation sharded across processes)."""
    train_ds = subset(task.train, cfg.train_subset, cfg.seed)
    val_ds = subset(task.val, cfg.val_subset, cfg.seed + 1)
    train_loader = make_loader(train_ds, cfg.batch_size, True, cfg.seed, cfg.workers)
    val_loader = accelerator.prepare(make_loader(val_ds, cfg.batch_size * 2, False, cfg.seed, cfg.workers))
    diag_ds, diag_loader = val_ds, val_loader
    if cfg.diagnostic_images and cfg.diagnostic_images < len(val_ds):
        diag_ds = subset(val_ds, cfg.diagnostic_images, cfg.seed + 2)
        diag_loader = accelerator.prepare(make_loader(diag_ds, cfg.batch_size * 2, False, cfg.seed, cfg.workers))
    return Data(task, train_ds, val_ds, train_loader, val_loader, diag_loader, len(diag_ds))


def _calibration_loader(cfg: PruneConfig, data: Data, accelerator, seed: int):
    # Same batches on every process (unsharded loader, same seed): BN statistics stay identical, and
    # with the global batch size they equal those of a one-process run.
    return make_loader(data.train, cfg.batch_size * accelerator.num_processes, True, seed)


def attach_head(cfg: PruneConfig, backbone: nn.Module, prompt: nn.Module, data: Data, accelerator,
                carry: dict) -> Tuple[str, dict]:
    """Target-domain BN statistics, then the task head: the frequency label mapping folded into the
    classifier, or a fresh head. Returns the head kind and its metrics (label mapping, zero-shot top-1)."""
    head = cfg.head
    if head == "auto":
        head = "flm" if backbone.num_classes == 1000 and data.task.num_classes <= 1000 else "new"
    if cfg.adapt_bn:  # target-domain BN statistics for everything that follows
        recalibrate_bn(PromptedModel(backbone, prompt), _calibration_loader(cfg, data, accelerator, cfg.seed + 4),
                       cfg.bn_calibration_batches)
    if head != "flm":
        backbone.reset_classifier(data.task.num_classes)
        return head, {}
    n_target = data.task.num_classes
    if backbone.num_classes < n_target:
        raise PassZooError(f"--head flm needs at least {n_target} source classes, "
                           f"the backbone has {backbone.num_classes}; use --head new")
    if "label_mapping" not in carry:
        flm_loader = accelerator.prepare(make_loader(subset(data.task.train, cfg.flm_samples, cfg.seed + 2),
                                                     cfg.batch_size * 2, False, cfg.seed, cfg.workers))
        counts = prediction_counts(backbone, flm_loader, n_target, backbone.num_classes, accelerator)
        carry["label_mapping"] = frequency_label_mapping(counts)
        fold_label_mapping(backbone, carry["label_mapping"])
        carry["top1_dense_zero_shot"] = evaluate(backbone, data.diagnostic_loader, accelerator)
    else:
        fold_label_mapping(backbone, carry["label_mapping"])
    return head, {"label_mapping": carry["label_mapping"], "top1_dense_zero_shot": carry["top1_dense_zero_shot"]}


def layer_sequence(backbone: nn.Module, img_size: int, cfg: Optional[PruneConfig] = None) -> LayerSequence:
    """The backbone's prunable groups; with ``cfg``, an unreachable MACs or parameter budget fails now,
    not after stage 1 (a latency budget needs its table: ``run_budget``)."""
    seq = build_layer_sequence(backbone, torch.zeros(1, 3, img_size, img_size))
    if cfg is not None and cfg.budget_kind() != "latency":
        run_budget(cfg, backbone, seq)
    return seq


def latency_key(cfg: PruneConfig, backbone: nn.Module, seq: LayerSequence, model_kwargs: dict) -> dict:
    """What the run's latency table is cached under (see ``export.latency_table``)."""

    return table_key(cfg.model, model_kwargs, int(seq.example_input.shape[-1]), backbone.num_classes, seq,
                     cfg.latency_batch, cfg.latency_threads, cfg.search.round_to)


def run_budget(cfg: PruneConfig, backbone: nn.Module, seq: LayerSequence, accelerator=None,
               model_kwargs: Optional[dict] = None) -> Budget:
    """The run's one budget over ``seq`` (MACs, parameters, or milliseconds by the latency table, which
    the main process measures once and caches; the others read it). A budget even the smallest
    selectable network exceeds is refused here, before stage 1."""
    kind = cfg.budget_kind()
    if kind == "macs":
        budget = macs_budget(seq, cfg.target_macs)
    elif kind == "params":
        budget = params_budget(seq, cfg.target_params)
    else:

        key = latency_key(cfg, backbone, seq, model_kwargs or {})
        main = accelerator is None or accelerator.is_main_process
        table = latency_table(backbone, seq, key)[0] if main else None
        if accelerator is not None:
            accelerator.wait_for_everyone()
            if not main:
                table = latency_table(backbone, seq, key, build=False)[0]
        budget = latency_budget(seq, cfg.target_latency, table,
                                f"batch {cfg.latency_batch}, {cfg.latency_threads} ORT thread(s)")
    # the selection itself raises the BudgetError (and checks the selection's own settings)
    select_units([torch.zeros(g.units) for g in seq.groups], seq, budget, cfg.search.round_to, cfg.search.selection,
                 cfg.search.max_prune_ratio)
    return budget


def check_masks_budget(masks: Masks, seq: LayerSequence, budget: Budget, method: str) -> None:
    """A method's masks fit the run's budget: a method that selected under another budget (e.g. one
    that read ``target_macs`` on a parameter budget) is an error, not a silently different run."""
    kept = [int(u.sum()) for u in to_unit_masks(masks, seq)]
    cost = budget.cost(kept)
    if cost > budget.limit * (1 + 1e-9):
        raise PassZooError(f"method '{method}' returned masks over the run's budget: {budget.describe(cost)}, "
                           f"the budget is {budget.flag} {budget.target:g}; select them with ctx.budget")


def budget_record(cfg: PruneConfig, budget: Budget, masks: Masks, seq: LayerSequence, slim_model: nn.Module,
                  img_size: int) -> dict:
    """metrics.json's ``budget``: kind, target, achieved; a latency budget re-measures the slim network
    on ONNX Runtime (the same session settings as its table) and keeps the table's prediction beside it."""
    kept = [int(u.sum()) for u in to_unit_masks(masks, seq)]
    if budget.kind != "latency":
        return achieved(budget, kept)

    ms = latency_mod.measure_model_ms(slim_model, img_size, cfg.latency_batch, cfg.latency_threads)
    record = achieved(budget, kept, round(ms, 4))
    record.update({"batch": cfg.latency_batch, "threads": cfg.latency_threads, "runtime": latency_mod.runtime_name(),
                   "within_target": bool(ms <= budget.target)})
    return record


def density_record(cfg: PruneConfig, masks: Masks, model: nn.Module) -> dict:
    """metrics.json's ``budget`` of a weight-mask run: the density measured on the fine-tuned weights
    (nonzero fraction of the masked ones, which is what the export holds)."""
    params = dict(model.named_parameters())
    kept = sum(int(torch.count_nonzero(params[name].detach())) for name in masks)
    total = sum(params[name].numel() for name in masks)
    return {"kind": "density", "target": cfg.target_density, "achieved": kept / max(1, total)}


def choose_masks(method: Method, ctx: MethodContext, carry: dict) -> Tuple[Masks, Dict[str, bytes]]:
    """Stage 1: the method's masks and artefacts (from the checkpoint when resumed after it)."""
    cfg, ckpts, seq = ctx.config, ctx.checkpoints, ctx.seq
    weight_masks = method.mask_kind == "weight"
    t0 = time.time()
    names = list(prunable_weights(ctx.backbone)) if weight_masks else seq.names
    searched = ckpts.load_searched(ctx.backbone, ctx.prompt, names)
    if searched is not None:
        return searched.masks, searched.artefacts
    artefacts: Dict[str, bytes] = {}
    if cfg.transfer_from and cfg.transfer_mode == "member":  # one budget of a family's search
        masks = method.member_masks(Path(cfg.transfer_from), ctx.backbone, seq, ctx.prompt, ctx.budget, cfg.search)
        check_masks_budget(masks, seq, ctx.budget, cfg.method)
        carry["family_search"] = str(cfg.transfer_from)
    elif cfg.transfer_from and cfg.transfer_mode == "masks":  # masks found on another task
        masks = load_masks(Path(cfg.transfer_from) / "masks.safetensors")
        if weight_masks:
            masks = check_weight_masks(masks, ctx.backbone)  # same architecture, or a clear error
        else:
            to_unit_masks(masks, seq)
        check_transfer_budget(masks, seq, ctx.budget, cfg)  # another task's masks meet this run's budget too
    else:
        result = method.produce(ctx)
        masks, artefacts = result.masks, result.artefacts
        carry.update(result.record)
        if ctx.budget is not None:
            check_masks_budget(masks, seq, ctx.budget, cfg.method)
    carry["search_seconds"] = round(time.time() - t0, 2)
    ckpts.save_searched(ctx.backbone, ctx.prompt, masks, artefacts)
    return masks, artefacts


def slim_stage(backbone: nn.Module, masks: Masks, prompt: nn.Module, example: torch.Tensor, calibration,
               batches: int, mask_kind: str = "channel"):
    """The slim network (BN statistics re-estimated) with its prompt, and the pruning history.

    Weight masks slim nothing: the network keeps its shape, its masked weights become zeros and stay
    zeros while it is fine-tuned (the history is empty, so the export rebuilds the dense shape).
    """
    if mask_kind == "weight":
        slim_model, history = copy.deepcopy(backbone), PruningHistory()
        apply_weight_masks(slim_model, masks)
        hold_weight_masks(slim_model, masks)
    else:
        slim_model, history = slim(backbone, masks, example)
        fast_layout(slim_model)  # the pruned weights come back in the standard layout
    prompted = PromptedModel(slim_model, prompt)
    recalibrate_bn(prompted, calibration, batches)
    return prompted, history


def finetune_plan(cfg: PruneConfig, method: Method, data: Data, accelerator):
    """Fine-tuning settings (epochs resolved to steps) and the weight updates stage 1 already made."""
    ft_cfg = cfg.finetune
    if ft_cfg.epochs:  # batches per epoch as each process sees them
        per_epoch = len(accelerator.prepare(make_loader(data.train, cfg.batch_size, True, cfg.seed)))
        ft_cfg = dataclasses.replace(ft_cfg, steps=max(1, round(ft_cfg.epochs * per_epoch)))
    stage1_updates = cfg.search.steps if method.trains_weights and not cfg.transfer_from else 0
    if cfg.equal_updates and stage1_updates:
        ft_cfg = dataclasses.replace(ft_cfg, steps=max(0, ft_cfg.steps - stage1_updates))
    return ft_cfg, stage1_updates


@dataclass
class Trained:
    """Stage 2's outcome."""

    model: PromptedModel  # the fine-tuned slim network with its prompt, eval mode
    top1_after_search: float  # right after slimming (BN recalibrated), before fine-tuning
    top1: float
    steps: int
    losses: List[float]
    seconds: float
    stage1_updates: int  # weight updates the method already made in stage 1


def finetune_stage(cfg: PruneConfig, method: Method, prompted: PromptedModel, data: Data, accelerator,
                   ckpts) -> Trained:
    """Evaluate the slim network, fine-tune it with its prompt, evaluate again."""
    top1_after_search = evaluate(prompted, data.diagnostic_loader, accelerator)
    ft_cfg, stage1_updates = finetune_plan(cfg, method, data, accelerator)
    t0 = time.time()
    losses = finetune(prompted, data.train_loader, ft_cfg, accelerator, checkpoints=ckpts)
    seconds = time.time() - t0
    prompted = accelerator.unwrap_model(prompted).eval()
    top1 = evaluate(prompted, data.val_loader, accelerator, warn_collapse=True)
    return Trained(prompted, top1_after_search, top1, ft_cfg.steps, losses, seconds, stage1_updates)


def run_metrics(cfg: PruneConfig, method: Method, head: str, bb: Backbone, data: Data, seq: Optional[LayerSequence],
                trained: Trained, ckpts, world: int, started: float, budget: Optional[Budget], masks: Masks) -> dict:
    """What metrics.json records about the run (besides the head's entries, the command and recipe)."""
    carry, slim_model = ckpts.carry, trained.model.model
    example = torch.zeros(1, 3, bb.spec.img_size, bb.spec.img_size) if seq is None else seq.example_input
    search_losses = carry.get("search_losses", [])
    weights = method.mask_kind == "weight"
    return {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "method": cfg.method,
        "head": head,
        "mask_kind": method.mask_kind,
        "target_macs": cfg.target_macs,
        "target_density": cfg.target_density,
        "budget": (density_record(cfg, masks, slim_model) if weights
                   else budget_record(cfg, budget, masks, seq, slim_model, bb.spec.img_size)),
        "img_size": bb.spec.img_size,
        "macs_dense": count_macs(bb.model, example),
        "macs_slim": count_macs(slim_model, example),
        "params_dense": count_params(bb.model),
        "params_slim": count_params(slim_model),
        **{key: carry.get(key) for key in method.metric_keys},
        "top1": trained.top1,
        "top1_after_search": trained.top1_after_search,
        "search_loss_first": search_losses[0] if search_losses else None,
        "search_loss_last": search_losses[-1] if search_losses else None,
        # every step's: where a search broke, and what a change of its recovery rule would have done, can be
        # read back from a finished run instead of rerunning it
        "search_losses": [round(float(v), 4) for v in search_losses],
        # the fair stage 1 of fixed masks (a baseline's, or an ablation's re-probe): head and prompt on the masked
        # network, every step's cross-entropy. What a frozen network at this budget learns with masks that do not
        # move, beside which a search's loss is read
        "probe_losses": [round(float(v), 4) for v in carry.get("probe_losses", [])],
        "finetune_steps": trained.steps,
        "compute": compute_spent(cfg, head, trained.stage1_updates, trained.steps, world),
        "finetune_loss_last": trained.losses[-1] if trained.losses else None,
        "search_seconds": carry["search_seconds"],
        "finetune_seconds": round(trained.seconds, 2),
        "total_seconds": round(time.time() - started, 2),
        "train_images": len(data.train),
        "val_images": len(data.val),
        "diagnostic_images": data.diagnostic_images,  # behind top1_after_search and top1_dense_zero_shot
        "world_size": world,
        "resumed_from": ckpts.resumed_from,
        "seed": cfg.seed,
        "environment": run_environment(),
    }


def run_environment() -> dict:
    """What a run's numbers depend on besides its settings. A search that learns and then breaks amplifies the
    smallest floating-point difference, so runs whose kernels differ (``cpu_capability``) need not repeat."""
    return {"torch": torch.__version__, "timm": timm.__version__, "cpu": cpu_name(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def write_run(out: Path, cfg: PruneConfig, seq: Optional[LayerSequence], masks: Masks, artefacts: Dict[str, bytes],
              prompted: nn.Module, history, bb: Backbone, data: Data, metrics: dict) -> Optional[PassZooError]:
    """The run folder: masks, the method's artefacts, the slim model, model.onnx (verified), metrics.

    ``seq`` None: weight masks (``masks.json`` per layer; metrics gain the density measured on the
    exported weights and their compressed size)."""

    if seq is None:
        save_weight_masks(masks, weight_masks_summary(masks), out)
    else:
        save_masks(masks, masks_summary(masks, seq), out)
    for name, content in artefacts.items():
        atomic_write_bytes(out / name, content)
    save_slim_model(prompted, out, base_arch=cfg.model, history=history, num_classes=data.task.num_classes,
                    label_names=data.task.class_names, base_pretrained_cfg=dict(bb.model.pretrained_cfg),
                    img_size=bb.spec.img_size, model_kwargs=bb.model_kwargs)
    verify_reload(out)  # no metrics.json (a finished run) for an export that cannot be loaded
    if seq is None:  # read off the written file: what a user of the export gets
        metrics.update(sparsity_report(out / "model.safetensors", list(masks), prefix="model."))
    error = None
    if cfg.onnx:
        real = torch.stack([data.val[i][0] for i in range(min(32, len(data.val)))])  # what the run evaluated on
        _, error = export_run_onnx(out, metrics, real_inputs=real)
    metrics[PINS] = pin_files(out, artefacts)  # eval, card and publish check the files against these
    atomic_write_json(out / "metrics.json", metrics)
    return error


def prune(cfg: PruneConfig, accelerator=None, command: Optional[str] = None, recipe: Optional[dict] = None) -> dict:
    """Run the whole pipeline and write the run folder; returns the metrics dict.

    ``recipe``: where the settings came from (``{"path", "name", "hub_id", "values"}``), recorded in
    metrics.json so a model card can show it.
    """
    from accelerate.utils import set_seed


    cfg.validate()
    if cfg.transfer_from:  # before the run folder is touched
        check_transfer_source(cfg)
    PROGRESS.update(quiet=cfg.quiet, log_every=cfg.log_every)
    accelerator = accelerator or make_accelerator(cfg.mixed_precision)
    out, ckpts = open_run(cfg, accelerator)
    carry = ckpts.carry  # stage results a resumed run takes from its checkpoint instead of recomputing
    set_seed(cfg.seed)
    t0 = time.time()
    method = get_method(cfg.method)

    bb = load_backbone(cfg)
    prompt = make_prompt(prompt_kind(cfg, method), bb.spec.img_size, cfg.prompt_size)  # before any data is read
    task = load_task(cfg, bb.spec)
    check_rebuild(cfg.model, bb.model_kwargs, task.num_classes)  # the export must load again: fail before stage 1
    data = load_data(cfg, task, accelerator)
    head, metrics = attach_head(cfg, bb.model, prompt, data, accelerator, carry)
    if method.mask_kind == "channel":
        seq = layer_sequence(bb.model, bb.spec.img_size)
        budget = run_budget(cfg, bb.model, seq, accelerator, bb.model_kwargs)  # unreachable: refused before stage 1
    else:  # weight masks need no channel groups (and no architecture the channel adapter refuses stops them)
        seq, budget = None, None  # their budget, the density, is met exactly by the selection
    masks, artefacts = choose_masks(method, MethodContext(bb.model, seq, prompt, data.train_loader, cfg, accelerator,
                                                          ckpts, head, budget), carry)
    prompted, history = slim_stage(bb.model, masks, prompt, None if seq is None else seq.example_input,
                                   _calibration_loader(cfg, data, accelerator, cfg.seed + 3), cfg.bn_calibration_batches,
                                   method.mask_kind)
    trained = finetune_stage(cfg, method, prompted, data, accelerator, ckpts)

    metrics.update(run_metrics(cfg, method, head, bb, data, seq, trained, ckpts, accelerator.num_processes, t0,
                               budget, masks))
    if "family_search" in carry:  # a family member: where its masks, prompt and head came from
        metrics["family_search"] = carry["family_search"]
    metrics.update({"command": command or "pass_zoo.prune(...)", "config": asdict(cfg),
                    "class_names": data.task.class_names})
    if recipe is not None:
        metrics["recipe"] = recipe
    metrics["macs_ratio"] = metrics["macs_slim"] / metrics["macs_dense"]

    onnx_error = None
    if accelerator.is_main_process:
        onnx_error = write_run(out, cfg, seq, masks, artefacts, trained.model, history, bb, data, metrics)
    accelerator.wait_for_everyone()
    ckpts.finish()  # the run folder is complete
    unlock_run_dir(out)  # (taken by prepare_run_dir) another process may use the folder now
    if onnx_error is not None:  # raised after the barrier so other processes are not left waiting
        raise onnx_error
    return metrics


def compute_spent(cfg: PruneConfig, head: str, stage1_updates: int, finetune_steps: int, world: int) -> dict:
    """What a run spent, in images and backward passes per stage (the budget every method shares).

    Stage 1: as many batches as the method says (``Method.stage1_batches``): PASS searches for
    ``search.steps``, Taylor accumulates gradients over as many, the regularised methods train the
    weights for as many; l1 and random read only the weights (or probe a new head).
    """
    batch = cfg.batch_size * world
    if cfg.transfer_from and cfg.transfer_mode in ("masks", "member"):  # a member's search is its family's
        stage1 = 0
    else:
        stage1 = get_method(cfg.method).stage1_batches(cfg.search, head == "new")
    calibration = cfg.bn_calibration_batches * batch * (2 if cfg.adapt_bn else 1)
    return {
        "stage1_batches": stage1, "stage1_images": stage1 * batch, "stage1_backward_passes": stage1,
        "finetune_steps": finetune_steps, "finetune_images": finetune_steps * batch,
        "finetune_backward_passes": finetune_steps,
        "weight_updates": stage1_updates + finetune_steps,
        "label_mapping_images": cfg.flm_samples if head == "flm" else 0,
        "bn_calibration_images": calibration,
    }
