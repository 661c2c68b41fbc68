"""Masks: the one object every pruning method produces, and the budgeted selection that makes it.

A mask set is a plain ``{group name: bool tensor over the group's root channels}``. PASS and every
baseline hand the same object to ``slim``; only the way the scores were obtained differs.

``select_units`` turns per-group scores into hard unit masks under a budget (``budget.py``: exact
MACs by default, or parameters, or a latency table's milliseconds -- the same code for each):

* *global* (the paper's choice): all units of all groups are ranked on one scale and the longest
  prefix whose slim network fits the budget is kept. The cost of a prefix is computed for the whole
  kept-count vector (conv/linear MACs and parameters are bilinear in the kept channels of adjacent
  groups, so a per-channel cost would only approximate them); a binary search finds the prefix
  because every budget's cost grows monotonically with it.
* *uniform*: every group keeps the same fraction, the largest fraction that fits.

``round_to`` keeps each group's kept channels a multiple of N: odd widths push CPU/GPU kernels off
their fast paths, so a slim model can run slower than the dense one.

``max_prune_ratio`` (Torch-Pruning's meaning) caps the fraction of any group's units that may be
removed: a global ranking lets a group whose scores are flat or small fall to one rounding step at
once (layer collapse), and the cap keeps at least ``1 - max_prune_ratio`` of every group.
"""
from __future__ import annotations

import json
import math
from typing import Dict, List, Sequence

import torch

from .budget import Budget, as_budget
from .sequence import LayerSequence
from ..errors import BudgetError
from ..fileio import atomic_write_bytes, safetensors_bytes

Masks = Dict[str, torch.Tensor]


def _unit_step(round_to: int, unit_width: int) -> int:
    """Units per rounding step, so that the kept width (= units * unit_width: channels per conv group
    slice, or head_dim per attention head) is a multiple of round_to."""
    if round_to <= 1:
        return 1
    return max(1, round_to // math.gcd(round_to, unit_width))


def _rounded(count: int, total: int, step: int, least: int = 0) -> int:
    """Round a kept-unit count to a multiple of ``step``; at least one step (and ``least``), at most everything."""
    if step > 1:
        count = step * int(math.floor(count / step + 0.5))
    return min(total, max(count, min(step, total), least))


def _least_kept(total: int, step: int, max_prune_ratio: float) -> int:
    """The fewest units a group may keep under the cap, rounded up to a whole step."""
    least = math.ceil((1.0 - max_prune_ratio) * total - 1e-9)
    return min(total, step * math.ceil(least / step)) if least > 0 else 0


def check_max_prune_ratio(max_prune_ratio: float) -> float:
    if not 0.0 < max_prune_ratio <= 1.0:  # also refuses NaN
        raise BudgetError(f"--max-prune-ratio must be in (0, 1], got {max_prune_ratio}")
    return float(max_prune_ratio)


def _kept_counts_global(order_gid: torch.Tensor, k: int, totals: List[int], steps: List[int],
                        least: List[int]) -> List[int]:
    counts = torch.bincount(order_gid[:k], minlength=len(totals)).tolist()
    return [_rounded(c, t, s, m) for c, t, s, m in zip(counts, totals, steps, least)]


def _within(bounds, totals: List[int], steps: List[int], least: List[int], budget: Budget):
    """Per-group (fewest, most) kept units from ``bounds``, widened to whole rounding steps (so a group can
    always move at least one step) inside the cap; the lower bounds are dropped where even they alone cost
    more than the budget (it tightened faster than they allow)."""
    lows = [min(t, max(m, s * math.floor(lo / s))) for (lo, _), t, s, m in zip(bounds, totals, steps, least)]
    most = [max(lo, min(t, s * math.ceil(hi / s))) for lo, (_, hi), t, s in zip(lows, bounds, totals, steps)]
    if budget.cost(lows) > budget.limit:
        lows = least
    return lows, most


def _fill(kept: List[int], scores, budget: Budget, totals, steps) -> List[int]:
    """Rounding leaves budget unused: greedily add the best next step of any group that still fits.

    Every group's candidate is costed in one batched query per added step; ties go to the first
    group in walk order."""
    if all(s == 1 for s in steps):
        return kept
    ranked = [torch.sort(s.detach().float().flatten().cpu(), descending=True).values for s in scores]
    kept_t = torch.tensor(kept, dtype=torch.long)
    totals_t = torch.tensor(totals, dtype=torch.long)
    steps_t = torch.tensor(steps, dtype=torch.long)
    eye = torch.eye(len(totals), dtype=torch.long)
    while True:
        open_ = kept_t < totals_t
        if not open_.any():
            return kept_t.tolist()
        cands = kept_t + eye * (torch.minimum(totals_t, kept_t + steps_t) - kept_t)  # row g: group g grown
        fits = open_ & (budget.cost_batch(cands) <= budget.limit)
        if not fits.any():
            return kept_t.tolist()
        next_score = torch.tensor([float(ranked[g][k]) if k < t else float("-inf")
                                   for g, (k, t) in enumerate(zip(kept_t.tolist(), totals))])
        best = int(torch.argmax(torch.where(fits, next_score, torch.tensor(float("-inf")))))
        kept_t = cands[best]


def _least(seq: LayerSequence, round_to: int, max_prune_ratio: float) -> List[int]:
    return [_least_kept(g.units, _unit_step(round_to, g.unit_width), max_prune_ratio) for g in seq.groups]


def smallest_kept(seq: LayerSequence, round_to: int = 1, max_prune_ratio: float = 1.0) -> List[int]:
    """Kept units of the smallest network a selection can produce (one rounding step per group, or what
    the cap ``max_prune_ratio`` leaves)."""
    least = _least(seq, round_to, check_max_prune_ratio(max_prune_ratio))
    return [_rounded(0, g.units, _unit_step(round_to, g.unit_width), m) for g, m in zip(seq.groups, least)]


def smallest_macs(seq: LayerSequence, round_to: int = 1, max_prune_ratio: float = 1.0) -> int:
    """MACs of the smallest network a selection can produce (one rounding step kept per group):
    budgets below it cannot be met. Groups left dense by the adapter set this floor."""
    return seq.macs(smallest_kept(seq, round_to, max_prune_ratio))


def check_reachable(seq: LayerSequence, budget, round_to: int = 1, max_prune_ratio: float = 1.0) -> Budget:
    """The budget (a ``Budget`` or a MACs fraction), or the one-line ``BudgetError`` saying that even the
    smallest network a selection can produce costs more."""
    budget = as_budget(seq, budget)
    smallest = budget.cost(smallest_kept(seq, round_to, max_prune_ratio))
    if smallest > budget.limit:
        error = budget.unreachable(smallest, round_to)
        if max_prune_ratio < 1.0:
            error = BudgetError(f"{error} (with --max-prune-ratio {max_prune_ratio:g}; raise it to go lower)")
        raise error
    return budget


def select_units(scores: Sequence[torch.Tensor], seq: LayerSequence, target,
                 round_to: int = 1, selection: str = "global", max_prune_ratio: float = 1.0,
                 bounds=None) -> List[torch.Tensor]:
    """Hard unit masks (bool) keeping the best-scoring units whose slim network fits the budget.

    ``target`` is a ``Budget`` (MACs, parameters or latency; see ``budget.py``) or a plain MACs
    fraction: slim MACs <= target * dense. No group loses more than ``max_prune_ratio`` of its units.
    ``bounds`` (global selection): per group, the (fewest, most) units it may keep -- a search step's
    limit on how far each group moves from the last step's masks."""
    _check_selection_input(scores, seq, round_to)
    budget = check_reachable(seq, target, round_to, max_prune_ratio)
    totals = [g.units for g in seq.groups]
    steps = [_unit_step(round_to, g.unit_width) for g in seq.groups]
    least = _least(seq, round_to, max_prune_ratio)
    if budget.limit >= budget.dense and budget.cost(totals) <= budget.limit:
        return [torch.ones(t, dtype=torch.bool) for t in totals]

    flat = torch.cat([s.detach().float().flatten().cpu() for s in scores])
    gid = torch.cat([torch.full((t,), i, dtype=torch.long) for i, t in enumerate(totals)])

    if selection == "global":
        order = torch.argsort(flat, descending=True, stable=True)
        order_gid = gid[order]
        most = totals
        if bounds is not None:
            least, most = _within(bounds, totals, steps, least, budget)

        def counts(k):
            return [min(c, m) for c, m in zip(_kept_counts_global(order_gid, k, totals, steps, least), most)]

        lo, hi = 0, flat.numel()  # invariant: prefix lo fits (it keeps the minimum), find the largest
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if budget.cost(counts(mid)) <= budget.limit:
                lo = mid
            else:
                hi = mid - 1
        kept = _fill(counts(lo), scores, budget, most, steps)
    elif selection == "uniform":
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            cand = [_rounded(int(round(mid * t)), t, s, m) for t, s, m in zip(totals, steps, least)]
            if budget.cost(cand) <= budget.limit:
                lo = mid
            else:
                hi = mid
        kept = [_rounded(int(round(lo * t)), t, s, m) for t, s, m in zip(totals, steps, least)]
    else:
        raise ValueError(f"unknown selection '{selection}' (global or uniform)")

    masks = []
    for s, k, t in zip(scores, kept, totals):
        m = torch.zeros(t, dtype=torch.bool)
        m[torch.argsort(s.detach().float().flatten().cpu(), descending=True, stable=True)[:k]] = True
        masks.append(m)
    return masks


def _check_selection_input(scores, seq: LayerSequence, round_to) -> None:
    """One score per unit of every group, all finite; a whole rounding multiple >= 1. A NaN sorts
    anywhere and a short score tensor would leave units unranked: either gives masks nobody chose."""
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise BudgetError(f"round_to must be a whole number >= 1, got {round_to!r}")
    if len(scores) != len(seq.groups):
        raise BudgetError(f"{len(scores)} score tensors for {len(seq.groups)} channel groups; one per group")
    for s, g in zip(scores, seq.groups):
        if not isinstance(s, torch.Tensor) or s.numel() != g.units:
            n = s.numel() if isinstance(s, torch.Tensor) else type(s).__name__
            raise BudgetError(f"scores of group '{g.name}' have {n} entries, the group has {g.units} units")
        if not bool(torch.isfinite(s.detach().float()).all()):
            raise BudgetError(f"scores of group '{g.name}' hold NaN or infinite values, which rank nothing: the "
                              "method's scores diverged (for a search: lower its learning rates)")


def to_channel_masks(unit_masks: Sequence[torch.Tensor], seq: LayerSequence) -> Masks:
    """Unit masks (one per group, in walk order) -> the public ``{group name: channel mask}``."""
    return {g.name: g.expand(m.bool().cpu()) for g, m in zip(seq.groups, unit_masks)}


def to_unit_masks(masks: Masks, seq: LayerSequence) -> List[torch.Tensor]:
    """The inverse of ``to_channel_masks``; checks the masks belong to this architecture."""
    missing = [g.name for g in seq.groups if g.name not in masks]
    extra = sorted(set(masks) - set(seq.names))
    if missing or extra:
        raise BudgetError(f"masks do not fit this model: missing groups {missing[:3]}, unknown groups {extra[:3]}")
    out = []
    for g in seq.groups:
        m = masks[g.name].bool().flatten()
        if m.numel() != g.channels:
            raise BudgetError(f"mask for group '{g.name}' has {m.numel()} channels, the model has {g.channels}")
        if not m.any():
            raise BudgetError(f"mask for group '{g.name}' keeps no channel; every group must keep at least one")
        unit = m[g.first_channels()]
        if not torch.equal(g.expand(unit), m):
            what = ("head (q, k, v rows)" if g.kind == "heads" else
                    "set of coupled channels (e.g. a gated linear unit's two halves)" if g.unit_index is not None
                    else f"of its {g.ch_groups} conv groups")
            raise BudgetError(f"mask for group '{g.name}' is not the same in each {what}")
        out.append(unit)
    return out


def masks_summary(masks: Masks, seq: LayerSequence) -> dict:
    """JSON-able per-group kept/total and the MACs the masks imply."""
    units = to_unit_masks(masks, seq)
    kept = [int(u.sum()) for u in units]
    macs = seq.macs(kept)
    # the group that lost the most: where a global ranking collapses a layer (see --max-prune-ratio)
    narrow = min(range(len(kept)), key=lambda i: kept[i] / seq.groups[i].units) if kept else None
    return {
        "format": "pass-zoo-masks/1",
        "macs_dense": int(seq.dense_macs),
        "macs_slim": int(macs),
        "macs_ratio": macs / seq.dense_macs,
        "narrowest_group": None if narrow is None else {
            "name": seq.groups[narrow].name, "kept": int(masks[seq.groups[narrow].name].sum()),
            "total": seq.groups[narrow].channels, "kept_fraction": kept[narrow] / seq.groups[narrow].units},
        "groups": [
            {"name": g.name, "order": i, "kept": int(masks[g.name].sum()), "total": g.channels,
             "ch_groups": g.ch_groups, "kind": g.kind, "units": g.units, "kept_units": k}
            for i, (g, k) in enumerate(zip(seq.groups, kept))
        ],
    }


def masks_files(masks: Masks, summary: dict) -> Dict[str, bytes]:
    """``{"masks.safetensors": uint8 per group, "masks.json": the summary}`` as bytes."""
    tensors = {name: m.cpu().to(torch.uint8).contiguous() for name, m in masks.items()}
    return {"masks.safetensors": safetensors_bytes(tensors, {"format": "pass-zoo-masks/1"}),
            "masks.json": json.dumps(summary, indent=2).encode()}


def save_masks(masks: Masks, summary: dict, folder) -> None:
    """``masks.safetensors`` + ``masks.json`` (``masks_files``), both written atomically."""
    for name, data in masks_files(masks, summary).items():
        atomic_write_bytes(folder / name, data)


def load_masks(path) -> Masks:
    from safetensors.torch import load_file

    return {k: v.bool() for k, v in load_file(str(path)).items()}
