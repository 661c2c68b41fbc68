"""Mask producers: PASS and Torch-Pruning's criteria, one class each, behind one registry."""
from .registry import Method, MethodContext, MethodResult, get_method, list_methods, register_method
from . import pass_method, torch_pruning  # noqa: F401  (registers the built-in methods, PASS first)

__all__ = ["Method", "MethodContext", "MethodResult", "get_method", "list_methods", "register_method"]
