"""PASS hypernetwork + masked search model: gradient flow through the straight-through estimator."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pass_zoo.graph.sequence import build_layer_sequence
from pass_zoo.methods.pass_.stats import WeightStats
from pass_zoo.methods.pass_.hypernet import PassHyperNetwork
from pass_zoo.prompt import AdditivePrompt
from pass_zoo.config import SearchConfig
from pass_zoo.methods.pass_.search import MaskedSearchModel, search

from conftest import NUM_CLASSES, make_model, randomise_bn

TARGET = 0.5


def _setup(core="lstm", use_prompt=True, use_weights=True, name="resnet10t", round_to=1):
    backbone = randomise_bn(make_model(name))
    for p in backbone.parameters():  # what ``search`` does: the backbone is frozen
        p.requires_grad_(False)
    seq = build_layer_sequence(backbone, torch.zeros(1, 3, 32, 32))
    torch.manual_seed(0)
    prompt = AdditivePrompt(32, 4)
    with torch.no_grad():
        prompt.delta.normal_(0, 0.1)
    hypernet = PassHyperNetwork([g.units for g in seq.groups], hidden=16, core=core,
                                use_prompt=use_prompt, use_weights=use_weights)
    cfg = SearchConfig(core=core, hidden=16, use_prompt=use_prompt, use_weights=use_weights, round_to=round_to)
    model = MaskedSearchModel(backbone, seq, prompt, hypernet, TARGET, cfg)
    with torch.no_grad():
        model.propose()  # sets the walk's provisional threshold, as ``search`` does
    return model, seq


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g)


def _assert_grad(params, what):
    params = list(params)
    assert params, f"no parameters in {what}"
    for name, p in params:
        assert p.grad is not None, f"{what}: {name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{what}: {name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{what}: {name} has an all-zero gradient"


def test_gradients_reach_prompt_encoder_core_and_every_head():
    model, seq = _setup()
    model.train()
    assert not model.backbone.training  # frozen BN statistics during search
    x, y = _batch()
    loss = F.cross_entropy(model(x), y)
    loss.backward()

    _assert_grad([("prompt.delta", model.prompt.delta)], "prompt")
    _assert_grad(model.hypernet.encoder.named_parameters(), "prompt encoder")
    _assert_grad(model.hypernet.core.named_parameters(), "LSTM core")
    _assert_grad([("c0", model.hypernet.c0)], "initial cell state")
    assert len(model.hypernet.heads) == len(seq)
    for i, head in enumerate(model.hypernet.heads):
        _assert_grad(head.named_parameters(), f"head {i} ({seq.groups[i].name})")
    # every hypernetwork parameter takes part (distributed training needs it)
    assert all(p.grad is not None for p in model.hypernet.parameters())
    # the frozen backbone gets nothing
    assert all(p.grad is None for p in model.backbone.parameters())

    # the hard masks of this forward pass meet the budget
    hard = model.last_masks
    assert [m.numel() for m in hard] == [g.units for g in seq.groups]
    assert seq.macs([int(m.sum()) for m in hard]) <= TARGET * seq.dense_macs


def test_straight_through_masks_are_hard_in_the_forward_pass():
    model, seq = _setup()
    seen = []
    model.hypernet.register_forward_hook(lambda mod, inp, out: seen.append([s.detach() for s in out]) and None)
    with torch.no_grad():
        ste, hard = model.propose()
        for s, h in zip(ste, hard):
            assert s.shape == h.shape
            assert (s - h.float()).abs().max() <= 1e-6
        x, _ = _batch(2)
        with seq.gated(ste):
            a = model.backbone(model.prompt(x))
        with seq.gated([h.float() for h in hard]):
            b = model.backbone(model.prompt(x))
    assert (a - b).abs().max() <= 1e-5
    # the provisional threshold splits the kept from the dropped scores of this selection
    assert len(seen) == 1
    flat, keep = torch.cat(seen[0]), torch.cat(hard)
    assert keep.any() and not keep.all()
    thr = float(model.hypernet.threshold)
    assert flat[keep].min() >= thr >= flat[~keep].max()


@pytest.mark.parametrize("core,use_prompt,use_weights", [
    ("mlp", True, True), ("cnn", True, True), ("lstm", False, True), ("lstm", True, False), ("cnn", False, False),
])
def test_variants_score_every_group_and_train(core, use_prompt, use_weights):
    model, seq = _setup(core, use_prompt, use_weights)
    hn = model.hypernet
    assert hasattr(hn, "encoder") == use_prompt
    assert hasattr(hn, "h0") == (not use_prompt)
    assert hasattr(hn, "c0") == (core == "lstm")
    scores = hn(model.prompt.image(), WeightStats(seq))
    assert [s.shape for s in scores] == [torch.Size([g.units]) for g in seq.groups]
    assert all(torch.isfinite(s).all() for s in scores)

    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    missing = [n for n, p in hn.named_parameters() if p.grad is None]
    assert not missing, f"parameters unused by the forward pass: {missing}"
    _assert_grad(hn.heads.named_parameters(), "heads")
    assert (model.prompt.delta.grad is not None and model.prompt.delta.grad.abs().sum() > 0)
    assert seq.macs([int(m.sum()) for m in model.last_masks]) <= TARGET * seq.dense_macs


@pytest.mark.parametrize("core", ["lstm", "mlp", "cnn"])
def test_tiny_groups_and_single_unit_groups(core):
    """Groups narrower than the CNN core's pooling width, and a 1-unit group (no spread to standardise)."""
    units = [1, 3, 5]
    hn = PassHyperNetwork(units, hidden=8, core=core)
    g = torch.Generator().manual_seed(0)
    calls = []

    def stats_fn(i, provisional):
        calls.append((i, len(provisional)))
        return torch.rand(units[i], generator=g)

    scores = hn(torch.zeros(3, 16, 16), stats_fn)
    assert [s.shape[0] for s in scores] == units
    assert all(torch.isfinite(s).all() for s in scores)
    assert calls == [(0, 0), (1, 1), (2, 2)]  # step i sees the masks of the i earlier groups
    # a weighted sum: a plain sum of per-group standardised scores is constant, with no gradient
    flat = torch.cat(scores)
    (flat * torch.linspace(-1, 2, flat.numel())).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in hn.parameters())


def test_weight_inputs_change_the_scores():
    """use_weights=True reads the backbone: rescaling one group's weights changes the walk."""
    model, seq = _setup()
    hn = model.hypernet
    with torch.no_grad():
        before = torch.cat(hn(model.prompt.image(), WeightStats(seq)))
        conv = model.backbone.get_submodule(seq.groups[1].producers[0].module_name)
        conv.weight[: conv.weight.shape[0] // 2] *= 5.0
        after = torch.cat(hn(model.prompt.image(), WeightStats(seq)))
    assert (before - after).abs().max() > 1e-4


def test_unknown_core_is_refused():
    with pytest.raises(ValueError, match="unknown hypernetwork core 'gru'"):
        PassHyperNetwork([4, 8], core="gru")


def test_weight_stats_by_hand():
    model = make_model("resnet10t")
    seq = build_layer_sequence(model, torch.zeros(1, 3, 32, 32))
    g0, g1 = seq.groups[0], seq.groups[1]
    w0 = model.get_submodule(g0.producers[0].module_name).weight.abs()
    assert len(g0.producers) == 1 and g0.ch_groups == 1
    assert torch.allclose(WeightStats(seq)(0, []), w0.mean(dim=(1, 2, 3)))
    # group 1's producer reads group 0: masked input channels leave the average
    assert len(g1.producers) == 1
    w1 = model.get_submodule(g1.producers[0].module_name).weight.abs()
    mask0 = torch.zeros(g0.units)
    mask0[::3] = 1.0
    expected = w1[:, mask0.bool()].mean(dim=(1, 2, 3))
    assert torch.allclose(WeightStats(seq)(1, [mask0]), expected, atol=1e-6)


def test_a_layer_whose_inputs_are_all_masked_reads_as_unmasked():
    # The walk's provisional mask can keep no unit of a group; the next layer's statistics would then be all
    # zero, and their standardisation (spread zero) sent a gradient of 1e10 into the hypernetwork.
    model = make_model("resnet10t")
    seq = build_layer_sequence(model, torch.zeros(1, 3, 32, 32))
    g0 = seq.groups[0]
    scores = torch.randn(g0.units, requires_grad=True)
    empty = torch.zeros(g0.units) + scores - scores.detach()  # straight-through, as the walk builds it
    stats = WeightStats(seq)(1, [empty])
    assert torch.allclose(stats, WeightStats(seq)(1, []))
    stats.sum().backward()
    assert scores.grad is None or not scores.grad.any()

    model, seq = _setup()
    grads = []
    for threshold in (1e6, -1e6):  # every provisional mask empty, then every one full
        model.hypernet.zero_grad()
        model.hypernet.threshold.fill_(threshold)
        g = torch.Generator().manual_seed(1)
        sum((s * torch.randn(s.shape, generator=g)).sum() for s in model.scores()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.hypernet.parameters() if p.grad is not None]).norm())
    assert torch.isfinite(grads[0]) and grads[0] < 10 * grads[1], grads


def test_dead_bn_channel_scores_lowest_not_highest():
    # A channel with zero running variance outputs a constant: nothing is lost by pruning it. Its
    # |gamma| / sigma is huge, so a plain BN-folded statistic would rank it first.
    model = make_model("resnet10t")
    seq = build_layer_sequence(model, torch.zeros(1, 3, 32, 32))
    g0 = seq.groups[0]
    bn = model.get_submodule(g0.norms[0].module_name)
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.running_var.fill_(1.0)
        bn.weight[3] = 5.0
        bn.running_var[3] = 0.0
    stats = WeightStats(seq)(0, [])
    w0 = model.get_submodule(g0.producers[0].module_name).weight.abs().mean(dim=(1, 2, 3))
    assert stats[3] == 0.0
    live = torch.ones(g0.units, dtype=torch.bool)
    live[3] = False
    assert torch.allclose(stats[live], w0[live] / (1 + bn.eps) ** 0.5, rtol=1e-6)


def test_search_trains_prompt_and_hypernet_only():
    from pass_zoo.train.loop import make_accelerator

    backbone = randomise_bn(make_model("resnet10t"))
    seq = build_layer_sequence(backbone, torch.zeros(1, 3, 32, 32))
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    prompt = AdditivePrompt(32, 4)
    x, y = _batch(16, seed=3)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    cfg = SearchConfig(steps=3, hidden=16, round_to=8)
    result = search(backbone, seq, prompt, loader, 0.4, cfg, make_accelerator())

    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    assert list(result.masks) == seq.names
    for g, u, (name, c) in zip(seq.groups, result.unit_masks, result.masks.items()):
        assert u.numel() == g.units and c.numel() == g.channels and int(c.sum()) == int(u.sum()) * g.ch_groups
        assert int(c.sum()) % 8 == 0 or int(c.sum()) == g.channels
    assert seq.macs([int(u.sum()) for u in result.unit_masks]) <= 0.4 * seq.dense_macs
    assert prompt.delta.abs().sum() > 0  # trained in place from zeros
    # the backbone is bit-for-bit untouched: weights and BN statistics
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in backbone.parameters())
    assert all(p.grad is None for p in backbone.parameters())


def test_search_with_new_head_trains_only_the_head():
    from pass_zoo.train.loop import make_accelerator

    backbone = make_model("resnet10t", num_classes=3)
    seq = build_layer_sequence(backbone, torch.zeros(1, 3, 32, 32))
    head_name = "fc"
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    g = torch.Generator().manual_seed(4)
    loader = DataLoader(TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 3, (8,), generator=g)),
                        batch_size=4)
    search(backbone, seq, AdditivePrompt(32, 2), loader, 0.5, SearchConfig(steps=2, hidden=16, round_to=1),
           make_accelerator(), train_head=True)
    after = backbone.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {f"{head_name}.weight", f"{head_name}.bias"}
    assert not any(p.requires_grad for p in backbone.parameters())


def test_budget_warmup_tightens_from_dense_to_the_target():
    from pass_zoo.methods.pass_.search import budget_at

    cfg = SearchConfig(steps=10, budget_warmup=0.5)
    budgets = [budget_at(step, cfg, 0.1) for step in range(10)]
    assert budgets[0] == 1.0
    assert all(a > b for a, b in zip(budgets[:5], budgets[1:6]))  # strictly tighter every warm-up step
    assert budgets[5:] == [0.1] * 5
    assert abs(budgets[1] - 0.1 ** 0.2) < 1e-12  # geometric
    assert [budget_at(s, SearchConfig(steps=10, budget_warmup=0.0), 0.1) for s in range(3)] == [0.1] * 3
