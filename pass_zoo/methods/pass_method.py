"""PASS as a mask producer: the prompt + hypernetwork search (``pass_search.py``), its hypernetwork the artefact."""
from __future__ import annotations

from ..graph.costs import count_params
from .pass_hypernet import hypernet_files, load_hypernet
from .pass_search import search
from .registry import Method, MethodContext, MethodResult, register_method


@register_method
class Pass(Method):
    name = "pass"
    baseline = False
    artefacts = ("hypernet.json", "hypernet.safetensors")
    metric_keys = ("hypernet_params",)

    def produce(self, ctx: MethodContext) -> MethodResult:
        cfg = ctx.config
        source = load_hypernet(cfg.transfer_from) if cfg.transfer_from else None  # another task's, frozen
        result = search(ctx.backbone, ctx.seq, ctx.prompt, ctx.train_loader, ctx.selection_budget(), cfg.search,
                        ctx.accelerator, train_head=ctx.new_head, hypernet=source, checkpoints=ctx.checkpoints)
        return MethodResult(result.masks, artefacts=hypernet_files(result.hypernet),
                            record={"search_losses": result.losses, "hypernet_params": count_params(result.hypernet)})
