"""Backbones: bundled Lite0 weights, state-dict files (by name / by order), safe loading, offline hints."""
from __future__ import annotations

import os

import pytest
import torch

from pass_zoo.backbone import (BUNDLED_ARCH, bundled_weights_path, create_backbone, load_state_dict_file,
                               load_weights_into)
from pass_zoo.errors import BackboneError

from conftest import make_model


def _same_state(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_bundled_weights_load_by_order_into_lite0():
    path = bundled_weights_path()
    assert path.is_file()
    sd = load_state_dict_file(path)
    model = create_backbone(BUNDLED_ARCH, "bundled")
    target = model.state_dict()
    assert set(sd) != set(target)  # the package uses its own key names ...
    assert len(sd) == len(target)
    for (_, v), (k, t) in zip(sd.items(), target.items()):  # ... so tensors go in by order
        assert torch.equal(v, t), k
    assert model.num_classes == 1000
    random = make_model(BUNDLED_ARCH, num_classes=1000)
    assert not torch.equal(model.conv_stem.weight, random.conv_stem.weight)
    assert not torch.equal(model.bn1.running_var, random.bn1.running_var)  # real BN statistics
    assert load_weights_into(make_model(BUNDLED_ARCH, num_classes=1000), sd, "bundled") == "by order"


def test_bundled_weights_with_a_new_head():
    model = create_backbone(BUNDLED_ARCH, "bundled", num_classes=7)
    assert model.get_classifier().out_features == 7
    ref = load_state_dict_file(bundled_weights_path())
    first = next(iter(ref.values()))
    assert torch.equal(model.conv_stem.weight, first)


def test_bundled_refuses_other_architectures():
    with pytest.raises(BackboneError, match="holds weights for tf_efficientnet_lite0 and tf_efficientnet_lite2, not resnet10t"):
        create_backbone("resnet10t", "bundled")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_state_dict_files_with_timm_names_load_by_name(suffix, tmp_path):
    src = make_model("resnet10t", num_classes=1000, seed=1)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    else:
        torch.save(src.state_dict(), path)
    model = create_backbone("resnet10t", str(path))
    assert _same_state(model.state_dict(), src.state_dict())
    assert load_weights_into(make_model("resnet10t", num_classes=1000), load_state_dict_file(path), "f") == "by name"
    # a different head size: weights first, then a fresh classifier
    small = create_backbone("resnet10t", str(path), num_classes=4)
    assert small.get_classifier().out_features == 4
    assert torch.equal(small.conv1[0].weight, src.conv1[0].weight)


def test_wrapped_state_dict_is_unwrapped(tmp_path):
    src = make_model("resnet10t", num_classes=1000, seed=2)
    torch.save({"state_dict": src.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    model = create_backbone("resnet10t", str(tmp_path / "ckpt.pth"))
    assert _same_state(model.state_dict(), src.state_dict())


def test_renamed_keys_with_matching_shapes_load_by_order(tmp_path):
    src = make_model("resnet10t", num_classes=1000, seed=3)
    renamed = {f"backbone.param_{i:03d}": v for i, v in enumerate(src.state_dict().values())}
    torch.save(renamed, tmp_path / "renamed.pth")
    model = create_backbone("resnet10t", str(tmp_path / "renamed.pth"))
    assert _same_state(model.state_dict(), src.state_dict())


def test_renamed_keys_in_the_wrong_order_are_refused(tmp_path):
    items = list(make_model("resnet10t", num_classes=1000).state_dict().items())
    shuffled = {f"p{i}": v for i, (_, v) in enumerate(reversed(items))}
    torch.save(shuffled, tmp_path / "shuffled.pth")
    with pytest.raises(BackboneError, match="names differ and shapes disagree in order"):
        create_backbone("resnet10t", str(tmp_path / "shuffled.pth"))


def test_wrong_shapes_are_refused(tmp_path):
    src = make_model("resnet10t", num_classes=10)  # same names, a 10-class head
    torch.save(src.state_dict(), tmp_path / "ten.pth")
    n_feat = src.get_classifier().in_features
    with pytest.raises(BackboneError, match=rf"shape of 'fc\.weight' is \(10, {n_feat}\), "
                                            rf"the model expects \(1000, {n_feat}\)"):
        create_backbone("resnet10t", str(tmp_path / "ten.pth"))


def test_wrong_tensor_count_is_refused(tmp_path):
    torch.save(make_model("resnet18", num_classes=1000).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BackboneError, match="names and counts both differ"):
        create_backbone("resnet10t", str(tmp_path / "r18.pth"))


class _Payload:
    """Unpickling this would create a directory: weights_only loading must never run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_objects_are_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    sd = dict(make_model("resnet10t", num_classes=1000).state_dict())
    sd["extra"] = _Payload(str(marker))
    torch.save(sd, tmp_path / "evil.pth")
    with pytest.raises(BackboneError, match=r"cannot read weights .*evil\.pth"):
        create_backbone("resnet10t", str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_non_tensor_values_are_refused(tmp_path):
    torch.save({"conv.weight": [1, 2, 3], "note": "hello"}, tmp_path / "odd.pth")
    with pytest.raises(BackboneError, match="does not hold a state dict of tensors"):
        load_state_dict_file(tmp_path / "odd.pth")


def test_missing_and_unknown_weight_sources(tmp_path):
    with pytest.raises(BackboneError, match="does not exist"):
        create_backbone("resnet10t", str(tmp_path / "nope.pth"))
    with pytest.raises(BackboneError, match=r"unknown --pretrained 'imagenet'; use none \| timm"):
        create_backbone("resnet10t", "imagenet")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(BackboneError, match=r"cannot read weights .*broken\.safetensors"):
        create_backbone("resnet10t", str(tmp_path / "broken.safetensors"))


def test_unknown_model_suggests_close_names():
    import timm

    with pytest.raises(BackboneError) as exc:
        create_backbone("resnet5")
    msg = str(exc.value)
    assert msg.startswith("unknown timm model 'resnet5'; did you mean ")
    suggestions = msg.split("did you mean ")[1].rstrip("?").split(", ")
    assert suggestions and all(timm.is_model(s) and s.startswith("resnet5") for s in suggestions)
    with pytest.raises(BackboneError, match=r"see timm\.list_models\(\)"):
        create_backbone("qqqqzzzz")


def test_timm_weights_offline_point_to_the_alternatives(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)  # read at import time by huggingface_hub
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(BackboneError) as exc:
        create_backbone("resnet10t", "timm")
    msg = str(exc.value)
    assert msg.startswith("could not load pretrained weights for 'resnet10t'")
    assert "offline alternatives" in msg
    assert "--pretrained bundled" in msg and "--pretrained PATH.safetensors" in msg and "--pretrained none" in msg
    assert "\n" not in msg


def test_model_kwargs_are_honoured_for_every_weight_source(tmp_path):
    """``create_backbone`` documents itself as timm.create_model plus weight sources: the model
    arguments (here drop_rate) must reach the model whichever source the weights come from."""
    torch.save(make_model("resnet10t", num_classes=1000).state_dict(), tmp_path / "w.pth")
    plain = create_backbone("resnet10t", "none", drop_rate=0.25)
    from_file = create_backbone("resnet10t", str(tmp_path / "w.pth"), drop_rate=0.25)
    assert plain.drop_rate == 0.25
    assert from_file.drop_rate == 0.25


def test_fast_layout_keeps_the_function_and_the_saved_bytes():
    from safetensors.torch import load

    from pass_zoo.backbone import fast_layout
    from pass_zoo.fileio import safetensors_bytes

    torch.manual_seed(0)
    model = make_model("resnet10t", num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    plain = safetensors_bytes(model.state_dict(), {"format": "pt"})
    assert fast_layout(model) is model
    assert model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.conv1[0].weight.is_contiguous()
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5)
    # the file does not depend on the layout the tensors had in memory
    written = safetensors_bytes(model.state_dict(), {"format": "pt"})
    assert written == plain
    assert all(t.is_contiguous() for t in load(written).values())
    linear = torch.nn.Sequential(torch.nn.Linear(4, 3))  # nothing convolutional: left as it is
    assert fast_layout(linear)[0].weight.is_contiguous()
