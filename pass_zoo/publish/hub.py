"""``publish``: upload a complete, verified run folder to the Hugging Face Hub with ``huggingface_hub``.

A run is publishable when every file a user of the repo needs is there and the ONNX file is the one
whose parity check passed (``export.json``: ``passed`` true and the sha256 of ``model.onnx``). The
card (``README.md`` + ``kept_channels.png``) is rendered when missing, or when it was rendered for
another repo id. Only ``PUBLISH_FILES`` (+ ``latency.json`` when measured) are uploaded, in one
commit; temporary files, ``hub.json`` and anything else in the folder stay local.

Order of work, so that a failure leaves nothing half-done: local checks -> token -> create the repo
-> one commit with every file (``upload_folder``). If creating the repo fails, nothing is uploaded;
a Hub commit is atomic, so a failed upload leaves no partial revision. ``hub.json`` (repo id,
revision, commit url) is written only after the commit succeeded.
"""
from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import List, Optional, Tuple

from .card import CARD_FILE, LATENCY_FILE, PLOT_FILE, render_card, write_card
from .. import __version__
from ..errors import PassZooError, one_line
from ..fileio import atomic_write_json
from ..methods import get_method
from ..validate import check_repo_id as check_name_of_repo, check_revision
from ..export.timm_model import verify_run_weights

log = logging.getLogger(__name__)

RUN_FILES = ("config.json", "model.safetensors", "metrics.json", "masks.json", "masks.safetensors",
             "model.onnx", "export.json")
CARD_FILES = (CARD_FILE, PLOT_FILE)
PUBLISH_FILES = RUN_FILES + CARD_FILES
OPTIONAL_FILES = (LATENCY_FILE,)
HUB_RECORD = "hub.json"


class PublishError(PassZooError):
    """A run cannot be published, or the Hub refused or could not be reached."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise PublishError(f"invalid --repo-id '{repo_id}': {one_line(exc)}") from exc
    if repo_id.count("/") != 1:
        raise PublishError(f"--repo-id must be ORG/NAME (a user or organisation and a name), got '{repo_id}'")
    return check_name_of_repo(repo_id, error=PublishError)


def check_publishable(run_dir) -> None:
    """Refuse a run whose files are incomplete or whose ONNX export did not pass its parity check;
    the one error line names every reason."""
    import json

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PublishError(f"run folder {run_dir} does not exist")
    problems = []
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    if missing:
        problems.append(f"incomplete run, missing {', '.join(missing)}")
    export = None
    if (run_dir / "export.json").is_file():
        try:
            export = json.loads((run_dir / "export.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            problems.append(f"export.json is not valid JSON ({exc})")
    if isinstance(export, dict) and export.get("passed") is not True:
        why = f": {export['error']}" if export.get("error") else ""
        problems.append(f"the ONNX parity check did not pass (export.json passed={export.get('passed')}{why})")
    elif isinstance(export, dict) and (run_dir / "model.onnx").is_file() \
            and export.get("sha256") != _sha256(run_dir / "model.onnx"):
        problems.append("model.onnx is not the file export.json verified (sha256 differs)")
    elif export is not None and not isinstance(export, dict):
        problems.append("export.json is not a JSON object")
    if "model.safetensors" not in missing:  # what eval/export would refuse, before any request

        try:
            verify_run_weights(run_dir)
        except PassZooError as exc:
            problems.append(one_line(exc))
    if problems:
        no_export = {"model.onnx", "export.json"} & set(missing) and not isinstance(export, dict)
        hint = "; 'pass-zoo export RUN' writes a verified model.onnx" if no_export else ""
        raise PublishError(f"refusing to publish {run_dir}: {'; '.join(problems)}{hint}")


def _card_is_current(run_dir: Path, repo_id: str) -> bool:
    """A card exists for this repo (a hand-edited card for the same repo is kept)."""
    card = run_dir / CARD_FILE
    if not card.is_file() or not (run_dir / PLOT_FILE).is_file():
        return False
    return f"hf-hub:{repo_id}\"" in card.read_text(encoding="utf-8", errors="replace")


def optional_files(run_dir: Path) -> Tuple[str, ...]:
    """Published when present: the latency report and the method's artefacts (what lets others
    transfer what it learned, e.g. PASS's hypernetwork)."""

    try:
        method = json.loads((run_dir / "metrics.json").read_text()).get("method")
        artefacts = get_method(method).artefacts if method else ()
    except (OSError, ValueError, PassZooError):
        artefacts = ()
    return OPTIONAL_FILES + tuple(artefacts)


def publish_plan(run_dir, repo_id: str) -> dict:
    """What ``publish`` would upload: ``files`` [(name, size or None if still to render)], the card text,
    and whether the card has to be (re-)rendered first. Reads only."""
    run_dir = Path(run_dir)
    check_repo_id(repo_id)
    check_publishable(run_dir)
    current = _card_is_current(run_dir, repo_id)
    card = (run_dir / CARD_FILE).read_text(encoding="utf-8") if current else render_card(run_dir, repo_id)
    files: List[Tuple[str, Optional[int]]] = []
    for name in PUBLISH_FILES + optional_files(run_dir):
        path = run_dir / name
        if name == CARD_FILE and not current:
            files.append((name, len(card.encode("utf-8"))))
        elif name == PLOT_FILE and not current:
            files.append((name, None))
        elif path.is_file():
            files.append((name, path.stat().st_size))
    return {"run_dir": run_dir, "repo_id": repo_id, "files": files, "card": card, "render_card": not current}


def resolve_token(token: Optional[str]) -> str:
    """``--token``, else ``HF_TOKEN``, else the stored login."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: pass --token, set HF_TOKEN, or log in with 'hf auth login'")
    return token


def hub_error(action: str, exc: BaseException, endpoint: str) -> PublishError:
    """One clear line for whatever the client raised (HTTP status, no network, offline mode, ...)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    # huggingface_hub wraps LFS upload failures in a RuntimeError: report the cause.
    while isinstance(exc, RuntimeError) and exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OfflineModeIsEnabled):
        return PublishError(f"{action}: HF_HUB_OFFLINE is set; unset it to publish")
    if isinstance(exc, HfHubHTTPError):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        reason = {401: "the Hub rejected the token (401 Unauthorized); check --token / HF_TOKEN",
                  403: "the token may not write there (403 Forbidden); use a write token for that namespace",
                  404: "not found (404); check --repo-id and --revision"}.get(status)
        detail = getattr(exc, "server_message", None) or one_line(exc)
        return PublishError(f"{action}: {reason or f'the Hub answered HTTP {status}'} ({one_line(detail)})")
    if isinstance(exc, (ConnectionError, TimeoutError, OSError)) or type(exc).__module__.startswith("httpx"):
        return PublishError(f"{action}: cannot reach the Hub at {endpoint} ({type(exc).__name__}: {one_line(exc)})")
    return PublishError(f"{action}: {type(exc).__name__}: {one_line(exc)}")


def publish(run_dir, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
            token: Optional[str] = None, dry_run: bool = False, commit_message: Optional[str] = None) -> dict:
    """Upload a run folder as a Hub model repo; ``dry_run`` only returns the plan (changes nothing)."""
    from huggingface_hub import HfApi


    if revision is not None:  # a branch name becomes part of the Hub's URLs
        check_revision(revision, error=PublishError)
    plan = publish_plan(run_dir, repo_id)
    if dry_run:
        return plan
    run_dir = plan["run_dir"]
    token = resolve_token(token)  # before any file is written: a missing token changes nothing
    if plan["render_card"]:
        write_card(run_dir, repo_id)
    files = [name for name in PUBLISH_FILES + optional_files(run_dir) if (run_dir / name).is_file()]
    hashes = {name: _sha256(run_dir / name) for name in files}
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
    except Exception as exc:
        log.info("create_repo failed", exc_info=True)
        raise hub_error(f"creating {repo_id} on the Hub failed, nothing was uploaded", exc, api.endpoint) from exc
    try:
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(run_dir), revision=revision, allow_patterns=files,
            commit_message=commit_message or f"Upload {run_dir.resolve().name} (pass-zoo {__version__})")
    except Exception as exc:
        log.info("upload_folder failed", exc_info=True)
        raise hub_error(f"uploading to {repo_id} failed (a Hub commit is all or nothing)", exc, api.endpoint) from exc
    record = {"repo_id": repo_id, "revision": revision or "main", "private": bool(private),
              "commit_url": info.commit_url, "commit_oid": info.oid, "endpoint": api.endpoint,
              "files": hashes, "published_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "pass_zoo": __version__}
    atomic_write_json(run_dir / HUB_RECORD, record)
    return {**plan, "files": [(n, (run_dir / n).stat().st_size) for n in files], "record": record}


def format_size(n: Optional[int]) -> str:
    if n is None:
        return "(rendered on publish)"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
