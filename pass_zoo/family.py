"""A family of budgets from one search: a run folder per budget from one budget-conditioned search
(``prune --target-macs 0.5 0.25 0.1``), and masks for any other budget read off a finished search without
searching again (``pass-zoo masks``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from accelerate.utils import set_seed

from .config import PruneConfig, apply_overrides
from .errors import BudgetError, PassZooError
from .export.latency import measure_latency, runtime_name
from .fileio import atomic_write_bytes, atomic_write_dir, atomic_write_text
from .graph.masks import masks_files, masks_summary
from .integrity import verify_run_files
from .methods import get_method
from .pipeline import layer_sequence, load_backbone, make_prompt, prompt_kind, prune, run_budget
from .transfer import run_config

MASK_FILES = ("masks.safetensors", "masks.json")
BUDGET_KINDS = ("macs", "params", "latency")


def member_masks(run_dir, kind: str, target: float, out, overwrite: bool = False) -> dict:
    """Write ``out/masks.safetensors`` and ``masks.json`` for the budget ``--target-{kind} target`` from the run
    in ``run_dir``; returns the masks summary. The run's backbone is rebuilt from its settings (its pretrained
    weights must load here); the budget is of the kind the run searched over."""
    run_dir = Path(str(run_dir).removeprefix("local-dir:"))
    run_dir = _search_of(run_dir)  # a family's member: the search it read its masks off
    cfg = run_config(run_dir)
    verify_run_files(run_dir)  # the hypernetwork and prompt are the ones the run wrote
    if kind not in BUDGET_KINDS:
        raise BudgetError(f"a family's budgets are --target-macs, --target-params or --target-latency, not {kind}")
    if cfg.budget_kind() not in BUDGET_KINDS:
        raise PassZooError(f"{run_dir} holds weight masks ('{cfg.method}' under --target-{cfg.budget_kind()}); a "
                           "family of budgets comes from a PASS run with --search-budget-range")
    if cfg.budget_kind() != kind:
        raise BudgetError(f"{run_dir} searched over --target-{cfg.budget_kind()} budgets; give --target-"
                          f"{cfg.budget_kind()} (not --target-{kind})")
    out = _check_out(Path(out), run_dir, overwrite)
    member = apply_overrides(cfg, {f"target_{k}": (target if k == kind else None) for k in BUDGET_KINDS},
                             "the family member")
    member.validate()
    method = get_method(member.method)
    set_seed(member.seed)  # as the run did: a random-init backbone then has the run's weights
    backbone = load_backbone(member)
    classes = _run_classes(run_dir)
    if classes is not None and backbone.model.num_classes != classes:
        backbone.model.reset_classifier(classes)  # the classifier's MACs count in the budget: the run's head
    seq = layer_sequence(backbone.model, backbone.spec.img_size)
    budget = run_budget(member, backbone.model, seq, None, backbone.model_kwargs)
    prompt = make_prompt(prompt_kind(member, method), backbone.spec.img_size, member.prompt_size)
    masks = method.member_masks(run_dir, backbone.model, seq, prompt, budget, member.search)
    summary = masks_summary(masks, seq)
    summary["source"] = {"run": str(run_dir), "budget": kind, "target": target}
    atomic_write_dir(out, masks_files(masks, summary))
    return summary


def _search_of(run_dir: Path) -> Path:
    """``run_dir``, or -- for a family member that searched nothing -- the family's search run it names."""
    try:
        search = json.loads((run_dir / "metrics.json").read_text()).get("family_search")
    except (OSError, ValueError, AttributeError):
        return run_dir
    return Path(search) if isinstance(search, str) and Path(search).is_dir() else run_dir


def _run_classes(run_dir: Path):
    """The run's number of classes (its exported config.json), or None when it does not say."""
    try:
        classes = json.loads((run_dir / "config.json").read_text()).get("num_classes")
    except (OSError, ValueError, AttributeError):
        return None
    return classes if isinstance(classes, int) and not isinstance(classes, bool) and classes > 0 else None


def _check_out(out: Path, run_dir: Path, overwrite: bool) -> Path:
    """A new folder, or (``overwrite``) one holding only the masks this command writes: never the run itself
    or a folder with other files, which replacing would lose."""
    if out.resolve() == run_dir.resolve():
        raise PassZooError(f"--out {out} is the run folder itself; give a new folder for the member's masks")
    if out.exists():
        if not out.is_dir():
            raise PassZooError(f"--out {out} is a file; give a folder")
        others = sorted(p.name for p in out.iterdir() if p.name not in MASK_FILES)
        if others:
            raise PassZooError(f"--out {out} holds other files ({', '.join(others[:3])}); give a new folder")
        if any(out.iterdir()) and not overwrite:
            raise PassZooError(f"--out {out} already holds masks; add --overwrite to replace them")
    return out


def member_folder(kind: str, target: float) -> str:
    """A member's folder name under the family's: ``macs50``, ``params25``, ``macs12.5``, ``latency4.5ms``."""
    return f"latency{target:g}ms" if kind == "latency" else f"{kind}{100 * target:g}"


def check_family(kind: str, targets: Sequence[float], method: str) -> List[float]:
    """The family's budgets, or one line on why not: two or more, strictly decreasing, fractions of the dense
    cost (milliseconds for latency), for a method with a budget-conditioned search."""
    targets = [float(t) for t in targets]
    if kind not in BUDGET_KINDS:
        raise BudgetError(f"a family of budgets takes --target-macs, --target-params or --target-latency, not "
                          f"--target-{kind}")
    if len(targets) < 2:
        raise BudgetError("a family needs two or more budgets")
    given = " ".join(f"{t:g}" for t in targets)
    if kind == "latency" and any(not 0.0 < t < float("inf") for t in targets):
        raise BudgetError(f"--target-latency budgets must be positive milliseconds, got {given}")
    if kind != "latency" and any(not 0.0 < t <= 1.0 for t in targets):
        raise BudgetError(f"--target-{kind} budgets must be in (0, 1], got {given}")
    if any(b >= a for a, b in zip(targets, targets[1:])):
        raise BudgetError(f"--target-{kind} budgets of a family must be strictly decreasing, got {given}")
    if not get_method(method).family_artefacts:
        raise PassZooError(f"'{method}' has no budget-conditioned search; a family of budgets comes from --method pass")
    return targets


def prune_family(cfg: PruneConfig, targets: Sequence[float], command: Optional[str] = None,
                 recipe: Optional[dict] = None, prune_run: Callable = prune) -> List[dict]:
    """One search for several budgets of ``cfg``'s kind, then a complete run folder per budget under ``cfg.out``.

    The first (largest) budget's run searches a hypernetwork over the whole range (``search.budget_range``);
    every other member reads its masks, prompt and head off that search (``transfer_mode`` "member") and is
    slimmed, fine-tuned and exported like any run. A finished member is kept; with ``cfg.resume`` an unfinished
    one continues from its checkpoints. Writes ``family.json``; returns the members' metrics."""
    kind = cfg.budget_kind()
    targets = check_family(kind, targets, cfg.method)
    root = Path(cfg.out or cfg.default_out())
    names = [member_folder(kind, t) for t in targets]
    search_run = root / names[0]
    members = []
    for i, (target, name) in enumerate(zip(targets, names)):
        member = apply_overrides(cfg, {f"target_{kind}": target, "out": str(root / name)}, "the family member")
        if i == 0:
            member.search.budget_range = [targets[-1], targets[0]]
        else:
            member.transfer_from, member.transfer_mode = str(search_run), "member"
        folder = root / name
        metrics_path = folder / "metrics.json"
        if cfg.resume and metrics_path.is_file():  # finished before the interruption
            members.append(json.loads(metrics_path.read_text()))
            continue
        member.resume = cfg.resume and folder.exists()
        members.append(prune_run(member, command=command, recipe=recipe))
    summary = {
        "format": "pass-zoo-family/1", "budget": kind, "search_run": names[0],
        "members": [{"folder": name, f"target_{kind}": t, "top1": m.get("top1"), "macs_ratio": m.get("macs_ratio"),
                     "params_slim": m.get("params_slim"), "top1_after_search": m.get("top1_after_search")}
                    for name, t, m in zip(names, targets, members)],
        "stage1_batches": members[0].get("compute", {}).get("stage1_batches"),
    }
    atomic_write_text(root / "family.json", json.dumps(summary, indent=2) + "\n")
    return members


def family_pareto(root, baselines: Sequence = (), batches: Sequence[int] = (1, 32), threads: int = 2,
                  repeats: int = 20, warmup: int = 3) -> dict:
    """``root/pareto.json`` and ``pareto.png``: each member's top-1 against its MACs and its ONNX Runtime latency
    at each batch size (measured here, against the dense model's), with ``baselines`` (run folders) beside them."""
    root = Path(str(root).removeprefix("local-dir:"))
    family = read_family(root)
    if family is None:
        raise PassZooError(f"{root} is not a family folder (no readable family.json); make one with prune "
                           "--target-macs A B ...")
    points, dense = [], None
    for kind, runs in (("member", family_members(root)), ("baseline", [Path(b) for b in baselines])):
        for run in runs:
            report = measure_latency(run, batches, threads, repeats, warmup)
            metrics = json.loads((run / "metrics.json").read_text())
            if dense is None:
                dense = {str(r["batch"]): r["dense_ms"] for r in report["results"]}
            points.append({"run": run.name if kind == "member" else str(run), "kind": kind,
                           "method": metrics.get("method"), "macs_ratio": metrics.get("macs_ratio"),
                           "top1": metrics.get("top1"),
                           "latency_ms": {str(r["batch"]): r["slim_ms"] for r in report["results"]}})
    doc = {"format": "pass-zoo-pareto/1", "family": str(root), "budget": family.get("budget"),
           "batches": [int(b) for b in batches], "threads": threads, "repeats": repeats,
           "runtime": runtime_name(), "dense": {"macs_ratio": 1.0, "latency_ms": dense}, "points": points}
    atomic_write_text(root / "pareto.json", json.dumps(doc, indent=2) + "\n")
    atomic_write_bytes(root / "pareto.png", _pareto_png(doc))
    return doc


def _pareto_png(doc: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_x = [("MACs kept (%)", lambda p: 100 * p["macs_ratio"], 100.0)]
    axes_x += [(f"ONNX Runtime ms per batch of {b}", lambda p, b=str(b): p["latency_ms"][b], doc["dense"]["latency_ms"][str(b)])
               for b in doc["batches"]]
    fig, axes = plt.subplots(1, len(axes_x), figsize=(4.2 * len(axes_x), 3.8), squeeze=False)
    for ax, (label, x_of, dense_x) in zip(axes[0], axes_x):
        groups = {}
        for p in doc["points"]:
            groups.setdefault("family" if p["kind"] == "member" else p["method"], []).append(p)
        for name, pts in groups.items():
            pts = sorted(pts, key=x_of)
            ax.plot([x_of(p) for p in pts], [100 * p["top1"] for p in pts], marker="o",
                    ls="-" if name == "family" else "none", label=name)
        ax.axvline(dense_x, color="k", ls="--", lw=1, label="dense")
        ax.set_xlabel(label)
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{Path(doc['family']).name}: one search, {sum(p['kind'] == 'member' for p in doc['points'])} budgets",
                 fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def read_family(root) -> Optional[dict]:
    """``root/family.json`` (``prune_family``'s record), or None when ``root`` holds no readable one."""
    try:
        family = json.loads((Path(str(root).removeprefix("local-dir:")) / "family.json").read_text())
        if all(isinstance(m.get("folder"), str) for m in family["members"]):
            return family
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def family_members(root) -> List[Path]:
    """The member folders of the family in ``root``, or [] when ``root`` is not a family."""
    family = read_family(root)
    root = Path(str(root).removeprefix("local-dir:"))
    return [root / m["folder"] for m in family["members"]] if family else []


def member_repo_id(repo_id: str, member: Path) -> str:
    """Where a member is published: the family's repo id with the member's folder name, ``ORG/NAME-macs25``."""
    return f"{repo_id}-{member.name}"
