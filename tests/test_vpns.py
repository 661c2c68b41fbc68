"""VPNs and the unstructured baselines: weight masks under a density budget, through the shared pipeline.

Scores and selection, stage 1's gradients, masks held through fine-tuning, export (timm reload and
ONNX Runtime equal the masked model, zeros in model.safetensors), budget flags refused in one line,
transfer of weight masks, card and publish, bench with a density axis, and an exact resume after a
SIGKILL in stage 1. Tiny random-init models at 32 px; nothing here measures accuracy.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import shutil
import signal

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import pass_zoo
import pass_zoo.export.onnx as onnx_export
from pass_zoo import PruneConfig, load_run_model, save_slim_model
from pass_zoo.cli import main
from pass_zoo.errors import BudgetError
from pass_zoo.graph.slim import PruningHistory
from pass_zoo.methods.weight_masks import (apply_weight_masks, hold_weight_masks, kaiming_scores, prunable_weights,
                                           select_weights, top_fraction)
from pass_zoo.methods import get_method
from pass_zoo.methods.vpns import MaskedWeightsModel, WeightScores
from pass_zoo.prompt import PromptedModel, create_prompt
from pass_zoo.tools import bench as bench_mod

from conftest import make_model, offline_hf_cache, randomise_bn
from hub_emulator import HubEmulator
from test_resume import _run as _run_cli, _start, _wait_for

pytestmark = pytest.mark.filterwarnings("ignore:Use .content=:DeprecationWarning")

S = 32
TINY = ["--model", "mobilenetv3_small_050", "--pretrained", "none", "--head", "new", "--img-size", str(S),
        "--train-subset", "48", "--val-subset", "24", "--batch-size", "8", "--search-steps", "3",
        "--finetune-steps", "2", "--search-lr-scores", "0.05"]


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def _error_line(argv) -> str:
    rc, _, err = _run(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("pass-zoo: error: ") and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- scores and selection
def test_scores_start_proportional_to_weight_magnitude():
    model = make_model("resnet10t")
    weights = prunable_weights(model)
    assert "fc.weight" not in weights and all(n.endswith(".weight") for n in weights)  # the classifier stays dense
    scores = WeightScores({n: w.detach() for n, w in weights.items()})
    for name, s in zip(scores.names, scores.scores):
        w = weights[name].detach()
        bound = math.sqrt(6.0 / w[0].numel())  # Kaiming-uniform's bound for this layer's fan-in
        ratio = s.detach()[w != 0] / w.abs()[w != 0]
        assert torch.allclose(ratio, torch.full_like(ratio, bound / float(w.abs().max())), rtol=1e-5), name
        assert float(s.detach().max()) == pytest.approx(bound, rel=1e-6) and float(s.detach().min()) >= 0
    assert torch.equal(kaiming_scores(-weights[scores.names[0]]), scores.scores[0].detach())  # |W|, not W


@pytest.mark.parametrize("density", [1.0, 0.5, 0.2, 0.1, 0.013])
def test_one_global_threshold_keeps_exactly_the_density(density):
    g = torch.Generator().manual_seed(0)
    # layers of very different sizes, with many ties (integer values) and a different scale each
    values = [torch.randint(0, 50, shape, generator=g).float() * scale
              for shape, scale in (((16, 3, 3, 3), 1.0), ((7,), 0.5), ((40, 16, 1, 1), 2.0), ((10, 40), 1.0))]
    masks = top_fraction(values, density)
    total = sum(v.numel() for v in values)
    assert sum(int(m.sum()) for m in masks) == max(1, round(density * total))
    flat, keep = torch.cat([v.flatten() for v in values]), torch.cat([m.flatten() for m in masks])
    if not keep.all():
        assert flat[keep].min() >= flat[~keep].max()  # one threshold over every layer at once
        thr = flat[keep].min()
        for v, m in zip(values, masks):  # per layer: exactly the weights above it, ties (at it) aside
            assert int((v > thr).sum()) <= int(m.sum()) <= int((v >= thr).sum())
            assert bool((m | (v <= thr)).all()) and bool((~m | (v >= thr)).all())
    # on a model, through the scores' magnitudes
    model = make_model("resnet10t")
    weights = prunable_weights(model)
    masks = select_weights({n: w.detach() for n, w in weights.items()}, density)
    n = sum(w.numel() for w in weights.values())
    assert list(masks) == list(weights) and sum(int(m.sum()) for m in masks.values()) == max(1, round(density * n))


def test_magnitude_is_global_and_random_weights_depend_on_the_seed_only():
    model = make_model("resnet10t")
    weights = {n: w.detach() for n, w in prunable_weights(model).items()}
    mag = get_method("magnitude")
    masks = select_weights(mag.scores(weights, 0), 0.2)
    kept = torch.cat([w[masks[n]].abs() for n, w in weights.items()])
    dropped = torch.cat([w[~masks[n]].abs() for n, w in weights.items()])
    assert kept.min() >= dropped.max()  # the largest |W| of the whole network
    rnd = get_method("random-weights")
    torch.rand(100)  # what drew random numbers before does not matter
    a = select_weights(rnd.scores(weights, 3), 0.2)
    b = select_weights(rnd.scores(weights, 3), 0.2)
    c = select_weights(rnd.scores(weights, 4), 0.2)
    assert all(torch.equal(a[n], b[n]) for n in a) and not all(torch.equal(a[n], c[n]) for n in a)
    assert [get_method(m).budget for m in ("vpns", "magnitude", "random-weights")] == ["density"] * 3
    assert get_method("vpns").mask_kind == "weight" and get_method("pass").mask_kind == "channel"


def test_one_shot_stage1_trains_prompt_and_head_but_not_the_masks():
    # magnitude's stage 1 is VPNs' with the scores frozen: same steps and BN regime, masks unchanged
    from accelerate import Accelerator

    from pass_zoo.config import SearchConfig
    from pass_zoo.methods.vpns import search_weight_masks

    torch.manual_seed(0)
    backbone = randomise_bn(make_model("resnet10t"))
    weights = {n: w.detach().clone() for n, w in prunable_weights(backbone).items()}
    scores = get_method("magnitude").scores(weights, 0)
    expected = select_weights(scores, 0.2)
    prompt = create_prompt("pad", S, 2)
    head = {k: v.clone() for k, v in backbone.get_classifier().state_dict().items()}
    running = backbone.bn1.running_mean.clone()
    loader = [(torch.randn(4, 3, S, S), torch.tensor([0, 1, 2, 3])) for _ in range(3)]
    cfg = SearchConfig(steps=3, lr_scores=1e-2, lr_head=1e-2)
    masks, initial, losses = search_weight_masks(backbone, prompt, loader, 0.2, cfg, Accelerator(cpu=True),
                                                 train_head=True, fixed_scores=scores)
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(torch.equal(masks[n], expected[n]) and torch.equal(initial[n], expected[n]) for n in expected)
    assert prompt.delta.abs().sum() > 0  # the prompt learned (it starts at zero)
    assert any(not torch.equal(v, head[k]) for k, v in backbone.get_classifier().state_dict().items())
    params = dict(backbone.named_parameters())
    assert all(torch.equal(params[n], w) for n, w in weights.items())  # the weights did not
    assert torch.equal(backbone.bn1.running_mean, running)  # nor the running statistics


# ----------------------------------------------------------------------------- stage 1 and stage 2
def test_stage1_gradients_reach_scores_and_prompt_but_not_weights():
    backbone = randomise_bn(make_model("resnet10t"))
    for p in backbone.parameters():
        p.requires_grad_(False)
    prompt = create_prompt("pad", S, 2)
    scores = WeightScores({n: w.detach() for n, w in prunable_weights(backbone).items()})
    model = MaskedWeightsModel(backbone, prompt, scores, 0.3).train()
    x, y = torch.randn(4, 3, S, S), torch.tensor([0, 1, 2, 3])
    F.cross_entropy(model(x), y).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores.scores)
    assert prompt.delta.grad is not None and prompt.delta.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())  # frozen weights, BN and classifier
    # the forward pass is the network with the masked weights zeroed (straight-through changes only gradients)
    masked = make_model("resnet10t")
    masked.load_state_dict(backbone.state_dict())
    apply_weight_masks(masked, scores.masks(0.3))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), masked.eval()(prompt(x)), atol=1e-5)


def test_fine_tuning_holds_the_masked_weights_at_zero():
    model = make_model("resnet10t")
    weights = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    masks = select_weights(weights, 0.2)
    apply_weight_masks(model, masks)
    hold_weight_masks(model, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(4, 3, S, S)), torch.tensor([0, 1, 2, 3])).backward()
        opt.step()
    with torch.no_grad():  # the hook also re-applies the masks before a forward pass
        model.eval()(torch.randn(1, 3, S, S))
    params = dict(model.named_parameters())
    for n, m in masks.items():
        assert not params[n][~m].any(), n
    assert any(not torch.equal(params[n][m], weights[n][m]) for n, m in masks.items())  # the kept ones trained


def test_masked_model_equals_its_timm_and_onnx_export(tmp_path, monkeypatch):
    torch.manual_seed(0)
    base = randomise_bn(timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10).eval())
    masks = select_weights({n: w.detach() for n, w in prunable_weights(base).items()}, 0.2)
    apply_weight_masks(base, masks)
    prompt = create_prompt("pad", S, 2)
    with torch.no_grad():
        prompt.delta.normal_()
    prompted = PromptedModel(base, prompt).eval()
    out = tmp_path / "run"
    save_slim_model(prompted, out, base_arch="mobilenetv3_small_050", history=PruningHistory(), num_classes=10,
                    label_names=[str(i) for i in range(10)], base_pretrained_cfg=dict(base.pretrained_cfg), img_size=S)
    saved = load_file(str(out / "model.safetensors"))
    for n, m in masks.items():  # the masked weights are zeros in the file, the rest as they were
        assert not saved[f"model.{n}"][~m].any() and torch.equal(saved[f"model.{n}"][m], base.get_parameter(n)[m])
    x = torch.randn(3, 3, S, S, generator=torch.Generator().manual_seed(1))
    loaded = load_run_model(out)
    with torch.no_grad():
        ref = prompted(x)
        assert (loaded(x) - ref).abs().max() <= 1e-6
    monkeypatch.setattr(onnx_export, "PARITY_TOLERANCE", 1e-4)
    report = onnx_export.export_onnx(out, real_inputs=x)
    assert report["passed"] and report["max_abs_diff_random"] <= 1e-4 and report["max_abs_diff_real"] <= 1e-4
    session = onnx_export.ort_session(out / "model.onnx")
    assert abs(session.run(None, {"input": x.numpy()})[0] - ref.numpy()).max() <= 1e-4
    hub = offline_hf_cache(tmp_path, monkeypatch, {f: out / f for f in ("config.json", "model.safetensors")})
    with torch.no_grad():
        assert torch.equal(timm.create_model(hub, pretrained=True).eval()(x), loaded(x))


# ----------------------------------------------------------------------------- budget flags
def test_a_budget_flag_of_the_other_kind_is_refused_in_one_line(tmp_path):
    out = str(tmp_path / "never")
    line = _error_line(["prune", "--method", "vpns", "--target-macs", "0.3", "--out", out])
    assert "--target-macs does not apply to --method vpns" in line and "--target-density" in line
    line = _error_line(["prune", "--method", "vpns", "--target-macs", "0.5", "--out", out])  # typed, even the default
    assert "--target-macs does not apply" in line
    line = _error_line(["prune", "--method", "taylor", "--target-density", "0.3", "--out", out])
    assert "--target-density does not apply to --method taylor" in line and "vpns" in line
    assert "must be in (0, 1]" in _error_line(["prune", "--method", "magnitude", "--target-density", "0", "--out", out])
    assert not (tmp_path / "never").exists()
    with pytest.raises(BudgetError, match="--target-macs does not apply"):  # the Python API and recipes
        PruneConfig(method="random-weights", target_macs=0.2).validate()
    with pytest.raises(BudgetError, match="--target-density does not apply"):
        PruneConfig(method="pass", target_density=0.2).validate()
    cfg = PruneConfig(method="vpns")
    cfg.validate()
    assert cfg.density == 0.5 and cfg.default_out().endswith("-vpns50")
    assert PruneConfig(method="magnitude", target_density=0.1).default_out().endswith("-magnitude10")


def test_density_is_a_budget_kind_of_its_own():
    cfg = PruneConfig(method="vpns", target_density=0.1)
    cfg.validate()
    assert (cfg.budget_kind(), cfg.budget_target(), cfg.target_macs) == ("density", 0.1, None)
    assert cfg.budget_label() == "10 % of the prunable weights"
    cfg = PruneConfig(method="magnitude")  # no budget named: the density default, never the MACs one
    cfg.validate()
    assert (cfg.budget_kind(), cfg.target_density, cfg.target_macs, cfg.prompt) == ("density", 0.5, None, "pad")
    cfg = PruneConfig(method="taylor")
    cfg.validate()
    assert (cfg.budget_kind(), cfg.target_macs, cfg.target_density, cfg.prompt) == ("macs", 0.5, None, "additive")
    cfg = PruneConfig(method="vpns", prompt="additive")  # an explicit prompt is kept
    cfg.validate()
    assert cfg.prompt == "additive"


@pytest.mark.parametrize("flag,value", [("--target-params", "0.4"), ("--target-latency", "3")])
def test_weight_methods_refuse_every_channel_budget(flag, value, tmp_path):
    line = _error_line(["prune", "--method", "vpns", flag, value, "--out", str(tmp_path / "never")])
    assert f"{flag} does not apply to --method vpns" in line and "--target-density" in line
    assert not (tmp_path / "never").exists()
    with pytest.raises(BudgetError, match="--target-density does not apply to --method pass"):
        PruneConfig(method="pass", target_params=0.4, target_density=0.2).validate()


def test_a_checkpoint_from_before_weight_masks_still_resumes(tmp_path):
    """A channel run checkpointed before --target-density, --search-lr-scores and --prompt auto existed
    (its config: "prompt": "additive", no target_density) resumes with the same flags."""
    import dataclasses

    from accelerate import Accelerator

    from pass_zoo.train.checkpoint import FORMAT, RunCheckpoints, resume_key

    cfg = PruneConfig(method="taylor", seed=3)
    cfg.validate()
    old = resume_key(dataclasses.asdict(cfg))  # what a checkpoint stores
    del old["target_density"], old["search"]["lr_scores"]
    assert old["prompt"] == "additive"
    ckpt = tmp_path / "run" / "checkpoints" / "search-000002"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"format": FORMAT, "world_size": 1, "config": old, "carry": {},
                                                  "stage": "search", "step": 2}))
    now = PruneConfig(method="taylor", seed=3)  # --prompt left at auto
    now.validate()
    defaults = dataclasses.asdict(PruneConfig())
    ckpts = RunCheckpoints(tmp_path / "run", Accelerator(cpu=True), 2, dataclasses.asdict(now), resume=True,
                           defaults=defaults)
    assert ckpts.resumed_from == {"stage": "search", "step": 2}
    now.prompt = "pad"  # a real change is still refused
    with pytest.raises(Exception, match="prompt 'additive' \\(now 'pad'\\)"):
        RunCheckpoints(tmp_path / "run", Accelerator(cpu=True), 2, dataclasses.asdict(now), resume=True,
                       defaults=defaults)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def vpns_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vpns") / "run"
    rc, stdout, err = _run(["prune", *TINY, "--method", "vpns", "--target-density", "0.2",
                            "--dataset", "fashion-mnist@0-4", "--out", str(out)])
    assert rc == 0, err[-3000:]
    return out, stdout


def test_a_vpns_run_exports_its_zeros_and_measures_them(vpns_run):
    out, stdout = vpns_run
    assert {"config.json", "masks.json", "masks.safetensors", "metrics.json", "model.safetensors", "model.onnx",
            "export.json", ".pass-zoo-run"} == {p.name for p in out.iterdir()}
    m = json.loads((out / "metrics.json").read_text())
    assert m["method"] == "vpns" and m["mask_kind"] == "weight" and m["target_density"] == 0.2
    assert m["target_macs"] is None and m["macs_slim"] == m["macs_dense"]  # nothing slimmed
    assert m["config"]["prompt"] == "pad" and json.loads((out / "config.json").read_text())[
        "model_args"]["spec"]["prompt"]["kind"] == "pad"  # VPNs' prompt by default (--prompt auto, resolved)
    assert m["budget"] == {"kind": "density", "target": 0.2, "achieved": m["density"]}
    assert 0 < m["mask_change_from_init"] < 1  # the search moved the masks
    masks = {k: v.bool() for k, v in load_file(str(out / "masks.safetensors")).items()}
    weights = load_file(str(out / "model.safetensors"))
    assert "model.classifier.weight" not in {f"model.{k}" for k in masks}
    total = sum(v.numel() for v in masks.values())
    assert sum(int(v.sum()) for v in masks.values()) == round(0.2 * total)
    for name, mask in masks.items():
        assert not weights[f"model.{name}"][~mask].any(), name
        assert m["density_per_layer"][name] == pytest.approx(int(torch.count_nonzero(weights[f"model.{name}"]))
                                                             / mask.numel())
    assert m["density"] <= 0.2 + 1e-9 and m["density"] == pytest.approx(0.2, abs=1e-3)
    assert m["prunable_weights"] == total and m["weights_nonzero"] < m["params_dense"]
    assert m["model_zip_bytes"] < 0.6 * m["model_bytes"] and m["model_csr_bytes"] < m["model_bytes"]
    summary = json.loads((out / "masks.json").read_text())
    order = list(prunable_weights(load_run_model(out).model))  # masks.json lists the layers in module order
    assert summary["kind"] == "weight" and [layer["name"] for layer in summary["layers"]] == order
    assert sorted(order) == sorted(masks)
    export = json.loads((out / "export.json").read_text())
    worst = max(export["max_abs_diff_random"], export["max_abs_diff_real"])
    # past 1e-4 only where float32 torch is itself that far from float64 (the CPU's kernels decide)
    assert export["passed"] and (worst <= 1e-4 or all(
        c["ort_fp32_vs_fp64"] <= max(1e-4, onnx_export.CONDITIONING_FACTOR * c["torch_fp32_vs_fp64"])
        for c in export["conditioning"]))
    assert "20.0 % of the prunable weights kept (target 20 %" in stdout and "zipped" in stdout
    loaded = load_run_model(out)
    assert isinstance(loaded, pass_zoo.PassPrunedModel) and loaded.prompt.kind == "pad"
    params = dict(loaded.named_parameters())
    assert all(not params[f"model.{n}"][~mk].any() for n, mk in masks.items())


def test_transfer_reuses_the_weight_masks_on_another_task(vpns_run, tmp_path, capsys):
    source, _ = vpns_run
    out = tmp_path / "b"
    assert main(["transfer", str(source), "--mode", "masks", "--dataset", "fashion-mnist@5-9", "--out", str(out),
                 "--finetune-steps", "2", "--no-onnx"]) == 0
    assert "of the prunable weights kept" in capsys.readouterr().out
    src, new = load_file(str(source / "masks.safetensors")), load_file(str(out / "masks.safetensors"))
    assert src.keys() == new.keys() and all(torch.equal(src[k], new[k]) for k in src)
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["transfer_mode"] == "masks" and m["class_names"][0] == "Sandal"
    assert m["compute"]["stage1_batches"] == 0 and m["method"] == "vpns"
    weights = load_file(str(out / "model.safetensors"))
    assert all(not weights[f"model.{k}"][~v.bool()].any() for k, v in src.items())
    # a hypernetwork transfer needs a PASS run; masks that do not fit the model are refused in one line
    assert "no hypernetwork" in _error_line(["transfer", str(source), "--mode", "hypernet", "--dataset",
                                             "fashion-mnist@5-9", "--out", str(tmp_path / "c")])
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    kept = dict(list(src.items())[1:])  # one layer's mask missing
    (broken / "masks.safetensors").write_bytes(__import__("safetensors.torch", fromlist=["save"]).save(kept))
    argv = ["transfer", str(broken), "--mode", "masks", "--dataset", "fashion-mnist@5-9", "--out", str(tmp_path / "d"),
            "--no-onnx"]
    assert "masks.safetensors is not the file the run wrote" in _error_line(argv)  # its pins catch it first
    metrics = json.loads((broken / "metrics.json").read_text())
    del metrics["file_sha256"]  # a source from before pins: the fit check
    (broken / "metrics.json").write_text(json.dumps(metrics))
    assert "weight masks do not fit this model: missing" in _error_line(argv)


def test_card_and_publish_work_for_a_vpns_run(vpns_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(vpns_run[0], run)
    rc, out, err = _run(["card", str(run), "--repo-id", "me/tiny-vpns"])
    assert rc == 0, err
    card = (run / "README.md").read_text()
    m = json.loads((run / "metrics.json").read_text())
    assert "unstructured-pruning" in card and "vpns" in card and "arXiv 2312.01397" in card
    assert f"| prunable weights kept | 100 % | {100 * m['density']:.1f} % (target 20 %) |" in card
    assert f"{m['model_zip_bytes'] / 2 ** 20:.2f} MiB" in card and "![Kept weights per layer](kept_channels.png)" in card
    masks = json.loads((run / "masks.json").read_text())
    assert f"{len(masks['layers'])} prunable layers in forward order; {masks['kept']} of {masks['total']}" in card
    assert (run / "kept_channels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    (run / "README.md").unlink()
    rc, out, err = _run(["publish", str(run), "--repo-id", "me/tiny-vpns", "--dry-run"])
    assert rc == 0, err
    assert "would upload to me/tiny-vpns@main" in out and "model.safetensors" in out and "unstructured" in out
    assert not (run / "README.md").exists()

    import huggingface_hub.constants as hf_constants

    with HubEmulator() as hub:  # the real upload path, against the emulated Hub API
        monkeypatch.setattr(hf_constants, "ENDPOINT", hub.url)
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
        monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
        monkeypatch.setattr(importlib.import_module("huggingface_hub.utils.tqdm"), "HF_HUB_DISABLE_PROGRESS_BARS", True)
        rc, out, err = _run(["publish", str(run), "--repo-id", "me/tiny-vpns", "--token", "hf_x"])
        assert rc == 0, err
        files = hub.commits[0]["files"]
    assert {"model.safetensors", "masks.safetensors", "README.md", "model.onnx"} <= set(files)
    assert files["model.safetensors"] == (run / "model.safetensors").read_bytes()
    assert json.loads((run / "hub.json").read_text())["repo_id"] == "me/tiny-vpns"


def test_bench_runs_weight_mask_methods_on_a_density_axis(tmp_path, capsys):
    spec = {"name": "tiny-vpns",
            "base": {"model": "mobilenetv3_small_050", "pretrained": "none", "head": "new", "img_size": S,
                     "train_subset": 32, "val_subset": 16, "batch_size": 16, "onnx": False,
                     "search": {"steps": 1}, "finetune": {"steps": 1}},
            "grid": {"method": ["vpns", "magnitude", "random-weights", "random"], "target_density": [0.5, 0.2],
                     "target_macs": [0.5], "seed": [0]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    cells = bench_mod.plan_cells(bench_mod.load_spec(path))
    ids = [c["id"] for c in cells]
    assert ids == ["vpns-d0.5-s0", "vpns-d0.2-s0", "magnitude-d0.5-s0", "magnitude-d0.2-s0",
                   "random-weights-d0.5-s0", "random-weights-d0.2-s0", "random-t0.5-s0"]
    cfg = next(c for c in cells if c["id"] == "vpns-d0.2-s0")["config"]
    assert cfg.target_density == 0.2 and cfg.target_macs is None  # the one budget its method takes
    assert next(c for c in cells if c["id"] == "random-t0.5-s0")["config"].target_density is None
    assert main(["bench", str(path), "--out", str(tmp_path / "x"), "--dry-run"]) == 0
    assert "would run vpns-d0.2-s0" in capsys.readouterr().err

    out = tmp_path / "res"
    assert main(["bench", str(path), "--out", str(out), "--only", "vpns-d0.5", "magnitude-d0.5",
                 "random-weights-d0.5"]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert {r["id"] for r in doc["runs"]} == {"vpns-d0.5-s0", "magnitude-d0.5-s0", "random-weights-d0.5-s0"}
    for r in doc["runs"]:
        assert r["budget"] == "density" and r["level"] == 0.5 and r["target_macs"] is None
        assert r["density"] == pytest.approx(0.5, abs=1e-3) and r["model_zip_bytes"] > 0
    assert [(s["budget"], s["level"]) for s in doc["summary"]] == [("density", 0.5)] * 3
    for png in ("accuracy_vs_density.png", "kept_weights.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| method | 50 % weights |" in table and "| vpns |" in table
    assert "| weights | vpns | best other method |" in table and "| 50 % |" in table
    assert bench_mod.learned_labels(doc) == ["vpns"]


def test_tables_mix_budgets_and_read_records_written_before_density():
    old = {"label": "pass", "target_macs": 0.5, "macs_ratio": 0.5, "top1": 0.8, "top1_after_search": 0.3, "seed": 0}
    runs = [old, dict(old, label="taylor", top1=0.7),
            {"label": "vpns", "budget": "density", "level": 0.1, "target_macs": None, "macs_ratio": 1.0,
             "density": 0.1, "top1": 0.6, "top1_after_search": 0.2, "seed": 0},
            {"label": "magnitude", "budget": "density", "level": 0.1, "target_macs": None, "macs_ratio": 1.0,
             "density": 0.1, "top1": 0.55, "top1_after_search": 0.1, "seed": 0},
            {"label": "dense", "target_macs": 1.0, "macs_ratio": 1.0, "top1": 0.9, "top1_after_search": 0.9, "seed": 0}]
    doc = {"runs": runs, "summary": bench_mod.summarise(runs)}
    table = bench_mod.results_table(doc)
    assert table.splitlines()[0] == "| method | 50 % MACs | 10 % weights |"
    assert "| pass | 80.00 ± 0.00 (30.0) | - |" in table and "| vpns | - | 60.00 ± 0.00 (20.0) |" in table
    assert "| dense | 90.00 ± 0.00 | 90.00 ± 0.00 |" in table
    # paired by seed, each against the methods under its own kind of budget
    assert "| weights | vpns |" in bench_mod.gap_table(doc, "vpns")
    assert "| 10 % | 60.00 | magnitude 55.00 | +5.00 | 1 | - |" in bench_mod.gap_table(doc, "vpns")
    assert "| 50 % | 80.00 | taylor 70.00 | +10.00 | 1 | - |" in bench_mod.gap_table(doc, "pass")


# ----------------------------------------------------------------------------- resume
RESUME = ["prune", "--model", "resnet10t", "--pretrained", "none", "--head", "new", "--dataset", "fashion-mnist",
          "--img-size", "32", "--train-subset", "64", "--val-subset", "32", "--search-steps", "16",
          "--finetune-steps", "4", "--batch-size", "16", "--no-onnx", "--checkpoint-every", "2", "--seed", "5",
          "--method", "vpns", "--target-density", "0.1", "--search-lr-scores", "0.02"]


def test_sigkill_in_stage1_then_resume_gives_identical_masks(tmp_path):
    ref = tmp_path / "ref"
    proc = _run_cli(RESUME + ["--out", str(ref)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((ref / "metrics.json").read_text())["mask_change_from_init"] > 0  # the masks were learned

    out = tmp_path / "run"
    proc = _start(RESUME + ["--out", str(out)])
    ckpt = _wait_for(proc, out / "checkpoints", "search-*")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (out / "metrics.json").exists()
    assert not (out / "checkpoints" / "searched").exists() and 0 < int(ckpt.name.split("-")[1]) < 16
    assert any(k.startswith("module.scores.") for k in load_file(str(ckpt / "state.safetensors")))
    resumed = _run_cli(RESUME + ["--out", str(out), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["resumed_from"]["stage"] == "search"
    for name in ("masks.safetensors", "model.safetensors", "config.json"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, ref))
    assert a["search_loss_last"] == b["search_loss_last"] and a["top1"] == b["top1"] and a["density"] == b["density"]
