"""A slim export is a timm model: the checks of timm's own tests/test_models.py (forward, backward,
default_cfg, features_only, forward_intermediates, torchscript) run on exports of five families."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import pass_zoo  # noqa: F401 -- registers pass_pruned
from pass_zoo.errors import BudgetError
from pass_zoo.export.timm_model import PassPrunedFeatures, PassPrunedModel, save_slim_model
from pass_zoo.graph.masks import select_units, to_channel_masks
from pass_zoo.graph.sequence import build_layer_sequence
from pass_zoo.graph.slim import slim
from pass_zoo.prompt import PromptedModel, create_prompt

from conftest import make_model, randomise_bn

NUM_CLASSES = 10
# name -> (img_size, model_kwargs): small versions of a CNN, a ViT, Swin, an EfficientNet and a hybrid
ARCHS = {
    "resnet10t": (32, {}),
    "vit_tiny_patch16_224": (32, {"img_size": 32, "depth": 2}),
    "swin_tiny_patch4_window7_224": (56, {"img_size": 56, "depths": (1, 1, 1, 1)}),
    "tf_efficientnet_lite0": (32, {}),
    "vit_tiny_r_s16_p8_224": (64, {"img_size": 64, "depth": 2}),  # ResNet stem + ViT
}
# timm's test_models.py leaves these families out of its torchscript test (EXCLUDE_JIT_FILTERS and
# the jit-incompatible modules); none of the five is excluded there.
JIT_SKIP = {}


def export_run(name: str, folder, seed: int = 0):
    """A 50 % random-mask slim export with a non-zero prompt (as a PASS run folder holds)."""
    img, kwargs = ARCHS[name]
    model = randomise_bn(make_model(name, **kwargs))
    x = torch.zeros(1, 3, img, img)
    seq = build_layer_sequence(model, x)
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(grp.units, generator=g) for grp in seq.groups]
    try:
        units = select_units(scores, seq, 0.5, round_to=1)
    except BudgetError:  # a model whose unpruned layers (ViT's patch embedding) cost more than half
        units = select_units(scores, seq, 0.9, round_to=1)
    slim_model, history = slim(model, to_channel_masks(units, seq), x)
    prompted = PromptedModel(slim_model.eval(), create_prompt("additive", img, 2)).eval()
    with torch.no_grad():
        prompted.prompt.delta.normal_(0, 0.5, generator=g)
    save_slim_model(prompted, folder, base_arch=name, history=history, num_classes=NUM_CLASSES,
                    label_names=[str(i) for i in range(NUM_CLASSES)],
                    base_pretrained_cfg=dict(model.pretrained_cfg), img_size=img, model_kwargs=kwargs)
    return f"local-dir:{folder}"


@pytest.fixture(scope="module", params=list(ARCHS))
def run(request, tmp_path_factory):
    name = request.param
    return name, ARCHS[name][0], export_run(name, tmp_path_factory.mktemp(name) / "run")


def _load(ref, **kwargs):
    return timm.create_model(ref, pretrained=True, **kwargs).eval()


def test_forward_backward(run):
    """timm: test_model_forward / test_model_backward."""
    name, img, ref = run
    model = _load(ref).train()
    x = torch.randn(2, 3, img, img)
    out = model(x)
    assert out.shape == (2, NUM_CLASSES) and not torch.isnan(out).any()
    out.mean().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {n}"


def test_default_cfg_and_classifier(run):
    """timm: test_model_default_cfgs -- pretrained_cfg, first_conv/classifier names, reset_classifier
    with the slim num_features, forward_features/forward_head, pre_logits."""
    name, img, ref = run
    model = _load(ref)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, img, img) and len(cfg["mean"]) == 3 and len(cfg["std"]) == 3
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, img, img)
    sd = model.state_dict()
    assert any(k.startswith(cfg["first_conv"]) for k in sd)
    assert f"{cfg['classifier']}.weight" in sd
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model.forward_head(feats), model(x), atol=1e-5)
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        assert model.get_classifier().in_features == model.head_hidden_size
        # the slim width: timm's features dim (channel dim NCHW, last dim for tokens/NHWC)
        width = feats.shape[-1] if feats.ndim != 4 or getattr(model.model, "output_fmt", "NCHW") == "NHWC" \
            else feats.shape[1]
        assert model.num_features == width
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.get_classifier().out_features == 3
        model.reset_classifier(0)
        assert model(x).shape == (2, model.head_hidden_size)


def test_features_only(run):
    """timm: test_model_forward_features -- feature_info reports the slim channels and reductions."""
    name, img, ref = run
    full = _load(ref)
    feats = _load(ref, features_only=True)
    assert isinstance(feats, PassPrunedFeatures)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        outs = feats(x)
    info = feats.feature_info
    assert len(outs) == len(info.channels()) == len(info.reduction())
    for o, c, r in zip(outs, info.channels(), info.reduction()):
        assert o.shape[1] == c and o.shape[-1] == max(1, -(-img // r)), (name, o.shape, c, r)
    # the model's own feature_info (what heads are built from) carries the same slim widths
    assert [e["num_chs"] for e in full.feature_info][-len(outs):] == info.channels()[-len(outs):]
    sub = _load(ref, features_only=True, out_indices=(-2, -1) if "vit" in name else (1, 2))
    with torch.no_grad():
        assert len(sub(x)) == 2


def test_features_see_the_prompt(run):
    """The learned prompt is part of the model: features are computed on prompted input."""
    name, img, ref = run
    feats = _load(ref, features_only=True)
    x = torch.randn(1, 3, img, img)
    with torch.no_grad():
        with_prompt = feats(x)[-1]
        without = feats.features(x)[-1]
    assert not torch.allclose(with_prompt, without)


def test_forward_intermediates(run):
    """timm: test_model_forward_intermediates -- the last feature equals forward_features."""
    name, img, ref = run
    model = _load(ref)
    x = torch.randn(2, 3, img, img)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x), atol=1e-5)
        assert [t.shape[1] for t in inter] == [e["num_chs"] for e in model.feature_info]
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(only) == 2


def test_torchscript(run):
    """timm: test_model_forward_torchscript."""
    name, img, ref = run
    if name in JIT_SKIP:
        pytest.skip(JIT_SKIP[name])
    model = _load(ref)
    x = torch.randn(1, 3, img, img)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.allclose(scripted(x), model(x), atol=1e-5)


def test_grad_checkpointing_and_param_groups(run):
    """What timm's train.py needs: --grad-checkpointing, layer-wise lr decay (group_matcher), and
    no_weight_decay names that exist in the model."""
    name, img, ref = run
    model = _load(ref, num_classes=4).train()
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, img, img)
    model(x).mean().backward()
    names = {n for n, _ in model.named_parameters()}
    nwd = model.no_weight_decay()  # timm's list may name tokens a variant lacks (ViT: reg_token)
    assert all(n.startswith("model.") for n in nwd) and (not nwd or nwd & names)
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=False))
    assert "prompt.delta" in groups[0]  # the prompt acts on the input: it is the stem's group
    assert len(groups) > 2
    assert sum(len(g) for g in groups.values()) == len(names)  # every parameter is placed


class ToyFPN(nn.Module):
    """A minimal FPN built from feature_info alone, as detection/segmentation heads are."""

    def __init__(self, channels, width=8):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.out = nn.Conv2d(width, 3, 3, padding=1)

    def forward(self, feats):
        top = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            top = lat(f) + F.interpolate(top, size=f.shape[-2:], mode="nearest")
        return self.out(top)


@pytest.mark.parametrize("name", ["resnet10t", "swin_tiny_patch4_window7_224"])
def test_features_feed_a_toy_fpn(name, tmp_path):
    ref = export_run(name, tmp_path / "run")
    img = ARCHS[name][0]
    backbone = timm.create_model(ref, pretrained=True, features_only=True, out_indices=(1, 2, 3))
    fpn = ToyFPN(backbone.feature_info.channels())
    opt = torch.optim.SGD(list(backbone.parameters()) + list(fpn.parameters()), lr=0.01)
    x = torch.randn(2, 3, img, img)
    out = fpn(backbone(x))
    assert out.shape[0] == 2 and out.shape[1] == 3
    out.square().mean().backward()
    opt.step()
