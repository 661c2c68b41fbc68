"""Transfer (paper Table 2): reuse what PASS learned on task A for task B.

* ``masks``    -- A's masks, slimmed and fine-tuned on B.
* ``hypernet`` -- A's hypernetwork, frozen, reads a prompt learned from scratch on B; the masks it
  proposes for that prompt are B's masks (no hypernetwork tuning).

Both are ordinary ``prune`` runs of B whose configuration starts from A's saved one.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from .config import PruneConfig, apply_overrides
from .errors import BudgetError, PassZooError, one_line
from .graph.masks import to_unit_masks
from .integrity import verify_run_files
from .methods import get_method, list_methods


def run_config(run_dir) -> PruneConfig:
    """The configuration a finished run recorded (without its folder and transfer settings)."""
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise PassZooError(f"{run_dir} is not a finished prune run (no metrics.json)")
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as exc:
        raise PassZooError(f"cannot read {metrics_path}: {exc}") from exc
    saved = (metrics.get("config") if isinstance(metrics, dict) else None) or {}
    for key in ("out", "overwrite", "transfer_from", "transfer_mode"):
        saved.pop(key, None)
    return apply_overrides(PruneConfig(), saved, f"{metrics_path} config")


def transfer_config(source_run, mode: str, **overrides) -> PruneConfig:
    """A's configuration with B's dataset (and other ``overrides``), set up to transfer ``mode``."""
    source_run = Path(source_run)
    cfg = run_config(source_run)
    if mode == "hypernet" and not get_method(cfg.method).transferable:
        learned = ", ".join(m for m in list_methods() if get_method(m).transferable)
        raise PassZooError(f"{source_run} was pruned with '{cfg.method}': it has no hypernetwork to transfer "
                           f"(runs of {learned} have one)")
    cfg = apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None}, "transfer")
    cfg.transfer_from, cfg.transfer_mode = str(source_run), mode
    check_transfer_source(cfg)
    return cfg


def check_transfer_source(cfg: PruneConfig) -> None:
    """The files a transfer reads are the ones the source run wrote (its pins) and complete safetensors
    files: a truncated one is one line here, not an error deep inside the run."""
    source_run = Path(cfg.transfer_from)
    method = get_method(cfg.method)
    artefacts = {"hypernet": method.artefacts, "member": method.family_artefacts}.get(cfg.transfer_mode, ())
    verify_run_files(source_run, ["masks.safetensors", "masks.json", *artefacts])
    for name in ["masks.safetensors"] + [a for a in artefacts if a.endswith(".safetensors")]:
        path = source_run / name
        if not path.is_file():
            raise PassZooError(f"transfer source {source_run} has no {name}")
        try:
            load_file(str(path))
        except Exception as exc:
            raise PassZooError(f"cannot read {path}: it is truncated or not a safetensors file "
                               f"({one_line(exc)})") from exc


def check_transfer_budget(masks, seq, budget, cfg: PruneConfig) -> None:
    """Masks taken from another run must meet this run's budget: the source's own budget, or the one a
    recipe or flag gives the transfer (channel masks: their cost; weight masks: their density)."""
    if seq is None:
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        density = kept / max(1, total)
        limit = round(cfg.density * total) / max(1, total)
        if density > limit + 1e-12:
            raise BudgetError(f"the masks of {cfg.transfer_from} keep {100 * density:.1f} % of the prunable weights, "
                              f"over this run's --target-density {cfg.density:g}; --mode masks reuses them as they "
                              "are, so transfer with the source's budget or use --mode hypernet")
        return
    if budget is None:
        return
    cost = budget.cost([int(u.sum()) for u in to_unit_masks(masks, seq)])
    if cost > budget.limit * (1 + 1e-9):
        raise BudgetError(f"the masks of {cfg.transfer_from} cost {budget.describe(cost)}, over this run's budget "
                          f"{budget.flag} {budget.target:g}; --mode masks reuses them as they are, so transfer with "
                          "the source's budget or use --mode hypernet")
