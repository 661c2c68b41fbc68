"""Stage 1 learns, every method gets the same stage 1, layers cannot collapse past the cap, and a
broken network is refused rather than scored."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pass_zoo.config import PruneConfig, SearchConfig
from pass_zoo.errors import BudgetError, PassZooError
from pass_zoo.graph.masks import select_units, smallest_kept
from pass_zoo.graph.sequence import build_layer_sequence
from pass_zoo.methods import MethodContext, get_method
from pass_zoo.methods.pass_.method import chance_check
from pass_zoo.methods.pass_.search import search
from pass_zoo.prompt import AdditivePrompt, PromptedModel
from pass_zoo.train.finetune import evaluate
from pass_zoo.train.loop import make_accelerator

from conftest import make_model, randomise_bn


def _separable(n=96, classes=3, seed=0):
    """Images whose class is written in their colour: a task a frozen random network can still solve."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    x[torch.arange(n), y] += 1.5
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)


def _tiny(classes=3):
    torch.manual_seed(0)
    model = randomise_bn(make_model("resnet10t", num_classes=classes))
    model.reset_classifier(classes)
    return model, build_layer_sequence(model, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("use_prior", [True, False])
def test_stage1_loss_falls_on_a_tiny_task_at_a_tight_budget(use_prior):
    model, seq = _tiny()
    torch.manual_seed(0)
    cfg = SearchConfig(steps=40, hidden=16, use_prior=use_prior, lr_head=1e-2)
    result = search(model, seq, AdditivePrompt(32, 4), _separable(), 0.25, cfg, make_accelerator("no"),
                    train_head=True)
    last = sum(result.losses[-5:]) / 5  # the budget reached 25 % MACs half-way through
    assert last < 0.7 * math.log(3) and last < result.losses[0], (result.losses[0], last)


def _hypernet_change(prototypes: float) -> tuple:
    """A search whose head is frozen at zero: every logit is 0, so cross-entropy sends the scores no gradient."""
    from pass_zoo.methods.pass_.search import build_hypernet

    model, seq = _tiny()
    head = model.get_classifier()
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
    cfg = SearchConfig(steps=6, hidden=16, prototypes=prototypes)
    torch.manual_seed(0)
    before = dict(build_hypernet(seq, cfg).named_parameters())
    torch.manual_seed(0)
    result = search(model, seq, AdditivePrompt(32, 4), _separable(), 0.25, cfg, make_accelerator("no"))
    after = dict(result.hypernet.named_parameters())
    assert before.keys() == after.keys()
    return max(float((after[k] - before[k]).detach().abs().max()) for k in before), result.losses


def test_class_prototypes_score_the_masks_before_the_head_has_learned():
    unchanged, losses = _hypernet_change(0.0)
    moved, with_prototypes = _hypernet_change(1.0)
    assert unchanged < 1e-5 < 1e-3 < moved, (unchanged, moved)  # without them only weight decay touched them
    # the history (what the chance check reads) is the head's cross-entropy alone: ln 3 at every step
    for history in (losses, with_prototypes):
        assert len(history) == 6 and all(abs(v - math.log(3)) < 1e-5 for v in history), history


def test_class_prototypes_are_running_class_means_and_resume_at_their_shape():
    from pass_zoo.methods.pass_.search import ClassPrototypes

    accelerator = make_accelerator("no")
    protos = ClassPrototypes(momentum=0.5, temperature=0.1)
    x = torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 2])
    protos.loss(x, y, 3, accelerator)
    assert protos.means.shape == (3, 2) and protos.seen.tolist() == [True, False, True]
    assert torch.allclose(protos.means, torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]))
    loss = protos.loss(torch.tensor([[0.0, 1.0]]), torch.tensor([0]), 3, accelerator)  # class 0 moves half-way
    assert torch.allclose(protos.means[0], torch.tensor([0.5, 0.5]))
    # an image on its class's mean is classified with confidence; one on another class's mean is not
    on_mean = float(protos.loss(torch.tensor([[0.0, 1.0]]), torch.tensor([2]), 3, accelerator))
    assert on_mean < 0.1 < float(loss)
    # a checkpoint restores the means at the shape the first batch gave them
    resumed = ClassPrototypes(momentum=0.5)
    resumed.load_state_dict(protos.state_dict())
    assert torch.equal(resumed.means, protos.means) and torch.equal(resumed.seen, protos.seen)


def test_an_image_with_zero_features_does_not_blow_up_the_prototype_gradient():
    from pass_zoo.methods.pass_.search import ClassPrototypes

    accelerator = make_accelerator("no")
    torch.manual_seed(0)
    x = torch.randn(8, 16).abs() + 0.5
    y = torch.arange(8) % 4

    def grad(features):
        features = features.clone().requires_grad_()
        ClassPrototypes().loss(features, y, 4, accelerator).backward()
        return features.grad

    normal = grad(x)
    zeroed = x.clone()
    zeroed[3] = 0.0  # a narrow head convolution left this image no positive channel
    g = grad(zeroed)
    assert torch.isfinite(g).all() and float(g.norm()) < 100 * float(normal.norm()), float(g.norm())
    # dividing by the bare norm (F.normalize's 1e-12 floor) is what it replaces: a billion-fold gradient
    bare = zeroed.clone().requires_grad_()
    F.normalize(bare, dim=1).sum().backward()
    assert float(bare.grad[3].norm()) > 1e9
    # images above the floor get exactly the gradient of the plain L2 normalisation
    plain = x.clone().requires_grad_()
    fresh = ClassPrototypes()
    fresh.loss(x, y, 4, accelerator)  # its first batch: the same class means as the call under test
    f = F.normalize(plain, dim=1)
    F.cross_entropy(f @ F.normalize(fresh.means, dim=1).t() / fresh.temperature, y).backward()
    assert torch.allclose(plain.grad, normal, atol=1e-7)


def test_a_negative_prototype_weight_is_refused_in_one_line():
    cfg = PruneConfig(search=SearchConfig(prototypes=-1.0))
    with pytest.raises(PassZooError, match="--search-prototypes must be a finite number >= 0, got -1.0"):
        cfg.validate()


def test_the_cap_keeps_every_group_above_its_share():
    model, seq = _tiny()
    # one group's scores far below all others': a global ranking cuts it to its floor ...
    scores = [torch.rand(g.units) + (0.0 if i == 1 else 10.0) for i, g in enumerate(seq.groups)]
    uncapped = select_units(scores, seq, 0.5, 1, "global")
    assert int(uncapped[1].sum()) == 1
    # ... the cap keeps at least (1 - ratio) of every group, and the budget still holds
    capped = select_units(scores, seq, 0.5, 1, "global", max_prune_ratio=0.6)
    for g, m in zip(seq.groups, capped):
        assert int(m.sum()) >= math.ceil(0.4 * g.units), g.name
    assert seq.macs([int(m.sum()) for m in capped]) <= 0.5 * seq.dense_macs
    assert smallest_kept(seq, 8, 0.5) == [max(8, math.ceil(u / 2 / 8) * 8) if u >= 8 else u
                                          for u in (g.units for g in seq.groups)]


def test_masks_json_names_the_narrowest_group():
    from pass_zoo.graph.masks import masks_summary, to_channel_masks

    _, seq = _tiny()
    scores = [torch.rand(g.units) + (0.0 if i == 1 else 10.0) for i, g in enumerate(seq.groups)]
    summary = masks_summary(to_channel_masks(select_units(scores, seq, 0.5, 1, "global"), seq), seq)
    assert summary["narrowest_group"]["name"] == seq.groups[1].name
    assert summary["narrowest_group"]["kept"] == 1 and summary["narrowest_group"]["kept_fraction"] < 0.1


def test_a_budget_below_what_the_cap_leaves_is_refused_in_one_line():
    _, seq = _tiny()
    scores = [torch.rand(g.units) for g in seq.groups]
    with pytest.raises(BudgetError, match="max-prune-ratio 0.3"):
        select_units(scores, seq, 0.2, 1, "global", max_prune_ratio=0.3)
    with pytest.raises(BudgetError, match="must be in"):
        select_units(scores, seq, 0.5, 1, "global", max_prune_ratio=0.0)


@pytest.mark.parametrize("method", ["l1", "random", "taylor", "group-norm", "pass", "direct-logits"])
def test_fair_stage1_trains_head_and_prompt_on_the_methods_own_masks(method, monkeypatch):
    """Every channel method's stage 1 ends with head and prompt learning on the network gated by the very
    masks it returns (PASS and direct-logits: during their search)."""
    import pass_zoo.methods.torch_pruning as tpm

    model, seq = _tiny()
    head_before = model.get_classifier().weight.detach().clone()
    prompt = AdditivePrompt(32, 4)
    seen = {}
    real = tpm.train_on_masks

    def spy(model_, seq_, prompt_, loader, units, cfg, accelerator, train_head=True):
        seen["units"] = [u.clone() for u in units]
        seen["train_head"] = train_head
        return real(model_, seq_, prompt_, loader, units, cfg, accelerator, train_head=train_head)

    monkeypatch.setattr(tpm, "train_on_masks", spy)
    cfg = PruneConfig(method=method, target_macs=0.5, search=SearchConfig(steps=4, hidden=8))
    cfg.validate()
    ctx = MethodContext(model, seq, prompt, _separable(), cfg, make_accelerator("no"), head="new")
    result = get_method(method).produce(ctx)
    assert not torch.equal(model.get_classifier().weight, head_before)
    assert prompt.delta.detach().abs().sum() > 0
    if method not in ("pass", "direct-logits"):
        assert seen["train_head"] is True
        assert [bool(torch.equal(u, result.masks[g.name][g.first_channels()])) for g, u in
                zip(seq.groups, seen["units"])] == [True] * len(seq.groups)
        # its losses are recorded, one per batch, for metrics.json to set beside a search's
        probe = result.record["probe_losses"]
        assert len(probe) == 4 and all(math.isfinite(v) and v > 0 for v in probe)
    else:
        assert "probe_losses" not in result.record and len(result.record["search_losses"]) == 4


def test_every_method_spends_its_scoring_batches_plus_the_shared_stage1():
    search_cfg = SearchConfig(steps=10)
    assert get_method("pass").stage1_batches(search_cfg, True) == 10
    assert get_method("l1").stage1_batches(search_cfg, True) == 10
    assert get_method("taylor").stage1_batches(search_cfg, True) == 20  # probe + gradients, then the shared 10
    assert get_method("group-norm").stage1_batches(search_cfg, True) == 20
    dense = SearchConfig(steps=10, probe="dense")
    assert get_method("l1").stage1_batches(dense, True) == 10 and get_method("l1").stage1_batches(dense, False) == 0


def test_non_finite_evaluation_is_refused():
    model, _ = _tiny()
    prompted = PromptedModel(model, AdditivePrompt(32, 4)).eval()
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long)), batch_size=4)
    assert 0.0 <= evaluate(prompted, loader) <= 1.0
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.running_var[0] = float("nan")
    with pytest.raises(PassZooError, match="non-finite running_var"):
        evaluate(prompted, loader)
    bn.running_var[0] = 1.0
    with torch.no_grad():
        model.get_classifier().weight[0, 0] = float("inf")
    with pytest.raises(PassZooError, match="logits are not finite"):
        evaluate(prompted, loader)


def test_a_network_that_predicts_one_class_says_so(caplog):
    # A run whose prompt had grown to 1e4 fine-tuned into a network that gave every test image one class
    model, _ = _tiny()
    prompted = PromptedModel(model, AdditivePrompt(32, 4)).eval()
    labels = torch.tensor([0, 1, 2, 1])
    loader = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), labels), batch_size=2)
    with torch.no_grad():
        head = model.get_classifier()
        head.weight.zero_()
        head.bias.zero_()
        head.bias[1] = 5.0
    with caplog.at_level(logging.WARNING):
        assert evaluate(prompted, loader) == 0.5
    assert "predicts" not in caplog.text  # only where asked: the final evaluation
    with caplog.at_level(logging.WARNING):
        assert evaluate(prompted, loader, warn_collapse=True) == 0.5
    assert "predicts class 1 for all 4 evaluation images" in caplog.text and "50.00%" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # one class in the labels too: nothing to say
        evaluate(prompted, DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.ones(4, dtype=torch.long))),
                 warn_collapse=True)
    assert "predicts" not in caplog.text


def test_a_search_at_chance_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        record = chance_check([2.30] * 20, 10)
    assert record["search_at_chance"] is True and "did not learn" in caplog.text
    assert chance_check([2.3] * 10 + [1.0] * 10, 10)["search_at_chance"] is False


@pytest.mark.parametrize("method", ["l1", "taylor"])
def test_iterative_pruning_tightens_in_rounds_and_never_restores_a_unit(method, monkeypatch):
    """Torch-Pruning's iterative_steps: N selections at budgets falling linearly to the target, each scoring
    a copy slimmed by the one before; the criterion's batches are split over the rounds."""
    import pass_zoo.methods.torch_pruning as tpm

    model, seq = _tiny()
    selections, batches = [], []
    real_select, real_scores = tpm.select_units, tpm.TorchPruningCriterion.scores

    def select(scores, seq_, target, *args, **kwargs):
        units = real_select(scores, seq_, target, *args, **kwargs)
        selections.append((target.fraction, [u.clone() for u in units]))
        return units

    def scores(self, model_, seq_, prompt, loader, steps, *args, **kwargs):
        batches.append(steps)
        return real_scores(self, model_, seq_, prompt, loader, steps, *args, **kwargs)

    monkeypatch.setattr(tpm, "select_units", select)
    monkeypatch.setattr(tpm.TorchPruningCriterion, "scores", scores)
    cfg = PruneConfig(method=method, target_macs=0.4, search=SearchConfig(steps=6, iterative_steps=3))
    cfg.validate()
    ctx = MethodContext(model, seq, AdditivePrompt(32, 4), _separable(), cfg, make_accelerator("no"), head="new")
    result = get_method(method).produce(ctx)
    assert [round(f, 3) for f, _ in selections] == [0.8, 0.6, 0.4]
    assert batches == [2, 2, 2]  # 6 batches over 3 rounds
    for (_, before), (_, after) in zip(selections, selections[1:]):
        assert all(not bool((a & ~b).any()) for b, a in zip(before, after))  # nothing comes back
    final = [result.masks[g.name][g.first_channels()] for g in seq.groups]
    assert [torch.equal(f, u) for f, u in zip(final, selections[-1][1])] == [True] * len(seq.groups)
    assert seq.macs([int(u.sum()) for u in final]) <= 0.4 * seq.dense_macs


def test_iterative_steps_is_checked():
    with pytest.raises(PassZooError, match="--iterative-steps must be a whole number from 1 to 100"):
        SearchConfig(iterative_steps=0).validate()


def test_a_search_step_swaps_at_most_max_churn_of_the_kept_units():
    from pass_zoo.methods.pass_.search import MaskedSearchModel, build_hypernet, churn

    model, seq = _tiny()
    cfg = SearchConfig(hidden=16, max_churn=0.1)
    searcher = MaskedSearchModel(model, seq, AdditivePrompt(32, 4), build_hypernet(seq, cfg), 0.5, cfg)
    torch.manual_seed(1)
    before = [torch.rand(g.units) for g in seq.groups]
    searcher.previous.store(searcher.select(before, searcher.budget))
    previous = searcher.previous.masks()
    # a small change of the scores passes unchanged ...
    nudged = [s + 1e-4 * torch.randn_like(s) for s in before]
    free = searcher.select(nudged, searcher.budget)
    assert searcher._limit_churn(nudged, free, 1.0) is free
    # ... a reversed ranking would swap most kept units in one step: the limit holds, the budget too
    reversed_ = [-s for s in before]
    free = searcher.select(reversed_, searcher.budget)
    assert churn(free, previous) > 0.5
    limited = searcher._limit_churn(reversed_, free, float(torch.cat(reversed_).std()))
    assert 0 < churn(limited, previous) <= 0.1
    assert seq.macs([int(m.sum()) for m in limited]) <= 0.5 * seq.dense_macs
    # the checkpointed copy of the last masks is what the limit reads after a resume
    state = searcher.previous.state_dict()
    fresh = MaskedSearchModel(model, seq, AdditivePrompt(32, 4), build_hypernet(seq, cfg), 0.5, cfg)
    assert fresh.previous.masks() is None
    fresh.previous.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(fresh.previous.masks(), previous))


def test_a_search_step_moves_each_group_at_most_max_group_change():
    from pass_zoo.methods.pass_.search import MaskedSearchModel, build_hypernet

    model, seq = _tiny()
    cfg = SearchConfig(hidden=16, max_group_change=0.25, round_to=1)
    searcher = MaskedSearchModel(model, seq, AdditivePrompt(32, 4), build_hypernet(seq, cfg), 0.3, cfg)
    torch.manual_seed(1)
    before = [torch.rand(g.units) for g in seq.groups]
    assert searcher._bounds() is None  # no last step yet: nothing to stay near
    searcher.previous.store(searcher.select(before, searcher.budget))
    kept = [int(m.sum()) for m in searcher.previous.masks()]
    # one group's scores jump above everything: unlimited, it takes most of the budget in one step ...
    jumped = [s + (5.0 if i == len(before) - 1 else 0.0) for i, s in enumerate(before)]
    free = [int(m.sum()) for m in searcher.select(jumped, searcher.budget)]
    assert free[-1] > 1.5 * kept[-1] + 1, (kept[-1], free[-1])
    # ... limited, every group stays within a quarter of what it kept (one unit at least), under the budget
    limited = [int(m.sum()) for m in searcher.select(jumped, searcher.budget, searcher._bounds())]
    for k, n in zip(kept, limited):
        assert abs(n - k) <= max(1, math.ceil(0.25 * k)), (kept, limited)
    assert limited[-1] > kept[-1] and seq.macs(limited) <= 0.3 * seq.dense_macs
    # a budget that tightens faster than the lower bounds allow still holds: they give way
    assert seq.macs([int(m.sum()) for m in searcher.select(before, 0.1, searcher._bounds())]) <= 0.1 * seq.dense_macs


def test_a_search_that_breaks_down_returns_to_its_best_state():
    from pass_zoo.methods.pass_.search import Recovery

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    recovery = Recovery(params, allowed=1, settle=5)
    chance = math.log(10)
    assert not any(recovery.observe(1.0, chance) for _ in range(30))  # learned: well under chance
    best = [p.detach().clone() for p in params]
    params[0].sum().backward()
    opt.step()  # the optimiser moves on and keeps momentum ...
    with torch.no_grad():
        params[1].add_(5.0)
    # ... and the loss climbs back towards chance: a rise of three quarters of the way is a breakdown
    broke = [recovery.observe(chance, chance) for _ in range(30)]
    assert broke.index(True) == 13, broke  # moving average 1.0 -> over 1.0 + 0.75 * (ln 10 - 1)
    # a checkpoint taken now continues alike after a resume
    resumed = Recovery([torch.nn.Parameter(torch.zeros_like(p)) for p in params], allowed=1, settle=5)
    resumed.load_state_dict(recovery.state_dict())
    assert resumed.observe(chance, chance) and torch.equal(resumed.snapshot, recovery.snapshot)
    recovery.recover([opt], [sched])
    assert all(torch.equal(p, b) for p, b in zip(params, best))
    assert not opt.state and opt.param_groups[0]["lr"] == pytest.approx(0.05) and sched.base_lrs == [0.05]
    # the halved rates are in what a checkpoint saves of the scheduler and the optimiser
    again = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(params, lr=0.1), lambda step: 1.0)
    again.load_state_dict(sched.state_dict())
    assert again.base_lrs == [0.05] and opt.state_dict()["param_groups"][0]["lr"] == pytest.approx(0.05)
    assert recovery.recoveries == 1
    # the allowance is spent: a second breakdown is left alone
    assert not any(recovery.observe(chance, chance) for _ in range(30))


def test_a_search_that_never_learned_is_not_recovered():
    from pass_zoo.methods.pass_.search import Recovery

    recovery = Recovery([torch.nn.Parameter(torch.zeros(3))], allowed=2, settle=1)
    chance = math.log(3)
    # the loss never fell under 80 % of chance: nothing worth returning to
    assert not any(recovery.observe(chance * f, chance) for f in [0.85] * 10 + [1.0] * 20)


def test_a_break_after_the_last_recovery_pins_the_best_state():
    from pass_zoo.methods.pass_.search import Recovery

    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = torch.optim.SGD(params, lr=0.1)
    recovery = Recovery(params, allowed=0, settle=1, units=[3, 2])
    chance = math.log(10)
    assert not recovery.pinned and not any(recovery.observe(1.0, chance) for _ in range(5))
    with torch.no_grad():
        params[0].add_(1.0)
    assert any(recovery.observe(chance, chance) for _ in range(30))
    recovery.recover([opt], [], step=17, scores=lambda: [torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.5, 4.0])])
    assert recovery.pinned and int(recovery.pinned_at) == 17 and recovery.recoveries == 0
    assert torch.equal(params[0].detach(), torch.zeros(3))  # back at the best state
    assert [s.tolist() for s in recovery.scores()] == [[3.0, 1.0, 2.0], [0.5, 4.0]]
    assert not any(recovery.observe(2 * chance, chance) for _ in range(30))  # pinned: nothing more to do
    resumed = Recovery([torch.nn.Parameter(torch.zeros(3))], allowed=0, settle=1, units=[3, 2])
    resumed.load_state_dict(recovery.state_dict())  # a checkpoint carries the pin
    assert resumed.pinned and torch.equal(resumed.pinned_scores, recovery.pinned_scores)


def test_a_pinned_search_trains_head_and_prompt_on_fixed_masks(monkeypatch):
    from pass_zoo.methods.pass_ import search as S

    observed = {"steps": 0}
    real = S.Recovery.observe

    def break_at_step_12(self, ce, chance):
        real(self, ce, chance)
        observed["steps"] += 1
        return observed["steps"] == 12 and not self.pinned

    monkeypatch.setattr(S.Recovery, "observe", break_at_step_12)
    masks = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: masks.append([h.clone() for h in m.last_masks])
        if isinstance(m, S.MaskedSearchModel) and m.training else None)
    model, seq = _tiny()
    cfg = SearchConfig(steps=30, hidden=16, lr_head=1e-2, recoveries=0)  # warm-up: the first 15 steps
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in S.build_hypernet(seq, cfg).state_dict().items() if k != "threshold"}
    torch.manual_seed(0)
    prompt = AdditivePrompt(32, 4)
    start_prompt = [v.clone() for v in prompt.state_dict().values()]
    try:
        result = S.search(model, seq, prompt, _separable(), 0.25, cfg, make_accelerator("no"), train_head=True)
    finally:
        hook.remove()
    assert result.pinned_at == 12 and result.recoveries == 0
    # the hypernetwork went back to its best state (here: the first, as none was tracked yet) and stayed there
    after = result.hypernet.state_dict()
    assert all(torch.equal(initial[k], after[k]) for k in initial)
    changed = [sum(int((a != b).sum()) for a, b in zip(x, y)) for x, y in zip(masks, masks[1:])]
    assert any(changed[:11])  # before the pin the masks moved ...
    assert not any(changed[15:])  # ... after it and the warm-up they never do
    assert all(torch.equal(a, b) for a, b in zip(masks[-1], result.unit_masks))
    # while head and prompt trained on: the loss of the fixed masks falls
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[15:20]) / 5, result.losses
    # and the prompt, reset to its first state at the pin, trained after it
    assert any(not torch.equal(a, b) for a, b in zip(start_prompt, prompt.state_dict().values()))


def test_recovery_leaves_a_search_that_does_not_break_unchanged():
    runs = []
    for allowed in (0, 2):
        model, seq = _tiny()  # the search trains the head in place: a fresh model each time
        torch.manual_seed(0)
        cfg = SearchConfig(steps=20, hidden=16, lr_head=1e-2, recoveries=allowed)
        runs.append(search(model, seq, AdditivePrompt(32, 4), _separable(), 0.5, cfg, make_accelerator("no"),
                           train_head=True))
    assert runs[1].recoveries == 0 and runs[0].losses == runs[1].losses
    assert all(torch.equal(a, b) for a, b in zip(runs[0].unit_masks, runs[1].unit_masks))


@pytest.mark.parametrize("budget_range, pin, expected", [
    (None, True, (0, True)),  # one budget: pin at the first break
    ([0.2, 0.8], True, (2, False)),  # a family cannot pin: it returns with halved rates, twice
    ([0.2, 0.8], False, None),  # --no-search-pin: nothing
])
def test_what_a_break_does_depends_on_whether_the_scores_can_be_pinned(budget_range, pin, expected, monkeypatch):
    from pass_zoo.methods.pass_ import search as S

    made = []
    real = S.Recovery.__init__

    def record(self, params, allowed, *args, units=None, **kwargs):
        made.append((allowed, units is not None))
        real(self, params, allowed, *args, units=units, **kwargs)

    monkeypatch.setattr(S.Recovery, "__init__", record)
    model, seq = _tiny()
    cfg = SearchConfig(steps=2, hidden=16, budget_range=budget_range, pin_masks=pin)
    S.search(model, seq, AdditivePrompt(32, 4), _separable(), 0.5, cfg, make_accelerator("no"), train_head=True)
    assert made == ([] if expected is None else [expected])


def test_one_budget_conditioned_search_emits_masks_for_any_budget_in_its_range():
    from pass_zoo.methods.pass_.hypernet import hypernet_files, hypernet_from_files
    from pass_zoo.methods.pass_.search import masks_at_budget, step_target

    model, seq = _tiny()
    torch.manual_seed(0)
    cfg = SearchConfig(steps=24, hidden=16, lr_head=1e-2, budget_range=[0.2, 0.8])
    prompt = AdditivePrompt(32, 4)
    result = search(model, seq, prompt, _separable(), 0.5, cfg, make_accelerator("no"), train_head=True)
    # the steps' targets cover the range, log-uniformly, and repeat exactly (a resume draws the same)
    targets = [step_target(k, cfg.budget_range, 0.5) for k in range(24)]
    assert min(targets) == pytest.approx(0.2) and 0.7 < max(targets) <= 0.8
    assert targets == [step_target(k, cfg.budget_range, 0.5) for k in range(24)]
    # the saved hypernetwork keeps its range, and scores for any budget in it without searching again
    hypernet = hypernet_from_files(hypernet_files(result.hypernet)).eval()
    assert hypernet.budget_range == [0.2, 0.8]
    kept = {}
    for budget in (0.2, 0.35, 0.5, 0.8):  # 0.35: a budget no step was centred on
        masks = masks_at_budget(hypernet, model, seq, prompt, budget, cfg)
        units = [int(m.sum()) for m in masks.values()]
        assert seq.macs([int(u) for u in (m[g.first_channels()].sum() for g, m in
                                          zip(seq.groups, masks.values()))]) <= budget * seq.dense_macs
        kept[budget] = sum(units)
    assert kept[0.2] < kept[0.35] < kept[0.5] < kept[0.8]
    # at the run's own budget the family member is the search's result
    same = masks_at_budget(hypernet, model, seq, prompt, 0.5, cfg)
    assert all(torch.equal(same[name], m) for name, m in result.masks.items())
    # outside the range, or from a hypernetwork searched for one budget: one clear error
    with pytest.raises(BudgetError, match=r"outside the range this hypernetwork was searched over \(0.2 to 0.8\)"):
        masks_at_budget(hypernet, model, seq, prompt, 0.1, cfg)
    single = search(*_tiny(), AdditivePrompt(32, 4), _separable(), 0.5, SearchConfig(steps=2, hidden=16),
                    make_accelerator("no"), train_head=True).hypernet
    with pytest.raises(PassZooError, match="searched for a single budget"):
        masks_at_budget(single, model, seq, prompt, 0.3, cfg)
    # and the run's budget must lie in the range it searches
    with pytest.raises(BudgetError, match="outside the range"):
        search(model, seq, AdditivePrompt(32, 4), _separable(), 0.9, cfg, make_accelerator("no"), train_head=True)
