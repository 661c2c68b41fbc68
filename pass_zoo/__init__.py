"""pass-zoo: PASS structured pruning (and VPNs unstructured pruning) for timm models.

Importing the package registers the ``pass_pruned`` architecture with timm, so exported
checkpoints load with ``timm.create_model("hf-hub:ORG/NAME", pretrained=True)``.
"""
from .errors import PassZooError
from .export.timm_model import PassPrunedModel, load_run_model, save_slim_model
from .graph.cost_model import count_macs, count_params
from .graph.masks import Masks, select_units
from .graph.sequence import LayerSequence, build_layer_sequence
from .graph.slim import slim
from .methods.weight_masks import WeightMasks, apply_weight_masks, prunable_weights, select_weights
from .pipeline import PruneConfig, prune

__version__ = "0.1.0"

__all__ = [
    "LayerSequence", "build_layer_sequence", "PassZooError", "PassPrunedModel", "load_run_model",
    "save_slim_model", "Masks", "select_units", "PruneConfig", "prune", "count_macs", "count_params", "slim",
    "WeightMasks", "prunable_weights", "select_weights", "apply_weight_masks", "__version__",
]
