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
from typing import Optional

from .errors import PassZooError, RunDirError
from .method_registry import get_method, list_methods

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

    # channels-last (or otherwise strided) tensors are written in the standard layout
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)
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
    """Delete ``.*.tmp`` files and folders a killed process left in ``folder`` (and ``.*.tmp.data``,
    the weights an ONNX exporter writes beside its temporary file)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for p in [*folder.glob(".*.tmp"), *folder.glob(".*.tmp.data")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------ one process per run folder
LOCK_FILE = ".pass-zoo.lock"
# folder (resolved) -> [fd, depth]; fcntl locks belong to the process, so nested users share one
_LOCKS: dict = {}


def lock_run_dir(folder, action: str = "use") -> None:
    """Take the run folder's lock (``FOLDER/.pass-zoo.lock``, fcntl), or fail naming its holder.

    Re-entrant within a process (``unlock_run_dir`` once per call; the last one removes the file).
    The kernel drops the lock when the holder exits, however it dies, so a killed run never blocks
    ``--resume``: its stale lock file is simply locked again.
    """
    import fcntl

    folder = Path(folder)
    key = os.path.realpath(folder)
    path = folder / LOCK_FILE
    held = _LOCKS.get(key)
    if held is not None:
        try:
            same = os.fstat(held[0]).st_ino == os.stat(path).st_ino
        except OSError:
            same = False
        if same:
            held[1] += 1
            return
        _close_lock(key)  # the folder was removed and made again: lock the new file
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as exc:
            raise write_error(path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            finally:
                os.close(fd)
            who = f"pid {holder}" if holder.isdigit() else "another process"
            raise RunDirError(f"cannot {action} {folder}: another pass-zoo run ({who}) is using it; wait for "
                              "it to finish or choose another folder") from None
        try:  # the holder removes the file when it lets go: a lock on a removed file is no lock
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _LOCKS[key] = [fd, 1]


def unlock_run_dir(folder, everything: bool = False) -> None:
    """Undo one ``lock_run_dir`` (all of them with ``everything``); the last one removes the lock file."""
    key = os.path.realpath(folder)
    held = _LOCKS.get(key)
    if held is None:
        return
    held[1] = 0 if everything else held[1] - 1
    if held[1] <= 0:
        _close_lock(key)


def unlock_all_run_dirs() -> None:
    """Release every run-folder lock this process holds (the CLI, when a command ends)."""
    for key in list(_LOCKS):
        _close_lock(key)


def _close_lock(key: str) -> None:
    fd, _ = _LOCKS.pop(key)
    try:  # removed while still locked, so a process that opens it now retries on a fresh file
        if os.fstat(fd).st_ino == os.stat(os.path.join(key, LOCK_FILE)).st_ino:
            os.unlink(os.path.join(key, LOCK_FILE))
    except OSError:
        pass
    os.close(fd)  # releases the flock


@contextlib.contextmanager
def locked_run_dir(folder, action: str = "use"):
    lock_run_dir(folder, action)
    try:
        yield Path(folder)
    finally:
        unlock_run_dir(folder)


def _contents(folder: Path) -> list:
    """What is in ``folder``, the lock file and the run marker aside."""
    return [p for p in folder.iterdir() if p.name not in (LOCK_FILE, RUN_MARKER)]


def remove_empty_run_dir(path, keep_folder: bool = False) -> None:
    """Remove ``path`` if it holds nothing but empty folders (and the lock file and run marker) -- a run
    that failed before writing anything -- unless another process holds its lock. ``keep_folder``: the
    folder was there before the run; only the marker the run added goes."""
    path = Path(path)
    if not path.is_dir() or any(p.is_file() or p.is_symlink() for p in path.rglob("*")
                                if p.name not in (LOCK_FILE, RUN_MARKER)):
        return
    try:
        lock_run_dir(path)
    except PassZooError:
        return  # another run is starting in it
    try:
        if keep_folder:
            (path / RUN_MARKER).unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
    finally:
        unlock_run_dir(path, everything=True)


# ------------------------------------------------------------------ which folders are runs
RUN_MARKER = ".pass-zoo-run"  # written into every run folder when it is created: it may be replaced
RUN_MARKER_TEXT = '{"format": "pass-zoo-run/1"}\n'
# What a run folder written before the marker existed may hold (besides its method's files).
_LEGACY_NAMES = ("config.json", "model.safetensors", "metrics.json", "masks.json", "masks.safetensors",
                 "model.onnx", "export.json", "README.md", "kept_channels.png", "latency.json", "hub.json",
                 "error.log", "checkpoints", LOCK_FILE)


def is_run_dir(folder) -> bool:
    """``folder`` was written by pass-zoo: its marker, or -- for runs from before the marker -- only
    files a run writes, with a metrics.json, config.json or checkpoint that pass-zoo wrote."""
    folder = Path(folder)
    if (folder / RUN_MARKER).is_file():
        return True
    if not folder.is_dir():
        return False

    known = set(_LEGACY_NAMES).union(*(get_method(m).artefacts for m in list_methods()))
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return False
    if not names or any(n not in known and not n.startswith(".") for n in names):
        return False
    return _wrote(folder / "metrics.json", "config") or _wrote(folder / "config.json", "model_args") \
        or any(_wrote(p / "state.json", "carry") for p in (folder / "checkpoints").glob("*"))


def _wrote(path: Path, key: str) -> bool:
    """``path`` is a JSON object with ``key``, as pass-zoo writes it."""
    try:
        return path.is_file() and path.stat().st_size < (64 << 20) and key in json.loads(path.read_text())
    except (OSError, ValueError, TypeError):
        return False


def _mark(out: Path) -> None:
    if not (out / RUN_MARKER).is_file():
        atomic_write_text(out / RUN_MARKER, RUN_MARKER_TEXT)


def prepare_run_dir(out, overwrite: bool = False, resume: bool = False) -> Path:
    """Create and lock ``out``; refuse an existing non-empty folder unless ``overwrite`` (or ``resume``),
    ``overwrite`` of a folder that is not a pass-zoo run, and a folder another run holds. (The caller
    checks ``out`` against the run's inputs first: ``validate.check_out_vs_inputs``.)"""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a folder")
    if resume:
        if not out.is_dir():
            raise RunDirError(f"--resume: {out} does not exist (start the run without --resume)")
        lock_run_dir(out, "resume")
        return out
    not_empty = RunDirError(f"--out {out} already exists and is not empty (pass --overwrite to replace it, "
                            "or --resume to continue it)")
    not_a_run = RunDirError(f"--overwrite: {out} is not a pass-zoo run folder (it holds files no run wrote); "
                            "--overwrite only replaces run folders, so remove it yourself or choose another --out")
    if out.is_dir() and not (out / LOCK_FILE).exists() and _contents(out):
        if not overwrite:
            raise not_empty  # refused without adding a lock file to the user's folder
        if not is_run_dir(out):
            raise not_a_run
    _mkdir(out)
    lock_run_dir(out, "write")  # before looking inside: two runs started together cannot both pass
    if _contents(out):
        if not overwrite or not is_run_dir(out):
            unlock_run_dir(out)
            raise not_a_run if overwrite else not_empty
        try:
            for p in _contents(out):  # the lock file stays: it is what keeps a second run out
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        except OSError as exc:
            raise RunDirError(f"cannot remove {out} for --overwrite: {exc.strerror or exc}") from exc
    _mark(out)
    return out
