"""``pass-zoo prune --num-processes N``: run the same command on N processes via ``accelerate launch``."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import List, Optional


class _TextSink:
    """Bytes onto a text stream that has no binary buffer (e.g. a redirected sys.stderr)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, data: bytes) -> None:
        self.stream.write(data.decode("utf-8", "replace"))

    def flush(self) -> None:
        self.stream.flush()


def without_num_processes(argv: List[str]) -> List[str]:
    """``argv`` without ``--num-processes N`` (what each launched worker runs)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            out.append(a)
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_LAUNCHER_LOG = re.compile(rb"[WEI]\d{4} [\d:.]+ +\d+ \S*torch/distributed/elastic/.*")


def forward_worker_stderr(fd: int, err) -> Optional[bytes]:
    """Copy the workers' stderr from ``fd`` to ``err`` until the first ``pass-zoo:`` line; return that line.

    After a worker's error the launcher adds its own logs, traceback and failure report, and the
    other workers may repeat the error: the user has their one line already, the rest is dropped.
    Progress-bar redraws (``\\r``) are passed on as they come.
    """
    first, pending = None, b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *pieces, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
        for piece in pieces:
            if first is not None:
                continue
            log = _LAUNCHER_LOG.search(piece)  # may follow a progress bar on the same line
            if log:
                piece = piece[:log.start()]
            at = piece.find(b"pass-zoo: ")
            if at < 0:
                err.write(piece)
                continue
            first = piece[at:]
            again = first.find(b"pass-zoo: ", 1)  # another worker's copy of the line, written into this one
            if again > 0:
                first = first[:again] + b"\n"
            err.write(piece[:at] + (b"\n" if at else b"") + first)  # end a bar another process left open
        err.flush()
    if first is None and pending:
        err.write(pending)
        err.flush()
    return first


def relaunch(argv: List[str], num_processes: int, mixed_precision: str) -> int:
    """``pass-zoo ARGV`` on ``num_processes`` processes through ``accelerate launch``; returns the exit code
    of the workers (2 after an error line, 130 after Ctrl-C) or of the launcher."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
           "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), "-m", "pass_zoo.cli", *argv]
    # Own session: a terminal Ctrl-C reaches only this process, which forwards it once to the
    # launcher, which forwards it once to every worker (they then checkpoint and stop). SIGTERM and
    # SIGHUP are forwarded too, so the workers never outlive this process's orderly end.
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env, start_new_session=True)
    forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, lambda signum, _frame: proc.send_signal(signum)) for sig in forwarded}
    try:
        err = getattr(sys.stderr, "buffer", None) or _TextSink(sys.stderr)
        first = forward_worker_stderr(proc.stderr.fileno(), err)
        rc = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if first is not None:
        return 130 if first.startswith(b"pass-zoo: interrupted") else 2
    return rc
