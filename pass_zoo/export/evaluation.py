"""``eval``: top-1 of an exported model, through timm (torch) or ONNX Runtime.

A target is a run folder, a ``local-dir:``/``hf-hub:`` name (loaded by timm, strictly) or an
``.onnx`` file (preprocessing read from its ``metadata_props``). By default the evaluation repeats
the one ``prune`` made: the run's dataset, validation subset, seed and batch size from
``metrics.json``, so the torch path reproduces the run's ``top1`` exactly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Tuple

import torch

from .onnx import ort_session, read_onnx_metadata
from .run_metrics import RUN, run_eval_defaults
from .timm_model import load_run_model
from ..data import DataSpec, data_spec_for, make_loader, val_split
from ..errors import DataError, PassZooError
from ..integrity import verify_target

_FALLBACK_BATCH = 64


def target_kind(target: str) -> str:
    """``onnx`` for an .onnx file, ``torch`` for anything timm loads."""
    return "onnx" if str(target).endswith(".onnx") else "torch"


def spec_from_metadata(meta: dict, path) -> DataSpec:
    """The preprocessing recorded in an ONNX file's ``metadata_props``."""
    missing = [k for k in ("input_size", "mean", "std") if k not in meta]
    if missing:
        raise PassZooError(f"{path} has no preprocessing metadata ({', '.join(missing)} missing); "
                           "export it with 'pass-zoo export'")
    return DataSpec.from_config(meta)


def _check_classes(model_names, num_outputs: Optional[int], dataset: str, data_names) -> None:
    if num_outputs is not None and num_outputs != len(data_names):
        raise DataError(f"the model predicts {num_outputs} classes, {dataset} has {len(data_names)}")
    if model_names and list(model_names) != list(data_names):
        i = next((i for i, (a, b) in enumerate(zip(model_names, data_names)) if a != b), 0)
        raise DataError(f"class {i} is '{model_names[i]}' in the model but '{data_names[i]}' in {dataset}")


def _load(target: str, threads: Optional[int]) -> Tuple[object, DataSpec, list, Optional[int]]:
    """``(predict function, preprocessing, class names, outputs)`` for either backend."""
    if target_kind(target) == "onnx":

        meta = read_onnx_metadata(target)
        session = ort_session(target, threads)
        name = session.get_inputs()[0].name
        out_dim = session.get_outputs()[0].shape[-1]

        def predict(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {name: x.float().numpy()})[0]).argmax(1)

        return predict, spec_from_metadata(meta, target), meta.get("class_names"), \
            out_dim if isinstance(out_dim, int) else None


    model = load_run_model(target)

    @torch.no_grad()
    def predict(x: torch.Tensor) -> torch.Tensor:
        return model(x).argmax(1)

    return predict, data_spec_for(model), model.pretrained_cfg.get("label_names"), model.num_classes


def evaluate_target(target, dataset: Optional[str] = None, val_subset=RUN, seed: Optional[int] = None,
                    batch_size: Optional[int] = None, threads: Optional[int] = None) -> dict:
    """Top-1 of ``target`` on a validation split; ``val_subset=None`` means the whole split.

    Settings left at their defaults come from the run when ``dataset`` is the run's own.
    """
    target = str(target)
    if target_kind(target) == "onnx" and not Path(target).is_file():
        raise PassZooError(f"ONNX file {target} does not exist")
    verify_target(target)  # the run's top-1 is printed beside this one: they must be of the same files
    run = run_eval_defaults(target)
    same_task = dataset is None or dataset == run.get("dataset")
    dataset = dataset or run.get("dataset")
    if not dataset:
        raise PassZooError(f"no dataset recorded for {target}; pass --dataset")
    if val_subset == RUN:
        val_subset = run.get("val_subset") if same_task else None
    if seed is None:
        seed = run.get("seed", 0) if same_task else 0
    batch_size = batch_size or (run.get("batch_size") if same_task else None) or _FALLBACK_BATCH

    # the run's top-1 is only comparable on the very same images
    same_setup = same_task and val_subset == run.get("val_subset") and seed == run.get("seed", 0)
    predict, spec, names, outputs = _load(target, threads)
    ds, data_names = val_split(dataset, spec, val_subset, seed)
    _check_classes(names, outputs, dataset, data_names)
    correct = total = 0
    for x, y in make_loader(ds, batch_size, False, seed):
        correct += int((predict(x) == y).sum())
        total += int(y.numel())
    return {"target": target, "backend": "onnxruntime" if target_kind(target) == "onnx" else "torch",
            "dataset": dataset, "val_subset": val_subset, "seed": seed, "batch_size": batch_size,
            "images": total, "correct": correct, "top1": correct / max(total, 1),
            "run_top1": run.get("top1") if same_setup else None}
