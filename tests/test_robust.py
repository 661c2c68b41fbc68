"""Hostile and wrong input: one ``pass-zoo: error:`` line, a non-zero exit, nothing half-written.

Each case runs the real CLI in this process (``main(argv)``), so monkeypatched failures (disk full,
permissions, NaN) hit the real code paths. Cases already covered elsewhere are listed in the
docs/robustness.md with the test that covers them.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import shutil
import struct
import types
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from pass_zoo.cli import main
from pass_zoo.errors import PassZooError, one_line

from conftest import write_image_folder

RUN_FILES = {"config.json", "masks.json", "masks.safetensors", "metrics.json", "model.safetensors",
             "hypernet.json", "hypernet.safetensors",  # a PASS run keeps its hypernetwork
             ".pass-zoo-run"}  # the marker that lets --overwrite replace the folder


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


_PROGRESS = re.compile(r"^(search|finetune|\s)")  # tqdm bars and the blank line that clears them


def _error(argv, rc=2) -> str:
    """Run ``argv``; it must fail with exit code ``rc`` and print exactly one line besides progress bars."""
    code, _, stderr = _run(argv)
    assert code == rc, stderr[-2000:]
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and not _PROGRESS.match(line)]
    assert len(lines) == 1 and lines[0].startswith("pass-zoo: "), stderr[-2000:]
    return lines[0]


def _tiny(out, *extra, dataset="fashion-mnist", model="resnet10t", steps=2):
    return ["prune", "--model", model, "--pretrained", "none", "--head", "new", "--dataset", dataset,
            "--img-size", "32", "--train-subset", "32", "--val-subset", "16", "--search-steps", str(steps),
            "--finetune-steps", str(steps), "--batch-size", "8", "--no-onnx", "--seed", "1", "--out", str(out), *extra]


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(".tmp")], list(folder.rglob("*"))


def _weights(tmp_path, name="w.safetensors") -> Path:
    path = tmp_path / name
    save_file(timm.create_model("resnet10t", num_classes=10).state_dict(), str(path))
    return path


# ------------------------------------------------------------------------------ models and weights
def test_architecture_the_adapter_cannot_prune(tmp_path):
    """Groups that cannot be gated exactly stay dense; with none left the adapter says which layer."""
    import torch.nn as nn

    from pass_zoo.graph.sequence import build_layer_sequence
    from pass_zoo.errors import AdapterError

    class OnlyMixedChannels(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.norm, self.head = nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4)

        def get_classifier(self):
            return self.head

        def forward(self, x):
            return self.head(self.norm(self.fc1(x)))

    with pytest.raises(AdapterError) as err:
        build_layer_sequence(OnlyMixedChannels(), torch.zeros(1, 8))
    line = str(err.value)
    assert "no prunable channel group" in line and "'norm' (LayerNorm)" in line and "\n" not in line


def test_truncated_pretrained_safetensors(tmp_path):
    path = _weights(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    line = _error(_tiny(tmp_path / "run", "--pretrained", path))
    assert f"cannot read weights {path}" in line


def test_tampered_pretrained_safetensors_header(tmp_path):
    path = _weights(tmp_path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[8,', 1)
    path.write_bytes(data[:8] + header + data[8 + n:])
    line = _error(_tiny(tmp_path / "run", "--pretrained", path))
    assert f"cannot read weights {path}" in line and "invalid offset" in line


def test_pretrained_weights_with_nan(tmp_path):
    sd = timm.create_model("resnet10t", num_classes=10).state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(sd, str(path))
    line = _error(_tiny(tmp_path / "run", "--pretrained", path))
    assert "'layer1.0.conv1.weight' holds NaN or infinite values" in line


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pth_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    path = tmp_path / "evil.pth"
    with open(path, "wb") as fh:
        pickle.dump({"conv1.weight": evil}, fh)
    line = _error(_tiny(tmp_path / "run", "--pretrained", path))
    assert f"cannot read weights {path}: the pickle holds objects other than tensors, which pass-zoo never " \
           "unpickles" in line
    assert "weights_only" not in line  # torch's hint to load it unsafely is not passed on
    assert not marker.exists()


# ------------------------------------------------------------------------------ datasets
def test_empty_dataset_folder(tmp_path):
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    line = _error(_tiny(tmp_path / "run", dataset=f"imagefolder:{tmp_path / 'data'}"))
    assert f"imagefolder:{tmp_path / 'data'}" in line and "Couldn't find any class folder" in line


def test_unreadable_dataset_folder(tmp_path, monkeypatch):
    data = write_image_folder(tmp_path / "data", ["ant", "bee"], n_train=2, n_val=1)
    real_scandir = os.scandir

    def scandir(path="."):  # what a user without read permission gets (tests run as root)
        if isinstance(path, (str, os.PathLike)) and Path(path) == data / "train":
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    line = _error(_tiny(tmp_path / "run", dataset=f"imagefolder:{data}"))
    assert f"cannot read {data / 'train'}: Permission denied" in line


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named_in_one_line(workers, tmp_path):
    data = write_image_folder(tmp_path / "data", ["ant", "bee", "cat"], n_train=4, n_val=2)
    broken = data / "train" / "bee" / "bee_1.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    # with workers the error comes back from a DataLoader worker wrapped in its traceback
    line = _error(_tiny(tmp_path / "run", "--workers", workers, "--batch-size", "12",  # one batch: every image
                        dataset=f"imagefolder:{data}"))
    assert line == f"pass-zoo: error: cannot read image {broken}: cannot identify image file '{broken}'"


def test_class_folders_differ_between_train_and_val(tmp_path):
    data = write_image_folder(tmp_path / "data", ["ant", "bee"], val_classes=["ant", "wasp"], n_train=2, n_val=1)
    line = _error(_tiny(tmp_path / "run", dataset=f"imagefolder:{data}"))
    assert "train and val class folders differ (only in train: ['bee'], only in val: ['wasp'])" in line


def test_worker_traceback_becomes_the_original_message():
    wrapped = ("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               '  File "x.py", line 1, in f\n    raise DataError(msg)\n'
               "pass_zoo.errors.DataError: cannot read image /d/a.png: truncated\n")
    assert one_line(PassZooError(wrapped)) == "cannot read image /d/a.png: truncated"
    assert one_line(OSError("first line\nsecond line")) == "first line"


@pytest.mark.parametrize("flag,value,expected", [
    ("--train-subset", "0", "subset size must be positive, got 0"),
    ("--checkpoint-every", "-1", "--checkpoint-every must be >= 0, got -1"),
    ("--num-processes", "0", "--num-processes must be >= 1, got 0"),
    ("--mixed-precision", "fp16", "--mixed-precision fp16 needs a GPU; on the CPU use bf16"),
])
def test_bad_settings(flag, value, expected, tmp_path):
    assert expected in _error(_tiny(tmp_path / "run", flag, value))
    assert not (tmp_path / "run").exists()


def test_num_processes_inside_accelerate_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert "do not combine it with accelerate launch" in _error(_tiny(tmp_path / "run", "--num-processes", "2"))


def test_bf16_on_the_cpu_runs(tmp_path):
    rc, stdout, stderr = _run(_tiny(tmp_path / "run", "--mixed-precision", "bf16"))
    assert rc == 0, stderr[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["config"]["mixed_precision"] == "bf16" and 0.0 <= m["top1"] <= 1.0
    assert m["macs_slim"] <= 0.5 * m["macs_dense"]


def test_masks_that_differ_between_processes_are_refused(monkeypatch):
    import accelerate.utils

    from pass_zoo.train.loop import check_same_across_processes, digest

    masks = [torch.tensor([True, False, True])]
    fake = types.SimpleNamespace(num_processes=2)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: obj + ["0" * 64])
    with pytest.raises(PassZooError, match=r"search masks differ between processes \(rank 0: \w{12}, rank 1: 0{12}\)"):
        check_same_across_processes(fake, "search masks", masks)
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda obj: obj + obj)
    assert check_same_across_processes(fake, "search masks", masks) == digest(masks)


# ------------------------------------------------------------------------------ the run folder
def test_out_that_cannot_be_created(tmp_path, monkeypatch):
    line = _error(_tiny("/etc/passwd/run"))
    assert line == "pass-zoo: error: cannot write /etc/passwd/run: Not a directory"
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, **kw):
        if str(path).startswith(str(tmp_path / "locked")):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, mode, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    line = _error(_tiny(tmp_path / "locked" / "run"))
    assert line == f"pass-zoo: error: cannot write {tmp_path / 'locked' / 'run'}: Permission denied"


def test_existing_out_points_to_overwrite_and_resume(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    line = _error(_tiny(tmp_path / "run"))
    assert "already exists and is not empty (pass --overwrite to replace it, or --resume to continue it)" in line
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def _fail_writes(monkeypatch, should_fail):
    """Disk full for files whose path ``should_fail(path)``: half of the bytes land, then ENOSPC."""
    real_write = os.write

    def write(fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if should_fail(path):
            real_write(fd, bytes(data[: max(1, len(data) // 2)]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_disk_full_while_writing_the_model(tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _fail_writes(m, lambda path: ".model.safetensors." in path)
        line = _error(_tiny(out))
    assert line == f"pass-zoo: error: cannot write {out / 'model.safetensors'}: No space left on device"
    assert not (out / "model.safetensors").exists() and not (out / "metrics.json").exists()
    _no_temporaries(out)
    assert (out / "checkpoints" / "finetune-000002" / "state.json").is_file()  # the work is not lost
    # space freed: --resume finishes from the last fine-tune checkpoint without training again
    rc, _, stderr = _run(_tiny(out, "--resume"))
    assert rc == 0, stderr[-2000:]
    assert {p.name for p in out.iterdir()} == RUN_FILES
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == {"stage": "finetune", "step": 2}


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}

    def should_fail(path):  # the first checkpoint (search step 2) is written, the next one fails
        if "/checkpoints/.search-" in path:
            calls["n"] += 1
            return calls["n"] > 3  # state.safetensors, rng.safetensors, state.json of step 2
        return False

    with monkeypatch.context() as m:
        _fail_writes(m, should_fail)
        line = _error(_tiny(out, "--checkpoint-every", "2", steps=6))
    assert line == f"pass-zoo: error: cannot write {out / 'checkpoints' / 'search-000004'}: No space left on device"
    _no_temporaries(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["search-000002"]
    good = out / "checkpoints" / "search-000002"
    assert json.loads((good / "state.json").read_text())["step"] == 2
    load_file(str(good / "state.safetensors"))  # complete and readable


# ------------------------------------------------------------------------------ NaN, Ctrl-C, resume
@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    """A run whose search loss turns NaN at step 4 (checkpoints every 2 steps)."""
    out = tmp_path_factory.mktemp("nan") / "run"
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def cross_entropy(logits, target, *a, **kw):
        calls["n"] += 1
        loss = real(logits, target, *a, **kw)
        # two cross-entropies per search step (the head's, then the class prototypes'): call 9 is step 4's head
        return loss * float("nan") if calls["n"] == 9 else loss

    import pass_zoo.methods.pass_.search

    functional = {name: getattr(torch.nn.functional, name) for name in dir(torch.nn.functional)
                  if not name.startswith("_")}
    fake = types.SimpleNamespace(**{**functional, "cross_entropy": cross_entropy})
    with pytest.MonkeyPatch.context() as m:
        m.setattr(pass_zoo.methods.pass_.search, "F", fake)
        code, _, stderr = _run(_tiny(out, "--checkpoint-every", "2", steps=6))
    return out, code, stderr


def test_nan_search_loss_stops_and_keeps_the_last_good_checkpoint(nan_run, tmp_path):
    out, code, stderr = nan_run
    lines = [x for x in stderr.replace("\r", "\n").splitlines() if x.strip() and not _PROGRESS.match(x)]
    assert code == 2
    assert lines == [f"pass-zoo: error: search loss became nan at step 4; stopped, the last good checkpoint "
                    f"(search step 4) is kept in {out / 'checkpoints'}; lower --search-lr-prompt/--search-lr-hypernet "
                    "and start again"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["search-000004"]
    _no_temporaries(out)
    tensors = load_file(str(out / "checkpoints" / "search-000004" / "state.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
    # the kept checkpoint is usable: --resume (the NaN was transient here) finishes the run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    rc, _, stderr = _run(_tiny(run, "--checkpoint-every", "2", "--resume", steps=6))
    assert rc == 0, stderr[-2000:]
    m = json.loads((run / "metrics.json").read_text())
    assert m["resumed_from"] == {"stage": "search", "step": 4} and len(m["config"]) > 0
    assert {p.name for p in run.iterdir()} == RUN_FILES


def test_diverging_fine_tune(tmp_path):
    line = _error(_tiny(tmp_path / "run", "--finetune-lr", "1e30", "--finetune-steps", "4"))
    assert "fine-tune loss became nan at step" in line or "fine-tune produced non-finite values" in line
    assert f"the last good checkpoint (the search result) is kept in {tmp_path / 'run' / 'checkpoints'}" in line
    assert "lower --finetune-lr" in line
    _no_temporaries(tmp_path / "run")


def test_ctrl_c_outside_the_training_loops(tmp_path, monkeypatch):
    import pass_zoo.pipeline

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(pass_zoo.pipeline, "load_task_data", interrupted)
    line = _error(_tiny(tmp_path / "run"), rc=130)
    assert line == "pass-zoo: interrupted"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("case,expected", [
    ("missing", "--resume: {out} does not exist (start the run without --resume)"),
    ("empty", "--resume: {out} has no checkpoint to resume from (none was written before the run stopped); "
              "start again with --overwrite"),
    ("finished", "--resume: {out} is a finished run (metrics.json exists); nothing to resume"),
    ("overwrite", "--resume continues the run in --out and --overwrite deletes it: pass one of them"),
    ("settings", "--resume: {out} was started with other settings: seed 1 (now 2); rerun with the original flags"),
    ("world", "--resume: the run used 2 process(es), this one 1; resume with the same --num-processes"),
    ("truncated", "cannot resume from {out}/checkpoints/search-000004: state.safetensors is unreadable"),
    ("steps", "cannot resume from {out}/checkpoints/search-000004: it was written for 6 search steps, "
              "this run has 8"),
])
def test_resume_refusals(case, expected, nan_run, tmp_path):
    out = tmp_path / "run"
    if case != "missing":
        shutil.copytree(nan_run[0], out)
    ckpt = out / "checkpoints" / "search-000004"
    extra = ["--resume"]
    if case == "empty":
        shutil.rmtree(out / "checkpoints")
    elif case == "finished":
        (out / "metrics.json").write_text("{}")
    elif case == "overwrite":
        extra.append("--overwrite")
    elif case == "settings":
        extra += ["--seed", "2"]
    elif case == "world":
        meta = json.loads((ckpt / "state.json").read_text())
        meta["world_size"] = 2
        (ckpt / "state.json").write_text(json.dumps(meta))
    elif case == "truncated":
        data = (ckpt / "state.safetensors").read_bytes()
        (ckpt / "state.safetensors").write_bytes(data[:100])
    elif case == "steps":  # a checkpoint for another length of search cannot continue this one
        meta = json.loads((ckpt / "state.json").read_text())
        meta["config"]["search"]["steps"] = 8
        (ckpt / "state.json").write_text(json.dumps(meta))
        extra += ["--search-steps", "8"]
    line = _error(_tiny(out, "--checkpoint-every", "2", *extra, steps=6))
    assert expected.format(out=out) in line
    if case not in ("missing", "empty"):
        assert ckpt.is_dir()  # a refused resume deletes nothing


def test_tampered_run_weights(tmp_path):
    out = tmp_path / "run"
    rc, _, stderr = _run(_tiny(out))
    assert rc == 0, stderr[-2000:]
    data = (out / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].replace(b'"data_offsets":[0,', b'"data_offsets":[8,', 1)  # same length
    (out / "model.safetensors").write_bytes(data[:8] + header + data[8 + n:])
    line = _error(["eval", out])  # metrics.json pins the weights the run measured
    assert f"{out / 'model.safetensors'} is not the file the run wrote" in line
    metrics = json.loads((out / "metrics.json").read_text())
    del metrics["file_sha256"]  # a run from before pins: the loader's own check
    (out / "metrics.json").write_text(json.dumps(metrics))
    line = _error(["eval", out])
    assert f"cannot load {out}: model.safetensors is truncated or corrupt" in line and "invalid offset" in line
    (out / "model.safetensors").write_bytes(data[:8] + b"{!" + data[10:])  # header that is not JSON
    line = _error(["eval", out])
    assert f"cannot load {out}: model.safetensors is truncated or corrupt" in line


def _forwarded(recorded: bytes):
    """(the first error line, everything shown) when the workers wrote ``recorded``."""
    from pass_zoo.train.launch import forward_worker_stderr

    r, w = os.pipe()
    os.write(w, recorded)
    os.close(w)
    shown = io.BytesIO()
    try:
        first = forward_worker_stderr(r, shown)
    finally:
        os.close(r)
    return first, shown.getvalue()


def test_num_processes_shows_one_line_of_the_workers_stderr():
    """What two workers and the launcher print after Ctrl-C (recorded), as ``--num-processes`` shows it."""
    line = b"pass-zoo: interrupted at search step 3 of 16; checkpoint saved in /r/checkpoints/search-000003 (...)\n"
    recorded = (
        b"\rsearch:   0%|          | 0/16 [00:00<?, ?it/s]"
        b"W1128 06:50:01.373000 20610 site-packages/torch/distributed/elastic/multiprocessing/api.py:1028] "
        b"Sending process 2434 closing signal SIGINT\n"
        b"\rsearch:  19%|#9        | 3/16 [00:01<00:04,  2.84it/s, loss=2.305]" + line
        + b"\r                     \r" + line
        + b"Traceback (most recent call last):\n  File \"accelerate\", line 8\n"
        b"torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n====\npass_zoo.cli FAILED\n")
    first, shown = _forwarded(recorded)
    assert first == line
    text = shown.decode()
    assert text.endswith("loss=2.305]\n" + line.decode())  # the open progress bar is ended first
    lines = [x for x in text.replace("\r", "\n").splitlines() if x.strip() and not _PROGRESS.match(x)]
    assert lines == [line.decode().strip()]


def test_two_workers_errors_written_into_one_line_show_once():
    """Two workers' copies of the same error, their newlines written after both texts (a loaded CPU)."""
    line = b"pass-zoo: error: imagefolder:/x needs class folders under /x/train"
    assert _forwarded(line + line + b"\n\n") == (line + b"\n", line + b"\n")


def test_num_processes_error_is_one_line_and_exit_2(tmp_path):
    """A worker's error under --num-processes: the launcher's traceback and report are not shown."""
    import subprocess
    import sys

    from conftest import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    argv = _tiny(tmp_path / "run", "--num-processes", "2", dataset="imagefolder:/nonexistent/pz")
    proc = subprocess.run([sys.executable, "-m", "pass_zoo.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    lines = [x for x in proc.stderr.replace("\r", "\n").splitlines() if x.strip()]
    assert lines == ["pass-zoo: error: imagefolder:/nonexistent/pz needs class folders under /nonexistent/pz/train"]
    assert not (tmp_path / "run").exists()
