"""What a run folder says about itself (``metrics.json``), read without loading any model."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..errors import PassZooError

RUN = "run"  # "take this setting from the run's metrics.json"


def _metrics_path(target: str) -> Optional[Path]:
    """Where the run's metrics.json is, if it can be found without the network."""
    name = str(target)
    if name.startswith("hf-hub:"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        repo, _, rev = name[len("hf-hub:"):].partition("@")
        found = try_to_load_from_cache(repo, "metrics.json", revision=rev or None)
        return Path(found) if isinstance(found, str) else None
    path = Path(name.removeprefix("local-dir:"))
    folder = path.parent if path.suffix == ".onnx" else path
    return folder / "metrics.json" if (folder / "metrics.json").is_file() else None


def run_eval_defaults(target) -> dict:
    """What the run evaluated on: ``dataset``, ``val_subset``, ``seed``, ``batch_size``, ``top1`` (as known)."""
    path = _metrics_path(str(target))
    if path is None:
        return {}
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PassZooError(f"cannot read {path}: {exc}") from exc
    cfg = metrics.get("config") or {}
    out = {"dataset": metrics.get("dataset", cfg.get("dataset")), "val_subset": cfg.get("val_subset"),
           "seed": metrics.get("seed", cfg.get("seed", 0)), "top1": metrics.get("top1")}
    if cfg.get("batch_size"):
        out["batch_size"] = 2 * int(cfg["batch_size"])  # prune evaluates with twice the training batch
    return out
