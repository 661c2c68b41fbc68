"""ONNX export of a run: ``model.onnx``, verified against the timm-loaded model before it exists.

What the graph holds, so that ONNX Runtime reproduces the fine-tuned predictions with no extra step:

* the learned prompt -- ``PassPrunedModel.prompt`` is traced with the network (an ``Add`` of a
  constant frame for the additive prompt; resize + pad + add for the pad prompt);
* the label mapping -- already folded into the classifier rows at prune time
  (``label_mapping.fold_label_mapping``): output ``i`` is task class ``i``, named in the metadata;
* BatchNorm -- folded into the convolutions by the exporter (eval mode) or ORT at load time.

What it does not hold: resizing and the mean/std normalisation. The input is the normalised
``float32`` NCHW image, exactly what the timm model takes; the recipe travels in ``metadata_props``
(``mean``, ``std``, ``input_size``, ``interpolation``, ``crop_pct``, ``class_names``, as JSON strings).

The file is written under a temporary name, checked (``onnx.checker``), compared with the torch
model on random and real inputs, and only then renamed to ``model.onnx``; ``export.json`` records
the comparison either way.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .run_metrics import run_eval_defaults
from .timm_model import load_run_model
from ..data import data_spec_for, val_split
from ..errors import DataError, PassZooError, one_line
from ..fileio import atomic_save_with, atomic_write_json, locked_run_dir, remove_temporaries
from ..integrity import ONNX_FILES, repin_onnx, sha256_file, verify_run_files

log = logging.getLogger(__name__)

ONNX_FORMAT = "pass-zoo-onnx/1"
DEFAULT_OPSET = 17
# Max |logit difference| ORT vs torch. Read at call time, so tests can tighten it.
PARITY_TOLERANCE = 1e-4
INPUT_NAME, OUTPUT_NAME = "input", "logits"
EXPORTERS = ("auto", "torchscript", "dynamo")
_REAL_BATCH = 32
_META_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode")


class OnnxExportError(PassZooError):
    """The model cannot be exported to ONNX, or the export does not reproduce it."""


# Opsets each exporter writes: the TorchScript exporter up to 20 (torch's limit), dynamo from 18 (asked
# for 17 it writes 18) up to the newest torch implements; below 17 the timm layers used here do not export.
TORCHSCRIPT_MAX_OPSET = 20
MAX_OPSET = 23


def check_opset(opset: int, exporter: str = "auto") -> int:
    """``--opset`` within what ``exporter`` writes; one line instead of the exporter's traceback."""
    top = TORCHSCRIPT_MAX_OPSET if exporter == "torchscript" else MAX_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int) or not DEFAULT_OPSET <= opset <= top:
        where = f" with --exporter {exporter}" if exporter != "auto" else ""
        raise OnnxExportError(f"--opset must be in [{DEFAULT_OPSET}, {top}]{where}, got {opset!r}")
    return opset


def file_opset(path) -> int:
    """The default-domain opset an ONNX file declares (what was used, whatever was asked)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


@contextlib.contextmanager
def _static_same_padding():
    """timm's TF-style 'same' padding (Lite0, EfficientNet-TF) with the pad widths as constants.

    ``pad_same`` computes them from the input's height and width, which the tracer records as a chain
    of Shape/Gather/Div/Ceil/Sub/Cast/Concat nodes before each Pad. The graph's height and width are
    fixed (only the batch axis is dynamic), so the widths are constants: reading them as Python ints
    leaves one constant Pad per layer, which ONNX Runtime fuses into the conv after it. On a 2-core CPU
    those nodes (and the pads) were about 1.8 ms of a 6.1 ms Lite0 batch-1 run, dense and slim alike.
    """
    import importlib

    # the modules, not the same-named functions timm.layers re-exports
    padding = importlib.import_module("timm.layers.padding")
    users = [importlib.import_module(f"timm.layers.{n}") for n in ("conv2d_same", "pool2d_same", "std_conv")]

    def pad_same(x, kernel_size, stride, dilation=(1, 1), value: float = 0):
        size = [int(d) for d in x.shape[-2:]]  # ints, not traced shape arithmetic
        return F.pad(x, padding.pad_same_arg(size, kernel_size, stride, dilation), value=value)

    modules = [m for m in [padding, *users] if hasattr(m, "pad_same")]
    originals = [m.pad_same for m in modules]
    for m in modules:
        m.pad_same = pad_same
    try:
        yield
    finally:
        for m, original in zip(modules, originals):
            m.pad_same = original


@contextlib.contextmanager
def _quiet():
    """The exporters print their progress, the IR graph of a failed TorchScript export (from C++, to the
    process's stdout: torch turns its ONNX log on whatever it was), and (dynamo) a logged traceback when
    the ONNX version converter falls back. A failure is reported in one line by ``export_graph``, so none
    of that reaches the terminal: Python's streams and the file descriptors behind them are silenced."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_graph(model: nn.Module, path, img_size: int, opset: int = DEFAULT_OPSET,
                 exporter: str = "auto") -> str:
    """Write ``model`` (eval mode, batch axis dynamic) as ONNX to ``path``; returns the exporter used.

    ``auto`` uses the TorchScript exporter and falls back to the dynamo one only if it fails. The
    TorchScript exporter is deprecated but, for timm CNNs (tf_efficientnet_lite0's dynamic 'same'
    padding included), it matches torch to ~1e-6 like dynamo, emits the requested opset (dynamo
    cannot write Pad at opset 17 and silently stays at 18) and takes ~2 s instead of ~20 s.
    """
    if exporter not in EXPORTERS:
        raise OnnxExportError(f"unknown exporter '{exporter}' (choose from {', '.join(EXPORTERS)})")
    check_opset(opset, exporter)
    model.eval()
    example = torch.zeros(2, 3, img_size, img_size)  # batch 2: batch 1 would invite specialisation
    first_error = None
    order = ("torchscript", "dynamo") if opset <= TORCHSCRIPT_MAX_OPSET else ("dynamo",)
    for name in (order if exporter == "auto" else (exporter,)):
        try:
            if name == "torchscript":
                with warnings.catch_warnings(), _static_same_padding(), _quiet():
                    warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
                    warnings.filterwarnings("ignore", message=".*feature will be removed.*")
                    warnings.filterwarnings("ignore", message=".*Converting a tensor to a Python.*")
                    # F.pad's reversed pad list: a Slice the exporter cannot fold and ORT folds anyway
                    warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
                    torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                                      output_names=[OUTPUT_NAME], opset_version=opset, dynamo=False,
                                      do_constant_folding=True,
                                      dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
            else:
                with _quiet():  # progress lines, and the version converter's logged traceback on a fallback
                    torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME],
                                      output_names=[OUTPUT_NAME], opset_version=opset, dynamo=True,
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verbose=False)
            return name
        except Exception as exc:
            first_error = first_error or exc
            log.info("%s ONNX exporter failed: %s", name, one_line(exc))
    raise OnnxExportError(f"cannot export {type(model).__name__} to ONNX: {one_line(first_error)}") from first_error


def onnx_metadata(model: nn.Module) -> dict:
    """``metadata_props`` for a timm model: its preprocessing and class names; every value is JSON."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    meta = {"pass_zoo_format": json.dumps(ONNX_FORMAT),
            "input": json.dumps("float32 NCHW RGB image, resized/cropped as below, scaled to [0, 1], "
                                "then (x - mean) / std")}
    for key in _META_KEYS:
        if cfg.get(key) is not None:
            meta[key] = json.dumps(list(cfg[key]) if isinstance(cfg[key], tuple) else cfg[key])
    names = cfg.get("label_names")
    meta["class_names"] = json.dumps(list(names) if names else [str(i) for i in range(model.num_classes)])
    if getattr(model, "base_arch", None):
        meta["base_arch"] = json.dumps(model.base_arch)
    return meta


def read_onnx_metadata(path) -> dict:
    """``metadata_props`` of an ONNX file, JSON values decoded (plain strings kept as they are)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OnnxExportError(f"cannot read ONNX file {path}: {one_line(exc)}") from exc
    meta = {}
    for prop in proto.metadata_props:
        try:
            meta[prop.key] = json.loads(prop.value)
        except ValueError:
            meta[prop.key] = prop.value
    return meta


def ort_session(path, threads: Optional[int] = None):
    """An ONNX Runtime CPU session; ``threads`` fixes the intra-op pool (None = ORT's default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # ORT's warnings about unused initialisers are noise here
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise OnnxExportError(f"ONNX Runtime cannot load {path}: {one_line(exc)}") from exc


def conditioning_check(model: nn.Module, session, x: torch.Tensor) -> dict:
    """ORT's and torch's own float32 error against a float64 torch reference on one batch.

    Some trained networks amplify rounding (e.g. BN channels with zero variance and eps 1e-3 scale
    differences by ~30 per layer), so even torch float32 differs from the exact function by more
    than 1e-4. Then the fair test is that ONNX Runtime is as close to the exact function as torch.
    """
    import copy

    ref64 = copy.deepcopy(model).double()
    with torch.no_grad():
        exact = ref64(x.double()).numpy()
        torch32 = model(x).float().numpy()
    ort32 = session.run(None, {session.get_inputs()[0].name: x.float().numpy()})[0]
    return {"torch_fp32_vs_fp64": float(abs(torch32 - exact).max()),
            "ort_fp32_vs_fp64": float(abs(ort32 - exact).max())}


# ORT may be this many times further from the float64 reference than torch float32 is.
CONDITIONING_FACTOR = 4.0


def max_abs_diff(model: nn.Module, session, x: torch.Tensor) -> float:
    """max |torch logits - ORT logits| on one batch."""
    with torch.no_grad():
        ref = model(x).float().numpy()
    out = session.run(None, {session.get_inputs()[0].name: x.float().numpy()})[0]
    if out.shape != ref.shape:
        raise OnnxExportError(f"ONNX output has shape {out.shape}, torch gives {ref.shape}")
    return float(abs(out - ref).max())


def export_onnx(run_dir, opset: int = DEFAULT_OPSET, *, real_inputs: Optional[torch.Tensor] = None,
                dataset: Optional[str] = None, exporter: str = "auto",
                tolerance: Optional[float] = None) -> dict:
    """(Re-)write ``RUN/model.onnx`` and ``RUN/export.json``; returns what export.json holds.

    ``real_inputs``: a batch of normalised task images; by default the first images of the run's
    validation subset (dataset, subset and seed from ``metrics.json``), when that data is available.
    Raises ``OnnxExportError`` -- and leaves no ``model.onnx`` -- when ORT and torch differ by more
    than ``tolerance`` (default ``PARITY_TOLERANCE``) on either input.

    Holds the run folder's lock (a running ``prune`` is never written into) and first removes the
    temporaries an export or run killed mid-write left behind.
    """
    folder = Path(str(run_dir).removeprefix("local-dir:"))
    check_opset(opset, exporter)
    if not folder.is_dir():
        return _export_onnx(folder, opset, real_inputs, dataset, exporter, tolerance)
    with locked_run_dir(folder, "export"):
        remove_temporaries(folder)
        # an export of edited files would be pinned as the run's own (the files it rewrites aside)
        verify_run_files(folder, ignore=ONNX_FILES)
        return _export_onnx(folder, opset, real_inputs, dataset, exporter, tolerance)


def _export_onnx(run_dir: Path, opset: int, real_inputs: Optional[torch.Tensor], dataset: Optional[str],
                 exporter: str, tolerance: Optional[float]) -> dict:
    import onnx
    import onnxruntime


    if opset < DEFAULT_OPSET:
        raise OnnxExportError(f"--opset must be at least {DEFAULT_OPSET}, got {opset}")
    run_dir = Path(str(run_dir).removeprefix("local-dir:"))
    tol = PARITY_TOLERANCE if tolerance is None else tolerance
    model = load_run_model(run_dir)
    img_size = int(model.spec["img_size"])
    real_source = None if real_inputs is None else f"given batch of {len(real_inputs)} images"
    if real_inputs is None:
        real_inputs, real_source = _run_val_batch(run_dir, model, dataset)
    random_inputs = torch.randn(5, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))

    report = {"format": ONNX_FORMAT, "onnx_file": "model.onnx", "opset": None, "exporter": None,
              "tolerance": tol, "max_abs_diff_random": None, "max_abs_diff_real": None,
              "real_inputs": real_source, "sha256": None, "passed": False,
              "model_sha256": sha256_file(run_dir / "model.safetensors"),  # the weights this export was made of
              "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}

    def build(tmp: str) -> None:
        try:
            report["exporter"] = export_graph(model, tmp, img_size, opset, exporter)
            proto = onnx.load(tmp)  # with the weights the dynamo exporter writes beside it (TMP.data)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{tmp}.data")  # the model is saved in one file below
        for key, value in onnx_metadata(model).items():
            proto.metadata_props.add(key=key, value=value)
        proto.doc_string = f"pass-zoo slim {model.base_arch} with its prompt; label mapping folded into the classifier"
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)
        report["opset"] = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
        session = ort_session(tmp)
        report["max_abs_diff_random"] = max_abs_diff(model, session, random_inputs)
        if real_inputs is not None:
            report["max_abs_diff_real"] = max_abs_diff(model, session, real_inputs)
        worst = max(d for d in (report["max_abs_diff_random"], report["max_abs_diff_real"]) if d is not None)
        report["rule"] = f"max |ORT - torch| <= {tol:g}"
        if not worst <= tol and worst == worst:
            # Beyond the absolute tolerance: accept only if torch float32 itself is that far from
            # float64 on the same inputs (an ill-conditioned network, not an export error).
            checks = [conditioning_check(model, session, x) for x in (random_inputs, real_inputs) if x is not None]
            report["conditioning"] = checks
            if all(c["ort_fp32_vs_fp64"] <= max(tol, CONDITIONING_FACTOR * c["torch_fp32_vs_fp64"]) for c in checks):
                report["rule"] = (f"max |ORT - fp64 torch| <= max({tol:g}, {CONDITIONING_FACTOR:g} x "
                                  "max |fp32 torch - fp64 torch|)")
                worst = tol
        if not worst <= tol:  # also catches NaN
            raise OnnxExportError(f"ONNX Runtime and torch disagree: max |logit difference| {worst:.3g} "
                                  f"> {tol:g}; no model.onnx written (details in {run_dir / 'export.json'})")
        report["sha256"], report["passed"] = sha256_file(tmp), True  # the bytes the rename publishes

    try:
        atomic_save_with(run_dir / "model.onnx", build)
    except Exception as exc:
        # A model.onnx from an earlier export no longer matches what export.json says: remove it.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(run_dir / "model.onnx")
        report.update(passed=False, sha256=None, error=one_line(exc))
        atomic_write_json(run_dir / "export.json", report)
        error = exc if isinstance(exc, OnnxExportError) else \
            OnnxExportError(f"ONNX export of {run_dir} failed: {one_line(exc)}")
        error.report = report  # the numbers, for callers that record them elsewhere (prune's metrics)
        if error is exc:
            raise
        raise error from exc
    atomic_write_json(run_dir / "export.json", report)
    return report


def record_onnx(metrics: dict, report: Optional[dict], error: Optional[BaseException]) -> None:
    """The export's outcome in a run's metrics: the largest parity difference, and the error if any."""
    metrics.pop("onnx_error", None)
    if error is not None:
        metrics["onnx_error"] = str(error)
    report = report or {}
    diffs = [d for d in (report.get("max_abs_diff_random"), report.get("max_abs_diff_real")) if d is not None]
    metrics["onnx_max_abs_diff"] = max(diffs) if diffs else None


def export_run_onnx(run_dir, metrics: Optional[dict] = None, **kwargs):
    """``export_onnx`` with its outcome recorded in ``metrics`` (default: the run's metrics.json, when the
    export got as far as a report). Returns ``(report, error)``; the caller decides when to raise."""
    run_dir = Path(str(run_dir).removeprefix("local-dir:"))
    try:
        report, error = export_onnx(run_dir, **kwargs), None
    except PassZooError as exc:
        report, error = getattr(exc, "report", None), exc
    if metrics is not None:
        record_onnx(metrics, report, error)
    elif report is not None and (run_dir / "metrics.json").is_file():  # keep prune's record in step with the files
        saved = json.loads((run_dir / "metrics.json").read_text())
        record_onnx(saved, report, error)
        repin_onnx(run_dir, saved)  # the rewritten model.onnx and export.json are the run's now
        atomic_write_json(run_dir / "metrics.json", saved)
    return report, error


def _run_val_batch(run_dir: Path, model: nn.Module, dataset: Optional[str]):
    """The first images of the run's validation subset, or ``(None, reason)`` when not available."""

    defaults = run_eval_defaults(run_dir)
    dataset = dataset or defaults.get("dataset")
    if not dataset:
        log.warning("no dataset known for %s: ONNX parity is checked on random inputs only", run_dir)
        return None, "none (no dataset in metrics.json)"
    try:
        ds, _ = val_split(dataset, data_spec_for(model), defaults.get("val_subset"), defaults.get("seed", 0))
    except DataError as exc:
        log.warning("ONNX parity on random inputs only: %s", exc)
        return None, f"none ({exc})"
    n = min(_REAL_BATCH, len(ds))
    return torch.stack([ds[i][0] for i in range(n)]), f"{dataset} validation, first {n} images"


