"""Budgets: what the slim network may cost, in MACs, parameters or milliseconds.

A ``Budget`` is a cost of the slim network as a function of the units each group keeps (exact for
MACs and parameters; a fitted latency table for milliseconds), and the most it may be. The budgeted
selection (``masks.select_units``) only asks it ``cost`` / ``cost_batch`` and compares with
``limit``, so every method and every budget kind go through the same selection code.

* ``macs``    -- target = fraction of the dense MACs kept (``--target-macs``).
* ``params``  -- target = fraction of the dense network's parameters kept (``--target-params``): all
  parameters of the backbone with its task head, as ``count_params`` counts them (the prompt, which
  is not part of the backbone, excluded).
* ``latency`` -- target = milliseconds per batch (``--target-latency``), at the batch size and
  thread count the latency table was measured with; the cost model is the table's prediction.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..errors import BudgetError

KINDS = ("macs", "params", "latency")


@dataclass(frozen=True)
class Budget:
    kind: str  # macs | params | latency
    target: float  # as given: a fraction of dense (macs, params) or milliseconds (latency)
    cost: Callable[[Sequence[int]], float]  # kept units per group -> cost of the slim network
    cost_batch: Callable[[torch.Tensor], torch.Tensor]  # (N, groups) -> (N,)
    dense: float  # cost of the dense network (same unit as ``limit``)
    limit: float  # the most the slim network may cost
    detail: str = ""  # how the latency was measured (batch, threads), for messages

    @property
    def fraction(self) -> float:
        """``limit`` as a fraction of the dense cost (what a warm-up tightens towards)."""
        return self.limit / self.dense

    def at(self, fraction: float) -> "Budget":
        """The same cost at ``fraction`` of the dense cost (the search's budget warm-up, a family's members)."""
        limit = fraction * self.dense
        return dataclasses.replace(self, limit=limit, target=limit if self.kind == "latency" else fraction)

    def fraction_of(self, target: float) -> float:
        """A target in this budget's own terms (a fraction, or milliseconds for latency) as a fraction of the
        dense cost: what a budget-conditioned hypernetwork reads."""
        return float(target) / self.dense if self.kind == "latency" else float(target)

    @property
    def flag(self) -> str:
        return f"--target-{self.kind}"

    def describe(self, value: float) -> str:
        """A cost in the budget's own terms: "0.312 of the dense MACs", "4.21 ms (batch 1, 2 threads)"."""
        if self.kind == "latency":
            return f"{value:.3g} ms{f' ({self.detail})' if self.detail else ''}"
        return f"{value / self.dense:.3g} of the dense {'MACs' if self.kind == 'macs' else 'parameters'}"

    def unreachable(self, smallest: float, round_to: int) -> BudgetError:
        keeps = f"the smallest network that keeps {max(round_to, 1)} channel(s) per group"
        if self.kind == "macs":  # the message users and scripts already know
            return BudgetError(f"target {self.target:.3g} of the dense MACs cannot be met: {keeps} still has "
                               f"{smallest / self.dense:.3g}")
        if self.kind == "params":
            return BudgetError(f"--target-params {self.target:.3g} cannot be met: {keeps} still has "
                               f"{smallest / self.dense:.3g} of the dense parameters (the layers no group reaches "
                               "and the classifier stay dense)")
        return BudgetError(f"--target-latency {self.target:g} ms cannot be met: {keeps} still takes "
                           f"{smallest:.3g} ms by the latency table (dense {self.dense:.3g} ms; {self.detail})")


def macs_budget(seq, target: float) -> Budget:
    """At most ``target`` x the dense MACs (exact)."""
    if not 0.0 < target <= 1.0:
        raise BudgetError(f"target MACs fraction must be in (0, 1], got {target}")
    return Budget("macs", target, seq.macs, seq.macs_batch, seq.dense_macs, target * seq.dense_macs)


def params_budget(seq, target: float) -> Budget:
    """At most ``target`` x the parameters of the dense network (backbone with its task head; exact
    for the layers the groups reach, conservative for any other)."""
    if not 0.0 < target <= 1.0:
        raise BudgetError(f"--target-params must be in (0, 1], got {target}")
    model = seq.param_model
    return Budget("params", target, model.params, model.params_batch, model.dense, target * model.dense)


def latency_budget(seq, target_ms: float, table, detail: str = "") -> Budget:
    """At most ``target_ms`` milliseconds as ``table`` (a fitted ``predict_batch`` over
    ``LatencyFeatures``) predicts the slim network."""
    if not target_ms > 0:
        raise BudgetError(f"--target-latency must be > 0 ms, got {target_ms}")
    features = seq.latency_features

    def cost_batch(kept: torch.Tensor) -> torch.Tensor:
        return table.predict(features.batch(kept))

    def cost(kept: Sequence[int]) -> float:
        return float(cost_batch(torch.tensor([list(kept)], dtype=torch.long))[0])

    dense = cost([g.units for g in seq.groups])
    return Budget("latency", float(target_ms), cost, cost_batch, dense, float(target_ms), detail)


def as_budget(seq, budget) -> Budget:
    """A ``Budget`` as is; a plain number is a MACs fraction (the API's long-standing meaning)."""
    if isinstance(budget, Budget):
        return budget
    if budget is None:  # e.g. a method that read config.target_macs on a parameter or latency budget
        raise BudgetError("no budget to select under: pass the run's budget (MethodContext.budget)")
    return macs_budget(seq, float(budget))


def achieved(budget: Budget, kept: Sequence[int], measured_ms: Optional[float] = None) -> dict:
    """metrics.json's ``budget`` record: kind, target and what the masks achieve (for latency the
    re-measured milliseconds when given, with the table's prediction beside it)."""
    value = budget.cost(list(kept))
    record = {"kind": budget.kind, "target": budget.target}
    if budget.kind == "latency":
        record.update({"achieved": measured_ms, "predicted": round(value, 4), "dense_predicted": round(budget.dense, 4)})
    else:
        record.update({"achieved": value / budget.dense, "slim": int(value), "dense": int(budget.dense)})
    return record
