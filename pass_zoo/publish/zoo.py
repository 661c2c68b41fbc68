"""The zoo: recipes (``recipes/*.yaml``) and the run folders built from them (``RUNS_DIR/NAME``).

``zoo_entries`` joins each recipe with what exists locally -- the run's ``metrics.json`` and, once
published, its ``hub.json`` -- and ``build_entry`` runs a recipe end to end (prune, verified ONNX
export, model card) into a folder that ``pass-zoo publish`` accepts as it is.
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import List, Optional

from .card import write_card
from ..family import family_members, member_repo_id, prune_family
from ..pipeline import prune
from ..recipes import find_recipe, list_recipes, recipe_record


def _read(path: Path) -> Optional[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _target(cfg) -> str:
    """The TARGET column: "50 %" (of the MACs), "40 % params", "12 ms", "10 % weights"."""
    kind = cfg.budget_kind()
    if kind == "latency":
        return f"{cfg.target_latency:g} ms"
    return f"{100 * cfg.budget_target():.0f} %" + {"params": " params", "density": " weights"}.get(kind, "")


def zoo_entries(recipes_dir=None, runs_dir="runs") -> List[dict]:
    """One dict per recipe: name, arch, dataset, target, and the local run / Hub state."""
    rows = []
    for name, cfg, extras in list_recipes(recipes_dir):
        run = Path(runs_dir) / name
        metrics = _read(run / "metrics.json")
        hub = _read(run / "hub.json") or {}
        rows.append({
            "name": name, "arch": cfg.model, "dataset": cfg.dataset, "target_macs": cfg.target_macs, "budget": _target(cfg),
            "recipe": extras["path"], "run": str(run) if metrics else None,
            "top1": metrics.get("top1") if metrics else None,
            "macs_ratio": metrics.get("macs_ratio") if metrics else None,
            "density": metrics.get("density") if metrics else None,
            "hub": f"{hub['repo_id']}@{hub.get('revision', 'main')}" if hub.get("repo_id") else None,
            "hub_planned": extras["hub_id"],
        })
    return rows


def format_zoo(rows: List[dict]) -> str:
    """The table ``pass-zoo zoo list`` prints."""
    if not rows:
        return "no recipes"
    head = ("NAME", "ARCH", "DATASET", "TARGET", "LOCAL RUN", "TOP-1", "MACS", "HUB")
    table = [head]
    for r in rows:
        table.append((
            r["name"], r["arch"], r["dataset"], r["budget"],
            r["run"] or "not built",
            "-" if r["top1"] is None else f"{100 * r['top1']:.2f} %",
            "-" if r["macs_ratio"] is None else f"{100 * r['macs_ratio']:.1f} %"
            + ("" if r.get("density") is None else f" ({100 * r['density']:.1f} % weights)"),
            r["hub"] or (f"{r['hub_planned']} (not published)" if r["hub_planned"] else "-"),
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def build_entry(name: str, recipes_dir=None, runs_dir="runs", overwrite: bool = False, argv=None):
    """Run a zoo entry's recipe into ``RUNS_DIR/NAME`` (always with the verified ONNX export) and
    write its card; returns ``(metrics, PruneConfig, card path)``. A family recipe (a list of budgets)
    returns ``(each member's metrics, PruneConfig, each member's card)``, members under ``RUNS_DIR/NAME``."""
    import os


    name, cfg, extras = find_recipe(name, recipes_dir)
    cfg.out, cfg.overwrite, cfg.onnx = str(Path(runs_dir) / name), overwrite, True  # publishable needs ONNX
    command = "pass-zoo " + " ".join(shlex.quote(a) for a in (argv or ["zoo", "build", name]))
    if extras.get("family"):  # one search, a run folder per budget, each with its own card
        members = prune_family(cfg, extras["family"], command=command, recipe=recipe_record(name, extras))
        cards = []
        if int(os.environ.get("RANK", "0")) == 0:
            cards = [write_card(run, repo_id=member_repo_id(extras["hub_id"], run) if extras["hub_id"] else None)
                     for run in family_members(cfg.out)]
        return members, cfg, cards
    metrics = prune(cfg, command=command, recipe=recipe_record(name, extras))
    card = Path(cfg.out) / "README.md"
    if int(os.environ.get("RANK", "0")) == 0:
        card = write_card(cfg.out, repo_id=extras["hub_id"])
    return metrics, cfg, card
