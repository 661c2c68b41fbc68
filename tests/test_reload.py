"""The ``pass_pruned`` timm architecture: save a prompted slim model, reload it strictly through timm."""
from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from pass_zoo.errors import PassZooError
from pass_zoo.export.timm_model import PassPrunedModel, SpecMismatchError, load_run_model, save_slim_model
from pass_zoo.graph.masks import select_units, to_channel_masks
from pass_zoo.prompt import PromptedModel, create_prompt
from pass_zoo.graph.cost_model import count_params
from pass_zoo.graph.slim import slim

from conftest import NUM_CLASSES

LABELS = [f"class{i}" for i in range(NUM_CLASSES)]


def _export(model_seq, name, folder, prompt="additive", width=3, seed=0):
    model, seq = model_seq(name)
    g = torch.Generator().manual_seed(seed)
    units = select_units([torch.rand(grp.units, generator=g) for grp in seq.groups], seq, 0.5, round_to=1)
    slim_model, history = slim(model, to_channel_masks(units, seq), torch.zeros(1, 3, 32, 32))
    prompted = PromptedModel(slim_model, create_prompt(prompt, 32, width)).eval()
    with torch.no_grad():
        prompted.prompt.delta.normal_(0, 0.5, generator=g)
    save_slim_model(prompted, folder, base_arch=name, history=history, num_classes=NUM_CLASSES, label_names=LABELS,
                    base_pretrained_cfg=dict(model.pretrained_cfg), img_size=32)
    return prompted


@pytest.mark.parametrize("name,prompt", [("resnet10t", "additive"), ("mobilenetv3_small_050", "pad"),
                                         ("regnety_002", "additive")])
def test_export_round_trip_through_timm(name, prompt, model_seq, tmp_path):
    prompted = _export(model_seq, name, tmp_path / "run", prompt=prompt)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "model.safetensors"]
    loaded = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True).eval()
    assert isinstance(loaded, PassPrunedModel)
    assert loaded.prompt.kind == prompt and loaded.num_classes == NUM_CLASSES
    assert count_params(loaded) == count_params(prompted)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (loaded(x) - prompted(x)).abs().max() <= 1e-5
        # timm's feature/head split is forwarded to the slim network behind the prompt
        feats = loaded.forward_features(x)
        assert (loaded.forward_head(feats) - prompted(x)).abs().max() <= 1e-5
    assert loaded.get_classifier().out_features == NUM_CLASSES


def test_exported_config(model_seq, tmp_path):
    _export(model_seq, "resnet10t", tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["architecture"] == "pass_pruned"
    assert config["num_classes"] == NUM_CLASSES and config["label_names"] == LABELS
    assert config["model_args"]["base_arch"] == "resnet10t"
    spec = config["model_args"]["spec"]
    assert spec["format"] == "pass-zoo-slim/1" and spec["img_size"] == 32
    assert spec["prompt"] == {"kind": "additive", "width": 3}
    assert spec["pruning_history"] and all(len(step) == 3 for step in spec["pruning_history"])
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["first_conv"] == "prompt" and cfg["classifier"] == "model.fc"
    assert not {"url", "hf_hub_id", "file", "state_dict"} & set(cfg)  # the base model's weight locations
    base = timm.create_model("resnet10t").pretrained_cfg
    assert cfg["mean"] == list(base["mean"]) and cfg["std"] == list(base["std"])


@pytest.fixture
def exported(model_seq, tmp_path):
    _export(model_seq, "resnet10t", tmp_path / "good")
    counter = iter(range(100))

    def variant(edit_config=None, edit_weights=None):
        folder = tmp_path / f"v{next(counter)}"
        shutil.copytree(tmp_path / "good", folder)
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        if edit_weights:
            sd = load_file(str(folder / "model.safetensors"))
            edit_weights(sd)
            save_file(sd, str(folder / "model.safetensors"))
        return folder

    return variant


def test_weights_that_do_not_fit_the_spec(exported):
    def shrink(sd):
        sd["model.fc.weight"] = torch.zeros(NUM_CLASSES, 3)

    with pytest.raises(SpecMismatchError, match=r"'model\.fc\.weight' is \(10, 3\) in the file"):
        load_run_model(exported(edit_weights=shrink))
    with pytest.raises(SpecMismatchError, match=r"unexpected \['model\.extra'\]"):
        load_run_model(exported(edit_weights=lambda sd: sd.__setitem__("model.extra", torch.zeros(1))))
    with pytest.raises(SpecMismatchError, match=r"missing \['prompt\.delta'\]"):
        load_run_model(exported(edit_weights=lambda sd: sd.pop("prompt.delta")))


def test_specs_that_do_not_fit_the_base(exported):
    def fmt(c):
        c["model_args"]["spec"]["format"] = "pass-zoo-slim/9"

    with pytest.raises(SpecMismatchError, match="format 'pass-zoo-slim/9' is not supported"):
        load_run_model(exported(edit_config=fmt))

    def arch(c):
        c["model_args"]["base_arch"] = "resnet_nope"

    with pytest.raises(SpecMismatchError, match="unknown base architecture 'resnet_nope'"):
        load_run_model(exported(edit_config=arch))

    def layer(c):
        c["model_args"]["spec"]["pruning_history"][0][0] = "layer9.conv"

    with pytest.raises(SpecMismatchError, match="names a layer the base architecture does not have"):
        load_run_model(exported(edit_config=layer))


def test_missing_export_files(exported, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PassZooError, match="is not an exported run \\(no config.json\\)"):
        load_run_model(tmp_path / "empty")
    folder = exported()
    (folder / "model.safetensors").unlink()
    with pytest.raises(PassZooError, match=f"cannot load {folder}"):
        load_run_model(folder)


def test_pass_pruned_needs_an_export():
    with pytest.raises(PassZooError, match="pass_pruned is built from a pass-zoo export"):
        timm.create_model("pass_pruned")
