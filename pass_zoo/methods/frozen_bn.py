"""BatchNorm of a frozen backbone during stage 1: batch statistics used, running statistics untouched."""
from __future__ import annotations

import torch.nn as nn


def batch_norms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class KeepRunningStats:
    """BN momentum 0 inside the block: batch statistics are used, running statistics never move.

    The batch counters are restored too, so the frozen backbone leaves the search bit for bit as it
    entered (and a resumed search, which ran fewer batches in this process, leaves the same state).
    """

    def __init__(self, model: nn.Module):
        self.bns = batch_norms(model)

    def __enter__(self):
        self.saved = [(bn.momentum, None if bn.num_batches_tracked is None else bn.num_batches_tracked.clone())
                      for bn in self.bns]
        for bn in self.bns:
            bn.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for bn, (momentum, tracked) in zip(self.bns, self.saved):
            bn.momentum = momentum
            if tracked is not None:  # train-mode forwards count batches; the backbone must come out untouched
                bn.num_batches_tracked.copy_(tracked)
