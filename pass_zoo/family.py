"""A family of budgets from one search: masks for another budget, read off a finished run's budget-conditioned
search (``--search-budget-range``) without searching again (``pass-zoo masks``)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_seed

from .config import apply_overrides
from .errors import BudgetError, PassZooError
from .fileio import atomic_write_dir, safetensors_bytes
from .graph.masks import masks_summary
from .integrity import verify_run_files
from .methods import get_method
from .pipeline import layer_sequence, load_backbone, make_prompt, prompt_kind, run_budget
from .transfer import run_config

MASK_FILES = ("masks.safetensors", "masks.json")
BUDGET_KINDS = ("macs", "params", "latency")


def member_masks(run_dir, kind: str, target: float, out, overwrite: bool = False) -> dict:
    """Write ``out/masks.safetensors`` and ``masks.json`` for the budget ``--target-{kind} target`` from the run
    in ``run_dir``; returns the masks summary. The run's backbone is rebuilt from its settings (its pretrained
    weights must load here); the budget is of the kind the run searched over."""
    run_dir = Path(str(run_dir).removeprefix("local-dir:"))
    cfg = run_config(run_dir)
    verify_run_files(run_dir)  # the hypernetwork and prompt are the ones the run wrote
    if kind not in BUDGET_KINDS:
        raise BudgetError(f"a family's budgets are --target-macs, --target-params or --target-latency, not {kind}")
    if cfg.budget_kind() not in BUDGET_KINDS:
        raise PassZooError(f"{run_dir} holds weight masks ('{cfg.method}' under --target-{cfg.budget_kind()}); a "
                           "family of budgets comes from a PASS run with --search-budget-range")
    if cfg.budget_kind() != kind:
        raise BudgetError(f"{run_dir} searched over --target-{cfg.budget_kind()} budgets; give --target-"
                          f"{cfg.budget_kind()} (not --target-{kind})")
    out = _check_out(Path(out), run_dir, overwrite)
    member = apply_overrides(cfg, {f"target_{k}": (target if k == kind else None) for k in BUDGET_KINDS},
                             "the family member")
    member.validate()
    method = get_method(member.method)
    set_seed(member.seed)  # as the run did: a random-init backbone then has the run's weights
    backbone = load_backbone(member)
    classes = _run_classes(run_dir)
    if classes is not None and backbone.model.num_classes != classes:
        backbone.model.reset_classifier(classes)  # the classifier's MACs count in the budget: the run's head
    seq = layer_sequence(backbone.model, backbone.spec.img_size)
    budget = run_budget(member, backbone.model, seq, None, backbone.model_kwargs)
    prompt = make_prompt(prompt_kind(member, method), backbone.spec.img_size, member.prompt_size)
    masks = method.member_masks(run_dir, backbone.model, seq, prompt, budget, member.search)
    summary = masks_summary(masks, seq)
    summary["source"] = {"run": str(run_dir), "budget": kind, "target": target}
    tensors = {name: m.cpu().to(torch.uint8).contiguous() for name, m in masks.items()}
    atomic_write_dir(out, {"masks.safetensors": safetensors_bytes(tensors, {"format": "pass-zoo-masks/1"}),
                           "masks.json": (json.dumps(summary, indent=2) + "\n").encode()})
    return summary


def _run_classes(run_dir: Path):
    """The run's number of classes (its exported config.json), or None when it does not say."""
    try:
        classes = json.loads((run_dir / "config.json").read_text()).get("num_classes")
    except (OSError, ValueError, AttributeError):
        return None
    return classes if isinstance(classes, int) and not isinstance(classes, bool) and classes > 0 else None


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> Path:
    """A new folder, or (``overwrite``) one holding only the masks this command writes: never the run itself
    or a folder with other files, which replacing would lose."""
    if out.resolve() == run_dir.resolve():
        raise PassZooError(f"--out {out} is the run folder itself; give a new folder for the member's masks")
    if out.exists():
        if not out.is_dir():
            raise PassZooError(f"--out {out} is a file; give a folder")
        others = sorted(p.name for p in out.iterdir() if p.name not in MASK_FILES)
        if others:
            raise PassZooError(f"--out {out} holds other files ({', '.join(others[:3])}); give a new folder")
        if any(out.iterdir()) and not overwrite:
            raise PassZooError(f"--out {out} already holds masks; add --overwrite to replace them")
    return out
