"""Hostile input, second round: each case through the real CLI ends in one ``pass-zoo: error:`` line
and exit code 2 (or, where the input is handled, with the right result), and leaves no partial or
misleading run folder. Cases are listed in docs/robustness.md.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, write_image_folder
from test_robust import _error, _run, _tiny

PY_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _gone(folder: Path) -> None:
    """A run refused before anything was written leaves no folder at all."""
    assert not folder.exists(), list(folder.rglob("*"))


# ------------------------------------------------------------------ data: links and bit depth
@pytest.mark.parametrize("link,expected", [
    ("..", "points to a folder above it"),  # train/ant/loop -> ..: a loop
    ("outside", "leaves the dataset folder"),  # a link to images elsewhere
])
def test_symlinks_that_loop_or_leave_the_dataset(link, expected, tmp_path):
    root = write_image_folder(tmp_path / "imgs", ["ant", "bee"])
    if link == "outside":
        write_image_folder(tmp_path / "elsewhere", ["ant"])
        link = str(tmp_path / "elsewhere" / "train" / "ant")
    os.symlink(link, root / "train" / "ant" / "loop")
    line = _error(_tiny(tmp_path / "run", dataset=f"imagefolder:{root}"))
    assert expected in line and str(root / "train" / "ant" / "loop") in line
    _gone(tmp_path / "run")


def test_a_link_inside_the_dataset_is_fine(tmp_path):
    from pass_zoo.data import check_links

    root = write_image_folder(tmp_path / "imgs", ["ant", "bee"])
    os.symlink(root / "train" / "bee" / "bee_0.png", root / "train" / "ant" / "also_bee.png")
    check_links(root / "train", str(root))


def _grey16(path: Path, value: int, size: int = 12) -> None:
    from PIL import Image

    Image.fromarray(np.full((size, size), value, dtype=np.uint16)).save(path)


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    from PIL import Image

    from pass_zoo.data import DataSpec, load_task_data, read_image

    root = tmp_path / "imgs16"
    values = {"dark": 12850, "light": 51400}  # 16-bit values of 8-bit 50 and 200
    for split in ("train", "val"):
        for cls, v in values.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(4):
                _grey16(root / split / cls / f"{cls}_{i}.png", v)
    assert Image.open(root / "val" / "dark" / "dark_0.png").mode == "I;16"
    assert (np.asarray(read_image(root / "val" / "dark" / "dark_0.png")) == 50).all()
    assert (np.asarray(read_image(root / "val" / "light" / "light_0.png")) == 200).all()
    spec = DataSpec(img_size=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    val = load_task_data(f"imagefolder:{root}", spec).val
    x, y = val[0]
    assert torch.allclose(x, torch.full_like(x, [50, 200][y] / 255), atol=1e-3)  # not 1.0 (white)
    rc, out, err = _run(_tiny(tmp_path / "run", dataset=f"imagefolder:{root}", steps=1))
    assert rc == 0, err[-2000:]


def test_float_images_are_refused(tmp_path):
    from PIL import Image

    root = write_image_folder(tmp_path / "imgs", ["ant", "bee"])
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), "F").save(root / "val" / "ant" / "f.tiff")
    line = _error(_tiny(tmp_path / "run", dataset=f"imagefolder:{root}", steps=1))
    assert "mode F" in line and "f.tiff" in line


# ------------------------------------------------------------------ sizes
@pytest.mark.parametrize("flag,value,expected", [
    ("--img-size", "0", "--img-size must be at least 1, got 0"),
    ("--img-size", "-5", "--img-size must be at least 1, got -5"),
    ("--prompt-size", "-1", "--prompt-size must be at least 0, got -1"),
    ("--workers", "-2", "--workers must be at least 0, got -2"),
])
def test_sizes_are_validated_up_front(flag, value, expected, tmp_path):
    assert _error(_tiny(tmp_path / "run", flag, value)) == f"pass-zoo: error: {expected}"
    _gone(tmp_path / "run")


def test_check_refuses_a_zero_img_size():
    assert _error(["check", "--model", "resnet10t", "--img-size", "0"]) == \
        "pass-zoo: error: --img-size must be at least 1, got 0"


def test_vit_input_that_is_not_whole_patches(tmp_path):
    line = _error(_tiny(tmp_path / "run", "--img-size", "40", "--model-kwargs", '{"depth": 1}',
                        model="vit_tiny_patch16_224"))
    assert "input size 40 px is not a multiple of the 16 px patches" in line
    assert "last 8 px would never reach the model" in line and "--img-size 32 or 48" in line
    _gone(tmp_path / "run")


# ------------------------------------------------------------------ run folders
def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that has started a run in ``folder`` (holds its lock) and keeps running."""
    code = textwrap.dedent(f"""
        import time
        from pass_zoo.fileio import prepare_run_dir
        prepare_run_dir({str(folder)!r})
        print("locked", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], env=PY_ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_on_the_same_out_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "run"
    holder = _hold_lock(out)
    try:
        line = _error(_tiny(out))
        assert f"another pass-zoo run (pid {holder.pid}) is using it" in line
        assert _error(_tiny(out, "--overwrite")) == line  # --overwrite does not take it over either
        assert _error(_tiny(out, "--resume")).endswith(f"(pid {holder.pid}) is using it; wait for it to finish "
                                                        "or choose another folder")
        assert out.is_dir()  # the first run's folder is left alone
    finally:
        holder.kill()
        holder.wait()
    rc, _, err = _run(_tiny(out, steps=1))  # the holder died: its lock went with it
    assert rc == 0, err[-2000:]
    assert (out / "metrics.json").is_file()


def test_the_lock_goes_with_the_run(tmp_path):
    from pass_zoo.fileio import LOCK_FILE, prepare_run_dir, unlock_run_dir

    out = tmp_path / "run"
    assert _run(_tiny(out, steps=1))[0] == 0
    assert (out / "metrics.json").is_file() and not (out / LOCK_FILE).exists()
    _error(_tiny(out, "--overwrite", "--dataset", "imagefolder:/nonexistent"))
    assert list(out.iterdir()) == []  # replaced, then nothing written: no stale lock either
    prepare_run_dir(out)  # within one process the lock is re-entrant
    prepare_run_dir(out, overwrite=True)
    assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    unlock_run_dir(out, everything=True)
    assert not (out / LOCK_FILE).exists()


def test_model_kwargs_the_export_cannot_rebuild(tmp_path):
    line = _error(_tiny(tmp_path / "run", "--model-kwargs", '{"num_classes": 0}'))
    assert "--model-kwargs may not set num_classes" in line
    _gone(tmp_path / "run")
    line = _error(_tiny(tmp_path / "run", "--model-kwargs", '{"no_such_argument": 1}'))
    assert "do not fit 'resnet10t'" in line and "no_such_argument" in line
    _gone(tmp_path / "run")


def test_an_export_that_does_not_load_back_leaves_no_finished_run(tmp_path, monkeypatch):
    import pass_zoo.export.timm_model as export
    from pass_zoo.errors import PassZooError

    def broken(path):
        raise PassZooError(f"cannot load {path}: weights do not match the slim spec")

    monkeypatch.setattr(export, "load_run_model", broken)
    out = tmp_path / "run"
    line = _error(_tiny(out, steps=1))
    assert "the exported model does not load back" in line and "checkpoints are kept" in line
    names = {p.name for p in out.iterdir()}
    assert not {"metrics.json", "model.safetensors", "config.json"} & names and "checkpoints" in names


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One tiny finished run with its verified model.onnx (copied per test)."""
    out = tmp_path_factory.mktemp("hostile") / "run"
    argv = [a for a in _tiny(out, steps=1) if a != "--no-onnx"]
    rc, _, err = _run(argv)
    assert rc == 0, err[-2000:]
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def test_publish_and_card_refuse_weights_that_are_a_pickle(run_copy, monkeypatch):
    from safetensors.torch import load_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd = {k: v.clone() for k, v in load_file(str(run_copy / "model.safetensors")).items()}  # not the mmap
    torch.save(sd, run_copy / "model.safetensors")  # a pickle under the safetensors name
    for argv in (["publish", run_copy, "--repo-id", "org/name", "--dry-run"],
                 ["publish", run_copy, "--repo-id", "org/name", "--token", "x"], ["card", run_copy]):
        line = _error(argv)
        assert "model.safetensors is not a valid safetensors file (it is a torch pickle/zip" in line, line
    assert not (run_copy / "README.md").exists() and not (run_copy / "hub.json").exists()


def test_publish_refuses_weights_other_than_the_exported_ones(run_copy):
    from safetensors.torch import load_file, save_file

    sd = {k: v.clone() for k, v in load_file(str(run_copy / "model.safetensors")).items()}
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key] + 1
    save_file(sd, str(run_copy / "model.safetensors"))
    line = _error(["publish", run_copy, "--repo-id", "org/name", "--dry-run"])
    assert "is not the file export.json verified (sha256 differs)" in line


def test_export_removes_what_a_killed_export_left(run_copy):
    stale = [run_copy / ".model.onnx.k1ll3d.tmp", run_copy / ".export.json.x.tmp"]
    for p in stale:
        p.write_bytes(b"half an onnx file")
    rc, _, err = _run(["export", run_copy])
    assert rc == 0, err[-2000:]
    assert not [p for p in run_copy.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((run_copy / "export.json").read_text())["passed"] is True


def test_timm_without_import_pass_zoo_says_what_to_do(run_copy):
    config = json.loads((run_copy / "config.json").read_text())
    assert "import pass_zoo" in config["usage"] and "Unknown model (pass_pruned)" in config["usage"]
    code = textwrap.dedent(f"""
        import timm
        try:
            timm.create_model("local-dir:{run_copy}", pretrained=True)
        except RuntimeError as exc:
            print("without:", exc)
        import pass_zoo
        print("with:", type(timm.create_model("local-dir:{run_copy}", pretrained=True)).__name__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=PY_ENV, capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == ["without: Unknown model (pass_pruned)", "with: PassPrunedModel"], proc.stderr


# ------------------------------------------------------------------ architectures and unexpected errors
def test_class_attention_transformer_prunes_what_it_can(tmp_path):
    """CaiT: talking-heads and class-attention layers stay dense (with the reason); the rest prunes."""
    import timm

    from pass_zoo.graph.sequence import build_layer_sequence
    from pass_zoo.export import load_run_model

    model = timm.create_model("cait_xxs24_224", img_size=32, depth=2, num_classes=10).eval()
    seq = build_layer_sequence(model, torch.zeros(1, 3, 32, 32))
    reasons = " ".join(r for _, r in seq.excluded)
    assert "(TalkingHeadAttn), whose head layout pass-zoo does not know" in reasons
    assert "(ClassAttn), whose head layout pass-zoo does not know" in reasons
    out = tmp_path / "run"
    rc, _, err = _run(_tiny(out, "--model-kwargs", '{"depth": 2}', model="cait_xxs24_224", steps=1))
    assert rc == 0, err[-2000:]
    assert load_run_model(out)(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_an_unexpected_error_is_one_line_naming_the_stage(tmp_path, monkeypatch):
    import importlib

    slim_module = importlib.import_module("pass_zoo.graph.slim")  # the package's `slim` is the function

    def broken(*args, **kwargs):
        raise RuntimeError("shape '[8, 1, 4, 48]' is invalid for input of size 320")

    monkeypatch.setattr(slim_module, "to_unit_masks", broken)
    out = tmp_path / "run"
    line = _error(_tiny(out, steps=1))
    assert line == (f"pass-zoo: error: unexpected error in stage slim (slim.slim): RuntimeError: shape "
                    f"'[8, 1, 4, 48]' is invalid for input of size 320; full traceback in {out / 'error.log'}")
    log = (out / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "to_unit_masks" in log
    assert not (out / "metrics.json").exists()


def test_an_unexpected_error_without_a_run_folder_goes_to_a_temp_file(tmp_path, monkeypatch):
    import pass_zoo.data as data

    monkeypatch.setattr(data, "_fashion_mnist", lambda root, spec: 1 / 0)
    line = _error(_tiny(tmp_path / "run"))
    assert line.startswith("pass-zoo: error: unexpected error in stage data (data.load_task_data): "
                           "ZeroDivisionError: division by zero; full traceback in ")
    log = Path(line.rsplit(" in ", 1)[1])
    try:
        assert "ZeroDivisionError" in log.read_text()
    finally:
        log.unlink()
    _gone(tmp_path / "run")


# ------------------------------------------------------------------ offline
def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("offline", [True, False])
def test_pretrained_timm_offline_fails_fast_in_one_line(offline, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(hf_constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # never the network
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    line = _error(_tiny(tmp_path / "run", "--pretrained", "timm"))
    if offline:
        assert "could not load pretrained weights for 'resnet10t': they are not in the local cache (Hub repo " \
               "timm/resnet10t.c3_in1k) and HF_HUB_OFFLINE is set" in line
    else:
        assert f"for 'resnet10t': {hf_constants.ENDPOINT} is unreachable (Connection refused)" in line
    assert "offline alternatives" in line
    _gone(tmp_path / "run")


# ------------------------------------------------------------------ soak
_SOAK_DRIVER = r"""
import contextlib, faulthandler, io, json, sys
from pass_zoo.cli import main

for line in sys.stdin:
    case = json.loads(line)
    faulthandler.dump_traceback_later(90, exit=True)  # a hang ends the driver, and the test fails
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            rc = main(case["argv"])
        except BaseException as exc:  # anything main lets escape is a failure of its own
            import traceback
            rc, _ = "escaped", traceback.print_exc(file=err)
    faulthandler.cancel_dump_traceback_later()
    print(json.dumps({"i": case["i"], "rc": rc, "stderr": err.getvalue()}), flush=True)
"""


def _soak_data(root: Path) -> dict:
    """Hostile and good image folders, made once for the soak cases to draw from."""
    good = write_image_folder(root / "good", ["ant", "bee"], n_train=4, n_val=2)
    loop = write_image_folder(root / "loop", ["ant", "bee"], n_train=2, n_val=1)
    os.symlink("..", loop / "train" / "bee" / "loop")
    corrupt = write_image_folder(root / "corrupt", ["ant", "bee"], n_train=4, n_val=2)
    (corrupt / "train" / "ant" / "ant_1.png").write_bytes(b"not a png")
    deep = root / "deep"
    for split in ("train", "val"):
        for ci, cls in enumerate(("ant", "bee")):
            (deep / split / cls).mkdir(parents=True)
            for i in range(4):
                _grey16(deep / split / cls / f"{cls}_{i}.png", 9000 + 40000 * ci)
    empty = root / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    (root / "not_a_folder").write_text("x")
    (root / "junk.safetensors").write_bytes(b"\x00" * 40)
    (root / "junk.pth").write_bytes(b"PK\x03\x04 not a zip")
    return {"good": good, "loop": loop, "corrupt": corrupt, "deep": deep, "empty": empty, "root": root}


def _soak_case(rng: random.Random, data: dict, out: Path) -> list:
    good = f"imagefolder:{data['good']}"
    hostile = [
        ["--img-size", str(rng.choice([0, -1, -5]))],
        ["--prompt-size", str(rng.choice([-1, -8]))],
        ["--workers", "-1"],
        ["--target-macs", rng.choice(["0", "1.5", "-0.2", "nan"])],
        ["--round-to", "0"],
        ["--batch-size", rng.choice(["0", "-3"])],
        ["--train-subset", "0"],
        ["--checkpoint-every", "-1"],
        ["--model-kwargs", rng.choice(['{"num_classes": 0}', '{"in_chans": 1}', '{"bogus_arg": 3}'])],
        ["--dataset", f"imagefolder:{data['loop']}"],
        ["--dataset", f"imagefolder:{data['empty']}"],
        ["--dataset", f"imagefolder:{data['root'] / 'missing'}"],
        ["--dataset", f"imagefolder:{data['corrupt']}"],
        ["--dataset", "imagefolder:"],
        ["--dataset", "nosuchset"],
        ["--dataset", "fashion-mnist@3"],
        ["--pretrained", str(data["root"] / rng.choice(["junk.safetensors", "junk.pth", "absent.safetensors"]))],
        ["--pretrained", "timm"],  # HF_HUB_OFFLINE is set and the cache is empty
        ["--pretrained", "hf-hub:org/absent"],
        ["--model", rng.choice(["resnet5", "vit_tiny_patch16_224"]), "--img-size", "40"],
        ["--out", str(data["root"] / "not_a_folder")],
        ["--resume"],
        ["--resume", "--overwrite"],
        ["--mixed-precision", "fp16"],
    ]
    argv = _tiny(out, "--dataset", good, steps=1)
    if rng.random() < 0.15:  # now and then a run that must succeed
        extra = rng.choice([[], ["--dataset", f"imagefolder:{data['deep']}"], ["--prompt-size", "0"]])
    else:
        extra = [a for flags in rng.sample(hostile, rng.choice([1, 1, 2])) for a in flags]
    return [str(a) for a in argv + extra]


def test_soak_back_to_back_hostile_runs(tmp_path):
    """50 runs with hostile flags and data drawn from a seeded generator, back to back in one process:
    none may print a traceback, hang, leave temporaries, or leave a folder that claims success wrongly."""
    from test_robust import _PROGRESS

    data = _soak_data(tmp_path / "data")
    rng = random.Random(20261202)
    cases = [{"i": i, "argv": _soak_case(rng, data, tmp_path / f"run{i:02d}")} for i in range(50)]
    env = {**PY_ENV, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}",
           "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "TORCH_HOME": str(tmp_path / "torch")}
    proc = subprocess.run([sys.executable, "-c", _SOAK_DRIVER], input="".join(json.dumps(c) + "\n" for c in cases),
                          env=env, capture_output=True, text=True, timeout=300)
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(cases), proc.stderr[-3000:]
    succeeded = 0
    for case, r in zip(cases, results):
        argv, where = case["argv"], f"case {case['i']}: {' '.join(case['argv'])}\n{r['stderr'][-1500:]}"
        out = Path(argv[len(argv) - 1 - argv[::-1].index("--out") + 1])  # the last --out wins
        assert "Traceback" not in r["stderr"] and r["rc"] in (0, 2), where
        lines = [x for x in r["stderr"].replace("\r", "\n").splitlines() if x.strip() and not _PROGRESS.match(x)]
        if out.is_dir():
            assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], where
        if r["rc"] == 0:
            succeeded += 1
            assert (out / "metrics.json").is_file() and (out / "model.safetensors").is_file(), where
        else:
            assert len(lines) == 1 and lines[0].startswith("pass-zoo: error: "), where
            assert not (out.is_dir() and (out / "metrics.json").exists()), where
    assert succeeded >= 2  # the generator drew some runs that must work, and they did
