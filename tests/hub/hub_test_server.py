"""A small Hub-API server for the tests (stdlib only, plus PyYAML for cards).

The real Hub cannot be reached from CI, so the hub tests start this server on
127.0.0.1 and drive it with the *real* ``huggingface_hub`` client
(``HfApi(endpoint=...)``, ``snapshot_download``, ``from_pretrained``).  It
implements exactly the routes that client version uses for:

- ``create_repo``            POST /api/repos/create
- ``repo_info``/``model_info`` GET /api/models/{repo}[/revision/{rev}]
- README metadata checks     POST /api/validate-yaml (also applied on commit)
- ``create_commit``          POST /api/models/{repo}/preupload/{rev}
                             POST /{repo}.git/info/lfs/objects/batch  (LFS, basic + multipart)
                             PUT  /_lfs/...  and  POST /_lfs/complete|verify/...
                             POST /api/models/{repo}/commit/{rev}      (ndjson)
- ``create_branch``          POST /api/models/{repo}/branch/{branch}
- ``list_repo_refs``         GET  /api/models/{repo}/refs
- ``list_repo_tree``/files   GET  /api/models/{repo}/tree/{rev}[/{path}]
- ``get_paths_info``         POST /api/models/{repo}/paths-info/{rev}
- downloads                  HEAD/GET /{repo}/resolve/{rev}/{path}  (ETag, X-Repo-Commit, sizes, Range)
- ``whoami``                 GET  /api/whoami-v2

It does not speak Xet: the tests set ``HF_HUB_DISABLE_XET`` so the client uses
the LFS protocol (the path it takes for any server that offers LFS only).

Faults can be injected (``inject``) and every request is logged (``requests``)
without its Authorization value.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_POINTER = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"

# The Hub's default .gitattributes for model repos (abridged).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz",
        "*.zip", "*.zst", "*tfevents*",
    )
)

PIPELINE_TAGS = {
    "text-generation", "image-text-to-text", "visual-question-answering", "image-to-text",
    "audio-text-to-text", "any-to-any", "text2text-generation", "feature-extraction",
    "video-text-to-text", "document-question-answering", "image-classification",
}
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class FileEntry:
    size: int
    oid: str  # git blob id (of the LFS pointer for LFS files)
    content: Optional[bytes] = None  # regular files
    lfs_sha256: Optional[str] = None  # LFS files
    pointer_size: Optional[int] = None


@dataclass
class Commit:
    sha: str
    parent: Optional[str]
    title: str
    tree: Dict[str, FileEntry]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    created: str
    branches: Dict[str, str] = field(default_factory=dict)
    commits: Dict[str, Commit] = field(default_factory=dict)


@dataclass
class Fault:
    method: str
    path: re.Pattern
    status: int
    times: int


class HubError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def validate_card_metadata(content: str) -> List[str]:
    """The subset of the Hub's README metadata checks that a merge card can trip."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if not match:
        return []
    try:
        meta = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    errors = []
    base = meta.get("base_model")
    if base is not None:
        bases = base if isinstance(base, list) else [base]
        errors += [f'"base_model" must be Hub model ids, got {b!r}' for b in bases if not (isinstance(b, str) and REPO_ID.match(b))]
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in BASE_MODEL_RELATIONS:
            errors.append(f'"base_model_relation" must be one of {sorted(BASE_MODEL_RELATIONS)}')
        if not base:
            errors.append('"base_model_relation" needs "base_model"')
    if "pipeline_tag" in meta and meta["pipeline_tag"] not in PIPELINE_TAGS:
        errors.append(f'"pipeline_tag" {meta["pipeline_tag"]!r} is not a known task')
    tags = meta.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        errors.append('"tags" must be a list of strings')
    if "license" in meta and not isinstance(meta["license"], str):
        errors.append('"license" must be a string')
    for entry in meta.get("model-index") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            errors.append('"model-index[].name" is required')
            continue
        for result in entry.get("results") or []:
            if not isinstance((result.get("task") or {}).get("type"), str):
                errors.append('"model-index[].results[].task.type" is required')
            dataset = result.get("dataset") or {}
            if not (isinstance(dataset.get("type"), str) and isinstance(dataset.get("name"), str)):
                errors.append('"model-index[].results[].dataset.{type,name}" are required')
            metrics = result.get("metrics") or []
            if not metrics:
                errors.append('"model-index[].results[].metrics" must not be empty')
            for metric in metrics:
                if not isinstance(metric.get("type"), str) or not isinstance(metric.get("value"), (int, float, str)):
                    errors.append('"model-index[].results[].metrics[].{type,value}" are required')
    return errors


class HubState:
    """Repositories, LFS objects, tokens, faults and a request log."""

    def __init__(self, tokens: Dict[str, Tuple[str, List[str]]], multipart_threshold: int, chunk_size: int):
        self.tokens = tokens  # token -> (user, orgs)
        self.multipart_threshold = multipart_threshold
        self.chunk_size = chunk_size
        self.repos: Dict[str, Repo] = {}
        self.lfs: Dict[str, bytes] = {}
        self.multipart: Dict[str, Dict[int, bytes]] = {}
        self.upload_secrets: Dict[str, str] = {}
        self.faults: List[Fault] = []
        self.requests: List[dict] = []
        self.lock = threading.RLock()

    # -- helpers ---------------------------------------------------------
    def now(self) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())

    def user_for(self, authorization: Optional[str]) -> Optional[Tuple[str, List[str]]]:
        if not authorization:
            return None
        token = authorization.split(" ", 1)[-1].strip()
        if token not in self.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.tokens[token]

    def repo(self, repo_id: str, auth: Optional[Tuple[str, List[str]]]) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self.can_write(repo_id, auth)):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def can_write(repo_id: str, auth: Optional[Tuple[str, List[str]]]) -> bool:
        if auth is None:
            return False
        user, orgs = auth
        return repo_id.split("/")[0] in [user, *orgs]

    def writable_repo(self, repo_id: str, auth) -> Repo:
        if auth is None:
            raise HubError(401, "You must be authenticated to write")
        repo = self.repo(repo_id, auth)
        if not self.can_write(repo_id, auth):
            raise HubError(403, "You don't have the rights to write to this repository")
        return repo

    @staticmethod
    def commit_at(repo: Repo, revision: str) -> Commit:
        if revision in repo.branches:
            return repo.commits[repo.branches[revision]]
        if COMMIT_SHA.match(revision) and revision in repo.commits:
            return repo.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def new_commit(self, repo: Repo, branch: str, parent: Optional[str], title: str, tree: Dict[str, FileEntry]) -> Commit:
        sha = hashlib.sha1(f"{repo.repo_id}{parent}{title}{secrets.token_hex(8)}".encode()).hexdigest()
        commit = Commit(sha=sha, parent=parent, title=title, tree=tree, date=self.now())
        repo.commits[sha] = commit
        repo.branches[branch] = sha
        return commit

    @staticmethod
    def lfs_patterns(tree: Dict[str, FileEntry]) -> List[str]:
        entry = tree.get(".gitattributes")
        text = entry.content.decode() if entry and entry.content else ""
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line]

    @staticmethod
    def matches_lfs(path: str, patterns: List[str]) -> bool:
        name = path.rsplit("/", 1)[-1]
        return any(fnmatch.fnmatch(path if "/" in p else name, p) for p in patterns)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "TinyHub/1.0"
    state: HubState  # set on the subclass made per server

    def log_message(self, format, *args):  # keep pytest output clean
        pass

    # -- plumbing --------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: Optional[dict] = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: Optional[dict] = None):
        self._send(status, json.dumps(payload).encode(), headers)

    def _endpoint(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _dispatch(self):
        parts = urlsplit(self.path)
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        state = self.state
        record = {"method": self.command, "path": parts.path, "auth": bool(self.headers.get("Authorization"))}
        body = self._body()
        with state.lock:
            state.requests.append(record)
            for fault in state.faults:
                if fault.times > 0 and fault.method == self.command and fault.path.search(parts.path):
                    fault.times -= 1
                    record["status"] = fault.status
                    return self._json(fault.status, {"error": "injected fault"})
        try:
            auth = state.user_for(self.headers.get("Authorization"))
            status = self._route(segments, query, body, auth)
        except HubError as err:
            headers = dict(err.headers)
            if err.code:
                headers["X-Error-Code"] = err.code
            headers["X-Error-Message"] = err.message
            status = err.status
            self._json(err.status, {"error": err.message}, headers)
        record["status"] = status

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # -- routes ----------------------------------------------------------
    def _route(self, seg: List[str], query: dict, body: bytes, auth) -> int:
        m = self.command
        if seg[:2] == ["api", "repos"] and seg[2:] == ["create"] and m == "POST":
            return self.create_repo(json.loads(body), auth)
        if seg == ["api", "validate-yaml"] and m == "POST":
            errors = validate_card_metadata(json.loads(body).get("content", ""))
            status = 400 if errors else 200
            self._json(status, {"errors": [{"message": e} for e in errors], "warnings": []})
            return status
        if seg == ["api", "whoami-v2"] and m == "GET":
            if auth is None:
                raise HubError(401, "Invalid credentials in Authorization header")
            self._json(200, {"type": "user", "name": auth[0], "orgs": [{"name": o} for o in auth[1]],
                             "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
            return 200
        if len(seg) >= 3 and seg[:2] == ["api", "models"]:
            repo_id, rest = "/".join(seg[2:4]), seg[4:]
            return self.model_api(repo_id, rest, query, body, auth)
        if len(seg) >= 5 and seg[1].endswith(".git") and seg[2:] == ["info", "lfs", "objects", "batch"]:
            return self.lfs_batch(f"{seg[0]}/{seg[1][:-4]}", json.loads(body), auth)
        if seg and seg[0] == "_lfs":
            return self.lfs_storage(seg[1:], query, body)
        if len(seg) >= 5 and seg[2] == "resolve" and m in ("GET", "HEAD"):
            return self.resolve(f"{seg[0]}/{seg[1]}", seg[3], "/".join(seg[4:]), auth)
        raise HubError(404, f"no route for {m} {self.path}")

    def create_repo(self, payload: dict, auth) -> int:
        state = self.state
        if auth is None:
            raise HubError(401, "You must be authenticated to create a repository")
        owner = payload.get("organization") or auth[0]
        repo_id = f"{owner}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise HubError(400, "this test hub serves model repositories only")
        if not state.can_write(repo_id, auth):
            raise HubError(403, f"You don't have the rights to create a model under the namespace {owner!r}")
        with state.lock:
            if repo_id in state.repos:
                self._json(409, {"error": "You already created this model repo", "url": f"{self._endpoint()}/{repo_id}"})
                return 409
            repo = Repo(repo_id=repo_id, private=payload.get("visibility") == "private", created=state.now())
            attributes = DEFAULT_GITATTRIBUTES.encode()
            tree = {".gitattributes": FileEntry(len(attributes), git_blob_oid(attributes), content=attributes)}
            state.new_commit(repo, "main", None, "initial commit", tree)
            state.repos[repo_id] = repo
        self._json(200, {"url": f"{self._endpoint()}/{repo_id}", "name": repo_id, "id": secrets.token_hex(12)})
        return 200

    def model_api(self, repo_id: str, rest: List[str], query: dict, body: bytes, auth) -> int:
        state, m = self.state, self.command
        with state.lock:
            if not rest or rest[0] == "revision":
                if m != "GET":
                    raise HubError(405, "method not allowed")
                repo = state.repo(repo_id, auth)
                commit = state.commit_at(repo, rest[1] if rest else "main")
                return self.model_info(repo, commit, blobs=query.get("blobs") in ("True", "true", "1"))
            action, args = rest[0], rest[1:]
            if action == "preupload" and m == "POST":
                repo = state.writable_repo(repo_id, auth)
                return self.preupload(repo, state.commit_at(repo, args[0]), json.loads(body))
            if action == "commit" and m == "POST":
                repo = state.writable_repo(repo_id, auth)
                if query.get("create_pr"):
                    raise HubError(400, "pull requests are not supported by the test hub")
                return self.commit(repo, args[0], body)
            if action == "branch" and m == "POST":
                repo = state.writable_repo(repo_id, auth)
                branch = "/".join(args)
                if branch in repo.branches:
                    raise HubError(409, f"Reference already exists: refs/heads/{branch}")
                start = (json.loads(body) if body else {}).get("startingPoint") or "main"
                repo.branches[branch] = state.commit_at(repo, start).sha
                self._json(200, {})
                return 200
            if action == "refs" and m == "GET":
                repo = state.repo(repo_id, auth)
                branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": sha} for n, sha in sorted(repo.branches.items())]
                self._json(200, {"branches": branches, "converts": [], "tags": [], "pullRequests": []})
                return 200
            if action == "tree" and m == "GET":
                repo = state.repo(repo_id, auth)
                commit = state.commit_at(repo, args[0])
                prefix = "/".join(args[1:])
                recursive = query.get("recursive") in ("True", "true", "1")
                self._json(200, self.tree_listing(commit, prefix, recursive))
                return 200
            if action == "paths-info" and m == "POST":
                repo = state.repo(repo_id, auth)
                commit = state.commit_at(repo, args[0])
                form = parse_qs(body.decode())
                paths = form.get("paths", [])
                self._json(200, [self.file_json(p, commit.tree[p]) for p in paths if p in commit.tree])
                return 200
        raise HubError(404, f"no route for {m} {self.path}")

    def model_info(self, repo: Repo, commit: Commit, blobs: bool) -> int:
        card_data, tags, pipeline_tag = None, [], None
        readme = commit.tree.get("README.md")
        if readme is not None and readme.content is not None:
            match = re.match(r"^---\s*\n(.*?)\n---", readme.content.decode(), re.S)
            card_data = yaml.safe_load(match.group(1)) if match else None
            if isinstance(card_data, dict):
                tags, pipeline_tag = card_data.get("tags") or [], card_data.get("pipeline_tag")
        siblings = []
        for path, entry in sorted(commit.tree.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs_sha256:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.lfs_sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)
        self._json(200, {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": commit.sha, "private": repo.private, "gated": False,
            "disabled": False, "lastModified": commit.date, "createdAt": repo.created, "tags": tags,
            "pipeline_tag": pipeline_tag, "cardData": card_data, "siblings": siblings, "downloads": 0, "likes": 0,
        })
        return 200

    def preupload(self, repo: Repo, commit: Commit, payload: dict) -> int:
        patterns = self.state.lfs_patterns(commit.tree)
        files = []
        for item in payload["files"]:
            path, size = item["path"], item["size"]
            sample = base64.b64decode(item["sample"])
            lfs = self.state.matches_lfs(path, patterns) or size >= 10 * 1024 * 1024 or b"\0" in sample
            existing = commit.tree.get(path)
            oid = None
            if existing is not None:
                oid = existing.lfs_sha256 if existing.lfs_sha256 else existing.oid
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json(200, {"files": files, "commitOid": commit.sha})
        return 200

    def lfs_batch(self, repo_id: str, payload: dict, auth) -> int:
        state, base = self.state, self._endpoint()
        with state.lock:
            state.writable_repo(repo_id, auth)
            objects = []
            for obj in payload["objects"]:
                oid, size = obj["oid"], obj["size"]
                entry = {"oid": oid, "size": size, "authenticated": True}
                if oid not in state.lfs:
                    secret = secrets.token_hex(8)
                    state.upload_secrets[oid] = secret
                    verify = {"href": f"{base}/_lfs/verify/{repo_id}", "header": {}}
                    if "multipart" in payload.get("transfers", []) and size > state.multipart_threshold:
                        n_parts = -(-size // state.chunk_size)
                        header = {"chunk_size": str(state.chunk_size)}
                        header.update({f"{i:05d}": f"{base}/_lfs/part/{oid}/{i}?secret={secret}" for i in range(1, n_parts + 1)})
                        upload = {"href": f"{base}/_lfs/complete/{oid}?secret={secret}&size={size}", "header": header}
                    else:
                        upload = {"href": f"{base}/_lfs/object/{oid}?secret={secret}&size={size}", "header": {}}
                    entry["actions"] = {"upload": upload, "verify": verify}
                objects.append(entry)
        self._json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   {"Content-Type": "application/vnd.git-lfs+json"})
        return 200

    def lfs_storage(self, seg: List[str], query: dict, body: bytes) -> int:
        """Stands in for the presigned storage URLs (no Hub token is sent there)."""
        state, m = self.state, self.command
        kind, oid = seg[0], seg[1] if len(seg) > 1 else ""
        with state.lock:
            if kind == "verify" and m == "POST":
                payload = json.loads(body)
                stored = state.lfs.get(payload["oid"])
                if stored is None or len(stored) != payload["size"]:
                    raise HubError(404, "LFS object not found or wrong size")
                self._json(200, {"success": True})
                return 200
            if query.get("secret") != state.upload_secrets.get(oid):
                raise HubError(403, "bad upload signature")
            if kind == "object" and m == "PUT":
                return self._store_lfs(oid, body, int(query["size"]))
            if kind == "part" and m == "PUT":
                state.multipart.setdefault(oid, {})[int(seg[2])] = body
                self._send(200, b"", {"ETag": f'"{hashlib.md5(body).hexdigest()}"'})
                return 200
            if kind == "complete" and m == "POST":
                payload = json.loads(body)
                parts = state.multipart.pop(oid, {})
                numbers = [p["partNumber"] for p in payload["parts"]]
                if numbers != sorted(parts) or any(
                    p["etag"].strip('"') != hashlib.md5(parts[p["partNumber"]]).hexdigest() for p in payload["parts"]
                ):
                    raise HubError(400, "multipart completion does not match the uploaded parts")
                return self._store_lfs(oid, b"".join(parts[n] for n in numbers), int(query["size"]))
        raise HubError(404, "unknown storage operation")

    def _store_lfs(self, oid: str, content: bytes, size: int) -> int:
        if len(content) != size or hashlib.sha256(content).hexdigest() != oid:
            raise HubError(400, "uploaded content does not match its oid/size")
        self.state.lfs[oid] = content
        self._send(200, b"", {"ETag": f'"{hashlib.md5(content).hexdigest()}"'})
        return 200

    def commit(self, repo: Repo, revision: str, body: bytes) -> int:
        state = self.state
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), {})
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent = repo.commits[repo.branches[revision]]
        if header.get("parentCommit") and header["parentCommit"] != parent.sha:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        tree = dict(parent.tree)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                content = base64.b64decode(value["content"])
                tree[value["path"]] = FileEntry(len(content), git_blob_oid(content), content=content)
            elif key == "lfsFile":
                oid = value["oid"]
                if oid not in state.lfs:
                    raise HubError(422, f"LFS object {oid} for {value['path']} was never uploaded")
                pointer = LFS_POINTER.format(oid=oid, size=len(state.lfs[oid])).encode()
                tree[value["path"]] = FileEntry(len(state.lfs[oid]), git_blob_oid(pointer), lfs_sha256=oid,
                                                pointer_size=len(pointer))
            elif key == "deletedFile":
                if tree.pop(value["path"], None) is None:
                    raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                tree = {p: e for p, e in tree.items() if not p.startswith(prefix)}
        readme = tree.get("README.md")
        if readme is not None and readme.content is not None:
            errors = validate_card_metadata(readme.content.decode())
            if errors:
                raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
        commit = state.new_commit(repo, revision, parent.sha, header.get("summary", ""), tree)
        self._json(200, {"success": True, "commitOid": commit.sha,
                         "commitUrl": f"{self._endpoint()}/{repo.repo_id}/commit/{commit.sha}"})
        return 200

    def file_json(self, path: str, entry: FileEntry) -> dict:
        item = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
        if entry.lfs_sha256:
            item["lfs"] = {"oid": entry.lfs_sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        return item

    def tree_listing(self, commit: Commit, prefix: str, recursive: bool) -> List[dict]:
        base = prefix.rstrip("/") + "/" if prefix else ""
        items, folders = [], set()
        for path, entry in sorted(commit.tree.items()):
            if not path.startswith(base):
                continue
            rest = path[len(base):]
            if "/" in rest:
                folder = base + rest.split("/")[0]
                if folder not in folders:
                    folders.add(folder)
                    items.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0, "path": folder})
                if not recursive:
                    continue
            items.append(self.file_json(path, entry))
        return items

    def resolve(self, repo_id: str, revision: str, path: str, auth) -> int:
        state = self.state
        with state.lock:
            repo = state.repo(repo_id, auth)
            commit = state.commit_at(repo, revision)
            entry = commit.tree.get(path)
            if entry is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
            content = entry.content if entry.content is not None else state.lfs[entry.lfs_sha256]
        headers = {"X-Repo-Commit": commit.sha, "Accept-Ranges": "bytes"}
        if entry.lfs_sha256:
            headers.update({"ETag": f'"{entry.lfs_sha256}"', "X-Linked-Etag": f'"{entry.lfs_sha256}"',
                            "X-Linked-Size": str(entry.size)})
        else:
            headers["ETag"] = f'"{entry.oid}"'
        status = 200
        byte_range = self.headers.get("Range")
        if byte_range and self.command == "GET":
            start_text, _, end_text = byte_range.removeprefix("bytes=").partition("-")
            start = int(start_text)
            end = int(end_text) if end_text else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content, status = content[start:end + 1], 206
        self._send(status, content, headers, content_type="application/octet-stream")
        return status


class HubServer:
    """Runs the test hub on 127.0.0.1 in a background thread."""

    def __init__(self, tokens: Dict[str, Tuple[str, List[str]]], *, multipart_threshold: int = 64 * 1024,
                 chunk_size: int = 16 * 1024):
        self.state = HubState(tokens, multipart_threshold, chunk_size)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def inject(self, method: str, path_regex: str, status: int = 503, times: int = 1) -> None:
        with self.state.lock:
            self.state.faults.append(Fault(method, re.compile(path_regex), status, times))

    @property
    def requests(self) -> List[dict]:
        with self.state.lock:
            return list(self.state.requests)

    def file_bytes(self, repo_id: str, revision: str, path: str) -> bytes:
        repo = self.state.repos[repo_id]
        entry = HubState.commit_at(repo, revision).tree[path]
        return entry.content if entry.content is not None else self.state.lfs[entry.lfs_sha256]
