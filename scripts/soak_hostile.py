"""Soak: seeded hostile runs back to back through the real CLI, mixing every class of hostile input.

    python scripts/soak_hostile.py --cases 100 --seed 27

A sandbox holds data folders, weights files, a finished source run, a run whose config.json was
edited, an interrupted run, a folder that is not a run, recipes, bench specs and sweep files. Each
case draws one hostile input (or, now and then, one that must work) and runs ``pass-zoo`` in one
long-lived process, as a user would run many commands in a row. After every case the soak checks:

* no traceback, and no hang (a case that runs past ``--timeout`` seconds ends the soak);
* exit 0, or exactly one ``pass-zoo: error:`` line with exit 2;
* nothing outside the case's own ``--out`` changed (every other file of the sandbox: size, mtime, inode);
* a folder that claims success (exit 0 and a metrics.json) verifies against its pinned files, and no
  temporary file is left in it; a failed case leaves no metrics.json it did not have.

It prints one line per failed check and a summary; exit status 1 if any check failed.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"^(search|finetune|\s)")  # progress bars and the blank line that clears them

DRIVER = r"""
import contextlib, faulthandler, io, json, os, sys, torch
from pass_zoo.cli import main
from pass_zoo.graph.masks import select_units, to_channel_masks
from pass_zoo.methods import Method, MethodResult, register_method

torch.set_num_threads(1)


@register_method
class HostileScores(Method):
    name, tag, baseline = "soak-scores", "soak", True

    def produce(self, ctx):
        kind = os.environ.get("SOAK_SCORES", "nan")
        scores = [torch.rand(g.units) for g in ctx.seq.groups]
        if kind == "nan":
            scores[0][0] = float("nan")
        elif kind == "short":
            scores[-1] = scores[-1][:-1]
        return MethodResult(to_channel_masks(select_units(scores, ctx.seq, ctx.budget, 8), ctx.seq))


for line in sys.stdin:
    case = json.loads(line)
    os.environ.update(case.get("env", {}))
    os.chdir(case.get("cwd") or os.environ["SOAK_HOME"])
    faulthandler.dump_traceback_later(float(os.environ["SOAK_TIMEOUT"]), exit=True)
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(case["argv"])
        except BaseException:
            import traceback
            rc = "escaped"
            traceback.print_exc(file=err)
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps({"i": case["i"], "rc": rc, "stderr": err.getvalue()}), flush=True)
"""


# ------------------------------------------------------------------ the sandbox
def write_image_folder(root: Path, classes, n_train: int = 4, n_val: int = 2, seed: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, cls in enumerate(classes):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = np.clip(60 * ci + rng.integers(-30, 31, size=(20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img, "RGB").save(folder / f"{cls}_{i}.png")
    return root


def tiny(out, *extra, dataset="sklearn-digits", steps=1, onnx=False):
    return ["prune", "--model", "resnet10t", "--pretrained", "none", "--head", "new", "--dataset", dataset,
            "--img-size", "32", "--train-subset", "16", "--val-subset", "8", "--search-steps", str(steps),
            "--finetune-steps", str(steps), "--batch-size", "8", "--seed", "1", "--quiet", "--out", str(out),
            *([] if onnx else ["--no-onnx"]), *extra]


def build_sandbox(home: Path) -> dict:
    """Inputs every case draws from (made once, in this process: it imports pass-zoo itself)."""
    import timm
    import torch
    from safetensors.torch import load_file, save_file

    from pass_zoo.cli import main
    from pass_zoo.integrity import pin_files

    s = {"home": home}
    s["data"] = write_image_folder(home / "data" / "good", ["ant", "bee"])
    s["weights"] = home / "weights" / "w.safetensors"
    s["weights"].parent.mkdir(parents=True)
    sd = timm.create_model("resnet10t").state_dict()  # ImageNet's head, as --pretrained expects
    save_file(sd, str(s["weights"]))
    for dtype in ("int8", "bool"):
        q = dict(sd, **{"layer1.0.conv1.weight": (sd["layer1.0.conv1.weight"] * 50).to(getattr(torch, dtype))})
        save_file(q, str(home / "weights" / f"{dtype}.safetensors"))
    def run(argv):
        with open(os.devnull, "w") as null:
            saved = sys.stdout, sys.stderr
            sys.stdout = sys.stderr = null
            try:
                return main([str(a) for a in argv])
            finally:
                sys.stdout, sys.stderr = saved

    s["source"] = home / "runs" / "source"
    assert run(tiny(s["source"], onnx=True)) == 0, "the soak's source run failed"
    s["edited"] = home / "runs" / "edited"
    shutil.copytree(s["source"], s["edited"])
    config = json.loads((s["edited"] / "config.json").read_text())
    config["model_args"]["spec"].update(format="pass-zoo-slim/2", model_kwargs={"act_layer": "sigmoid"}, fixups=[])
    (s["edited"] / "config.json").write_text(json.dumps(config))
    s["all_ones"] = home / "runs" / "all-ones"  # a source whose (pinned) masks keep every channel
    shutil.copytree(s["source"], s["all_ones"])
    masks = load_file(str(s["all_ones"] / "masks.safetensors"))
    save_file({k: torch.ones_like(v) for k, v in masks.items()}, str(s["all_ones"] / "masks.safetensors"))
    s["truncated"] = home / "runs" / "truncated"  # a source whose masks file is cut short
    shutil.copytree(s["source"], s["truncated"])
    data = (s["truncated"] / "masks.safetensors").read_bytes()
    (s["truncated"] / "masks.safetensors").write_bytes(data[: len(data) // 2])
    for folder in (s["all_ones"], s["truncated"]):
        m = json.loads((folder / "metrics.json").read_text())
        m["file_sha256"] = pin_files(folder, ("hypernet.json", "hypernet.safetensors"))
        (folder / "metrics.json").write_text(json.dumps(m))

    # an interrupted run on a dataset whose class folders are renamed afterwards
    import pass_zoo.pipeline as pipeline

    s["moved_data"] = write_image_folder(home / "data" / "moved", ["ant", "bee"])
    s["interrupted"] = home / "runs" / "interrupted"
    original = pipeline.finetune

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    pipeline.finetune = stop
    try:
        assert run(tiny(s["interrupted"], "--checkpoint-every", "1", dataset=f"imagefolder:{s['moved_data']}")) == 130
    finally:
        pipeline.finetune = original
    for split in ("train", "val"):
        (s["moved_data"] / split / "bee").rename(s["moved_data"] / split / "wasp")

    s["project"] = home / "project"
    (s["project"] / "src").mkdir(parents=True)
    (s["project"] / "src" / "main.py").write_text("print('hello')\n")
    (s["project"] / "notes.txt").write_text("keep me\n")
    s["victim"] = home / "victim"
    s["victim"].mkdir()
    (s["victim"] / "precious.txt").write_text("x")

    s["recipes"] = home / "recipes"
    s["recipes"].mkdir()
    base = "model: resnet10t\npretrained: none\nhead: new\nimg_size: 32\ndataset: sklearn-digits\n" \
           "train_subset: 16\nval_subset: 8\nbatch_size: 8\nonnx: false\nsearch: {steps: 1}\nfinetune: {steps: 1}\n"
    (s["recipes"] / "ok.yaml").write_text(base)
    (s["recipes"] / "hub.yaml").write_text(base + 'hub_id: "org/x\\"); evil(\\""\n')
    layers = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    (s["recipes"] / "bomb.yaml").write_text(base + "model_kwargs:\n" + "".join(f"  {x}\n" for x in layers))
    (s["recipes"] / "transfer.yaml").write_text(base + f"transfer_from: {s['source']}\ntransfer_mode: masks\n"
                                                "target_macs: 0.2\n")
    s["specs"] = home / "specs"
    s["specs"].mkdir()
    spec_base = ("base: {model: resnet10t, pretrained: none, head: new, img_size: 32, dataset: sklearn-digits, "
                 "train_subset: 16, val_subset: 8, batch_size: 8, onnx: false, search: {steps: 1}, "
                 "finetune: {steps: %d}}\n")
    (s["specs"] / "one.yaml").write_text(spec_base % 1 + "grid: {method: [random], seed: [0]}\n")
    (s["specs"] / "two.yaml").write_text(spec_base % 2 + "grid: {method: [random], seed: [0]}\n")
    (s["specs"] / "escape.yaml").write_text(spec_base % 1 + "grid: {method: []}\n"
                                            "variants: {'../../victim': {method: random}}\n")
    (s["specs"] / "seed.yaml").write_text(spec_base % 1 + "grid: {method: [random], seed: [-1, '../x']}\n")
    (s["specs"] / "bomb.yaml").write_text("grid: {}\nbase:\n" + "".join(f"  {x}\n" for x in layers))
    s["sweeps"] = home / "sweeps"
    s["sweeps"].mkdir()
    for i, text in enumerate(["{not json", "[1, 2]", '{"selection": {"x": 3}}',
                              '{"selection": {}, "results": {"m": {"model": "m", "bogus": 1}}}']):
        (s["sweeps"] / f"bad{i}.json").write_text(text)
    s["outs"] = home / "outs"
    s["outs"].mkdir()
    return s


# ------------------------------------------------------------------ cases
def draw_case(rng: random.Random, i: int, s: dict) -> dict:
    """One case: ``argv``, the ``out`` it may change (None: nothing), its exit status (``expect``: 2, a
    refusal, unless it must work), ``prepare`` (a run copied to ``out`` first) and ``env``."""
    out = s["outs"] / f"case{i:03d}"
    src, data = s["source"], s["data"]
    case = {"i": i, "out": out, "expect": 2, "prepare": None, "env": {}}  # hostile: refused in one line
    kind = rng.choice([
        "good", "good", "good-overwrite", "project-overwrite", "cwd-overwrite", "transfer-into-source",
        "transfer-inside-source", "pretrained-dir", "dataset-dir", "dataset-inside", "recipe-inside",
        "json-config", "json-metrics", "json-onnx", "bench-escape", "card-repo", "publish-revision",
        "recipe-hub", "recipe-bomb", "bench-bomb", "edited-eval", "edited-card", "edited-publish",
        "edited-export", "transfer-all-ones", "recipe-transfer", "transfer-truncated", "bench-change",
        "resume-moved", "lr", "epochs", "seed", "round-to", "int8", "bool", "latency-opset", "export-opset",
        "export-dynamo", "sweep", "scores-nan", "scores-short", "edited-latency", "zoo-name", "bench-seed",
        "json-folder"])
    case["kind"] = kind
    if kind == "good":
        case.update(argv=tiny(out), expect=0, run=True)
    elif kind == "good-overwrite":  # a finished run folder: replaced
        case.update(argv=tiny(out, "--overwrite"), expect=0, prepare=src, run=True)
    elif kind == "project-overwrite":
        case.update(argv=tiny(s["project"], "--overwrite"), out=None)
    elif kind == "cwd-overwrite":
        case.update(argv=tiny(".", "--overwrite"), out=None, cwd=str(s["project"]))
    elif kind == "transfer-into-source":
        case.update(argv=["transfer", src, "--mode", "masks", "--dataset", "sklearn-digits", "--out", src,
                          "--overwrite"], out=None)
    elif kind == "transfer-inside-source":
        case.update(argv=["transfer", src, "--mode", "masks", "--dataset", "sklearn-digits", "--out", src / "b"],
                    out=None)
    elif kind == "pretrained-dir":
        case.update(argv=tiny(s["weights"].parent, "--overwrite", "--pretrained", s["weights"]), out=None)
    elif kind == "dataset-dir":
        case.update(argv=tiny(data, "--overwrite", dataset=f"imagefolder:{data}"), out=None)
    elif kind == "dataset-inside":
        case.update(argv=tiny(data / "train" / "new", dataset=f"imagefolder:{data}"), out=None)
    elif kind == "recipe-inside":
        case.update(argv=["prune", "--recipe", s["recipes"] / "ok.yaml", "--out", s["recipes"], "--overwrite"],
                    out=None)
    elif kind == "json-config":
        case.update(argv=["eval", src, "--json", src / "config.json"], out=None)
    elif kind == "json-metrics":
        case.update(argv=["latency", src, "--json", src / "metrics.json", "--batch", "1", "--repeats", "1"], out=None)
    elif kind == "json-onnx":
        case.update(argv=["eval", src / "model.onnx", "--json", src / "model.onnx"], out=None)
    elif kind == "bench-escape":
        case.update(argv=["bench", s["specs"] / "escape.yaml", "--out", out / "a" / "b"])
    elif kind == "card-repo":
        case.update(argv=["card", src, "--repo-id", 'a/b"); import os; os.system("id"); ("'], out=None)
    elif kind == "publish-revision":
        case.update(argv=["publish", src, "--repo-id", "org/name", "--dry-run", "--revision",
                          rng.choice(["../../x", "main/../../y", "/abs", "a..b"])], out=None)
    elif kind in ("recipe-hub", "recipe-bomb", "recipe-transfer"):
        name = {"recipe-hub": "hub", "recipe-bomb": "bomb", "recipe-transfer": "transfer"}[kind]
        case.update(argv=["prune", "--recipe", s["recipes"] / f"{name}.yaml", "--out", out])
    elif kind == "bench-bomb":
        case.update(argv=["bench", s["specs"] / "bomb.yaml", "--out", out])
    elif kind.startswith("edited-"):
        what = kind.split("-")[1]
        edited = s["edited"]
        case.update(out=None, argv={"eval": ["eval", edited], "card": ["card", edited],
                                    "publish": ["publish", edited, "--repo-id", "org/name", "--dry-run"],
                                    "export": ["export", edited],
                                    "latency": ["latency", edited, "--batch", "1", "--repeats", "1"]}[what])
    elif kind == "zoo-name":
        case.update(argv=["zoo", "build", rng.choice(["../x", "a/b", ".hidden"]), "--runs-dir", s["outs"],
                          "--recipes-dir", s["recipes"]], out=None)
    elif kind == "bench-seed":
        case.update(argv=["bench", s["specs"] / "seed.yaml", "--out", out])
    elif kind == "json-folder":
        case.update(argv=["eval", src, "--json", s["home"] / "data"], out=None)
    elif kind == "transfer-all-ones":
        case.update(argv=["transfer", s["all_ones"], "--mode", "masks", "--dataset", "sklearn-digits", "--out", out])
    elif kind == "transfer-truncated":
        case.update(argv=["transfer", s["truncated"], "--mode", rng.choice(["masks", "hypernet"]), "--dataset",
                          "sklearn-digits", "--out", out])
    elif kind == "bench-change":  # the same folder under a spec that changes: the cell runs again
        bench_out = s["outs"] / "bench"
        spec = rng.choice(["one.yaml", "two.yaml"])
        case.update(argv=["bench", s["specs"] / spec, "--out", bench_out], out=bench_out, expect=0)
    elif kind == "resume-moved":
        case.update(argv=tiny(out, "--checkpoint-every", "1", "--resume", dataset=f"imagefolder:{s['moved_data']}"),
                    prepare=s["interrupted"])
    elif kind == "lr":
        case.update(argv=tiny(out, rng.choice(["--finetune-lr", "--finetune-lr-prompt", "--search-lr-prompt"]),
                              rng.choice(["-0.01", "nan", "inf", "-1e9"])))
    elif kind == "epochs":
        case.update(argv=tiny(out, "--finetune-epochs", rng.choice(["-1", "0", "nan"])))
    elif kind == "seed":
        case.update(argv=tiny(out, "--seed", rng.choice(["-1", "-99", "4294967296"])))
    elif kind == "round-to":
        case.update(argv=tiny(out, "--round-to", rng.choice(["0", "-8"])))
    elif kind in ("int8", "bool"):
        case.update(argv=tiny(out, "--pretrained", s["weights"].parent / f"{kind}.safetensors"),
                    says=f"is {kind}, the model expects floating-point weights")
    elif kind == "latency-opset":
        case.update(argv=["latency", src, "--opset", rng.choice(["5", "16", "99", "-1"]), "--batch", "1"], out=None)
    elif kind == "export-opset":
        case.update(argv=["export", out, "--opset", rng.choice(["5", "99", "24"])], prepare=src)
    elif kind == "export-dynamo":
        case.update(argv=["export", out, "--exporter", "dynamo"], prepare=src, expect=0)
    elif kind == "sweep":
        case.update(argv=["check", "--sweep", s["sweeps"] / f"bad{rng.randrange(4)}.json"], out=None)
    elif kind.startswith("scores-"):
        case.update(argv=tiny(out, "--method", "soak-scores"), env={"SOAK_SCORES": kind.split("-")[1]})
    case.setdefault("says", SAYS.get(kind) or next((v for k, v in SAYS.items() if kind.startswith(k)), None))
    case["argv"] = [str(a) for a in case["argv"]]
    return case


# What each refusal must say (its reason, not just any error line).
SAYS = {
    "project-overwrite": "is not a pass-zoo run folder", "cwd-overwrite": "is not a pass-zoo run folder",
    "transfer-into-source": "outside every input", "transfer-inside-source": "outside every input",
    "pretrained-dir": "outside every input", "dataset-dir": "outside every input",
    "dataset-inside": "outside every input", "recipe-inside": "outside every input",
    "json-config": "which the run depends on", "json-metrics": "which the run depends on",
    "json-onnx": "would overwrite the input", "json-folder": "is a folder; name a file",
    "bench-escape": "is not a valid name", "bench-seed": "grid: seed must be", "card-repo": "--repo-id",
    "publish-revision": "is not a valid branch name", "zoo-name": "zoo entry", "recipe-hub": "hub_id",
    "recipe-bomb": "expands to more than", "bench-bomb": "expands to more than",
    "edited-": "config.json is not the file the run wrote", "transfer-all-ones": "over this run's budget",
    "recipe-transfer": "over this run's budget --target-macs 0.2",
    "transfer-truncated": "truncated or not a safetensors file", "resume-moved": "the inputs of",
    "lr": "must be a finite number >= 0", "epochs": "--finetune-epochs must be a finite number > 0",
    "seed": "--seed must be a whole number", "round-to": "--round-to must be >= 1",
    "latency-opset": "--opset must be in", "export-opset": "--opset must be in", "sweep": "--sweep",
    "scores-nan": "hold NaN or infinite values", "scores-short": "entries, the group has",
}


# ------------------------------------------------------------------ checks
def snapshot(home: Path, skip) -> dict:
    """Size, mtime and inode of every file and link under ``home`` but ``skip`` (the case's own out)."""
    found = {}
    for here, dirs, files in os.walk(home):
        if skip is not None and (Path(here) == skip or skip in Path(here).parents):
            dirs[:] = []
            continue
        for name in files + [d for d in dirs if os.path.islink(os.path.join(here, d))]:
            p = os.path.join(here, name)
            st = os.lstat(p)
            found[p] = (st.st_size, st.st_mtime_ns, st.st_ino)
        found[here] = "dir"
    return found


def check_case(case: dict, result: dict, before: dict, after: dict, had_metrics: bool) -> list:
    from pass_zoo.integrity import verify_run_files

    problems = []
    rc, err = result["rc"], result["stderr"]
    lines = [x for x in err.replace("\r", "\n").splitlines() if x.strip() and not PROGRESS.match(x)]
    if "Traceback" in err or rc == "escaped":
        problems.append("traceback")
    if rc not in (0, 2):
        problems.append(f"exit status {rc}")
    if rc == 2 and not (len(lines) == 1 and lines[0].startswith("pass-zoo: error: ")):
        problems.append(f"not one error line: {lines[:3]}")
    if case.get("says") and not any(case["says"] in x for x in lines):
        problems.append(f"expected '{case['says']}' in {lines[-1:]}")
    if rc != case["expect"]:
        problems.append(f"expected exit {case['expect']}, got {rc}: {lines[-1:]}")
    changed = sorted(set(before) ^ set(after) | {p for p in before if p in after and before[p] != after[p]})
    if changed:
        problems.append(f"changed outside --out: {changed[:3]}")
    out = case["out"]
    if out is not None and out.is_dir():
        temporaries = [p for p in out.rglob("*") if ".tmp" in p.name]
        if temporaries:
            problems.append(f"temporaries left: {temporaries[:2]}")
        claims = (out / "metrics.json").is_file()
        if rc == 0 and case.get("run") and not claims:
            problems.append("exit 0 without a finished run folder")
        for metrics in sorted(out.rglob("metrics.json")) if rc == 0 else ():  # runs and bench cells
            try:
                verify_run_files(metrics.parent)
                if "file_sha256" not in json.loads(metrics.read_text()):
                    problems.append(f"{metrics.parent} finished without pins")
            except Exception as exc:  # noqa: BLE001 -- reported, not raised
                problems.append(f"{metrics.parent} claims success, its files do not match: {exc}")
        if rc != 0 and claims and not had_metrics:
            problems.append("a failed case left a metrics.json")
    return problems


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--seed", type=int, default=27)
    p.add_argument("--timeout", type=float, default=180, help="seconds one case may take (default: %(default)s)")
    p.add_argument("--work", default=None, help="sandbox folder (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    home = Path(args.work or tempfile.mkdtemp(prefix="pass-zoo-soak-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sandbox = build_sandbox(home)
    rng = random.Random(args.seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "SOAK_HOME": str(home),
           "SOAK_TIMEOUT": str(args.timeout), "HF_HUB_CACHE": str(home / ".hf-cache")}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=str(home))
    failures, kinds, ok = [], {}, 0
    try:
        for i in range(args.cases):
            case = draw_case(rng, i, sandbox)
            if case["prepare"] is not None and not case["out"].exists():
                shutil.copytree(case["prepare"], case["out"])
            had_metrics = case["out"] is not None and (case["out"] / "metrics.json").is_file()
            before = snapshot(home, case["out"])
            driver.stdin.write(json.dumps({"i": i, "argv": case["argv"], "env": case["env"],
                                           "cwd": case.get("cwd")}) + "\n")
            driver.stdin.flush()
            line = driver.stdout.readline()
            if not line:
                failures.append((case, ["hang or crash: the driver ended"]))
                break
            result = json.loads(line)
            problems = check_case(case, result, before, snapshot(home, case["out"]), had_metrics)
            kinds[case["kind"]] = kinds.get(case["kind"], 0) + 1
            ok += result["rc"] == 0
            if problems:
                failures.append((case, problems))
                print(f"FAIL case {i} ({case['kind']}): {'; '.join(problems)}\n  pass-zoo {' '.join(case['argv'])}",
                      flush=True)
    finally:
        driver.stdin.close()
        driver.wait(timeout=60)
        if args.work is None:
            shutil.rmtree(home, ignore_errors=True)
    n = i + 1
    print(f"{n} cases ({len(kinds)} kinds; {ok} exit 0, {n - ok} refused in one line), "
          f"{len(failures)} failed a check, {time.time() - t0:.0f} s")
    print("kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
