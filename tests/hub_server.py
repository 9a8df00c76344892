"""A local Hugging Face hub on 127.0.0.1: the subset of the hub's HTTP protocol that
`huggingface_hub` (hf_hub_download, snapshot_download, HfApi.dataset_info) uses, over real files.

Point the clients at it with HF_ENDPOINT=<server.endpoint>. Routes (learnt from huggingface_hub's
file_download.py, _snapshot_download.py and hf_api.py):

  GET  /api/datasets/<owner>/<name>[/revision/<rev>]      repo info: sha (the commit) + siblings
  GET  /api/datasets/<owner>/<name>/tree/<rev>[/<path>]   the file listing snapshot_download reads
  HEAD /datasets/<owner>/<name>/resolve/<rev>/<file>      X-Repo-Commit, ETag, Content-Length
  GET  /datasets/<owner>/<name>/resolve/<rev>/<file>      the bytes; honours `Range: bytes=N-`
  GET  /static/<name>                                     a plain file (no hub headers), for URL downloads

`<rev>` is a branch/ref name (percent-encoded, e.g. refs%2Fconvert%2Fparquet) or a commit sha.
A gated repo answers 401 (X-Error-Code: GatedRepo) unless `Authorization: Bearer <token>` matches.
Tests script failures per file: `fail_times` (answer 503 n times), `cut_once` (send half the body
with the full Content-Length, then drop the connection), `always_cut` (every GET is cut).
"""
from __future__ import annotations

import hashlib
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Revision:
    commit: str
    files: dict[str, bytes]


@dataclass
class Repo:
    revisions: dict[str, Revision] = field(default_factory=dict)  # branch/ref name → revision
    gated: bool = False

    def find(self, rev: str) -> Revision | None:
        if rev in self.revisions:
            return self.revisions[rev]
        return next((r for r in self.revisions.values() if r.commit == rev), None)


def _commit_of(files: dict[str, bytes], salt: str) -> str:
    h = hashlib.sha1(salt.encode())
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return h.hexdigest()


class HubServer:
    def __init__(self, token: str | None = None):
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.static: dict[str, bytes] = {}
        self.fail_times: Counter = Counter()   # file path → answer 503 this many more times
        self.cut_once: set[str] = set()        # file path → the next GET drops half way
        self.always_cut: set[str] = set()      # file path → every GET drops half way
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # -------------------------------------------------------------- setup

    def add_repo(self, repo_id: str, files: dict[str, bytes], revision: str = "main",
                 gated: bool = False) -> str:
        """Publish `files` as `revision` of dataset repo `repo_id`; returns the commit sha."""
        repo = self.repos.setdefault(repo_id, Repo())
        repo.gated = repo.gated or gated
        commit = _commit_of(files, f"{repo_id}@{revision}")
        repo.revisions[revision] = Revision(commit, dict(files))
        return commit

    def gets(self, suffix: str) -> int:
        """How many GETs of a file whose URL path ends with `suffix`."""
        return sum(1 for m, p, _ in self.requests if m == "GET" and p.endswith(suffix) and "/resolve/" in p)

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    # -------------------------------------------------------------- protocol

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._route(head=True)

            def do_GET(self):
                self._route(head=False)

            # ---- helpers
            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status: int, code: str, message: str, head: bool, commit: str | None = None):
                headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
                if commit:
                    headers["X-Repo-Commit"] = commit
                self._send(status, f'{{"error": "{message}"}}'.encode(), headers, head)

            def _json(self, obj, head: bool):
                import json
                self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

            def _authorized(self, repo: Repo) -> bool:
                if not repo.gated:
                    return True
                return server.token is not None and self.headers.get("Authorization") == f"Bearer {server.token}"

            # ---- routing
            def _route(self, head: bool):
                url = urlsplit(self.path)
                with server.lock:
                    server.requests.append((self.command, url.path, self.headers.get("Range")))
                parts = url.path.strip("/").split("/")  # still percent-encoded: a revision is one segment
                if parts[:1] == ["static"] and len(parts) == 2:
                    return self._static(unquote(parts[1]), head)
                if parts[:2] == ["api", "datasets"] and len(parts) >= 4:
                    return self._api(f"{parts[2]}/{parts[3]}", parts[4:], head)
                if parts[:1] == ["datasets"] and len(parts) >= 6 and parts[3] == "resolve":
                    return self._resolve(f"{parts[1]}/{parts[2]}", unquote(parts[4]),
                                         unquote("/".join(parts[5:])), head)
                self._error(404, "NotFound", f"no route {url.path}", head)

            def _repo(self, repo_id: str, head: bool) -> Repo | None:
                repo = server.repos.get(repo_id)
                if repo is None:
                    self._error(404, "RepoNotFound", f"Repository {repo_id} not found", head)
                    return None
                if not self._authorized(repo):
                    self._error(401, "GatedRepo", f"Access to dataset {repo_id} is restricted", head)
                    return None
                return repo

            def _api(self, repo_id: str, rest: list[str], head: bool):
                repo = self._repo(repo_id, head)
                if repo is None:
                    return
                kind, rev_name = (rest[0], unquote(rest[1])) if len(rest) >= 2 else ("revision", "main")
                rev = repo.find(rev_name)
                if rev is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev_name}", head)
                if kind == "revision":
                    return self._json({"id": repo_id, "sha": rev.commit, "private": False,
                                       "gated": "manual" if repo.gated else False,
                                       "siblings": [{"rfilename": n} for n in sorted(rev.files)]}, head)
                if kind == "tree":
                    prefix = unquote("/".join(rest[2:])).strip("/")
                    names = [n for n in sorted(rev.files) if not prefix or n.startswith(prefix + "/")]
                    return self._json([{"type": "file", "path": n, "size": len(rev.files[n]),
                                        "oid": hashlib.sha1(rev.files[n]).hexdigest()} for n in names], head)
                self._error(404, "NotFound", f"no api route {kind}", head)

            def _resolve(self, repo_id: str, rev_name: str, path: str, head: bool):
                repo = self._repo(repo_id, head)
                if repo is None:
                    return
                rev = repo.find(rev_name)
                if rev is None:
                    return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev_name}", head)
                if path not in rev.files:
                    return self._error(404, "EntryNotFound", f"{path} does not exist at {rev_name}", head,
                                       commit=rev.commit)
                if not head:
                    with server.lock:
                        if server.fail_times[path] > 0:
                            server.fail_times[path] -= 1
                            return self._error(503, "ServiceUnavailable", "scripted failure", head)
                body = rev.files[path]
                headers = {"X-Repo-Commit": rev.commit, "ETag": f'"{hashlib.sha256(body).hexdigest()}"',
                           "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
                self._body(body, headers, head, path)

            def _static(self, name: str, head: bool):
                if name not in server.static:
                    return self._error(404, "NotFound", f"no file {name}", head)
                if not head:
                    with server.lock:
                        if server.fail_times[name] > 0:
                            server.fail_times[name] -= 1
                            return self._error(503, "ServiceUnavailable", "scripted failure", head)
                self._body(server.static[name], {"ETag": f'"{hashlib.sha256(server.static[name]).hexdigest()}"'},
                           head, name)

            def _body(self, body: bytes, headers: dict, head: bool, key: str):
                start = 0
                rng = self.headers.get("Range")
                status = 200
                if rng and rng.startswith("bytes="):
                    start = int(rng[len("bytes="):].split("-")[0])
                    status = 206
                    headers["Content-Range"] = f"bytes {start}-{len(body) - 1}/{len(body)}"
                payload = body[start:]
                cut = False
                if not head:
                    with server.lock:
                        cut = key in server.always_cut or key in server.cut_once
                        server.cut_once.discard(key)
                if not cut:
                    return self._send(status, payload, headers, head)
                # the connection drops half way: full Content-Length announced, half the bytes sent
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.close_connection = True

        return Handler
