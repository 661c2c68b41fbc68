"""The ``pass-zoo prune`` command end to end, its run folder, the timm export, and its error lines."""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import pass_zoo

from pass_zoo.cli import main
from pass_zoo.data import FASHION_MNIST_CLASSES
from pass_zoo.graph.masks import load_masks
from pass_zoo.prompt import PromptedModel, create_prompt
from pass_zoo.graph.cost_model import count_macs, count_params
from pass_zoo.graph.slim import slim

from conftest import write_image_folder

RUN_FILES = {"config.json", "masks.json", "masks.safetensors", "metrics.json", "model.safetensors",
             "model.onnx", "export.json", "hypernet.json", "hypernet.safetensors",
             ".pass-zoo-run"}
X = torch.zeros(1, 3, 32, 32)


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _lite0_args(out, *extra):
    return ["prune", "--model", "tf_efficientnet_lite0", "--pretrained", "bundled", "--dataset", "fashion-mnist",
            "--img-size", "32", "--train-subset", "128", "--val-subset", "64", "--flm-samples", "64",
            "--search-steps", "2", "--finetune-steps", "2", "--batch-size", "16", "--seed", "7",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    rc, stdout, stderr = _run(_lite0_args(out, "--diagnostic-images", "24"))
    return {"rc": rc, "out": out, "stdout": stdout, "stderr": stderr,
            "metrics": json.loads((out / "metrics.json").read_text()) if rc == 0 else None}


@pytest.fixture(scope="module")
def lite0_loaded(lite0_run):
    assert lite0_run["rc"] == 0, lite0_run["stderr"][-2000:]
    return timm.create_model(f"local-dir:{lite0_run['out']}", pretrained=True).eval()


def _rebuild_from_masks(run: Path, base_arch: str, num_classes: int, img_size: int, prompt_kind: str,
                        prompt_width: int):
    """The slim model rebuilt independently of the export code: base model + masks + weights."""
    base = timm.create_model(base_arch, pretrained=False, num_classes=num_classes).eval()
    slim_model, _ = slim(base, load_masks(run / "masks.safetensors"), torch.zeros(1, 3, img_size, img_size))
    model = PromptedModel(slim_model, create_prompt(prompt_kind, img_size, prompt_width))
    model.load_state_dict(load_file(str(run / "model.safetensors")), strict=True)
    return model.eval()


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pass-zoo: error: ")
    return lines[0]


# ------------------------------------------------------------------------------ the Lite0 run
def test_lite0_run_succeeds_and_writes_the_run_folder(lite0_run):
    assert lite0_run["rc"] == 0, lite0_run["stderr"][-2000:]
    assert "Traceback" not in lite0_run["stderr"]
    assert {p.name for p in lite0_run["out"].iterdir()} == RUN_FILES  # no temporary files left behind
    assert f"run folder      {lite0_run['out']}" in lite0_run["stdout"]


def test_lite0_metrics(lite0_run):
    m = lite0_run["metrics"]
    dense = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
    assert m["macs_dense"] == count_macs(dense, X)
    assert m["params_dense"] == count_params(dense)
    assert 0 < m["macs_slim"] <= 0.5 * m["macs_dense"]
    assert m["macs_ratio"] == pytest.approx(m["macs_slim"] / m["macs_dense"])
    assert 0 < m["params_slim"] < m["params_dense"]
    # the final top-1 counts over the 64 val images, the two progress figures over 24 of them
    for key, n in (("top1", 64), ("top1_dense_zero_shot", 24), ("top1_after_search", 24)):
        assert 0.0 <= m[key] <= 1.0
        assert (m[key] * n) == pytest.approx(round(m[key] * n))
    assert m["val_images"] == 64 and m["train_images"] == 128 and m["diagnostic_images"] == 24
    assert "before fine-tuning, 24 val images)" in lite0_run["stdout"]
    assert m["seed"] == 7 and m["world_size"] == 1 and m["img_size"] == 32
    env = m["environment"]  # what a rerun elsewhere must match to repeat bit for bit
    assert env["torch"] == torch.__version__ and env["timm"] == timm.__version__ and env["torch_threads"] >= 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"].endswith(f"x{os.cpu_count()}")
    assert m["head"] == "flm"  # 1000-class bundled backbone -> frequency label mapping
    assert len(m["label_mapping"]) == 10 and len(set(m["label_mapping"])) == 10
    assert all(0 <= s < 1000 for s in m["label_mapping"])
    assert m["command"].startswith("pass-zoo prune --model tf_efficientnet_lite0 --pretrained bundled")
    assert "--search-steps 2" in m["command"] and f"--out {lite0_run['out']}" in m["command"]
    assert m["class_names"] == FASHION_MNIST_CLASSES
    assert m["config"]["target_macs"] == 0.5 and m["config"]["search"]["steps"] == 2


def test_lite0_masks_files(lite0_run):
    out, m = lite0_run["out"], lite0_run["metrics"]
    summary = json.loads((out / "masks.json").read_text())
    masks = load_masks(out / "masks.safetensors")
    assert [g["name"] for g in summary["groups"]] == list(masks)
    for g in summary["groups"]:
        assert g["total"] == masks[g["name"]].numel()
        assert 0 < g["kept"] == int(masks[g["name"]].sum()) <= g["total"]
        assert g["kept"] % 8 == 0 or g["kept"] == g["total"]  # default --round-to 8
    assert summary["macs_slim"] == m["macs_slim"] and summary["macs_dense"] == m["macs_dense"]


def test_lite0_export_reloads_through_timm(lite0_run, lite0_loaded):
    out, m = lite0_run["out"], lite0_run["metrics"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "pass_pruned" and config["num_classes"] == 10
    assert config["label_names"] == FASHION_MNIST_CLASSES
    spec = config["model_args"]["spec"]
    assert spec["prompt"] == {"kind": "additive", "width": round(32 * 16 / 224)}

    loaded = lite0_loaded
    assert isinstance(loaded, pass_zoo.PassPrunedModel)
    rebuilt = _rebuild_from_masks(out, "tf_efficientnet_lite0", 10, 32, "additive", spec["prompt"]["width"])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = loaded(x), rebuilt(x)
    assert a.shape == (4, 10)
    assert (a - b).abs().max() <= 1e-5
    assert loaded.prompt.delta.abs().sum() > 0  # the learned prompt travels with the model
    assert count_macs(loaded, X) == m["macs_slim"]
    assert count_params(loaded.model) == m["params_slim"]
    dc = timm.data.resolve_data_config(model=loaded)
    base_cfg = timm.create_model("tf_efficientnet_lite0").pretrained_cfg
    assert tuple(dc["input_size"]) == (3, 32, 32)
    assert tuple(dc["mean"]) == tuple(base_cfg["mean"]) and tuple(dc["std"]) == tuple(base_cfg["std"])


def test_lite0_export_reproduces_the_reported_accuracy(lite0_run, lite0_loaded):
    from pass_zoo.data import load_task_data, make_loader, subset
    from pass_zoo.train.finetune import evaluate
    from pass_zoo.pipeline import data_spec_for

    m = lite0_run["metrics"]
    loaded = lite0_loaded
    spec = data_spec_for(timm.create_model("tf_efficientnet_lite0"), 32)
    val = subset(load_task_data("fashion-mnist", spec).val, 64, m["seed"] + 1)
    assert evaluate(loaded, make_loader(val, 32, False, 0)) == m["top1"]


def test_existing_run_folder_is_refused(lite0_run):
    before = (lite0_run["out"] / "metrics.json").read_bytes()
    rc, _, stderr = _run(_lite0_args(lite0_run["out"]))
    assert rc != 0
    line = _one_error_line(stderr)
    assert f"--out {lite0_run['out']} already exists and is not empty" in line and "--overwrite" in line
    assert (lite0_run["out"] / "metrics.json").read_bytes() == before


# ------------------------------------------------------------------------------ error lines
def _tiny_args(tmp_path, *extra, model="resnet10t", dataset="fashion-mnist"):
    return ["prune", "--model", model, "--pretrained", "none", "--dataset", dataset, "--img-size", "32",
            "--train-subset", "16", "--val-subset", "8", "--search-steps", "1", "--finetune-steps", "1",
            "--batch-size", "8", "--out", str(tmp_path / "run"), *extra]


@pytest.mark.parametrize("name,prefix", [("resnet5", "resnet5"), ("tf_efficientnet_lite", "tf_efficientnet_lite")])
def test_unknown_model_suggests_close_names(name, prefix, tmp_path):
    rc, _, stderr = _run(_tiny_args(tmp_path, model=name))
    assert rc != 0
    line = _one_error_line(stderr)
    assert f"unknown timm model '{name}'; did you mean " in line
    suggestions = line.split("did you mean ")[1].rstrip("?").split(", ")
    assert suggestions and all(timm.is_model(s) and s.startswith(prefix) for s in suggestions)


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_target_macs_out_of_range(value, tmp_path):
    rc, _, stderr = _run(_tiny_args(tmp_path, "--target-macs", value))
    assert rc != 0
    line = _one_error_line(stderr)
    assert f"--target-macs must be in (0, 1], got {float(value)}" in line


@pytest.mark.parametrize("dataset,expected", [
    ("imagefolder:/nonexistent", "imagefolder:/nonexistent needs class folders under /nonexistent/train"),
    ("fashion-mnist:/nonexistent", "Fashion-MNIST not found in /nonexistent"),
])
def test_missing_dataset_path(dataset, expected, tmp_path):
    rc, _, stderr = _run(_tiny_args(tmp_path, dataset=dataset))
    assert rc != 0
    line = _one_error_line(stderr)
    assert expected in line
    if dataset.startswith("fashion-mnist"):
        assert "apt-get install dataset-fashion-mnist" in line


def test_bad_round_to_and_unreachable_budget(tmp_path):
    rc, _, stderr = _run(_tiny_args(tmp_path, "--round-to", "0"))
    assert rc != 0 and "--round-to must be >= 1, got 0" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--budget-warmup", "1.5"))
    assert rc != 0 and "--budget-warmup must be in [0, 1], got 1.5" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--max-mask-churn", "0"))
    assert rc != 0 and "--max-mask-churn must be in (0, 1], got 0.0" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--max-group-change", "-0.5"))
    assert rc != 0 and "--max-group-change must be from 0 to 10, got -0.5" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--search-recoveries", "11"))
    assert rc != 0 and "--search-recoveries must be a whole number from 0 to 10, got 11" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--target-macs", "0.0001", "--head", "new", "--overwrite"))
    assert rc != 0 and "cannot be met" in _one_error_line(stderr)


def test_out_that_is_a_file_and_bad_batch_size(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    rc, _, stderr = _run(_tiny_args(tmp_path))
    assert rc != 0 and f"--out {tmp_path / 'run'} exists and is not a folder" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path / "sub", "--batch-size", "0"))
    assert rc != 0 and "batch size must be positive" in _one_error_line(stderr)


def test_prompt_that_does_not_fit_the_image(tmp_path):
    """A user typo (--prompt-size wider than half the image) must be a one-line error, not a traceback."""
    rc, _, stderr = _run(_tiny_args(tmp_path, "--head", "new", "--prompt-size", "20"))
    assert rc != 0
    line = _one_error_line(stderr)
    assert "20" in line and "32 px" in line


# ------------------------------------------------------------------------------ image folder, new head
def test_imagefolder_run_with_a_new_head(tmp_path):
    data = write_image_folder(tmp_path / "imgs", ["ant", "bee", "cat"], n_train=6, n_val=3)
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    args = ["prune", "--model", "resnet10t", "--pretrained", "none", "--head", "new", "--prompt", "pad",
            "--dataset", f"imagefolder:{data}", "--img-size", "32", "--target-macs", "0.4", "--round-to", "4",
            "--search-steps", "2", "--finetune-steps", "2", "--batch-size", "6", "--out", str(out)]

    rc, _, stderr = _run(args)  # a non-empty folder is refused ...
    assert rc != 0 and "already exists and is not empty" in _one_error_line(stderr)
    assert (out / "old.txt").exists()

    rc, _, stderr = _run(args + ["--overwrite"])  # ... and --overwrite replaces only run folders
    assert rc != 0 and "is not a pass-zoo run folder" in _one_error_line(stderr)
    (out / ".pass-zoo-run").write_text("{}")  # the marker every run folder gets
    rc, stdout, stderr = _run(args + ["--overwrite"])
    assert rc == 0, stderr[-2000:]
    assert {p.name for p in out.iterdir()} == RUN_FILES
    m = json.loads((out / "metrics.json").read_text())
    assert m["head"] == "new" and "top1_dense_zero_shot" not in m and "label_mapping" not in m
    assert m["class_names"] == ["ant", "bee", "cat"]
    assert m["train_images"] == 18 and m["val_images"] == 9
    assert m["macs_slim"] <= 0.4 * m["macs_dense"]
    assert m["macs_dense"] == count_macs(timm.create_model("resnet10t", num_classes=3).eval(), X)

    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 3 and config["label_names"] == ["ant", "bee", "cat"]
    spec = config["model_args"]["spec"]
    assert spec["prompt"]["kind"] == "pad"
    loaded = pass_zoo.load_run_model(out)
    rebuilt = _rebuild_from_masks(out, "resnet10t", 3, 32, "pad", spec["prompt"]["width"])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (loaded(x) - rebuilt(x)).abs().max() <= 1e-5
    assert loaded(x).shape == (2, 3)
    assert count_macs(loaded, X) == m["macs_slim"]
