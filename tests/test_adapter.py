"""Layer-sequence adapter: groups, exact MACs, and gating == slimming on every CNN family."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from pass_zoo.graph.sequence import build_layer_sequence
from pass_zoo.errors import AdapterError
from pass_zoo.graph.masks import select_units, to_channel_masks
from pass_zoo.graph.cost_model import count_macs, count_params
from pass_zoo.graph.slim import slim

from conftest import NUM_CLASSES

FAMILIES = [
    "resnet18",  # residual sums couple the stage widths
    "resnext26ts",  # grouped 3x3 convs
    "vgg11",  # plain convs, no BN
    "vgg11_bn",
    "tf_efficientnet_lite0",  # depthwise + inverted residuals
    "mobilenetv2_050",
    "mobilenetv3_small_050",  # squeeze-excite, hard-swish, conv head after pooling
    "regnetx_002",  # grouped convs
    "regnety_002",  # grouped convs + squeeze-excite
]
GROUPED = {"resnext26ts", "regnetx_002", "regnety_002"}


def _exec_order(model, x):
    order = {}

    def hook(name):
        def _fn(mod, inp, out):
            order.setdefault(name, len(order))  # returns None: the output is left alone
        return _fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return order


def _classifier_name(model):
    head = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is head)


def _check_slim_equals_gated(model, seq, unit_masks, x):
    """Slim the model with ``unit_masks``; compare MACs, shapes and outputs with the gated model."""
    kept = [int(m.sum()) for m in unit_masks]
    slim_model, history = slim(model, to_channel_masks(unit_masks, seq), x[:1])
    slim_model.eval()
    assert history, "a pruned model must record a pruning history"

    # exact MACs: the closed-form count equals a forward-hook count on the real slim network
    assert seq.macs(kept) == count_macs(slim_model, x[:1])
    assert count_params(slim_model) < count_params(model)

    # every producer lost exactly (units - kept) * positions-per-unit output channels
    for g, k in zip(seq.groups, kept):
        for slot in g.producers:
            dense = model.get_submodule(slot.module_name)
            small = slim_model.get_submodule(slot.module_name)
            n_dense = dense.out_features if isinstance(dense, nn.Linear) else dense.out_channels
            n_small = small.out_features if isinstance(small, nn.Linear) else small.out_channels
            per_unit = len(slot.positions) // g.units
            assert n_small == n_dense - per_unit * (g.units - k), slot.module_name

    # the classifier keeps its classes
    assert slim_model.get_classifier().out_features == NUM_CLASSES

    with torch.no_grad():
        dense_out = model(x)
        with seq.gated([m.float() for m in unit_masks]):
            gated_out = model(x)
        slim_out = slim_model(x)
        again = model(x)
    assert slim_out.shape == (x.shape[0], NUM_CLASSES)
    assert gated_out.dtype == slim_out.dtype == torch.float32
    assert (gated_out - slim_out).abs().max().item() <= 1e-5
    # the masks did change the function (so the comparison above is not vacuous) ...
    assert (dense_out - gated_out).abs().max().item() > 1e-4
    # ... and leaving the ``gated`` block removed every gate
    assert torch.equal(again, dense_out)
    return kept


@pytest.mark.parametrize("name", FAMILIES)
def test_groups_are_ordered_and_well_formed(name, model_seq, example_input):
    model, seq = model_seq(name)
    assert len(seq) == len(seq.groups) >= 3
    assert len(set(seq.names)) == len(seq.names)
    classifier = _classifier_name(model)
    order = _exec_order(model, example_input)
    first_exec = []
    for i, g in enumerate(seq.groups):
        assert g.order == i
        assert g.channels > 0 and g.units > 0
        assert g.units * g.ch_groups == g.channels
        assert g.producers, f"group {g.name} has no producer"
        names = [s.module_name for s in g.producers]
        assert classifier not in names, f"classifier {classifier} is pruned by group {g.name}"
        for slot in g.producers:
            mod = model.get_submodule(slot.module_name)
            n_out = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
            assert 0 <= int(slot.positions.min()) and int(slot.positions.max()) < n_out
            assert int(slot.units.max()) < g.units
        for slot in g.consumers:
            mod = model.get_submodule(slot.module_name)
            n_in = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
            assert int(slot.positions.max()) < n_in
        # a grouped conv among the producers forces its group count onto the unit structure
        for slot in g.producers:
            mod = model.get_submodule(slot.module_name)
            if isinstance(mod, nn.Conv2d) and 1 < mod.groups < mod.out_channels:
                assert g.ch_groups % mod.groups == 0 or mod.groups % g.ch_groups == 0
                assert g.ch_groups > 1
        first_exec.append(min(order[n] for n in names))
    # groups follow the forward pass
    assert first_exec == sorted(first_exec)
    assert len(set(first_exec)) == len(first_exec)
    if name in GROUPED:
        assert any(g.ch_groups > 1 for g in seq.groups)
    else:  # depthwise convs prune per channel; nothing else is grouped
        assert all(g.ch_groups == 1 for g in seq.groups)


@pytest.mark.parametrize("name", FAMILIES)
def test_dense_macs_equal_hook_count(name, model_seq, example_input):
    model, seq = model_seq(name)
    assert seq.dense_macs == count_macs(model, example_input)
    assert seq.macs([g.units for g in seq.groups]) == seq.dense_macs
    unit = seq.unit_macs()
    assert len(unit) == len(seq) and all(u > 0 for u in unit)


@pytest.mark.parametrize("name", FAMILIES)
def test_arbitrary_kept_counts_slim_equals_gated(name, model_seq):
    """Arbitrary kept counts and positions (not only what the budgeted selection produces)."""
    model, seq = model_seq(name)
    g = torch.Generator().manual_seed(1)
    unit_masks = []
    for grp in seq.groups:
        k = int(torch.randint(1, max(grp.units, 2), (1,), generator=g))  # 1 .. units-1: always remove some
        m = torch.zeros(grp.units, dtype=torch.bool)
        m[torch.randperm(grp.units, generator=g)[:k]] = True
        unit_masks.append(m)
    x = torch.randn(2, 3, 32, 32, generator=g)
    kept = _check_slim_equals_gated(model, seq, unit_masks, x)
    assert seq.macs(kept) < seq.dense_macs


@pytest.mark.parametrize("name", FAMILIES)
def test_selected_masks_slim_equals_gated(name, model_seq):
    """Random scores -> budgeted selection -> physical slim: same MACs and same function as the gates."""
    model, seq = model_seq(name)
    round_to = 8 if FAMILIES.index(name) % 2 == 0 else 1
    g = torch.Generator().manual_seed(2)
    scores = [torch.rand(grp.units, generator=g) for grp in seq.groups]
    unit_masks = select_units(scores, seq, 0.5, round_to=round_to)
    x = torch.randn(2, 3, 32, 32, generator=g)
    kept = _check_slim_equals_gated(model, seq, unit_masks, x)
    assert seq.macs(kept) <= 0.5 * seq.dense_macs


def test_count_macs_by_hand():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    # 8x8 input: conv1 8*8 out pos * 4 out * 3 in * 9; conv2 4*4 pos * 8 out * (4/2) in * 9; linear 8*5
    expected = 8 * 8 * 4 * 3 * 9 + 4 * 4 * 8 * 2 * 9 + 8 * 5
    assert count_macs(net, torch.zeros(3, 3, 8, 8)) == expected


def test_gated_masks_carry_gradients(model_seq):
    model, seq = model_seq("resnet10t")
    masks = [torch.full((g.units,), 0.5, requires_grad=True) for g in seq.groups]
    with seq.gated(masks):
        out = model(torch.randn(2, 3, 32, 32))
    out.square().sum().backward()
    for g, m in zip(seq.groups, masks):
        assert m.grad is not None and m.grad.abs().sum() > 0, g.name


# ---------------------------------------------------------------------------------- refusals
class _LinearLayerNormLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.chan_norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.chan_norm(self.fc1(x)))


class _ConvGroupNormConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_a = nn.Conv2d(3, 8, 3)
        self.group_norm = nn.GroupNorm(2, 8)
        self.conv_b = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv_b(self.group_norm(self.conv_a(x)))


class _BareScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.gain = nn.Parameter(torch.ones(16))
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.fc1(x) * self.gain)


def test_layernorm_over_channels_is_refused_with_layer_name():
    with pytest.raises(AdapterError) as exc:
        build_layer_sequence(_LinearLayerNormLinear(), torch.randn(1, 8))
    msg = str(exc.value)
    assert "'chan_norm'" in msg and "LayerNorm" in msg and "'fc1'" in msg


def test_groupnorm_is_refused_with_layer_name():
    # zeroing one channel is not the same as removing it from a GroupNorm's statistics
    with pytest.raises(AdapterError, match=r"'group_norm' \(GroupNorm\)"):
        build_layer_sequence(_ConvGroupNormConv(), torch.randn(1, 3, 8, 8))


def test_bare_parameter_is_refused_with_its_name():
    with pytest.raises(AdapterError, match=r"bare parameter 'gain'"):
        build_layer_sequence(_BareScale(), torch.randn(1, 8))


def test_model_with_only_a_classifier_is_refused():
    class OnlyHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(x)

        def get_classifier(self):
            return self.fc

    with pytest.raises(AdapterError, match="no prunable channel group"):
        build_layer_sequence(OnlyHead(), torch.randn(1, 8))


def test_tracing_failure_becomes_adapter_error():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2))  # wrong flatten size for 8x8
    with pytest.raises(AdapterError, match="cannot build the dependency graph of Sequential"):
        build_layer_sequence(net, torch.randn(1, 3, 8, 8))


def test_frozen_weights_are_still_traced_and_stay_frozen():
    from conftest import make_model

    model = make_model("resnet10t")
    for p in model.parameters():
        p.requires_grad_(False)
    seq = build_layer_sequence(model, torch.zeros(1, 3, 32, 32))
    assert len(seq) > 3
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
