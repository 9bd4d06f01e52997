"""A loopback Hugging Face Hub for offline ``push_to_hub`` / ``from_pretrained`` tests (docs/design.md §8).

Implements only what ``huggingface_hub`` (2.x) and ``transformers`` (5.x) call to create a model repo, commit files
inline (no LFS, no Xet) and download them again. Binds 127.0.0.1 only; :func:`loopback_hub` stops it at the end of
the ``with`` block, and a timer stops it anyway after ``max_lifetime_s`` seconds.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

_EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, which the hub sends as the ``ETag`` of regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class HubStore:
    """Model repos as ``{repo_id: {revision or commit sha: {path: bytes}}}``; every commit is a full snapshot."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.heads: dict[str, str] = {}  # repo_id -> sha of main

    def create(self, repo_id: str) -> bool:
        with self.lock:
            if repo_id in self.repos:
                return False
            self.repos[repo_id] = {"main": {}, _EMPTY_TREE: {}}
            self.heads[repo_id] = _EMPTY_TREE
            return True

    def snapshot(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        """``(commit sha, files)`` of ``revision`` ("main" or a sha), or None when it does not exist."""
        with self.lock:
            revisions = self.repos.get(repo_id)
            if revisions is None or revision not in revisions:
                return None
            sha = self.heads[repo_id] if revision == "main" else revision
            return sha, revisions[revision]

    def commit(self, repo_id: str, operations: list[dict]) -> str:
        with self.lock:
            files = dict(self.repos[repo_id]["main"])
            for operation in operations:
                key, value = operation["key"], operation["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {path: data for path, data in files.items() if not path.startswith(prefix)}
                elif key != "header":
                    raise ValueError(f"unsupported commit operation {key!r} (the loopback hub takes inline files)")
            sha = hashlib.sha1(f"{repo_id}:{time.time_ns()}:{sorted(files)}".encode()).hexdigest()
            self.repos[repo_id]["main"] = files
            self.repos[repo_id][sha] = files
            self.heads[repo_id] = sha
            return sha


class _Handler(BaseHTTPRequestHandler):
    store: HubStore  # set on the subclass made by LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - keep test output quiet
        pass

    # -- responses ---------------------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False):
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, commit: str | None = None, head: bool = False) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(status, json.dumps({"error": message}).encode(), headers, head=head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # -- routing -----------------------------------------------------------------------------------------------

    def do_POST(self) -> None:  # noqa: N802 - http.server naming
        path = urlparse(self.path).path
        body = self._body()
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload.get('organization') or 'user'}/{payload['name']}"
            url = f"http://{self.headers['Host']}/{repo_id}"
            created = self.store.create(repo_id)
            self._json(200 if created else 409, {"url": url, **({} if created else {"error": "already exists"})})
        elif path == "/api/validate-yaml":
            self._json(200, {"errors": [], "warnings": []})
        elif path.startswith("/api/models/") and "/preupload/" in path:
            repo_id, revision = path[len("/api/models/") :].split("/preupload/")
            self._preupload(repo_id, unquote(revision), json.loads(body))
        elif path.startswith("/api/models/") and "/commit/" in path:
            repo_id, _ = path[len("/api/models/") :].split("/commit/")
            if self.store.snapshot(repo_id, "main") is None:
                return self._error(404, "RepoNotFound", f"repository {repo_id} not found")
            operations = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            sha = self.store.commit(repo_id, operations)
            url = f"http://{self.headers['Host']}/{repo_id}/commit/{sha}"
            self._json(200, {"commitOid": sha, "commitUrl": url, "pullRequestUrl": None})
        else:
            self._error(404, "NotFound", f"loopback hub has no POST {path}")

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        snapshot = self.store.snapshot(repo_id, revision)
        if snapshot is None:
            return self._error(404, "RepoNotFound", f"repository {repo_id} not found")
        _, files = snapshot
        answer = [
            {
                "path": entry["path"],
                "uploadMode": "regular",
                "shouldIgnore": False,
                "oid": git_blob_sha1(files[entry["path"]]) if entry["path"] in files else None,
            }
            for entry in payload["files"]
        ]
        self._json(200, {"files": answer})

    def do_GET(self) -> None:  # noqa: N802
        self._get(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._get(head=True)

    def _get(self, head: bool) -> None:
        parsed = urlparse(self.path)
        parts = [unquote(part) for part in parsed.path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo_id, rest = "/".join(parts[2:4]), parts[4:]
            if not rest:
                return self._model_info(repo_id, "main")
            if rest[0] == "revision" and len(rest) == 2:
                return self._model_info(repo_id, rest[1])
            if rest[0] == "tree" and len(rest) >= 2:
                recursive = parse_qs(parsed.query).get("recursive", ["false"])[0].lower() in ("1", "true")
                return self._tree(repo_id, rest[1], "/".join(rest[2:]), recursive)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head)
        self._error(404, "NotFound", f"loopback hub has no GET {parsed.path}", head=head)

    def _model_info(self, repo_id: str, revision: str) -> None:
        snapshot = self.store.snapshot(repo_id, revision)
        if snapshot is None:
            code = "RepoNotFound" if self.store.snapshot(repo_id, "main") is None else "RevisionNotFound"
            return self._error(404, code, f"{repo_id}@{revision} not found")
        sha, files = snapshot
        self._json(200, {"id": repo_id, "sha": sha, "siblings": [{"rfilename": path} for path in sorted(files)]})

    def _tree(self, repo_id: str, revision: str, folder: str, recursive: bool) -> None:
        snapshot = self.store.snapshot(repo_id, revision)
        if snapshot is None:
            return self._error(404, "RevisionNotFound", f"{repo_id}@{revision} not found")
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path, data in sorted(snapshot[1].items()):
            if not path.startswith(prefix):
                continue
            relative = path[len(prefix) :]
            if "/" in relative and not recursive:
                folders.add(prefix + relative.split("/")[0])
                continue
            entries.append({"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)})
        entries += [{"type": "directory", "path": path, "oid": _EMPTY_TREE} for path in sorted(folders)]
        self._json(200, entries)

    def _resolve(self, repo_id: str, revision: str, filename: str, head: bool) -> None:
        snapshot = self.store.snapshot(repo_id, revision)
        if snapshot is None:
            code = "RepoNotFound" if self.store.snapshot(repo_id, "main") is None else "RevisionNotFound"
            return self._error(404, code, f"{repo_id}@{revision} not found", head=head)
        sha, files = snapshot
        if filename not in files:
            return self._error(404, "EntryNotFound", f"{filename} not in {repo_id}@{revision}", sha, head=head)
        data = files[filename]
        headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": sha, "Content-Type": "application/octet-stream"}
        self._send(200, data, headers, head=head)


class LoopbackHub:
    """The server, its thread and its store; ``endpoint`` is what ``HF_ENDPOINT`` should be set to."""

    def __init__(self, max_lifetime_s: float = 600.0) -> None:
        self.store = HubStore()
        handler = type("LoopbackHandler", (_Handler,), {"store": self.store})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="loopback-hub", daemon=True)
        self._deadline = threading.Timer(max_lifetime_s, self.stop)
        self._deadline.daemon = True
        self._stopped = threading.Event()

    def start(self) -> LoopbackHub:
        self._thread.start()
        self._deadline.start()
        return self

    def stop(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._deadline.cancel()
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def loopback_hub(max_lifetime_s: float = 600.0) -> Iterator[LoopbackHub]:
    """Run a :class:`LoopbackHub` for the duration of the ``with`` block (and at most ``max_lifetime_s``)."""
    hub = LoopbackHub(max_lifetime_s).start()
    try:
        yield hub
    finally:
        hub.stop()
