"""A method registered from outside the package runs through prune, bench and a resumed run."""
import json

import pytest
import torch
import yaml

import pass_zoo.pipeline as pipeline
from pass_zoo import PruneConfig, prune
from pass_zoo.tools import bench as bench_mod
from pass_zoo.cli import build_parser
from pass_zoo.graph.masks import select_units, to_channel_masks
from pass_zoo.methods import Method, MethodResult, get_method, list_methods, register_method

CALLS = []


@register_method
class KeepFirst(Method):
    """Keeps the first units of every group under the budget (a deterministic toy criterion)."""

    name = "toy-first"
    tag = "toy"
    baseline = False  # compared against the Torch-Pruning criteria in bench tables
    artefacts = ("toy.json",)
    metric_keys = ("toy_groups",)

    def produce(self, ctx):
        CALLS.append(ctx.head)
        cfg = ctx.config
        scores = [torch.arange(g.units, 0, -1).float() for g in ctx.seq.groups]
        masks = to_channel_masks(select_units(scores, ctx.seq, ctx.budget, cfg.search.round_to), ctx.seq)
        return MethodResult(masks, artefacts={"toy.json": json.dumps({"groups": len(masks)}).encode()},
                            record={"toy_groups": len(masks)})


def _config(out, **kw) -> PruneConfig:
    cfg = PruneConfig(model="resnet10t", pretrained="none", head="new", img_size=32, train_subset=32, val_subset=16,
                      batch_size=16, onnx=False, method="toy-first", out=str(out), checkpoint_every=1, **kw)
    cfg.search.steps, cfg.finetune.steps = 1, 2
    return cfg


def test_the_registry_drives_choices_and_names():
    assert list_methods()[:7] == ["pass", "l1", "group-norm", "bn-scale", "taylor", "random", "growreg"]
    assert "toy-first" in list_methods()
    prune_parser = build_parser()._subparsers._group_actions[0].choices["prune"]
    assert prune_parser.parse_args(["--method", "toy-first"]).method == "toy-first"
    assert PruneConfig(method="toy-first").default_out().endswith("-toy50")
    assert PruneConfig(method="taylor").default_out().endswith("-taylor50")
    assert PruneConfig().default_out().endswith("-pass50")
    assert get_method("pass").transferable and not get_method("taylor").transferable


def test_a_registered_method_runs_through_prune_and_resume(tmp_path, monkeypatch):
    CALLS.clear()
    ref = prune(_config(tmp_path / "ref"))
    assert CALLS == ["new"] and ref["method"] == "toy-first" and ref["toy_groups"] > 0
    assert json.loads((tmp_path / "ref" / "toy.json").read_text()) == {"groups": ref["toy_groups"]}
    assert ref["macs_slim"] <= 0.5 * ref["macs_dense"]

    # Interrupted after the method ran: the resumed run takes masks and artefacts from the checkpoint.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("stopped before fine-tuning")

    monkeypatch.setattr(pipeline, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prune(_config(tmp_path / "run"))
    monkeypatch.undo()
    assert (tmp_path / "run" / "checkpoints" / "searched" / "state.json").is_file()
    CALLS.clear()
    resumed = prune(_config(tmp_path / "run", resume=True))
    assert CALLS == []  # the method did not run again
    assert resumed["resumed_from"] == {"stage": "searched", "step": None}
    for name in ("masks.safetensors", "toy.json", "model.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert resumed["top1"] == ref["top1"] and resumed["toy_groups"] == ref["toy_groups"]


def test_a_registered_method_is_a_bench_label(tmp_path):
    spec = {"name": "toy", "base": {"model": "resnet10t", "pretrained": "none", "head": "new", "img_size": 32,
                                    "train_subset": 32, "val_subset": 16, "batch_size": 16, "onnx": False,
                                    "search": {"steps": 1}, "finetune": {"steps": 1}},
            "grid": {"method": ["toy-first", "random"], "target_macs": [0.5], "seed": [0]}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    doc = bench_mod.run_bench(path, tmp_path / "bench", log=lambda m: None)
    runs = {r["label"]: r for r in doc["runs"]}
    assert set(runs) == {"toy-first", "random"}
    assert runs["toy-first"]["method"] == "toy-first" and runs["toy-first"]["toy_groups"] > 0
    assert "toy_groups" not in runs["random"]
    assert bench_mod.learned_labels(doc) == ["toy-first"]
