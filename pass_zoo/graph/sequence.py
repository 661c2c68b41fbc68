"""Layer sequence: any timm model as an ordered list of prunable channel groups.

The one object the rest of the pipeline reads: the groups (``groups.py``, walk order = first
execution in the forward pass), their exact MACs (``cost_model.py``) and the search-time gates
(``gates.py``) over one traced model.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import AdapterError
from .cost_model import CostModel, LatencyFeatures, ParamModel, attention_costs, layer_costs
from .gates import Gates
from .groups import ChannelGroup, GroupBuilder, _module_positions, build_graph


class LayerSequence:
    """An ordered list of ``ChannelGroup`` over one model, with exact MACs and search-time gates."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor, ignored_layers: Iterable[nn.Module] = ()):
        self.model = model
        self.example_input = example_input
        classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
        ignored = list(ignored_layers)
        if isinstance(classifier, nn.Module) and not isinstance(classifier, nn.Identity):
            ignored.append(classifier)  # the classifier's outputs are the task's classes: never pruned
        self.ignored = ignored
        was_training = model.training
        frozen = [p for p in model.parameters() if not p.requires_grad]
        model.eval()
        try:
            for p in frozen:  # the graph is traced through autograd: frozen weights would hide every layer
                p.requires_grad_(True)
            self.graph = build_graph(model, example_input)
            order, out_positions, attn_per_head = _module_positions(model, example_input)
        finally:
            model.train(was_training)
            for p in frozen:
                p.requires_grad_(False)
        builder = GroupBuilder(model, self.graph, ignored)
        self.groups: List[ChannelGroup] = builder.collect(order)
        self.excluded = builder.excluded  # (group root, why it stays dense)
        self.cost_model = CostModel(self.groups, layer_costs(model, self.groups, out_positions)
                                    + attention_costs(model, self.groups, attn_per_head))
        self.gates = Gates(model, self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    @property
    def names(self) -> List[str]:
        return [g.name for g in self.groups]

    @property
    def max_units(self) -> int:
        return max(g.units for g in self.groups)

    # ---- the cost model
    @property
    def costs(self) -> List:
        return self.cost_model.costs

    @property
    def dense_macs(self) -> int:
        return self.cost_model.dense_macs

    def macs(self, kept_units: Sequence[int]) -> int:
        return self.cost_model.macs(kept_units)

    def macs_batch(self, kept_units: torch.Tensor) -> torch.Tensor:
        return self.cost_model.macs_batch(kept_units)

    def unit_macs(self) -> List[float]:
        return self.cost_model.unit_macs()

    @property
    def param_model(self) -> ParamModel:
        """Parameters of the slim network as a function of the kept units (built on first use)."""
        if getattr(self, "_param_model", None) is None:
            self._param_model = ParamModel(self.model, self.groups, self.costs)
        return self._param_model

    @property
    def latency_features(self) -> LatencyFeatures:
        """The cost features a latency table is fitted on (built on first use)."""
        if getattr(self, "_latency_features", None) is None:
            self._latency_features = LatencyFeatures(self.groups, self.costs)
        return self._latency_features

    # ---- the gates
    def input_gates(self, unit_masks: Sequence[Optional[torch.Tensor]]):
        return self.gates.input_gates(unit_masks)

    @contextlib.contextmanager
    def gated(self, unit_masks: Sequence[Optional[torch.Tensor]]):
        with self.gates.gated(unit_masks):
            yield


def build_layer_sequence(model: nn.Module, example_input: torch.Tensor,
                         ignored_layers: Iterable[nn.Module] = ()) -> LayerSequence:
    """The one entry point: a model and an example input -> its ordered prunable groups."""
    try:
        return LayerSequence(model, example_input, ignored_layers)
    except AdapterError:
        raise
    except Exception as exc:  # tracing failures inside Torch-Pruning
        raise AdapterError(f"cannot build the dependency graph of {type(model).__name__}: {exc}") from exc
