"""A fake Hugging Face Hub on loopback: the few routes `huggingface_hub.snapshot_download` uses.

    GET  /api/models/{org}/{name}/revision/{rev}        repo info: id, sha, siblings
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}]   file listing (recursive), as the Hub's tree API
    HEAD /{org}/{name}/resolve/{rev}/{path}             file metadata: X-Repo-Commit, ETag, Content-Length
    GET  /{org}/{name}/resolve/{rev}/{path}             the file

Errors carry the Hub's `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound), which
huggingface_hub turns into its typed exceptions. Every request is recorded in `hub.requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_INFO = re.compile(rf"^/api/models/{_REPO}/revision/(?P<rev>[^/]+)$")
_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_FILE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


class FakeHub:
    """Repos of files in memory, served over HTTP on 127.0.0.1."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.commits: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo: str, files: dict[str, bytes]) -> str:
        """Create or replace `repo` with `files` (path -> content); returns its commit sha."""
        digest = hashlib.sha1(repo.encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + files[path])
        with self._lock:
            self.repos[repo] = dict(files)
            self.commits[repo] = digest.hexdigest()
        return self.commits[repo]

    def folder_files(self, local: Path, prefix: str = "") -> dict[str, bytes]:
        return {prefix + p.relative_to(local).as_posix(): p.read_bytes() for p in sorted(local.rglob("*")) if p.is_file()}

    def downloaded(self) -> list[str]:
        """Paths of the files fetched with GET, in order."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def close(self) -> None:
        """Stop serving (idempotent): afterwards, nothing listens on `url`."""
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        def _serve(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append((self.command, path))
            for pattern, route in ((_INFO, self._info), (_TREE, self._tree), (_FILE, self._file)):
                match = pattern.match(path)
                if match:
                    route(body, **match.groupdict())
                    return
            self._reply(404, b"not found", body, {"X-Error-Code": "EntryNotFound"})

        def _repo(self, repo: str, rev: str, body: bool) -> tuple[dict[str, bytes], str] | None:
            with hub._lock:
                files, sha = hub.repos.get(repo), hub.commits.get(repo)
            if files is None:
                self._reply(404, b'{"error": "Repository not found"}', body, {"X-Error-Code": "RepoNotFound"})
                return None
            if rev not in ("main", sha):
                self._reply(404, b'{"error": "Invalid rev id"}', body, {"X-Error-Code": "RevisionNotFound"})
                return None
            return files, sha

        def _info(self, body: bool, repo: str, rev: str) -> None:
            found = self._repo(repo, rev, body)
            if found:
                files, sha = found
                info = {"id": repo, "modelId": repo, "sha": sha, "private": False,
                        "siblings": [{"rfilename": p} for p in sorted(files)]}
                self._json(info, body)

        def _tree(self, body: bool, repo: str, rev: str, path: str | None) -> None:
            found = self._repo(repo, rev, body)
            if found:
                files, _ = found
                prefix = f"{path.strip('/')}/" if path else ""
                entries, folders = [], set()
                for name in sorted(files):
                    if not name.startswith(prefix):
                        continue
                    parts = name.split("/")
                    folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
                    content = files[name]
                    oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
                    entries.append({"type": "file", "oid": oid, "size": len(content), "path": name})
                entries += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "path": f}
                            for f in sorted(folders) if f.startswith(prefix)]
                self._json(entries, body)

        def _file(self, body: bool, repo: str, rev: str, path: str) -> None:
            found = self._repo(repo, rev, body)
            if not found:
                return
            files, sha = found
            if path not in files:
                self._reply(404, b"Entry not found", body, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha})
                return
            content = files[path]
            etag = hashlib.sha256(content).hexdigest()
            self._reply(200, content, body, {"X-Repo-Commit": sha, "ETag": f'"{etag}"',
                                             "Content-Type": "application/octet-stream"})

        def _json(self, value: object, body: bool) -> None:
            self._reply(200, json.dumps(value).encode(), body, {"Content-Type": "application/json"})

        def _reply(self, status: int, content: bytes, body: bool, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            if body:
                self.wfile.write(content)

    return Handler


