"""Small helpers shared by the training loops (the loops themselves stay readable in their stage)."""
from __future__ import annotations

import math
import sys

from tqdm.auto import tqdm


def make_accelerator(mixed_precision: str = "no"):
    """An ``Accelerator`` that also distributes on machines without GPUs.

    Accelerate only picks its multi-CPU (gloo) mode when told ``cpu=True``; without it, two
    processes started by ``accelerate launch``/``torchrun`` would each train alone.
    """
    import torch
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision)


def cosine_lambda(total_steps: int):
    """Multiplier for LambdaLR: cosine from 1 to 0 over ``total_steps``."""
    total = max(1, total_steps)
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


def cycle(loader):
    """Endless batches; reshuffles (and re-seeds distributed samplers) every epoch."""
    epoch = 0
    while True:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:
            raise ValueError("the data loader yielded no batch (dataset smaller than one batch?)")
        epoch += 1


def progress(accelerator, total: int, desc: str):
    return tqdm(total=total, desc=desc, disable=not accelerator.is_local_main_process, leave=False,
                file=sys.stderr, dynamic_ncols=True)
