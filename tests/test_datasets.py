"""The datasets timm users bring: timm's torch/NAME names and Hugging Face datasets saved to disk,
read offline with the backbone's timm transforms; a name that needs a download is one line."""
from __future__ import annotations

import contextlib
import io
import json
import struct

import numpy as np
import pytest

from pass_zoo.cli import main
from pass_zoo.data import DataSpec, load_task_data

SPEC = DataSpec(img_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, err.getvalue()


def _tiny_prune(dataset, out):
    return ["prune", "--model", "resnet10t", "--pretrained", "none", "--dataset", dataset, "--img-size", "32",
            "--search-steps", "1", "--finetune-steps", "1", "--batch-size", "4", "--no-onnx", "--out", str(out)]


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    import datasets  # a test extra (scripts/setup.sh installs it)
    rng = np.random.default_rng(0)

    def split(n):
        images = [rng.integers(0, 256, (20, 24, 3), dtype=np.uint8) for _ in range(n)]
        return {"img": images, "label": [i % 3 for i in range(n)]}

    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=["ant", "bee", "cat"])})
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict(split(12), features=features),
                               "test": datasets.Dataset.from_dict(split(6), features=features)})
    path = tmp_path_factory.mktemp("hf") / "saved"
    dd.save_to_disk(str(path))
    return path


def test_hf_dataset_saved_to_disk_loads_with_timm_transforms(hf_folder):
    task = load_task_data(f"hf-disk:{hf_folder}", SPEC)
    assert task.class_names == ["ant", "bee", "cat"]
    assert (len(task.train), len(task.val)) == (12, 6)
    x, y = task.val[4]
    assert tuple(x.shape) == (3, 32, 32) and y == 1
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0  # normalised with mean = std = 0.5


def test_prune_runs_on_a_saved_hf_dataset(hf_folder, tmp_path):
    rc, err = _run(_tiny_prune(f"hf-disk:{hf_folder}", tmp_path / "run"))
    assert rc == 0, err[-2000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["class_names"] == ["ant", "bee", "cat"] and m["train_images"] == 12 and m["val_images"] == 6


def test_a_single_split_or_a_missing_folder_is_one_line(hf_folder, tmp_path):
    import datasets

    datasets.load_from_disk(str(hf_folder))["train"].save_to_disk(str(tmp_path / "one"))
    for name, expected in ((f"hf-disk:{tmp_path / 'one'}", "holds one split"),
                           (f"hf-disk:{tmp_path / 'absent'}", "no such folder")):
        rc, err = _run(_tiny_prune(name, tmp_path / "run"))
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and expected in lines[0], err
        assert not (tmp_path / "run").exists()


def _idx(path, array):
    """An MNIST-style idx file (what torchvision's MNIST family reads)."""
    dims = array.shape
    code = 0x08
    path.write_bytes(struct.pack(">HBB", 0, code, len(dims)) + struct.pack(f">{len(dims)}I", *dims)
                     + array.astype(np.uint8).tobytes())


def test_timm_torch_name_reads_a_local_torchvision_folder(tmp_path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 10), ("t10k", 4)):
        _idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    task = load_task_data(f"torch/fashion_mnist:{tmp_path / 'data'}", SPEC)
    assert (len(task.train), len(task.val)) == (10, 4) and len(task.class_names) == 10
    x, y = task.train[3]
    assert tuple(x.shape) == (3, 32, 32) and y == 3


def test_a_torch_name_that_needs_a_download_is_one_line(tmp_path):
    rc, err = _run(_tiny_prune(f"torch/cifar10:{tmp_path / 'empty'}", tmp_path / "run"))
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert "torch/cifar10 is not available under" in lines[0] and "not downloaded here" in lines[0]
