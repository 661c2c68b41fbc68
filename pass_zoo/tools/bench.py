"""``pass-zoo bench``: a grid of prune runs (methods x budget levels x seeds) from one YAML spec.

Every cell is an ordinary ``prune`` run folder under ``OUT/cells/``; ``results.json`` collects one
record per finished cell and is rewritten atomically after each, so an interrupted grid resumes
where it stopped (a cell with a ``metrics.json`` is not run again while the configuration it recorded
is the one the spec resolves to; otherwise it runs again). Plots are redrawn from ``results.json`` alone.

Spec::

    name: b1_lite0_fmnist
    base:                       # PruneConfig fields (nested search:/finetune: sections)
      model: tf_efficientnet_lite0
      pretrained: bundled
      dataset: fashion-mnist
      img_size: 64
    grid:
      method: [pass, taylor, random]
      target_macs: [0.5, 0.25, 0.1]
      seed: [0, 1, 2]
    variants:                   # optional: named PASS variants (ablations), each a method label
      mlp: {method: pass, search: {core: mlp}}
    dense: true                 # also fine-tune the unpruned network (the ceiling), once per seed

Each method runs at the levels of its own budget: ``target_macs`` for channel-mask methods (cells
``LABEL-tLEVEL-sSEED``), ``target_density`` for weight-mask methods (VPNs, magnitude,
random-weights: cells ``LABEL-dLEVEL-sSEED``). Records and summary rows carry ``budget`` (macs or
density) and ``level``; tables have one column per (budget, level).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional

from ..config import DEFAULT_TARGET_MACS, PruneConfig, apply_overrides
from ..errors import PassZooError, one_line
from ..fileio import atomic_write_json, atomic_write_text
from ..methods import get_method, list_methods
from .. import pipeline  # called as pipeline.prune: a test or a caller may substitute it
from ..validate import check_name, check_seed, load_yaml
from ..train.checkpoint import config_diffs

_RECORD_KEYS = ("method", "target_macs", "macs_dense", "macs_slim", "macs_ratio", "params_dense", "params_slim",
                "top1", "top1_after_search", "top1_dense_zero_shot", "search_seconds", "finetune_seconds",
                "total_seconds", "seed", "command", "finetune_steps", "compute")
# ... and for weight-mask runs
_WEIGHT_KEYS = ("target_density", "density", "weights_nonzero", "model_bytes", "model_zip_bytes", "model_csr_bytes")


def load_spec(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PassZooError(f"benchmark spec {path} does not exist")
    spec = load_yaml(path, "benchmark spec")  # bounded: an alias bomb is refused, not expanded
    if not isinstance(spec, dict) or "grid" not in spec:
        raise PassZooError(f"{path}: a benchmark spec needs a 'grid' mapping")
    unknown = sorted(set(spec) - {"name", "base", "grid", "variants", "dense", "description"})
    if unknown:
        raise PassZooError(f"{path}: unknown top-level keys {unknown}")
    return spec


def plan_cells(spec: dict) -> List[Dict]:
    """Every cell of the grid: ``{"id", "label", "budget", "level", "target_macs", "seed", "config"}``
    (``target_macs`` None for a density cell)."""

    _check_grid(spec)
    base = apply_overrides(PruneConfig(), spec.get("base") or {}, "base")
    base_density, base.target_density = base.density, None  # each cell sets the budget its method takes
    grid = spec["grid"]
    labels = list(grid.get("method", [base.method]))
    variants = spec.get("variants") or {}
    labels += [v for v in variants if v not in labels]
    levels = {"macs": list(grid.get("target_macs", [DEFAULT_TARGET_MACS if base.target_macs is None
                                                    else base.target_macs])),
              "density": list(grid.get("target_density", [base_density]))}
    seeds = grid.get("seed", [base.seed])
    # seed: [0, 1, 2] for every level, or {level: [seeds]} (more seeds where methods are close)
    seeds_of = {float(t): list(seeds.get(t, seeds.get(str(t), []))) if isinstance(seeds, dict) else list(seeds)
                for t in levels["macs"] + levels["density"]}
    seeds = sorted({s for ss in seeds_of.values() for s in ss})
    cells = []
    for label in labels:
        cfg0 = apply_overrides(base, dict(variants.get(label, {"method": label})), f"variant '{label}'")
        budget = get_method(cfg0.method).budget
        letter = "d" if budget == "density" else "t"
        for target in levels[budget]:
            for seed in seeds_of[float(target)]:
                cfg = apply_overrides(cfg0, {}, f"variant '{label}'")
                if budget == "density":  # the only budget a weight-mask method takes
                    cfg.clear_budget()
                    cfg.target_density = float(target)
                else:
                    cfg.target_macs = float(target)
                cfg.seed = int(seed)
                cells.append({"id": f"{label}-{letter}{target:g}-s{seed}", "label": label, "budget": budget,
                              "level": float(target), "target_macs": float(target) if budget == "macs" else None,
                              "seed": int(seed), "config": cfg})
    if spec.get("dense"):
        for seed in seeds:
            cfg = apply_overrides(base, {"method": "random"}, "dense")  # at 1.0 every method keeps everything
            cfg.clear_budget()  # dense whatever the base's budget kind
            cfg.target_macs, cfg.seed = 1.0, int(seed)
            if cfg.search.probe == "dense":  # the older rule (B2): the ceiling skips stage 1
                cfg.search = dataclasses.replace(cfg.search, steps=0)
            # otherwise it gets every method's stage 1: head and prompt learn for search.steps batches
            cells.append({"id": f"dense-s{seed}", "label": "dense", "budget": "macs", "level": 1.0, "target_macs": 1.0,
                          "seed": int(seed), "config": cfg})
    for cell in cells:  # a cell id is a folder name under OUT/cells
        check_name(cell["id"], "cell")
    return cells


MAX_CELLS = 10_000


def _check_grid(spec: dict) -> None:
    """Labels, levels and seeds become cell folder names: names, numbers in (0, 1] and seeds only."""
    grid, variants = spec["grid"], spec.get("variants") or {}
    if not isinstance(grid, dict) or not isinstance(variants, dict):
        raise PassZooError("a benchmark spec's 'grid' and 'variants' must be mappings")
    for key in ("method", "target_macs", "target_density"):
        if key in grid and not isinstance(grid[key], list):
            raise PassZooError(f"grid: '{key}' must be a list, got {grid[key]!r}")
    for label in list(grid.get("method", [])) + list(variants):
        check_name(label, "method or variant label")
    for key in ("target_macs", "target_density"):
        for level in grid.get(key, []):
            if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level <= 1:
                raise PassZooError(f"grid: {key} levels must be numbers in (0, 1], got {level!r}")
    seeds = grid.get("seed", [])
    lists = list(seeds.values()) if isinstance(seeds, dict) else [seeds]
    if not all(isinstance(ss, list) for ss in lists):
        raise PassZooError(f"grid: 'seed' must be a list, or a mapping of levels to lists, got {seeds!r}")
    seeds = [s for ss in lists for s in ss]
    for seed in seeds:
        check_seed(seed, "grid: seed")
    labels = len(grid.get("method", [])) + len(variants) or 1
    levels = max(len(grid.get("target_macs", [])), len(grid.get("target_density", [])), 1)
    if labels * levels * max(1, len(seeds)) > MAX_CELLS:  # counted before the cells are made
        raise PassZooError(f"the grid has up to {labels * levels * max(1, len(seeds))} cells; at most {MAX_CELLS} "
                           "are run from one spec")


def run_bench(spec_path, out, only: List[str] = (), dry_run: bool = False, jobs: int = 1,
              threads: int = 0, log=print, rerun: List[str] = ()) -> dict:
    """Run (or resume) every cell; returns the results document.

    ``rerun``: finished cells whose id starts with one of these are forgotten first (their record and
    folder), so they run again, say after a change to the code they ran; an interrupted rerun resumes
    without it, like any other grid.

    ``jobs`` > 1 runs that many cells at once, each in its own process with ``threads`` torch threads
    (default: the CPU's cores shared out). On a small CPU two one-thread runs finish more cells per
    hour than one two-thread run, whose small convolutions barely use the second core. This process
    stays the only writer of results.json; separate bench processes on the same OUT (say, with
    disjoint ``--only``) merge their records under a file lock.
    """
    spec = load_spec(spec_path)
    out = Path(out)
    cells = plan_cells(spec)
    if only:
        cells = [c for c in cells if any(c["id"].startswith(o) for o in only)]
    results_path = out / "results.json"
    doc = {"name": spec.get("name", Path(spec_path).stem), "spec": str(spec_path), "runs": []}
    if results_path.is_file():
        doc = json.loads(results_path.read_text())
    again = [c["id"] for c in cells if any(c["id"].startswith(r) for r in rerun)]
    if rerun and not again:
        raise PassZooError(f"--rerun {' '.join(rerun)} matches no cell of {spec_path}")
    if again and not dry_run and out.is_dir():
        with _locked(out):
            if results_path.is_file():
                doc = json.loads(results_path.read_text())
            doc["runs"] = [r for r in doc["runs"] if r["id"] not in again]
            for cell_id in again:
                shutil.rmtree(out / "cells" / cell_id, ignore_errors=True)
            if results_path.is_file():
                atomic_write_json(results_path, doc)
        log(f"{len(again)} cell(s) run again: their records and folders are forgotten")
    done = {r["id"] for r in doc["runs"]} - set(again)  # a dry run forgets nothing, yet lists them as to run

    def merge_from_disk():
        if results_path.is_file():
            ids = {r["id"] for r in doc["runs"]}
            doc["runs"].extend(r for r in json.loads(results_path.read_text())["runs"] if r["id"] not in ids)

    def collect(cell, metrics):
        record = {"id": cell["id"], "label": cell["label"], "run_dir": str((out / "cells" / cell["id"]).relative_to(out))}
        weights = metrics.get("mask_kind") == "weight"
        record.update({k: metrics.get(k) for k in _RECORD_KEYS + (_WEIGHT_KEYS if weights else ())
                       + _method_attr(metrics.get("method"), "metric_keys")})
        record.update(target_macs=cell["target_macs"], budget=cell["budget"], level=cell["level"])
        record["wall_seconds"] = metrics.get("wall_seconds", metrics.get("total_seconds"))
        with _locked(out):  # another bench process may be filling other cells of the same grid
            merge_from_disk()
            doc["runs"] = [r for r in doc["runs"] if r["id"] != cell["id"]] + [record]
            done.add(cell["id"])
            atomic_write_json(results_path, doc)

    todo = []
    for i, cell in enumerate(cells):
        metrics_path = out / "cells" / cell["id"] / "metrics.json"
        stale = cell_changes(cell, out)
        if stale:  # the spec now resolves to another run: its record and folder are replaced
            log(f"{cell['id']}: its settings changed ({stale}); it runs again")
            done.discard(cell["id"])
            doc["runs"] = [r for r in doc["runs"] if r["id"] != cell["id"]]
        if cell["id"] in done:
            continue
        if metrics_path.is_file() and not stale and cell["id"] not in again:  # finished, not yet collected
            collect(cell, json.loads(metrics_path.read_text()))
        elif dry_run:
            log(f"[{i + 1}/{len(cells)}] would run {cell['id']}")
        else:
            cfg = cell["config"]
            cfg.out, cfg.overwrite = str(out / "cells" / cell["id"]), True
            todo.append((i, cell, f"pass-zoo bench {spec_path} --out {out} --only {cell['id']}"))

    failed: List[str] = []
    # Seed by seed: a grid stopped part-way has every method at the same number of seeds.
    todo.sort(key=lambda t: t[1]["seed"])
    if todo and jobs <= 1:
        if threads:
            _init_worker(threads)
        for i, cell, command in todo:
            log(f"[{i + 1}/{len(cells)}] {cell['id']}")
            try:
                collect(cell, _run_cell(cell["config"], command))
            except Exception as exc:  # the other cells still run; the grid reports it at the end
                failed.append(cell["id"])
                log(f"failed {cell['id']}: {_failure(exc)}")
    elif todo:
        threads = threads or max(1, (os.cpu_count() or 1) // jobs)
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter per worker: no shared torch state
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
            futures = {}
            for i, cell, command in todo:
                log(f"[{i + 1}/{len(cells)}] {cell['id']} (queued on {jobs} workers x {threads} threads)")
                futures[pool.submit(_run_cell, cell["config"], command)] = cell
            for future in as_completed(futures):
                cell = futures[future]
                try:
                    collect(cell, future.result())
                except Exception as exc:  # the other cells still run and are collected as they finish
                    failed.append(cell["id"])
                    log(f"failed {cell['id']}: {_failure(exc)}")
                    continue
                log(f"finished {cell['id']}: top-1 {100 * doc['runs'][-1]['top1']:.2f} %")
    if not dry_run:  # pick up cells other processes finished meanwhile
        with _locked(out):
            merge_from_disk()
    doc["summary"] = summarise(doc["runs"])
    if not dry_run:
        with _locked(out):
            atomic_write_json(results_path, doc)
        if doc["runs"]:
            plot_results(doc, out)
            atomic_write_text(out / "results.md", report(doc))
    if failed:
        raise PassZooError(f"{len(failed)} cell(s) failed ({', '.join(failed[:4])}{', ...' if len(failed) > 4 else ''}); "
                           "the others are in results.json, and a rerun retries only what is missing")
    return doc


def resolved_config(cfg: PruneConfig) -> dict:
    """What a cell's run records as its ``config`` (defaults filled in by ``validate``)."""
    cfg = apply_overrides(cfg, {}, "cell")
    cfg.validate()
    return dataclasses.asdict(cfg)


def cell_changes(cell: dict, out: Path) -> str:
    """How a finished cell's run differs from what the spec now asks for ('' when it matches or has
    not run): a finished cell is reused only when its whole resolved configuration is the same."""

    path = out / "cells" / cell["id"] / "metrics.json"
    if not path.is_file():
        return ""
    try:
        saved = json.loads(path.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        saved = None
    if not isinstance(saved, dict):
        return "its metrics.json records no settings"
    try:
        now = resolved_config(cell["config"])
    except PassZooError as exc:  # the cell runs again and fails on its own; the others still run
        return f"its settings no longer validate: {one_line(exc)}"
    # settings the cell's method never reads are not compared either (a search-only option's new default)
    ignored = _method_attr(now.get("method"), "ignored_search_settings")
    saved, now = (_without_search_settings(c, ignored) for c in (saved, now))
    # settings added to pass-zoo after the cell ran are not compared: specs set them to what those runs did
    diffs = config_diffs(saved, now, recorded_only=True)
    return ", ".join(diffs[:3]) + (", ..." if len(diffs) > 3 else "")


def _without_search_settings(config: dict, names: tuple) -> dict:
    if not names or not isinstance(config.get("search"), dict):
        return config
    return {**config, "search": {k: v for k, v in config["search"].items() if k not in names}}


def _method_attr(method, name: str) -> tuple:
    """A registered method's tuple attribute ``name`` (``()`` for a method this version does not know)."""
    try:
        return getattr(get_method(method), name)
    except PassZooError:
        return ()


def learned_labels(doc: dict) -> List[str]:
    """Labels of the cells whose method is not a Torch-Pruning baseline (what gap tables are about)."""

    learned = {m for m in list_methods() if not get_method(m).baseline}
    return sorted({r["label"] for r in doc["runs"] if r["label"] != "dense" and r.get("method") in learned})


def _failure(exc: BaseException) -> str:
    """A failed cell in one line: the exception's type and its first line."""
    return f"{type(exc).__name__}: {one_line(exc)}" if str(exc).strip() else type(exc).__name__


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on OUT/.results.lock: concurrent bench processes merge, never overwrite."""
    import fcntl

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".results.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)


def _run_cell(cfg: PruneConfig, command: str) -> dict:
    t0 = time.time()
    metrics = pipeline.prune(cfg, command=command)
    metrics["wall_seconds"] = round(time.time() - t0, 2)
    return metrics


def budget_of(r: dict) -> tuple:
    """(budget, level) of a record or summary row; records written before density budgets are MACs."""
    return r.get("budget") or "macs", r["level"] if r.get("level") is not None else r["target_macs"]


def budget_label(budget: str, level: float) -> str:
    return f"{100 * level:g} % {'weights' if budget == 'density' else 'MACs'}"


def summarise(runs: List[dict]) -> List[dict]:
    """Mean and std of top-1 (after fine-tuning and right after slimming) per label and budget level."""
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        groups.setdefault((r["label"], *budget_of(r)), []).append(r)
    rows = []
    for (label, budget, level), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2])):
        top1 = [r["top1"] for r in rs]
        after = [r["top1_after_search"] for r in rs if r.get("top1_after_search") is not None]
        density = [r["density"] for r in rs if r.get("density") is not None]
        rows.append({
            "label": label, "budget": budget, "level": level, "target_macs": level if budget == "macs" else None,
            "n": len(rs), "macs_ratio": statistics.fmean(r["macs_ratio"] for r in rs),
            "density": statistics.fmean(density) if density else None,
            # sample std (n - 1): a handful of seeds estimates the spread of seeds not run
            "top1_mean": statistics.fmean(top1), "top1_std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "top1_after_search_mean": statistics.fmean(after) if after else None,
            "top1_after_search_std": statistics.stdev(after) if len(after) > 1 else 0.0,
        })
    return rows


def plot_results(doc: dict, out) -> List[Path]:
    """Accuracy-vs-budget curves with seed spread, and the per-group kept-channel (per-layer kept-weight) chart;
    a grid of weight-mask methods only is drawn against the measured density (``*_density.png``, ``kept_weights.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = doc.get("summary") or summarise(doc["runs"])
    paths = []
    # x: the measured budget -- MACs kept for channel masks; for a grid of weight masks only, weights kept
    by_density = all(budget_of(r)[0] == "density" for r in rows if r["label"] != "dense")

    def x_of(r):
        return r["density"] if by_density and r.get("density") is not None else r["macs_ratio"]

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, key, title in ((axes[0], "top1", "after fine-tuning"), (axes[1], "top1_after_search", "right after pruning")):
        for label in sorted({r["label"] for r in rows}):
            pts = sorted((r for r in rows if r["label"] == label and r.get(f"{key}_mean") is not None), key=x_of)
            if not pts:
                continue
            if label == "dense":
                ax.axhline(100 * pts[0][f"{key}_mean"], color="k", ls="--", lw=1, label="dense")
                continue
            ax.errorbar([100 * x_of(p) for p in pts], [100 * p[f"{key}_mean"] for p in pts],
                        yerr=[100 * p[f"{key}_std"] for p in pts], marker="o", capsize=3, label=label)
        if by_density:
            ax.set_xscale("log")  # 10 % and 50 % weights are a factor 5 apart
        ax.set_xlabel("prunable weights kept (%)" if by_density else "MACs kept (%)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{doc.get('name', '')}: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = out / ("accuracy_vs_density.png" if by_density else "accuracy_vs_macs.png")
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    # per-group (per-layer) kept fraction for each label at the harshest budget, seed of the first run
    runs = [r for r in doc["runs"] if r["label"] != "dense"]
    budget = "density" if by_density else "macs"
    runs = [r for r in runs if budget_of(r)[0] == budget]
    if runs:
        harsh = min(budget_of(r)[1] for r in runs)
        units = "layers" if by_density else "groups"
        fig, ax = plt.subplots(figsize=(11, 4))
        for label in sorted({r["label"] for r in runs}):
            r = next((r for r in runs if r["label"] == label and budget_of(r)[1] == harsh), None)
            masks_json = out / r["run_dir"] / "masks.json" if r else None
            if not masks_json or not masks_json.is_file():
                continue
            groups = json.loads(masks_json.read_text())[units]
            ax.plot(range(len(groups)), [100 * g["kept"] / g["total"] for g in groups], marker=".", label=label)
        what = "weights per layer" if by_density else "channels per group"
        ax.set_xlabel("prunable layer (forward order)" if by_density else "channel group (forward order)")
        ax.set_ylabel(f"{what.split()[0]} kept (%)")
        ax.set_title(f"kept {what} at {budget_label(budget, harsh)}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / ("kept_weights.png" if by_density else "kept_channels.png")
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def _levels(rows: List[dict], label=None) -> List[tuple]:
    """(budget, level) columns, MACs first, each from the loosest to the harshest budget."""
    found = {budget_of(r) for r in rows if r["label"] != "dense" and (label is None or r["label"] == label)}
    return sorted(found, key=lambda bl: (bl[0] != "macs", -bl[1]))


def results_table(doc: dict) -> str:
    """Markdown table: mean +- sample std top-1 per label (rows) and budget level (columns)."""
    rows = doc.get("summary") or summarise(doc["runs"])
    targets = _levels(rows)
    labels = sorted({r["label"] for r in rows})
    head = "| method | " + " | ".join(budget_label(*t) for t in targets) + " |"
    lines = [head, "|---" * (len(targets) + 1) + "|"]
    for label in labels:
        cells = []
        for t in targets:
            r = next((r for r in rows if r["label"] == label and (budget_of(r) == t or label == "dense")), None)
            if r is None:
                cells.append("-")
            else:
                after = r.get("top1_after_search_mean")
                extra = f" ({100 * after:.1f})" if after is not None and label != "dense" else ""
                cells.append(f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}{extra}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# two-sided 95 % quantiles of Student's t by degrees of freedom (1-30); beyond, the normal 1.96
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def paired_interval(diffs: List[float]):
    """The 95 % t interval of the mean of paired differences, ``(low, high)``; None under two pairs."""
    if len(diffs) < 2:
        return None
    t = _T975[len(diffs) - 2] if len(diffs) - 1 <= len(_T975) else 1.96
    half = t * statistics.stdev(diffs) / len(diffs) ** 0.5
    mean = statistics.fmean(diffs)
    return mean - half, mean + half


def gap_table(doc: dict, label: str = "pass", against: Optional[str] = None) -> str:
    """Markdown: ``label`` against the best other method at each budget level (MACs, or weights kept
    for weight-mask methods; a method is only compared with those under the same kind of budget), or
    against the one method ``against``.

    Paired by seed: both means are over the seeds the two share, so a grid stopped part-way does not
    compare three seeds of one method with two of another; the spread is the sample std over those
    seeds of the per-seed difference (the same seed draws the same data order and subset for every
    method), and the interval its paired 95 % t interval.
    """
    runs = [r for r in doc["runs"] if r["label"] != "dense"]
    by_level: Dict[tuple, Dict[str, Dict[int, float]]] = {}
    for r in runs:
        by_level.setdefault(budget_of(r), {}).setdefault(r["label"], {})[r["seed"]] = r["top1"]
    targets = _levels(runs, label)
    budgets = {b for b, _ in targets}
    what = "budget" if len(budgets) > 1 else ("weights" if budgets == {"density"} else "MACs")
    other_head = against or "best other method"
    lines = [f"| {what} | {label} | {other_head} | gap (points) | seeds | gap std over seeds | paired 95 % interval |",
             "|---|---|---|---|---|---|---|"]
    for t in targets:
        mine = by_level[t].get(label)
        if not mine:
            continue
        best = None
        # the best *baseline*: other variants of the same method (pass-no-prior for pass) do not count
        for other, theirs in by_level[t].items():
            if (other != against) if against else other.startswith(label.split("-")[0]):
                continue
            seeds = sorted(set(mine) & set(theirs))
            if not seeds:
                continue
            diffs = [mine[s] - theirs[s] for s in seeds]
            entry = (statistics.fmean(theirs[s] for s in seeds), other, seeds, diffs)
            if best is None or entry[0] > best[0]:
                best = entry
        if best is None:
            continue
        other_mean, other, seeds, diffs = best
        mine_mean = statistics.fmean(mine[s] for s in seeds)
        spread = f"{100 * statistics.stdev(diffs):.2f}" if len(diffs) > 1 else "-"
        interval = paired_interval(diffs)
        interval = f"[{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}]" if interval else "-"
        level = f"{100 * t[1]:g} %" if what != "budget" else budget_label(*t)
        lines.append(f"| {level} | {100 * mine_mean:.2f} | {other} {100 * other_mean:.2f} "
                     f"| {100 * (mine_mean - other_mean):+.2f} | {len(seeds)} | {spread} | {interval} |")
    return "\n".join(lines)


def report(doc: dict) -> str:
    """The results table and, for every learned method, its gap table (what ``results.md`` holds)."""
    parts = [results_table(doc)]
    learned = learned_labels(doc)
    baselines = {r["label"] for r in doc["runs"]} - set(learned) - {"dense"}
    for label in learned if baselines else ():
        parts.append(gap_table(doc, label))
    labels = {r["label"] for r in doc["runs"]}
    if {"pass", "direct-logits"} <= labels:  # the hypernetwork against plain learned channel logits
        parts.append(gap_table(doc, "pass", against="direct-logits"))
    return "\n\n".join(parts) + "\n"
