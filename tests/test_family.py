"""A family from one search: a run searched over a range of budgets gives masks for any budget in it
(``pass-zoo masks``), and refuses the ones it cannot give in one line."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from test_cli import _one_error_line, _run, _tiny_args


@pytest.fixture(scope="module")
def family_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("family")
    rc, _, stderr = _run(_tiny_args(tmp, "--search-budget-range", "0.3,0.8", "--target-macs", "0.5",
                                    "--search-steps", "6", "--head", "new", "--no-onnx"))
    assert rc == 0, stderr
    return tmp / "run"


def test_masks_for_any_budget_of_the_searched_range(family_run, tmp_path):
    assert (family_run / "search_state.safetensors").is_file()
    assert json.loads((family_run / "hypernet.json").read_text())["budget_range"] == [0.3, 0.8]
    # the member at the run's own budget is the run's masks: the rebuild reads what the search read
    rc, out, stderr = _run(["masks", str(family_run), "--target-macs", "0.5", "--out", str(tmp_path / "m50")])
    assert rc == 0, stderr
    same = load_file(str(tmp_path / "m50" / "masks.safetensors"))
    run = load_file(str(family_run / "masks.safetensors"))
    assert same.keys() == run.keys() and all((same[k] == run[k]).all() for k in run)
    # other budgets, one of them never a search step's own: each met, fewer channels for less
    kept = {}
    for target in ("0.3", "0.42", "0.8"):
        rc, out, stderr = _run(["masks", str(family_run), "--target-macs", target, "--out", str(tmp_path / target)])
        assert rc == 0, stderr
        summary = json.loads((tmp_path / target / "masks.json").read_text())
        assert summary["macs_ratio"] <= float(target) and summary["source"]["target"] == float(target)
        assert f"(--target-macs {target})" in out
        kept[target] = sum(g["kept"] for g in summary["groups"])
    assert kept["0.3"] < kept["0.42"] < kept["0.8"]


@pytest.mark.parametrize("args,expected", [
    (["--target-macs", "0.2"], "outside the range this hypernetwork was searched over (0.3 to 0.8)"),
    (["--target-params", "0.5"], "searched over --target-macs budgets; give --target-macs (not --target-params)"),
])
def test_a_budget_the_family_cannot_give_is_refused(family_run, tmp_path, args, expected):
    rc, _, stderr = _run(["masks", str(family_run), *args, "--out", str(tmp_path / "m")])
    assert rc != 0 and expected in _one_error_line(stderr)
    assert not (tmp_path / "m").exists()


def test_masks_never_replace_the_run_or_other_files(family_run, tmp_path):
    rc, _, stderr = _run(["masks", str(family_run), "--target-macs", "0.5", "--out", str(family_run)])
    assert rc != 0 and "is the run folder itself" in _one_error_line(stderr)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    rc, _, stderr = _run(["masks", str(family_run), "--target-macs", "0.5", "--out", str(tmp_path / "busy")])
    assert rc != 0 and "holds other files (notes.txt)" in _one_error_line(stderr)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    out = tmp_path / "m"
    assert _run(["masks", str(family_run), "--target-macs", "0.5", "--out", str(out)])[0] == 0
    rc, _, stderr = _run(["masks", str(family_run), "--target-macs", "0.4", "--out", str(out)])
    assert rc != 0 and "already holds masks; add --overwrite" in _one_error_line(stderr)
    assert _run(["masks", str(family_run), "--target-macs", "0.4", "--out", str(out), "--overwrite"])[0] == 0
    assert json.loads((out / "masks.json").read_text())["source"]["target"] == 0.4


def test_a_single_budget_run_has_no_family(tmp_path):
    rc, _, stderr = _run(_tiny_args(tmp_path, "--no-onnx"))
    assert rc == 0, stderr
    rc, _, stderr = _run(["masks", str(tmp_path / "run"), "--target-macs", "0.4", "--out", str(tmp_path / "m")])
    assert rc != 0 and "was searched for a single budget" in _one_error_line(stderr)
    rc, _, stderr = _run(["masks", str(tmp_path / "nowhere"), "--target-macs", "0.4", "--out", str(tmp_path / "m")])
    assert rc != 0 and "is not a finished prune run" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--search-budget-range", "0.6,0.3", "--overwrite"))
    assert rc != 0 and "search.budget_range must be [lowest, highest]" in _one_error_line(stderr)


@pytest.fixture(scope="module")
def family_of_three(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("three")
    rc, out, stderr = _run(_tiny_args(tmp, "--target-macs", "0.6", "0.4", "0.25", "--search-steps", "6",
                                      "--head", "new"))
    assert rc == 0, stderr
    return tmp / "run", out


def test_one_search_gives_a_complete_run_per_budget(family_of_three):
    import timm
    import torch

    import pass_zoo  # noqa: F401  (registers the pass_pruned architecture with timm)

    root, out = family_of_three
    family = json.loads((root / "family.json").read_text())
    assert [m["folder"] for m in family["members"]] == ["macs60", "macs40", "macs25"]
    assert family["search_run"] == "macs60" and family["stage1_batches"] == 6  # one search for all three
    for member, target in zip(family["members"], (0.6, 0.4, 0.25)):
        run = root / member["folder"]
        m = json.loads((run / "metrics.json").read_text())
        assert m["macs_ratio"] <= target and member["top1"] == m["top1"]
        assert f"{run}: top-1 " in out
        export = json.loads((run / "export.json").read_text())
        assert (run / "model.onnx").is_file() and export["max_abs_diff_random"] <= export["tolerance"]
        model = timm.create_model(f"local-dir:{run}", pretrained=True).eval()
        with torch.no_grad():
            assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        if target != 0.6:  # the other members read masks, prompt and head off the first's search
            assert m["compute"]["stage1_batches"] == 0 and m["family_search"] == str(root / "macs60")
    hypernet = json.loads((root / "macs60" / "hypernet.json").read_text())
    assert hypernet["budget_range"] == [0.25, 0.6]
    # masks for a new budget from any member: a member that searched nothing reads its family's search
    rc, _, stderr = _run(["masks", str(root / "macs25"), "--target-macs", "0.3", "--out", str(root.parent / "m30")])
    assert rc == 0, stderr
    assert json.loads((root.parent / "m30" / "masks.json").read_text())["source"]["run"] == str(root / "macs60")


def test_a_resumed_family_runs_only_the_members_left(family_of_three, tmp_path):
    import shutil

    root, _ = family_of_three
    copy = tmp_path / "run"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "macs25")  # stopped before its last member began
    kept = {name: (copy / name / "metrics.json").stat().st_mtime_ns for name in ("macs60", "macs40")}
    rc, _, stderr = _run(_tiny_args(tmp_path, "--target-macs", "0.6", "0.4", "0.25", "--search-steps", "6",
                                    "--head", "new", "--resume"))
    assert rc == 0, stderr
    assert {name: (copy / name / "metrics.json").stat().st_mtime_ns for name in kept} == kept
    again = load_file(str(copy / "macs25" / "masks.safetensors"))
    first = load_file(str(root / "macs25" / "masks.safetensors"))
    assert all((again[k] == first[k]).all() for k in first)


@pytest.mark.parametrize("targets,expected", [
    (["0.5", "0.6"], "--target-macs budgets of a family must be strictly decreasing, got 0.5 0.6"),
    (["0.5", "0.5"], "strictly decreasing"),
    (["0.5", "1.5"], "--target-macs budgets must be in (0, 1], got 0.5 1.5"),
    (["0.5", "0.0001"], "cannot be met"),
])
def test_bad_family_budgets_get_one_line(tmp_path, targets, expected):
    rc, _, stderr = _run(_tiny_args(tmp_path, "--target-macs", *targets))
    assert rc != 0 and expected in _one_error_line(stderr)
    assert not (tmp_path / "run").exists()


def test_a_family_of_mixed_kinds_or_a_method_without_one_is_refused(tmp_path):
    rc, _, stderr = _run(_tiny_args(tmp_path, "--target-macs", "0.5", "0.3", "--target-params", "0.4"))
    assert rc != 0 and "a family takes one kind of budget; --target-macs and --target-params" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--target-macs", "0.5", "0.3", "--method", "taylor"))
    assert rc != 0 and "'taylor' has no budget-conditioned search" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--search-budget-range", "0.2,0.6", "--method", "direct-logits"))
    assert rc != 0 and "--search-budget-range needs a method with a budget-conditioned search (pass), not " \
        "'direct-logits'" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--target-latency", "2", "-1"))
    assert rc != 0 and "--target-latency budgets must be positive milliseconds, got 2 -1" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--target-latency", "1", "2"))
    assert rc != 0 and "--target-latency budgets of a family must be strictly decreasing" in _one_error_line(stderr)
    rc, _, stderr = _run(_tiny_args(tmp_path, "--search-budget-range", "0.2,1.5"))
    assert rc != 0 and "search.budget_range of a --target-macs run is fractions of the dense cost, at most 1" \
        in _one_error_line(stderr)


def test_a_latency_family_from_one_search(tmp_path, monkeypatch):
    """Milliseconds by the run's latency table: the hypernetwork reads them as fractions of the dense network's."""
    import timm
    import torch

    from test_budgets import FakeMeasure

    from pass_zoo.export import latency as latency_mod
    from pass_zoo.graph.cost_model import count_macs

    fake = FakeMeasure()  # ms = 0.1 + MACs / 1e7: deterministic, no timing
    monkeypatch.setattr(latency_mod, "measure_model_ms", fake)
    monkeypatch.setenv("PASS_ZOO_CACHE", str(tmp_path / "cache"))
    dense = 0.1 + count_macs(timm.create_model("resnet10t", num_classes=10), torch.zeros(1, 3, 32, 32)) / 1e7
    high, low = round(0.7 * dense, 4), round(0.45 * dense, 4)
    rc, out, stderr = _run(_tiny_args(tmp_path, "--target-latency", str(high), str(low), "--search-steps", "4",
                                      "--head", "new", "--no-onnx"))
    assert rc == 0, stderr
    root = tmp_path / "run"
    family = json.loads((root / "family.json").read_text())
    assert family["budget"] == "latency"
    assert [m["folder"] for m in family["members"]] == [f"latency{high:g}ms", f"latency{low:g}ms"]
    for member, target in zip(family["members"], (high, low)):
        budget = json.loads((root / member["folder"] / "metrics.json").read_text())["budget"]
        assert budget["kind"] == "latency" and budget["target"] == pytest.approx(target)
        assert budget["predicted"] <= target * (1 + 1e-6) and budget["achieved"] == pytest.approx(budget["predicted"], rel=1e-3)
        assert f"{root / member['folder']}: top-1 " in out and f"ms measured (target {target:g})" in out
    lo, hi = json.loads((root / family["members"][0]["folder"] / "hypernet.json").read_text())["budget_range"]
    assert lo == pytest.approx(low / dense, rel=1e-3) and hi == pytest.approx(high / dense, rel=1e-3)
    # a budget between the two, and one outside the range, in milliseconds
    mid = round(0.55 * dense, 4)
    rc, _, stderr = _run(["masks", str(root / family["members"][1]["folder"]), "--target-latency", str(mid),
                          "--out", str(tmp_path / "mid")])
    assert rc == 0, stderr
    summary = json.loads((tmp_path / "mid" / "masks.json").read_text())
    assert summary["source"] == {"run": str(root / family["members"][0]["folder"]), "budget": "latency", "target": mid}
    assert 0.1 + summary["macs_slim"] / 1e7 <= mid * (1 + 1e-3)  # the fake's milliseconds of the mid masks
    assert 0.1 + summary["macs_slim"] / 1e7 >= 0.85 * mid
    rc, _, stderr = _run(["masks", str(root / family["members"][0]["folder"]), "--target-latency",
                          str(round(0.3 * dense, 4)), "--out", str(tmp_path / "low")])
    assert rc != 0 and "outside the range this hypernetwork was searched over" in _one_error_line(stderr)


def test_pareto_of_a_family_with_a_baseline(family_of_three, tmp_path):
    root, _ = family_of_three
    rc, _, stderr = _run(_tiny_args(tmp_path, "--method", "random", "--target-macs", "0.4", "--head", "new"))
    assert rc == 0, stderr
    rc, out, stderr = _run(["pareto", str(root), "--baseline", str(tmp_path / "run"), "--batches", "1", "2",
                            "--threads", "1", "--repeats", "1", "--warmup", "0"])
    assert rc == 0, stderr
    doc = json.loads((root / "pareto.json").read_text())
    assert [p["run"] for p in doc["points"] if p["kind"] == "member"] == ["macs60", "macs40", "macs25"]
    assert [p["method"] for p in doc["points"] if p["kind"] == "baseline"] == ["random"]
    for p in doc["points"]:
        assert set(p["latency_ms"]) == {"1", "2"} and all(v > 0 for v in p["latency_ms"].values())
        assert 0 < p["macs_ratio"] <= 0.6 and 0 <= p["top1"] <= 1
    assert set(doc["dense"]["latency_ms"]) == {"1", "2"}
    assert (root / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "macs25: top-1 " in out
    rc, _, stderr = _run(["pareto", str(tmp_path / "run")])
    assert rc != 0 and "is not a family folder (no readable family.json)" in _one_error_line(stderr)


def test_each_member_card_shows_its_family(family_of_three):
    from pass_zoo.publish.card import render_card

    root, _ = family_of_three
    card = render_card(root / "macs40")
    assert "### Family" in card and "One budget-conditioned search (`macs60`) gave 3 models" in card
    assert "| **macs40** (this model) |" in card and "| macs60 |" in card and "| macs25 |" in card
    top1 = json.loads((root / "macs25" / "metrics.json").read_text())["top1"]
    assert f"{100 * top1:.2f} % |" in card


def test_publish_sends_each_member_to_its_own_repo(family_of_three):
    root, _ = family_of_three
    rc, out, stderr = _run(["publish", str(root), "--repo-id", "org/lite-fam", "--dry-run"])
    assert rc == 0, stderr
    for member in ("macs60", "macs40", "macs25"):
        assert f"dry run: would upload to org/lite-fam-{member}@main" in out
    assert out.count("model.onnx") >= 3


def test_zoo_build_of_a_family_recipe(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "fam.yaml").write_text(
        "name: tiny-fam\nhub_id: org/tiny-fam\nmodel: resnet10t\npretrained: none\ndataset: fashion-mnist\n"
        "target_macs: [0.6, 0.3]\nimg_size: 32\ntrain_subset: 16\nval_subset: 8\nbatch_size: 8\nhead: new\n"
        "search: {steps: 4}\nfinetune: {steps: 1}\n")
    rc, out, stderr = _run(["zoo", "build", "tiny-fam", "--recipes-dir", str(recipes), "--runs-dir",
                            str(tmp_path / "runs")])
    assert rc == 0, stderr
    for member in ("macs60", "macs30"):
        card = (tmp_path / "runs" / "tiny-fam" / member / "README.md").read_text()
        assert "### Family" in card and f"org/tiny-fam-{member}" in card
        assert f"{tmp_path / 'runs' / 'tiny-fam' / member}: top-1 " in out
    (recipes / "bad.yaml").write_text("name: bad\ntarget_macs: [0.6, 'x']\n")
    rc, _, stderr = _run(["zoo", "build", "bad", "--recipes-dir", str(recipes), "--runs-dir", str(tmp_path / "r2")])
    assert rc != 0 and "'target_macs' must be a number or a list of numbers" in _one_error_line(stderr)
