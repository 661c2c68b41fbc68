"""Does stage 1 learn? Runs a method's search alone on several tasks and seeds and reports, per run, the
stage-1 loss curve, the mask churn per step (how many of the kept units one step swaps, and how much of
that moves units between groups) and the top-1 of the slimmed network on held-out *training* images
right after the search (no fine-tuning): the numbers a change of the search is judged on, never the
test set.

    python benchmarks/search_diagnosis.py --out benchmarks/results/search_diagnosis/churn.jsonl \\
        --setting "no limit={}" --setting "limit 0.1={\"max_churn\": 0.1}" \\
        --setting "limit 0.05={\"max_churn\": 0.05}"

One run instead of the sweep: ``--over JSON`` (PruneConfig fields over B3's setting; its ``search``
merges into B3's search settings) and ``--tag NAME``. B2's setting, on which the rows of
``results/search_diagnosis/runs.jsonl`` were measured, has no cap: ``--over '{"search": {"max_prune_ratio": 1}}'``.

Each setting is a name and a JSON object of ``SearchConfig`` fields; every run uses B3's Lite0 setting
at 10 % MACs (bundled Lite0, 64 px, new head, BN adapted, 160 search steps, cap 0.9) on four tasks
(Fashion-MNIST with 2,000 held-out of 10,000 training images; 4,000 training images with 800 held out;
four of its classes; scikit-learn digits with 300 held out) and seeds 0-2. Finished runs (by tag) are
skipped, so a stopped sweep continues; one JSON line per run; a markdown table at the end.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from pass_zoo import pipeline as P
from pass_zoo.config import PruneConfig, apply_overrides
from pass_zoo.fileio import atomic_write_text
from pass_zoo.graph.masks import to_unit_masks
from pass_zoo.methods import MethodContext, get_method
from pass_zoo.methods.pass_.search import MaskedSearchModel
from pass_zoo.train.finetune import evaluate
from pass_zoo.train.loop import PROGRESS, make_accelerator

BASE = dict(model="tf_efficientnet_lite0", pretrained="bundled", dataset="fashion-mnist", img_size=64,
            train_subset=10000, holdout=2000, head="new", batch_size=64, onnx=False, adapt_bn=True, quiet=True,
            target_macs=0.1, diagnostic_images=0)
SEARCH = {"steps": 160, "max_prune_ratio": 0.9}
TASKS = {
    "fashion-mnist": {},
    "fashion-mnist 4k": {"train_subset": 4000, "holdout": 800},
    "fashion-mnist 4 classes": {"dataset": "fashion-mnist@0,2,4,6", "train_subset": 4000, "holdout": 800},
    "digits": {"dataset": "sklearn-digits", "train_subset": None, "holdout": 300},
}


def _mean(xs):
    return sum(xs) / max(1, len(xs))


def diagnose(over: dict, search: dict, method: str = "pass") -> dict:
    """One stage 1 under ``BASE`` + ``over`` with ``SearchConfig`` fields ``search``."""
    cfg = apply_overrides(PruneConfig(), {**BASE, **over, "method": method, "search": {**SEARCH, **search}},
                          "diagnosis")
    cfg.validate()
    PROGRESS.update(quiet=True)
    accelerator = make_accelerator()
    steps = []  # (units swapped, units moved between groups, units kept before) per search step
    previous = {}

    def record(module, _inputs, _output):
        if isinstance(module, MaskedSearchModel) and module.training:
            now = [m.clone() for m in module.last_masks]
            if "masks" in previous:
                before = previous["masks"]
                swapped = sum(int((a != b).sum()) for a, b in zip(before, now))
                moved = sum(abs(int(a.sum()) - int(b.sum())) for a, b in zip(before, now))
                steps.append((swapped, moved, sum(int(a.sum()) for a in before)))
            previous["masks"] = now

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    start = time.time()
    try:
        set_seed(cfg.seed)
        chosen = get_method(cfg.method)
        backbone = P.load_backbone(cfg)
        prompt = P.make_prompt(P.prompt_kind(cfg, chosen), backbone.spec.img_size, cfg.prompt_size)
        data = P.load_data(cfg, P.load_task(cfg, backbone.spec), accelerator)
        head, _ = P.attach_head(cfg, backbone.model, prompt, data, accelerator, {})
        seq = P.layer_sequence(backbone.model, backbone.spec.img_size)
        budget = P.run_budget(cfg, backbone.model, seq, accelerator, backbone.model_kwargs)
        result = chosen.produce(MethodContext(backbone.model, seq, prompt, data.train_loader, cfg, accelerator,
                                              None, head, budget))
    finally:
        hook.remove()
    kept = [int(u.sum()) for u in to_unit_masks(result.masks, seq)]
    prompted, _ = P.slim_stage(backbone.model, result.masks, prompt, seq.example_input,
                               P._calibration_loader(cfg, data, accelerator, cfg.seed + 3),
                               cfg.bn_calibration_batches)
    # a search's losses, or -- a baseline -- its fair stage 1's: head and prompt on its fixed masks
    losses = result.record.get("search_losses") or result.record.get("probe_losses", [])
    churn = [s / max(1, k) for s, _, k in steps]
    return {
        "loss_final": _mean(losses[-20:]), "loss_chance": math.log(backbone.model.num_classes),
        "loss_curve": [round(_mean(losses[i:i + 20]), 3) for i in range(0, len(losses), 20)],
        "churn_curve": [round(_mean(churn[i:i + 20]), 4) for i in range(0, len(churn), 20)],
        "losses": [round(v, 4) for v in losses],
        # a re-probe ablation's fair stage 1 on the search's masks, after the search's own losses
        **({"probe_losses": [round(v, 4) for v in result.record["probe_losses"]]}
           if result.record.get("search_losses") and result.record.get("probe_losses") else {}),
        "churn_max": round(max(churn, default=0.0), 4), "recoveries": result.record.get("search_recoveries", 0),
        "pinned_at": result.record.get("search_pinned_at"),
        "moved_max": round(max((m / max(1, k) for _, m, k in steps), default=0.0), 4),
        "top1_heldout_after_search": evaluate(prompted, data.val_loader, accelerator),
        "macs_ratio": seq.macs(kept) / seq.dense_macs, "kept": kept, "seconds": round(time.time() - start, 1),
    }


def table(rows: list, settings: list) -> str:
    """Per task and seed: final stage-1 loss / held-out top-1 after search, one column per setting."""
    by = {(r["setting"], r["task"], r["seed"]): r for r in rows}
    runs = sorted({(r["task"], r["seed"]) for r in rows})
    out = ["| task, seed | " + " | ".join(settings) + " |", "|---" * (len(settings) + 1) + "|"]
    for task, seed in runs:
        cells = [f"{by[s, task, seed]['loss_final']:.2f} / {100 * by[s, task, seed]['top1_heldout_after_search']:.1f}"
                 if (s, task, seed) in by else "-" for s in settings]
        out.append(f"| {task}, {seed} | " + " | ".join(cells) + " |")
    mean, chance = [], []
    for s in settings:
        mine = [r for r in rows if r["setting"] == s]
        mean.append(f"{100 * statistics.mean(r['top1_heldout_after_search'] for r in mine):.1f}" if mine else "-")
        chance.append(str(sum(r["loss_final"] >= 0.95 * r["loss_chance"] for r in mine)))
    out.append("| mean held-out top-1 | " + " | ".join(mean) + " |")
    out.append("| runs ending at chance | " + " | ".join(chance) + " |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON lines, one per run (appended; finished runs skipped)")
    ap.add_argument("--setting", action="append", default=[], metavar='NAME={"field": value}')
    ap.add_argument("--over", default=None, metavar="JSON", help="one run: PruneConfig fields over B3's setting")
    ap.add_argument("--tag", default="run", help="the name of the --over run")
    ap.add_argument("--method", default="pass")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS), metavar="TASK",
                    help="the sweep's tasks (default: all four)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = [(name, json.loads(value)) for name, value in (s.split("=", 1) for s in args.setting)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.over is not None:
        over = json.loads(args.over)
        search = over.pop("search", {})
        row = {"tag": args.tag, "method": args.method, "over": {**over, "search": search},
               **diagnose(over, search, args.method)}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row))
        return
    if not settings:
        ap.error("give --setting NAME=JSON (a sweep) or --over JSON (one run)")
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    done = {r["tag"] for r in rows}
    for seed in args.seeds:
        for task in args.tasks:
            over = TASKS[task]
            for name, search in settings:
                tag = f"{args.method} | {name} | {task} | {seed}"
                if tag in done:
                    continue
                row = {"tag": tag, "method": args.method, "setting": name, "search": search, "task": task,
                       "seed": seed, **diagnose({**over, "seed": seed}, search, args.method)}
                rows.append(row)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{tag}: stage-1 loss {row['loss_final']:.3f}, held-out top-1 after search "
                      f"{100 * row['top1_heldout_after_search']:.1f} %, largest step churn {row['churn_max']:.2f}",
                      flush=True)
    atomic_write_text(out.with_suffix(".md"), table(rows, [name for name, _ in settings]))


if __name__ == "__main__":
    main()
