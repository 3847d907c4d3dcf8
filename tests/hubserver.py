"""A stand-in for the Hugging Face hub on 127.0.0.1, for huggingface_hub's real client (HF_ENDPOINT points here).

It serves what huggingface_hub 2.4 asks for in snapshot_download and hf_hub_download:

    GET  /api/models/{repo}/revision/{rev}         repo info: {"id", "sha", "siblings"}
    GET  /api/models/{repo}/tree/{rev}?recursive=  the file list: type, path, size, oid (git blob sha1), lfs
    HEAD /{repo}/resolve/{rev}/{file}              X-Repo-Commit, ETag (git sha1, or X-Linked-Etag: the sha256 for
                                                   LFS files), X-Linked-Size, Content-Length
    GET  /{repo}/resolve/{rev}/{file}              the bytes; a Range request gets 206 and Content-Range
    GET  /api/agent-harnesses                      an empty registry (huggingface_hub's own telemetry asks for it)

It never sends Xet headers (X-Xet-Hash, xet-auth links), so the client uses plain HTTP. Unknown repos, revisions and
files get 404 with the X-Error-Code the client maps to its exceptions. Faults to inject: `drop_once` (send the first
N bytes of a file, then close the connection), `fail` (HTTP 500 on GET), `tampered` (serve other bytes than listed).
Every request is recorded. Loopback only, threads are daemons, sockets time out, `close()` stops it.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".gguf")
API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rev>[^/?]+)")
RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)")
RANGE = re.compile(r"bytes=(\d+)-(\d*)")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self) -> None:
        if not self.commit:
            listing = "".join(f"{name}:{git_oid(data)}\n" for name, data in sorted(self.files.items()))
            self.commit = hashlib.sha1(listing.encode()).hexdigest()  # a stand-in commit id: 40 hex digits


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StandInHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    drop_once: dict[str, int] = field(default_factory=dict)  # file name -> bytes sent before the connection drops
    fail: set[str] = field(default_factory=set)
    tampered: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def add_repo(self, repo_id: str, folder: Path) -> Repo:
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        self.repos[repo_id] = Repo(files)
        return self.repos[repo_id]

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
        self.drop_once.clear()
        self.fail.clear()
        self.tampered.clear()

    def gets(self, filename: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.path.endswith("/" + filename)]

    def repo_requests(self, repo_id: str) -> list[Request]:
        """Requests about one repository (huggingface_hub also asks for /api/agent-harnesses on its own)."""
        with self._lock:
            return [r for r in self.requests if f"/{repo_id}/" in r.path + "/"]

    def record(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> StandInHub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(hub: StandInHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 10

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                  send_body: bool = True) -> None:
            self.send_response(status)
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def _error(self, status: int, code: str, commit: str | None = None) -> None:
            headers = {"X-Error-Code": code, "Content-Type": "application/json"}
            if commit:
                headers["X-Repo-Commit"] = commit
            self._send(status, json.dumps({"error": code}).encode(), headers)

        def _repo(self, repo_id: str, rev: str) -> Repo | None:
            repo = hub.repos.get(unquote(repo_id))
            if repo is None:
                self._error(404, "RepoNotFound")
                return None
            if unquote(rev) not in ("main", repo.commit):
                self._error(404, "RevisionNotFound")
                return None
            return repo

        def _serve(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.record(Request(self.command, path, dict(self.headers.items())))
            if path == "/api/agent-harnesses":
                self._send(200, json.dumps({"standardEnvVars": [], "harnesses": {}}).encode(),
                           {"Content-Type": "application/json"})
            elif match := API.fullmatch(path):
                if (repo := self._repo(match["repo"], match["rev"])) is not None:
                    self._api(match["repo"], match["kind"], repo)
            elif match := RESOLVE.fullmatch(path):
                if (repo := self._repo(match["repo"], match["rev"])) is not None:
                    self._file(repo, unquote(match["file"]), body)
            else:
                self._error(404, "NotFound")

        def _api(self, repo_id: str, kind: str, repo: Repo) -> None:
            if kind == "revision":
                data: Any = {"id": unquote(repo_id), "sha": repo.commit, "private": False,
                             "siblings": [{"rfilename": name} for name in repo.files]}
            else:
                data = [{"type": "file", "path": name, "size": len(content), "oid": git_oid(content),
                         **({"lfs": {"oid": hashlib.sha256(content).hexdigest(), "size": len(content),
                                     "pointerSize": 134}} if name.endswith(LFS_SUFFIXES) else {})}
                        for name, content in repo.files.items()]
            self._send(200, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _file(self, repo: Repo, name: str, body: bool) -> None:
            if name not in repo.files:
                self._error(404, "EntryNotFound", repo.commit)
                return
            listed = repo.files[name]
            data = hub.tampered.get(name, listed)
            headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{git_oid(listed)}"', "Accept-Ranges": "bytes"}
            if name.endswith(LFS_SUFFIXES):
                headers |= {"X-Linked-Etag": f'"{hashlib.sha256(listed).hexdigest()}"', "X-Linked-Size": str(len(data))}
            if not body:
                self._send(200, data, headers, send_body=False)
                return
            if name in hub.fail:
                self._error(500, "InternalError")
                return
            if name in hub.drop_once:
                self._drop(data, headers, hub.drop_once.pop(name))
                return
            start, end = 0, len(data) - 1
            if (match := RANGE.fullmatch(self.headers.get("Range", ""))) is not None:
                start, end = int(match[1]), int(match[2] or end)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206 if "Content-Range" in headers else 200, data[start:end + 1], headers)

        def _drop(self, data: bytes, headers: dict[str, str], sent: int) -> None:
            """Promise the whole file, send `sent` bytes and cut the connection: a network failure mid-download."""
            self.send_response(200)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:sent])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    return Handler
