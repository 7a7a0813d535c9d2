"""A loopback stand-in for the Hugging Face Hub, speaking the requests that the installed
``huggingface_hub`` client sends for ``create_repo`` + ``create_commit`` with Xet disabled:

- ``POST /api/repos/create``                          create a repo (409 + url when it exists)
- ``POST /api/validate-yaml``                         README.md metadata check
- ``POST /api/models/<repo>/preupload/<rev>``         regular or LFS, per file
- ``POST /<repo>.git/info/lfs/objects/batch``         LFS upload instructions
- ``PUT  /lfs-upload/<oid>``                          the LFS object bytes (sha256-checked)
- ``POST /lfs-verify/<oid>``                          LFS verify step
- ``POST /api/models/<repo>/commit/<rev>``            NDJSON commit: header, file, lfsFile lines

Everything received is recorded so that tests can assert what actually reached the "Hub".
API calls need ``Authorization: Bearer <token>``; the LFS PUT carries none, like the Hub's
pre-signed storage URLs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USERNAME = "kaio-tester"
# The Hub's default .gitattributes sends these to LFS; everything else is a regular git blob.
LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".pt")

_PREUPLOAD = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/?]+)")
_COMMIT = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/?]+)")
_LFS_BATCH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch$")
_LFS_UPLOAD = re.compile(r"^/lfs-upload/(?P<oid>[0-9a-f]{64})$")
_LFS_VERIFY = re.compile(r"^/lfs-verify/(?P<oid>[0-9a-f]{64})$")


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    sha: str
    files: dict[str, bytes]  # path in repo -> content, regular and LFS alike
    lfs_paths: list[str]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)


class HubServer:
    """``with HubServer(token=...) as hub:`` serves on ``hub.url`` until the block ends."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.lfs_verified: list[str] = []
        self.requests: list[tuple[str, str]] = []
        self.unauthorized: list[tuple[str, str]] = []
        self.lock = threading.Lock()
        self._httpd = _ClosingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        # A short poll interval makes shutdown quick: tests start and stop many servers.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.drop_open_connections()
        self._thread.join(timeout=5)

    @property
    def commits(self) -> list[Commit]:
        return [commit for repo in self.repos.values() for commit in repo.commits]


class _ClosingHTTPServer(ThreadingHTTPServer):
    """Also ends kept-alive client connections on close, so a stopped server is really gone."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._open_connections: set[socket.socket] = set()

    def process_request(self, request: socket.socket, client_address: object) -> None:
        self._open_connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        self._open_connections.discard(request)
        super().shutdown_request(request)

    def drop_open_connections(self) -> None:
        for connection in list(self._open_connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # the client closed it first


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class HubHandler(BaseHTTPRequestHandler):
        # Keep-alive, as the client expects; every response therefore sends Content-Length.
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep pytest output clean

        def do_POST(self) -> None:
            self._dispatch()

        def do_PUT(self) -> None:
            self._dispatch()

        def do_GET(self) -> None:
            self._dispatch()

        def _dispatch(self) -> None:
            body = self._read_body()
            path = self.path.split("?", 1)[0]
            with hub.lock:
                hub.requests.append((self.command, path))
            if self.command == "PUT" and (match := _LFS_UPLOAD.match(path)):
                return self._lfs_upload(match["oid"], body)
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                with hub.lock:
                    hub.unauthorized.append((self.command, path))
                # What the Hub answers to a wrong or missing token.
                return self._json(401, {"error": "Invalid credentials in Authorization header"})
            routes = (
                (_PREUPLOAD, self._preupload),
                (_COMMIT, self._commit),
                (_LFS_BATCH, self._lfs_batch),
                (_LFS_VERIFY, self._lfs_verify),
            )
            if self.command == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if self.command == "POST" and path == "/api/validate-yaml":
                return self._json(200, {"errors": [], "warnings": []})
            for pattern, route in routes:
                if self.command == "POST" and (match := pattern.match(path)):
                    return route(match, body)
            self._json(404, {"error": f"no route for {self.command} {path}"})

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while size := int(self.rfile.readline().split(b";")[0], 16):
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()  # the blank line after the last chunk
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _json(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _create_repo(self, payload: dict) -> None:
            repo_id = f"{payload.get('organization') or USERNAME}/{payload['name']}"
            url = f"{hub.url}/{repo_id}"
            with hub.lock:
                if repo_id in hub.repos:
                    return self._json(409, {"error": "You already created this model repo", "url": url})
                hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private")
            self._json(200, {"url": url})

        def _preupload(self, match: re.Match, body: bytes) -> None:
            if match["repo"] not in hub.repos:
                return self._json(404, {"error": "Repository not found"})
            files = [
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if entry["path"].endswith(LFS_SUFFIXES) else "regular",
                    "shouldIgnore": False,
                }
                for entry in json.loads(body)["files"]
            ]
            self._json(200, {"files": files})

        def _lfs_batch(self, match: re.Match, body: bytes) -> None:
            objects = [
                {
                    "oid": obj["oid"],
                    "size": obj["size"],
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": f"{hub.url}/lfs-upload/{obj['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs-verify/{obj['oid']}"},
                    },
                }
                for obj in json.loads(body)["objects"]
            ]
            self._json(200, {"transfer": "basic", "objects": objects})

        def _lfs_upload(self, oid: str, body: bytes) -> None:
            if hashlib.sha256(body).hexdigest() != oid:
                return self._json(400, {"error": "sha256 mismatch"})
            with hub.lock:
                hub.lfs_objects[oid] = body
            self._json(200, {})

        def _lfs_verify(self, match: re.Match, body: bytes) -> None:
            claimed = json.loads(body)
            stored = hub.lfs_objects.get(match["oid"])
            if stored is None or len(stored) != claimed["size"]:
                return self._json(404, {"error": "object not uploaded"})
            with hub.lock:
                hub.lfs_verified.append(match["oid"])
            self._json(200, {})

        def _commit(self, match: re.Match, body: bytes) -> None:
            repo = hub.repos.get(match["repo"])
            if repo is None:
                return self._json(404, {"error": "Repository not found"})
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header, operations = lines[0], lines[1:]
            if header["key"] != "header":
                return self._json(400, {"error": "the commit must start with its header line"})
            files: dict[str, bytes] = {}
            lfs_paths: list[str] = []
            for op in operations:
                value = op["value"]
                if op["key"] == "file" and value["encoding"] == "base64":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif op["key"] == "lfsFile":
                    content = hub.lfs_objects.get(value["oid"])
                    if content is None:
                        return self._json(422, {"error": f"LFS object for {value['path']} was never uploaded"})
                    files[value["path"]] = content
                    lfs_paths.append(value["path"])
                else:
                    return self._json(400, {"error": f"unexpected commit line {op['key']}"})
            sha = hashlib.sha1(body).hexdigest()
            commit = Commit(repo.repo_id, match["rev"], header["value"]["summary"], sha, files, lfs_paths)
            with hub.lock:
                repo.commits.append(commit)
            self._json(200, {"commitUrl": f"{hub.url}/{repo.repo_id}/commit/{sha}", "commitOid": sha})

    return HubHandler
