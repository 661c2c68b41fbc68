"""Budgeted unit selection, mask conversions and the masks file format."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from pass_zoo.errors import BudgetError
from pass_zoo.graph.masks import (load_masks, masks_summary, save_masks, select_units, to_channel_masks,
                                  to_unit_masks)
from pass_zoo.graph.cost_model import count_macs
from pass_zoo.graph.slim import slim

TARGETS = (0.25, 0.5, 0.75)


def _scores(seq, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(grp.units, generator=g) for grp in seq.groups]


def _kept_channels(unit_masks, seq):
    return [int(m.sum()) * g.ch_groups for m, g in zip(unit_masks, seq.groups)]


@pytest.mark.parametrize("round_to", [1, 8])
@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_budget_is_met_tightly(name, round_to, model_seq):
    model, seq = model_seq(name)
    for i, target in enumerate(TARGETS):
        scores = _scores(seq, seed=10 + i)
        masks = select_units(scores, seq, target, round_to=round_to)
        assert [m.numel() for m in masks] == [g.units for g in seq.groups]
        assert all(m.dtype == torch.bool and m.any() for m in masks)
        kept = [int(m.sum()) for m in masks]
        macs = seq.macs(kept)
        assert macs <= target * seq.dense_macs, (target, macs / seq.dense_macs)
        assert macs >= (target - 0.03) * seq.dense_macs, (target, macs / seq.dense_macs)
        # within each group the best-scoring units are the kept ones
        for s, m in zip(scores, masks):
            if not m.all():
                assert s[m].min() >= s[~m].max()
        if round_to == 8:
            for ch, g in zip(_kept_channels(masks, seq), seq.groups):
                assert ch % 8 == 0 or ch == g.channels, (g.name, ch, g.channels)


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_budget_holds_on_the_physically_slimmed_model(name, model_seq, example_input):
    model, seq = model_seq(name)
    masks = select_units(_scores(seq, seed=3), seq, 0.25, round_to=8)
    slim_model, _ = slim(model, to_channel_masks(masks, seq), example_input)
    macs = count_macs(slim_model, example_input)
    assert 0.22 * seq.dense_macs <= macs <= 0.25 * seq.dense_macs


def test_round_to_with_grouped_convs(model_seq):
    model, seq = model_seq("regnetx_002")
    assert any(g.ch_groups > 1 and 8 % g.ch_groups for g in seq.groups)  # e.g. 3 conv groups
    masks = select_units(_scores(seq, seed=4), seq, 0.5, round_to=8)
    for ch, g in zip(_kept_channels(masks, seq), seq.groups):
        assert ch % 8 == 0 or ch == g.channels, (g.name, ch, g.channels, g.ch_groups)
    assert seq.macs([int(m.sum()) for m in masks]) <= 0.5 * seq.dense_macs


def test_global_selection_keeps_the_longest_fitting_prefix(model_seq):
    """round_to=1: one ranking over all units; kept = best units, and one more would break the budget."""
    model, seq = model_seq("resnet18")
    scores = _scores(seq, seed=5)
    for s in scores:  # every group has one clear winner, so no group is kept alive by the 1-unit minimum
        s[0] = 10.0
    masks = select_units(scores, seq, 0.5, round_to=1)
    flat_s, flat_m = torch.cat(scores), torch.cat(masks)
    assert flat_s[flat_m].min() > flat_s[~flat_m].max()
    # adding the best dropped unit goes over budget
    best = int(torch.argmax(torch.where(flat_m, torch.full_like(flat_s, -1.0), flat_s)))
    offsets = torch.cumsum(torch.tensor([0] + [g.units for g in seq.groups]), 0)
    gi = int(torch.searchsorted(offsets, torch.tensor(best), right=True)) - 1
    kept = [int(m.sum()) for m in masks]
    kept[gi] += 1
    assert seq.macs(kept) > 0.5 * seq.dense_macs


@pytest.mark.parametrize("name", ["tf_efficientnet_lite0", "resnet18"])
def test_uniform_keeps_equal_fractions(name, model_seq):
    model, seq = model_seq(name)
    a = select_units(_scores(seq, 6), seq, 0.5, round_to=1, selection="uniform")
    b = select_units(_scores(seq, 7), seq, 0.5, round_to=1, selection="uniform")
    kept_a, kept_b = [int(m.sum()) for m in a], [int(m.sum()) for m in b]
    assert kept_a == kept_b  # widths do not depend on the scores ...
    assert any(not torch.equal(x, y) for x, y in zip(a, b))  # ... which units do
    totals = [g.units for g in seq.groups]
    # one fraction f with |kept_i - f * total_i| <= 1/2 for every group (rounding to nearest unit)
    lo = max((k - 0.5) / t for k, t in zip(kept_a, totals))
    hi = min((k + 0.5) / t for k, t in zip(kept_a, totals))
    assert lo <= hi + 1e-9, (lo, hi)
    assert 0.3 < lo < 0.8
    macs = seq.macs(kept_a)
    assert (0.5 - 0.03) * seq.dense_macs <= macs <= 0.5 * seq.dense_macs


def test_full_budget_keeps_everything(model_seq):
    model, seq = model_seq("resnet18")
    masks = select_units(_scores(seq, 8), seq, 1.0, round_to=8)
    assert all(m.all() for m in masks)


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5, 1.0001])
def test_target_outside_unit_interval_is_refused(target, model_seq):
    model, seq = model_seq("resnet18")
    with pytest.raises(BudgetError, match=r"must be in \(0, 1\]"):
        select_units(_scores(seq, 9), seq, target)


def test_unknown_selection_is_refused(model_seq):
    model, seq = model_seq("resnet18")
    with pytest.raises(ValueError, match="unknown selection 'random'"):
        select_units(_scores(seq, 9), seq, 0.5, selection="random")


def _smallest_fraction(seq, round_to):
    kept = [min(max(1, round_to // math.gcd(round_to, g.ch_groups)), g.units) for g in seq.groups]
    return seq.macs(kept) / seq.dense_macs


@pytest.mark.parametrize("round_to", [1, 8])
def test_impossible_budget_says_what_is_reachable(round_to, model_seq):
    model, seq = model_seq("tf_efficientnet_lite0")
    with pytest.raises(BudgetError) as exc:
        select_units(_scores(seq, 9), seq, 1e-6, round_to=round_to)
    msg = str(exc.value)
    assert "cannot be met" in msg and f"keeps {round_to} channel(s) per group" in msg
    smallest = _smallest_fraction(seq, round_to)
    m = re.search(r"still has ([0-9.e+-]+)", msg)
    assert m, msg
    assert abs(float(m.group(1)) - smallest) <= 5e-4 + 0.01 * smallest


def test_impossible_budget_message_shows_the_requested_target(model_seq):
    """1e-6 must not be printed as 'target 0.000' (which reads as 0, a different error)."""
    model, seq = model_seq("tf_efficientnet_lite0")
    with pytest.raises(BudgetError) as exc:
        select_units(_scores(seq, 9), seq, 1e-6, round_to=1)
    msg = str(exc.value)
    numbers = [float(n) for n in re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", msg)]
    assert any(math.isclose(n, 1e-6, rel_tol=0.01) for n in numbers), msg
    assert "0.000 " not in msg, msg


# ------------------------------------------------------------------------------ conversions
def test_unit_channel_round_trip_on_grouped_model(model_seq):
    model, seq = model_seq("regnetx_002")
    units = select_units(_scores(seq, 11), seq, 0.5, round_to=1)
    channels = to_channel_masks(units, seq)
    assert list(channels) == seq.names
    for g, u in zip(seq.groups, units):
        c = channels[g.name]
        assert c.dtype == torch.bool and c.numel() == g.channels
        assert int(c.sum()) == int(u.sum()) * g.ch_groups
        # grouped convs: the same positions in each of the ch_groups slices
        assert torch.equal(c.view(g.ch_groups, g.units), u.expand(g.ch_groups, -1))
    back = to_unit_masks(channels, seq)
    assert all(torch.equal(a, b) for a, b in zip(back, units))


def test_to_unit_masks_errors(model_seq):
    model, seq = model_seq("regnetx_002")
    units = select_units(_scores(seq, 12), seq, 0.5, round_to=1)
    good = to_channel_masks(units, seq)
    g0 = seq.groups[0]

    wrong_size = dict(good)
    wrong_size[g0.name] = good[g0.name][:-1]
    with pytest.raises(BudgetError, match=rf"group '{re.escape(g0.name)}' has {g0.channels - 1} channels, "
                                          rf"the model has {g0.channels}"):
        to_unit_masks(wrong_size, seq)

    unknown = dict(good)
    unknown["not.a.layer"] = torch.ones(4, dtype=torch.bool)
    with pytest.raises(BudgetError, match=r"unknown groups \['not\.a\.layer'\]"):
        to_unit_masks(unknown, seq)

    missing = dict(good)
    del missing[g0.name]
    with pytest.raises(BudgetError, match=rf"missing groups \['{re.escape(g0.name)}'\]"):
        to_unit_masks(missing, seq)

    grouped = next(g for g in seq.groups if g.ch_groups > 1)
    uneven = dict(good)
    m = torch.ones(grouped.channels, dtype=torch.bool)
    m[0] = False  # only in the first slice
    uneven[grouped.name] = m
    with pytest.raises(BudgetError, match=rf"not the same in each of its {grouped.ch_groups} conv groups"):
        to_unit_masks(uneven, seq)


def test_a_mask_that_empties_a_group_is_refused(model_seq, example_input):
    """Removing every channel of a group leaves a 0-channel conv that cannot run: the mask
    validator (used by ``slim`` and ``masks_summary``) must say so instead of returning it."""
    model, seq = model_seq("resnet10t")
    units = [torch.ones(g.units, dtype=torch.bool) for g in seq.groups]
    units[2][:] = False
    masks = to_channel_masks(units, seq)
    name = re.escape(seq.groups[2].name)
    with pytest.raises(BudgetError, match=rf"'{name}'"):
        to_unit_masks(masks, seq)
    with pytest.raises(BudgetError, match=rf"'{name}'"):
        slim(model, masks, example_input)


def test_save_and_load_masks_round_trip(model_seq, tmp_path):
    from safetensors import safe_open

    model, seq = model_seq("resnet18")
    units = select_units(_scores(seq, 13), seq, 0.5, round_to=8)
    masks = to_channel_masks(units, seq)
    summary = masks_summary(masks, seq)
    save_masks(masks, summary, tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.json", "masks.safetensors"]
    with safe_open(str(tmp_path / "masks.safetensors"), "pt") as fh:
        assert fh.metadata() == {"format": "pass-zoo-masks/1"}
        assert all(fh.get_tensor(k).dtype == torch.uint8 for k in fh.keys())
    loaded = load_masks(tmp_path / "masks.safetensors")
    assert set(loaded) == set(masks)
    for k in masks:
        assert loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k])

    js = json.loads((tmp_path / "masks.json").read_text())
    kept = [int(u.sum()) for u in units]
    assert js["format"] == "pass-zoo-masks/1"
    assert js["macs_dense"] == seq.dense_macs
    assert js["macs_slim"] == seq.macs(kept)
    assert js["macs_ratio"] == pytest.approx(seq.macs(kept) / seq.dense_macs)
    assert js["macs_slim"] <= 0.5 * js["macs_dense"]
    assert [g["name"] for g in js["groups"]] == seq.names
    for entry, g, u in zip(js["groups"], seq.groups, units):
        assert entry["kept"] == int(masks[g.name].sum()) == int(u.sum()) * g.ch_groups
        assert entry["total"] == g.channels
        assert entry["ch_groups"] == g.ch_groups
    # the masks from disk slim to the MACs the summary claims
    assert seq.macs([int(u.sum()) for u in to_unit_masks(loaded, seq)]) == js["macs_slim"]


def test_batched_macs_equal_the_per_layer_count(model_seq):
    """``macs_batch`` (what the selection's fill step queries) is exact, attention models included."""
    from pass_zoo.graph.sequence import build_layer_sequence
    from conftest import make_model

    _, cnn = model_seq("resnet10t")
    vit = build_layer_sequence(make_model("vit_tiny_patch16_224", img_size=32, patch_size=8), torch.zeros(1, 3, 32, 32))
    g = torch.Generator().manual_seed(0)
    for seq in (cnn, vit):
        kept = torch.stack([torch.randint(1, grp.units + 1, (20,), generator=g) for grp in seq.groups], 1)
        assert seq.macs_batch(kept).tolist() == [seq.macs(k.tolist()) for k in kept]
