"""Transfer (paper Table 2): reuse what PASS learned on task A for task B.

* ``masks``    -- A's masks, slimmed and fine-tuned on B.
* ``hypernet`` -- A's hypernetwork, frozen, reads a prompt learned from scratch on B; the masks it
  proposes for that prompt are B's masks (no hypernetwork tuning).

Both are ordinary ``prune`` runs of B whose configuration starts from A's saved one.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import PruneConfig, apply_overrides
from ..errors import PassZooError
from ..methods import get_method, list_methods


def transfer_config(source_run, mode: str, **overrides) -> PruneConfig:
    """A's configuration with B's dataset (and other ``overrides``), set up to transfer ``mode``."""
    source_run = Path(source_run)
    metrics_path = source_run / "metrics.json"
    if not metrics_path.is_file():
        raise PassZooError(f"{source_run} is not a finished prune run (no metrics.json)")
    saved = json.loads(metrics_path.read_text()).get("config") or {}
    for key in ("out", "overwrite", "transfer_from", "transfer_mode"):
        saved.pop(key, None)
    cfg = apply_overrides(PruneConfig(), saved, f"{metrics_path} config")
    if mode == "hypernet" and not get_method(cfg.method).transferable:
        learned = ", ".join(m for m in list_methods() if get_method(m).transferable)
        raise PassZooError(f"{source_run} was pruned with '{cfg.method}': it has no hypernetwork to transfer "
                           f"(runs of {learned} have one)")
    cfg = apply_overrides(cfg, {k: v for k, v in overrides.items() if v is not None}, "transfer")
    cfg.transfer_from, cfg.transfer_mode = str(source_run), mode
    return cfg
