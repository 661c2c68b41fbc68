"""Small helpers shared by the training loops (the loops themselves stay readable in their stage)."""
from __future__ import annotations

import hashlib
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional

import torch.nn as nn
from tqdm.auto import tqdm

from ..config import PRECISIONS
from ..errors import DataError, PassZooError



def make_accelerator(mixed_precision: str = "no"):
    """An ``Accelerator`` that also distributes on machines without GPUs.

    Accelerate only picks its multi-CPU (gloo) mode when told ``cpu=True``; without it, two
    processes started by ``accelerate launch``/``torchrun`` would each train alone.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cpu = not torch.cuda.is_available()
    if mixed_precision not in PRECISIONS:
        raise PassZooError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got '{mixed_precision}'")
    if mixed_precision == "fp16" and cpu:
        # accelerate would silently train in float32 on the CPU
        raise PassZooError("--mixed-precision fp16 needs a GPU; on the CPU use bf16 (autocast) or no")
    if mixed_precision == "bf16" and not cpu and not torch.cuda.is_bf16_supported():
        raise PassZooError("--mixed-precision bf16 is not supported by this GPU; use fp16 or no")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        AcceleratorState._reset_state()  # a second run in this process may ask for another precision
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision)


def cosine_lambda(total_steps: int):
    """Multiplier for LambdaLR: cosine from 1 to 0 over ``total_steps``."""
    total = max(1, total_steps)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def _set_epoch(loader, epoch: int) -> None:
    if hasattr(loader, "set_epoch"):  # accelerate's loaders forward it to their sampler
        loader.set_epoch(epoch)
    elif hasattr(getattr(loader, "sampler", None), "set_epoch"):
        loader.sampler.set_epoch(epoch)


def _epoch_sampler(loader):
    """The sampler that can skip into an epoch (``data.EpochSampler``), wherever accelerate put it."""
    candidates = [getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    bs = getattr(loader, "batch_sampler", None)
    candidates += [getattr(bs, "sampler", None), getattr(getattr(bs, "batch_sampler", None), "sampler", None)]
    for c in candidates:
        if hasattr(c, "skip_next"):
            return c
    return None


class Batches:
    """Endless batches from ``loader`` that know their position: ``epoch`` and ``taken`` in it.

    ``Batches(loader, epoch, taken)`` continues exactly where a run at that position stopped: the
    epoch's order is a function of (seed, epoch), and the ``taken`` batches already used are skipped
    in the sampler, so no image is loaded twice.
    """

    def __init__(self, loader, epoch: int = 0, taken: int = 0):
        self.loader, self.epoch, self.taken = loader, epoch, taken
        self._it = None

    def position(self) -> dict:
        return {"epoch": self.epoch, "taken": self.taken}

    def __iter__(self):
        return self

    def _start_epoch(self):
        _set_epoch(self.loader, self.epoch)
        skip = self.taken
        sampler = _epoch_sampler(self.loader) if skip else None
        if sampler is not None:  # samples per step over all processes
            per_step = getattr(self.loader, "total_batch_size", None) or self.loader.batch_size
            sampler.skip_next(skip * per_step)
            skip = 0
        self._it = iter(self.loader)
        for _ in range(skip):  # a loader we did not build: skip by reading
            next(self._it, None)

    def __next__(self):
        for _ in range(2):  # the rest of a resumed epoch may be empty: then one more, new epoch
            if self._it is None:
                self._start_epoch()
            batch = next(self._it, None)
            if batch is not None:
                self.taken += 1
                return batch
            if self.taken == 0:
                raise DataError("the data loader yielded no batch (dataset smaller than one batch?)")
            self._it, self.epoch, self.taken = None, self.epoch + 1, 0
        raise DataError("the data loader yielded no batch (dataset smaller than one batch?)")


@dataclass
class LoopState:
    """Everything a training loop needs to continue bit for bit; the objects are updated in place."""

    stage: str
    total: int
    modules: Dict[str, nn.Module]
    optimizers: Dict[str, Any]
    schedulers: Dict[str, Any]
    batches: Batches
    losses: List[float] = field(default_factory=list)
    step: int = 0  # completed steps


def cycle(loader):
    """Endless batches; reshuffles (and re-seeds distributed samplers) every epoch."""
    return Batches(loader)


# How progress is shown: a bar on a terminal; on a log file or pipe (nohup, a scheduler) one line every
# ``log_every`` steps, since a bar there writes nothing readable until it ends. ``quiet``: neither.
PROGRESS = {"log_every": 50, "quiet": False}


def progress(accelerator, total: int, desc: str, initial: int = 0):
    hidden = not accelerator.is_local_main_process or PROGRESS["quiet"]
    if not hidden and not _is_terminal(sys.stderr):
        return LogLines(total, desc, initial, PROGRESS["log_every"])
    return tqdm(total=total, initial=initial, desc=desc, disable=hidden, leave=False, file=sys.stderr,
                dynamic_ncols=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class LogLines:
    """The progress-bar interface as plain lines: ``desc step/total  loss  lr  elapsed  eta``."""

    def __init__(self, total: int, desc: str, initial: int = 0, every: int = 50, stream=None):
        import time

        self.total, self.desc, self.n, self.every = total, desc, initial, max(1, every)
        self.stream = stream or sys.stderr
        self._start, self._start_n, self._clock = time.monotonic(), initial, time.monotonic
        self.postfix: dict = {}

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n % self.every == 0 or self.n == self.total:
            self._line()

    def _line(self) -> None:
        elapsed = self._clock() - self._start
        done = self.n - self._start_n
        eta = elapsed / done * (self.total - self.n) if done > 0 else float("nan")
        extra = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc} {self.n}/{self.total}{extra}  elapsed {elapsed:.0f}s  eta {eta:.0f}s",
              file=self.stream, flush=True)

    def close(self) -> None:
        pass


class StopRequest:
    """Ctrl-C (SIGINT) inside a training loop asks it to stop at the next step boundary.

    The loop then saves a checkpoint and stops cleanly instead of dying in the middle of an
    optimiser step. A second Ctrl-C stops at once (single process; under ``accelerate launch`` the
    launcher forwards the terminal's SIGINT again, so repeats are ignored there).
    """

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.flag = False
        self._saved = None

    def _handler(self, signum, frame):
        if self.flag and self.accelerator.num_processes == 1:
            raise KeyboardInterrupt
        self.flag = True

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._saved = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            signal.signal(signal.SIGINT, self._saved)
            self._saved = None

    def requested(self) -> bool:
        """True on every process as soon as any process was asked to stop (a collective call)."""
        if self.accelerator.num_processes == 1:
            return self.flag
        import torch

        flag = torch.tensor([1.0 if self.flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "sum").item() > 0)


def digest(tensors: Iterable) -> str:
    """sha256 over the bytes of ``tensors`` (moved to the CPU), in order."""
    import torch

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)} {t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_same_across_processes(accelerator, what: str, tensors) -> Optional[str]:
    """Raise a clear error unless every process holds bit-identical ``tensors``; returns the digest."""
    from accelerate.utils import gather_object

    mine = digest(tensors)
    if accelerator.num_processes == 1:
        return mine
    all_digests = gather_object([mine])
    if len(set(all_digests)) != 1:
        ranks = ", ".join(f"rank {i}: {d[:12]}" for i, d in enumerate(all_digests))
        raise PassZooError(f"{what} differ between processes ({ranks}); the distributed run diverged and its "
                           "result would depend on the process that saves it")
    return mine


def global_loss(loss, accelerator) -> float:
    """The loss averaged over processes: the loss of the global batch, and finite on all or none."""
    value = loss.detach()
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value.clone().float(), "mean")
    return float(value)


def take_step(loop, loss, accelerator, bar, ckpt, what: str, hint: str, record: Optional[float] = None) -> None:
    """One optimisation step of ``loop`` (a ``LoopState``): every optimiser and scheduler,
    the loss recorded, progress shown, a checkpoint when due. A non-finite loss stops the stage.
    ``record``: what the loop's loss history keeps instead of ``loss`` (the search keeps its cross-entropy
    alone, which its chance check compares with ln(classes), when auxiliary terms are added)."""
    value = global_loss(loss, accelerator)
    if not math.isfinite(value):
        raise ckpt.diverged(f"{what} loss became {value} at step {loop.step}", hint)
    for opt in loop.optimizers.values():
        opt.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    for opt in loop.optimizers.values():
        opt.step()
    for sched in loop.schedulers.values():
        sched.step()
    value = value if record is None else record
    loop.losses.append(value)
    loop.step += 1
    lr = next(iter(loop.optimizers.values())).param_groups[0]["lr"]
    bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2g}")
    bar.update(1)
    ckpt.after_step()
