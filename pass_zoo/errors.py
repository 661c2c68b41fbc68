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
_ORCHESTRATORS = {"cli", "pipeline", "zoo", "transfer", "bench", "launch", "errors", "runio"}
_STAGE_NAMES = {"backbone": "backbone", "data": "data", "label_mapping": "label-mapping", "adapter": "adapter",
                "masks": "mask-selection", "search": "search", "hypernet": "search", "baselines": "baseline",
                "slim": "slim", "finetune": "fine-tune", "training": "training", "export": "export",
                "onnx_export": "ONNX-export", "checkpoint": "checkpoint", "evaluation": "eval",
                "latency": "latency", "card": "card", "hub": "publish", "costs": "costs", "check": "check",
                "prompt": "prompt", "families": "adapter", "recipes": "recipe"}


def stage_of(exc: BaseException):
    """The pipeline stage an exception escaped from, read off its traceback (None if not known)."""
    import os
    import traceback

    package = os.path.dirname(os.path.abspath(__file__))
    for frame in traceback.extract_tb(exc.__traceback__):
        path = os.path.abspath(frame.filename)
        if os.path.dirname(path) != package:
            continue
        module = os.path.splitext(os.path.basename(path))[0]
        if module not in _ORCHESTRATORS:
            name = _STAGE_NAMES.get(module, module)
            return f"{name} ({module}.{frame.name})"
    return None
