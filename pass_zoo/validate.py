"""Input that becomes a path, a line of code or a large object, checked before anything uses it.

* names -- bench cells and variants, recipe names, Hub repo ids and revisions end up as folder names,
  URL paths or inside the code snippets of a model card: one conservative alphabet, no separators;
* paths -- an output (``--out``, ``--json``, ``--md``) may not be, contain or lie inside an input of
  the same command (a source run, a weights file, a dataset folder), and may not replace a file a
  run folder depends on;
* YAML -- recipes and bench specs are bounded in bytes and in what their aliases expand to.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Dict, Iterable, Optional

from .errors import PassZooError, one_line
from .fileio import LOCK_FILE, RUN_MARKER, is_run_dir
from .method_registry import get_method, list_methods

# Where Debian's dataset-fashion-mnist puts its files (PASS_ZOO_FASHION_MNIST overrides it)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a folder name and a Hub repo name
MAX_NAME = 96
MAX_SEED = 2 ** 31 - 1  # numpy takes < 2**32 and runs add small offsets to the seed
MAX_YAML_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # values after alias expansion; the largest recipe or spec here has < 200


# ------------------------------------------------------------------ names
def check_name(value, what: str, error=PassZooError) -> str:
    """A name used as a single folder or file name: letters, digits, '.', '_', '-' (no separator, no '..')."""
    if not isinstance(value, str) or not NAME_RE.match(value) or len(value) > MAX_NAME or ".." in value:
        raise error(f"{what} {value!r} is not a valid name (letters, digits, '.', '_', '-'; it starts with a "
                    f"letter or digit, has no '..' and at most {MAX_NAME} characters)")
    return value


def check_repo_id(value, what: str = "--repo-id", error=PassZooError) -> str:
    """``ORG/NAME`` as the Hub accepts it; it is written into URLs and the card's Python snippets."""
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) != 2:
        raise error(f"{what} must be ORG/NAME (a user or organisation and a name), got {value!r}")
    for part in parts:
        check_name(part, f"{what} {value!r}: part", error)
        if part.endswith((".", "-")) or "--" in part:
            raise error(f"{what} {value!r}: '{part}' may not end with '.' or '-' or contain '--'")
    return value


_REF_BAD = re.compile(r"(\.\.|//|@\{|\.lock$|\.$|/$|^/|/\.)")


def check_revision(value, what: str = "--revision", error=PassZooError) -> str:
    """A branch name (git's rules, narrowed): it becomes part of the Hub's URL paths."""
    if not isinstance(value, str) or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/-]*$", value) \
            or _REF_BAD.search(value) or len(value) > 128:
        raise error(f"{what} {value!r} is not a valid branch name (letters, digits, '.', '_', '-', '/' between "
                    "parts; no '..', no leading or trailing '/' or '.')")
    return value


def check_seed(value, what: str = "--seed") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise PassZooError(f"{what} must be a whole number in [0, {MAX_SEED}], got {value!r}")
    return value


def check_rate(value, what: str, positive: bool = False) -> float:
    """A learning rate, weight decay or momentum: a finite number >= 0 (> 0 with ``positive``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and (value > 0 if positive else value >= 0)
    if not ok:
        raise PassZooError(f"{what} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


# ------------------------------------------------------------------ paths
def real(path) -> str:
    """The absolute path with every link resolved (also for a path that does not exist yet)."""
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(path))))


def within(child: str, parent: str) -> bool:
    """``child`` is ``parent`` or lies inside it (both ``real``)."""
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_out_vs_inputs(out, inputs: Dict[str, Optional[str]], flag: str = "--out") -> None:
    """``out`` may neither be, contain, nor lie inside any input: ``--overwrite`` would delete the input
    before it is read, and a run written into a dataset folder changes the dataset."""
    where = real(out)
    for what, path in inputs.items():
        if not path:
            continue
        src = real(path)
        if within(src, where):
            relation = "is" if src == where else "contains"
            raise PassZooError(f"{flag} {out} {relation} the input {what}; choose an {flag} outside every input")
        if within(where, src):
            raise PassZooError(f"{flag} {out} lies inside the input {what}; choose an {flag} outside every input")


def dataset_folder(dataset: str) -> Optional[str]:
    """The local folder a dataset name reads (``imagefolder:``, ``hf-disk:``, ``fashion-mnist:DIR``,
    ``torch/NAME:ROOT``), or None."""
    source = (dataset or "").partition("@")[0]
    kind, _, arg = source.partition(":")
    if kind in ("imagefolder", "hf-disk", "fashion-mnist") or kind.startswith(("torch/", "hfds/")):
        return arg or None
    return None


def weights_file(pretrained: str) -> Optional[str]:
    if pretrained and Path(pretrained).suffix in (".safetensors", ".pth", ".pt", ".bin"):
        return pretrained
    return None


def run_inputs(cfg) -> Dict[str, Optional[str]]:
    """What a prune run reads from disk, by how the user named it."""
    model = cfg.model[len("local-dir:"):] if cfg.model.startswith("local-dir:") else None
    return {f"--dataset {cfg.dataset}": dataset_folder(cfg.dataset),
            f"--pretrained {cfg.pretrained}": weights_file(cfg.pretrained),
            f"--model {cfg.model}": model,
            f"transfer source {cfg.transfer_from}": cfg.transfer_from}


def run_file_names() -> set:
    """Every file name a run folder holds for itself (what an output may never replace)."""

    names = {"config.json", "model.safetensors", "metrics.json", "masks.json", "masks.safetensors", "model.onnx",
             "export.json", "README.md", "kept_channels.png", "hub.json", "error.log", LOCK_FILE, RUN_MARKER}
    for method in list_methods():
        names.update(get_method(method).artefacts)
    return names


def check_output_file(path, flag: str, inputs: Iterable = (), allowed: Iterable[str] = ()) -> str:
    """An output file that replaces nothing it should not: not an input (or inside an input folder), not
    an existing folder, and not one of a run folder's own files (``allowed``: names this command may
    write into a run, e.g. ``latency.json``)."""

    where = real(path)
    if os.path.isdir(where):
        raise PassZooError(f"{flag} {path} is a folder; name a file")
    for src in inputs:
        if src and within(where, real(src)) and not (os.path.isdir(real(src)) and is_run_dir(real(src))):
            raise PassZooError(f"{flag} {path} would overwrite the input {src}; choose another file")
    parent, name = os.path.split(where)
    if name not in allowed and name in run_file_names() and is_run_dir(parent):
        raise PassZooError(f"{flag} {path} would replace {name} of the run folder {os.path.dirname(str(path)) or '.'}, "
                           "which the run depends on; choose another file")
    return str(path)


# ------------------------------------------------------------------ YAML
def load_yaml(path, what: str, error=PassZooError):
    """``yaml.safe_load`` of a small file whose aliases expand to at most ``MAX_YAML_NODES`` values (an
    alias bomb is a few hundred bytes that expand to billions of values in whatever walks them)."""
    import yaml

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_YAML_BYTES:
            raise error(f"{what} {path} is {size} bytes; at most {MAX_YAML_BYTES} are read")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:

        raise error(f"{what} {path} is not valid YAML ({one_line(exc)})") from exc
    except RecursionError:
        raise error(f"{what} {path} nests too deeply") from None
    check_expansion(value, f"{what} {path}", error)
    return value


def check_expansion(value, what: str, error=PassZooError, limit: int = MAX_YAML_NODES) -> None:
    """Count the values of ``value`` as a walk over it sees them (shared and recursive parts counted
    every time they are reached) and stop at ``limit``."""
    stack, seen = [value], 0
    while stack:
        item = stack.pop()
        seen += 1
        if seen > limit:
            raise error(f"{what} expands to more than {limit} values (YAML aliases repeat what they point to); "
                        "write the values out or remove the aliases")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
