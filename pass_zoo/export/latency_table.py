"""The latency table behind ``--target-latency``: milliseconds of any slim network, measured once.

Measuring every candidate of the selection is impossible (the binary search costs hundreds), so a
model's latency is fitted once from a few *probes*: real slim networks (Torch-Pruning removes the
channels), exported to ONNX and timed with ONNX Runtime on the machine at hand -- the dense network,
the smallest one the selection can produce, and networks whose groups keep random fractions (every
group its own, so the fit sees each layer type at many widths). The model is

    ms = sum_f coef_f * feature_f(kept units)

over ``graph.cost_model.LATENCY_FEATURES``: a constant, GEMM-like MACs (convs, linears), depthwise MACs,
attention matmul MACs and the activations the layers write and read (what BatchNorm, activations and
residual adds cost). Every feature is exact and non-decreasing in the kept units and the fit is
non-negative least squares, so the prediction is monotone -- what the budgeted selection's binary
search needs. Probes are rounded like the run (``--round-to``), so the table sees the widths the
selection produces.

The table is cached on disk (``$PASS_ZOO_CACHE``, else ``~/.cache/pass-zoo``), keyed by everything
the milliseconds depend on: model and its kwargs, input size, classes, the groups, batch, threads,
rounding, ONNX Runtime and torch versions and the CPU. A second run on the same machine reuses it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

from . import latency as latency_mod
from ..errors import BudgetError
from ..fileio import atomic_write_json
from ..graph import masks as graph_masks
from ..graph.cost_model import LATENCY_FEATURES
from ..graph.masks import to_channel_masks
from ..graph.slim import slim

log = logging.getLogger(__name__)

TABLE_FORMAT = "pass-zoo-latency-table/1"
DEFAULT_PROBES = 12


@dataclass
class LatencyTable:
    key: dict
    coef: List[float]  # ms per unit of each of ``features``
    features: List[str] = field(default_factory=lambda: list(LATENCY_FEATURES))
    probes: List[dict] = field(default_factory=list)  # {"kept": [...], "ms": float, "predicted": float}
    dense_ms: Optional[float] = None  # the dense probe, measured
    fit: dict = field(default_factory=dict)  # max / mean relative error over the probes

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) features -> (N,) predicted ms."""
        return features.double() @ torch.tensor(self.coef, dtype=torch.float64)

    def to_json(self) -> dict:
        return {"format": TABLE_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, doc: dict) -> "LatencyTable":
        if doc.get("format") != TABLE_FORMAT or list(doc.get("features", [])) != list(LATENCY_FEATURES):
            raise ValueError("not a latency table of this version")
        return cls(doc["key"], [float(c) for c in doc["coef"]], list(doc["features"]), list(doc["probes"]),
                   doc.get("dense_ms"), dict(doc.get("fit", {})))


def cache_dir() -> Path:
    root = os.environ.get("PASS_ZOO_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pass-zoo"


def cpu_name() -> str:
    """The CPU's model name and its number of logical cores."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} x{os.cpu_count()}"


def table_key(model_name: str, model_kwargs: dict, img_size: int, num_classes: int, seq, batch: int, threads: int,
              round_to: int, probes: int = DEFAULT_PROBES) -> dict:
    """Everything a latency table's milliseconds depend on."""
    import onnxruntime as ort

    groups = hashlib.sha256(json.dumps([[g.name, g.units, g.unit_width] for g in seq.groups]).encode()).hexdigest()
    return {"model": model_name, "model_kwargs": json.loads(json.dumps(model_kwargs, default=str)),
            "img_size": int(img_size), "num_classes": int(num_classes), "groups": groups[:16],
            "batch": int(batch), "threads": int(threads), "round_to": int(round_to), "probes": int(probes),
            "onnxruntime": ort.__version__, "torch": torch.__version__.split("+")[0], "cpu": cpu_name(),
            # tables timed with other thread pools or traced 'same' padding (earlier versions) are not reused
            "timer": "own process, shared pool", "same_padding": "constant"}


def table_path(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key["model"])
    return cache_dir() / "latency" / f"{safe}-{key['img_size']}px-b{key['batch']}-t{key['threads']}-{digest}.json"


def probe_kept(seq, round_to: int, n: int, seed: int = 0) -> List[List[int]]:
    """Kept units of the probes: dense, the smallest selectable network, and ``n - 2`` networks whose
    groups keep random fractions around a level that sweeps the range (rounded like the run)."""
    totals = [g.units for g in seq.groups]
    steps = [graph_masks._unit_step(round_to, g.unit_width) for g in seq.groups]
    probes = [list(totals), graph_masks.smallest_kept(seq, round_to)]
    gen = torch.Generator().manual_seed(seed)
    randoms = max(0, n - 2)
    for i in range(randoms):
        level = 0.9 - 0.75 * (i + 0.5) / randoms  # 0.9 ... 0.15
        jitter = torch.exp(0.4 * torch.randn(len(totals), generator=gen))
        frac = (level * jitter).clamp(0.0, 1.0).tolist()
        probes.append([graph_masks._rounded(int(round(f * t)), t, s) for f, t, s in zip(frac, totals, steps)])
    return probes


def nnls(a: torch.Tensor, b: torch.Tensor, iterations: int = 200) -> torch.Tensor:
    """Non-negative least squares (Lawson-Hanson active set): min |a x - b|, x >= 0."""
    a, b = a.double(), b.double()
    n = a.shape[1]
    x = torch.zeros(n, dtype=torch.float64)
    passive = torch.zeros(n, dtype=torch.bool)
    for _ in range(iterations):
        w = a.T @ (b - a @ x)
        candidates = (~passive) & (w > 1e-12)
        if not candidates.any():
            break
        passive[int(torch.argmax(torch.where(candidates, w, torch.tensor(-float("inf"), dtype=torch.float64))))] = True
        while True:
            z = torch.zeros(n, dtype=torch.float64)
            z[passive] = torch.linalg.lstsq(a[:, passive], b.unsqueeze(1)).solution.squeeze(1)
            if (z[passive] > 0).all():
                x = z
                break
            neg = passive & (z <= 0)
            alpha = torch.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > 1e-15
            x[~passive] = 0.0
    return x


def fit_table(features: torch.Tensor, ms: torch.Tensor) -> List[float]:
    """Non-negative coefficients of ``ms ~ features``, minimising the *relative* error (each probe's row
    divided by its ms), so the small networks a harsh budget selects fit as well as the dense one;
    columns are scaled to 1 for the solver."""
    weight = 1.0 / ms.double().clamp_min(1e-9)
    rows = features.double() * weight.unsqueeze(1)
    scale = rows.abs().max(0).values
    scale[scale == 0] = 1.0
    return (nnls(rows / scale, ms.double() * weight) / scale).tolist()


def build_table(model, seq, key: dict, measure=None, repeats: int = 10, warmup: int = 2) -> LatencyTable:
    """Measure the probes and fit the table (``measure(model) -> ms`` replaces ONNX Runtime in tests)."""

    if measure is None:
        def measure(m):
            return latency_mod.measure_model_ms(m, key["img_size"], key["batch"], key["threads"], repeats, warmup)
    probes = probe_kept(seq, key["round_to"], key["probes"])
    times = []
    for i, kept in enumerate(probes):
        units = [torch.arange(g.units) < k for g, k in zip(seq.groups, kept)]
        net = model if i == 0 else slim(model, to_channel_masks(units, seq), seq.example_input)[0]
        times.append(float(measure(net)))
        log.info("latency table: probe %d/%d %.3f ms", i + 1, len(probes), times[-1])
    features = seq.latency_features.batch(torch.tensor(probes, dtype=torch.long))
    ms = torch.tensor(times, dtype=torch.float64)
    table = LatencyTable(key, fit_table(features, ms), dense_ms=times[0])
    predicted = table.predict(features)
    rel = ((predicted - ms).abs() / ms.clamp_min(1e-9))
    table.fit = {"max_relative_error": round(float(rel.max()), 4), "mean_relative_error": round(float(rel.mean()), 4)}
    table.probes = [{"kept": k, "ms": round(t, 4), "predicted": round(float(p), 4)}
                    for k, t, p in zip(probes, times, predicted.tolist())]
    return table


def load_table(path: Path) -> Optional[LatencyTable]:
    """The cached table, or None when there is none (or it is unreadable: it is then rebuilt)."""
    try:
        return LatencyTable.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("latency table %s is unreadable (%s); measuring it again", path, exc)
        return None


def latency_table(model, seq, key: dict, measure=None, build: bool = True):
    """``(table, path, measured)``: the cached table for ``key``, or (``build``) a new one, measured
    and written atomically to the cache."""
    path = table_path(key)
    table = load_table(path)
    if table is not None and table.key == key:
        return table, path, False
    if not build:
        raise BudgetError(f"latency table {path} is missing")
    table = build_table(model, seq, key, measure)
    try:
        atomic_write_json(path, table.to_json())
    except Exception as exc:  # a read-only cache costs a re-measurement next time, not the run
        log.warning("cannot cache the latency table in %s: %s", path, exc)
    return table, path, True
