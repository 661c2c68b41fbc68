"""The benchmark harness on a tiny grid: schema, budgets, resume, plots (not accuracy numbers)."""
import json

import pytest
import yaml

from pass_zoo.tools import bench as bench_mod
from pass_zoo.cli import main
from pass_zoo.errors import PassZooError

SPEC = {
    "name": "tiny",
    "base": {"model": "mobilenetv3_small_050", "pretrained": "none", "head": "new", "img_size": 32,
             "train_subset": 64, "val_subset": 32, "batch_size": 16, "onnx": False,
             "search": {"steps": 1}, "finetune": {"steps": 1}},
    "grid": {"method": ["pass", "random"], "target_macs": [0.5, 0.3], "seed": [0]},
    "variants": {"pass-mlp": {"method": "pass", "search": {"core": "mlp"}}},
    "dense": True,
}


@pytest.fixture
def spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(SPEC))
    return path


def test_plan_covers_the_grid_variants_and_dense(spec_file):
    cells = bench_mod.plan_cells(bench_mod.load_spec(spec_file))
    ids = [c["id"] for c in cells]
    assert len(ids) == len(set(ids)) == 3 * 2 + 1
    assert "pass-mlp-t0.3-s0" in ids and "dense-s0" in ids
    mlp = next(c for c in cells if c["id"] == "pass-mlp-t0.5-s0")["config"]
    assert mlp.method == "pass" and mlp.search.core == "mlp" and mlp.search.steps == 1
    dense = next(c for c in cells if c["id"] == "dense-s0")["config"]
    # the fair stage 1: the ceiling's head and prompt learn as long as every method's
    assert dense.target_macs == 1.0 and dense.search.steps == cells[0]["config"].search.steps > 0
    legacy = dict(SPEC, base=dict(SPEC["base"], search={"steps": 1, "probe": "dense"}))  # B2's older rule
    legacy_dense = next(c for c in bench_mod.plan_cells(legacy) if c["id"] == "dense-s0")["config"]
    assert legacy_dense.search.steps == 0


def test_unknown_keys_are_refused(tmp_path):
    bad = dict(SPEC, base={"modle": "resnet18"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(PassZooError, match="modle"):
        bench_mod.plan_cells(bench_mod.load_spec(path))
    bad = dict(SPEC, variants={"x": {"search": {"coer": "mlp"}}})
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(PassZooError, match="coer"):
        bench_mod.plan_cells(bench_mod.load_spec(path))


def test_grid_runs_writes_results_and_plots_then_resumes(spec_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "res"
    assert main(["bench", str(spec_file), "--out", str(out), "--only", "pass-t", "random-t0.5", "dense"]) == 0
    doc = json.loads((out / "results.json").read_text())
    ids = sorted(r["id"] for r in doc["runs"])
    assert ids == ["dense-s0", "pass-t0.3-s0", "pass-t0.5-s0", "random-t0.5-s0"]
    for r in doc["runs"]:
        assert set(bench_mod._RECORD_KEYS) <= set(r)
        assert (out / r["run_dir"] / "metrics.json").is_file()
        assert r["macs_slim"] <= r["target_macs"] * r["macs_dense"] + 1e-9
        assert 0.0 <= r["top1"] <= 1.0
    dense = next(r for r in doc["runs"] if r["id"] == "dense-s0")
    assert dense["macs_slim"] == dense["macs_dense"]
    assert {s["label"] for s in doc["summary"]} == {"pass", "random", "dense"}
    for png in ("accuracy_vs_macs.png", "kept_channels.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert "| pass |" in table and "50 % MACs" in table
    # PASS against the best other method per level, with the signed gap over the seeds both have
    rows = {r["label"]: r for r in doc["summary"] if r["target_macs"] == 0.5}
    gap = 100 * (rows["pass"]["top1_mean"] - rows["random"]["top1_mean"])
    assert f"| 50 % | {100 * rows['pass']['top1_mean']:.2f} | random" in table and f"| {gap:+.2f} | 1 | - |" in table
    assert (out / "results.md").read_text() == table

    # Resume: finished cells are never rerun; a cell finished but not collected is picked up.
    calls = []
    real_prune = __import__("pass_zoo.pipeline", fromlist=["prune"]).prune

    def counting_prune(cfg, **kw):
        calls.append(cfg.out)
        return real_prune(cfg, **kw)

    monkeypatch.setattr("pass_zoo.pipeline.prune", counting_prune)
    doc2 = bench_mod.run_bench(spec_file, out, only=["pass-t", "random-t0.5", "dense"], log=lambda m: None)
    assert calls == []
    assert len(doc2["runs"]) == 4
    doc2 = bench_mod.run_bench(spec_file, out, only=["random-t0.3"], log=lambda m: None)
    assert [c.endswith("random-t0.3-s0") for c in calls] == [True]
    assert len(doc2["runs"]) == 5

    # --rerun: a finished cell runs again (after a code change); the dry run only lists it
    logged = []
    bench_mod.run_bench(spec_file, out, only=["pass-t", "random"], rerun=["pass-t0.5"], dry_run=True, log=logged.append)
    assert len(calls) == 1 and any("would run pass-t0.5-s0" in m for m in logged)
    assert (out / "cells" / "pass-t0.5-s0" / "metrics.json").is_file()
    (out / "cells" / "pass-t0.5-s0" / "stale.txt").write_text("from the earlier run")
    doc3 = bench_mod.run_bench(spec_file, out, only=["pass-t", "random"], rerun=["pass-t0.5"], log=lambda m: None)
    assert [c.endswith("pass-t0.5-s0") for c in calls[1:]] == [True]
    assert sorted(r["id"] for r in doc3["runs"]) == sorted(r["id"] for r in doc2["runs"])
    assert not (out / "cells" / "pass-t0.5-s0" / "stale.txt").exists()
    assert json.loads((out / "results.json").read_text())["runs"] == doc3["runs"]
    bench_mod.run_bench(spec_file, out, log=lambda m: None, only=["pass-t", "random"])  # resumes: nothing to run
    assert len(calls) == 2
    with pytest.raises(PassZooError, match="matches no cell"):
        bench_mod.run_bench(spec_file, out, rerun=["taylor"], log=lambda m: None)


def test_gap_table_pairs_seeds_and_skips_other_variants_of_the_method():
    def run(label, t, seed, top1):
        return {"label": label, "target_macs": t, "seed": seed, "top1": top1}

    doc = {"runs": [run("pass", 0.25, 0, 0.80), run("pass", 0.25, 1, 0.82), run("pass", 0.25, 2, 0.90),
                    run("taylor", 0.25, 0, 0.78), run("taylor", 0.25, 1, 0.77),  # seed 2 not run yet
                    run("random", 0.25, 0, 0.70), run("random", 0.25, 1, 0.71), run("random", 0.25, 2, 0.72),
                    run("pass-no-prior", 0.25, 0, 0.95), run("dense", 1.0, 0, 0.99)]}
    lines = bench_mod.gap_table(doc, "pass").splitlines()
    assert len(lines) == 3  # header, rule, one level
    # taylor is the best baseline on seeds 0-1; pass is averaged over the same two seeds, not three
    # gap per seed: +2 and +5 points; their std is 2.12
    # paired 95 % t interval, 1 degree of freedom: 3.50 +- 12.706 x 2.12 / sqrt(2)
    assert lines[2] == "| 25 % | 81.00 | taylor 77.50 | +3.50 | 2 | 2.12 | [-15.56, +22.56] |"
    versus = bench_mod.gap_table(doc, "pass", against="random").splitlines()
    # three shared seeds: gaps +10, +11, +18 points, mean 13, std 4.36, t(2) = 4.303
    assert versus[0].startswith("| MACs | pass | random |")
    assert versus[2] == "| 25 % | 84.00 | random 71.00 | +13.00 | 3 | 4.36 | [+2.17, +23.83] |"
    assert bench_mod.paired_interval([0.01]) is None


def test_parallel_jobs_collect_every_cell_with_the_serial_masks(spec_file, tmp_path):
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    only = ["random-t0.5", "random-t0.3"]
    bench_mod.run_bench(spec_file, serial, only=only, log=lambda m: None)
    doc = bench_mod.run_bench(spec_file, parallel, only=only, jobs=2, threads=1, log=lambda m: None)
    assert sorted(r["id"] for r in doc["runs"]) == ["random-t0.3-s0", "random-t0.5-s0"]
    on_disk = json.loads((parallel / "results.json").read_text())
    assert sorted(r["id"] for r in on_disk["runs"]) == ["random-t0.3-s0", "random-t0.5-s0"]
    for cell in ("random-t0.3-s0", "random-t0.5-s0"):  # the same seeded masks from a worker process
        a = json.loads((serial / "cells" / cell / "masks.json").read_text())["groups"]
        b = json.loads((parallel / "cells" / cell / "masks.json").read_text())["groups"]
        assert [g["kept"] for g in a] == [g["kept"] for g in b]


def test_a_failing_cell_does_not_stop_the_grid(spec_file, tmp_path, monkeypatch, capsys):
    """One cell raising: the other cells are still run and collected, and the grid ends in one line."""
    real = bench_mod._run_cell

    def flaky(cfg, command):
        if cfg.method == "random" and cfg.target_macs == 0.5:
            raise RuntimeError("boom\nsecond line")
        return real(cfg, command)

    monkeypatch.setattr(bench_mod, "_run_cell", flaky)
    out = tmp_path / "res"
    assert main(["bench", str(spec_file), "--out", str(out), "--only", "random", "pass-t0.5"]) == 2
    err = capsys.readouterr().err
    assert "failed random-t0.5-s0: RuntimeError: boom" in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("pass-zoo: error: 1 cell(s) failed (random-t0.5-s0)")
    ids = sorted(r["id"] for r in json.loads((out / "results.json").read_text())["runs"])
    assert ids == ["pass-t0.5-s0", "random-t0.3-s0"]


def test_a_search_only_setting_does_not_rerun_a_baseline_cell(tmp_path):
    spec = {"base": {"model": "resnet10t", "pretrained": "none", "search": {"steps": 1}},
            "grid": {"method": ["random", "pass"], "seed": [0], "target_macs": [0.5]}}
    cells = {c["label"]: c for c in bench_mod.plan_cells(spec)}
    for cell in cells.values():  # a finished run that recorded today's settings, then one changed
        config = bench_mod.resolved_config(cell["config"])
        config["search"]["recoveries"] = 2
        folder = tmp_path / "cells" / cell["id"]
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"config": config}))
    assert bench_mod.cell_changes(cells["random"], tmp_path) == ""  # the criteria never read it
    assert bench_mod.cell_changes(cells["pass"], tmp_path) == "search.recoveries 2 (now 0)"
    config = bench_mod.resolved_config(cells["random"]["config"])
    config["search"]["steps"] = 2  # what its own stage 1 reads still reruns it
    (tmp_path / "cells" / cells["random"]["id"] / "metrics.json").write_text(json.dumps({"config": config}))
    assert bench_mod.cell_changes(cells["random"], tmp_path) == "search.steps 2 (now 1)"


def test_the_settings_a_criterion_ignores_leave_its_masks_alone(tmp_path):
    from safetensors.torch import load_file
    from test_robust import _run, _tiny

    from pass_zoo.methods import get_method

    ignored = set(get_method("taylor").ignored_search_settings)
    flags = {"recoveries": ["--search-recoveries", "3"], "max_churn": ["--max-mask-churn", "0.3"],
             "use_prior": ["--no-prior"], "prototypes": ["--search-prototypes", "0"], "distill": ["--distill", "1"],
             "hidden": ["--hidden-size", "16"], "budget_warmup": ["--budget-warmup", "0.9"]}
    assert set(flags) <= ignored
    masks = []
    for i, extra in enumerate([[], [a for f in flags.values() for a in f]]):
        rc, _, err = _run(_tiny(tmp_path / f"r{i}", "--method", "taylor", "--target-macs", "0.5", *extra))
        assert rc == 0, err[-2000:]
        masks.append(load_file(str(tmp_path / f"r{i}" / "masks.safetensors")))
    assert masks[0].keys() == masks[1].keys() and len(masks[0]) > 3
    assert all(bool((masks[0][k] == masks[1][k]).all()) for k in masks[0])
    assert any(not bool(m.all()) for m in masks[0].values())  # it did prune
