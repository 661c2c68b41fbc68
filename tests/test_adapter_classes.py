"""Adapter classes: modules that store split sizes (MixNet's mixed conv, MambaOut's gated block), attention
modules that reshape by their input's width (LambdaNet), and the exactness check's tolerance on networks
whose own float64 rounding passes the fixed 1e-9."""
from __future__ import annotations

import pytest
import timm
import torch

from pass_zoo import build_layer_sequence, load_run_model, save_slim_model, slim
from pass_zoo.graph.masks import to_channel_masks
from pass_zoo.prompt import PromptedModel, create_prompt
from pass_zoo.tools import check
from pass_zoo.tools.check import EXACT_TOL, exact_tolerance, perturb, run_check


def _drop_every_third(seq):
    return [torch.arange(g.units) % 3 != 0 for g in seq.groups]


def _slim_and_compare(model, x):
    """Slim with every third unit of every group dropped; float64 gated == slim; the slim model."""
    seq = build_layer_sequence(model, x[:1])
    units = _drop_every_third(seq)
    slim_model, history = slim(model, to_channel_masks(units, seq), x[:1])
    model.double(), slim_model.double()
    with torch.no_grad(), seq.gated([u.double() for u in units]):
        gated = model(x.double())
    with torch.no_grad():
        slimmed = slim_model(x.double())
    model.float(), slim_model.float()
    assert float((gated - slimmed).abs().max()) <= 1e-9 * max(1.0, float(gated.abs().max()))
    return seq, slim_model, history


def _reload_matches(slim_model, history, name, tmp_path, x, num_classes):
    prompt = create_prompt("additive", x.shape[-1], 2)
    prompted = PromptedModel(slim_model, prompt).eval()
    save_slim_model(prompted, tmp_path / "run", base_arch=name, history=history, num_classes=num_classes,
                    label_names=[str(i) for i in range(num_classes)],
                    base_pretrained_cfg=dict(slim_model.pretrained_cfg), img_size=x.shape[-1])
    loaded = load_run_model(tmp_path / "run")
    with torch.no_grad():
        assert torch.allclose(prompted(x), loaded(x), atol=1e-5)
    return loaded


def test_mixed_conv_split_sizes_follow_slimming(tmp_path):
    """MixNet's MixedConv2d splits its input by stored sizes; the parts come out uneven, and Torch-Pruning
    lists a split's readers last part first: both must still pair every channel with its reader."""
    torch.manual_seed(0)
    model = perturb(timm.create_model("mixnet_s", num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    seq, slim_model, history = _slim_and_compare(model, x)
    mixed = {n: m for n, m in slim_model.named_modules() if type(m).__name__ == "MixedConv2d"}
    resized = [n for n, m in mixed.items() if m.splits != [c.in_channels for c in dict(model.named_modules())[n].values()]]
    assert resized, "no mixed conv was narrowed: the test prunes nothing through a stored split"
    for m in mixed.values():
        assert m.splits == [c.in_channels for c in m.values()] and sum(m.splits) == m.in_channels
    loaded = _reload_matches(slim_model, history, "mixnet_s", tmp_path, x, 4)
    reloaded = {n: m.splits for n, m in loaded.named_modules() if type(m).__name__ == "MixedConv2d"}
    assert sorted(reloaded.values()) == sorted(m.splits for m in mixed.values())


def test_gated_block_split_sizes_follow_slimming(tmp_path):
    """MambaOut's block splits fc1's output into (gate, identity, conv) parts by stored sizes, and its
    linear layers view [B, H, W, C] as [B*H*W, C], which Torch-Pruning would map as a flatten."""
    torch.manual_seed(0)
    model = perturb(timm.create_model("mambaout_femto", num_classes=4)).eval()
    x = torch.randn(2, 3, 64, 64)
    seq, slim_model, history = _slim_and_compare(model, x)
    block = slim_model.stages[0].blocks[0]
    dense_block = model.stages[0].blocks[0]
    assert "stages.0.blocks.0.conv" in [g.name for g in seq.groups]
    assert block.conv.out_channels < dense_block.conv.out_channels
    hidden, conv = block.fc2.in_features, block.conv.out_channels
    assert block.split_indices == (hidden, hidden - conv, conv) and block.fc1.out_features == 2 * hidden
    loaded = _reload_matches(slim_model, history, "mambaout_femto", tmp_path, x, 4)
    assert loaded.model.stages[0].blocks[0].split_indices == block.split_indices


def test_both_families_pass_every_check_stage():
    for name in ("mixnet_s", "mambaout_femto"):
        result = run_check(name, echo=lambda line: None, search_steps=1)
        assert result.passed, result.reason


def test_exact_tolerance_rises_only_with_the_networks_own_noise():
    out64 = torch.tensor([[100.0, -3.0]], dtype=torch.float64)
    assert exact_tolerance(out64, out64.float()) == EXACT_TOL  # float32 agrees: the fixed tolerance
    # float32 off by 0.5 of the output scale: float64 rounding alone reaches ~1e-9 of it
    noisy = exact_tolerance(out64, (out64 + torch.tensor([[50.0, 0.0]], dtype=torch.float64)).float())
    assert noisy == check.EXACT_NOISE_FACTOR * 0.5 * 2.0 ** -29
    assert EXACT_TOL < noisy < 1e-5


def test_an_ill_conditioned_network_passes_and_a_wrong_channel_is_still_caught(monkeypatch):
    """EfficientNet-V2 at random init: float32 differs from float64 by about half the output scale, so
    the slim model's float64 drift (1e-8) is rounding. Yet a slim model that lost one kept channel's
    weights is refused under the raised tolerance."""
    result = run_check("efficientnetv2_rw_t", echo=lambda line: None, search_steps=1)
    assert result.passed, result.reason
    assert result.exact_tol > EXACT_TOL and result.exact_diff <= result.exact_tol

    import pass_zoo.graph.slim as slim_module
    real_slim = slim_module.slim

    def wrong_channel(model, masks, x):
        slim_model, history = real_slim(model, masks, x)
        with torch.no_grad():
            slim_model.conv_head.weight[0].zero_()  # a kept filter lost, as a mis-mapped index would
        return slim_model, history

    monkeypatch.setattr(slim_module, "slim", wrong_channel)
    result = run_check("efficientnetv2_rw_t", echo=lambda line: None, search_steps=1)
    assert result.stages["exact"] == "fail" and result.stages["export"] == "skip"
    assert result.reason.startswith("exact: masked and slim outputs differ by") and "tolerance" in result.reason


def test_an_error_outside_every_stage_is_not_swallowed(monkeypatch):
    monkeypatch.setattr(check, "family_of", lambda name: (_ for _ in ()).throw(KeyError("boom")))
    try:
        run_check("resnet10t", img_size=32, echo=lambda line: None)
    except KeyError as exc:
        assert "boom" in str(exc)
    else:
        raise AssertionError("run_check swallowed an error raised outside its stages")


class _LambdaNet(torch.nn.Module):
    """A conv feeding LambdaNet's layer, whose output is reshaped to the width of its input."""

    def __init__(self):
        super().__init__()
        from timm.layers.lambda_layer import LambdaLayer

        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.mid = torch.nn.Conv2d(16, 16, 1)
        self.attn = LambdaLayer(16, 16, num_heads=4, dim_head=4, r=3)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, x):
        x = self.attn(torch.relu(self.mid(torch.relu(self.stem(x)))))
        return self.head(x.mean((2, 3)))


def test_the_input_of_an_attention_module_that_reshapes_by_it_stays_dense():
    net = _LambdaNet().eval()
    x = torch.randn(2, 3, 8, 8)
    seq = build_layer_sequence(net, x[:1])
    reasons = dict(seq.excluded)
    assert reasons["mid"].startswith("layer 'attn.qkv' reads the input of the attention module 'attn' (LambdaLayer)")
    assert [g.name for g in seq.groups] == ["stem"]  # what lies before it still prunes
    units = _drop_every_third(seq)
    slim_model, _ = slim(net, to_channel_masks(units, seq), x[:1])
    assert slim_model.stem.out_channels == 10 and slim_model(x).shape == (2, 3)


class _PartialConvNet(torch.nn.Module):
    """FasterNet's partial conv: a split by stored sizes, a conv on the first part, the second passed on."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.sizes = [4, 12]
        self.partial = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x1, x2 = torch.split(torch.relu(self.stem(x)), self.sizes, dim=1)
        return self.head(torch.cat((self.partial(x1), x2), 1)).mean((2, 3))


def test_a_split_part_feeding_a_concatenation_maps_each_channel_to_its_own_input():
    net = _PartialConvNet().eval()
    x = torch.randn(2, 3, 8, 8)
    seq = build_layer_sequence(net, x[:1])
    # the stem's channels pass the split whose sizes the model stores: dense, and said why
    assert dict(seq.excluded)["stem"].startswith("its channels pass a split by sizes stored in the model")
    # the partial conv's outputs reach the concatenation only, not back into the split
    (group,) = seq.groups
    assert group.name == "partial" and [s.module_name for s in group.consumers] == ["head"]
    units = _drop_every_third(seq)
    slim_model, _ = slim(net, to_channel_masks(units, seq), x[:1])
    with torch.no_grad(), seq.gated([u.float() for u in units]):
        gated = net(x)
    with torch.no_grad():
        assert slim_model.partial.out_channels == 2 and torch.allclose(gated, slim_model(x), atol=1e-6)


@pytest.mark.parametrize("norm", ["RmsNorm2d", "RmsNormAct2d", "RmsNorm2dFp32"])
def test_rms_norm_over_channels_is_gated_as_the_slim_network_computes_it(norm):
    """MobileNetV5's norms: the mean of squares spans the channels, so a zeroed channel is not a removed one."""
    import timm.layers.norm as norms
    import timm.layers.norm_act as norm_acts

    cls = getattr(norms, norm, None) or getattr(norm_acts, norm)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, padding=1), cls(12), torch.nn.Conv2d(12, 4, 1)).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 8, 8)
    seq = build_layer_sequence(net, x[:1])
    assert [g.name for g in seq.groups] == ["0"]
    units = _drop_every_third(seq)
    slim_model, _ = slim(net, to_channel_masks(units, seq), x[:1])
    with torch.no_grad(), seq.gated([u.float() for u in units]):
        gated = net(x)
    with torch.no_grad():
        slimmed = slim_model(x)
    assert slim_model[1].weight.numel() == 8 and torch.allclose(gated, slimmed, atol=1e-5)
    with torch.no_grad():  # zeroing the channels alone keeps them in the mean of squares: not the slim output
        zeroed = net[2](net[1](net[0](x) * units[0].float().view(1, -1, 1, 1)))
    assert not torch.allclose(zeroed, slimmed, atol=1e-3)


class _SharedPartNet(torch.nn.Module):
    """One part of a split read by two layers: Torch-Pruning's split has more readers than parts."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = torch.nn.Conv2d(8, 6, 1), torch.nn.Conv2d(8, 6, 1)
        self.c = torch.nn.Conv2d(8, 6, 1)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        x1, x2 = torch.relu(self.stem(x)).chunk(2, dim=1)
        y = self.a(x1) + self.b(x1) + self.c(x2)
        return self.head(torch.relu(y).mean((2, 3)))


def test_a_split_with_more_readers_than_parts_keeps_its_groups_dense():
    net = _SharedPartNet().eval()
    x = torch.randn(2, 3, 8, 8)
    seq = build_layer_sequence(net, x[:1])  # no IndexError from Torch-Pruning's size inference
    assert dict(seq.excluded)["stem"].startswith("its channels pass a split whose parts Torch-Pruning cannot pair")
    units = _drop_every_third(seq)
    slim_model, _ = slim(net, to_channel_masks(units, seq), x[:1])
    with torch.no_grad(), seq.gated([u.float() for u in units]):
        assert torch.allclose(net(x), slim_model(x), atol=1e-6)


def test_an_encoder_without_a_classifier_is_refused_in_one_line(capsys):
    from pass_zoo.backbone import create_backbone
    from pass_zoo.errors import NotAClassifierError

    with pytest.raises(NotAClassifierError, match="'gemma4_vit_167m_enc' .* is not an image classifier"):
        create_backbone("gemma4_vit_167m_enc", depth=1)
    result = run_check("gemma4_vit_167m_enc", echo=lambda line: None)
    assert result.stages["adapter"] == "fail" and "is not an image classifier" in result.reason


class _SelectiveKernelSplitNet(torch.nn.Module):
    """SKNet's selective kernel with a split input: ``split(x, in_channels // paths)``, a conv per part."""

    def __init__(self):
        super().__init__()
        from timm.layers.selective_kernel import SelectiveKernel

        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.sk = SelectiveKernel(16, 12, kernel_size=[3, 5], split_input=True)
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.sk(torch.relu(self.stem(x))).mean((2, 3)))


def test_a_split_into_equal_parts_prunes_the_same_place_in_every_part(tmp_path):
    net = perturb(_SelectiveKernelSplitNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    seq = build_layer_sequence(net, x[:1])
    stem = next(g for g in seq.groups if g.name == "stem")
    assert stem.units == 8  # channel j and 8 + j: the same input of both paths
    assert stem.unit_of_channel().tolist() == list(range(8)) * 2
    units = _drop_every_third(seq)
    slim_model, _ = slim(net, to_channel_masks(units, seq), x[:1])
    assert slim_model.sk.in_channels == 10 and [p.conv.in_channels for p in slim_model.sk.paths] == [5, 5]
    with torch.no_grad(), seq.gated([u.float() for u in units]):
        gated = net(x)
    with torch.no_grad():
        assert torch.allclose(gated, slim_model(x), atol=1e-5)


def test_an_anti_aliased_downsample_takes_the_width_of_its_input(tmp_path):
    """TResNet's blur pool stores its filter once per channel; slimmed, it follows its input's width."""
    from timm.layers.blur_pool import BlurPool2d

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 12, 3, padding=1), BlurPool2d(12, stride=2),
                              torch.nn.Conv2d(12, 4, 1)).eval()
    x = torch.randn(2, 3, 8, 8)
    seq = build_layer_sequence(net, x[:1])
    units = _drop_every_third(seq)
    slim_model, _ = slim(net, to_channel_masks(units, seq), x[:1])
    with torch.no_grad(), seq.gated([u.float() for u in units]):
        gated = net(x)
    with torch.no_grad():
        assert slim_model[1].channels is None and torch.allclose(gated, slim_model(x), atol=1e-6)
