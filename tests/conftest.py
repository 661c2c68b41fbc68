"""Shared fixtures: tiny random-init timm models, cached layer sequences, a PNG image folder."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # test this checkout, not an installed copy of the package
    sys.path.insert(0, str(ROOT))

# One intra-op thread: the models here are tiny, and on a busy 2-core machine OpenMP workers
# spin-waiting for a core make a 32 px forward pass ~50x slower than running single-threaded.
torch.set_num_threads(1)

import timm  # noqa: E402

import pass_zoo  # noqa: E402,F401  (registers pass_pruned with timm)

IMG = 32
NUM_CLASSES = 10

# timm's VGG classifier is a 4096-wide ConvMlp; mlp_ratio shrinks it so the tests stay fast
# without changing the family (plain conv stack, conv "pre-logits", linear head).
MODEL_KWARGS = {"vgg11": {"mlp_ratio": 1 / 16}, "vgg11_bn": {"mlp_ratio": 1 / 16}}


def make_model(name: str, num_classes: int = NUM_CLASSES, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A random-init timm model in eval mode (deterministic for a given seed)."""
    torch.manual_seed(seed)
    kw = dict(MODEL_KWARGS.get(name, {}))
    kw.update(kwargs)
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kw).eval()


def randomise_bn(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics/affine params, so that BN pruning errors would show in outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return model


@pytest.fixture(scope="session")
def example_input() -> torch.Tensor:
    return torch.zeros(1, 3, IMG, IMG)


@pytest.fixture(scope="session")
def model_seq():
    """``model_seq(name) -> (model, seq)``, built once per session (models are never mutated)."""
    from pass_zoo.graph.sequence import build_layer_sequence

    cache = {}

    def get(name: str):
        if name not in cache:
            model = randomise_bn(make_model(name))
            seq = build_layer_sequence(model, torch.zeros(1, 3, IMG, IMG))
            cache[name] = (model, seq)
        return cache[name]

    return get


def write_image_folder(root: Path, classes, n_train: int = 4, n_val: int = 2, size: int = 20,
                       val_classes=None, seed: int = 0) -> Path:
    """``root/{train,val}/CLASS/*.png``: noisy images with a per-class colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    val_classes = list(classes) if val_classes is None else list(val_classes)
    for split, names, n in (("train", list(classes), n_train), ("val", val_classes, n_val)):
        for ci, cls in enumerate(names):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            base = np.array([(60 * ci) % 256, (120 + 50 * ci) % 256, (200 - 40 * ci) % 256], dtype=np.int16)
            for i in range(n):
                noise = rng.integers(-30, 31, size=(size, size, 3))
                img = np.clip(base + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img, "RGB").save(folder / f"{cls}_{i}.png")
    return root


def offline_hf_cache(tmp_path, monkeypatch, files, repo: str = "passzoo/slim-test",
                     rev: str = "0123456789abcdef0123456789abcdef01234567") -> str:
    """Place ``files`` ({name: local path or bytes}) into a Hugging Face cache layout
    (``models--ORG--NAME/refs/main`` + ``snapshots/REV/``) and go offline onto it; returns ``hf-hub:REPO``."""
    import huggingface_hub.constants as hf_constants

    org, name = repo.split("/")
    cache = tmp_path / "hf-cache"
    snap = cache / f"models--{org}--{name}" / "snapshots" / rev
    snap.mkdir(parents=True)
    for fname, content in files.items():
        data = content if isinstance(content, bytes) else Path(content).read_bytes()
        (snap / fname).write_bytes(data)
    (cache / f"models--{org}--{name}" / "refs").mkdir()
    (cache / f"models--{org}--{name}" / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads both at import time: patch the module constants too
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return f"hf-hub:{repo}"


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "imgs", ["ant", "bee", "cat"])
