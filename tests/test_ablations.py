"""PASS's ablations: its masks re-probed from scratch, and its per-layer counts with other channels.
Each keeps PASS's budget exactly and starts its stage 1 from the head and prompt PASS started from."""
from __future__ import annotations

import pytest
import torch

from pass_zoo.config import PruneConfig, SearchConfig
from pass_zoo.methods import MethodContext, get_method
from pass_zoo.prompt import AdditivePrompt
from pass_zoo.train.loop import make_accelerator

from test_search_learns import _separable, _tiny


def _produce(method, monkeypatch=None, seen=None):
    model, seq = _tiny()
    prompt = AdditivePrompt(32, 4)
    if monkeypatch is not None:
        import pass_zoo.methods.torch_pruning as tpm
        real = tpm.train_on_masks

        def spy(model_, seq_, prompt_, loader, units, cfg, accelerator, train_head=True):
            seen.update(prompt=prompt_.delta.detach().clone(), head=model_.get_classifier().weight.detach().clone(),
                        units=[u.clone() for u in units], train_head=train_head)
            return real(model_, seq_, prompt_, loader, units, cfg, accelerator, train_head=train_head)

        monkeypatch.setattr(tpm, "train_on_masks", spy)
    cfg = PruneConfig(method=method, target_macs=0.4, search=SearchConfig(steps=6, hidden=8))
    cfg.validate()
    head_before = model.get_classifier().weight.detach().clone()
    torch.manual_seed(0)
    result = get_method(method).produce(MethodContext(model, seq, prompt, _separable(), cfg,
                                                      make_accelerator("no"), head="new"))
    return result, seq, model, prompt, head_before


@pytest.mark.parametrize("method", ["pass-reprobe", "pass-counts-random", "pass-counts-prior"])
def test_ablations_keep_pass_counts_and_restart_head_and_prompt(method, monkeypatch):
    found, seq, *_ = _produce("pass")
    seen = {}
    result, _, model, prompt, head_before = _produce(method, monkeypatch, seen)
    counts = {g.name: int(found.masks[g.name].sum()) for g in seq.groups}
    assert {g.name: int(result.masks[g.name].sum()) for g in seq.groups} == counts  # the same budget
    # stage 1 starts from the pre-search head and prompt, and trains both on the returned masks
    assert torch.equal(seen["head"], head_before) and not seen["prompt"].any() and seen["train_head"]
    assert [torch.equal(u, result.masks[g.name][g.first_channels()]) for g, u in zip(seq.groups, seen["units"])] \
        == [True] * len(seq.groups)
    assert not torch.equal(model.get_classifier().weight, head_before) and prompt.delta.abs().sum() > 0
    same = [torch.equal(found.masks[g.name], result.masks[g.name]) for g in seq.groups]
    if method == "pass-reprobe":
        assert all(same)
    elif method == "pass-counts-random":
        assert not all(same)
    else:  # the largest-magnitude units of every group
        magnitude = get_method("l1").scores(model, seq, prompt, None, 0, None)
        for g, score in zip(seq.groups, magnitude):
            kept = result.masks[g.name][g.first_channels()]
            assert float(score[kept].min()) >= float(score[~kept].max()) if (~kept).any() else True


def test_ablations_count_the_search_and_the_reprobe():
    search_cfg = SearchConfig(steps=10)
    assert get_method("pass-reprobe").stage1_batches(search_cfg, True) == 20
    assert get_method("pass-counts-prior").stage1_batches(search_cfg, True) == 20
