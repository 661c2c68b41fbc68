"""Label mapping: reuse a pretrained classifier for a new task (frequency-based, as in ILM-VP).

FLM: run the (prompted) pretrained network over the target training set, count how often each
target class is predicted as each source class, then assign one-to-one greedily: take the largest
count (t, s), map t -> s, remove row t and column s, repeat. Class t's logit is then source logit
``mapping[t]``, which is exactly a row slice of the classifier -- so we fold it into the model.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn


def frequency_label_mapping(counts: torch.Tensor) -> List[int]:
    """Greedy one-to-one mapping from a ``[n_target, n_source]`` count matrix."""
    counts = counts.clone().double()
    n_target, n_source = counts.shape
    if n_target > n_source:
        raise ValueError(f"cannot map {n_target} target classes one-to-one onto {n_source} source classes")
    mapping = [-1] * n_target
    for _ in range(n_target):
        flat = int(torch.argmax(counts))
        t, s = divmod(flat, n_source)
        mapping[t] = s
        counts[t, :] = -1  # below any real count: a used row/column is never picked again
        counts[:, s] = -1
    return mapping


@torch.no_grad()
def prediction_counts(model: nn.Module, loader, n_target: int, n_source: int, accelerator=None) -> torch.Tensor:
    """``counts[t, s]``: how often an image of target class t is predicted as source class s."""
    model.eval()
    counts = torch.zeros(n_target, n_source, dtype=torch.long)
    for x, y in loader:
        pred = model(x).argmax(1)
        if accelerator is not None:
            pred, y = accelerator.gather_for_metrics((pred, y))
        counts.index_put_((y.cpu(), pred.cpu()), torch.ones_like(y.cpu()), accumulate=True)
    return counts


def fold_label_mapping(model: nn.Module, mapping: List[int]) -> nn.Module:
    """Replace the classifier by the rows of the mapped source classes (same logits, fewer outputs)."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"label mapping needs a Linear classifier, found {type(head).__name__}")
    idx = torch.as_tensor(mapping, dtype=torch.long)
    weight = head.weight.detach()[idx].clone()
    bias = head.bias.detach()[idx].clone() if head.bias is not None else None
    model.reset_classifier(len(mapping))
    new_head = model.get_classifier()
    with torch.no_grad():
        new_head.weight.copy_(weight)
        if bias is not None:
            new_head.bias.copy_(bias)
    return model
