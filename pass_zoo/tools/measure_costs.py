"""``pass-zoo costs``: what PASS costs to run, measured.

* search step time with the hypernetwork / without it (the same frozen, gated backbone and prompt
  update, masks fixed) -- the hypernetwork's overhead per step, timed in turns in one process in
  CPU time (a shared CPU slows both alike, and the wall-clock ratio of two processes drifts with it);
* peak memory of a search step / a fine-tune step of the slim network at the same batch;
* optionally, ORT latency speedup against the MACs ratio of finished run folders.

Each step kind runs in a fresh process so that its peak memory is its own: the kernel's peak-RSS
counter is reset after set-up (``/proc/self/clear_refs``), then read after the timed steps. Inputs are
random tensors: the cost of a step does not depend on what the pixels show.
"""
from __future__ import annotations

import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

from ..backbone import create_backbone
from ..config import SearchConfig
from ..errors import PassZooError
from ..pipeline import layer_sequence, make_prompt
from ..prompt import PromptedModel
from ..export.latency import measure_latency
from ..graph.masks import to_channel_masks
from ..graph.slim import slim
from ..methods.frozen_bn import KeepRunningStats
from ..methods.pass_.search import MaskedSearchModel, build_hypernet

KINDS = ("search", "fixed_masks", "finetune")


def _rss_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def _measure(kind: str, model_name: str, pretrained: str, img_size: int, batch: int, target_macs: float,
             steps: int, warmup: int, threads: int, seed: int) -> dict:
    """Runs in its own process: set up ``kind``, time ``steps`` optimisation steps, report peak memory."""
    import torch
    import torch.nn.functional as F


    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    backbone = create_backbone(model_name, pretrained).eval()
    backbone.reset_classifier(10)
    seq = layer_sequence(backbone, img_size)
    example = seq.example_input
    prompt = make_prompt("additive", img_size)
    cfg = SearchConfig()
    hypernet = build_hypernet(seq, cfg)
    searcher = MaskedSearchModel(backbone, seq, prompt, hypernet, target_macs, cfg).train()
    for p in backbone.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        ste, hard = searcher.propose()
    x = torch.randn(batch, 3, img_size, img_size)
    y = torch.randint(0, 10, (batch,))

    def search_kind():  # hypernetwork forward + selection + gated backbone, both optimisers
        return searcher, [torch.optim.SGD(prompt.parameters(), lr=cfg.lr_prompt, momentum=0.9),
                          torch.optim.AdamW(hypernet.parameters(), lr=cfg.lr_hypernet)]

    def fixed_kind():  # the same step with the masks given: no hypernetwork
        fixed = [h.float() for h in hard]

        def gated_forward(inp):
            with seq.gated(fixed):
                return backbone(prompt(inp))
        return gated_forward, [torch.optim.SGD(prompt.parameters(), lr=cfg.lr_prompt, momentum=0.9)]

    def make_step(forward, opts):
        def step():
            loss = F.cross_entropy(forward(x), y)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o in opts:
                o.step()
        return step

    if kind == "paired":  # both steps in turns in one process, in CPU time: other load hits neither
        with_hn, without = make_step(*search_kind()), make_step(*fixed_kind())
        pairs = []
        with KeepRunningStats(backbone):
            for i in range(warmup + steps):
                t0 = time.process_time()
                with_hn()
                t1 = time.process_time()
                without()
                if i >= warmup:
                    pairs.append((t1 - t0, time.process_time() - t1))
        return {"kind": kind, "steps": steps, "search_cpu_ms_median": 1000 * statistics.median(a for a, _ in pairs),
                "fixed_masks_cpu_ms_median": 1000 * statistics.median(b for _, b in pairs),
                "ratio_median": statistics.median(a / b for a, b in pairs)}
    if kind == "search":
        forward, opts = search_kind()
    elif kind == "fixed_masks":
        forward, opts = fixed_kind()
    else:  # fine-tune: the physically slim network and the prompt, every weight trained
        slim_model, _ = slim(backbone, to_channel_masks(hard, seq), example)
        model = PromptedModel(slim_model, prompt).train()
        for p in model.parameters():
            p.requires_grad_(True)
        opts = [torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)]
        forward = model

    step = make_step(forward, opts)
    times = []
    with KeepRunningStats(backbone):
        for _ in range(warmup):
            step()
        base = _rss_kib("VmRSS")
        exact = _reset_peak_rss()
        for _ in range(steps):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    peak = _rss_kib("VmHWM")
    return {"kind": kind, "step_ms_median": 1000 * statistics.median(times),
            "step_ms_mean": 1000 * statistics.fmean(times), "steps": steps,
            "rss_before_mib": None if base is None else base / 1024,
            "peak_rss_mib": None if peak is None else peak / 1024,
            "peak_over_setup_mib": None if base is None or peak is None else (peak - base) / 1024,
            "peak_reset": exact}


def measure_costs(model: str = "tf_efficientnet_lite0", pretrained: str = "bundled", img_size: int = 64,
                  batch: int = 64, target_macs: float = 0.5, steps: int = 20, warmup: int = 3,
                  threads: int = 1, seed: int = 0) -> dict:
    """Step time and peak memory of search (with / without hypernetwork) and fine-tuning."""
    if steps < 1 or warmup < 0 or batch < 1 or threads < 1 or not 0 < target_macs <= 1:
        raise PassZooError("costs needs --steps >= 1, --warmup >= 0, --batch >= 1, --threads >= 1 "
                           "and --target-macs in (0, 1]")
    results = {}
    ctx = multiprocessing.get_context("spawn")
    for kind in (*KINDS, "paired"):
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # a fresh process: its peak memory is its own
            results[kind] = pool.submit(_measure, kind, model, pretrained, img_size, batch, target_macs,
                                        steps, warmup, threads, seed).result()
    paired = results.pop("paired")
    s, f = results["search"], results["finetune"]
    report = {"model": model, "pretrained": pretrained, "img_size": img_size, "batch": batch,
              "target_macs": target_macs, "threads": threads, "seed": seed, "steps": steps, "warmup": warmup,
              "results": results, "paired": paired,
              # from the paired steps (one process, in turns); the separate processes give memory and
              # absolute times, but on a shared CPU their load differs
              "search_step_with_over_without_hypernet": paired["ratio_median"],
              "search_over_finetune_step_time": s["step_ms_median"] / f["step_ms_median"]}
    if s["peak_over_setup_mib"] and f["peak_over_setup_mib"]:
        report["search_over_finetune_peak_memory"] = s["peak_over_setup_mib"] / f["peak_over_setup_mib"]
        report["search_over_finetune_peak_rss"] = s["peak_rss_mib"] / f["peak_rss_mib"]
    return report


def latency_points(run_dirs: Sequence, batches=(1, 32), threads: int = 2, repeats: int = 20) -> list:
    """ORT speedup (dense / slim) against the MACs ratio for each run folder."""

    points = []
    for run_dir in run_dirs:
        rep = measure_latency(run_dir, batches=batches, threads=threads, repeats=repeats)
        for r in rep["results"]:
            points.append({"run": str(run_dir), "macs_ratio": rep["macs_ratio"], "batch": r["batch"],
                           "dense_ms": r["dense_ms"], "slim_ms": r["slim_ms"], "speedup": r["speedup"]})
    return points


def plot_costs(report: dict, path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report.get("latency") or []
    fig, axes = plt.subplots(1, 3 if points else 2, figsize=(14 if points else 9, 4))
    res = report["results"]
    labels = ["search\n(hypernet)", "search\n(masks fixed)", "fine-tune\n(slim)"]
    axes[0].bar(labels, [res[k]["step_ms_median"] for k in KINDS], color=["C0", "C1", "C2"])
    axes[0].set_ylabel("ms per step (median)")
    axes[0].set_title(f"step time, batch {report['batch']}, {report['threads']} thread(s)")
    axes[1].bar(labels, [res[k]["peak_over_setup_mib"] or 0 for k in KINDS], color=["C0", "C1", "C2"])
    axes[1].set_ylabel("peak RSS above set-up (MiB)")
    axes[1].set_title("peak memory of the training steps")
    if points:
        ax = axes[2]
        for b in sorted({p["batch"] for p in points}):
            pts = [p for p in points if p["batch"] == b]
            ax.scatter([100 * p["macs_ratio"] for p in pts], [p["speedup"] for p in pts], label=f"batch {b}")
        xs = sorted({p["macs_ratio"] for p in points})
        ax.plot([100 * m for m in xs], [1 / m for m in xs], "k--", lw=1, label="1 / MACs ratio")
        ax.set_xlabel("MACs kept (%)")
        ax.set_ylabel("ORT speedup (dense / slim)")
        ax.set_title("measured speedup vs MACs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['model']} at {report['img_size']} px, {100 * report['target_macs']:g} % MACs")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
