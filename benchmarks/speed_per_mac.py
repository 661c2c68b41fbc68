"""Speed per MAC saved: where a slim network's ONNX Runtime latency falls short of its MACs ratio.

For each model and ``--round-to``: a random-init timm model, masks from Torch-Pruning's L1 criterion
under a MACs budget, the slim network, both exported to ONNX; graphs and profiles from pass-zoo's
latency session (``export.latency.latency_session``), timings from ``export.latency.time_onnx`` (a
process of its own, one shared spinning thread pool). Written to ``--out`` (JSON, atomically):

* ``layout``: ORT's optimised graph of each network -- how many convs run in the NCHWc blocked layout
  (``com.microsoft.nchwc`` Conv) and how many fell back to plain NCHW Conv, and the layout reorders
  inserted around them. A conv only takes the blocked path when its input and output channels are
  multiples of the CPU's block size (16 with AVX-512, 8 with AVX2); this part does not depend on load.
* ``profile``: ORT's per-node profile at each batch, summed per op type -- relative times, so a
  loaded machine still shows which ops lose the speedup.
* ``latency``: interleaved medians, dense vs slim, with speedup / (1 / MACs ratio) -- only
  trustworthy on an idle machine; ``load_average`` records the load it ran under.

    python3 benchmarks/speed_per_mac.py --model resnet50 tf_efficientnet_lite0 --round-to 8 16 \\
        --batch 1 32 --threads 2 --out benchmarks/results/speed_per_mac.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch


def optimised_layout(path: Path, threads: int, tmp: Path) -> dict:
    import onnx

    from pass_zoo.export.latency import latency_session

    optimised = tmp / (path.stem + ".opt.onnx")
    latency_session(path, threads, optimized_path=optimised)
    graph = onnx.load(str(optimised)).graph
    counts = defaultdict(int)
    for node in graph.node:
        counts[f"{node.domain + ':' if node.domain else ''}{node.op_type}"] += 1
    nchwc = counts.get("com.microsoft.nchwc:Conv", 0)
    plain = counts.get("Conv", 0) + counts.get("com.microsoft:FusedConv", 0)
    return {"nchwc_convs": nchwc, "nchw_convs": plain,
            "reorders": counts.get("com.microsoft.nchwc:ReorderInput", 0) + counts.get("com.microsoft.nchwc:ReorderOutput", 0),
            "ops": dict(sorted(counts.items()))}


def op_profile(path: Path, threads: int, batch: int, img_size: int, runs: int, tmp: Path) -> dict:
    """ms per run summed by op type (ORT's node events), and each op type's share of the total."""
    from pass_zoo.export.latency import latency_session

    prefix = tmp / f"{path.stem}-b{batch}"
    session = latency_session(path, threads, profile_prefix=prefix)
    x = torch.randn(batch, 3, img_size, img_size, generator=torch.Generator().manual_seed(0)).numpy()
    for _ in range(2):
        session.run(None, {"input": x})
    for _ in range(runs):
        session.run(None, {"input": x})
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op, per_node = defaultdict(float), defaultdict(float)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"].get("op_name", "?")] += e["dur"] / 1000.0
            per_node[e["name"][:-len("_kernel_time")]] += e["dur"] / 1000.0
    for f in glob.glob(str(prefix) + "*"):
        os.unlink(f)
    total = sum(per_op.values())
    # the 2 warm-up runs are profiled too
    return {"ms_per_run": {k: round(v / (runs + 2), 4) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
            "share": {k: round(v / total, 4) for k, v in sorted(per_op.items(), key=lambda kv: -kv[1])},
            "node_ms": {k: round(v / (runs + 2), 4) for k, v in per_node.items()}}


def layer_macs(model, img_size: int) -> dict:
    """MACs per conv/linear module (batch 1), keyed by the module name."""
    import math

    import torch.nn as nn

    out = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, inp, o, name=name):
                k = 1 if isinstance(mod, nn.Linear) else math.prod(mod.kernel_size) * mod.in_channels // mod.groups
                out[name] = o.numel() * (mod.in_features if isinstance(mod, nn.Linear) else k)
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.zeros(1, 3, img_size, img_size))
    for h in hooks:
        h.remove()
    return out


def _block(module_path: str) -> str:
    """The block a module belongs to: its path up to the first index ("layer1.0.conv2" -> "layer1.0",
    "blocks.1.0.conv_pw" -> "blocks.1"); stem and head layers (no index) -> "stem/head"."""
    parts = module_path.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return "stem/head"


def per_block(profile: dict, macs: dict) -> list:
    """Per block: time and MACs ratio dense / slim and their quotient (1 = speed follows MACs).

    ORT names a fused node after the last op it absorbed ("/layer1/layer1.0/act1/Relu_output_0_nchwc"
    is conv1 + bn1 + act1), so times are summed per block, where fused names still belong; the scope's
    deepest dotted part ("layer1.0") names the block."""
    def module_of(node: str) -> str:
        dotted = [p for p in node.split("/") if "." in p and not p.endswith(("_nchwc", "_kernel_time"))]
        dotted = [p for p in dotted if not p.split(".")[-1].startswith(("Conv", "Relu", "Add"))]
        return dotted[-1] if dotted else ""

    times = {k: defaultdict(float) for k in profile}
    for k, prof in profile.items():
        for node, ms in prof["node_ms"].items():
            times[k][_block(module_of(node))] += ms
    block_macs = {k: defaultdict(int) for k in macs}
    for k, per_module in macs.items():
        for mod, n in per_module.items():
            block_macs[k][_block(mod)] += n
    rows = []
    for block, dm in block_macs["dense"].items():
        d_ms, s_ms = times["dense"].get(block, 0.0), times["slim"].get(block, 0.0)
        if d_ms > 0 and s_ms > 0:
            t_ratio, m_ratio = d_ms / s_ms, dm / max(block_macs["slim"].get(block, dm), 1)
            rows.append({"block": block, "dense_ms": round(d_ms, 4), "slim_ms": round(s_ms, 4), "macs_dense": dm,
                         "macs_slim": block_macs["slim"].get(block), "time_ratio": round(t_ratio, 3),
                         "macs_ratio": round(m_ratio, 3), "of_macs_ratio": round(t_ratio / m_ratio, 3)})
    return rows


def interleaved(paths: dict, threads: int, batch: int, img_size: int, repeats: int) -> dict:
    """Median ms per network, timed the way every pass-zoo latency figure is (``time_onnx``)."""
    from pass_zoo.export.latency import time_onnx

    times, _ = time_onnx(paths, img_size, [batch], threads, repeats, warmup=2)
    return {k: round(statistics.median(v), 3) for k, v in times[batch].items()}


def one(model_name: str, img_size: int, target: float, round_to: int, batches, threads: int, repeats: int,
        profile_runs: int, tmp: Path) -> dict:
    import timm

    from pass_zoo import build_layer_sequence, count_macs, select_units, slim
    from pass_zoo.export.onnx import export_graph
    from pass_zoo.graph.masks import to_channel_masks
    from pass_zoo.methods.torch_pruning import L1, group_scores

    torch.manual_seed(0)
    dense = timm.create_model(model_name, pretrained=False).eval()
    x = torch.zeros(1, 3, img_size, img_size)
    seq = build_layer_sequence(dense, x)
    units = select_units(group_scores(seq, L1().importance()), seq, target, round_to)
    slim_model, _ = slim(dense, to_channel_masks(units, seq), x)
    macs_ratio = count_macs(slim_model, x) / count_macs(dense, x)
    kept = [int(u.sum()) * g.unit_width for u, g in zip(units, seq.groups)]
    macs = {"dense": layer_macs(dense, img_size), "slim": layer_macs(slim_model, img_size)}
    paths = {}
    for name, net in (("dense", dense), ("slim", slim_model)):
        paths[name] = tmp / f"{model_name}-r{round_to}-{name}.onnx"
        export_graph(net, paths[name], img_size)
    row = {"model": model_name, "img_size": img_size, "target_macs": target, "round_to": round_to,
           "macs_ratio": round(macs_ratio, 4), "kept_widths": kept,
           "widths_not_multiple_of_16": sum(k % 16 != 0 for k in kept),
           "layout": {k: optimised_layout(p, threads, tmp) for k, p in paths.items()}, "batches": []}
    for batch in batches:
        entry = {"batch": batch}
        if profile_runs:
            entry["profile"] = {k: op_profile(p, threads, batch, img_size, profile_runs, tmp) for k, p in paths.items()}
            entry["blocks"] = per_block(entry["profile"], macs)
            for prof in entry["profile"].values():
                del prof["node_ms"]  # summarised per block above
        if repeats:
            ms = interleaved(paths, threads, batch, img_size, repeats)
            speedup = ms["dense"] / ms["slim"]
            entry.update({"dense_ms": ms["dense"], "slim_ms": ms["slim"], "speedup": round(speedup, 3),
                          "of_macs_ratio": round(speedup * macs_ratio, 3)})
        row["batches"].append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k not in ("profile", "blocks")}), model_name,
              f"round_to {round_to}",
              file=sys.stderr)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", default=["resnet50"])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--round-to", nargs="+", default=["8", "16"], help="multiples, or auto (pass-zoo's --round-to auto)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20, help="interleaved timed runs (0: layout and profile only)")
    p.add_argument("--profile-runs", type=int, default=10, help="profiled runs per network and batch (0: none)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    import onnxruntime as ort

    from pass_zoo.config import _round_to
    from pass_zoo.export.latency import nchwc_block_size
    from pass_zoo.fileio import atomic_write_json

    rows = []
    with tempfile.TemporaryDirectory(prefix="speed-per-mac-") as tmp:
        for model in args.model:
            for r in dict.fromkeys(_round_to(r) for r in args.round_to):  # auto may repeat a number
                rows.append(one(model, args.img_size, args.target_macs, r, args.batch, args.threads, args.repeats,
                                args.profile_runs, Path(tmp)))
    doc = {"runtime": f"onnxruntime {ort.__version__}", "threads": args.threads, "cpu_count": os.cpu_count(),
           "nchwc_block_size": nchwc_block_size(),
           "load_average": [round(v, 2) for v in os.getloadavg()], "command": " ".join(sys.argv), "results": rows}
    atomic_write_json(args.out, doc)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
