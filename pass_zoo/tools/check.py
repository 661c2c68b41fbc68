"""``pass-zoo check``: does the whole product work on a timm architecture? One line per stage.

On a random-init model at a small input size the check runs every stage a real run depends on::

    adapter  layer sequence (groups pruned / left dense)
    search   two steps of the real PASS search on a random batch -> masks under a 50 % MACs budget
             (halfway between the floor and dense when the groups left dense cost more than 45 %)
    slim     Torch-Pruning removes the masked units; the sequence's MACs equal count_macs(slim)
    exact    the gated (masked) network equals the slim one (eval mode, float64)
    export   save_slim_model -> config.json + model.safetensors
    reload   timm.create_model('local-dir:...', pretrained=True) rebuilds it strictly, same outputs
    onnx     model.onnx written and verified against torch by ONNX Runtime

The input size is the smallest that runs: 64 px, or the model's ``min_input_size``, upwards to its
default size, with the last feature map at least 2x2 (``check_setup``).

``--all`` runs a curated list of architectures, each in its own process with a timeout (one hang or
crash cannot stop the sweep), and writes a Markdown compatibility table. ``--sweep JSON`` picks the
architectures by a rule instead (``SWEEP_RULE``: one per timm model module, the first under a MACs
limit), records each result in the JSON as it finishes (a rerun resumes) and writes the same table.

Random weights hide errors: a LayerNorm gain of 1 or a layer scale of 1e-6 makes a wrong gate
invisible, and a zero-initialised classifier (MLP-Mixer) makes the output constant. The check
therefore perturbs every constant-initialised vector (norm gains and biases, layer scales), every
all-zero weight and BatchNorm's running statistics before comparing.
"""
from __future__ import annotations

import argparse
import dataclasses
import contextlib
import io
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..backbone import check_classifier, fixed_size_kwargs
from ..config import SearchConfig
from ..data import make_loader
from ..errors import BackboneError, NotAClassifierError, PassZooError, one_line
from ..fileio import atomic_write_json, atomic_write_text
from ..pipeline import make_prompt
from ..prompt import PromptedModel
from ..export.onnx import export_onnx
from ..export.timm_model import save_slim_model
from ..graph import cost_model, slim as slimming  # module-qualified: callers may substitute them
from ..graph.masks import smallest_macs, to_unit_masks
from ..graph.sequence import build_layer_sequence
from ..train.loop import make_accelerator
from ..methods.pass_.search import search

log = logging.getLogger(__name__)

STAGES = ("adapter", "search", "slim", "exact", "export", "reload", "onnx")
# masked == slim and reload: relative to the output scale (random deep nets reach |logits| >> 1)
# exact: compared in float64, where float32 rounding through a deep network cannot hide a wrong gate
EXACT_TOL, RELOAD_TOL = 1e-9, 1e-5
# ... unless the network itself is so ill-conditioned that float64 rounding alone passes 1e-9: its
# float64 noise is estimated from its float32 error (rounding error scales with the unit roundoff,
# float64's is 2**-29 of float32's), and the tolerance is this many times that estimate. Measured
# slim-vs-masked drift sits at 0.7-14 times the estimate; a wrong channel moves the output by far more
EXACT_NOISE_FACTOR = 1000.0
FLOAT64_PER_FLOAT32_ROUNDOFF = 2.0 ** -29
# masks that change the float64 output by less than this fraction of it: gates that are not applied
GATES_APPLIED_TOL = 1e-7
SMALL_CNN_SIZE = 64  # the smallest size tried; ViT/Swin-style models take img_size= at creation
SIZE_STEPS = (96, 128, 160, 192, 224, 256, 288, 320)  # tried in turn when a model does not run at 64 px
TARGET_MACS = 0.5

# The curated sweep of ``--all``: the paper's seven architectures first, then one or more models per
# timm family. Each entry is just a timm name; sizes and kwargs come from ``check_setup``.
CURATED = [
    "resnet18", "resnet34", "resnet50", "resnext50_32x4d", "vgg16", "vit_base_patch16_224",
    "swin_tiny_patch4_window7_224",
    "resnet10t", "wide_resnet50_2", "vgg11_bn", "vit_small_patch16_224", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "deit_small_patch16_224", "convnext_atto", "convnext_tiny",
    "efficientnet_b0", "tf_efficientnet_lite0", "mobilenetv2_100", "mnasnet_100", "tinynet_a",
    "mobilenetv3_large_100", "mobilenetv3_small_100", "lcnet_050", "regnetx_002", "regnety_008",
    "densenet121", "resnext26ts", "gernet_s", "dla34", "res2net50_26w_4s", "ese_vovnet19b_dw",
    "ghostnet_100", "rexnet_100", "mobilevit_xxs", "nf_resnet26",
]


@dataclass
class CheckResult:
    model: str
    family: str = ""
    img_size: int = 0
    model_kwargs: dict = field(default_factory=dict)
    groups: int = 0  # pruned groups
    head_groups: int = 0
    excluded: int = 0  # groups left dense
    macs_dense: int = 0
    macs_slim: int = 0
    target_macs: float = 0.0
    exact_diff: Optional[float] = None
    exact_tol: Optional[float] = None
    reload_diff: Optional[float] = None
    onnx_diff: Optional[float] = None
    stages: Dict[str, str] = field(default_factory=dict)  # stage -> ok | fail | skip
    reason: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(self.stages.get(s) == "ok" for s in STAGES)


def family_of(name: str) -> str:
    """timm's model file (``resnet``, ``vision_transformer``, ...): one family per file."""
    import timm.models

    return timm.models.model_entrypoint(name).__module__.rsplit(".", 1)[-1]


def _size_candidates(name: str, img_size: Optional[int]) -> List[int]:
    """Input sizes to try, smallest first: 64 px (or the model's ``min_input_size``) up to timm's
    default ``input_size``; ``img_size`` alone when given."""
    import timm

    if img_size:
        return [int(img_size)]
    cfg = timm.get_pretrained_cfg(name)
    # 64 px: a 4x4 patch grid at patch 16 (ViT-style models are created at it), 2x2 after a stride of 32
    floor = max(SMALL_CNN_SIZE, int((getattr(cfg, "min_input_size", None) or (0,))[-1]) if cfg else 0)
    default = int((getattr(cfg, "input_size", None) or (0,))[-1]) if cfg else 0
    return sorted({floor, *(s for s in SIZE_STEPS if floor < s <= max(default, floor)), max(default, floor)})


def check_setup(name: str, img_size: Optional[int] = None, seed: int = 0):
    """``(img_size, model_kwargs, model)``: the smallest input size the model runs at, and the model.

    Models with a fixed input size (patch grids, windows: ``fixed_input_size`` in timm's cfg) are
    created at the small size (``img_size=`` kwarg, recorded in the export so reload uses it); the
    others are created once and tried at each size. A size runs if the forward pass does and the last
    feature map keeps at least 2x2 positions (the model's total stride survives it; an ``img_size`` asked
    for only has to run): pooling kernels
    larger than their input, windows that do not tile, grids too small for the downsampling all fail
    there rather than inside Torch-Pruning's trace.
    """
    import timm


    cfg = timm.get_pretrained_cfg(name)
    fixed = cfg is not None and getattr(cfg, "fixed_input_size", False)
    sizes = _size_candidates(name, img_size)
    model, errors = None, []
    for size in sizes:
        kwargs = fixed_size_kwargs(name, size) if fixed else {}
        try:
            if model is None or fixed:
                model = None
                torch.manual_seed(seed)
                model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
                check_classifier(model, name)
                model = perturb(model, seed)
            _runs_at(model, size, stride_floor=not img_size)  # a size asked for only has to run
            return size, kwargs, model
        except NotAClassifierError:
            raise  # no size makes it one
        except Exception as exc:  # try the next size
            errors.append(f"{size} px: {one_line(exc)}")
    if len(sizes) == 1:
        raise BackboneError(f"{name} does not run at {sizes[0]} px ({errors[0].split(': ', 1)[1]})")
    raise BackboneError(f"{name} runs at none of the sizes {sizes[0]}-{sizes[-1]} px ({errors[0]}; {errors[-1]})")


def _runs_at(model: torch.nn.Module, size: int, stride_floor: bool = True) -> None:
    """A random-init forward at ``size`` px works and (``stride_floor``) the last feature map is at least 2x2."""
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    if not stride_floor:
        return
    info = getattr(model, "feature_info", None)
    reduction = None
    if isinstance(info, list) and info and isinstance(info[-1], dict):
        reduction = info[-1].get("reduction")
    if isinstance(reduction, (int, float)) and reduction > 0 and size < 2 * reduction:
        raise BackboneError(f"the last feature map is under 2x2 at {size} px (total stride {reduction:g})")


def perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial values for constant-initialised vectors and BN statistics (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.flatten()
            if p.dim() == 1 and flat.numel() > 1 and bool((flat == flat[0]).all()):
                if float(flat[0]) == 0.0:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)  # biases
                else:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)  # gains, layer scales
            elif p.dim() > 1 and not bool(p.any()):
                # zero-initialised weights (MLP-Mixer's and ResMLP's classifier): a constant output
                # would hide every gate
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def _scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the output scale (at least 1)."""
    return float((a - b).abs().max()) / max(1.0, float(a.abs().max()))


def exact_tolerance(out64: torch.Tensor, out32: torch.Tensor) -> float:
    """The masked == slim tolerance for a network whose float64 and float32 outputs on the same input
    are ``out64`` and ``out32``: ``EXACT_TOL``, or more where the network's own float64 rounding noise
    (its float32 error scaled by the ratio of the unit roundoffs) is already near it."""
    noise64 = _scaled_diff(out64, out32.double()) * FLOAT64_PER_FLOAT32_ROUNDOFF
    return max(EXACT_TOL, EXACT_NOISE_FACTOR * noise64)


class _Stage:
    """Context for one stage: records ok / fail with the first line of the error."""

    def __init__(self, result: CheckResult, name: str, echo):
        self.result, self.name, self.echo = result, name, echo
        self.detail = ""  # printed after "ok"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None:
            self.result.stages[self.name] = "ok"
            self.echo(f"{self.name:8s} ok" + (f"  ({self.detail})" if self.detail else ""))
            return False
        if not isinstance(exc, Exception):
            return False  # KeyboardInterrupt and friends
        text = one_line(exc)
        if not isinstance(exc, (PassZooError, _CheckFailed)):
            text = f"{type(exc).__name__}: {text}"  # a bug or a library error, not a refusal
            log.debug("%s", "".join(traceback.format_exception(exc_type, exc, tb)))
        self.result.stages[self.name] = "fail"
        self.result.reason = f"{self.name}: {text}"
        self.echo(f"{self.name:8s} fail: {text}")
        raise _StageFailed(self.name) from exc  # recorded: the check stops here, later stages stay "skip"


class _StageFailed(Exception):
    """A stage failed and its result holds why; only this ends ``run_check`` early."""


class _CheckFailed(Exception):
    """A check's comparison did not hold."""


def run_check(name: str, img_size: Optional[int] = None, echo=print, seed: int = 0,
              search_steps: int = 2) -> CheckResult:
    """Run every stage on ``name``; stops at the first failing stage (later stages are ``skip``)."""
    import timm


    t0 = time.time()
    result = CheckResult(name)
    for s in STAGES:
        result.stages[s] = "skip"
    try:
        result.family = family_of(name)
        with _Stage(result, "adapter", echo) as stage:
            size, model_kwargs, model = check_setup(name, img_size, seed)
            result.img_size, result.model_kwargs = size, model_kwargs
            echo(f"{name} ({result.family}) at {size} px" + (f", {model_kwargs}" if model_kwargs else ""))
            torch.manual_seed(seed)
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(4, 3, size, size, generator=gen)
            seq = build_layer_sequence(model, x[:1])
            result.groups, result.excluded = len(seq), len(seq.excluded)
            result.head_groups = sum(g.kind == "heads" for g in seq.groups)
            result.macs_dense = seq.dense_macs
            # 50 %, or halfway to dense when the groups left dense alone cost more than that
            floor = smallest_macs(seq, SearchConfig().round_to) / seq.dense_macs
            if floor > 0.95:  # a search over the rest could not change the output measurably
                first = f"; group '{seq.excluded[0][0]}': {seq.excluded[0][1]}" if seq.excluded else ""
                raise _CheckFailed(f"only {100 * (1 - floor):.1f} % of the MACs can be pruned: {len(seq.excluded)} "
                                   f"groups must stay dense{first}")
            result.target_macs = TARGET_MACS if floor <= TARGET_MACS - 0.05 else round((1 + floor) / 2, 2)
            stage.detail = (f"{result.groups} groups, {result.head_groups} of them attention heads; "
                            f"{result.excluded} left dense")
        with _Stage(result, "search", echo):
            prompt = make_prompt("additive", size)
            data = torch.utils.data.TensorDataset(x, torch.randint(0, 10, (4,), generator=gen))
            cfg = SearchConfig(steps=search_steps)
            with contextlib.redirect_stderr(io.StringIO()):  # progress bars
                found = search(model, seq, prompt, make_loader(data, 2, True, seed), result.target_macs, cfg,
                               make_accelerator(), train_head=False)
            model.eval()
            masks = found.masks
        with _Stage(result, "slim", echo) as stage:
            slim_model, history = slimming.slim(model, masks, x[:1])
            slim_model.eval()
            kept = [int(u.sum()) for u in to_unit_masks(masks, seq)]
            result.macs_slim = seq.macs(kept)
            counted = cost_model.count_macs(slim_model, x[:1])
            if counted != result.macs_slim:
                raise _CheckFailed(f"layer sequence predicts {result.macs_slim} MACs, the slim model has {counted}")
            if not result.macs_slim <= result.target_macs * result.macs_dense:
                raise _CheckFailed(f"slim MACs {result.macs_slim} exceed the budget")
            stage.detail = (f"{100 * result.macs_slim / result.macs_dense:.1f} % of {result.macs_dense / 1e6:.1f} M "
                            f"MACs, target {100 * result.target_macs:.0f} %")
        with _Stage(result, "exact", echo) as stage:
            model.double(), slim_model.double()  # the gates hook this very model: cast in place, then back
            try:
                with torch.no_grad():
                    dense = model(x.double())
                    with seq.gated([u.double() for u in to_unit_masks(masks, seq)]):
                        gated = model(x.double())
                    slimmed = slim_model(x.double())
            finally:
                model.float(), slim_model.float()
            with torch.no_grad():
                result.exact_tol = exact_tolerance(slimmed, slim_model(x))
            result.exact_diff = _scaled_diff(gated, slimmed)
            if not result.exact_diff <= result.exact_tol:
                raise _CheckFailed(f"masked and slim outputs differ by {result.exact_diff:.3g} (x output scale; "
                                   f"tolerance {result.exact_tol:.2g})")
            # relative to the output itself, without the floor of 1: a random-init transformer's MLPs add
            # little to a small output (EVA-02: 4e-5 of 0.17), yet float64 shows any applied gate
            if float((dense - gated).abs().max()) <= GATES_APPLIED_TOL * float(dense.abs().max()):
                raise _CheckFailed("the masks do not change the output: the gates are not applied")
            stage.detail = f"max |masked - slim| {result.exact_diff:.2g} x output scale"
            if result.exact_tol > EXACT_TOL:
                stage.detail += f"; tolerance {result.exact_tol:.2g} from the network's own float64 noise"
        with tempfile.TemporaryDirectory(prefix="pass-zoo-check-") as tmp:
            run_dir = Path(tmp) / "run"
            prompted = PromptedModel(slim_model, prompt).eval()
            with _Stage(result, "export", echo):
                save_slim_model(prompted, run_dir, base_arch=name, history=history, num_classes=10,
                                label_names=[str(i) for i in range(10)],
                                base_pretrained_cfg=dict(model.pretrained_cfg), img_size=size,
                                model_kwargs=model_kwargs)
            with _Stage(result, "reload", echo):
                loaded = timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()
                with torch.no_grad():
                    result.reload_diff = _scaled_diff(prompted(x), loaded(x))
                if not result.reload_diff <= RELOAD_TOL:
                    raise _CheckFailed(f"reloaded model differs by {result.reload_diff:.3g} (x output scale)")
            with _Stage(result, "onnx", echo) as stage:
                logging.getLogger("pass_zoo.export.onnx").setLevel(logging.ERROR)  # "random inputs only"
                # the product's 1e-4, scaled like the other comparisons: random deep nets reach
                # |logits| ~ 1e3, where float32 rounding alone differs by more than 1e-4
                with torch.no_grad():
                    scale = max(1.0, float(prompted(x).abs().max()))
                report = export_onnx(run_dir, tolerance=1e-4 * scale)
                result.onnx_diff = report["max_abs_diff_random"] / scale
                stage.detail = f"max |ORT - torch| {result.onnx_diff:.2g} x output scale"
    except _StageFailed:
        pass  # recorded by the stage that raised; anything raised outside a stage propagates
    result.seconds = round(time.time() - t0, 1)
    return result


# ------------------------------------------------------------------------------------ sweep
def _child(name: str, img_size: Optional[int], timeout: float, threads: int) -> CheckResult:
    """One model in its own process: a crash, a hang or a memory blow-up stays contained."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        out = fh.name
    cmd = [sys.executable, "-m", "pass_zoo.tools.check", "--model", name, "--json", out, "--threads", str(threads)]
    if img_size:
        cmd += ["--img-size", str(img_size)]
    root = str(Path(__file__).resolve().parents[2])  # this checkout, installed or not
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout, env=env)
        data = json.loads(Path(out).read_text()) if Path(out).stat().st_size else None
        if data is None:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            result = CheckResult(name, stages={s: "skip" for s in STAGES},
                                 reason=f"process exited with {proc.returncode}: {tail[:200]}")
        else:
            result = CheckResult(**data)
    except subprocess.TimeoutExpired:
        result = CheckResult(name, stages={s: "skip" for s in STAGES}, reason=f"timed out after {timeout:.0f} s")
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
    result.seconds = round(time.time() - t0, 1)
    return result


def run_all(names: List[str], img_size: Optional[int] = None, timeout: float = 900, threads: int = 1,
            echo=print) -> List[CheckResult]:
    results = []
    for i, name in enumerate(names):
        r = _child(name, img_size, timeout, threads)
        results.append(r)
        status = "PASS" if r.passed else f"FAIL  {r.reason}"
        echo(f"[{i + 1}/{len(names)}] {name:32s} {r.seconds:6.1f} s  {status}")
    return results


# ------------------------------------------------------------------------------ wide sweep
SWEEP_MAX_MACS = 300e6
SWEEP_RULE = ("one architecture per timm model module (family): the first model of the module, in "
              "`timm.list_models` order (timm's `test_*` stand-ins left out), that runs at <= {max_macs:.0f} M MACs "
              "at the smallest input size `check` accepts for it (64 px, or the model's `min_input_size`, "
              "upwards to its default size); a module with no such model is checked on its smallest "
              "(fewest MACs at that size), marked `> {max_macs:.0f} M` in the table; a module of encoders "
              "without a classifier is out of scope")


def timm_families() -> Dict[str, List[str]]:
    """timm model module -> its models, in ``timm.list_models`` order."""
    import timm
    import timm.models

    families: Dict[str, List[str]] = {}
    for name in timm.list_models():
        # timm's own modules only: plugins (this package's pass_pruned) register models too
        if not name.startswith("test_") and timm.models.model_entrypoint(name).__module__.startswith("timm.models."):
            families.setdefault(family_of(name), []).append(name)
    return dict(sorted(families.items()))


def sized_macs(name: str):
    """``(img_size, macs)`` at the smallest size ``check`` would use, built on the meta device (no
    memory, no compute), or on the CPU when an op has no meta kernel and the model is small."""
    import timm


    cfg = timm.get_pretrained_cfg(name)
    fixed = cfg is not None and getattr(cfg, "fixed_input_size", False)
    sizes = _size_candidates(name, None)
    errors = []
    for device in ("meta", "cpu"):
        model = None
        for size in sizes:
            kwargs = fixed_size_kwargs(name, size) if fixed else {}
            try:
                if model is None or fixed:
                    model = None
                    with torch.device(device):
                        model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
                        check_classifier(model, name)  # an encoder is out of scope, not a failure
                with torch.device(device):
                    x = torch.zeros(1, 3, size, size)
                macs = cost_model.count_macs(model, x)
                info = getattr(model, "feature_info", None)
                reduction = info[-1].get("reduction") if isinstance(info, list) and info and \
                    isinstance(info[-1], dict) else None
                if isinstance(reduction, (int, float)) and reduction > 0 and size < 2 * reduction:
                    raise BackboneError("last feature map under 2x2")
                return size, macs
            except NotAClassifierError:
                raise
            except Exception as exc:
                errors.append(f"{device} {size} px: {one_line(exc)[:120]}")
        if model is None or sum(p.numel() for p in model.parameters()) > 30e6:
            break  # too large to build for real just to count
    raise BackboneError(f"cannot size {name}: {errors[-1] if errors else 'no size'}")


def select_sweep(max_macs: float = SWEEP_MAX_MACS, echo=print) -> Dict[str, dict]:
    """family -> {"model", "img_size", "macs"} by ``SWEEP_RULE`` (``"over_max_macs": True`` for a family's
    smallest model when none fits), or {"skipped": why} when no model of the family can be sized."""
    chosen: Dict[str, dict] = {}
    for family, names in timm_families().items():
        smallest, encoders = None, 0
        for name in names:
            try:
                size, macs = sized_macs(name)
            except NotAClassifierError:
                encoders += 1
                continue
            except Exception as exc:
                log.info("sweep: %s: %s", name, exc)
                continue
            if macs <= max_macs:
                chosen[family] = {"model": name, "img_size": size, "macs": int(macs)}
                break
            if smallest is None or macs < smallest["macs"]:
                smallest = {"model": name, "img_size": size, "macs": int(macs), "over_max_macs": True}
        else:
            why = ("its models are encoders, not image classifiers" if encoders == len(names)
                   else f"none of its {len(names)} models can be built and sized")
            chosen[family] = smallest or {"skipped": why}
        echo(f"{family:28s} {chosen[family].get('model') or chosen[family]['skipped']}")
    return chosen


def run_sweep(json_path, md_path=None, command: str = "", max_macs: float = SWEEP_MAX_MACS, timeout: float = 900,
              threads: int = 1, machine: str = "", echo=print) -> List[CheckResult]:
    """Select by ``SWEEP_RULE`` (once), check each model in its own process, write JSON after every model
    and the Markdown table at the end. Resumable: models already in the JSON are not checked again."""

    path = Path(json_path)
    doc = read_sweep(path) if path.is_file() else {}
    if doc.get("max_macs") != max_macs or "selection" not in doc:
        doc = {"rule": SWEEP_RULE.format(max_macs=max_macs / 1e6), "max_macs": max_macs,
               "selection": select_sweep(max_macs, echo), "results": {}}
        atomic_write_json(path, doc)
    if machine:
        doc["machine"] = machine
    names = [v["model"] for v in doc["selection"].values() if "model" in v]
    for i, name in enumerate(names):
        if name in doc["results"]:
            continue
        r = _child(name, None, timeout, threads)
        doc["results"][name] = asdict(r)
        atomic_write_json(path, doc)
        echo(f"[{i + 1}/{len(names)}] {name:32s} {r.seconds:6.1f} s  " + ("PASS" if r.passed else f"FAIL  {r.reason}"))
    results = [CheckResult(**doc["results"][n]) for n in names if n in doc["results"]]
    if md_path:
        skipped = {f: v["skipped"] for f, v in doc["selection"].items() if "skipped" in v}
        over = {v["model"] for v in doc["selection"].values() if v.get("over_max_macs")}
        note = (f"Architectures: {doc['rule']}. {len(over)} of {len(doc['selection'])} modules are checked on a model "
                f"over {max_macs / 1e6:.0f} M MACs"
                + (f"; {len(skipped)} are left out: " + ", ".join(f"{f} ({why})" for f, why in sorted(skipped.items()))
                   if skipped else "")
                + ". " + (f"Machine: {doc['machine']}." if doc.get("machine") else ""))
        atomic_write_text(md_path, markdown_table(results, command, note=note,
                                                  over_max_macs={n: max_macs for n in over}))
    return results


def read_sweep(path: Path) -> dict:
    """A sweep's JSON as ``run_sweep`` wrote it, or one line saying what is wrong with it (it is resumed
    from, so a hand-edited or truncated file must not become a traceback or a wrong table)."""
    where = f"--sweep {path}"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PassZooError(f"cannot read {where}: {exc}") from exc
    except ValueError as exc:
        raise PassZooError(f"{where} is not valid JSON ({exc}); fix it or remove it to start the sweep again") from exc
    if not isinstance(doc, dict):
        raise PassZooError(f"{where} must hold a JSON object, got {type(doc).__name__}")
    selection, results = doc.get("selection", {}), doc.get("results", {})
    if not isinstance(selection, dict) or not all(isinstance(v, dict) and ("model" in v or "skipped" in v)
                                                  for v in selection.values()):
        raise PassZooError(f"{where}: 'selection' must map each family to {{\"model\": ...}} or {{\"skipped\": ...}}")
    if not isinstance(results, dict):
        raise PassZooError(f"{where}: 'results' must map model names to check results")
    fields = {f.name for f in dataclasses.fields(CheckResult)}
    for name, r in results.items():
        unknown = sorted(set(r) - fields) if isinstance(r, dict) else []
        if not isinstance(r, dict) or unknown or "model" not in r or not isinstance(r.get("stages", {}), dict):
            why = f"unknown keys {unknown[:3]}" if unknown else "it needs 'model' and a 'stages' mapping"
            raise PassZooError(f"{where}: results['{name}'] is not a check result ({why})")
    doc.setdefault("results", {})
    return doc


def markdown_table(results: List[CheckResult], command: str, note: str = "",
                   over_max_macs: Optional[Dict[str, float]] = None) -> str:
    """The compatibility table; ``over_max_macs``: model -> the sweep's MACs limit it exceeds."""
    over_max_macs = over_max_macs or {}
    passed = sum(r.passed for r in results)
    families = sorted({r.family for r in results if r.family})
    lines = [
        "# Compatibility",
        "",
        f"`pass-zoo check` on {len(results)} timm architectures from {len(families)} families: "
        f"**{passed}/{len(results)} ({100 * passed / max(1, len(results)):.0f} %) pass every stage**.",
        "",
        f"Produced by `{command}` (random init, small inputs, one CPU thread per model). Stages: "
        "`adapter` (layer sequence), `search` (2 real PASS search steps, 50 % MACs budget, or halfway "
        "to dense where the groups left dense cost more), `slim` "
        "(layer-sequence MACs == `count_macs` of the slim model), `exact` (masked == slim in float64, "
        f"max |diff| <= {EXACT_TOL:g} x output scale, or {EXACT_NOISE_FACTOR:g} x the network's own float64 noise "
        "where that is larger: its float32 error x 2^-29), `export`, `reload` (strict `local-dir:` reload "
        "through timm), `onnx` (ONNX Runtime vs torch <= 1e-4 x output scale; the output scale is "
        "max(1, max |logit|)). MACs count conv + linear layers and "
        "attention matmuls. `groups`: pruned groups (attention-head groups) / groups left dense."
        + (" " + note if note else ""),
        "",
        "| model | family | input | groups (heads) / dense | MACs kept | " + " | ".join(STAGES) + " | time | reason |",
        "|---|---|---|---|---|" + "---|" * len(STAGES) + "---|---|",
    ]
    for r in results:
        ratio = f"{100 * r.macs_slim / r.macs_dense:.1f} % of {r.macs_dense / 1e6:.0f} M" if r.macs_dense and r.macs_slim else ""
        if ratio and abs(r.target_macs - TARGET_MACS) > 1e-9:
            ratio += f" (target {100 * r.target_macs:.0f} %)"
        size = f"{r.img_size}" + (" (img_size kwarg)" if r.model_kwargs else "") if r.img_size else ""
        groups = f"{r.groups} ({r.head_groups}) / {r.excluded}" if r.groups else ""
        marks = " | ".join({"ok": "ok", "fail": "**fail**", "skip": "-"}[r.stages.get(s, "skip")] for s in STAGES)
        reason = r.reason.replace("|", "\\|")
        family = r.family + (f" (> {over_max_macs[r.model] / 1e6:.0f} M)" if r.model in over_max_macs else "")
        lines.append(f"| {r.model} | {family} | {size} | {groups} | {ratio} | {marks} | {r.seconds:.0f} s | {reason} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m pass_zoo.tools.check``: the per-model child of ``--all`` (and usable on its own)."""
    p = argparse.ArgumentParser(prog="python -m pass_zoo.tools.check")
    p.add_argument("--model", required=True)
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_check(args.model, args.img_size)  # pass_zoo/__init__ ran first: pass_pruned is registered
    if args.json:
        atomic_write_json(args.json, asdict(result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
