"""One budget-conditioned search against a separate search per budget: B3's Lite0 setting (bundled Lite0 ->
Fashion-MNIST at 64 px, 160 stage-1 batches, 300 fine-tuning steps, cap 0.9, the full test set).

The family (``prune --target-macs 0.5 0.25 0.1``) searches once and fine-tunes each member; the separate
searches are B3 Lite0's PASS cells of the same seeds (``results/b3_lite0``), which spend 160 stage-1 batches
per budget. Per budget: top-1 of each, the paired gap and its 95 % interval; and the stage-1 compute.

    python benchmarks/family_vs_separate.py --out benchmarks/results/family --seeds 0 1 2

Resumable: each seed's family is a folder under ``--out``, continued with ``--resume`` and skipped once
``family.json`` lists every member. Writes ``results.json`` and ``family_vs_separate.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml

from pass_zoo.config import PruneConfig, apply_overrides
from pass_zoo.family import prune_family
from pass_zoo.fileio import atomic_write_text
from pass_zoo.tools.bench import paired_interval

HERE = Path(__file__).resolve().parent
TARGETS = [0.5, 0.25, 0.1]


def family_run(seed: int, out: Path) -> list:
    base = yaml.safe_load((HERE / "b3_lite0_fmnist.yaml").read_text())["base"]
    root = out / f"s{seed}"
    done = root / "family.json"
    if done.is_file() and len(json.loads(done.read_text())["members"]) == len(TARGETS):
        return [json.loads((root / m["folder"] / "metrics.json").read_text())
                for m in json.loads(done.read_text())["members"]]
    cfg = apply_overrides(PruneConfig(), {**base, "method": "pass", "seed": seed, "target_macs": TARGETS[0],
                                          "out": str(root), "resume": root.exists(), "quiet": True}, "benchmark")
    return prune_family(cfg, TARGETS, command=f"python benchmarks/family_vs_separate.py --seeds {seed}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(HERE / "results" / "family"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    separate = {(r["target_macs"], r["seed"]): r for r in
                json.loads((HERE / "results" / "b3_lite0" / "results.json").read_text())["runs"] if r["method"] == "pass"}
    rows = []
    family = {seed: family_run(seed, out) for seed in args.seeds}
    for i, target in enumerate(TARGETS):
        seeds = [s for s in args.seeds if (target, s) in separate]
        fam = [family[s][i]["top1"] for s in seeds]
        sep = [separate[target, s]["top1"] for s in seeds]
        diffs = [f - s for f, s in zip(fam, sep)]
        interval = paired_interval(diffs)
        rows.append({"target_macs": target, "seeds": seeds, "family_top1": fam, "separate_top1": sep,
                     "family_mean": statistics.mean(fam), "separate_mean": statistics.mean(sep),
                     "gap_mean": statistics.mean(diffs), "gap_interval95": interval,
                     "family_macs_ratio": [family[s][i]["macs_ratio"] for s in seeds]})
    stage1 = {"family_batches": family[args.seeds[0]][0]["compute"]["stage1_batches"],
              "separate_batches": sum(separate[t, args.seeds[0]]["compute"]["stage1_batches"] for t in TARGETS)}
    doc = {"name": "family_vs_separate", "setting": "benchmarks/b3_lite0_fmnist.yaml", "targets": TARGETS,
           "rows": rows, "stage1": stage1}
    atomic_write_text(out / "results.json", json.dumps(doc, indent=2) + "\n")
    _plot(doc, out / "family_vs_separate.png")
    for r in rows:
        lo_hi = "-" if r["gap_interval95"] is None else "[{:+.2f}, {:+.2f}]".format(*(100 * v for v in r["gap_interval95"]))
        print(f"{100 * r['target_macs']:.0f} % MACs: family {100 * r['family_mean']:.2f}, separate "
              f"{100 * r['separate_mean']:.2f}, gap {100 * r['gap_mean']:+.2f} {lo_hi} ({len(r['seeds'])} seeds)")
    print(f"stage-1 batches: family {stage1['family_batches']}, separate {stage1['separate_batches']}")


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for key, label in (("family", "one search (family)"), ("separate", "a search per budget")):
        xs = [100 * r["target_macs"] for r in doc["rows"]]
        ys = [100 * statistics.mean(r[f"{key}_top1"]) for r in doc["rows"]]
        err = [100 * (statistics.stdev(r[f"{key}_top1"]) if len(r["seeds"]) > 1 else 0.0) for r in doc["rows"]]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xlabel("MACs kept (%)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Lite0 -> Fashion-MNIST, B3 setting")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


if __name__ == "__main__":
    main()
