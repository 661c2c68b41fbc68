"""Checkpoints and exact resume: ``OUT/checkpoints/`` while a run is in progress.

Three kinds of folder, each written atomically (a hidden temporary folder renamed into place):

* ``search-NNNNNN/``, ``finetune-NNNNNN/`` -- a training loop after N steps: its modules, optimisers,
  schedulers, losses, data position (epoch, batches taken) and the RNG states of every process.
  Only the newest of each stage is kept; a failed write leaves the previous one in place.
* ``searched/`` -- the output of stage 1 (backbone with its task head, prompt, masks, the method's files),
  so a run resumed during fine-tuning does not search again.

Every ``state.json`` also repeats the run's *carry*: stage results that later stages and
``metrics.json`` need (label mapping, zero-shot top-1, search losses). Tensors are stored as
safetensors and everything else as JSON -- nothing is pickled, so loading a checkpoint cannot
execute code. The folder is removed when the run folder is complete.

Resuming restores, in this order, the carry (the pipeline then skips finished stages), the newest
checkpoint of the running stage, and last the RNG states, so the next step sees exactly the random
numbers and batches it would have seen without the interruption (``data.EpochSampler`` makes the
batch order a function of seed and epoch only).
"""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from .loop import LoopState, StopRequest
from ..errors import CheckpointError, Interrupted, PassZooError, one_line
from ..fileio import atomic_write_dir, remove_temporaries, safetensors_bytes

FORMAT = "pass-zoo-checkpoint/1"
STAGES = ("search", "searched", "finetune")  # in run order
# Settings that may change between a run and its --resume (they do not change the result).
OPERATIONAL = ("out", "overwrite", "resume", "checkpoint_every", "workers", "onnx", "quiet", "log_every")
ARTEFACT_PREFIX = "artefact-"  # a method's files inside searched/
_STEP_DIR = re.compile(r"^(search|finetune)-(\d{6,})$")


@dataclass
class Searched:
    """Stage 1's output as a resumed run reads it back."""

    masks: Dict[str, torch.Tensor]
    artefacts: Dict[str, bytes]


# ------------------------------------------------------------------ tensors -> safetensors, rest -> JSON
def _pack_optimizer(name: str, opt, tensors: dict) -> dict:
    sd = opt.state_dict()
    scalars: dict = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{name}.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}


def _unpack_optimizer(name: str, opt, meta: dict, tensors: dict) -> None:
    prefix = f"opt.{name}."
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            idx, k = key[len(prefix):].split(".", 1)
            state.setdefault(int(idx), {})[k] = value
    for idx, values in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(values)
    groups = meta["param_groups"]
    current = opt.state_dict()["param_groups"]
    if len(groups) != len(current):
        raise CheckpointError(f"optimiser '{name}' has {len(current)} parameter groups, the checkpoint {len(groups)}")
    for saved, now in zip(groups, current):  # JSON made tuples (Adam's betas) into lists
        for key, value in now.items():
            if isinstance(value, tuple) and isinstance(saved.get(key), list):
                saved[key] = tuple(saved[key])
    opt.load_state_dict({"state": state, "param_groups": groups})


def _rng_state() -> tuple:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_next]}
    return tensors, meta


def _set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = meta["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _st_bytes(tensors: dict) -> bytes:
    return safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()},
                             {"format": FORMAT})


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_key(config: dict) -> dict:
    """The settings a resumed run must share with the original (JSON-normalised)."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in OPERATIONAL}))


def config_diffs(saved: dict, now: dict, defaults: Optional[dict] = None, recorded_only: bool = False) -> List[str]:
    """``"key old (now new)"`` for every setting that differs between two saved configs (nested keys
    dotted); a setting added since ``saved`` was written, left at its ``defaults`` value, is not a change
    (``recorded_only``: no setting ``saved`` does not record is)."""

    saved, now = _flatten(resume_key(saved)), _flatten(resume_key(now))
    defaults = _flatten(resume_key(defaults or {}))
    return [f"{k} {saved.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(saved) | set(now))
            if saved.get(k) != now.get(k) and not (k not in saved and (recorded_only or (
                k in defaults and now.get(k) == defaults[k])))]


def _non_finite(modules: Dict[str, nn.Module]) -> Optional[str]:
    for name, module in modules.items():
        for key, t in module.state_dict().items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"{name}.{key}"
    return None


# ------------------------------------------------------------------ the run's checkpoint folder
class RunCheckpoints:
    """``OUT/checkpoints``: periodic saves of the running stage, stage outputs, and resume."""

    def __init__(self, out, accelerator, every: int, config: dict, resume: bool = False,
                 defaults: Optional[dict] = None):
        """``config``: the run's settings (what a resume must match); ``defaults``: every setting's default,
        so that one added since a checkpoint was written, and left at its default, is no change."""
        self.out = Path(out)
        self.defaults = defaults or {}
        self.dir = self.out / "checkpoints"
        self.accelerator = accelerator
        self.every = every
        self.config = resume_key(config)
        self.carry: dict = {}
        self.resumed_from: Optional[dict] = None  # {"stage", "step"} of the checkpoint a resume started from
        self.last_saved: Optional[str] = None  # e.g. "search step 6"
        if resume:
            self._open()

    # ---- resume
    def _entries(self) -> List[tuple]:
        """Complete checkpoints as (stage order, step, path), oldest first."""
        found = []
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                m = _STEP_DIR.match(p.name)
                if m and (p / "state.json").is_file():
                    found.append((STAGES.index(m.group(1)), int(m.group(2)), p))
                elif p.name == "searched" and (p / "state.json").is_file():
                    found.append((STAGES.index("searched"), 0, p))
        return sorted(found)

    def _read_meta(self, path: Path) -> dict:
        try:
            meta = json.loads((path / "state.json").read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot resume from {path}: state.json is unreadable ({exc})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"cannot resume from {path}: not a {FORMAT} checkpoint")
        return meta

    def _open(self) -> None:
        if (self.out / "metrics.json").is_file():
            raise CheckpointError(f"--resume: {self.out} is a finished run (metrics.json exists); nothing to resume")
        if self.accelerator.is_main_process:  # left by a process killed while writing
            remove_temporaries(self.dir)
            remove_temporaries(self.out)
        self.accelerator.wait_for_everyone()
        entries = self._entries()
        if not entries:
            raise CheckpointError(f"--resume: {self.out} has no checkpoint to resume from (none was written "
                                  "before the run stopped); start again with --overwrite")
        _, _, newest = entries[-1]
        meta = self._read_meta(newest)
        if meta.get("world_size") != self.accelerator.num_processes:
            raise CheckpointError(f"--resume: the run used {meta.get('world_size')} process(es), this one "
                                  f"{self.accelerator.num_processes}; resume with the same --num-processes")
        saved_config = meta.get("config", {})
        now_config = {k: v for k, v in self.config.items() if k != "inputs" or "inputs" in saved_config}
        changed = [d for d in config_diffs(saved_config, now_config, self.defaults) if d.startswith("inputs.")]
        if changed:  # the data, weights or source run the run read are no longer what it read
            raise CheckpointError(f"--resume: the inputs of {self.out} changed since it started: "
                                  f"{', '.join(changed[:3])}; start it again with --overwrite")
        diffs = config_diffs(saved_config, now_config, self.defaults)
        if diffs:
            raise CheckpointError(f"--resume: {self.out} was started with other settings: {', '.join(diffs[:4])}; "
                                  "rerun with the original flags")
        self.carry = meta["carry"]
        self.resumed_from = {"stage": meta["stage"], "step": meta.get("step")}

    def latest(self, stage: str) -> Optional[Path]:
        """The newest complete checkpoint of ``stage`` (only while resuming)."""
        if self.resumed_from is None:
            return None
        paths = [p for order, _, p in self._entries() if STAGES[order] == stage]
        return paths[-1] if paths else None

    def _load(self, path: Path, name: str = "state.safetensors") -> dict:
        from safetensors.torch import load_file

        try:
            return load_file(str(path / name))
        except Exception as exc:  # truncated or tampered file
            raise CheckpointError(f"cannot resume from {path}: {name} is unreadable ({one_line(exc)})") from exc

    # ---- save
    def _meta(self, stage: str, step: Optional[int], extra: dict) -> dict:
        return {"format": FORMAT, "stage": stage, "step": step, "world_size": self.accelerator.num_processes,
                "config": self.config, "carry": self.carry, **extra}

    def _write(self, name: str, files: dict) -> Path:
        """Main process writes ``name`` atomically; every process waits (a collective call)."""
        path = self.dir / name
        if self.accelerator.is_main_process:
            atomic_write_dir(path, files)
        self.accelerator.wait_for_everyone()
        return path

    def save_loop(self, loop: LoopState) -> Path:
        from accelerate.utils import gather_object

        tensors: dict = {}
        for name, module in loop.modules.items():
            for key, value in module.state_dict().items():
                tensors[f"module.{name}.{key}"] = value
        opts = {name: _pack_optimizer(name, opt, tensors) for name, opt in loop.optimizers.items()}
        scheds = {name: s.state_dict() for name, s in loop.schedulers.items()}
        scaler = getattr(self.accelerator, "scaler", None)
        rng_tensors, rng_meta = _rng_state()
        every_rng = gather_object([(rng_tensors, rng_meta)]) if self.accelerator.num_processes > 1 \
            else [(rng_tensors, rng_meta)]
        rng_file = {f"{rank}.{k}": v for rank, (t, _) in enumerate(every_rng) for k, v in t.items()}
        meta = self._meta(loop.stage, loop.step, {
            "total": loop.total, "position": loop.batches.position(), "losses": loop.losses,
            "optimizers": opts, "schedulers": scheds, "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {str(rank): m for rank, (_, m) in enumerate(every_rng)}})
        path = self._write(f"{loop.stage}-{loop.step:06d}", {
            "state.safetensors": _st_bytes(tensors), "rng.safetensors": _st_bytes(rng_file),
            "state.json": json.dumps(meta).encode()})
        if self.accelerator.is_main_process:  # keep only the newest checkpoint of this stage
            for _, _, old in self._entries():
                if old.name.startswith(f"{loop.stage}-") and old != path:
                    shutil.rmtree(old, ignore_errors=True)
        self.last_saved = f"{loop.stage} step {loop.step}"
        return path

    def restore_loop(self, loop: LoopState) -> bool:
        """Load the newest checkpoint of ``loop.stage`` into ``loop`` (RNG last); False if there is none."""
        path = self.latest(loop.stage)
        if path is None:
            return False
        meta = self._read_meta(path)
        tensors = self._load(path)
        rng = self._load(path, "rng.safetensors")
        if meta.get("total") != loop.total:
            raise CheckpointError(f"cannot resume from {path}: it was written for {meta.get('total')} {loop.stage} "
                                  f"steps, this run has {loop.total}")
        try:
            for name, module in loop.modules.items():
                prefix = f"module.{name}."
                module.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                       strict=True)
            for name, opt in loop.optimizers.items():
                _unpack_optimizer(name, opt, meta["optimizers"][name], tensors)
            for name, sched in loop.schedulers.items():
                sched.load_state_dict(meta["schedulers"][name])
            scaler = getattr(self.accelerator, "scaler", None)
            if scaler is not None and meta.get("scaler"):
                scaler.load_state_dict(meta["scaler"])
            loop.losses[:] = meta["losses"]
            loop.step = int(meta["step"])
            loop.batches.epoch = int(meta["position"]["epoch"])
            loop.batches.taken = int(meta["position"]["taken"])
            rank = str(self.accelerator.process_index)
            _set_rng_state({k[len(rank) + 1:]: v for k, v in rng.items() if k.startswith(rank + ".")},
                           meta["rng"][rank])
        except CheckpointError:
            raise
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(f"cannot resume from {path}: it does not fit this run ({one_line(exc)})") from exc
        self.last_saved = f"{loop.stage} step {loop.step}"
        return True

    # ---- the search stage's output
    def save_searched(self, backbone: nn.Module, prompt: nn.Module, masks: Dict[str, torch.Tensor],
                      artefacts: Optional[Dict[str, bytes]] = None) -> None:
        """Stage 1's output: the backbone (task head, weights a method trained), prompt, masks, and the
        method's artefacts (files it writes beside the masks), so a resumed run still writes them."""
        artefacts = dict(artefacts or {})
        tensors = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
        tensors.update({f"prompt.{k}": v for k, v in prompt.state_dict().items()})
        tensors.update({f"masks.{k}": v.to(torch.uint8) for k, v in masks.items()})
        meta = self._meta("searched", None, {"artefacts": sorted(artefacts)})
        self._write("searched", {**{f"{ARTEFACT_PREFIX}{k}": v for k, v in artefacts.items()},
                                 "searched.safetensors": _st_bytes(tensors), "state.json": json.dumps(meta).encode()})
        if self.accelerator.is_main_process:
            for _, _, old in self._entries():
                if old.name.startswith("search-"):
                    shutil.rmtree(old, ignore_errors=True)
        self.last_saved = "the search result"

    def load_searched(self, backbone: nn.Module, prompt: nn.Module, names: List[str]) -> Optional[Searched]:
        """Restore stage 1's output into ``backbone`` and ``prompt``; None if not resuming after it.

        ``names``: the masks' keys in the order the method returns them (channel groups in walk order,
        or weight names in layer order)."""
        path = self.latest("searched")
        if path is None:
            return None
        tensors = self._load(path, "searched.safetensors")

        def part(prefix):
            return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

        try:
            backbone.load_state_dict(part("backbone."), strict=True)
            prompt.load_state_dict(part("prompt."), strict=True)
            masks = part("masks.")
            meta = self._read_meta(path)
            artefacts = {name: (path / f"{ARTEFACT_PREFIX}{name}").read_bytes() for name in meta.get("artefacts", [])}
            self.last_saved = "the search result"
            return Searched({name: masks[name].bool() for name in names}, artefacts)
        except (KeyError, RuntimeError, OSError) as exc:
            raise CheckpointError(f"cannot resume from {path}: it does not fit this run ({one_line(exc)})") from exc

    def finish(self) -> None:
        """The run folder is complete: checkpoints are no longer needed."""
        if self.accelerator.is_main_process:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def where(self) -> str:
        if self.last_saved is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint ({self.last_saved}) is kept in {self.dir}"


class StageCheckpoints:
    """One training loop's view: restore on entry, save every N steps, at the end and on Ctrl-C.

    ``run=None`` (the Python API without a run folder) keeps only the Ctrl-C-free, save-free loop.
    """

    def __init__(self, run: Optional[RunCheckpoints], loop: LoopState, accelerator):
        self.run, self.loop = run, loop
        self.stop = StopRequest(accelerator) if run is not None else None

    def __enter__(self):
        if self.run is not None:
            self.run.restore_loop(self.loop)
            self.stop.__enter__()
        return self

    def __exit__(self, *exc):
        if self.stop is not None:
            self.stop.__exit__(*exc)

    def after_step(self) -> None:
        if self.run is None:
            return
        loop = self.loop
        stop = self.stop.requested()
        periodic = self.run.every > 0 and loop.step % self.run.every == 0
        if stop or periodic or loop.step == loop.total:
            bad = _non_finite(loop.modules)
            if bad is not None:  # never replace a good checkpoint with a broken one
                raise PassZooError(f"{loop.stage} produced non-finite values in {bad} by step {loop.step}; "
                                   f"stopped, {self.run.where()}")
            path = self.run.save_loop(loop)
            if stop:
                raise Interrupted(f"interrupted at {loop.stage} step {loop.step} of {loop.total}; checkpoint saved "
                                  f"in {path} (run the same command with --resume to continue)")

    def diverged(self, message: str, hint: str) -> PassZooError:
        where = self.run.where() if self.run is not None else None
        return PassZooError(f"{message}; stopped" + (f", {where}" if where else "") + f"; {hint}")
