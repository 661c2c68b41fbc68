"""``latency``: dense vs slim on ONNX Runtime CPU, measured -- MACs do not predict speed.

Both networks are exported the same way (same exporter, opset and input size) to temporary files:
the dense one is ``base_arch`` at random init with the run's number of classes (weights do not
change the speed), the slim one is the run's model with its prompt. They run interleaved (dense,
slim, dense, slim, ...) on the same input so that drifts in machine load hit both equally, in a
process of their own sharing one spinning thread pool (``time_onnx``, ``ort_timer``); the median of
each is reported.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

from .onnx import INPUT_NAME, OnnxExportError, check_opset, export_graph, file_opset
from .timm_model import load_run_model
from ..config import resolve_round_to_auto_with
from ..errors import PassZooError, one_line
from ..integrity import verify_run_files
from ..graph.cost_model import count_macs


def time_onnx(models: dict, img_size: int, batches: Sequence[int], threads: int, repeats: int,
              warmup: int) -> Tuple[Dict[int, Dict[str, List[float]]], str]:
    """``({batch: {name: [ms per run]}}, thread pool kind)`` for ONNX files ``{name: path}``, run
    interleaved in a process of their own on one shared, spinning intra-op pool (see ``ort_timer``)."""

    spec = {"models": {k: str(v) for k, v in models.items()}, "input": INPUT_NAME, "img_size": int(img_size),
            "batches": [int(b) for b in batches], "threads": int(threads), "repeats": int(repeats),
            "warmup": int(warmup)}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("ort_timer.py")), json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        raise PassZooError(f"timing with ONNX Runtime failed: {lines[-1]}")
    out = json.loads(proc.stdout)
    return {int(b): runs for b, runs in out["times"].items()}, out["thread_pool"]


def latency_session(path, threads: int, profile_prefix=None, optimized_path=None):
    """The ONNX Runtime CPU session every latency figure of pass-zoo is measured with: all graph
    optimisations (constant folding, Conv+BN+activation fusion and the NCHWc blocked layout, which only
    takes convs whose channels are multiples of the CPU's block size), ``threads`` intra-op threads,
    sequential execution (one inter-op thread: the graph is a chain), idle threads that sleep. For
    the graph and ORT's per-node profile; the timings themselves come from ``time_onnx``.
    ``profile_prefix``: write ORT's
    per-node profile (JSON); ``optimized_path``: save the graph as ORT optimised it."""
    import onnxruntime as ort


    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # idle workers sleep: a spinning one would hold a core another session in this process needs
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile_prefix)
    if optimized_path:
        opts.optimized_model_filepath = str(optimized_path)
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxExportError(f"ONNX Runtime cannot load {path}: {one_line(exc)}") from exc


def runtime_name() -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} CPUExecutionProvider"


def measure_model_ms(model, img_size: int, batch: int = 1, threads: int = 2, repeats: int = 10,
                     warmup: int = 2, opset: int = 17) -> float:
    """Median ms per batch of ``model`` (exported to a temporary ONNX file) on ONNX Runtime's CPU
    provider. Weights do not change the speed; the global random state is left alone."""

    if repeats < 1 or warmup < 0 or threads < 1 or batch < 1:
        raise PassZooError("latency needs repeats >= 1, warmup >= 0, threads >= 1 and a batch size >= 1")
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory(prefix="pass-zoo-latency-") as tmp:
        path = Path(tmp) / "model.onnx"
        was_training = model.training
        try:
            export_graph(model, path, img_size, opset)
        finally:
            model.train(was_training)
        times, _ = time_onnx({"model": path}, img_size, [batch], threads, repeats, warmup)
        return statistics.median(times[batch]["model"])


def measure_latency(run_dir, batches: Sequence[int] = (1, 32), threads: int = 2, repeats: int = 20,
                    warmup: int = 3, opset: int = 17) -> dict:
    """Median ms per batch for the dense base model and the slim run model, and their ratio."""
    import timm


    check_opset(opset)
    if repeats < 1 or warmup < 0 or threads < 1 or not batches or min(batches) < 1:
        raise PassZooError("latency needs --repeats >= 1, --warmup >= 0, --threads >= 1 and batch sizes >= 1")
    run_dir = Path(str(run_dir).removeprefix("local-dir:"))
    verify_run_files(run_dir)  # the timings are reported beside the run's MACs
    slim_model = load_run_model(run_dir)
    base_arch, img_size = slim_model.base_arch, int(slim_model.spec["img_size"])
    model_kwargs = dict(slim_model.spec.get("model_kwargs") or {})  # e.g. a ViT's img_size (spec /2)
    model_kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
    dense_model = timm.create_model(base_arch, pretrained=False, num_classes=slim_model.num_classes,
                                    **model_kwargs).eval()

    macs_ratio = None
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file():
        macs_ratio = json.loads(metrics_path.read_text()).get("macs_ratio")
    if macs_ratio is None:  # count it: the prompt adds no MACs
        example = torch.zeros(1, 3, img_size, img_size)
        macs_ratio = count_macs(slim_model.model, example) / count_macs(dense_model, example)

    with tempfile.TemporaryDirectory(prefix="pass-zoo-latency-") as tmp:
        exporters, paths = {}, {}
        for name, model in (("dense", dense_model), ("slim", slim_model)):
            paths[name] = Path(tmp) / f"{name}.onnx"
            exporters[name] = export_graph(model, paths[name], img_size, opset)
        used_opset = file_opset(paths["slim"])  # the dynamo exporter may write a newer one than asked
        times, pool = time_onnx(paths, img_size, batches, threads, repeats, warmup)
    rows = []
    for batch in batches:
        dense_ms, slim_ms = statistics.median(times[batch]["dense"]), statistics.median(times[batch]["slim"])
        rows.append({"batch": batch, "dense_ms": round(dense_ms, 3), "slim_ms": round(slim_ms, 3),
                     "speedup": round(dense_ms / slim_ms, 3),
                     "dense_ms_all": [round(t, 3) for t in times[batch]["dense"]],
                     "slim_ms_all": [round(t, 3) for t in times[batch]["slim"]]})
    return {"run": str(run_dir), "base_arch": base_arch, "img_size": img_size, "threads": threads,
            "repeats": repeats, "warmup": warmup, "opset": used_opset, "exporter": exporters["slim"],
            "runtime": runtime_name(), "thread_pool": pool, "macs_ratio": macs_ratio,
            "results": rows}


def format_latency(report: dict) -> str:
    """The table ``pass-zoo latency`` prints."""
    lines = [f"{report['base_arch']} at {report['img_size']} px: dense (random init) vs slim ({report['run']})",
             f"{report['runtime']}, {report['threads']} thread(s) ({report.get('thread_pool', '?')} pool), "
             f"opset {report['opset']}, "
             f"median of {report['repeats']} interleaved runs after {report['warmup']} warm-up",
             f"{'batch':>5}  {'dense ms':>10}  {'slim ms':>10}  {'speedup':>8}  {'MACs kept':>9}"]
    for r in report["results"]:
        lines.append(f"{r['batch']:>5}  {r['dense_ms']:>10.2f}  {r['slim_ms']:>10.2f}  {r['speedup']:>7.2f}x  "
                     f"{100 * report['macs_ratio']:>8.1f}%")
    return "\n".join(lines)


_BLOCK_SIZE = None


def nchwc_block_size() -> int:
    """The channel block of ONNX Runtime's NCHWc convolutions on this CPU (8 with AVX2, 16 where MLAS
    uses AVX-512; 0: no NCHWc path, e.g. on ARM). A conv takes the blocked path only when its input
    and output channels are multiples of it; otherwise it runs as plain NCHW with layout reorders
    around it. Read off ORT itself: which of two one-conv graphs (16 and 24 channels) it rewrites."""
    global _BLOCK_SIZE
    if _BLOCK_SIZE is None:
        _BLOCK_SIZE = _probe_block_size()
    return _BLOCK_SIZE


def _probe_block_size() -> int:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def blocked(channels: int, tmp: Path) -> bool:
        w = numpy_helper.from_array(np.zeros((channels, channels, 3, 3), np.float32), "w")
        graph = helper.make_graph(
            [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "probe",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, channels, 8, 8])], [w])
        src, opt = tmp / f"c{channels}.onnx", tmp / f"c{channels}.opt.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
        latency_session(src, 1, optimized_path=opt)
        return any(n.domain == "com.microsoft.nchwc" and n.op_type == "Conv" for n in onnx.load(str(opt)).graph.node)

    try:
        with tempfile.TemporaryDirectory(prefix="pass-zoo-nchwc-") as tmp:
            if not blocked(16, Path(tmp)):
                return 0
            return 8 if blocked(24, Path(tmp)) else 16
    except Exception:  # no answer from ORT: assume the common AVX2 block
        return 8


def latency_round_to() -> int:
    """``--round-to auto``: channel multiples that keep every conv on ORT's NCHWc path on this CPU
    (its block size), and at least 16: on a 2-core AVX2 CPU (block 8) widths of 16 ran 0.87-0.99 of
    the MACs ratio against 0.74-0.91 at 8 for 50 %-MACs ResNet-50 and Lite0, batch 1 and 32
    (``benchmarks/speed_per_mac.py``), although both put every conv on the blocked path."""
    return max(16, nchwc_block_size())


resolve_round_to_auto_with(latency_round_to)
