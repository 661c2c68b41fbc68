"""Mask producers: PASS and Torch-Pruning's criteria (channel masks), VPNs and the unstructured
baselines (weight masks), one class each, behind one registry."""
from ..method_registry import (Method, MethodContext, MethodResult, get_method, list_methods, methods_of_budget,
                       register_method)
from . import pass_, torch_pruning, weight_baselines, vpns, direct_logits, ablations  # noqa: F401  (registers the built-in methods, PASS first)

__all__ = ["Method", "MethodContext", "MethodResult", "get_method", "list_methods", "methods_of_budget",
           "register_method"]
