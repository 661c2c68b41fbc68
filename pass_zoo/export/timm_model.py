"""The slim-model format: a timm architecture ``pass_pruned`` that rebuilds any slim shape.

``config.json`` (timm's Hub layout) carries::

    {"architecture": "pass_pruned", "num_classes": 10, "label_names": [...],
     "model_args": {"base_arch": "vit_base_patch16_224",
                    "spec": {"format": "pass-zoo-slim/2", "img_size": 64,
                             "model_kwargs": {"img_size": 64},
                             "prompt": {"kind": "additive", "width": 5},
                             "pruning_history": [[layer, is_out, [indices]], ...],
                             "fixups": [{"module": "blocks.0.attn", "family": "timm.layers.Attention",
                                         "head_dim": 64, "kept_heads": [0, 3, ...]}, ...]}},
     "pretrained_cfg": {<the base model's mean/std/interpolation/crop, input_size at img_size>}}

Spec versions: ``/1`` is a CNN spec (base arch with timm's defaults + pruning history); ``/2`` adds
``model_kwargs`` (passed to ``timm.create_model`` for the base, e.g. a ViT's ``img_size``) and
``fixups`` (attention heads: Torch-Pruning's replay removes their qkv rows and proj columns, the
fixup sets ``num_heads`` and slices per-head parameters such as Swin's bias table). An export is
written as ``/1`` when it needs neither, so older readers still load CNN exports; both are read.

``pass_pruned`` builds the base architecture at random init, replays Torch-Pruning's pruning
history and the fixups on it (the slim shape, for any architecture the dependency graph can prune)
and wraps it with the learned prompt. timm then loads ``model.safetensors`` strictly. The prompt and the label
mapping are therefore part of the model: ``timm.create_model("local-dir:RUN"|"hf-hub:ORG/NAME",
pretrained=True)`` reproduces the fine-tuned predictions with no extra step.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Sequence

import timm
import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..errors import PassZooError, one_line
from ..fileio import atomic_write_bytes, atomic_write_json, safetensors_bytes
from ..integrity import verify_run_files
from ..prompt import create_prompt
from ..graph.families import family_by_name, fix_split_sizes
from ..graph.groups import build_graph

SPEC_FORMAT_V1 = "pass-zoo-slim/1"
SPEC_FORMAT = "pass-zoo-slim/2"
_SUPPORTED_FORMATS = (SPEC_FORMAT_V1, SPEC_FORMAT)
# pretrained_cfg keys that describe the base model's own weights: cleared in an export.
_BASE_ONLY_KEYS = ("url", "hf_hub_id", "hf_hub_filename", "tag", "file", "source", "state_dict",
                   "architecture", "license", "pool_size", "test_input_size", "test_crop_pct")
# pretrained_cfg keys timm keeps as tuples (JSON turns them into lists).
_TUPLE_KEYS = ("input_size", "test_input_size", "min_input_size", "mean", "std", "pool_size")


class SpecMismatchError(PassZooError):
    """The weights do not fit the slim shape that config.json describes."""


class PassPrunedModel(nn.Module):
    """prompt -> slim base network. Rebuilt from ``base_arch`` + ``spec`` alone."""

    def __init__(self, base_arch: str, spec: dict, num_classes: int = 1000, in_chans: int = 3, **kwargs):
        super().__init__()
        fmt = spec.get("format")
        if fmt not in _SUPPORTED_FORMATS:
            raise SpecMismatchError(f"slim spec format '{fmt}' is not supported by this pass-zoo "
                                    f"(supported: {', '.join(_SUPPORTED_FORMATS)})")
        if not timm.is_model(base_arch):
            raise SpecMismatchError(f"config.json names an unknown base architecture '{base_arch}'")
        kwargs.pop("pretrained_cfg", None)
        img_size = int(spec["img_size"])
        self.base_arch, self.spec = base_arch, spec
        model_kwargs = _tuples(spec.get("model_kwargs") or {}) if fmt == SPEC_FORMAT else {}
        self.prompt = create_prompt(spec["prompt"]["kind"], img_size, int(spec["prompt"]["width"]))
        try:
            self.model = timm.create_model(base_arch, pretrained=False, num_classes=num_classes,
                                           in_chans=in_chans, **model_kwargs)
        except TypeError as exc:
            raise SpecMismatchError(f"model_kwargs {model_kwargs} do not fit '{base_arch}': {exc}") from exc
        fixups = spec.get("fixups", []) if fmt == SPEC_FORMAT else []
        replay_pruning_history(self.model, spec["pruning_history"], torch.zeros(1, in_chans, img_size, img_size),
                               fixups)
        self.num_classes = num_classes
        self.img_size, self.in_chans = img_size, in_chans
        _slim_widths(self.model, torch.zeros(1, in_chans, img_size, img_size))
        self.num_features = self.model.num_features
        self.head_hidden_size = getattr(self.model, "head_hidden_size", self.num_features)
        self.grad_checkpointing = False

    # timm's model API, delegated to the slim network (a real timm model of the base architecture:
    # _slim_widths made its width attributes and feature_info describe the slim shape)
    @property
    def feature_info(self):
        info = getattr(self.model, "feature_info", None)
        if info is None:
            raise AttributeError(f"'{self.base_arch}' has no feature_info in timm")
        return info

    def get_classifier(self):
        return self.model.get_classifier()

    def reset_classifier(self, num_classes: int, *args, **kwargs):
        self.model.reset_classifier(num_classes, *args, **kwargs)
        self.num_classes = num_classes

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        self.model.set_grad_checkpointing(enable)
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False):
        """The base model's parameter groups under ``model.``; the prompt joins the stem (it acts on
        the input, before the first layer), so layer-wise lr decay gives it the stem's rate."""
        groups = {k: _prefix_matcher(v) for k, v in self.model.group_matcher(coarse=coarse).items()}
        stem = groups.get("stem")
        groups["stem"] = r"^prompt" + (f"|{stem}" if isinstance(stem, str) else "")
        return groups

    @torch.jit.ignore
    def no_weight_decay(self):
        nwd = getattr(self.model, "no_weight_decay", None)
        return {f"model.{n}" for n in (nwd() if nwd is not None else ())}

    def forward_intermediates(self, x, *args, **kwargs):
        # the learned prompt is part of the model: intermediates (and features_only) see prompted input
        return self.model.forward_intermediates(self.prompt(x), *args, **kwargs)

    def prune_intermediate_layers(self, *args, **kwargs):
        return self.model.prune_intermediate_layers(*args, **kwargs)

    def forward_features(self, x):
        return self.model.forward_features(self.prompt(x))

    def forward_head(self, x, pre_logits: bool = False):
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward(self, x):
        return self.model(self.prompt(x))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict loading with one clear line when the file and the spec disagree."""
        if strict:
            own = self.state_dict()
            missing = [k for k in own if k not in state_dict]
            unexpected = [k for k in state_dict if k not in own]
            if missing or unexpected:
                raise SpecMismatchError(f"weights do not match the slim spec: missing {missing[:2]}, "
                                        f"unexpected {unexpected[:2]}")
            for k, v in own.items():
                if tuple(state_dict[k].shape) != tuple(v.shape):
                    raise SpecMismatchError(f"weights do not match the slim spec in config.json: '{k}' is "
                                            f"{tuple(state_dict[k].shape)} in the file, {tuple(v.shape)} in the spec")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def _slim_widths(model: nn.Module, x: torch.Tensor) -> None:
    """Replaying the pruning history slims the layers, not the attributes timm reads them from
    (``num_features``, ``head_hidden_size``, ``embed_dim``, ``feature_info``): set them from the slim
    network itself, so ``reset_classifier``, ``features_only`` and heads built on ``feature_info`` see
    the slim widths."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            feats = model.forward_features(x)
            if isinstance(feats, (tuple, list)):
                feats = feats[0]
            nhwc = feats.ndim == 4 and str(getattr(model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC")
            width = int(feats.shape[1] if feats.ndim == 4 and not nhwc else feats.shape[-1])
            dense = getattr(model, "num_features", None)
            head = model.get_classifier()
            hidden = getattr(head, "in_features", None)
            if (feats.ndim == 4 and hidden in (feats.shape[1], feats.shape[-1]) and width != hidden
                    and getattr(model, "head_hidden_size", dense) == dense):
                width = int(hidden)  # no pre-logits layer: the classifier's input is the feature width
            for attr in ("num_features", "embed_dim"):
                if isinstance(getattr(model, attr, None), int) and getattr(model, attr) == dense:
                    setattr(model, attr, width)
            if hasattr(model, "head_hidden_size"):
                model.head_hidden_size = int(hidden) if hidden else width
            # timm's ClassifierHead/NormMlpClassifierHead remember their input width for reset()
            for mod in ([getattr(model, "head", None)] if isinstance(getattr(model, "head", None), nn.Module) else []):
                if isinstance(getattr(mod, "in_features", None), int) and mod.in_features == dense:
                    mod.in_features = width
                    if hasattr(mod, "num_features") and mod.num_features == dense:
                        mod.num_features = width
            info = getattr(model, "feature_info", None)
            if info is not None:
                try:
                    _slim_feature_info(model, info, x)
                except Exception:  # noqa: BLE001 -- loading the classifier must not depend on it;
                    model.feature_info = None  # features_only then refuses in one line
    finally:
        model.train(was_training)


def _slim_feature_info(model: nn.Module, info, x: torch.Tensor) -> None:
    entries = info.info if hasattr(info, "info") else info
    if not entries:
        return
    chans = None
    if hasattr(model, "forward_intermediates"):
        try:
            outs = model.forward_intermediates(x, indices=len(entries), intermediates_only=True)
            if len(outs) == len(entries):
                chans = [int(o.shape[1]) if o.ndim == 4 else int(o.shape[-1]) for o in outs]
        except Exception:  # noqa: BLE001 -- fall back to hooks on the modules feature_info names
            chans = None
    if chans is None:
        found, hooks = {}, []
        for i, e in enumerate(entries):
            try:
                mod = model.get_submodule(e["module"])
            except AttributeError:
                return
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, i=i: found.__setitem__(i, o[0] if isinstance(o, (tuple, list)) else o)))
        try:
            model(x)
        finally:
            for h in hooks:
                h.remove()
        fmt = str(getattr(model, "output_fmt", "NCHW"))
        chans = [int(found[i].shape[-1] if found[i].ndim != 4 or "NHWC" in fmt else found[i].shape[1])
                 if i in found else e["num_chs"] for i, e in enumerate(entries)]
    for e, c in zip(entries, chans):
        e["num_chs"] = c


def _prefix_matcher(value):
    """Re-anchor a timm group_matcher regex (or list of ``(regex, index)``) under ``model.``."""
    if isinstance(value, str):  # timm matches with re.match: anchor every top-level alternative
        parts, depth, start = [], 0, 0
        for i, ch in enumerate(value):
            escaped = i > 0 and value[i - 1] == "\\"
            if ch in "([" and not escaped:
                depth += 1
            elif ch in ")]" and not escaped:
                depth -= 1
            elif ch == "|" and depth == 0:
                parts.append(value[start:i])
                start = i + 1
        parts.append(value[start:])
        return "|".join(r"^model\." + p.lstrip("^") for p in parts)
    if isinstance(value, (list, tuple)):
        return [(_prefix_matcher(v[0]),) + tuple(v[1:]) if isinstance(v, (list, tuple)) else _prefix_matcher(v)
                for v in value]
    return value


class PassPrunedFeatures(nn.Module):
    """``features_only=True``: prompt -> the slim network's feature maps (timm's own feature wrapper
    for the base architecture: ``forward_intermediates`` where it has one, else its feature modules).
    The learned prompt is applied first, as in the classifier, so features match the fine-tuned model."""

    def __init__(self, model: PassPrunedModel, out_indices=None, **kwargs):
        super().__init__()
        from timm.models._features import FeatureGetterNet, FeatureListNet

        inner = model.model
        if getattr(inner, "feature_info", None) is None:
            raise PassZooError(f"features_only: timm has no feature_info for '{model.base_arch}'")
        n = len(inner.feature_info)
        out_indices = tuple(range(n)) if out_indices is None else out_indices
        feature_cls = kwargs.pop("feature_cls", None)
        if feature_cls == "getter" or (feature_cls is None and hasattr(inner, "forward_intermediates")):
            self.features = FeatureGetterNet(inner, out_indices, **kwargs)
        else:
            self.features = FeatureListNet(inner, out_indices, **kwargs)
        self.prompt = model.prompt
        self.feature_info = self.features.feature_info
        self.pretrained_cfg = self.default_cfg = getattr(model, "pretrained_cfg", {})

    def forward(self, x):
        return self.features(self.prompt(x))


def _tuples(kwargs: dict) -> dict:
    """JSON turned tuple arguments (Swin's ``depths``) into lists; timm expects tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def replay_pruning_history(model: nn.Module, history: List, example_input: torch.Tensor,
                           fixups: Sequence[dict] = ()) -> nn.Module:
    """Re-apply Torch-Pruning's recorded pruning steps, then the head fixups, to a fresh base model."""
    if not history:
        if fixups:
            raise SpecMismatchError("slim spec has head fixups but no pruning history")
        return model
    was_training = model.training
    model.eval()
    try:
        # the adapter's graph: per-head parameters are left to the fixups, exactly as when slimming
        graph = build_graph(model, example_input)
        graph.load_pruning_history([[name, bool(is_out), list(idxs)] for name, is_out, idxs in history])
        fix_split_sizes(model)
        for fix in fixups:
            _apply_fixup(model, fix)
    except AttributeError as exc:
        raise SpecMismatchError(f"slim spec names a layer the base architecture does not have: {exc}") from exc
    except (IndexError, RuntimeError, ValueError) as exc:
        raise SpecMismatchError(f"slim spec does not fit the base architecture: {exc}") from exc
    finally:
        model.train(was_training)
    return model


def _apply_fixup(model: nn.Module, fix: dict) -> None:
    try:
        family = family_by_name(fix["family"])
        attn = model.get_submodule(fix["module"])
        kept, head_dim = [int(k) for k in fix["kept_heads"]], int(fix["head_dim"])
    except KeyError as exc:
        raise SpecMismatchError(f"slim spec fixup {str(fix)[:80]} names an unknown attention family or "
                                f"lacks {exc}") from exc
    if not isinstance(attn, family.module_type):
        raise SpecMismatchError(f"slim spec fixup: '{fix['module']}' is a {type(attn).__name__}, "
                                f"not a {family.name}")
    try:
        family.set_heads(attn, kept, head_dim)
    except PassZooError as exc:
        raise SpecMismatchError(f"slim spec fixup for '{fix['module']}' does not fit: {exc}") from exc


def _create_pass_pruned(variant: str, pretrained: bool = False, **kwargs) -> PassPrunedModel:
    kwargs.pop("pretrained_model_args", None)
    if "base_arch" not in kwargs or "spec" not in kwargs:
        raise PassZooError("pass_pruned is built from a pass-zoo export: use "
                           "timm.create_model('local-dir:RUN_DIR' or 'hf-hub:ORG/NAME', pretrained=True)")
    cfg = kwargs.get("pretrained_cfg")
    if isinstance(cfg, dict):  # JSON gave lists; timm's own cfgs (and resolve_data_config) use tuples
        kwargs["pretrained_cfg"] = {k: tuple(v) if k in _TUPLE_KEYS and isinstance(v, list) else v
                                    for k, v in cfg.items()}
    features_only = kwargs.pop("features_only", False)
    feature_kwargs = {k: kwargs.pop(k) for k in ("out_indices", "feature_cls", "output_fmt", "norm")
                      if k in kwargs}
    feature_kwargs.update(kwargs.pop("feature_cfg", None) or {})
    model = build_model_with_cfg(PassPrunedModel, variant, pretrained, pretrained_strict=True, **kwargs)
    if features_only:  # built after the weights are loaded: the feature net shares the slim modules
        return PassPrunedFeatures(model, **feature_kwargs)
    return model


default_cfgs = generate_default_cfgs({
    "pass_pruned": {"url": "", "num_classes": 1000, "input_size": (3, 224, 224), "interpolation": "bicubic",
                    "crop_pct": 1.0, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                    "first_conv": "prompt", "classifier": "model.classifier"},
})


@register_model
def pass_pruned(pretrained: bool = False, **kwargs) -> PassPrunedModel:
    """A PASS-pruned slim network with its learned prompt (see ``pass_zoo.export.timm_model``)."""
    return _create_pass_pruned("pass_pruned", pretrained=pretrained, **kwargs)


def export_pretrained_cfg(base_cfg: dict, img_size: int, classifier: Optional[str]) -> dict:
    """The base model's preprocessing, at the exported input size, with its weight locations cleared."""
    cfg = {k: v for k, v in base_cfg.items() if k not in _BASE_ONLY_KEYS and v is not None}
    cfg["input_size"] = [3, img_size, img_size]
    cfg.pop("num_classes", None)  # the top-level num_classes of config.json is the one that counts
    if classifier:
        cfg["classifier"] = f"model.{classifier}"
    cfg["first_conv"] = "prompt"
    for key, value in list(cfg.items()):
        if isinstance(value, tuple):
            cfg[key] = list(value)
    return cfg


def save_slim_model(prompted: nn.Module, out, base_arch: str, history: List, num_classes: int,
                    label_names: List[str], base_pretrained_cfg: dict, img_size: int,
                    model_kwargs: Optional[dict] = None, fixups: Optional[List[dict]] = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` for a prompted slim model.

    ``model_kwargs``: what the base model was created with (``timm.create_model(base_arch, **kw)``);
    ``fixups``: default ``history.fixups`` (``pass_zoo.graph.slim.PruningHistory``).
    """
    out = Path(out)
    prompt = prompted.prompt
    classifier = base_pretrained_cfg.get("classifier")
    fixups = list(getattr(history, "fixups", []) if fixups is None else fixups)
    model_kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in (model_kwargs or {}).items()}
    spec = {"format": SPEC_FORMAT if fixups or model_kwargs else SPEC_FORMAT_V1, "img_size": img_size,
            "prompt": {"kind": prompt.kind, "width": prompt.width}, "pruning_history": list(history)}
    if spec["format"] == SPEC_FORMAT:
        spec.update(model_kwargs=model_kwargs, fixups=fixups)
    config = {
        "architecture": "pass_pruned",
        "num_classes": num_classes,
        "num_features": getattr(prompted.model.get_classifier(), "in_features", None),
        "label_names": list(label_names),
        "usage": LOAD_NOTE,  # timm ignores it; it is what a user reading the file needs
        "model_args": {"base_arch": base_arch, "spec": spec},
        "pretrained_cfg": export_pretrained_cfg(base_pretrained_cfg, img_size, classifier),
    }
    state, seen = {}, set()
    for k, v in prompted.state_dict().items():
        v = v.detach().contiguous().cpu()
        # a module shared by several blocks (CoaT's position encodings) has one tensor under several
        # names; safetensors stores each name on its own, and loading writes the same values to each
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        state[k] = v.clone() if key in seen and v.numel() else v
        seen.add(key)
    atomic_write_bytes(out / "model.safetensors", safetensors_bytes(state, {"format": "pt", "pass_zoo": spec["format"]}))
    atomic_write_json(out / "config.json", config)
    return out


# create_model arguments the export sets itself: --model-kwargs may not choose them.
_RESERVED_KWARGS = ("num_classes", "in_chans", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay",
                    "checkpoint_path", "features_only")
LOAD_NOTE = ("a pass-zoo export: run 'import pass_zoo' (pip install pass-zoo) before "
             "timm.create_model('local-dir:RUN' or 'hf-hub:ORG/NAME', pretrained=True); without it timm "
             "reports 'Unknown model (pass_pruned)'")


def check_rebuild(base_arch: str, model_kwargs: dict, num_classes: int) -> None:
    """Fail now -- before any training -- if ``model_kwargs`` cannot rebuild the base model the way
    ``PassPrunedModel`` will when the export is loaded (JSON round trip, ``num_classes`` and
    ``in_chans`` set by the export)."""
    shown = json.dumps(model_kwargs, default=str)
    if not timm.is_model(base_arch):
        raise PassZooError(f"the export records its base architecture by timm name, and '{base_arch}' is not "
                           "one: pass the timm name as --model and the weights as --pretrained hf-hub:ORG/NAME "
                           "or PATH")
    reserved = [k for k in _RESERVED_KWARGS if k in model_kwargs]
    if reserved:
        raise PassZooError(f"--model-kwargs may not set {', '.join(reserved)}: the export sets it "
                           f"(num_classes from the dataset) and could not be loaded again")
    try:
        kwargs = _tuples(json.loads(json.dumps(model_kwargs)))
    except (TypeError, ValueError) as exc:
        raise PassZooError(f"--model-kwargs {shown} cannot be written to config.json: {exc}") from exc
    try:
        with torch.random.fork_rng(devices=[]):  # a check: the run's random numbers must not move
            model = timm.create_model(base_arch, pretrained=False, num_classes=num_classes, in_chans=3, **kwargs)
    except Exception as exc:
        raise PassZooError(f"--model-kwargs {shown} do not rebuild '{base_arch}' as the export is loaded: "
                           f"{type(exc).__name__}: {one_line(exc)}") from exc
    if getattr(model, "num_classes", num_classes) != num_classes:
        raise PassZooError(f"--model-kwargs {shown}: '{base_arch}' rebuilt with {model.num_classes} classes, "
                           f"the task has {num_classes}")


def verify_reload(out) -> None:
    """The export just written must load back strictly; otherwise its files are removed (the run is
    not finished: no metrics.json, checkpoints kept) and the reason is raised as one line."""
    out = Path(out)
    try:
        load_run_model(out)
    except PassZooError as exc:
        for name in ("model.safetensors", "config.json"):
            (out / name).unlink(missing_ok=True)
        raise PassZooError(f"the exported model does not load back ({exc}); the run is not finished, "
                           f"its checkpoints are kept in {out / 'checkpoints'}") from exc


def verify_run_weights(run_dir) -> None:
    """What ``eval``/``export`` would refuse, refused before a card or an upload: model.safetensors must
    be a safetensors file (never unpickled), match the digest export.json recorded, and load strictly."""
    import hashlib

    run_dir = Path(run_dir)
    path = run_dir / "model.safetensors"
    if not path.is_file():
        raise PassZooError(f"{path} is missing")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            fh.keys()
    except Exception as exc:
        with open(path, "rb") as fh:
            head = fh.read(4)
        pickled = head[:2] == b"PK" or head[:1] == b"\x80"  # torch.save: a zip, or a bare pickle
        kind = " (it is a torch pickle/zip; pass-zoo never unpickles run weights)" if pickled else ""
        raise PassZooError(f"{path} is not a valid safetensors file{kind}: {one_line(exc)}") from exc
    export_json = run_dir / "export.json"
    if export_json.is_file():
        try:
            recorded = json.loads(export_json.read_text(encoding="utf-8")).get("model_sha256")
        except (OSError, ValueError, AttributeError):
            recorded = None
        if recorded:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != recorded:
                raise PassZooError(f"{path} is not the file export.json verified (sha256 differs)")

    verify_run_files(run_dir)  # config.json, masks, ONNX: every file the run's numbers depend on
    load_run_model(run_dir)


def load_run_model(path) -> PassPrunedModel:
    """Load an export (run folder, ``local-dir:``/``hf-hub:`` name) through timm, strictly."""
    name = str(path)
    if not name.startswith(("hf-hub:", "local-dir:")):
        folder = Path(name)
        if not (folder / "config.json").is_file():
            raise PassZooError(f"{folder} is not an exported run (no config.json)")
        name = f"local-dir:{folder}"
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):])
        # Without it, timm would load the first other *.safetensors in the folder (masks.safetensors).
        if (folder / "config.json").is_file() and not (folder / "model.safetensors").is_file():
            raise PassZooError(f"cannot load {path}: {folder / 'model.safetensors'} is missing")
    try:
        return timm.create_model(name, pretrained=True).eval()
    except PassZooError as exc:
        raise type(exc)(f"cannot load {path}: {exc}") from exc
    except Exception as exc:
        first = one_line(exc)
        if type(exc).__name__ == "SafetensorError":  # raised by timm's loader, names no file
            first = f"model.safetensors is truncated or corrupt ({first})"
        elif isinstance(exc, json.JSONDecodeError):
            first = f"config.json is not valid JSON ({first})"
        raise PassZooError(f"cannot load {path}: {first}") from exc
