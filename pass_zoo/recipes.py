"""Recipes: one YAML file per zoo entry, holding the ``PruneConfig`` that produces it.

Schema (every key optional except what the entry needs to differ from the defaults)::

    name: lite0-fmnist-pass50      # published name; may be a pattern, default "{arch}-pass{percent}"
    hub_id: ORG/lite0-fmnist-pass50  # where `pass-zoo publish` should put it (optional)
    model: tf_efficientnet_lite0   # any PruneConfig field (see config.py), same names as the
    pretrained: bundled            #   dataclass, same meaning as the CLI flags
    dataset: fashion-mnist
    target_macs: 0.5               # a list (0.5, 0.25, 0.1): a family from one search, a run per budget (also target_params, target_latency)
    img_size: 64
    search:                        # SearchConfig fields (config.py)
      steps: 150
    finetune:                      # FinetuneConfig fields (config.py)
      steps: 150

Name patterns can use ``{arch}`` (the timm model name), ``{percent}`` (the budget in percent: MACs,
or the weights kept for VPNs) and ``{dataset}`` (the dataset kind, e.g. ``fashion-mnist``). ``out`` and ``overwrite`` are choices of
the command that runs a recipe, not of the recipe, so they are refused here. Unknown keys and
values of the wrong type are refused with the key's name: a typo must not silently fall back to a
default and produce a different model than the file describes.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .config import PruneConfig, apply_overrides
from .errors import PassZooError
from .validate import check_repo_id, load_yaml

DEFAULT_NAME = "{arch}-pass{percent}"
EXTRA_KEYS = ("name", "hub_id")
FAMILY_KEYS = ("target_macs", "target_params", "target_latency")  # a list of budgets there is a family
_COMMAND_KEYS = ("out", "overwrite")  # decided by the command that runs the recipe
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a Hub repo name and a folder name


class RecipeError(PassZooError):
    """A recipe file is missing, malformed, or names an unknown setting."""


def recipe_config(values: Dict[str, Any], source="recipe") -> PruneConfig:
    """A ``PruneConfig`` from a recipe mapping (without ``name``/``hub_id``)."""
    bad = [k for k in values if k in _COMMAND_KEYS]
    if bad:
        raise RecipeError(f"{source}: '{bad[0]}' is not a recipe setting; it is chosen by the command "
                          f"that runs the recipe (--{bad[0]})")
    cfg = apply_overrides(PruneConfig(), values, str(source), noun="recipe key", error=RecipeError)
    try:
        cfg.validate()
    except PassZooError as exc:
        raise RecipeError(f"{source}: {exc}") from exc
    return cfg


def recipe_name(pattern: Optional[str], cfg: PruneConfig, source="recipe") -> str:
    """The published name: ``pattern`` with ``{arch}``, ``{percent}``, ``{dataset}`` filled in."""
    try:
        kind = cfg.budget_kind()
        percent = f"{cfg.target_latency:g}ms" if kind == "latency" else round(cfg.budget_target() * 100)
        name = (pattern or DEFAULT_NAME).format(arch=cfg.model, percent=percent,
                                                dataset=cfg.dataset.split(":")[0])
    except (KeyError, IndexError, ValueError) as exc:
        raise RecipeError(f"{source}: name pattern '{pattern}' can use only {{arch}}, {{percent}} and "
                          f"{{dataset}} ({exc})") from exc
    if not _NAME_RE.match(name) or len(name) > 96:
        raise RecipeError(f"{source}: name '{name}' is not a valid Hub repo / folder name "
                          "(letters, digits, '.', '_', '-'; at most 96 characters)")
    return name


def load_recipe(path) -> Tuple[str, PruneConfig, dict]:
    """``(name, PruneConfig, extras)`` from a recipe file; extras: ``hub_id``, ``path``, ``values``."""
    path = Path(path)
    values = load_yaml(path, "recipe", RecipeError)  # bounded: an alias bomb is refused, not expanded
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"recipe {path} must be a YAML mapping of settings, got {type(values).__name__}")
    name, hub_id = values.get("name"), values.get("hub_id")
    for key, val in (("name", name), ("hub_id", hub_id)):
        if val is not None and not isinstance(val, str):
            raise RecipeError(f"{path}: '{key}' must be a string, got {val!r}")
    if hub_id is not None:
        check_repo_id(hub_id, f"{path}: hub_id", RecipeError)
    settings = {k: v for k, v in values.items() if k not in EXTRA_KEYS}
    family = None
    for key in FAMILY_KEYS:  # a list of budgets: a family from one search (pass_zoo/family.py)
        if isinstance(settings.get(key), list):
            family = settings[key]
            if not family or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in family):
                raise RecipeError(f"{path}: '{key}' must be a number or a list of numbers, got {family!r}")
            settings[key] = family[0]
    cfg = recipe_config(settings, path)
    extras = {"hub_id": hub_id, "path": str(path), "values": values, "family": family}
    return recipe_name(name, cfg, path), cfg, extras


def recipe_record(name: str, extras: dict) -> dict:
    """What metrics.json records about the recipe a run came from (the card shows it)."""
    return {"path": extras["path"], "name": name, "hub_id": extras["hub_id"], "values": extras["values"]}


def default_recipes_dir() -> Path:
    """``recipes/`` of this checkout (or of the installed package), else ``./recipes``."""
    here = Path(__file__).resolve().parent
    for folder in (here.parent / "recipes", here / "zoo_recipes"):
        if folder.is_dir():
            return folder
    return Path("recipes")


def list_recipes(recipes_dir=None) -> List[Tuple[str, PruneConfig, dict]]:
    """Every ``*.yaml`` recipe in ``recipes_dir``, sorted by name; names must be unique."""
    folder = Path(recipes_dir) if recipes_dir is not None else default_recipes_dir()
    if not folder.is_dir():
        raise RecipeError(f"recipes folder {folder} does not exist")
    entries, seen = [], {}
    for path in sorted(folder.glob("*.yaml")):
        name, cfg, extras = load_recipe(path)
        if name in seen:
            raise RecipeError(f"recipes {seen[name]} and {path} both define the name '{name}'")
        seen[name] = path
        entries.append((name, cfg, extras))
    return sorted(entries, key=lambda e: e[0])


def find_recipe(name: str, recipes_dir=None) -> Tuple[str, PruneConfig, dict]:
    entries = list_recipes(recipes_dir)
    for entry in entries:
        if entry[0] == name:
            return entry
    known = ", ".join(e[0] for e in entries) or "none"
    raise RecipeError(f"no zoo entry named '{name}' (known: {known})")
