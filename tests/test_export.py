"""Export and reload: timm (local-dir:, offline hf-hub:), verified ONNX, clear errors, eval.

Tiny models at 32 px with random weights and a random prompt: what is tested is that every way of
loading the files gives the in-memory model's function, not accuracy.
"""
import json
import os
import shutil

import numpy as np
import onnx
import pytest
import timm
import torch
from timm.data import resolve_data_config

import pass_zoo
import pass_zoo.export.onnx as onnx_export
from pass_zoo.integrity import sha256_file
from pass_zoo import PassZooError, build_layer_sequence, load_run_model, save_slim_model, select_units, slim
from pass_zoo.cli import main
from pass_zoo.data import FASHION_MNIST_CLASSES, make_loader
from pass_zoo.data import data_spec_for, val_split
from pass_zoo.export.evaluation import evaluate_target
from pass_zoo.export.timm_model import SpecMismatchError
from pass_zoo.graph.masks import to_channel_masks
from pass_zoo.prompt import PromptedModel, create_prompt

from conftest import offline_hf_cache

S = 32
ARCHS = ["resnet10t", "tf_efficientnet_lite0", "mobilenetv3_small_050", "regnetx_002"]
CLASSES = list(FASHION_MNIST_CLASSES)  # so that eval on Fashion-MNIST accepts the exports


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP's 2-thread barriers make
    each 32 px forward ~100x slower (measured: 14 ms vs 2.4 s for mobilenetv3_small_050)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _export_slim(arch: str, out) -> PromptedModel:
    """A 50 %-MACs slim model from random scores, with a random additive prompt, saved to ``out``."""
    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    x = torch.zeros(1, 3, S, S)
    seq = build_layer_sequence(base, x)
    g = torch.Generator().manual_seed(1)
    units = select_units([torch.rand(grp.units, generator=g) for grp in seq.groups], seq, 0.5, 8)
    slim_model, history = slim(base, to_channel_masks(units, seq), x)
    prompt = create_prompt("additive", S, 2)
    with torch.no_grad():
        prompt.delta.normal_()
    prompted = PromptedModel(slim_model, prompt).eval()
    save_slim_model(prompted, out, base_arch=arch, history=history, num_classes=10, label_names=CLASSES,
                    base_pretrained_cfg=dict(base.pretrained_cfg), img_size=S)
    return prompted


@pytest.fixture(scope="module", params=ARCHS)
def exported(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    return request.param, out, _export_slim(request.param, out)


def _max_diff(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def _hf_cache(tmp_path, monkeypatch, run_dir, repo="passzoo/slim-test"):
    """Place a run folder into a Hugging Face cache layout and go offline onto it."""
    return offline_hf_cache(tmp_path, monkeypatch, {f: run_dir / f for f in ("config.json", "model.safetensors")},
                            repo)


def test_reload_local_dir_and_offline_hub_match_in_memory(exported, tmp_path, monkeypatch):
    arch, run_dir, prompted = exported
    x = torch.randn(4, 3, S, S, generator=torch.Generator().manual_seed(2))
    local = timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()
    assert isinstance(local, pass_zoo.PassPrunedModel)
    assert _max_diff(local, prompted, x) <= 1e-6

    name = _hf_cache(tmp_path, monkeypatch, run_dir)
    hub = timm.create_model(name, pretrained=True).eval()
    assert hub.base_arch == arch and hub.pretrained_cfg["label_names"] == CLASSES
    assert _max_diff(hub, prompted, x) <= 1e-6  # random prompt and weights: only the cached files give this

    # eval resolves hf-hub: names too, and counts what the in-memory model predicts
    r = evaluate_target(name, dataset="fashion-mnist", val_subset=16, seed=5, batch_size=8)
    ds, _ = val_split("fashion-mnist", data_spec_for(hub), 16, 5)
    with torch.no_grad():
        correct = sum(int((prompted(xb).argmax(1) == yb).sum()) for xb, yb in make_loader(ds, 8, False, 5))
    assert r["images"] == 16 and r["correct"] == correct and r["backend"] == "torch"


def test_reloaded_model_keeps_base_preprocessing(exported):
    arch, run_dir, _ = exported
    reloaded = load_run_model(run_dir)
    base = timm.create_model(arch, pretrained=False)
    assert resolve_data_config({}, model=reloaded) == resolve_data_config({"input_size": (3, S, S)}, model=base)


def test_onnx_export_matches_torch_with_metadata(exported):
    arch, run_dir, prompted = exported
    report = onnx_export.export_onnx(run_dir, dataset="fashion-mnist")
    path = run_dir / "model.onnx"
    assert report["passed"] and report["opset"] >= 17
    assert report["max_abs_diff_random"] <= 1e-4 and report["max_abs_diff_real"] <= 1e-4
    assert "fashion-mnist" in report["real_inputs"]
    assert json.loads((run_dir / "export.json").read_text()) == report
    assert report["sha256"] == sha256_file(path)

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}  # every value is a JSON string
    reloaded = load_run_model(run_dir)
    cfg = resolve_data_config({}, model=reloaded)
    assert meta["class_names"] == CLASSES and meta["input_size"] == [3, S, S]
    assert meta["mean"] == pytest.approx(list(cfg["mean"])) and meta["std"] == pytest.approx(list(cfg["std"]))
    assert meta["interpolation"] == cfg["interpolation"] and meta["crop_pct"] == pytest.approx(cfg["crop_pct"])

    # the batch axis is dynamic, and the file alone reproduces the in-memory prompted model
    session = onnx_export.ort_session(path)
    real, _ = val_split("fashion-mnist", data_spec_for(reloaded), 7, 3)
    for x in (torch.randn(1, 3, S, S), torch.stack([real[i][0] for i in range(7)])):
        out = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(out - prompted(x).numpy()).max() <= 1e-4


def _copy_run(run_dir, tmp_path):
    bad = tmp_path / "run"
    bad.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(run_dir / f, bad / f)
    return bad


def _cli_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pass-zoo: error:") and "\n" not in err, err
    return err


def test_truncated_weights_give_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "src"
    _export_slim("resnet10t", run_dir)
    bad = _copy_run(run_dir, tmp_path)
    weights = bad / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(PassZooError, match="model.safetensors is truncated or corrupt"):
        load_run_model(bad)
    assert "model.safetensors" in _cli_error(capsys, ["eval", str(bad), "--dataset", "fashion-mnist"])

    weights.unlink()  # timm alone would fall back to any other *.safetensors in the folder
    with pytest.raises(PassZooError, match="model.safetensors is missing"):
        load_run_model(bad)


def test_spec_that_disagrees_with_weights_gives_a_clear_error(tmp_path, capsys):
    run_dir = tmp_path / "src"
    _export_slim("resnet10t", run_dir)
    bad = _copy_run(run_dir, tmp_path)
    config = json.loads((bad / "config.json").read_text())
    history = config["model_args"]["spec"]["pruning_history"]
    history[0][2] = history[0][2][:-1]  # one channel fewer pruned than the weights have
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(SpecMismatchError, match="do not match the slim spec"):
        load_run_model(bad)
    assert "slim spec" in _cli_error(capsys, ["eval", str(bad), "--dataset", "fashion-mnist"])


def test_failed_onnx_verification_leaves_no_model_onnx(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _export_slim("resnet10t", run_dir)
    (run_dir / "model.onnx").write_bytes(b"stale export")  # an earlier file must not survive either
    monkeypatch.setattr(onnx_export, "PARITY_TOLERANCE", -1.0)
    monkeypatch.setattr(onnx_export, "CONDITIONING_FACTOR", -1.0)  # no float64 fallback either
    with pytest.raises(onnx_export.OnnxExportError, match="disagree"):
        onnx_export.export_onnx(run_dir)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "export.json", "model.safetensors"]
    report = json.loads((run_dir / "export.json").read_text())
    assert report["passed"] is False and report["sha256"] is None
    assert 0 <= report["max_abs_diff_random"] <= 1e-4  # the numbers are recorded; only the bar moved


def test_ill_conditioned_networks_are_judged_against_float64(tmp_path, monkeypatch):
    """Past the absolute bar, ORT passes only if it is as close to float64 as torch float32 is."""
    run_dir = tmp_path / "run"
    _export_slim("resnet10t", run_dir)
    monkeypatch.setattr(onnx_export, "PARITY_TOLERANCE", 1e-12)  # below any float32 rounding
    monkeypatch.setattr(onnx_export, "CONDITIONING_FACTOR", 1e6)
    report = onnx_export.export_onnx(run_dir)
    assert report["passed"] and "fp64" in report["rule"]
    for check in report["conditioning"]:
        assert check["torch_fp32_vs_fp64"] > 0 and check["ort_fp32_vs_fp64"] > 0
    monkeypatch.setattr(onnx_export, "CONDITIONING_FACTOR", 1e-6)
    with pytest.raises(onnx_export.OnnxExportError, match="disagree"):
        onnx_export.export_onnx(run_dir)
    assert not (run_dir / "model.onnx").exists()


def test_tiny_run_exports_onnx_and_eval_reproduces_top1(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["prune", "--model", "resnet10t", "--pretrained", "none", "--head", "new",
                 "--dataset", "fashion-mnist", "--img-size", str(S), "--train-subset", "32",
                 "--val-subset", "48", "--batch-size", "8", "--search-steps", "2", "--finetune-steps", "2",
                 "--seed", "3", "--out", str(run_dir)]) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    export = json.loads((run_dir / "export.json").read_text())
    assert (run_dir / "model.onnx").is_file() and export["passed"]
    assert export["max_abs_diff_real"] is not None
    assert metrics["onnx_max_abs_diff"] == max(export["max_abs_diff_random"], export["max_abs_diff_real"]) <= 1e-4
    capsys.readouterr()

    results = {}
    for target in (str(run_dir), f"local-dir:{run_dir}", str(run_dir / "model.onnx")):
        out = tmp_path / "eval.json"
        assert main(["eval", target, "--json", str(out)]) == 0
        results[target] = json.loads(out.read_text())
    for r in results.values():
        assert r["images"] == 48 and r["seed"] == 3 and r["dataset"] == "fashion-mnist"
        assert r["top1"] == metrics["top1"] == r["run_top1"]
    assert results[str(run_dir / "model.onnx")]["backend"] == "onnxruntime"
    assert "top-1" in capsys.readouterr().out

    # another subset is another measurement: the run's number is not shown as comparable
    out = tmp_path / "eval-all.json"
    assert main(["eval", str(run_dir), "--val-subset", "20", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["images"] == 20 and r["run_top1"] is None

    # latency: structure only (timings are the machine's business)
    out = tmp_path / "latency.json"
    assert main(["latency", str(run_dir), "--batch", "1", "3", "--repeats", "2", "--warmup", "0",
                 "--threads", "1", "--json", str(out)]) == 0
    lat = json.loads(out.read_text())
    assert [row["batch"] for row in lat["results"]] == [1, 3] and lat["threads"] == 1
    assert lat["macs_ratio"] == metrics["macs_ratio"]
    assert all(len(row["dense_ms_all"]) == len(row["slim_ms_all"]) == 2 for row in lat["results"])


def test_prune_without_onnx_writes_no_onnx(tmp_path):
    run_dir = tmp_path / "run"
    assert main(["prune", "--model", "resnet10t", "--pretrained", "none", "--head", "new",
                 "--img-size", str(S), "--train-subset", "16", "--val-subset", "16", "--batch-size", "8",
                 "--search-steps", "1", "--finetune-steps", "0", "--no-onnx", "--out", str(run_dir)]) == 0
    assert not (run_dir / "model.onnx").exists() and not (run_dir / "export.json").exists()
    assert "onnx_max_abs_diff" not in json.loads((run_dir / "metrics.json").read_text())


def test_tf_same_padding_is_exported_as_constants(tmp_path):
    import onnx
    import onnxruntime as ort

    from pass_zoo.export.onnx import export_graph

    torch.manual_seed(0)
    model = timm.create_model("tf_efficientnet_lite0", num_classes=5).eval()
    path = tmp_path / "lite0.onnx"
    export_graph(model, path, 64)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Pad") == 5 and "Shape" not in ops and "Ceil" not in ops  # no per-run pad arithmetic
    x = torch.randn(3, 3, 64, 64)  # another batch size than the export's: the batch axis stays dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert abs(got - expected).max() < 1e-4
    import timm.layers.padding as padding
    assert padding.pad_same.__module__ == "timm.layers.padding"  # the patch is undone
