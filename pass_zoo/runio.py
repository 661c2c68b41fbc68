"""Run folders and atomic writes: a file is either complete or absent, never half-written.

Every write goes to a hidden sibling (``.NAME.XXXX.tmp``) that is renamed into place only when
complete; on any error (disk full, permissions, Ctrl-C) the temporary is removed and the error
names the file it was writing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import RunDirError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _write_fd(fd: int, data: bytes) -> None:
    """All of ``data`` to ``fd`` (os.write may write less than asked), then to the disk."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.fsync(fd)


def safetensors_bytes(tensors: dict, metadata: dict) -> bytes:
    """``safetensors.torch.save`` with a reproducible header.

    safetensors writes the ``__metadata__`` entries in hash-map order, which changes from one
    process to the next; sorting them makes the same tensors give the same bytes (so two runs
    with the same seed can be compared file for file).
    """
    import struct

    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if len(text) > n:  # cannot happen for a re-ordering; keep the library's bytes rather than guess
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n:]


def write_error(path, exc: OSError) -> RunDirError:
    """One line for a failed write: which file, and the system's reason (e.g. 'No space left on device')."""
    return RunDirError(f"cannot write {path}: {exc.strerror or exc or type(exc).__name__}")


def _mkdir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(path, exc) from exc


@contextlib.contextmanager
def _sibling(path: Path):
    """A hidden temporary file next to ``path``, renamed onto ``path`` when the block ends without
    error and removed when it does not."""
    _mkdir(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would surprise users sharing run folders
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise


def atomic_write_bytes(path, data: bytes) -> None:
    path = Path(path)
    with _sibling(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _write_fd(fd, data)
        finally:
            os.close(fd)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj) -> bytes:
    """The one JSON layout of every file a run writes."""
    return (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8")


def atomic_write_json(path, obj) -> None:
    atomic_write_bytes(path, json_bytes(obj))


def atomic_save_with(path, save_fn) -> None:
    """Atomic write for libraries that only save to a path (e.g. ONNX): write a sibling, then rename."""
    path = Path(path)
    with _sibling(path) as tmp:
        save_fn(tmp)


def atomic_write_dir(path, files: dict) -> None:
    """Write ``{file name: bytes}`` as the folder ``path``, all or nothing.

    The files go into a hidden temporary folder that is renamed to ``path`` once every file is on
    disk; an existing ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    _mkdir(path.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as exc:
        raise write_error(path, exc) from exc
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        for name, data in files.items():
            fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                _write_fd(fd, data)
            finally:
                os.close(fd)
        _fsync_dir(tmp)
        if path.exists():  # a folder cannot be renamed over a non-empty one: move the old one aside first
            old = path.with_name(f".{path.name}.old.tmp")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not path.exists():
            os.replace(old, path)  # keep the last good copy
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_temporaries(folder) -> None:
    """Delete ``.*.tmp`` files and folders a killed process left in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in folder.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def prepare_run_dir(out, overwrite: bool = False, resume: bool = False) -> Path:
    """Create ``out``; refuse an existing non-empty folder unless ``overwrite`` (or ``resume``)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a folder")
    if resume:
        if not out.is_dir():
            raise RunDirError(f"--resume: {out} does not exist (start the run without --resume)")
        return out
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(f"--out {out} already exists and is not empty (pass --overwrite to replace it, "
                              "or --resume to continue it)")
        try:
            shutil.rmtree(out)
        except OSError as exc:
            raise RunDirError(f"cannot remove {out} for --overwrite: {exc.strerror or exc}") from exc
    _mkdir(out)
    return out
