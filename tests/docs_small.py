#!/usr/bin/env python3
"""``pass-zoo`` as the docs test runs the examples: the command as written, with small settings.

``tests/test_docs.py`` puts a ``pass-zoo`` on PATH that runs this file. With ``PASS_ZOO_DOCS_SMALL=1``
(the test's default) the flags of ``SMALL`` are appended to the example's command line; argparse keeps
the last value of a repeated flag, so they override the sizes the example asks for and nothing else.
``IF_GIVEN`` shrinks a value only where the example sets that flag itself. Two commands take a
documented substitution instead of a size:

* ``bench`` gets ``--dry-run``: a grid is hours of CPU; the dry run reads and validates the spec and
  lists the cells it would run.
* ``zoo build`` / ``zoo list`` get ``--recipes-dir`` pointing at copies of ``recipes/*.yaml`` with the
  ``RECIPE_SMALL`` values, because ``zoo build`` takes its settings from the recipe alone.

Without ``PASS_ZOO_DOCS_SMALL=1`` the command runs exactly as written (full size).
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PRUNE_SMALL = ["--search-steps", "2", "--finetune-steps", "2", "--train-subset", "64", "--val-subset", "64",
               "--diagnostic-images", "64", "--flm-samples", "64", "--batch-size", "16", "--img-size", "32"]
SMALL = {
    "prune": PRUNE_SMALL,
    "transfer": ["--search-steps", "2", "--finetune-steps", "2", "--train-subset", "64", "--val-subset", "64"],
    "costs": ["--steps", "1", "--warmup", "0", "--img-size", "32", "--batch", "4"],
    "latency": ["--batch", "1", "--repeats", "2", "--warmup", "1"],
    "eval": ["--val-subset", "64"],
    "bench": ["--dry-run"],
}
# flags shrunk only where the example gives them (appending them everywhere would change the example)
IF_GIVEN = {
    "prune": {"--holdout": "16", "--finetune-epochs": "1", "--latency-batch": "1"},
}
RECIPE_SMALL = {"img_size": 32, "train_subset": 64, "val_subset": 64, "diagnostic_images": 64,
                "flm_samples": 64, "batch_size": 16, "search": {"steps": 2}, "finetune": {"steps": 2}}


def small_recipes() -> str:
    """Copies of the checkout's recipes with the small settings; their folder."""
    import yaml

    folder = Path(os.environ.get("PASS_ZOO_DOCS_RECIPES") or tempfile.mkdtemp(prefix="pass-zoo-recipes-"))
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted((ROOT / "recipes").glob("*.yaml")):
        values = yaml.safe_load(src.read_text()) or {}
        for key, value in RECIPE_SMALL.items():
            if isinstance(value, dict):
                values[key] = {**(values.get(key) or {}), **value}
            else:
                values[key] = value
        (folder / src.name).write_text(yaml.safe_dump(values, sort_keys=False))
    return str(folder)


def small_args(args: list) -> list:
    """``args`` (the words after ``pass-zoo``) with the small settings appended."""
    if not args or os.environ.get("PASS_ZOO_DOCS_SMALL") != "1" or "-h" in args or "--help" in args:
        return list(args)
    command = args[0]
    extra = list(SMALL.get(command, []))
    for flag, value in IF_GIVEN.get(command, {}).items():
        if flag in args:
            extra += [flag, value]
    if command == "zoo" and len(args) > 1 and args[1] in ("build", "list"):
        extra += ["--recipes-dir", small_recipes()]
    return list(args) + extra


def main() -> None:
    sys.argv = ["pass-zoo", *small_args(sys.argv[1:])]
    from pass_zoo.cli import main as cli_main

    sys.exit(cli_main())


if __name__ == "__main__":
    main()
