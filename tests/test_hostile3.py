"""Hostile input, third round, through the real CLI: folders --overwrite may not replace, outputs that
would replace inputs, names that become paths or code, edited run files, budgets a transfer must keep,
changed bench specs and resume inputs, and values of the wrong sign or type. Each case is one
``pass-zoo: error:`` line with exit code 2 (or the right result) and nothing outside ``--out`` changes.
docs/robustness.md lists the cases.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import ROOT, write_image_folder
from test_robust import _error, _run, _tiny

from pass_zoo.graph.masks import select_units, to_channel_masks
from pass_zoo.methods import Method, MethodResult, register_method
from pass_zoo.fileio import LOCK_FILE, RUN_MARKER


def _tree(folder: Path) -> dict:
    """``{relative path: sha256}`` of every file under ``folder`` (what must not change)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _pins(run: Path, **changes) -> None:
    """Rewrite a run's pins after a test edits its files on purpose (a run that wrote them so)."""
    from pass_zoo.integrity import pin_files

    m = json.loads((run / "metrics.json").read_text())
    m["file_sha256"] = pin_files(run, ("hypernet.json", "hypernet.safetensors"))
    m.update(changes)
    (run / "metrics.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One tiny finished PASS run with its verified model.onnx (copied per test)."""
    out = tmp_path_factory.mktemp("hostile3") / "run"
    rc, _, err = _run([a for a in _tiny(out, steps=1) if a != "--no-onnx"])
    assert rc == 0, err[-2000:]
    return out


@pytest.fixture
def run(finished, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished, dst)
    return dst


# ------------------------------------------------------------------ --overwrite replaces run folders only
def test_overwrite_refuses_a_folder_no_run_wrote(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('hello')\n")
    (project / "notes.txt").write_text("keep me\n")
    before = _tree(project)
    line = _error(_tiny(project, "--overwrite"))
    assert line == (f"pass-zoo: error: --overwrite: {project} is not a pass-zoo run folder (it holds files no run "
                    "wrote); --overwrite only replaces run folders, so remove it yourself or choose another --out")
    monkeypatch.chdir(project)
    assert "is not a pass-zoo run folder" in _error(_tiny(".", "--overwrite"))
    assert _tree(project) == before and not (project / LOCK_FILE).exists() and not (project / RUN_MARKER).exists()


def test_overwrite_replaces_a_run_and_a_run_from_before_the_marker(run, tmp_path):
    assert (run / RUN_MARKER).is_file()
    legacy = tmp_path / "legacy"
    shutil.copytree(run, legacy)
    (legacy / RUN_MARKER).unlink()  # written before runs were marked: recognised by its files
    rc, _, err = _run(_tiny(legacy, "--overwrite", steps=1))
    assert rc == 0, err[-2000:]
    assert (legacy / RUN_MARKER).is_file() and (legacy / "metrics.json").is_file()
    (legacy / RUN_MARKER).unlink()
    (legacy / "thesis.tex").write_text("not a run's file")  # an unmarked folder with anything else is not a run
    assert "is not a pass-zoo run folder" in _error(_tiny(legacy, "--overwrite"))
    assert (legacy / "thesis.tex").read_text() == "not a run's file"


# ------------------------------------------------------------------ an output is never an input
def _source_inputs(tmp_path: Path, run: Path) -> dict:
    data = write_image_folder(tmp_path / "data", ["ant", "bee"])
    weights = tmp_path / "weights" / "w.safetensors"
    weights.parent.mkdir()
    import timm

    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(weights))
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text("model: resnet10t\npretrained: none\nhead: new\nimg_size: 32\n")
    return {"data": data, "weights": weights, "recipe": recipe, "run": run}


@pytest.mark.parametrize("case", ["transfer-same", "transfer-inside", "pretrained", "dataset", "dataset-inside",
                                  "recipe"])
def test_out_may_not_hold_or_lie_inside_an_input(case, run, tmp_path):
    i = _source_inputs(tmp_path, run)
    argv = {
        "transfer-same": ["transfer", run, "--mode", "masks", "--dataset", "fashion-mnist", "--out", run, "--overwrite"],
        "transfer-inside": ["transfer", run, "--mode", "masks", "--dataset", "fashion-mnist", "--out", run / "b"],
        "pretrained": _tiny(i["weights"].parent, "--overwrite", "--pretrained", i["weights"]),
        "dataset": _tiny(i["data"], "--overwrite", dataset=f"imagefolder:{i['data']}"),
        "dataset-inside": _tiny(i["data"] / "train" / "new", dataset=f"imagefolder:{i['data']}"),
        "recipe": ["prune", "--recipe", i["recipe"], "--out", i["recipe"].parent, "--overwrite"],
    }[case]
    before = _tree(tmp_path)
    line = _error(argv)
    assert "the input" in line and "choose an --out outside every input" in line, line
    assert _tree(tmp_path) == before  # nothing deleted, nothing added (no lock, no marker, no folder)


@pytest.mark.parametrize("argv,expected", [
    (["eval", "{run}", "--json", "{run}/config.json"], "would replace config.json of the run folder"),
    (["latency", "{run}", "--json", "{run}/metrics.json"], "would replace metrics.json of the run folder"),
    (["eval", "{run}/model.onnx", "--json", "{run}/model.onnx"], "would overwrite the input"),
    (["eval", "{run}", "--json", "{run}"], "is a folder; name a file"),
    (["check", "--model", "resnet10t", "--md", "{run}/README.md"], "would replace README.md of the run folder"),
])
def test_json_and_md_outputs_never_replace_a_run_file(argv, expected, run):
    before = _tree(run)
    line = _error([a.format(run=run) for a in argv])
    assert expected in line, line
    assert _tree(run) == before


# ------------------------------------------------------------------ names that become paths or code
def test_bench_cell_names_cannot_leave_out(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("x")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"base": {"model": "resnet10t", "pretrained": "none"}, "grid": {"method": []},
                                    "variants": {"../../../victim": {"method": "random"}}}))
    out = tmp_path / "a" / "b" / "out"
    line = _error(["bench", spec, "--out", out])
    assert "method or variant label '../../../victim' is not a valid name" in line
    assert (victim / "precious.txt").read_text() == "x" and not (tmp_path / "a").exists()
    spec.write_text(yaml.safe_dump({"grid": {"method": ["random"], "seed": ["../x"]}}))
    assert "grid: seed must be a whole number" in _error(["bench", spec, "--out", out])


def test_repo_ids_and_revisions_are_validated(run):
    bad = 'a/b"); import os; os.system("touch pwned"); ("'
    assert "--repo-id" in _error(["card", run, "--repo-id", bad]) and not (run / "README.md").exists()
    assert "--repo-id" in _error(["publish", run, "--repo-id", bad, "--dry-run"])
    line = _error(["publish", run, "--repo-id", "org/name", "--dry-run", "--revision", "../../x"])
    assert "--revision '../../x' is not a valid branch name" in line
    (run / "hub.json").write_text(json.dumps({"repo_id": "org/x\"); evil(\""}))  # a hand-edited record
    assert "the card's repo id" in _error(["card", run]) and not (run / "README.md").exists()


def test_recipe_hub_id_and_alias_bomb(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text('model: resnet10t\nhub_id: "org/x\\"); evil(\\""\n')
    assert "hub_id" in _error(["prune", "--recipe", recipe, "--out", tmp_path / "o"])
    layers = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
        f"*a{i - 1}, *a{i - 1}]" for i in range(1, 8)]  # 10**8 values once expanded
    bomb = "model: resnet10t\nmodel_kwargs:\n" + "".join(f"  {line}\n" for line in layers)
    recipe.write_text(bomb)
    code = textwrap.dedent(f"""
        import sys
        from pass_zoo.cli import main
        sys.exit(main(["prune", "--recipe", {str(recipe)!r}, "--out", {str(tmp_path / 'o')!r}]))
    """)
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().endswith("expands to more than 100000 values (YAML aliases repeat what they point to); "
                                        "write the values out or remove the aliases")
    spec = tmp_path / "spec.yaml"
    spec.write_text(bomb.replace("model: resnet10t\nmodel_kwargs:", "grid: {}\nbase:"))
    assert "expands to more than 100000 values" in _error(["bench", spec, "--out", tmp_path / "b"])
    assert not (tmp_path / "o").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------ run integrity
def test_an_edited_config_is_refused_everywhere(run, tmp_path):
    config = json.loads((run / "config.json").read_text())
    config["model_args"]["spec"]["format"] = "pass-zoo-slim/2"
    config["model_args"]["spec"].update(model_kwargs={"act_layer": "sigmoid"}, fixups=[])
    (run / "config.json").write_text(json.dumps(config))
    before = _tree(run)
    expected = f"{run / 'config.json'} is not the file the run wrote"
    for argv in (["eval", run], ["eval", f"local-dir:{run}"], ["eval", run / "model.onnx"],
                 ["publish", run, "--repo-id", "org/name", "--dry-run"], ["card", run], ["export", run],
                 ["latency", run, "--batch", "1", "--repeats", "1"]):
        line = _error(argv)
        assert expected in line, (argv, line)
    assert _tree(run) == before


def test_export_pins_what_it_rewrites(run):
    """``export --exporter dynamo`` leaves no weights file beside its temporary ONNX (and removes a stale
    one), records the opset it wrote, and re-pins model.onnx and export.json: eval accepts the run."""
    stale = run / ".model.onnx.k1ll3d.tmp.data"
    stale.write_bytes(b"\0" * 100)
    rc, out, err = _run(["export", run, "--exporter", "dynamo"])
    assert rc == 0, err[-2000:]
    assert not [p.name for p in run.iterdir() if ".tmp" in p.name]
    export = json.loads((run / "export.json").read_text())
    from pass_zoo.export.onnx import file_opset

    assert export["exporter"] == "dynamo" and export["opset"] == file_opset(run / "model.onnx") == 18
    assert "(opset 18, dynamo exporter)" in out
    rc, _, err = _run(["eval", run])
    assert rc == 0, err[-2000:]
    (run / "model.onnx").unlink()  # a pinned file gone: eval refuses, export writes it again
    assert f"{run / 'model.onnx'} is missing" in _error(["eval", run])
    assert _run(["export", run])[0] == 0 and _run(["eval", run])[0] == 0


@pytest.mark.parametrize("argv,expected", [
    (["latency", "{run}", "--opset", "5"], "--opset must be in [17, 23], got 5"),
    (["latency", "{run}", "--opset", "99"], "--opset must be in [17, 23], got 99"),
    (["export", "{run}", "--opset", "99"], "--opset must be in [17, 23], got 99"),
    (["export", "{run}", "--opset", "21", "--exporter", "torchscript"],
     "--opset must be in [17, 20] with --exporter torchscript, got 21"),
])
def test_opsets_out_of_range(argv, expected, run):
    before = _tree(run)
    assert _error([a.format(run=run) for a in argv]) == f"pass-zoo: error: {expected}"
    assert _tree(run) == before


# ------------------------------------------------------------------ transfer keeps a budget
def test_transfer_enforces_the_budget(run, tmp_path):
    masks = load_file(str(run / "masks.safetensors"))
    save_file({k: torch.ones_like(v) for k, v in masks.items()}, str(run / "masks.safetensors"))
    line = _error(["transfer", run, "--mode", "masks", "--dataset", "sklearn-digits", "--out", tmp_path / "b"])
    assert f"{run / 'masks.safetensors'} is not the file the run wrote" in line  # caught by its pins first
    _pins(run)  # a source whose masks really keep every channel
    line = _error(["transfer", run, "--mode", "masks", "--dataset", "sklearn-digits", "--out", tmp_path / "b"])
    assert f"the masks of {run} cost 1 of the dense MACs, over this run's budget --target-macs 0.5" in line
    save_file(masks, str(run / "masks.safetensors"))
    _pins(run)  # the real 50 % masks, under a recipe that asks for 20 %
    recipe = tmp_path / "t.yaml"
    recipe.write_text(yaml.safe_dump({"model": "resnet10t", "pretrained": "none", "head": "new", "img_size": 32,
                                      "dataset": "sklearn-digits", "train_subset": 16, "val_subset": 8, "batch_size": 8,
                                      "onnx": False, "transfer_from": str(run), "transfer_mode": "masks",
                                      "target_macs": 0.2, "finetune": {"steps": 1}}))
    line = _error(["prune", "--recipe", recipe, "--out", tmp_path / "c"])
    assert "over this run's budget --target-macs 0.2" in line
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_transfer_refuses_a_truncated_masks_file(run, tmp_path):
    data = (run / "masks.safetensors").read_bytes()
    (run / "masks.safetensors").write_bytes(data[: len(data) // 2])
    _pins(run)  # even when its record agrees
    line = _error(["transfer", run, "--mode", "masks", "--dataset", "sklearn-digits", "--out", tmp_path / "b"])
    assert f"cannot read {run / 'masks.safetensors'}: it is truncated or not a safetensors file" in line
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ bench reuses only identical cells
def test_bench_reruns_a_cell_whose_settings_changed(tmp_path):
    spec = tmp_path / "spec.yaml"
    base = {"model": "resnet10t", "pretrained": "none", "head": "new", "dataset": "sklearn-digits", "img_size": 32,
            "train_subset": 16, "val_subset": 8, "batch_size": 8, "onnx": False,
            "search": {"steps": 1}, "finetune": {"steps": 1}}
    spec.write_text(yaml.safe_dump({"base": base, "grid": {"method": ["random"], "seed": [0]}}))
    out = tmp_path / "out"
    assert _run(["bench", spec, "--out", out])[0] == 0
    cell = out / "cells" / "random-t0.5-s0"
    first = (cell / "metrics.json").read_text()
    rc, _, err = _run(["bench", spec, "--out", out])  # the same spec: nothing runs again
    assert rc == 0 and (cell / "metrics.json").read_text() == first, err
    spec.write_text(yaml.safe_dump({"base": {**base, "finetune": {"steps": 2}},
                                    "grid": {"method": ["random"], "seed": [0]}}))
    rc, _, err = _run(["bench", spec, "--out", out])
    assert rc == 0, err[-2000:]
    assert "random-t0.5-s0: its settings changed (finetune.steps 1 (now 2))" in err
    results = json.loads((out / "results.json").read_text())
    assert [r["finetune_steps"] for r in results["runs"]] == [2]
    assert json.loads((cell / "metrics.json").read_text())["config"]["finetune"]["steps"] == 2


# ------------------------------------------------------------------ --resume checks its inputs
def test_resume_refuses_changed_class_folders(tmp_path, monkeypatch):
    import pass_zoo.pipeline as pipeline

    data = write_image_folder(tmp_path / "data", ["ant", "bee"], n_train=8, n_val=2)
    out = tmp_path / "run"
    argv = _tiny(out, "--checkpoint-every", "1", dataset=f"imagefolder:{data}", steps=3)

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # the run is stopped after its search, with checkpoints

    with monkeypatch.context() as m:
        m.setattr(pipeline, "finetune", stop)
        assert _run(argv)[0] == 130
    assert (out / "checkpoints" / "searched").is_dir()
    (data / "train" / "bee").rename(data / "train" / "wasp")
    (data / "val" / "bee").rename(data / "val" / "wasp")
    line = _error(argv + ["--resume"])
    assert line.startswith(f"pass-zoo: error: --resume: the inputs of {out} changed since it started: "
                           "inputs.dataset.classes.train ['ant', 'bee'] (now ['ant', 'wasp'])"), line
    assert (out / "checkpoints" / "searched").is_dir()  # a refused resume deletes nothing


# ------------------------------------------------------------------ values and types
@pytest.mark.parametrize("flag,value,expected", [
    ("--finetune-lr", "-0.01", "--finetune-lr must be a finite number >= 0, got -0.01"),
    ("--finetune-lr", "nan", "--finetune-lr must be a finite number >= 0, got nan"),
    ("--finetune-lr-prompt", "inf", "--finetune-lr-prompt must be a finite number >= 0, got inf"),
    ("--search-lr-hypernet", "-1", "--search-lr-hypernet must be a finite number >= 0, got -1.0"),
    ("--finetune-epochs", "-1", "--finetune-epochs must be a finite number > 0, got -1.0"),
    ("--finetune-epochs", "0", "--finetune-epochs must be a finite number > 0, got 0.0"),
    ("--seed", "-1", "--seed must be a whole number in [0, 2147483647], got -1"),
    ("--seed", "4294967296", "--seed must be a whole number in [0, 2147483647], got 4294967296"),
])
def test_values_of_the_wrong_sign(flag, value, expected, tmp_path):
    assert _error(_tiny(tmp_path / "run", flag, value)) == f"pass-zoo: error: {expected}"
    assert not (tmp_path / "run").exists()


def test_seed_of_eval_and_costs(run):
    assert _error(["eval", run, "--seed", "-1"]) == "pass-zoo: error: --seed must be a whole number in [0, 2147483647], got -1"
    assert "--seed must be" in _error(["costs", "--seed", "-3", "--out", run.parent / "costs"])


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_weights_that_are_not_floating_point(dtype, tmp_path):
    import timm

    sd = timm.create_model("resnet10t").state_dict()  # the shapes --pretrained expects: only the type is wrong
    sd["layer1.0.conv1.weight"] = (sd["layer1.0.conv1.weight"] * 100).to(dtype)
    path = tmp_path / "q.safetensors"
    save_file(sd, str(path))
    line = _error(_tiny(tmp_path / "run", "--pretrained", path))
    name = str(dtype).removeprefix("torch.")
    assert f"tensor 'layer1.0.conv1.weight' is {name}, the model expects floating-point weights" in line


@register_method
class _BadScores(Method):
    """Scores a broken criterion could return, handed to the shared selection."""

    name = "hostile-scores"
    tag = "hostile"
    baseline = True
    mode = {"kind": "nan"}

    def produce(self, ctx):
        kind = _BadScores.mode["kind"]
        scores = [torch.rand(g.units) for g in ctx.seq.groups]
        round_to = ctx.config.search.round_to
        if kind == "nan":
            scores[1][0] = float("nan")
        elif kind == "short":
            scores[0] = scores[0][:-1]
        elif kind == "missing":
            scores = scores[:-1]
        else:
            round_to = int(kind)
        return MethodResult(to_channel_masks(select_units(scores, ctx.seq, ctx.budget, round_to), ctx.seq))


@pytest.mark.parametrize("kind,expected", [
    ("nan", "hold NaN or infinite values"),
    ("short", "entries, the group has"),
    ("missing", "score tensors for"),
    ("0", "round_to must be a whole number >= 1, got 0"),
    ("-8", "round_to must be a whole number >= 1, got -8"),
])
def test_select_units_refuses_bad_scores(kind, expected, tmp_path, monkeypatch):
    monkeypatch.setitem(_BadScores.mode, "kind", kind)
    line = _error(_tiny(tmp_path / "run", "--method", "hostile-scores"))
    assert expected in line, line
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("text,expected", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"selection": {"convnext": 3}, "results": {}}', "'selection' must map each family"),
    ('{"selection": {}, "results": {"m": {"model": "m", "bogus": 1}}}', "results['m'] is not a check result"),
])
def test_a_malformed_sweep_file(text, expected, tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(text)
    line = _error(["check", "--sweep", path], rc=2)
    assert line.startswith(f"pass-zoo: error: --sweep {path}") and expected in line, line
    assert path.read_text() == text


def test_the_soak_script_runs_clean(tmp_path):
    """A short run of ``scripts/soak_hostile.py`` (docs/robustness.md's has 100 cases): every check holds."""
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak_hostile.py"), "--cases", "12", "--seed", "3",
                           "--work", str(tmp_path / "soak")], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "12 cases" in proc.stdout and ", 0 failed a check," in proc.stdout
