"""``pass-zoo bench``: a grid of prune runs (methods x MACs levels x seeds) from one YAML spec.

Every cell is an ordinary ``prune`` run folder under ``OUT/cells/``; ``results.json`` collects one
record per finished cell and is rewritten atomically after each, so an interrupted grid resumes
where it stopped (a cell with a ``metrics.json`` is never run again). Plots are redrawn from
``results.json`` alone.

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
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List

from ..config import DEFAULT_TARGET_MACS, PruneConfig, apply_overrides
from ..errors import PassZooError, one_line
from ..runio import atomic_write_json, atomic_write_text

_RECORD_KEYS = ("method", "target_macs", "macs_dense", "macs_slim", "macs_ratio", "params_dense", "params_slim",
                "top1", "top1_after_search", "top1_dense_zero_shot", "search_seconds", "finetune_seconds",
                "total_seconds", "seed", "command", "finetune_steps", "compute")


def load_spec(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise PassZooError(f"benchmark spec {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PassZooError(f"{path} is not valid YAML: {one_line(exc)}") from exc
    if not isinstance(spec, dict) or "grid" not in spec:
        raise PassZooError(f"{path}: a benchmark spec needs a 'grid' mapping")
    unknown = sorted(set(spec) - {"name", "base", "grid", "variants", "dense", "description"})
    if unknown:
        raise PassZooError(f"{path}: unknown top-level keys {unknown}")
    return spec


def plan_cells(spec: dict) -> List[Dict]:
    """Every cell of the grid: ``{"id", "label", "target_macs", "seed", "config": PruneConfig}``."""
    base = apply_overrides(PruneConfig(), spec.get("base") or {}, "base")
    grid = spec["grid"]
    labels = list(grid.get("method", [base.method]))
    variants = spec.get("variants") or {}
    labels += [v for v in variants if v not in labels]
    targets = list(grid.get("target_macs", [DEFAULT_TARGET_MACS if base.target_macs is None else base.target_macs]))
    seeds = grid.get("seed", [base.seed])
    # seed: [0, 1, 2] for every level, or {level: [seeds]} (more seeds where methods are close)
    seeds_of = {float(t): list(seeds.get(t, seeds.get(str(t), []))) if isinstance(seeds, dict) else list(seeds)
                for t in targets}
    seeds = sorted({s for ss in seeds_of.values() for s in ss})
    cells = []
    for label, target in itertools.product(labels, targets):
        for seed in seeds_of[float(target)]:
            cfg = apply_overrides(base, dict(variants.get(label, {"method": label})), f"variant '{label}'")
            cfg.target_macs, cfg.seed = float(target), int(seed)
            cells.append({"id": f"{label}-t{target:g}-s{seed}", "label": label, "target_macs": float(target),
                          "seed": int(seed), "config": cfg})
    if spec.get("dense"):
        for seed in seeds:
            cfg = apply_overrides(base, {"method": "random"}, "dense")  # at 1.0 every method keeps everything
            cfg.clear_budget()  # dense whatever the base's budget kind
            cfg.target_macs, cfg.seed = 1.0, int(seed)
            cfg.search = dataclasses.replace(cfg.search, steps=0)
            cells.append({"id": f"dense-s{seed}", "label": "dense", "target_macs": 1.0, "seed": int(seed),
                          "config": cfg})
    return cells


def run_bench(spec_path, out, only: List[str] = (), dry_run: bool = False, jobs: int = 1,
              threads: int = 0, log=print) -> dict:
    """Run (or resume) every cell; returns the results document.

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
    done = {r["id"] for r in doc["runs"]}

    def merge_from_disk():
        if results_path.is_file():
            ids = {r["id"] for r in doc["runs"]}
            doc["runs"].extend(r for r in json.loads(results_path.read_text())["runs"] if r["id"] not in ids)

    def collect(cell, metrics):
        record = {"id": cell["id"], "label": cell["label"], "run_dir": str((out / "cells" / cell["id"]).relative_to(out))}
        record.update({k: metrics.get(k) for k in _RECORD_KEYS + _method_keys(metrics.get("method"))})
        record["target_macs"] = cell["target_macs"]
        record["wall_seconds"] = metrics.get("wall_seconds", metrics.get("total_seconds"))
        with _locked(out):  # another bench process may be filling other cells of the same grid
            merge_from_disk()
            doc["runs"] = [r for r in doc["runs"] if r["id"] != cell["id"]] + [record]
            done.add(cell["id"])
            atomic_write_json(results_path, doc)

    todo = []
    for i, cell in enumerate(cells):
        metrics_path = out / "cells" / cell["id"] / "metrics.json"
        if cell["id"] in done:
            continue
        if metrics_path.is_file():  # finished before an interruption, not yet collected
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


def _method_keys(method) -> tuple:
    from ..methods import get_method

    try:
        return get_method(method).metric_keys
    except PassZooError:
        return ()


def learned_labels(doc: dict) -> List[str]:
    """Labels of the cells whose method is not a Torch-Pruning baseline (what gap tables are about)."""
    from ..methods import get_method, list_methods

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
    from ..pipeline import prune

    t0 = time.time()
    metrics = prune(cfg, command=command)
    metrics["wall_seconds"] = round(time.time() - t0, 2)
    return metrics


def summarise(runs: List[dict]) -> List[dict]:
    """Mean and std of top-1 (after fine-tuning and right after slimming) per label and MACs level."""
    groups: Dict[tuple, List[dict]] = {}
    for r in runs:
        groups.setdefault((r["label"], r["target_macs"]), []).append(r)
    rows = []
    for (label, target), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        top1 = [r["top1"] for r in rs]
        after = [r["top1_after_search"] for r in rs if r.get("top1_after_search") is not None]
        rows.append({
            "label": label, "target_macs": target, "n": len(rs),
            "macs_ratio": statistics.fmean(r["macs_ratio"] for r in rs),
            "top1_mean": statistics.fmean(top1), "top1_std": statistics.pstdev(top1) if len(top1) > 1 else 0.0,
            "top1_after_search_mean": statistics.fmean(after) if after else None,
            "top1_after_search_std": statistics.pstdev(after) if len(after) > 1 else 0.0,
        })
    return rows


def plot_results(doc: dict, out) -> List[Path]:
    """Accuracy-vs-MACs curves with seed spread, and the per-group kept-channel chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    rows = doc.get("summary") or summarise(doc["runs"])
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=False)
    for ax, key, title in ((axes[0], "top1", "after fine-tuning"), (axes[1], "top1_after_search", "right after slimming")):
        for label in sorted({r["label"] for r in rows}):
            pts = sorted((r for r in rows if r["label"] == label and r.get(f"{key}_mean") is not None),
                         key=lambda r: r["macs_ratio"])
            if not pts:
                continue
            if label == "dense":
                ax.axhline(100 * pts[0][f"{key}_mean"], color="k", ls="--", lw=1, label="dense")
                continue
            ax.errorbar([100 * p["macs_ratio"] for p in pts], [100 * p[f"{key}_mean"] for p in pts],
                        yerr=[100 * p[f"{key}_std"] for p in pts], marker="o", capsize=3, label=label)
        ax.set_xlabel("MACs kept (%)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{doc.get('name', '')}: {title}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    p = out / "accuracy_vs_macs.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)

    # per-group kept fraction for each label at the harshest budget, seed of the first run
    runs = [r for r in doc["runs"] if r["label"] != "dense"]
    if runs:
        harsh = min(r["target_macs"] for r in runs)
        fig, ax = plt.subplots(figsize=(11, 4))
        for label in sorted({r["label"] for r in runs}):
            r = next((r for r in runs if r["label"] == label and r["target_macs"] == harsh), None)
            masks_json = out / r["run_dir"] / "masks.json" if r else None
            if not masks_json or not masks_json.is_file():
                continue
            groups = json.loads(masks_json.read_text())["groups"]
            ax.plot(range(len(groups)), [100 * g["kept"] / g["total"] for g in groups], marker=".", label=label)
        ax.set_xlabel("channel group (forward order)")
        ax.set_ylabel("channels kept (%)")
        ax.set_title(f"kept channels per group at {100 * harsh:g} % MACs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / "kept_channels.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


def results_table(doc: dict) -> str:
    """Markdown table: mean +- std top-1 per label (rows) and MACs level (columns)."""
    rows = doc.get("summary") or summarise(doc["runs"])
    targets = sorted({r["target_macs"] for r in rows if r["label"] != "dense"}, reverse=True)
    labels = sorted({r["label"] for r in rows})
    head = "| method | " + " | ".join(f"{100 * t:g} % MACs" for t in targets) + " |"
    lines = [head, "|---" * (len(targets) + 1) + "|"]
    for label in labels:
        cells = []
        for t in targets:
            r = next((r for r in rows if r["label"] == label and (r["target_macs"] == t or label == "dense")), None)
            if r is None:
                cells.append("-")
            else:
                after = r.get("top1_after_search_mean")
                extra = f" ({100 * after:.1f})" if after is not None and label != "dense" else ""
                cells.append(f"{100 * r['top1_mean']:.2f} ± {100 * r['top1_std']:.2f}{extra}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table(doc: dict, label: str = "pass") -> str:
    """Markdown: ``label`` against the best other method at each MACs level.

    Paired by seed: both means are over the seeds the two share, so a grid stopped part-way does not
    compare three seeds of one method with two of another; the spread is the std over those seeds of
    the per-seed difference (the same seed draws the same data order and subset for every method).
    """
    runs = [r for r in doc["runs"] if r["label"] != "dense"]
    by_level: Dict[float, Dict[str, Dict[int, float]]] = {}
    for r in runs:
        by_level.setdefault(r["target_macs"], {}).setdefault(r["label"], {})[r["seed"]] = r["top1"]
    lines = [f"| MACs | {label} | best other method | gap (points) | seeds | gap std over seeds |",
             "|---|---|---|---|---|---|"]
    for t in sorted(by_level, reverse=True):
        mine = by_level[t].get(label)
        if not mine:
            continue
        best = None
        # the best *baseline*: other variants of the same method (pass-no-prior for pass) do not count
        for other, theirs in by_level[t].items():
            if other.startswith(label.split("-")[0]):
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
        lines.append(f"| {100 * t:g} % | {100 * mine_mean:.2f} | {other} {100 * other_mean:.2f} "
                     f"| {100 * (mine_mean - other_mean):+.2f} | {len(seeds)} | {spread} |")
    return "\n".join(lines)


def report(doc: dict) -> str:
    """The results table and, for every learned method, its gap table (what ``results.md`` holds)."""
    parts = [results_table(doc)]
    learned = learned_labels(doc)
    baselines = {r["label"] for r in doc["runs"]} - set(learned) - {"dense"}
    for label in learned if baselines else ():
        parts.append(gap_table(doc, label))
    return "\n\n".join(parts) + "\n"
