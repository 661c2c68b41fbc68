"""What leaves a run: the timm-loadable slim model, its verified ONNX graph, evaluation and latency."""
from .timm_model import PassPrunedModel, load_run_model, save_slim_model

__all__ = ["PassPrunedModel", "load_run_model", "save_slim_model"]
