"""Budgets beyond MACs: --target-params and --target-latency.

Met (the selection lands within tolerance of the target), refused when unreachable (one line,
before stage 1, non-zero exit through the CLI), recorded in metrics.json, exactly one budget kind per
run; the latency table is measured once and reused from its cache. No test times anything: latency
comes from an injected measurement (a function of the network's MACs) or an injected table.
"""
from __future__ import annotations

import json

import numpy as np

import pytest
import torch

from conftest import make_model

from pass_zoo import build_layer_sequence, count_params, select_units, slim
from pass_zoo.errors import BudgetError
from pass_zoo.export import latency as latency_mod
from pass_zoo.export import latency_table as lt
from pass_zoo.graph.budget import latency_budget, macs_budget, params_budget
from pass_zoo.graph.cost_model import LATENCY_FEATURES, count_macs
from pass_zoo.graph.masks import to_channel_masks

X = torch.zeros(1, 3, 32, 32)


def _scores(seq, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(grp.units, generator=g) for grp in seq.groups]


def _kept(units):
    return [int(u.sum()) for u in units]


# ------------------------------------------------------------------ the parameter model
@pytest.mark.parametrize("name, kwargs", [("resnet18", {}), ("mobilenetv3_small_050", {}),
                                          ("vit_tiny_patch16_224", {"img_size": 32})])
def test_param_model_equals_the_slim_count(name, kwargs):
    model = make_model(name, **kwargs)
    seq = build_layer_sequence(model, X)
    assert seq.param_model.dense == count_params(model)
    units = select_units(_scores(seq, 1), seq, 0.4, round_to=8)
    slim_model, _ = slim(model, to_channel_masks(units, seq), X)
    assert seq.param_model.params(_kept(units)) == count_params(slim_model)
    batch = torch.tensor([_kept(units), [g.units for g in seq.groups]])
    assert seq.param_model.params_batch(batch).tolist() == [count_params(slim_model), count_params(model)]


@pytest.mark.parametrize("target", [0.7, 0.4, 0.2])
def test_params_budget_is_met(target):
    model = make_model("resnet18")
    seq = build_layer_sequence(model, X)
    budget = params_budget(seq, target)
    units = select_units(_scores(seq, 2), seq, budget, round_to=8)
    slim_model, _ = slim(model, to_channel_masks(units, seq), X)
    ratio = count_params(slim_model) / count_params(model)
    assert target - 0.03 <= ratio <= target, ratio


def test_params_budget_below_the_floor_is_one_line():
    seq = build_layer_sequence(make_model("resnet18"), X)
    with pytest.raises(BudgetError) as err:
        select_units(_scores(seq, 3), seq, params_budget(seq, 1e-4), round_to=8)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("--target-params 0.0001 cannot be met") and "8 channel(s)" in msg


def test_macs_budget_object_selects_like_the_plain_fraction():
    seq = build_layer_sequence(make_model("resnet18"), X)
    scores = _scores(seq, 4)
    a = select_units(scores, seq, 0.5, round_to=8)
    b = select_units(scores, seq, macs_budget(seq, 0.5), round_to=8)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------ latency: an injected table
def _table(coef):
    return lt.LatencyTable(key={}, coef=list(coef))


def test_latency_budget_with_an_injected_table_is_met():
    seq = build_layer_sequence(make_model("resnet18"), X)
    # 0.05 ms fixed + 1 ms per 100 M GEMM MACs + 1 ms per 1 M activations written
    coef = [0.05, 1e-8, 0.0, 0.0, 1e-6, 0.0]
    dense = latency_budget(seq, 1.0, _table(coef)).dense
    for fraction in (0.8, 0.5, 0.3):
        target = fraction * dense
        budget = latency_budget(seq, target, _table(coef), "batch 1, 2 ORT thread(s)")
        units = select_units(_scores(seq, 5), seq, budget, round_to=8)
        got = budget.cost(_kept(units))
        assert 0.97 * target <= got <= target, (fraction, got, target)
    with pytest.raises(BudgetError, match=r"^--target-latency 0.01 ms cannot be met: .* ms by the latency table"):
        select_units(_scores(seq, 5), seq, latency_budget(seq, 0.01, _table(coef), "batch 1"), round_to=8)


def test_latency_features_are_exact_costs():
    seq = build_layer_sequence(make_model("resnet18"), X)
    full = torch.tensor([[g.units for g in seq.groups]])
    f = seq.latency_features.batch(full)[0]
    assert f.shape == (len(LATENCY_FEATURES),)
    assert f[0] == 1 and f[1] + f[2] + f[3] == seq.dense_macs


def test_nnls_recovers_a_noise_free_model():
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(12, 4, generator=gen, dtype=torch.float64)
    truth = torch.tensor([0.5, 0.0, 2.0, 0.1], dtype=torch.float64)
    x = lt.nnls(a, a @ truth)
    assert torch.allclose(x, truth, atol=1e-8) and (x >= 0).all()


# ------------------------------------------------------------------ latency: the table and its cache
class FakeMeasure:
    """ms = 0.1 + MACs / 1e7 of whatever network is exported: deterministic, and counted."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model, img_size, batch=1, threads=2, repeats=10, warmup=2, opset=17):
        self.calls += 1
        return 0.1 + count_macs(model, torch.zeros(1, 3, img_size, img_size)) / 1e7


@pytest.fixture
def fake_latency(monkeypatch, tmp_path):
    fake = FakeMeasure()
    monkeypatch.setattr(latency_mod, "measure_model_ms", fake)
    monkeypatch.setenv("PASS_ZOO_CACHE", str(tmp_path / "cache"))
    return fake


def test_latency_table_is_measured_once_and_cached(fake_latency, tmp_path):
    model = make_model("resnet18")
    seq = build_layer_sequence(model, X)
    key = lt.table_key("resnet18", {}, 32, 10, seq, batch=1, threads=2, round_to=8, probes=6)
    table, path, measured = lt.latency_table(model, seq, key)
    assert measured and fake_latency.calls == 6 and path.is_file() and path.parent == tmp_path / "cache" / "latency"
    assert not list(path.parent.glob(".*.tmp"))  # written through a temporary + rename
    # the fake is linear in MACs: the fit reproduces every probe
    assert table.fit["max_relative_error"] < 1e-6
    again, path2, measured2 = lt.latency_table(model, seq, key)
    assert not measured2 and path2 == path and fake_latency.calls == 6 and again.coef == table.coef
    other = dict(key, threads=1)  # another setting the milliseconds depend on: its own table
    _, path3, measured3 = lt.latency_table(model, seq, other)
    assert measured3 and path3 != path and fake_latency.calls == 12
    path.write_text("{ not json")  # a damaged cache file is measured again, not an error
    _, _, measured4 = lt.latency_table(model, seq, key)
    assert measured4 and fake_latency.calls == 18


def test_probe_widths_follow_the_rounding():
    seq = build_layer_sequence(make_model("resnet18"), X)
    probes = lt.probe_kept(seq, 8, 10)
    assert probes[0] == [g.units for g in seq.groups] and len(probes) == 10
    for kept in probes:
        for k, g in zip(kept, seq.groups):
            assert 1 <= k <= g.units and (k % 8 == 0 or k == g.units)


# ------------------------------------------------------------------ through prune and the CLI
def _args(out, *extra):
    return ["prune", "--model", "tf_efficientnet_lite0", "--pretrained", "bundled", "--dataset", "fashion-mnist",
            "--img-size", "32", "--train-subset", "64", "--val-subset", "32", "--flm-samples", "32",
            "--search-steps", "2", "--finetune-steps", "1", "--batch-size", "16", "--seed", "3", "--no-onnx",
            "--quiet", "--out", str(out), *extra]


def _main(argv, capsys):
    from pass_zoo.cli import main

    rc = main(argv)
    return rc, capsys.readouterr()


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("pass-zoo: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_params_budget_through_prune_with_a_baseline(tmp_path, capsys):
    out = tmp_path / "run"
    rc, cap = _main(_args(out, "--method", "l1", "--target-params", "0.5"), capsys)
    assert rc == 0, cap.err
    m = json.loads((out / "metrics.json").read_text())
    b = m["budget"]
    assert b["kind"] == "params" and b["target"] == 0.5 and m["target_macs"] is None
    assert 0.47 <= b["achieved"] <= 0.5 and b["slim"] == m["params_slim"] and b["dense"] == m["params_dense"]
    assert "target 50 %" in cap.out.splitlines()[2]  # the params line of the summary


def test_latency_budget_through_prune_with_pass(tmp_path, capsys, fake_latency):
    out = tmp_path / "run"
    model = make_model("tf_efficientnet_lite0")
    target = 0.6 * (0.1 + count_macs(model, X) / 1e7)  # 60 % of the fake dense latency
    rc, cap = _main(_args(out, "--target-latency", f"{target:.4f}"), capsys)
    assert rc == 0, cap.err
    b = json.loads((out / "metrics.json").read_text())["budget"]
    assert b["kind"] == "latency" and b["target"] == pytest.approx(target, abs=1e-4)
    assert b["predicted"] <= b["target"] * (1 + 1e-6) and b["predicted"] >= 0.95 * b["target"]
    # re-measured after slimming (the fake is exact, so measured == predicted up to the fit)
    assert b["achieved"] == pytest.approx(b["predicted"], rel=1e-3) and b["batch"] == 1 and b["threads"] == 2
    calls = fake_latency.calls
    assert calls == lt.DEFAULT_PROBES + 1  # probes + the slim network
    rc, cap = _main(_args(tmp_path / "again", "--target-latency", f"{target:.4f}"), capsys)
    assert rc == 0 and fake_latency.calls == calls + 1  # the table came from the cache: only the re-measurement


@pytest.mark.parametrize("extra, expect", [
    (["--target-params", "0.0001"], "--target-params 0.0001 cannot be met"),
    (["--target-latency", "0.001"], "--target-latency 0.001 ms cannot be met"),
    (["--target-macs", "0.5", "--target-params", "0.4"], "one budget per run: --target-macs 0.5 and --target-params 0.4"),
    (["--target-params", "0.4", "--target-latency", "3"], "one budget per run"),
    (["--target-params", "1.5"], "--target-params must be in (0, 1], got 1.5"),
    (["--target-latency", "-2"], "--target-latency must be a positive number of milliseconds"),
    (["--target-latency", "2", "--latency-threads", "0"], "--latency-threads must be at least 1"),
])
def test_bad_budgets_are_one_line_before_stage_1(extra, expect, tmp_path, capsys, fake_latency):
    out = tmp_path / "run"
    rc, cap = _main(_args(out, *extra), capsys)
    assert rc != 0 and expect in _one_line(cap.err)
    assert not out.exists()  # refused before anything was written
    assert fake_latency.calls <= lt.DEFAULT_PROBES  # at most the table; never a search or a re-measurement


def test_a_typed_budget_replaces_the_recipes(tmp_path, capsys):
    from pass_zoo.cli import build_parser
    from pass_zoo.cli import explicit_prune_flags
    from pass_zoo.config import PruneConfig, from_args

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: resnet18\ntarget_macs: 0.3\n")
    argv = ["prune", "--recipe", str(recipe), "--target-params", "0.4"]
    args = build_parser().parse_args(argv)
    given = explicit_prune_flags(argv)
    assert "target_params" in given and "target_macs" not in given
    base = PruneConfig(target_macs=0.3)
    base.clear_budget()
    cfg = from_args(args, base, given)
    cfg.validate()
    assert (cfg.budget_kind(), cfg.target_macs, cfg.target_params) == ("params", None, 0.4)
    assert cfg.default_out().endswith("-params40")


def test_no_budget_means_half_the_macs():
    from pass_zoo.config import PruneConfig

    cfg = PruneConfig()
    cfg.validate()
    assert (cfg.budget_kind(), cfg.target_macs) == ("macs", 0.5) and cfg.budget_label() == "50 % of the dense MACs"


def test_latency_is_timed_in_its_own_process_and_auto_rounds_to_a_whole_block(tmp_path):
    """Timings run in a child process on one shared, spinning pool, leaving this process's ONNX
    Runtime alone; in-process sessions (graphs, profiles) sleep when idle. ``--round-to auto`` keeps
    whole NCHWc blocks and at least 16 channels."""
    import onnxruntime as ort

    from pass_zoo.config import _round_to
    from pass_zoo.errors import PassZooError
    from pass_zoo.export.onnx import export_graph

    path = tmp_path / "m.onnx"
    export_graph(make_model("resnet18"), path, 32)
    times, pool = latency_mod.time_onnx({"a": path, "b": path}, 32, [1, 3], threads=2, repeats=4, warmup=1)
    assert sorted(times) == [1, 3] and all(sorted(t) == ["a", "b"] for t in times.values())
    assert all(len(v) == 4 and min(v) > 0 for t in times.values() for v in t.values())
    assert pool in ("shared, spinning", "per session, sleeping")
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # per-session pool: still allowed
    assert plain.run(None, {"input": np.zeros((1, 3, 32, 32), np.float32)})[0].shape == (1, 10)
    session = latency_mod.latency_session(path, 2)
    options = session.get_session_options()
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert options.get_session_config_entry(key) == "0"
    assert options.intra_op_num_threads == 2
    with pytest.raises(PassZooError, match="timing with ONNX Runtime failed: .*missing.onnx"):
        latency_mod.time_onnx({"a": tmp_path / "missing.onnx"}, 32, [1], threads=1, repeats=1, warmup=0)
    auto, block = _round_to("auto"), latency_mod.nchwc_block_size()
    assert auto >= 16 and (block == 0 or auto % block == 0)
