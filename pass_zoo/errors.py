"""User-facing errors: the CLI prints these as one line and exits non-zero."""
from __future__ import annotations

import re


class PassZooError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class AdapterError(PassZooError):
    """The layer-sequence adapter cannot prune this architecture safely."""


class BudgetError(PassZooError):
    """The requested compute budget cannot be met."""


class DataError(PassZooError):
    """A dataset is missing, empty or malformed."""


class BackboneError(PassZooError):
    """A model name or pretrained-weights source cannot be used."""


class NotAClassifierError(BackboneError):
    """The timm model has no classifier interface to find the task head by (an encoder)."""


class RunDirError(PassZooError):
    """The output folder cannot be used (or written: disk full, permissions)."""


class CheckpointError(PassZooError):
    """A run cannot be resumed from its checkpoints."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training: the loop stopped at a step boundary (the message says where it saved)."""


_WORKER_PREFIX = re.compile(r"^Caught \w+ in DataLoader worker process \d+")
_EXC_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception)?: (.+)$")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` as one line.

    An error raised inside a DataLoader worker comes back wrapped in the worker's whole traceback
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."); its last line is
    the original message, which is what the user needs (e.g. the file that could not be read).
    """
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    if _WORKER_PREFIX.match(lines[0]) and len(lines) > 1:
        match = _EXC_LINE.match(lines[-1])
        return match.group(1) if match else lines[-1]
    return lines[0]


# Modules that only wire stages together; the stage is the first pass_zoo module they called.
_ORCHESTRATORS = {"cli", "pipeline", "publish.zoo", "transfer", "tools.bench", "train.launch", "errors", "fileio",
                  "method_registry", "methods.pass_.method"}
_STAGE_NAMES = {"backbone": "backbone", "data": "data", "label_mapping": "label-mapping", "config": "config",
                "graph.groups": "adapter", "graph.tp_compat": "adapter", "graph.sequence": "adapter",
                "graph.cost_model": "adapter", "graph.gates": "adapter", "graph.families": "adapter",
                "graph.masks": "mask-selection", "methods.weight_masks": "mask-selection", "methods.vpns": "search",
                "methods.weight_baselines": "baseline", "export.sparsity": "export",
                "methods.pass_.search": "search", "methods.pass_.hypernet": "search", "methods.pass_.stats": "search",
                "methods.torch_pruning": "baseline", "graph.slim": "slim", "train.finetune": "fine-tune",
                "train.loop": "training", "export.timm_model": "export", "export.onnx": "ONNX-export",
                "train.checkpoint": "checkpoint", "export.evaluation": "eval", "export.run_metrics": "eval",
                "export.latency": "latency", "publish.card": "card", "publish.hub": "publish",
                "tools.measure_costs": "costs", "tools.check": "check", "prompt": "prompt", "recipes": "recipe"}


def stage_of(exc: BaseException):
    """The pipeline stage an exception escaped from, read off its traceback (None if not known)."""
    import os
    import traceback

    package = os.path.dirname(os.path.abspath(__file__))
    for frame in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(frame.filename)
        if not path.startswith(package + os.sep):
            continue
        module = os.path.splitext(os.path.relpath(path, package))[0].replace(os.sep, ".")
        if module not in _ORCHESTRATORS:
            name = _STAGE_NAMES.get(module, module)
            return f"{name} ({module.rsplit('.', 1)[-1]}.{frame.name})"
    return None
