"""The model as prunable groups: dependency groups, their MACs, search-time gates, masks, slimming."""
from .cost_model import count_macs, count_params
from .sequence import LayerSequence, build_layer_sequence

__all__ = ["LayerSequence", "build_layer_sequence", "count_macs", "count_params"]
