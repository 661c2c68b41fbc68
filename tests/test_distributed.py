"""A real two-process CPU run through ``accelerate launch`` (gloo)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import torch

from pass_zoo.graph.cost_model import count_macs

from conftest import ROOT

RUN_FILES = {"config.json", "masks.json", "masks.safetensors", "metrics.json", "model.safetensors",
             "model.onnx", "export.json", "hypernet.json", "hypernet.safetensors",
             ".pass-zoo-run"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_cpu_run(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["OMP_NUM_THREADS"] = "1"
    env.pop("RANK", None)
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           "-m", "pass_zoo.cli", "prune", "--model", "resnet10t", "--pretrained", "none", "--head", "new",
           "--dataset", "fashion-mnist", "--img-size", "32", "--train-subset", "64", "--val-subset", "32",
           "--search-steps", "2", "--finetune-steps", "2", "--batch-size", "8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr

    assert {p.name for p in out.iterdir()} == RUN_FILES
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["val_images"] == 32 and m["train_images"] == 64
    assert 0.0 <= m["top1"] <= 1.0 and (m["top1"] * 32) == round(m["top1"] * 32)
    assert m["macs_slim"] <= 0.5 * m["macs_dense"]
    summary = json.loads((out / "masks.json").read_text())
    assert summary["macs_slim"] == m["macs_slim"]
    # only the main process prints the summary
    assert proc.stdout.count("run folder") == 1
    assert "2 process(es)" in proc.stdout

    # the export written by rank 0 is complete and consistent
    import pass_zoo

    model = pass_zoo.load_run_model(out)
    assert count_macs(model, torch.zeros(1, 3, 32, 32)) == m["macs_slim"]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sys.modules["pass_zoo"].__file__.startswith(str(ROOT))
