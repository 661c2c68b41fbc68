"""Datasets: real Fashion-MNIST (Debian package), malformed IDX files, image folders, subsets."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pass_zoo.data import (FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, DataSpec, GrayscaleTensorDataset,
                           load_task_data, make_loader, subset)
from pass_zoo.errors import DataError

from conftest import write_image_folder

MEAN, STD = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_raw(path):
    """An independent IDX reader (numpy) to check the package's against."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(dims)


def _unnormalise(x):
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


@pytest.fixture(scope="module")
def fmnist():
    return load_task_data("fashion-mnist", DataSpec(img_size=28, mean=MEAN, std=STD))


def test_real_fashion_mnist_sizes_and_classes(fmnist):
    assert len(fmnist.train) == 60000 and len(fmnist.val) == 10000
    assert fmnist.num_classes == 10 and fmnist.class_names == FASHION_MNIST_CLASSES
    labels = torch.as_tensor(_read_raw(Path(FASHION_MNIST_DIR) / FILES["val"][1]).astype(np.int64))
    assert torch.equal(torch.bincount(labels), torch.full((10,), 1000))  # t10k: 1000 per class


def test_real_fashion_mnist_items_are_normalised(fmnist):
    images = _read_raw(Path(FASHION_MNIST_DIR) / FILES["val"][0])
    labels = _read_raw(Path(FASHION_MNIST_DIR) / FILES["val"][1])
    for i in (0, 1, 4321, 9999):
        x, y = fmnist.val[i]
        assert x.shape == (3, 28, 28) and x.dtype == torch.float32
        assert int(y) == int(labels[i])
        expected = torch.from_numpy(images[i].astype(np.float32) / 255.0)
        # (x - mean) / std with the given mean/std, the same grey image in each channel
        assert torch.allclose(_unnormalise(x), expected.expand(3, -1, -1), atol=1e-5)

    # the training split flips at random, nothing else
    train_images = _read_raw(Path(FASHION_MNIST_DIR) / FILES["train"][0])
    raw = torch.from_numpy(train_images[7].astype(np.float32) / 255.0).expand(3, -1, -1)
    seen_flip = seen_plain = False
    for _ in range(40):
        u = _unnormalise(fmnist.train[7][0])
        seen_plain |= bool(torch.allclose(u, raw, atol=1e-5))
        seen_flip |= bool(torch.allclose(u, raw.flip(-1), atol=1e-5))
        assert torch.allclose(u, raw, atol=1e-5) or torch.allclose(u, raw.flip(-1), atol=1e-5)
    assert seen_plain and seen_flip


def test_fashion_mnist_is_resized_to_the_model_size(fmnist):
    spec = DataSpec(img_size=16, mean=MEAN, std=STD)
    ds = GrayscaleTensorDataset(fmnist.val.images[:3], fmnist.val.labels[:3], spec, train=False)
    for i in range(3):
        x, _ = ds[i]
        assert x.shape == (3, 16, 16)
        u = _unnormalise(x)
        assert torch.allclose(u[0], u[1]) and torch.allclose(u[1], u[2])
        assert u.min() >= -1e-5 and u.max() <= 1 + 1e-5
        # a 28 -> 16 px bilinear resize keeps the mean brightness
        assert abs(float(u.mean()) - float(fmnist.val.images[i].float().mean() / 255)) < 0.03


# ------------------------------------------------------------------------- malformed IDX files
def _idx(dims, payload=None):
    header = bytes([0, 0, 8, len(dims)]) + struct.pack(">" + "I" * len(dims), *dims)
    n = int(np.prod(dims)) if dims else 0
    return header + (payload if payload is not None else bytes(i % 251 for i in range(n)))


def _write_fmnist(folder: Path, n_train=5, n_val=3, override=None):
    folder.mkdir(parents=True, exist_ok=True)
    content = {
        FILES["train"][0]: _idx((n_train, 28, 28)), FILES["train"][1]: _idx((n_train,), bytes(range(n_train))),
        FILES["val"][0]: _idx((n_val, 28, 28)), FILES["val"][1]: _idx((n_val,), bytes(range(n_val))),
    }
    content.update(override or {})
    for name, data in content.items():
        (folder / name).write_bytes(gzip.compress(data) if not name.startswith("raw:") else data)
    return folder


SPEC = DataSpec(img_size=8, mean=MEAN, std=STD)


def test_small_valid_idx_set_loads(tmp_path):
    task = load_task_data(f"fashion-mnist:{_write_fmnist(tmp_path / 'fm')}", SPEC)
    assert len(task.train) == 5 and len(task.val) == 3
    assert [int(task.val[i][1]) for i in range(3)] == [0, 1, 2]
    assert task.val[0][0].shape == (3, 8, 8)


def test_truncated_idx_payload_is_a_data_error(tmp_path):
    bad = _idx((5, 28, 28), bytes(100))
    folder = _write_fmnist(tmp_path / "fm", override={FILES["train"][0]: bad})
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz is truncated: expected 3920 bytes, found 100"):
        load_task_data(f"fashion-mnist:{folder}", SPEC)


def test_truncated_gzip_stream_is_a_data_error(tmp_path):
    folder = _write_fmnist(tmp_path / "fm")
    path = folder / FILES["val"][0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read .*t10k-images-idx3-ubyte\.gz"):
        load_task_data(f"fashion-mnist:{folder}", SPEC)


def test_not_gzip_is_a_data_error(tmp_path):
    folder = _write_fmnist(tmp_path / "fm")
    (folder / FILES["train"][1]).write_bytes(b"this is not an IDX file at all")
    with pytest.raises(DataError, match=r"cannot read .*train-labels-idx1-ubyte\.gz"):
        load_task_data(f"fashion-mnist:{folder}", SPEC)


def test_non_uint8_idx_is_a_data_error(tmp_path):
    float_idx = bytes([0, 0, 0x0D, 1]) + struct.pack(">I", 5) + bytes(20)
    folder = _write_fmnist(tmp_path / "fm", override={FILES["train"][1]: float_idx})
    with pytest.raises(DataError, match="is not a uint8 IDX file"):
        load_task_data(f"fashion-mnist:{folder}", SPEC)


def test_idx_with_truncated_header_is_a_data_error(tmp_path):
    # claims 3 dimensions but the file ends inside the second one
    cut = bytes([0, 0, 8, 3]) + struct.pack(">I", 5) + b"\x00\x00"
    folder = _write_fmnist(tmp_path / "fm", override={FILES["train"][0]: cut})
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz"):
        load_task_data(f"fashion-mnist:{folder}", SPEC)


def test_idx_with_zero_images_is_a_data_error(tmp_path):
    folder = _write_fmnist(tmp_path / "fm", override={FILES["val"][0]: _idx((0, 28, 28)),
                                                      FILES["val"][1]: _idx((0,))})
    with pytest.raises(DataError, match=r"0 images"):
        load_task_data(f"fashion-mnist:{folder}", SPEC)


def test_images_and_labels_disagree(tmp_path):
    folder = _write_fmnist(tmp_path / "fm", override={FILES["train"][1]: _idx((4,), bytes(4))})
    with pytest.raises(DataError, match=r"train split in .* has 5 images and 4 labels"):
        load_task_data(f"fashion-mnist:{folder}", SPEC)


def test_missing_fashion_mnist_names_the_apt_package(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as exc:
        load_task_data(f"fashion-mnist:{missing}", SPEC)
    msg = str(exc.value)
    assert str(missing) in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte.gz" in msg
    # the default location can be moved with an environment variable
    monkeypatch.setenv("PASS_ZOO_FASHION_MNIST", str(missing))
    with pytest.raises(DataError, match=f"not found in {missing}"):
        load_task_data("fashion-mnist", SPEC)


def test_unknown_dataset_names_the_accepted_forms():
    with pytest.raises(DataError, match=r"unknown dataset 'cifar10'.*fashion-mnist\[:DIR\].*imagefolder:PATH"):
        load_task_data("cifar10", SPEC)
    with pytest.raises(DataError, match="imagefolder needs a path"):
        load_task_data("imagefolder", SPEC)


# ---------------------------------------------------------------------------------- image folders
def test_image_folder_loads_pngs(image_folder):
    spec = DataSpec(img_size=16, mean=MEAN, std=STD, interpolation="bilinear", crop_pct=1.0)
    task = load_task_data(f"imagefolder:{image_folder}", spec)
    assert task.class_names == ["ant", "bee", "cat"]
    assert len(task.train) == 12 and len(task.val) == 6
    assert sorted(int(task.val[i][1]) for i in range(6)) == [0, 0, 1, 1, 2, 2]
    for ds in (task.train, task.val):
        x, y = ds[0]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32


def test_image_folder_normalises_with_the_given_mean_std(tmp_path):
    from PIL import Image

    colours = {"blue": (10, 20, 230), "red": (200, 30, 40)}
    for split in ("train", "val"):
        for cls, rgb in colours.items():
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (24, 24), rgb).save(tmp_path / split / cls / "a.png")
    spec = DataSpec(img_size=16, mean=MEAN, std=STD, interpolation="bilinear", crop_pct=1.0)
    task = load_task_data(f"imagefolder:{tmp_path}", spec)
    for i, cls in enumerate(task.class_names):
        x, y = task.val[i]
        assert int(y) == i
        expected = (torch.tensor(colours[cls]) / 255.0 - torch.tensor(MEAN)) / torch.tensor(STD)
        assert torch.allclose(x, expected.view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def test_image_folder_with_different_classes_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "imgs", ["ant", "bee", "cat"], val_classes=["ant", "bee", "dog"],
                              n_train=1, n_val=1)
    with pytest.raises(DataError) as exc:
        load_task_data(f"imagefolder:{root}", SPEC)
    msg = str(exc.value)
    assert "train and val class folders differ" in msg
    assert "only in train: ['cat']" in msg and "only in val: ['dog']" in msg


def test_image_folder_without_val_split_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "imgs", ["ant"], n_train=1, n_val=1)
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(DataError, match=r"needs class folders under .*val"):
        load_task_data(f"imagefolder:{root}", SPEC)


def test_image_folder_without_images_is_refused(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "ant").mkdir(parents=True)
        (tmp_path / split / "ant" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=f"imagefolder:{tmp_path}"):
        load_task_data(f"imagefolder:{tmp_path}", SPEC)


def test_unreadable_image_is_a_data_error(tmp_path):
    root = write_image_folder(tmp_path / "imgs", ["ant", "bee"], n_train=1, n_val=1)
    broken = root / "val" / "bee" / "bee_0.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    task = load_task_data(f"imagefolder:{root}", SPEC)
    with pytest.raises(DataError, match=r"cannot read image .*bee_0\.png"):
        task.val[1]


def test_missing_image_folder_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"imagefolder:/nonexistent/pz needs class folders"):
        load_task_data("imagefolder:/nonexistent/pz", SPEC)


# ---------------------------------------------------------------------------------- subsets
def test_subset_is_deterministic():
    ds = torch.utils.data.TensorDataset(torch.arange(100))
    a, b, c = subset(ds, 10, seed=3), subset(ds, 10, seed=3), subset(ds, 10, seed=4)
    assert len(a) == 10
    assert a.indices == b.indices
    assert a.indices != c.indices
    assert len(set(a.indices)) == 10 and all(0 <= i < 100 for i in a.indices)
    assert [int(a[i][0]) for i in range(10)] == a.indices
    assert subset(ds, None, 0) is ds and subset(ds, 100, 0) is ds and subset(ds, 500, 0) is ds
    with pytest.raises(DataError, match="subset size must be positive, got 0"):
        subset(ds, 0, 0)
    with pytest.raises(DataError, match="got -5"):
        subset(ds, -5, 0)


def test_make_loader_shuffles_reproducibly_and_drops_the_last_training_batch():
    ds = torch.utils.data.TensorDataset(torch.arange(10))
    train = [b[0].tolist() for b in make_loader(ds, 4, train=True, seed=5)]
    again = [b[0].tolist() for b in make_loader(ds, 4, train=True, seed=5)]
    assert train == again and len(train) == 2 and all(len(b) == 4 for b in train)
    assert train != [[0, 1, 2, 3], [4, 5, 6, 7]]  # shuffled
    val = [b[0].tolist() for b in make_loader(ds, 4, train=False, seed=5)]
    assert val == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
