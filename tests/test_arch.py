"""Transformers and more CNN families: gated == slim, exact MACs, strict reload, ONNX parity.

Every family is built small (timm kwargs cut depth / input size) at random init, with non-trivial
norm gains, layer scales and BN statistics (``check.perturb``) so that a wrong gate would show.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
import torch.nn as nn
import yaml

import pass_zoo.export.onnx as onnx_export
from pass_zoo import build_layer_sequence, load_run_model, save_slim_model, select_units, slim
from pass_zoo.tools.check import (CURATED, STAGES, CheckResult, _child, family_of, markdown_table, perturb,
                                  run_check)
from pass_zoo.cli import main
from pass_zoo.errors import AdapterError, BudgetError
from pass_zoo.export.timm_model import SPEC_FORMAT, SpecMismatchError
from pass_zoo.graph.families import attention_modules
from pass_zoo.graph.masks import masks_summary, to_channel_masks, to_unit_masks
from pass_zoo.prompt import PromptedModel, create_prompt
from pass_zoo.graph.cost_model import count_macs

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 10
# name -> (timm kwargs, input size); the smallest configuration that keeps the family's structure
ARCHS = {
    "vit_tiny_patch16_224": ({"img_size": 32, "depth": 2}, 32),  # 4 patches + class token
    # window 4 on a 16x16 grid: stage 0/1 second blocks use shifted windows; patch merging between
    "swin_tiny_patch4_window7_224": ({"img_size": 64, "window_size": 4, "depths": (2, 2, 1, 1)}, 64),
    "convnext_atto": ({}, 32),  # channels-last LayerNorm, layer scale: only MLP hidden units prune
    "densenet121": ({"block_config": (2, 2, 2, 2)}, 32),  # concatenation
    "resnext50_32x4d": ({"layers": (1, 1, 1, 1)}, 32),  # grouped 3x3 convs
    "efficientnet_b0": ({}, 32),  # depthwise + squeeze-excite
    "mobilenetv3_large_100": ({}, 32),  # hard-swish SE, conv head after pooling
    "vgg11": ({"mlp_ratio": 1 / 16}, 32),  # no BN (vgg16 is in the check sweep; vgg11 is 3x faster here)
}
LABELS = [f"c{i}" for i in range(NUM_CLASSES)]


def _set_fused(model: nn.Module, fused: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused


def _build(name):
    kwargs, size = ARCHS[name]
    torch.manual_seed(0)
    model = perturb(timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval())
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    seq = build_layer_sequence(model, x[:1])
    g = torch.Generator().manual_seed(2)
    units = select_units([torch.rand(grp.units, generator=g) for grp in seq.groups], seq, 0.5, round_to=8)
    masks = to_channel_masks(units, seq)
    slim_model, history = slim(model, masks, x[:1])
    return model, seq, units, masks, slim_model.eval(), history, x


_PRUNED = {}


def _pruned(name, tmp_path_factory):
    """Built, pruned and exported once per session: ``(name, model, seq, units, slim, prompted, out, x)``."""
    if name not in _PRUNED:
        _PRUNED[name] = _export(name, tmp_path_factory)
    return _PRUNED[name]


@pytest.fixture(params=list(ARCHS))
def pruned(request, tmp_path_factory):
    return _pruned(request.param, tmp_path_factory)


def _export(name, tmp_path_factory):
    model, seq, units, masks, slim_model, history, x = _build(name)
    out = tmp_path_factory.mktemp(name)
    prompt = create_prompt("additive", x.shape[-1], 2)
    with torch.no_grad():
        prompt.delta.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
    prompted = PromptedModel(slim_model, prompt).eval()
    save_slim_model(prompted, out, base_arch=name, history=history, num_classes=NUM_CLASSES, label_names=LABELS,
                    base_pretrained_cfg=dict(model.pretrained_cfg), img_size=x.shape[-1],
                    model_kwargs=ARCHS[name][0])
    return name, model, seq, units, slim_model, prompted, out, x, masks


def test_masked_equals_slim_and_macs_are_exact(pruned):
    name, model, seq, units, slim_model, _, _, x, _ = pruned
    kept = [int(u.sum()) for u in units]
    assert seq.macs(kept) == count_macs(slim_model, x[:1])
    assert seq.macs(kept) <= 0.5 * seq.dense_macs
    assert seq.dense_macs == count_macs(model, x[:1])
    assert kept != [g.units for g in seq.groups]
    for fused in (True, False):  # the attention's fused and explicit paths
        _set_fused(model, fused)
        _set_fused(slim_model, fused)
        with torch.no_grad():
            dense = model(x)
            with seq.gated([u.float() for u in units]):
                gated = model(x)
            slimmed = slim_model(x)
        assert slimmed.shape == (3, NUM_CLASSES)
        assert (gated - slimmed).abs().max().item() <= 1e-5 * max(1.0, dense.abs().max().item()), name
        assert (dense - gated).abs().max().item() > 1e-3  # the masks changed the function
    _set_fused(model, True)


def test_strict_reload_and_onnx_parity(pruned):
    name, _, _, _, _, prompted, out, x, _ = pruned
    spec = json.loads((out / "config.json").read_text())["model_args"]["spec"]
    if ARCHS[name][0] or spec.get("fixups"):  # kwargs or heads need spec /2; plain CNNs stay /1
        assert spec["format"] == SPEC_FORMAT and spec["model_kwargs"] == json.loads(json.dumps(ARCHS[name][0]))
    else:
        assert spec["format"] == "pass-zoo-slim/1" and "fixups" not in spec
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    with torch.no_grad():
        assert (loaded(x) - prompted(x)).abs().max().item() <= 1e-5 * max(1.0, prompted(x).abs().max().item())
    report = onnx_export.export_onnx(out)
    assert report["passed"] and report["max_abs_diff_random"] <= 1e-4
    session = onnx_export.ort_session(out / "model.onnx")
    onnx_out = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert abs(onnx_out - prompted(x).numpy()).max() <= 1e-4


# ------------------------------------------------------------------------------ transformers
def test_vit_heads_and_mlp_groups(tmp_path_factory):
    _, model, seq, units, slim_model, _, out, x, _ = _pruned("vit_tiny_patch16_224", tmp_path_factory)
    heads = [g for g in seq.groups if g.kind == "heads"]
    mlps = [g for g in seq.groups if g.name.endswith("mlp.fc1")]
    assert [g.name for g in seq.groups] == ["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "blocks.1.mlp.fc1"]
    assert all(g.units == 3 and g.channels == 576 and g.head_dim == 64 for g in heads)
    assert all(g.units == 768 for g in mlps)
    # the residual stream passes through LayerNorm, cls token and pos embedding: left dense, with a reason
    assert len(seq.excluded) == 1 and "LayerNorm" in seq.excluded[0][1]
    fixups = json.loads((out / "config.json").read_text())["model_args"]["spec"]["fixups"]
    for g, u in zip(seq.groups, units):
        if g.kind != "heads":
            continue
        attn = slim_model.get_submodule(g.attention)
        k = int(u.sum())
        assert attn.num_heads == k and attn.head_dim == 64 and attn.attn_dim == 64 * k
        assert attn.qkv.out_features == 3 * 64 * k and attn.proj.in_features == 64 * k
        assert attn.scale == 64 ** -0.5
        assert {"module": g.attention, "family": "timm.layers.Attention", "head_dim": 64,
                "kept_heads": torch.nonzero(u).flatten().tolist()} in fixups
        # the kept heads' q, k and v rows are the dense rows of those heads
        dense_qkv = model.get_submodule(g.attention).qkv.weight.view(3, 3, 64, -1)
        assert torch.equal(attn.qkv.weight.view(3, k, 64, -1), dense_qkv[:, u])


def test_attention_matmuls_are_counted(tmp_path_factory):
    _, model, seq, units, slim_model, _, _, x, _ = _pruned("vit_tiny_patch16_224", tmp_path_factory)
    linear_only = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear)) * 5 \
        - model.head.in_features * model.head.out_features * 4  # 5 tokens; the head reads the class token only
    patch = model.patch_embed.proj
    conv = 4 * patch.out_channels * patch.in_channels * 16 * 16
    attention = 2 * 2 * 5 * 5 * 192  # depth 2 x (q@k^T + attn@v) x tokens^2 x heads*head_dim
    assert count_macs(model, x[:1]) == linear_only + conv + attention == seq.dense_macs
    kept_heads = [int(u.sum()) for g, u in zip(seq.groups, units) if g.kind == "heads"]
    costs = {c.name: c for c in seq.costs if hasattr(c, "per_head")}
    assert sorted(costs) == ["blocks.0.attn", "blocks.1.attn"]
    assert [c.per_head for c in costs.values()] == [2 * 5 * 5 * 64] * 2
    assert sum(c.macs([int(u.sum()) for u in units], seq.groups) for c in costs.values()) == 2 * 5 * 5 * 64 * sum(kept_heads)


def test_swin_heads_bias_table_and_windows(tmp_path_factory):
    _, model, seq, units, slim_model, _, out, x, _ = _pruned("swin_tiny_patch4_window7_224", tmp_path_factory)
    blocks = [b for s in model.layers for b in s.blocks]
    assert any(any(b.shift_size) for b in blocks)  # shifted windows are exercised
    heads = [g for g in seq.groups if g.kind == "heads"]
    assert [g.units for g in heads] == [3, 3, 6, 6, 12, 24] and all(g.head_dim == 32 for g in heads)
    assert len([g for g in seq.groups if g.name.endswith("mlp.fc1")]) == 6
    assert seq.excluded and all("LayerNorm" in why for _, why in seq.excluded)  # residual stream + merging
    for g, u in zip(seq.groups, units):
        if g.kind == "heads":
            dense, small = model.get_submodule(g.attention), slim_model.get_submodule(g.attention)
            assert small.num_heads == int(u.sum())
            assert torch.equal(small.relative_position_bias_table, dense.relative_position_bias_table[:, u])
    # patch merging and the residual width are untouched
    for name, mod in model.named_modules():
        if name.endswith("downsample.reduction"):
            assert slim_model.get_submodule(name).weight.shape == mod.weight.shape
    spec = json.loads((out / "config.json").read_text())["model_args"]["spec"]
    assert spec["model_kwargs"]["depths"] == [2, 2, 1, 1]
    assert {f["family"] for f in spec["fixups"]} == {"timm.swin.WindowAttention"}


def test_convnext_prunes_mlp_hidden_units_only(tmp_path_factory):
    _, model, seq, _, slim_model, _, _, _, _ = _pruned("convnext_atto", tmp_path_factory)
    assert all(g.name.endswith("mlp.fc1") for g in seq.groups) and len(seq.groups) == sum(
        len(s.blocks) for s in model.stages)
    for g in seq.groups:  # hidden width 4 x the block's width; fc1 out / fc2 in only
        fc2 = model.get_submodule(g.name.replace("fc1", "fc2"))
        assert g.units == 4 * fc2.out_channels and [s.module_name for s in g.consumers] == [g.name.replace("fc1", "fc2")]
    reasons = " ".join(why for _, why in seq.excluded)
    assert "LayerNorm" in reasons  # stem, downsampling and the residual stream stay dense
    for g in seq.groups:
        block = g.name.rsplit(".mlp", 1)[0]
        assert slim_model.get_submodule(block).gamma.shape == model.get_submodule(block).gamma.shape


# ------------------------------------------------------------------------------ exclusion rules
class _UnregisteredAttention(nn.Module):
    """Multi-head attention the families registry does not know: its q/k rows have no exact gate."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(8, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 32)
        self.fc2 = nn.Linear(32, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = x + self.proj((q @ k.transpose(-2, -1)).softmax(-1).matmul(v).transpose(1, 2).reshape(b, n, -1))
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))

    def get_classifier(self):
        return self.head


def test_unregistered_attention_is_left_dense_not_gated_wrongly():
    torch.manual_seed(0)
    model = _UnregisteredAttention().eval()
    x = torch.randn(2, 5, 8)
    seq = build_layer_sequence(model, x[:1])
    assert "qkv" not in seq.names and "fc1" in seq.names  # the residual width (no LayerNorm here) prunes too
    assert seq.excluded == [("qkv", "32 of its 48 units reach no conv/linear input that could gate them "
                                    "(an unregistered attention module?)")]
    units = [torch.arange(g.units) % 2 == 0 for g in seq.groups]
    slim_model, _ = slim(model, to_channel_masks(units, seq), x[:1])
    with torch.no_grad(), seq.gated([u.float() for u in units]):
        gated = model(x)
    assert (gated - slim_model(x)).abs().max() <= 1e-6


def test_weight_standardised_convs_prune_exactly():
    from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d

    class Net(nn.Module):  # NF-ResNet / BiT layers: each filter standardised over its inputs
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3)
            self.b = ScaledStdConv2d(8, 8, 3)
            self.s = StdConv2d(8, 8, 3)
            self.t = ScaledStdConv2dSame(8, 8, 3, stride=2)
            self.grouped = ScaledStdConv2d(8, 8, 1, groups=2)
            self.fc = nn.Linear(8, 2)

        def forward(self, x):
            x = torch.relu(self.s(torch.relu(self.b(torch.relu(self.a(x))))))
            return self.fc(self.grouped(torch.relu(self.t(x))).mean((2, 3)))

        def get_classifier(self):
            return self.fc

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for conv in (net.b, net.t):
            conv.gain.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 16, 16)
    seq = build_layer_sequence(net, x[:1])
    assert seq.names == ["a", "b", "s", "grouped"]
    assert dict(seq.excluded)["t"] == ("layer 'grouped' (ScaledStdConv2d) standardises grouped filters over "
                                       "their inputs, which its search-time gate does not model")
    units = [torch.arange(g.units) % 3 != 0 for g in seq.groups]  # keep 5 of 8
    slim_model, _ = slim(net, to_channel_masks(units, seq), x[:1])
    assert tuple(slim_model.b.weight.shape) == (5, 5, 3, 3) and tuple(slim_model.b.gain.shape) == (5, 1, 1, 1)
    assert tuple(slim_model.t.weight.shape) == (8, 5, 3, 3)
    with torch.no_grad():
        dense = net(x)
        with seq.gated([u.float() for u in units]):
            gated = net(x)
        slim_out = slim_model(x)
        assert torch.allclose(gated, slim_out, atol=1e-5)
        with mock.patch("pass_zoo.graph.gates._WEIGHT_STANDARDISED", ()), seq.gated([u.float() for u in units]):
            zeroed_only = net(x)  # a zeroed input still counts in the filter's mean and variance
    assert float((zeroed_only - slim_out).abs().max()) > 1e-3
    assert float((gated - dense).abs().max()) > 1e-3


def test_a_group_torch_pruning_cannot_resolve_is_a_clear_error(monkeypatch):
    import time

    import torch_pruning as tp

    import pass_zoo.graph.groups as adapter

    def stuck(self, *args, **kwargs):
        time.sleep(30)  # what Torch-Pruning does on ReXNet's in-place slice adds (forever)

    monkeypatch.setattr(adapter, "GROUP_TIME_LIMIT_S", 0.2)
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", stuck)
    start = time.time()
    with pytest.raises(AdapterError, match=r"dependency analysis did not finish within 0.2 s \(channel slicing"):
        build_layer_sequence(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)), torch.randn(1, 3, 4, 4))
    assert time.time() - start < 10


class _ConvAttentionNet(nn.Module):
    """Visformer's 1x1-conv attention in a residual block: Torch-Pruning's walk of the qkv group loops
    through its reshape (each lap maps the indices to a new set) and, unbounded, never returns."""

    def __init__(self):
        super().__init__()
        from timm.models.visformer import Attention

        self.stem, self.bn = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.attn = Attention(16, num_heads=2)
        self.mlp = nn.Sequential(nn.Conv2d(16, 32, 1), nn.ReLU(), nn.Conv2d(32, 16, 1))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.bn(self.stem(x))
        x = x + self.attn(x)
        x = x + self.mlp(x)
        return self.head(x.mean((2, 3)))


def test_a_group_whose_walk_loops_stays_dense_and_the_rest_slims_exactly():
    torch.manual_seed(0)
    net = _ConvAttentionNet().eval()
    x = torch.randn(2, 3, 8, 8)
    seq = build_layer_sequence(net, x[:1])  # unbounded, this call does not return
    reasons = dict(seq.excluded)
    assert reasons["attn.qkv"] == ("Torch-Pruning's walk of its coupled channels loops (an index mapping "
                                   "through a reshape it cannot close)")
    assert [g.name for g in seq.groups] == ["mlp.0"]
    units = [torch.arange(seq.groups[0].units) % 2 == 0]
    slim_model, _ = slim(net, to_channel_masks(units, seq), x[:1])
    with torch.no_grad(), seq.gated([u.float() for u in units]):
        gated = net(x)
    assert slim_model.mlp[0].out_channels == 16 and slim_model.attn.qkv.out_channels == 48
    assert torch.allclose(gated, slim_model(x), atol=1e-5)


class _DualPathNet(nn.Module):
    """DPN's pattern: one conv's output split by integer slices into a residual and a dense part."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.proj = nn.Conv2d(24, 24, 1)  # rows [0, 16) residual, [16, 24) dense
        self.inner = nn.Conv2d(24, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.out_res = nn.Conv2d(32, 16, 1)
        self.head = nn.Conv2d(16 + 8, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        s = self.proj(x)
        res, dense = s[:, :16], s[:, 16:]
        y = self.out_res(torch.relu(self.bn(self.inner(x))))
        return self.head(torch.cat([res + y, dense], dim=1))


def test_a_fixed_channel_slice_keeps_its_groups_dense_and_the_rest_slims_exactly():
    torch.manual_seed(0)
    net = _DualPathNet().eval()
    x = torch.randn(2, 3, 8, 8)
    seq = build_layer_sequence(net, x[:1])
    reasons = dict(seq.excluded)
    assert "sliced with fixed bounds" in reasons["proj"] and "'proj'" in reasons["proj"]
    assert "inner" in [g.name for g in seq.groups] and "proj" not in [g.name for g in seq.groups]
    units = [torch.arange(g.units) % 2 == 0 for g in seq.groups]
    slim_model, _ = slim(net, to_channel_masks(units, seq), x[:1])
    assert slim_model.proj.out_channels == 24 and slim_model.inner.out_channels == 16
    with torch.no_grad(), seq.gated([u.float() for u in units]):
        gated = net(x)
    assert torch.allclose(gated, slim_model(x), atol=1e-5)


class _SelectiveKernelNet(nn.Module):
    """SKNet's attention: one conv's 2C outputs viewed as (paths, C), softmaxed over the paths."""

    def __init__(self, c=8):
        super().__init__()
        self.c = c
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.path3 = nn.Conv2d(c, c, 3, padding=1)
        self.path1 = nn.Conv2d(c, c, 1)
        self.fc_reduce = nn.Conv2d(c, 4, 1)
        self.fc_select = nn.Conv2d(4, 2 * c, 1)
        self.head = nn.Conv2d(c, 3, 1)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        paths = torch.stack([self.path3(x), self.path1(x)], dim=1)  # B, 2, C, H, W
        attn = self.fc_select(torch.relu(self.fc_reduce(paths.sum(1).mean((2, 3), keepdim=True))))
        attn = attn.view(x.shape[0], 2, self.c, 1, 1).softmax(dim=1)
        return self.head((paths * attn).sum(1))


def test_a_reshape_torch_pruning_maps_the_wrong_way_keeps_its_group_dense():
    seq = build_layer_sequence(_SelectiveKernelNet().eval(), torch.randn(1, 3, 8, 8))
    reasons = dict(seq.excluded)
    assert reasons["fc_select"] == ("its channels are reshaped into (2, 8) with the channel axis inner, which "
                                    "Torch-Pruning maps as (8, 2): slimming 'fc_select' would pair the wrong "
                                    "channels")
    assert "fc_reduce" in seq.names and "fc_select" not in seq.names


class _GluTokenNet(nn.Module):
    """Patch tokens plus a position embedding (a 3-d parameter: Torch-Pruning then turns off the index
    mapping of the splits below it) and timm's ``GluMlp``: fc1's output chunked in halves, multiplied,
    read by fc2 (EVA-02's and gMLP-Mixer's MLP)."""

    def __init__(self):
        from timm.layers import GluMlp

        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.pos = nn.Parameter(torch.randn(1, 4, 16) * 0.1)
        self.mlp = GluMlp(16, 48, act_layer=nn.SiLU)  # fc1: 16 -> 48, halves of 24, fc2: 24 -> 16
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        x = x + self.mlp(x)
        return self.head(x.mean(1))


def test_a_gated_linear_unit_prunes_both_halves_together():
    torch.manual_seed(0)
    net = _GluTokenNet().eval()
    x = torch.randn(2, 3, 8, 8)
    seq = build_layer_sequence(net, x[:1])
    assert [g.name for g in seq.groups] == ["mlp.fc1"]
    g = seq.groups[0]
    assert (g.channels, g.units) == (48, 24)
    unit = g.unit_of_channel()
    assert torch.equal(unit[:24], unit[24:])  # rows j and 24 + j: one unit, gated at fc2's input j
    units = [torch.arange(24) % 3 != 0]  # keep 16 of 24
    masks = to_channel_masks(units, seq)
    slim_model, _ = slim(net, masks, x[:1])
    assert (slim_model.mlp.fc1.out_features, slim_model.mlp.fc2.in_features) == (32, 16)
    with torch.no_grad():
        dense = net(x)
        with seq.gated([u.float() for u in units]):
            gated = net(x)
        assert torch.allclose(gated, slim_model(x), atol=1e-6)
    assert float((gated - dense).abs().max()) > 1e-4
    bad = dict(masks)
    bad["mlp.fc1"] = masks["mlp.fc1"].clone()
    bad["mlp.fc1"][24] = ~bad["mlp.fc1"][24]  # one half of unit 0 only
    with pytest.raises(BudgetError, match="not the same in each set of coupled channels"):
        to_unit_masks(bad, seq)


def test_a_group_torch_pruning_fails_to_map_stays_dense(monkeypatch):
    import torch_pruning as tp

    real = tp.DependencyGraph.get_pruning_group

    def failing(self, module, *args, **kwargs):
        if module is net[2]:
            raise IndexError("list index out of range")  # as its index mapping does on EfficientViM's heads
        return real(self, module, *args, **kwargs)

    net = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 2, 1))
    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", failing)
    seq = build_layer_sequence(net, torch.randn(1, 3, 4, 4))
    assert [g.name for g in seq.groups] == ["0"]
    assert dict(seq.excluded)["2"] == ("Torch-Pruning cannot map its coupled channels (IndexError: list index out "
                                       "of range)")


def test_nothing_prunable_names_every_reason():
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(AdapterError, match=r"^no prunable channel group found: all 2 must stay dense \(group '0': layer "
                                           r"'1' \(LayerNorm\) mixes its channels; group '2': its channels are the "
                                           r"network's output \(no layer reads them\)\)$"):
        build_layer_sequence(net, torch.randn(1, 4))


def test_head_masks_must_cover_whole_heads(tmp_path_factory):
    _, _, seq, _, _, _, _, _, masks = _pruned("vit_tiny_patch16_224", tmp_path_factory)
    g = next(g for g in seq.groups if g.kind == "heads")
    bad = dict(masks)
    bad[g.name] = torch.ones(g.channels, dtype=torch.bool)
    bad[g.name][0] = False  # one q row of head 0, not the head
    from pass_zoo.errors import BudgetError

    with pytest.raises(BudgetError, match=r"not the same in each head \(q, k, v rows\)"):
        to_unit_masks(bad, seq)
    summary = masks_summary(masks, seq)
    row = next(r for r in summary["groups"] if r["name"] == g.name)
    assert row["kind"] == "heads" and row["units"] == 3 and row["total"] == 576 and row["kept"] == 192 * row["kept_units"]


# ------------------------------------------------------------------------------ spec /2 errors
def test_bad_fixups_are_clear_errors(tmp_path_factory, tmp_path):
    out = _pruned("vit_tiny_patch16_224", tmp_path_factory)[6]

    def variant(edit):
        folder = tmp_path / f"v{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        config = json.loads((out / "config.json").read_text())
        edit(config["model_args"]["spec"])
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
        return folder

    with pytest.raises(SpecMismatchError, match="unknown attention family"):
        load_run_model(variant(lambda s: s["fixups"][0].update(family="timm.Nope")))
    with pytest.raises(SpecMismatchError, match="fixup for 'blocks.0.attn' does not fit"):
        load_run_model(variant(lambda s: s["fixups"][0]["kept_heads"].append(99)))
    with pytest.raises(SpecMismatchError, match="'blocks.0.mlp' is a Mlp, not a timm.layers.Attention"):
        load_run_model(variant(lambda s: s["fixups"][0].update(module="blocks.0.mlp")))
    with pytest.raises(SpecMismatchError, match="do not match the slim spec"):  # without fixups: stale heads
        load_run_model(variant(lambda s: s.update(model_kwargs={"img_size": 32, "depth": 3})))


def test_prune_cli_on_a_vit(tmp_path):
    """The whole pipeline on a transformer: --img-size creates the ViT at that size (kwarg recorded)."""
    out = tmp_path / "run"
    assert main(["prune", "--model", "vit_tiny_patch16_224", "--pretrained", "none", "--head", "new",
                 "--img-size", "32", "--model-kwargs", '{"depth": 1}', "--train-subset", "8", "--val-subset", "8",
                 "--batch-size", "4", "--search-steps", "1", "--finetune-steps", "1", "--no-onnx",
                 "--out", str(out)]) == 0
    spec = json.loads((out / "config.json").read_text())["model_args"]["spec"]
    assert spec["format"] == SPEC_FORMAT and spec["model_kwargs"] == {"img_size": 32, "depth": 1}
    assert [f["module"] for f in spec["fixups"]] in (["blocks.0.attn"], [])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["macs_slim"] <= 0.5 * metrics["macs_dense"]
    loaded = load_run_model(out)
    assert loaded.model.blocks[0].mlp.fc1.out_features < 768
    with torch.no_grad():
        assert loaded(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


# ------------------------------------------------------------------------------ check command
def test_check_cli_runs_every_stage(capsys, monkeypatch):
    import pass_zoo.tools.check as check

    results = []
    monkeypatch.setattr(check, "run_check", lambda *a, **k: results.append(run_check(*a, **k)) or results[-1])
    assert main(["check", "--model", "resnet10t", "--img-size", "32"]) == 0
    (result,) = results
    assert result.passed and result.stages == {s: "ok" for s in STAGES}
    assert result.family == "resnet" and result.macs_slim <= 0.5 * result.macs_dense
    assert result.exact_diff <= 1e-5 and result.onnx_diff <= 1e-4
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "resnet10t (resnet) at 32 px"
    assert [line.split()[:2] for line in lines[1:]] == [[s, "ok"] for s in STAGES]
    assert lines[1] == "adapter  ok  (10 groups, 0 of them attention heads; 0 left dense)"
    assert "% of" in lines[3] and "target 50 %" in lines[3]


def test_check_reports_the_failing_stage(monkeypatch):
    import importlib

    slim_module = importlib.import_module("pass_zoo.graph.cost_model")  # where count_macs lives
    monkeypatch.setattr(slim_module, "count_macs", lambda model, x: 7)  # a MACs model that disagrees
    lines = []
    result = run_check("resnet10t", img_size=32, echo=lines.append, search_steps=1)
    assert result.stages == {"adapter": "ok", "search": "ok", "slim": "fail", "exact": "skip", "export": "skip",
                             "reload": "skip", "onnx": "skip"}
    assert result.reason.startswith("slim: layer sequence predicts") and result.reason.endswith("the slim model has 7")
    assert lines[-1] == "slim     fail: " + result.reason[len("slim: "):]


def test_check_cli_errors(capsys):
    assert main(["check"]) == 2
    assert "exactly one of --model NAME, --all or --sweep JSON" in capsys.readouterr().err
    assert main(["check", "--model", "resnet_nope"]) == 2
    assert "unknown timm model 'resnet_nope'" in capsys.readouterr().err


def test_check_sweep_child_timeout_and_table():
    slow = _child("resnet10t", 32, timeout=1, threads=1)  # a child cannot even import torch in 1 s
    assert not slow.passed and slow.reason == "timed out after 1 s"
    assert slow.stages == {s: "skip" for s in STAGES}
    ok = CheckResult("resnet10t", family="resnet", img_size=32, groups=9, macs_dense=1_000_000, macs_slim=490_000,
                     target_macs=0.5, stages={s: "ok" for s in STAGES})
    table = markdown_table([ok, slow], "pass-zoo check --all")
    assert "**1/2 (50 %) pass every stage**" in table and "`pass-zoo check --all`" in table
    assert "| resnet10t | resnet | 32 | 9 (0) / 0 | 49.0 % of 1 M | ok | ok |" in table
    assert "timed out after" in table.splitlines()[-1]


def test_curated_sweep_covers_the_brief():
    must = {"resnet18", "resnet34", "resnet50", "resnext50_32x4d", "vgg16", "vit_base_patch16_224",
            "vit_small_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224", "convnext_tiny",
            "efficientnet_b0", "tf_efficientnet_lite0", "mobilenetv3_large_100", "regnety_008", "densenet121"}
    assert must <= set(CURATED) and len(set(CURATED)) == len(CURATED) >= 30
    assert len({family_of(n) for n in CURATED}) >= 12


# ------------------------------------------------------------------------------ recipes
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_use_prune_config_fields():
    import dataclasses

    from pass_zoo.config import FinetuneConfig
    from pass_zoo.config import PruneConfig
    from pass_zoo.config import SearchConfig

    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    nested = {"search": {f.name for f in dataclasses.fields(SearchConfig)},
              "finetune": {f.name for f in dataclasses.fields(FinetuneConfig)}}
    models = {}
    for path in RECIPES:
        recipe = yaml.safe_load(path.read_text())
        assert isinstance(recipe, dict), path
        unknown = set(recipe) - fields - {"name", "hub_id"}
        assert not unknown, (path.name, unknown)
        for key, allowed in nested.items():
            assert set(recipe.get(key, {})) <= allowed, (path.name, set(recipe.get(key, {})) - allowed)
        assert timm.is_model(recipe["model"]), recipe["model"]
        assert 0 < recipe["target_macs"] <= 1
        assert recipe["name"].endswith(f"-pass{round(100 * recipe['target_macs'])}"), recipe["name"]
        models[recipe["model"]] = recipe
        # the values fit the dataclasses (no typos in nested types)
        PruneConfig(**{k: v for k, v in recipe.items() if k not in ("name", "hub_id", "search", "finetune")},
                    search=SearchConfig(**recipe.get("search", {})),
                    finetune=FinetuneConfig(**recipe.get("finetune", {}))).validate()
    # the paper's seven architectures, plus the offline quickstart's Lite0
    assert set(models) == {"resnet18", "resnet34", "resnet50", "vgg16", "resnext50_32x4d",
                           "vit_base_patch16_224", "swin_tiny_patch4_window7_224", "tf_efficientnet_lite0"}
    assert math.isclose(models["resnext50_32x4d"]["target_macs"], 0.47, abs_tol=0.005)
    assert math.isclose(models["vit_base_patch16_224"]["target_macs"], 0.61, abs_tol=0.005)
    assert math.isclose(models["swin_tiny_patch4_window7_224"]["target_macs"], 0.76, abs_tol=0.005)


class _SharedConvNet(nn.Module):
    """One depthwise conv shared by two blocks (as CoaT shares its position encodings): it runs twice."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.a, self.b = nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = self.stem(x)
        x = self.a(x + self.shared(x))
        x = self.b(x + self.shared(x))
        return self.head(x.mean((2, 3)))


def test_a_module_called_twice_costs_twice():
    torch.manual_seed(0)
    net = _SharedConvNet().eval()
    x = torch.randn(1, 3, 6, 6)
    seq = build_layer_sequence(net, x)
    assert seq.dense_macs == count_macs(net, x)
    units = [torch.arange(g.units) % 2 == 0 for g in seq.groups]
    slim_model, _ = slim(net, to_channel_masks(units, seq), x)
    assert seq.macs([int(u.sum()) for u in units]) == count_macs(slim_model, x) < seq.dense_macs


def test_shared_modules_are_counted_exported_and_reloaded():
    # CoaT shares one position-encoding module between the blocks of a stage: every call costs MACs,
    # and the export stores the shared tensors under each of their names
    result = run_check("coat_lite_mini", echo=lambda line: None, search_steps=1)
    assert all(v == "ok" for v in result.stages.values()), result.reason
    assert result.macs_slim <= 0.5 * result.macs_dense and result.onnx_diff <= 1e-4
