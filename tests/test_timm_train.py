"""Fine-tuning a slim export the way timm's train.py does, and the pass-zoo-train wrapper that runs
timm's own train.py with pass_zoo imported."""
from __future__ import annotations

import json
import os
import textwrap

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

from pass_zoo.tools.timm_train import main as train_main

from conftest import write_image_folder
from test_timm_interface import export_run


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    return export_run("resnet10t", tmp_path_factory.mktemp("resnet10t") / "run")


def test_finetune_new_classes_with_layer_decay(resnet_run):
    """train.py's path: create_model(pretrained, num_classes=K) -> reset_classifier -> an optimizer with
    layer-wise lr decay (group_matcher) and weight decay (no_weight_decay) -> a few steps that learn."""
    model = timm.create_model(resnet_run, pretrained=True, num_classes=3).train()
    assert model.get_classifier().out_features == 3 and model.get_classifier().in_features == model.num_features
    model.reset_classifier(4)
    opt = create_optimizer_v2(model, "sgd", lr=0.05, weight_decay=1e-4, layer_decay=0.75)
    scales = sorted({g.get("lr_scale", 1.0) for g in opt.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0  # one rate per layer group, the head at full rate
    prompt_group = next(g for g in opt.param_groups if any(p is model.prompt.delta for p in g["params"]))
    assert prompt_group["lr_scale"] == scales[0]  # the prompt is in the stem: the smallest rate
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.arange(8) % 4
    losses = []
    for _ in range(8):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


STAND_IN = textwrap.dedent('''
    """The calls timm's train.py makes on a model, in its order (create_model, grad checkpointing,
    resolve_data_config, create_optimizer_v2 with layer decay, train steps)."""
    import argparse, json
    import timm, torch
    import torch.nn.functional as F
    from timm.optim import create_optimizer_v2

    p = argparse.ArgumentParser()
    p.add_argument("--model"); p.add_argument("--pretrained", action="store_true")
    p.add_argument("--num-classes", type=int); p.add_argument("--layer-decay", type=float)
    p.add_argument("--grad-checkpointing", action="store_true"); p.add_argument("--output")
    a = p.parse_args()
    model = timm.create_model(a.model, pretrained=a.pretrained, num_classes=a.num_classes)
    if a.grad_checkpointing:
        model.set_grad_checkpointing(enable=True)
    cfg = timm.data.resolve_data_config(vars(a), model=model)
    opt = create_optimizer_v2(model, "sgd", lr=0.05, weight_decay=1e-4, layer_decay=a.layer_decay)
    x = torch.randn(4, *cfg["input_size"]); y = torch.arange(4) % a.num_classes
    model.train()
    for _ in range(2):
        loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
    json.dump({"input_size": list(cfg["input_size"]), "loss": loss.item(),
               "classes": model.num_classes}, open(a.output, "w"))
''')


def test_wrapper_hands_over_to_train_py(resnet_run, tmp_path, monkeypatch):
    """pass-zoo-train TRAIN_PY ARGS runs the script as __main__ with pass_pruned registered."""
    script = tmp_path / "train.py"
    script.write_text(STAND_IN)
    out = tmp_path / "result.json"
    args = ["--model", resnet_run, "--pretrained", "--num-classes", "3", "--layer-decay", "0.75",
            "--grad-checkpointing", "--output", str(out)]
    assert train_main([str(script)] + args) == 0
    result = json.loads(out.read_text())
    assert result["input_size"] == [3, 32, 32] and result["classes"] == 3
    out.unlink()
    monkeypatch.setenv("PASS_ZOO_TIMM_TRAIN", str(script))  # the script named once, in the environment
    assert train_main(args) == 0 and out.is_file()


def test_wrapper_refuses_a_missing_script(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PASS_ZOO_TIMM_TRAIN", raising=False)
    assert train_main([str(tmp_path / "train.py"), "--model", "x"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train_main(["--model", "x"]) == 2
    assert "usage: pass-zoo-train" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("PASS_ZOO_TIMM_TRAIN"),
                    reason="timm's train.py is not in timm's pip package: set PASS_ZOO_TIMM_TRAIN to a "
                           "pytorch-image-models checkout's train.py to run it")
def test_timm_train_py_fine_tunes_an_export(resnet_run, tmp_path):
    """timm's own train.py, one epoch on a tiny image folder, through the wrapper."""
    data = write_image_folder(tmp_path / "data", ["a", "b", "c"], n_train=4, n_val=2, size=32)
    args = ["--data-dir", str(data), "--model", resnet_run, "--pretrained", "--num-classes", "3",
            "--epochs", "1", "-b", "4", "--input-size", "3", "32", "32", "--workers", "0",
            "--layer-decay", "0.75", "--grad-checkpointing", "--opt", "sgd", "--lr", "0.01",
            "--warmup-epochs", "0", "--output", str(tmp_path / "out"), "--log-interval", "1"]
    assert train_main(args) == 0
    assert list((tmp_path / "out").rglob("summary.csv"))
