"""Datasets: ``fashion-mnist`` (offline, Debian's dataset-fashion-mnist) and ``imagefolder:PATH``.

Images come out resized to the model's input size and normalised with the backbone's own
``pretrained_cfg`` mean/std (resolved by timm), so the prompt and the network see what they expect.
"""
from __future__ import annotations

import gzip
import math
import os
import random
import signal
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .backbone import _probe
from .errors import DataError, one_line
from .validate import FASHION_MNIST_DIR

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DATASET_HELP = ("fashion-mnist[:DIR] (Debian package dataset-fashion-mnist), imagefolder:PATH (PATH/train, PATH/val), "
                "hf-disk:PATH (a Hugging Face dataset saved with save_to_disk), timm's torch/NAME[:ROOT] or "
                "hfds/NAME[:ROOT] (already downloaded; ROOT default ~/.cache/pass-zoo/datasets), "
                "or sklearn-digits (scikit-learn's bundled 8x8 digits); append @0-4 or @1,3,5 to keep some classes")


@dataclass
class DataSpec:
    """How images must look for one backbone."""

    img_size: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0

    @classmethod
    def from_config(cls, dc: dict) -> "DataSpec":
        """From a timm data config (``resolve_data_config``) or the same keys recorded in an export."""
        return cls(img_size=int(dc["input_size"][-1]), mean=tuple(dc["mean"]), std=tuple(dc["std"]),
                   interpolation=dc.get("interpolation", "bilinear"), crop_pct=float(dc.get("crop_pct", 1.0)))


def data_spec_for(model, img_size: Optional[int] = None) -> DataSpec:
    """The preprocessing timm resolves for ``model`` (its ``pretrained_cfg``), at ``img_size`` if given."""
    from timm.data import resolve_data_config

    args = {"input_size": (3, img_size, img_size)} if img_size else {}
    return DataSpec.from_config(resolve_data_config(args, model=model))


@dataclass
class TaskData:
    train: Dataset
    val: Dataset
    class_names: List[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _read_idx(path: Path) -> torch.Tensor:
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4:
        raise DataError(f"{path} is not an IDX file (too short)")
    dtype, ndim = raw[2], raw[3]
    if dtype != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file")
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is truncated: its header declares {ndim} dimensions but ends after {len(raw)} bytes")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = raw[4 + 4 * ndim:]
    expected = math.prod(dims)
    if len(data) != expected:
        raise DataError(f"{path} is truncated: expected {expected} bytes, found {len(data)}")
    if expected == 0:
        return torch.zeros(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*dims)


class GrayscaleTensorDataset(Dataset):
    """uint8 grayscale images in memory -> normalised 3-channel tensors at the model's size."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, spec: DataSpec, train: bool):
        self.images, self.labels, self.spec, self.train = images, labels.long(), spec, train
        self.mean = torch.tensor(spec.mean).view(3, 1, 1)
        self.std = torch.tensor(spec.std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        # timm's eval transform on a tensor: resize to img_size / crop_pct with the model's
        # interpolation, centre-crop img_size; so config.json's pretrained_cfg tells the truth.
        size = self.spec.img_size
        scaled = int(math.floor(size / self.spec.crop_pct))
        mode = self.spec.interpolation if self.spec.interpolation in ("bilinear", "bicubic") else "bilinear"
        x = self.images[i].float().div(255.0)[None, None]
        x = F.interpolate(x, size=(scaled, scaled), mode=mode, align_corners=False).clamp_(0.0, 1.0)
        top = (scaled - size) // 2
        x = x[0, :, top:top + size, top:top + size].expand(3, -1, -1)
        if self.train and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - self.mean) / self.std, self.labels[i]


def _fashion_mnist(root: str, spec: DataSpec) -> TaskData:
    root_path = Path(root)
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    missing = [n for pair in names.values() for n in pair if not (root_path / n).is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST not found in {root} (missing {missing[0]}); "
                        "install it with 'apt-get install dataset-fashion-mnist' or pass fashion-mnist:DIR")
    splits = {}
    for split, (img, lab) in names.items():
        images, labels = _read_idx(root_path / img), _read_idx(root_path / lab)
        if len(images) != len(labels) or len(images) == 0:
            raise DataError(f"Fashion-MNIST {split} split in {root} has {len(images)} images and {len(labels)} labels")
        splits[split] = GrayscaleTensorDataset(images, labels, spec, train=(split == "train"))
    return TaskData(splits["train"], splits["val"], list(FASHION_MNIST_CLASSES))


def read_image(path):
    """An image file as 8-bit RGB. High-bit-depth grey images (16-bit PNG: Pillow modes ``I;16*``
    and ``I``) are scaled to 8 bits, not clipped (``convert("RGB")`` would make them all white);
    32-bit float images are refused rather than guessed."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            return to_rgb(img, path)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def to_rgb(img, where):
    """A PIL image as 8-bit RGB, high bit depths scaled (see ``read_image``); ``where`` names it in errors."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(f"cannot read image {where}: {img.mode} pixel values outside 0..65535")
        grey = np.rint(arr * (255.0 / 65535.0)).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if img.mode == "F":
        raise DataError(f"cannot read image {where}: 32-bit float images (mode F) have no fixed "
                        "range; save it as an 8- or 16-bit image")
    return img.convert("RGB")


def check_links(folder: Path, root: str) -> None:
    """Refuse symbolic links that would make torchvision's walk (which follows links) read images
    twice or forever: a link to a folder above it (a loop), or any link out of the dataset root."""
    base = os.path.realpath(Path(root))

    def walk(path: Path, chain: tuple) -> None:
        try:
            entries = list(os.scandir(path))
        except OSError:
            return  # unreadable folders are reported by ImageFolder itself
        for entry in entries:
            if entry.is_symlink():
                target = os.path.realpath(entry.path)
                shown = f"{entry.path} -> {os.readlink(entry.path)}"
                if os.path.commonpath([base, target]) != base:
                    raise DataError(f"imagefolder:{root}: the symbolic link {shown} leaves the dataset folder; "
                                    "copy the files in or remove the link")
                if os.path.isdir(target) and target in chain:
                    raise DataError(f"imagefolder:{root}: the symbolic link {shown} points to a folder above "
                                    "it (a loop that would repeat its images without end); remove it")
            if entry.is_dir(follow_symlinks=True):
                real = os.path.realpath(entry.path)
                walk(Path(entry.path), chain + (real,))

    walk(folder, (os.path.realpath(folder),))


def timm_transforms(spec: DataSpec):
    """timm's (training, evaluation) transforms for the backbone's size, mean/std, interpolation, crop."""
    from timm.data import create_transform

    common = dict(input_size=(3, spec.img_size, spec.img_size), mean=spec.mean, std=spec.std,
                  interpolation=spec.interpolation)
    return create_transform(is_training=True, **common), create_transform(crop_pct=spec.crop_pct, **common)


def _image_folder(root: str, spec: DataSpec) -> TaskData:
    from torchvision.datasets import ImageFolder

    root_path = Path(root)
    for split in ("train", "val"):
        if not (root_path / split).is_dir():
            raise DataError(f"imagefolder:{root} needs class folders under {root_path / split}")
    for split in ("train", "val"):
        check_links(root_path / split, root)

    train_tf, val_tf = timm_transforms(spec)
    try:
        train = ImageFolder(str(root_path / "train"), train_tf, loader=read_image)
        val = ImageFolder(str(root_path / "val"), val_tf, loader=read_image)
    except (FileNotFoundError, RuntimeError) as exc:  # torchvision: no class folder / no valid file
        raise DataError(f"imagefolder:{root}: {exc}") from exc
    except OSError as exc:  # e.g. a folder the user may not read
        raise DataError(f"imagefolder:{root}: cannot read {exc.filename or root}: {exc.strerror or exc}") from exc
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"imagefolder:{root}: train and val class folders differ "
                        f"(only in train: {only_train[:5]}, only in val: {only_val[:5]})")
    return TaskData(train, val, list(train.classes))


class _Transformed(Dataset):
    """(image, label) items of another dataset, made RGB and passed through ``transform``."""

    def __init__(self, items, transform, where: str):
        self.items, self.transform, self.where = items, transform, where

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        img, label = self.items[i]
        return self.transform(to_rgb(img, f"{self.where}[{i}]")), int(label)


class _HFColumns:
    """Index a Hugging Face ``datasets.Dataset`` as (PIL image, label) pairs."""

    def __init__(self, ds, image: str, label: str):
        self.ds, self.image, self.label = ds, image, label

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        row = self.ds[int(i)]
        return row[self.image], row[self.label]


_VAL_SPLITS = ("validation", "val", "test")


def _hf_disk(path: str, spec: DataSpec) -> TaskData:
    """A dataset saved with ``datasets``' ``save_to_disk``: a DatasetDict with a train split and a
    validation/val/test split, an Image column and a ClassLabel column."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError("hf-disk: needs the 'datasets' package (pip install datasets)") from exc
    if not path or not Path(path).is_dir():
        raise DataError(f"hf-disk:{path}: no such folder (a dataset saved with datasets' save_to_disk)")
    try:
        saved = datasets.load_from_disk(path)
    except Exception as exc:
        raise DataError(f"hf-disk:{path} is not a saved Hugging Face dataset: {one_line(exc)}") from exc
    if not isinstance(saved, datasets.DatasetDict):
        raise DataError(f"hf-disk:{path} holds one split; save a DatasetDict with 'train' and 'test' (or "
                        "'validation') splits")
    val_name = next((n for n in _VAL_SPLITS if n in saved), None)
    if "train" not in saved or val_name is None:
        raise DataError(f"hf-disk:{path} has splits {sorted(saved)}; it needs 'train' and one of {list(_VAL_SPLITS)}")
    return _hf_task(saved["train"], saved[val_name], spec, f"hf-disk:{path}")


def _hf_task(train_ds, val_ds, spec: DataSpec, where: str) -> TaskData:
    import datasets

    features = train_ds.features
    image = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
    label = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
    if image is None or label is None:
        raise DataError(f"{where}: needs an Image column and a ClassLabel column, found "
                        f"{', '.join(f'{k} ({type(f).__name__})' for k, f in features.items())}")
    train_tf, val_tf = timm_transforms(spec)
    return TaskData(_Transformed(_HFColumns(train_ds, image, label), train_tf, where),
                    _Transformed(_HFColumns(val_ds, image, label), val_tf, where), list(features[label].names))


def _timm_dataset(name: str, root: str, spec: DataSpec) -> TaskData:
    """timm's own dataset names: ``torch/NAME`` (torchvision) and ``hfds/NAME`` (Hugging Face Hub),
    read from ``root``. Downloads are not attempted: a name that is not there already is one line."""
    from timm.data import create_dataset

    root = root or os.environ.get("PASS_ZOO_DATA", str(Path.home() / ".cache" / "pass-zoo" / "datasets"))
    if name.startswith("hfds/"):
        _hub_reachable_or_offline(name)
    train_tf, val_tf = timm_transforms(spec)
    try:
        train = create_dataset(name, root=root, split="train", is_training=True, download=False)
        val = create_dataset(name, root=root, split="validation", is_training=False, download=False)
    except ImportError as exc:
        raise DataError(f"{name}: needs {exc.name or 'a missing package'} (pip install it)") from exc
    except Exception as exc:  # torchvision: "Dataset not found or corrupted"; datasets: not cached offline
        raise DataError(f"{name} is not available under {root} and is not downloaded here "
                        f"({one_line(exc)}); fetch it once online, or pass {name}:ROOT") from exc
    classes = getattr(train, "classes", None)
    if not classes:
        reader = getattr(train, "reader", None)
        classes = getattr(reader, "class_names", None) or getattr(reader, "label_names", None)
    if not classes:
        raise DataError(f"{name}: timm's dataset does not name its classes")
    return TaskData(_Transformed(train, train_tf, name), _Transformed(val, val_tf, name), [str(c) for c in classes])


def _hub_reachable_or_offline(name: str) -> None:
    """hfds/ names load through ``datasets``: offline (or the Hub unreachable) they must come from its
    cache, in one try instead of a minute of retries."""
    import huggingface_hub.constants as hf_constants


    if hf_constants.HF_HUB_OFFLINE:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return
    why = _probe(hf_constants.ENDPOINT)
    if why is not None:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"


def _sklearn_digits(spec: DataSpec) -> TaskData:
    """scikit-learn's bundled 8x8 digits (1797 images, no download); a fixed 80/20 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("sklearn-digits needs scikit-learn (pip install scikit-learn)") from exc
    digits = load_digits()
    images = torch.as_tensor(digits.images * (255.0 / 16.0)).round().to(torch.uint8)
    labels = torch.as_tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    n_train = int(0.8 * len(labels))
    tr, va = order[:n_train], order[n_train:]
    return TaskData(GrayscaleTensorDataset(images[tr], labels[tr], spec, train=True),
                    GrayscaleTensorDataset(images[va], labels[va], spec, train=False),
                    [str(i) for i in range(10)])


def _parse_classes(text: str, n: int) -> List[int]:
    try:
        out = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError as exc:
        raise DataError(f"cannot read the class list '@{text}' (use e.g. @0-4 or @1,3,5)") from exc
    bad = [c for c in out if not 0 <= c < n]
    if bad or len(set(out)) != len(out) or len(out) < 2:
        raise DataError(f"class list '@{text}' must name at least two distinct classes in 0..{n - 1}")
    return out


def _labels_of(ds: Dataset) -> torch.Tensor:
    if hasattr(ds, "labels"):
        return torch.as_tensor(ds.labels)
    if hasattr(ds, "targets"):
        return torch.as_tensor(ds.targets)
    raise DataError(f"cannot select classes of a {type(ds).__name__}")


class _Relabel(Dataset):
    """Keep some classes of a dataset and number them 0..k-1 in the order given."""

    def __init__(self, ds: Dataset, classes: List[int]):
        labels = _labels_of(ds)
        self.ds = ds
        self.new_label = {c: i for i, c in enumerate(classes)}
        self.indices = [i for i, y in enumerate(labels.tolist()) if y in self.new_label]
        self.labels = torch.as_tensor([self.new_label[int(labels[i])] for i in self.indices])

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        x, y = self.ds[self.indices[i]]
        return x, self.new_label[int(y)]


def load_task_data(name: str, spec: DataSpec) -> TaskData:
    """Resolve a dataset name (see ``DATASET_HELP``) into train/val datasets."""
    source, _, classes = name.partition("@")
    kind, _, arg = source.partition(":")
    if kind == "fashion-mnist":
        task = _fashion_mnist(arg or os.environ.get("PASS_ZOO_FASHION_MNIST", FASHION_MNIST_DIR), spec)
    elif kind == "imagefolder":
        if not arg:
            raise DataError("imagefolder needs a path: imagefolder:PATH")
        task = _image_folder(arg, spec)
    elif kind == "sklearn-digits":
        task = _sklearn_digits(spec)
    elif kind == "hf-disk":
        task = _hf_disk(arg, spec)
    elif kind.startswith(("torch/", "hfds/")):
        task = _timm_dataset(kind, arg, spec)
    else:
        raise DataError(f"unknown dataset '{name}'; use {DATASET_HELP}")
    if classes:
        keep = _parse_classes(classes, task.num_classes)
        task = TaskData(_Relabel(task.train, keep), _Relabel(task.val, keep), [task.class_names[c] for c in keep])
    return task


def subset(ds: Dataset, n: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of ``n`` items (all when n is None or larger than the dataset)."""
    if n is None or n >= len(ds):
        return ds
    if n <= 0:
        raise DataError(f"subset size must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    return Subset(ds, torch.randperm(len(ds), generator=g)[:n].tolist())


HOLDOUT_SEED = 20240724  # one fixed split for every run seed: settings are chosen on the same images


def hold_out(task: TaskData, n: int) -> TaskData:
    """``n`` training images become the validation set and leave the training set (the test set is
    not touched): what settings are chosen on, so that no choice is tuned on the test images."""
    if not 0 < n < len(task.train):
        raise DataError(f"--holdout must be in (0, {len(task.train)}), got {n}")
    order = torch.randperm(len(task.train), generator=torch.Generator().manual_seed(HOLDOUT_SEED)).tolist()
    plain = task.train
    if isinstance(plain, GrayscaleTensorDataset):  # held-out images are evaluated without augmentation
        plain = GrayscaleTensorDataset(plain.images, plain.labels, plain.spec, train=False)
    return TaskData(Subset(task.train, order[n:]), Subset(plain, order[:n]), task.class_names)


def _mix(seed: int, value: int) -> int:
    """A 63-bit seed from two integers (distinct pairs give distinct seeds for any realistic sizes)."""
    return (seed * 0x9E3779B97F4A7C15 + value * 0x632BE59BD9B4E019 + 1) % (1 << 63)


class EpochSampler(Sampler):
    """The order of one epoch as a pure function of (seed, epoch); resumable mid-epoch.

    Each key it yields is ``epoch * n + index``: worker processes never see ``set_epoch``, so the
    epoch travels with the key and ``SeededItems`` can seed each sample's augmentation from it.
    Nothing here depends on how many batches were drawn before, so a resumed run (``skip``), a
    different number of workers or processes all see the same samples with the same augmentation.
    """

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, samples: int) -> None:
        """Start the next pass ``samples`` keys into the epoch (resume without loading skipped images)."""
        self.skip = samples

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        skip, self.skip = self.skip, 0
        base = self.epoch * self.n
        return iter([base + i for i in order[skip:]])


class SeededItems(Dataset):
    """``ds`` with each sample's random augmentation seeded from (seed, epoch, index).

    torch, numpy and Python RNGs are seeded for the duration of one ``__getitem__`` and restored
    afterwards, so data loading neither depends on nor disturbs the training RNG (dropout).
    """

    def __init__(self, ds: Dataset, seed: int):
        self.ds, self.seed = ds, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int):
        n = len(self.ds)
        index = key % n
        saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
        s = _mix(self.seed, key)
        # the CPU generator only: torch.manual_seed also queues a CUDA seeding call that records a
        # stack trace per call (a third of a millisecond per image), and transforms run on the CPU
        torch.default_generator.manual_seed(s)
        random.seed(s)
        np.random.seed(s % (1 << 32))
        try:
            return self.ds[index]
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def _worker_init(_worker_id: int) -> None:
    # Ctrl-C is the main process's to handle (it finishes the step and checkpoints); a worker
    # that died of it first would fail the batch the main process still needs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def make_loader(ds: Dataset, batch_size: int, train: bool, seed: int, workers: int = 0) -> DataLoader:
    """Batches of ``ds``; shuffled per epoch for training. The same (seed, epoch, position) always
    gives the same images with the same augmentation (see ``EpochSampler``)."""
    if len(ds) == 0:
        raise DataError("the dataset is empty")
    g = torch.Generator().manual_seed(seed)  # DataLoader draws worker seeds from it, not from the global RNG
    return DataLoader(SeededItems(ds, seed), batch_size=batch_size, sampler=EpochSampler(len(ds), seed, train),
                      drop_last=train and len(ds) > batch_size, num_workers=workers, generator=g,
                      persistent_workers=workers > 0, worker_init_fn=_worker_init if workers > 0 else None)


def val_split(dataset: str, spec: DataSpec, val_subset: Optional[int], seed: int):
    """``(validation images, class names)``: the same fixed subset ``prune`` draws for this seed."""
    task = load_task_data(dataset, spec)
    return subset(task.val, val_subset, seed + 1), task.class_names
