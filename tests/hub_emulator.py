"""A loopback HTTP server that answers the Hub API calls ``huggingface_hub`` makes to publish a folder.

Only what ``HfApi.create_repo`` / ``create_branch`` / ``upload_folder`` use, as huggingface_hub 2.4
sends it (read from ``hf_api.py``, ``_commit_api.py``, ``lfs.py``):

* ``GET  /api/agent-harnesses``                       best-effort registry for the client's user agent
* ``POST /api/repos/create``                         JSON {name, organization, visibility?}
* ``GET  /api/models/{repo}``                        repo info (asked after a refused create)
* ``POST /api/models/{repo}/branch/{branch}``        create a branch
* ``POST /api/validate-yaml``                        the README front matter, before any upload
* ``POST /api/models/{repo}/preupload/{rev}``        per file: "regular" (inline) or "lfs"
* ``POST /{repo}.git/info/lfs/objects/batch``        LFS batch: where to PUT each blob
* ``PUT  /lfs/{oid}``, ``POST /lfs-verify``          the blob bytes, then the verify step
* ``POST /api/models/{repo}/commit/{rev}``           NDJSON: header, then file / lfsFile lines

Everything is recorded (``requests``), blobs are checked against their sha256 oid, and a commit
referencing a blob that was never uploaded is refused -- like the real Hub. ``fail`` injects an
HTTP status for a route, to test error paths.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubEmulator:
    LFS_SUFFIXES = (".safetensors", ".onnx", ".bin", ".pt", ".pth", ".ckpt")  # a new repo's .gitattributes
    def __init__(self, inline_all: bool = False):
        self.requests = []  # (method, path, parsed body or None)
        self.created = []  # create-repo payloads
        self.branches = []
        self.validated = []  # README contents sent to validate-yaml
        self.blobs = {}  # sha256 hex -> bytes received over LFS
        self.commits = []  # {"repo", "revision", "header", "files": {path: bytes}, "lfs": [paths]}
        self.fail = {}  # route name -> HTTP status to answer instead
        # True: every file is committed inline ("regular"), so no LFS / Xet transfer is needed
        self.inline_all = inline_all
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, obj=None):
                data = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("X-Error-Message", (obj or {}).get("error", "emulated error"))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                emulator._handle(self, "POST")

            def do_PUT(self):
                emulator._handle(self, "PUT")

            def do_GET(self):
                emulator._handle(self, "GET")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------------ routes
    def _handle(self, h, method: str):
        path = h.path.split("?")[0]
        body = h._body()
        routes = [
            ("harnesses", "GET", r"^/api/agent-harnesses$"),
            ("create", "POST", r"^/api/repos/create$"),
            ("repo_info", "GET", r"^/api/models/([^/]+/[^/]+)(/revision/.+)?$"),
            ("branch", "POST", r"^/api/models/([^/]+/[^/]+)/branch/(.+)$"),
            ("validate", "POST", r"^/api/validate-yaml$"),
            ("preupload", "POST", r"^/api/models/([^/]+/[^/]+)/preupload/(.+)$"),
            ("lfs_batch", "POST", r"^/([^/]+/[^/]+)\.git/info/lfs/objects/batch$"),
            ("lfs_put", "PUT", r"^/lfs/([0-9a-f]{64})$"),
            ("lfs_verify", "POST", r"^/lfs-verify$"),
            ("commit", "POST", r"^/api/models/([^/]+/[^/]+)/commit/(.+)$"),
        ]
        for name, verb, pattern in routes:
            match = re.match(pattern, path)
            if verb == method and match:
                parsed = None if name in ("lfs_put", "commit", "harnesses", "repo_info") else json.loads(body or b"{}")
                self.requests.append((name, h.path, parsed, dict(h.headers)))
                if name in self.fail:
                    return h._send(self.fail[name], {"error": f"emulated {self.fail[name]} on {name}"})
                return getattr(self, f"_{name}")(h, match, parsed, body)
        self.requests.append(("unexpected", f"{method} {h.path}", None, dict(h.headers)))
        return h._send(404, {"error": f"not emulated: {method} {path}"})

    def _harnesses(self, h, m, payload, body):  # best-effort agent detection in the client's user agent
        return h._send(200, {"standardEnvVars": [], "harnesses": {}})

    def _create(self, h, m, payload, body):
        self.created.append(payload)
        return h._send(200, {"url": f"{self.url}/{payload['organization']}/{payload['name']}"})

    def _repo_info(self, h, m, payload, body):  # only asked after a refused create: no such repo here
        return h._send(404, {"error": "Repository not found"})

    def _branch(self, h, m, payload, body):
        self.branches.append((m.group(1), m.group(2)))
        return h._send(200, {})

    def _validate(self, h, m, payload, body):
        self.validated.append(payload["content"])
        return h._send(200, {"errors": [], "warnings": []})

    def _preupload(self, h, m, payload, body):
        files = []
        for f in payload["files"]:
            sample = base64.b64decode(f["sample"])
            # the Hub's rule: the repo's .gitattributes LFS patterns, big files, binary content
            lfs = not self.inline_all and (f["path"].endswith(self.LFS_SUFFIXES) or f["size"] > 10 * 1024 * 1024
                                           or b"\0" in sample)
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                          "oid": None})
        return h._send(200, {"files": files, "commitOid": "0" * 40})

    def _lfs_batch(self, h, m, payload, body):
        objects = [{"oid": o["oid"], "size": o["size"],
                    "actions": {"upload": {"href": f"{self.url}/lfs/{o['oid']}"},
                                "verify": {"href": f"{self.url}/lfs-verify"}}}
                   for o in payload["objects"]]
        return h._send(200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, h, m, payload, body):
        oid = m.group(1)
        if hashlib.sha256(body).hexdigest() != oid:
            return h._send(400, {"error": "sha256 of the uploaded bytes does not match the oid"})
        self.blobs[oid] = body
        return h._send(200, {})

    def _lfs_verify(self, h, m, payload, body):
        ok = payload["oid"] in self.blobs and len(self.blobs[payload["oid"]]) == payload["size"]
        return h._send(200 if ok else 404, {} if ok else {"error": "blob not uploaded"})

    def _commit(self, h, m, payload, body):
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        commit = {"repo": m.group(1), "revision": m.group(2), "header": None, "files": {}, "lfs": [],
                  "content_type": h.headers.get("Content-Type")}
        for item in lines:
            if item["key"] == "header":
                commit["header"] = item["value"]
            elif item["key"] == "file":
                commit["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            elif item["key"] == "lfsFile":
                blob = self.blobs.get(item["value"]["oid"])
                if blob is None:
                    return h._send(400, {"error": f"lfs object {item['value']['oid']} was never uploaded"})
                commit["files"][item["value"]["path"]] = blob
                commit["lfs"].append(item["value"]["path"])
            else:
                return h._send(400, {"error": f"unexpected commit line {item['key']}"})
        self.commits.append(commit)
        oid = hashlib.sha1(body).hexdigest()
        return h._send(200, {"commitUrl": f"{self.url}/{m.group(1)}/commit/{oid}", "commitOid": oid,
                             "success": True})
