"""PASS as a mask producer: the prompt + hypernetwork search (``search.py``), its hypernetwork the artefact."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...errors import PassZooError, one_line
from ...fileio import safetensors_bytes
from ...graph.cost_model import count_params
from ...method_registry import Method, MethodContext, MethodResult, register_method
from .hypernet import hypernet_files, load_hypernet
from .search import masks_at_budget, search


SEARCH_STATE = "search_state.safetensors"  # written by a budget-conditioned search only


@register_method
class Pass(Method):
    name = "pass"
    baseline = False
    artefacts = ("hypernet.json", "hypernet.safetensors")
    family_artefacts = artefacts + (SEARCH_STATE,)
    metric_keys = ("hypernet_params", "search_loss_final", "search_loss_chance", "search_at_chance",
                   "search_recoveries", "search_pinned_at")

    def produce(self, ctx: MethodContext) -> MethodResult:
        cfg = ctx.config
        source = load_hypernet(cfg.transfer_from) if cfg.transfer_from else None  # another task's, frozen
        result = search(ctx.backbone, ctx.seq, ctx.prompt, ctx.train_loader, ctx.selection_budget(), cfg.search,
                        ctx.accelerator, train_head=ctx.new_head, hypernet=source, checkpoints=ctx.checkpoints)
        record = {"search_losses": result.losses, "hypernet_params": count_params(result.hypernet), "search_recoveries": result.recoveries,
                  "search_pinned_at": result.pinned_at}
        record.update(chance_check(result.losses, ctx.backbone.num_classes))
        artefacts = hypernet_files(result.hypernet)
        if result.hypernet.budget_range is not None:
            # What the hypernetwork read, to emit the family's other members later: the prompt the search ended
            # with (fine-tuning goes on changing the run's own) and the backbone's buffers (BN statistics adapted
            # to the task scale the weight statistics; the weights themselves are the pretrained ones).
            state = {f"prompt.{k}": v for k, v in ctx.prompt.state_dict().items()}
            state.update({f"buffer.{k}": v for k, v in ctx.backbone.named_buffers()})
            state.update({f"head.{k}": v for k, v in ctx.backbone.get_classifier().state_dict().items()})
            artefacts[SEARCH_STATE] = safetensors_bytes({k: v.detach().cpu().contiguous() for k, v in state.items()},
                                                        {"format": "pass-zoo-search-state/1"})
        return MethodResult(result.masks, artefacts=artefacts, record=record)


    def member_masks(self, run_dir, backbone, seq, prompt, budget, search):
        hypernet = load_hypernet(run_dir)
        if hypernet.budget_range is None:
            raise PassZooError(f"{run_dir} was searched for a single budget; masks for other budgets need a run with "
                               "--search-budget-range")
        path = Path(run_dir) / SEARCH_STATE
        try:
            state = load_file(str(path))
            prompt.load_state_dict({k[7:]: v for k, v in state.items() if k.startswith("prompt.")}, strict=True)
            buffers = dict(backbone.named_buffers())
            saved = {k[7:]: v for k, v in state.items() if k.startswith("buffer.")}
            if saved.keys() != buffers.keys():
                raise PassZooError("its buffers are not this backbone's")
            with torch.no_grad():
                for name, value in saved.items():
                    buffers[name].copy_(value)
            # the head the search trained: a member fine-tunes from it, as the searching run does from its own
            head = backbone.get_classifier()
            saved = {k[5:]: v for k, v in state.items() if k.startswith("head.")}
            mine = head.state_dict()
            if saved.keys() == mine.keys() and all(saved[k].shape == mine[k].shape for k in mine):
                head.load_state_dict(saved)
        except Exception as exc:
            raise PassZooError(f"cannot read the search's state {path}: {one_line(exc)}") from exc
        return masks_at_budget(hypernet, backbone, seq, prompt, budget, search)


log = logging.getLogger(__name__)


def chance_check(losses, num_classes: int) -> dict:
    """Did the search learn? Its final loss (mean of the last tenth of the steps) against chance, ln(classes).

    A search whose loss ends at chance has masks that are its prior plus noise; the run says so in one
    warning line and in metrics.json (``search_at_chance``) instead of passing them off as learned."""
    if not losses or num_classes < 2:
        return {}
    tail = losses[-max(1, len(losses) // 10):]
    final, chance = sum(tail) / len(tail), math.log(num_classes)
    at_chance = bool(final >= 0.95 * chance)
    if at_chance:
        # benchmarks/README.md, "Why a search ends at chance" and "What broke them": a search that learned and
        # broke is pinned at its best state, so what is left here never learned at all (one of nine held-out
        # --no-prior searches at 10 % MACs).
        log.warning("the search did not learn: its loss ended at %.3f, chance is %.3f (ln %d classes), so its masks "
                    "are not learned. Rerun with another --seed, more --search-steps, a looser budget or, without "
                    "the prior, with it", final, chance, num_classes)
    return {"search_loss_final": round(final, 4), "search_loss_chance": round(chance, 4), "search_at_chance": at_chance}
