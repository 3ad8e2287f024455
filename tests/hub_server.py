"""A minimal Hugging Face Hub-compatible HTTP endpoint for tests, on 127.0.0.1 in a thread.

No maintained package on PyPI serves the Hub's write API for tests: hf-local-hub 3.0.0 is a
client for a separate Go server that PyPI does not ship, and huggingface_hub ships no test
server. So the tests own this one. It answers what huggingface_hub 2.4's HfApi sends for
create_repo, upload_folder (preupload, validate-yaml, the LFS batch API with basic PUT uploads
and verify, the NDJSON commit), create_tag, list_repo_refs, list_repo_commits, repo_info and whoami, a GET of a
revision's file (`/resolve/`, as the Hub serves small files), and the client's anonymous fetch
of its agent-harness registry. Xet storage is refused: the client has no fallback from Xet to
LFS, so a client with hf_xet installed needs HF_HUB_DISABLE_XET=1 whenever this server asks for
LFS uploads (or a server made with `regular_only=True`).

What it keeps: every repository with its commits (the files of each revision, as bytes), its
branches and tags, and every request with the Authorization header it carried. Tokens map to
users; a user may write only to its own namespace (else 403); an unknown token gets 401.

`SilentServer` is a Hub that accepts connections and never answers, for the time limits.
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
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
REPO = r"(?P<repo>[^/]+/[^/]+)"
REV = r"(?P<rev>[^/]+)"
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"


class HubError(Exception):
    """An error answer: status, message, optional X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    owner: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    lfs: dict[str, bytes] = field(default_factory=dict)  # sha256 hex -> content

    def resolve(self, revision: str) -> Commit:
        oid = self.branches.get(revision) or self.tags.get(revision) or revision
        if oid not in self.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[oid]

    def files(self, revision: str = "main") -> dict[str, bytes]:
        return dict(self.resolve(revision).files)


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Served:
    """A ThreadingHTTPServer on 127.0.0.1 in a thread of its own, for the length of a `with`."""

    httpd: ThreadingHTTPServer | None = None

    def _serve(self, handler: type, name: str) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        # a short poll interval: shutdown() waits for it
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), name=name, daemon=True).start()

    def __exit__(self, *exc: object) -> None:
        assert self.httpd is not None
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        assert self.httpd is not None
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"


class HubServer(_Served):
    """`with HubServer(tokens={"hf_abc": "alice"}) as hub:` then HF_ENDPOINT=hub.url."""

    def __init__(self, tokens: dict[str, str] | None = None, *, lfs_min_size: int = 1 << 20,
                 regular_only: bool = False) -> None:
        self.tokens = dict(tokens or {})
        self.lfs_min_size, self.regular_only = lfs_min_size, regular_only
        self.repos: dict[str, Repo] = {}
        self.requests: list[Seen] = []
        self.unhandled: list[str] = []
        self.failures: list[int] = []  # statuses to answer the next requests with (an outage)
        self.lock = threading.RLock()
        self.httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> HubServer:
        self._serve(type("Handler", (_Handler,), {"hub": self}), "hub-server")
        return self

    def fail_next(self, status: int, count: int = 1) -> None:
        with self.lock:
            self.failures.extend([status] * count)

    # ------------------------------------------------------------ access

    def user(self, authorization: str | None, *, required: bool) -> str | None:
        if not authorization:
            if required:
                raise HubError(401, "Invalid username or password.")
            return None
        token = authorization.removeprefix("Bearer ").strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def readable(self, repo_id: str, user: str | None) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and user != repo.owner):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def writable(self, repo_id: str, authorization: str | None) -> Repo:
        user = self.user(authorization, required=True)
        repo = self.readable(repo_id, user)
        if user != repo.owner:
            raise HubError(403, f"You don't have the rights to write to {repo_id}")
        return repo

    # ------------------------------------------------------------ routes

    def create_repo(self, auth: str | None, body: dict) -> dict:
        user = self.user(auth, required=True)
        namespace, name = body.get("organization") or user, body.get("name") or ""
        if not NAME.match(name) or name.endswith(".git") or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name '{name}': use letters, digits, '-', '_', '.' "
                                "(at most 96 characters, no '--' or '..', not ending in .git)")
        if body.get("type", "model") != "model":
            raise HubError(400, "only model repositories are served here")
        repo_id = f"{namespace}/{name}"
        if namespace != user:
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')
        if repo_id in self.repos:
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        repo = Repo(repo_id, private=body.get("visibility", "public") != "public" or bool(body.get("private")),
                    owner=user)
        self.repos[repo_id] = repo
        self.commit(repo, "main", "initial commit", {".gitattributes": GITATTRIBUTES}, parent=None)
        return {"url": f"{self.url}/{repo_id}", "name": repo_id, "id": repo_id}

    def commit(self, repo: Repo, branch: str, message: str, files: dict[str, bytes], parent: str | None) -> Commit:
        digest = hashlib.sha1(json.dumps([parent, message, sorted((p, git_blob_oid(b)) for p, b in files.items()),
                                          len(repo.commits)]).encode()).hexdigest()
        commit = Commit(digest, parent, message, files)
        repo.commits[digest] = commit
        repo.branches[branch] = digest
        return commit

    def repo_info(self, auth: str | None, repo_id: str, rev: str) -> dict:
        repo = self.readable(repo_id, self.user(auth, required=False))
        commit = repo.resolve(rev)
        return {"id": repo_id, "modelId": repo_id, "author": repo.owner, "sha": commit.oid, "private": repo.private,
                "siblings": [{"rfilename": p} for p in sorted(commit.files)], "tags": []}

    def resolve(self, auth: str | None, repo_id: str, rev: str, path: str) -> bytes:
        """A file of a revision, as the Hub serves small files (no LFS redirect)."""
        repo = self.readable(repo_id, self.user(auth, required=False))
        files = repo.resolve(rev).files
        if path not in files:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        return files[path]

    def refs(self, auth: str | None, repo_id: str) -> dict:
        repo = self.readable(repo_id, self.user(auth, required=False))
        ref = lambda kind, name, oid: {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}  # noqa: E731
        return {"branches": [ref("heads", n, o) for n, o in repo.branches.items()], "converts": [],
                "tags": [ref("tags", n, o) for n, o in repo.tags.items()], "pullRequests": []}

    def commits(self, auth: str | None, repo_id: str, rev: str) -> list[dict]:
        """The history of a revision, newest first (one page)."""
        repo = self.readable(repo_id, self.user(auth, required=False))
        history, commit = [], repo.resolve(rev)
        while True:
            history.append({"id": commit.oid, "title": commit.message, "message": "", "authors": [{"user": repo.owner}],
                            "date": "2026-01-01T00:00:00.000Z"})
            if commit.parent is None:
                return history
            commit = repo.commits[commit.parent]

    def tree(self, auth: str | None, repo_id: str, rev: str) -> list[dict]:
        """Every file of the revision, as a recursive listing gives them (one page)."""
        repo = self.readable(repo_id, self.user(auth, required=False))
        return [{"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
                for path, data in sorted(repo.resolve(rev).files.items())]

    def upload_mode(self, item: dict) -> str:
        sample = base64.b64decode(item.get("sample", ""))
        binary = b"\0" in sample or int(item["size"]) >= self.lfs_min_size
        return "lfs" if binary and not self.regular_only else "regular"

    def preupload(self, auth: str | None, repo_id: str, rev: str, body: dict) -> dict:
        repo = self.writable(repo_id, auth)
        current = repo.files(rev) if rev in repo.branches else {}
        answer = []
        for item in body["files"]:
            mode = self.upload_mode(item)
            old = current.get(item["path"])
            oid = None if old is None else hashlib.sha256(old).hexdigest() if mode == "lfs" else git_blob_oid(old)
            answer.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return {"files": answer, "commitOid": repo.branches.get(rev)}

    def lfs_batch(self, auth: str | None, repo_id: str, body: dict) -> dict:
        repo = self.writable(repo_id, auth)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            raise HubError(400, "only basic LFS uploads are served here")
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in repo.lfs:  # already stored: no actions, the client skips it
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-storage/{repo_id}/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        return {"transfer": "basic", "objects": objects}

    def lfs_store(self, repo_id: str, oid: str, data: bytes) -> dict:
        repo = self.repos.get(repo_id)
        if repo is None:
            raise HubError(404, "no such upload target")
        if hashlib.sha256(data).hexdigest() != oid:
            raise HubError(400, f"content does not match sha256 {oid}")
        repo.lfs[oid] = data
        return {}

    def lfs_verify(self, auth: str | None, repo_id: str, body: dict) -> dict:
        repo = self.writable(repo_id, auth)
        stored = repo.lfs.get(body["oid"])
        if stored is None or len(stored) != body["size"]:
            raise HubError(404, f"LFS object {body['oid']} was not uploaded")
        return {"success": True}

    def create_commit(self, auth: str | None, repo_id: str, rev: str, raw: bytes) -> dict:
        repo = self.writable(repo_id, auth)
        items = [json.loads(line) for line in raw.splitlines() if line.strip()]
        if not items or items[0].get("key") != "header":
            raise HubError(400, "a commit starts with its header line")
        header = items[0]["value"]
        parent = repo.branches.get(rev)
        if parent is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        if header.get("parentCommit") not in (None, parent):
            raise HubError(412, "A commit has happened since; parentCommit is outdated")
        files = dict(repo.commits[parent].files)
        for item in items[1:]:
            self.apply(repo, files, item["key"], item["value"])
        commit = self.commit(repo, rev, header.get("summary", ""), files, parent)
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{commit.oid}", "commitOid": commit.oid,
                "success": True, "pullRequestUrl": None}

    @staticmethod
    def apply(repo: Repo, files: dict[str, bytes], key: str, value: dict) -> None:
        path = value["path"]
        if key == "file":
            files[path] = base64.b64decode(value["content"])
        elif key == "lfsFile":
            if value["oid"] not in repo.lfs:
                raise HubError(422, f"LFS object {value['oid']} for {path} was never uploaded")
            files[path] = repo.lfs[value["oid"]]
        elif key == "deletedFile":
            files.pop(path, None)
        elif key == "deletedFolder":
            for name in [n for n in files if n.startswith(path.rstrip("/") + "/")]:
                files.pop(name)
        else:
            raise HubError(400, f"unknown commit operation {key}")

    def create_tag(self, auth: str | None, repo_id: str, rev: str, body: dict) -> dict:
        repo = self.writable(repo_id, auth)
        commit = repo.resolve(rev)
        if body["tag"] in repo.tags:
            raise HubError(409, f"Tag {body['tag']} already exists")
        repo.tags[body["tag"]] = commit.oid
        return {}

    def whoami(self, auth: str | None) -> dict:
        user = self.user(auth, required=True)
        return {"type": "user", "name": user, "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}

    @staticmethod
    def validate_yaml(body: dict) -> dict:
        match = re.match(r"^---\n(.*?)\n---\n", body.get("content", ""), re.S)
        try:
            yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as exc:
            raise HubError(400, f"Invalid metadata in README.md: {exc}") from None
        return {"errors": [], "warnings": []}

    def route(self, method: str, path: str, auth: str | None, raw: bytes) -> dict | list | bytes:
        body = lambda: json.loads(raw or b"{}")  # noqa: E731
        routes = [
            ("POST", r"/api/repos/create", lambda m: self.create_repo(auth, body())),
            ("GET", r"/api/whoami-v2", lambda m: self.whoami(auth)),
            # the client's registry of agent harnesses for its user-agent header (anonymous)
            ("GET", r"/api/agent-harnesses", lambda m: {"standardEnvVars": [], "harnesses": {}}),
            ("POST", r"/api/validate-yaml", lambda m: self.validate_yaml(body())),
            ("GET", rf"/api/models/{REPO}", lambda m: self.repo_info(auth, m["repo"], "main")),
            ("GET", rf"/api/models/{REPO}/revision/{REV}", lambda m: self.repo_info(auth, m["repo"], m["rev"])),
            ("GET", rf"/api/models/{REPO}/refs", lambda m: self.refs(auth, m["repo"])),
            ("GET", rf"/api/models/{REPO}/tree/{REV}", lambda m: self.tree(auth, m["repo"], m["rev"])),
            ("GET", rf"/api/models/{REPO}/commits/{REV}", lambda m: self.commits(auth, m["repo"], m["rev"])),
            ("POST", rf"/api/models/{REPO}/preupload/{REV}",
             lambda m: self.preupload(auth, m["repo"], m["rev"], body())),
            ("POST", rf"/api/models/{REPO}/commit/{REV}",
             lambda m: self.create_commit(auth, m["repo"], m["rev"], raw)),
            ("POST", rf"/api/models/{REPO}/tag/{REV}", lambda m: self.create_tag(auth, m["repo"], m["rev"], body())),
            ("GET", rf"/{REPO}/resolve/{REV}/(?P<path>.+)",
             lambda m: self.resolve(auth, m["repo"], m["rev"], m["path"])),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/batch", lambda m: self.lfs_batch(auth, m["repo"], body())),
            ("POST", rf"/{REPO}\.git/info/lfs/objects/verify", lambda m: self.lfs_verify(auth, m["repo"], body())),
            ("PUT", rf"/lfs-storage/{REPO}/(?P<oid>[0-9a-f]{{64}})",
             lambda m: self.lfs_store(m["repo"], m["oid"], raw)),
        ]
        if re.fullmatch(rf"/api/models/{REPO}/xet-(write|read)-token/{REV}", path):
            raise HubError(501, "this endpoint does not serve Xet storage; set HF_HUB_DISABLE_XET=1")
        for verb, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if verb == method and match:
                groups = {k: unquote(v) for k, v in match.groupdict().items()}
                return handler(groups)
        self.unhandled.append(f"{method} {path}")
        raise HubError(404, f"no route for {method} {path}")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _answer(self) -> None:
        raw = self._body()
        path = urlsplit(self.path).path
        auth = self.headers.get("Authorization")
        status, headers, payload = 200, {}, {}
        with self.hub.lock:
            self.hub.requests.append(Seen(self.command, path, auth))
            try:
                if self.hub.failures:
                    raise HubError(self.hub.failures.pop(0), "Service temporarily unavailable")
                payload = self.hub.route(self.command, path, auth, raw)
            except HubError as exc:
                status, payload = exc.status, {"error": exc.message, **exc.extra}
                headers["X-Error-Message"] = exc.message
                if exc.code:
                    headers["X-Error-Code"] = exc.code
        raw_file = isinstance(payload, bytes)  # a file's bytes (resolve), not a JSON answer
        data = payload if raw_file else json.dumps(payload).encode()
        kind = "application/octet-stream" if raw_file else "application/json"
        self.send_response(status)
        for key, value in {"Content-Type": kind, "Content-Length": str(len(data)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def do_HEAD(self) -> None:
        self.hub.unhandled.append(f"HEAD {self.path}")
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()


class SilentServer:
    """A Hub that stalls: accepts connections on 127.0.0.1, reads each request's head and never
    answers. `requests` holds the request lines received ("POST /api/repos/create HTTP/1.1").
    With `trickle_s`, it answers 200 with a body of 100,000 bytes announced, then sends one byte every
    `trickle_s` seconds: each read gets a byte within any per-read time limit."""

    def __init__(self, trickle_s: float | None = None) -> None:
        self.trickle_s = trickle_s
        self.requests: list[str] = []
        self.stop = threading.Event()
        self.sock: socket.socket | None = None
        self.url = ""

    def __enter__(self) -> SilentServer:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"  # also after exit, for messages
        threading.Thread(target=self._accept, name="silent-hub", daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.sock is not None
        self.sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        """Read the head, then keep the connection open without a byte of answer."""
        conn.settimeout(0.05)
        head = b""
        with conn:
            while not self.stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:  # the client gave up
                    return
                if b"\r\n\r\n" not in head:
                    head += chunk
                    if b"\r\n\r\n" in head:
                        self.requests.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
                        if self.trickle_s is not None:
                            self._trickle(conn)
                            return

    def _trickle(self, conn: socket.socket) -> None:
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
            while not self.stop.wait(self.trickle_s):
                conn.sendall(b" ")
        except OSError:  # the client gave up
            return


class UnavailableServer(_Served):
    """A Hub in an outage: every request, HEAD included, is answered 503 on 127.0.0.1. `requests` holds
    "METHOD /path" of each request received. `page`: answer every request with this HTML instead, under
    `status` (a proxy's login page, a web server that is no Hub)."""

    def __init__(self, status: int = 503, page: bytes | None = None) -> None:
        self.status, self.page = status, page
        self.requests: list[str] = []
        self.httpd: ThreadingHTTPServer | None = None

    def __enter__(self) -> UnavailableServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                server.requests.append(f"{self.command} {urlsplit(self.path).path}")
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                data = b"" if self.command == "HEAD" else server.page or b'{"error": "Service temporarily unavailable"}'
                self.send_response(server.status)
                self.send_header("Content-Type", "text/html" if server.page else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("X-Error-Message", "Service temporarily unavailable")
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        self._serve(Handler, "unavailable-hub")
        return self
