"""Run integrity: the numbers in ``metrics.json`` hold only for the files they were measured on.

* Pins -- a finished run's ``metrics.json`` records the sha256 of every file its numbers depend on
  (``file_sha256``: config.json, the weights, the masks, the method's files, model.onnx and
  export.json). ``eval``, ``export``, ``latency``, ``transfer``, ``card`` and ``publish`` verify them
  first: an edited config.json (say, another activation) would otherwise be evaluated, carded and
  published next to a top-1 it never had. ``export`` re-pins the files it rewrites.
* Input fingerprints -- a run's checkpoints record what it read (the dataset's file listing, the
  weights file's digest, the source run of a transfer), and ``--resume`` refuses when they changed.

Runs written before pins existed have no ``file_sha256`` and are read as before.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Optional

from .errors import PassZooError
from .validate import FASHION_MNIST_DIR, check_name, dataset_folder, weights_file

PINS = "file_sha256"  # the metrics.json key
# What a run's numbers depend on (the method's files are added by name); metrics.json itself is the record.
PINNED = ("config.json", "model.safetensors", "masks.safetensors", "masks.json", "model.onnx", "export.json")
REQUIRED = ("config.json", "model.safetensors", "masks.safetensors")
ONNX_FILES = ("model.onnx", "export.json")


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pin_files(run_dir, extra: Iterable[str] = ()) -> Dict[str, str]:
    """``{file name: sha256}`` of the pinned files present in ``run_dir``."""
    run_dir = Path(run_dir)
    return {name: sha256_file(run_dir / name) for name in (*PINNED, *extra) if (run_dir / name).is_file()}


def repin_onnx(run_dir, metrics: dict) -> None:
    """After ``export`` rewrote (or removed) model.onnx and export.json: their pins follow, the rest stay."""
    pins = metrics.get(PINS)
    if not isinstance(pins, dict):
        return  # a run from before pins: nothing to keep in step
    for name in ONNX_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            pins[name] = sha256_file(path)
        else:
            pins.pop(name, None)


def _read_metrics(run_dir: Path) -> Optional[dict]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise PassZooError(f"cannot read {path}: {exc}") from exc
    if not isinstance(metrics, dict):
        raise PassZooError(f"{path} is not a JSON object")
    return metrics


def verify_run_files(run_dir, names: Optional[Iterable[str]] = None, ignore: Iterable[str] = ()) -> None:
    """Every file ``metrics.json`` pins (of ``names``, when given; but ``ignore``) is there and unchanged;
    one line naming the first that is not. A folder without metrics.json (not a finished run) or without
    pins (an older run) passes."""

    run_dir = Path(str(run_dir).removeprefix("local-dir:"))
    metrics = _read_metrics(run_dir)
    if metrics is None or PINS not in metrics:
        return
    pins = metrics[PINS]
    if not isinstance(pins, dict) or any(name not in pins for name in REQUIRED) \
            or not all(isinstance(v, str) for v in pins.values()):
        raise PassZooError(f"{run_dir / 'metrics.json'}: '{PINS}' is not the record of the run's files "
                           f"(it must give the sha256 of {', '.join(REQUIRED)})")
    for name, digest in pins.items():
        if (names is not None and name not in names) or name in ignore:
            continue
        path = run_dir / check_name(name, f"{run_dir / 'metrics.json'}: pinned file")
        if not path.is_file():
            raise PassZooError(f"{path} is missing: the run's numbers were measured on it (metrics.json pins it)")
        if sha256_file(path) != digest:
            raise PassZooError(f"{path} is not the file the run wrote (its sha256 differs from metrics.json's "
                               f"'{PINS}'), so the run's numbers do not describe it; restore it or run again")


def run_folder_of(target: str) -> Optional[Path]:
    """The local run folder behind an ``eval``/``latency`` target (folder, ``local-dir:``, an .onnx in
    a run folder), or None for the Hub."""
    name = str(target)
    if name.startswith("hf-hub:"):
        return None
    path = Path(name.removeprefix("local-dir:"))
    folder = path.parent if path.suffix == ".onnx" else path
    return folder if folder.is_dir() else None


def verify_target(target) -> None:
    folder = run_folder_of(target)
    if folder is not None:
        verify_run_files(folder)


# ------------------------------------------------------------------ input fingerprints (for --resume)
def _listing(root: str, limit: int = 2_000_000) -> Optional[dict]:
    """Class folders and a digest of every file's relative path and size under ``root`` (links are
    listed, not followed: the data loader refuses loops later, this walk must never run into one)."""
    if not root or not os.path.isdir(root):
        return None
    h, count, classes = hashlib.sha256(), 0, {}
    for split in sorted(os.listdir(root)):
        if os.path.isdir(os.path.join(root, split)) and not split.startswith("."):
            classes[split] = sorted(d for d in os.listdir(os.path.join(root, split))
                                    if os.path.isdir(os.path.join(root, split, d)))[:100]
    for here, dirs, files in os.walk(root, followlinks=False):
        dirs.sort()
        for name in sorted(files) + sorted(d for d in dirs if os.path.islink(os.path.join(here, d))):
            path = os.path.join(here, name)
            rel = os.path.relpath(path, root)
            try:
                size = os.readlink(path) if os.path.islink(path) else os.path.getsize(path)
            except OSError:
                size = "?"
            h.update(f"{rel}\t{size}\n".encode("utf-8", "surrogateescape"))
            count += 1
            if count >= limit:
                break
    return {"classes": classes, "files": count, "listing": h.hexdigest()}


def _source_run(folder: Optional[str]) -> Optional[str]:
    """A transfer source: its masks, its method's files and its configuration."""
    if not folder or not os.path.isdir(folder):
        return None
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".json")) and name not in ("model.safetensors", "export.json") \
                and not name.startswith("."):
            path = os.path.join(folder, name)
            if name == "metrics.json":
                try:
                    data = json.dumps(json.loads(Path(path).read_text()).get("config"), sort_keys=True).encode()
                except (OSError, ValueError, AttributeError):
                    data = b"?"
            else:
                data = sha256_file(path).encode() if os.path.isfile(path) else b"?"
            h.update(name.encode() + b"\t" + data + b"\n")
    return h.hexdigest()


def fingerprint(cfg) -> dict:
    """What the run reads from disk, as a resume must find it again."""

    folder = dataset_folder(cfg.dataset)
    if cfg.dataset.partition("@")[0].partition(":")[0] == "fashion-mnist" and not folder:
        folder = os.environ.get("PASS_ZOO_FASHION_MNIST", FASHION_MNIST_DIR)
    if cfg.dataset.startswith(("torch/", "hfds/")):
        folder = None  # a shared download cache: its other datasets are not this run's input
    weights = weights_file(cfg.pretrained)
    return {"dataset": _listing(folder) if folder else None,
            "pretrained": sha256_file(weights) if weights and os.path.isfile(weights) else None,
            "transfer_from": _source_run(cfg.transfer_from)}
