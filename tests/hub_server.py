"""A loopback Hugging Face Hub: an in-memory server for end-to-end tests of pushing and loading.

The Hub is unreachable from CI machines and no pip-installable Hub-compatible server exists, so
this module serves, on ``127.0.0.1`` with an ephemeral port, the part of the Hub HTTP API that the
installed ``huggingface_hub`` client (2.x, with Xet disabled) calls for

- ``create_repo`` (``POST /api/repos/create``), ``whoami`` and ``create_branch``;
- ``upload_folder`` / ``create_commit``: ``preupload`` (regular vs LFS), the git-LFS batch API with a
  basic single-part ``PUT`` transfer and ``verify``, the NDJSON ``commit`` endpoint, and
  ``/api/validate-yaml`` for README metadata;
- ``model_info`` / ``dataset_info`` (with siblings), ``list_repo_tree``, ``get_paths_info``,
  ``list_repo_refs`` and ``list_repo_commits``;
- file resolution (``HEAD``/``GET /{repo}/resolve/{revision}/{path}``) with ``ETag``, ``X-Repo-Commit``,
  ``Content-Length`` and byte ranges, which ``hf_hub_download``, ``snapshot_download``,
  ``HfFileSystem`` and every ``from_pretrained`` / ``load_dataset`` build on.

Repositories are kept in memory with a real commit history (each commit a full snapshot), so a
revision can be a branch or a commit id. Authentication is checked: writes need the write token,
private repos need a token to read. Failures can be injected per endpoint (``fail_next``) to test
that a push interrupted half-way leaves local files untouched.

Use::

    with LoopbackHub() as hub, hub.client():
        model.push_to_hub("org/name", token=hub.token)
        again = AutoModel.from_pretrained("org/name", cache_dir=tmp)

``client()`` points the already imported ``huggingface_hub`` / ``datasets`` at the server in this
process; for a subprocess pass ``env=hub.env(hf_home)`` instead (``HF_ENDPOINT`` is read at import).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import functools
import hashlib
import json
import os
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

REPO_TYPES = ("model", "dataset", "space")
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
# Files stored with git-LFS on the Hub (its default .gitattributes), besides anything binary or >= 10 MiB.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".parquet", ".arrow", ".npy", ".npz", ".h5",
                ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".zarr", ".msgpack", ".onnx", ".pkl", ".gz", ".zip")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES).encode()
OPERATIONS = ("create_repo", "whoami", "validate_yaml", "info", "tree", "paths_info", "refs", "commits", "branch",
              "preupload", "lfs_batch", "lfs_upload", "lfs_verify", "commit", "resolve")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file's content (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


@dataclass(frozen=True)
class StoredFile:
    """One file of a commit: its bytes and whether the Hub would keep it in LFS."""

    data: bytes
    lfs: bool

    @functools.cached_property  # hashed once per stored file, not per listing
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    @functools.cached_property
    def blob_id(self) -> str:
        # the Hub's blob id of an LFS file is the git id of its pointer file
        return git_blob_sha1(_lfs_pointer(self.sha256, len(self.data)) if self.lfs else self.data)

    @functools.cached_property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.data)


@dataclass
class Commit:
    oid: str
    title: str
    message: str
    parent: str | None
    files: dict[str, StoredFile]
    date: str = field(default_factory=_now)


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision, revision)
        commit = self.commits.get(oid)
        if commit is None and len(revision) >= 7 and re.fullmatch(r"[0-9a-f]+", revision):
            matches = [c for o, c in self.commits.items() if o.startswith(revision)]
            commit = matches[0] if len(matches) == 1 else None
        return commit


class HubError(Exception):
    """An HTTP error answered the way the Hub does (status, ``X-Error-Code``, JSON ``error``)."""

    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.extra = extra or {}  # more JSON fields of the error body


class LoopbackHub:
    """In-memory Hub server on 127.0.0.1 (ephemeral port). Start/stop with ``with LoopbackHub() as hub``.

    Args:
        token: the token that may write (``Authorization: Bearer <token>``).
        read_token: a token that may only read (for testing permission errors).
        user: the account name ``whoami`` reports; a repo id without namespace goes there.
    """

    def __init__(self, token: str = "hf_loopback_write_token", read_token: str = "hf_loopback_read_token",
                 user: str = "loopback-user"):
        self.token = token
        self.read_token = read_token
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request served
        self._failures: dict[str, list[tuple[int, str]]] = {}
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> "LoopbackHub":
        if self._server is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("LoopbackHub is not running: use `with LoopbackHub() as hub:` or call hub.start()")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- test controls ---------------------------------------------------------------------
    def fail_next(self, operation: str, status: int = 500, count: int = 1, message: str | None = None) -> None:
        """Answer the next ``count`` requests of ``operation`` (one of ``OPERATIONS``) with ``status``."""
        if operation not in OPERATIONS:
            raise ValueError(f"operation={operation!r} is not one of {OPERATIONS}")
        with self._lock:
            self._failures.setdefault(operation, []).extend(
                [(status, message or f"injected failure of {operation}")] * count)

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """Path -> bytes of every file at ``revision`` (for byte-identity checks)."""
        commit = self._commit(repo_type, repo_id, revision)
        return {p: f.data for p, f in commit.files.items()}

    def lfs_paths(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> set[str]:
        commit = self._commit(repo_type, repo_id, revision)
        return {p for p, f in commit.files.items() if f.lfs}

    def commit_count(self, repo_id: str, repo_type: str = "model") -> int:
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
            return 0 if repo is None else len(repo.commits)

    def exists(self, repo_id: str, repo_type: str = "model") -> bool:
        return (repo_type, repo_id) in self.repos

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> Commit:
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"no {repo_type} repo {repo_id!r} on the loopback hub (have {sorted(self.repos)})")
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"{repo_type} repo {repo_id!r} has no revision {revision!r}")
            return commit

    # ---- clients ---------------------------------------------------------------------------
    def env(self, hf_home: str | os.PathLike | None = None) -> dict[str, str]:
        """Environment for a subprocess whose Hub client must talk to this server (online)."""
        env = dict(os.environ)
        env.update(HF_ENDPOINT=self.endpoint, HF_HUB_DISABLE_XET="1", HF_HUB_OFFLINE="0", HF_DATASETS_OFFLINE="0",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_IMPLICIT_TOKEN="1", HF_UPDATE_DOWNLOAD_COUNTS="0")
        env.pop("TRANSFORMERS_OFFLINE", None)
        if hf_home is not None:
            env["HF_HOME"] = os.fspath(hf_home)
        return env

    @contextlib.contextmanager
    def client(self) -> Iterator["LoopbackHub"]:
        """Point this process's (already imported) Hub clients at the server, online, then restore.

        ``huggingface_hub`` and ``datasets`` read ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` at import time, so
        setting the environment is not enough inside a running process; this patches the module
        constants they read at call time (and the environment, for child processes). Pass
        ``cache_dir=`` to loaders in tests so nothing lands in the user's cache.
        """
        from huggingface_hub import constants, hf_api

        endpoint = self.endpoint
        patches: list[tuple[Any, str, Any]] = [
            (constants, "ENDPOINT", endpoint),
            (constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"),
            (constants, "HF_URL_HOSTS", frozenset(constants.HF_URL_HOSTS | {"127.0.0.1"})),
            (constants, "HF_HUB_OFFLINE", False),
            (constants, "HF_HUB_DISABLE_XET", True),
            (hf_api.api, "endpoint", endpoint),
        ]
        if "datasets" in sys.modules or _importable("datasets"):
            from datasets import config as ds_config

            patches += [
                (ds_config, "HF_ENDPOINT", endpoint),
                (ds_config, "HUB_DATASETS_URL", endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}"),
                (ds_config, "HF_HUB_OFFLINE", False),
                (ds_config, "HF_DATASETS_OFFLINE", False),
                (ds_config, "HF_UPDATE_DOWNLOAD_COUNTS", False),
            ]
        if "diffusers" in sys.modules:
            from diffusers.utils import constants as df_constants
            from diffusers.utils import hub_utils as df_hub_utils

            patches += [(df_constants, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", endpoint),
                        (df_hub_utils, "HUGGINGFACE_CO_RESOLVE_ENDPOINT", endpoint),
                        (df_hub_utils, "HF_HUB_OFFLINE", False)]
        if "transformers" in sys.modules:  # transformers keeps one shared HfApi bound to the endpoint it saw first
            from transformers.utils import hub as tf_hub

            if hasattr(tf_hub, "_hf_api"):
                patches.append((tf_hub, "_hf_api", None))
        saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
        env_keys = {"HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                    "HF_DATASETS_OFFLINE": "0"}
        saved_env = {k: os.environ.get(k) for k in env_keys}
        try:
            for obj, name, value in patches:
                setattr(obj, name, value)
            os.environ.update(env_keys)
            _clear_fs_caches()
            yield self
        finally:
            for obj, name, value in saved:
                setattr(obj, name, value)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            _clear_fs_caches()

    # ---- request handling (called from the handler threads) -------------------------------
    def _check_failure(self, operation: str) -> None:
        with self._lock:
            queue = self._failures.get(operation)
            if queue:
                status, message = queue.pop(0)
                raise HubError(status, message)

    def _auth(self, header: str | None, write: bool) -> str | None:
        token = None
        if header and header.lower().startswith("bearer "):
            token = header[7:].strip()
        if token is not None and token not in (self.token, self.read_token):
            if write:
                raise HubError(401, "Invalid credentials in Authorization header")
            token = None  # e.g. a real HF_TOKEN sent along by the client: read as anonymous
        if write and token is None:
            raise HubError(401, "You must be authenticated to write: pass a token (Authorization: Bearer hf_...)")
        if write and token != self.token:
            raise HubError(403, "Your token has read access only; a write token is needed to push")
        return token

    def _repo(self, repo_type: str, repo_id: str, token: str | None) -> Repo:
        with self._lock:
            repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and token is None):
            raise HubError(404, f"Repository {repo_type}/{repo_id} not found", "RepoNotFound")
        return repo

    def _revision(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def create_repo(self, payload: dict, token: str | None) -> dict:
        name = payload.get("name")
        namespace = payload.get("organization") or self.user
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name) or ".." in name \
                or "--" in name:
            raise HubError(400, f"Invalid repo name {name!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{self.endpoint}/{_URL_PREFIX[repo_type]}{repo_id}"
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        with self._lock:
            if (repo_type, repo_id) in self.repos:
                # the Hub answers 409 with the repo url, which create_repo(exist_ok=True) returns
                raise HubError(409, "You already created this repo", None, {"url": url})
            repo = Repo(repo_type, repo_id, private)
            # like the Hub: a new repo starts with one commit holding .gitattributes
            self._apply_commit(repo, "main", "initial commit", "", None,
                               {".gitattributes": StoredFile(GITATTRIBUTES, False)}, set())
            self.repos[(repo_type, repo_id)] = repo
        return {"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]}

    def _apply_commit(self, repo: Repo, branch: str, title: str, message: str, parent: str | None,
                      additions: dict[str, StoredFile], deletions: set[str]) -> Commit:
        files = dict(parent and repo.commits[parent].files or {})
        for path in deletions:
            if path.endswith("/"):
                for p in [p for p in files if p.startswith(path)]:
                    del files[p]
            else:
                files.pop(path, None)
        files.update(additions)
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{message}\n{len(repo.commits)}\n".encode())
        for p in sorted(files):
            digest.update(f"{p}\0{files[p].etag}\n".encode())
        commit = Commit(digest.hexdigest(), title, message, parent, files)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return size >= LFS_SIZE_THRESHOLD or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample

    def commit(self, repo: Repo, revision: str, lines: list[dict], params: dict) -> dict:
        if params.get("create_pr"):
            raise HubError(501, "pull requests are not supported by the loopback hub")
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "commit payload must start with a header line")
        header = lines[0]["value"]
        additions: dict[str, StoredFile] = {}
        deletions: set[str] = set()
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise HubError(400, f"invalid path {path!r} in commit")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, f"unsupported encoding {value.get('encoding')!r} for {path}")
                additions[path] = StoredFile(base64.b64decode(value["content"]), False)
            elif key == "lfsFile":
                with self._lock:
                    data = self.lfs_objects.get(value.get("oid", ""))
                if data is None:
                    raise HubError(422, f"LFS object {value.get('oid')} of {path} was never uploaded")
                additions[path] = StoredFile(data, True)
            elif key in ("deletedFile", "deletedFolder"):
                deletions.add(path.rstrip("/") + "/" if key == "deletedFolder" else path)
            else:
                raise HubError(400, f"unsupported commit operation {key!r}")
        with self._lock:
            head = repo.branches.get(revision)
            if head is None:
                raise HubError(404, f"Invalid rev id: {revision} (create the branch first)", "RevisionNotFound")
            parent_req = header.get("parentCommit")
            if parent_req and not head.startswith(parent_req):
                raise HubError(412, f"parentCommit {parent_req} is not the head of {revision} ({head})")
            missing = [p for p in deletions if not p.endswith("/") and p not in repo.commits[head].files]
            if missing:
                raise HubError(404, f"cannot delete missing file(s) {missing}", "EntryNotFound")
            commit = self._apply_commit(repo, revision, header.get("summary", ""), header.get("description", ""),
                                        head, additions, deletions)
        prefix = _URL_PREFIX[repo.repo_type]
        return {"success": True, "commitOid": commit.oid, "pullRequestUrl": None,
                "commitUrl": f"{self.endpoint}/{prefix}{repo.repo_id}/commit/{commit.oid}"}

    def file_entry(self, path: str, f: StoredFile, commit: Commit | None = None) -> dict:
        entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": len(f.data), "path": path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": len(f.data),
                            "pointerSize": len(_lfs_pointer(f.sha256, len(f.data)))}
        if commit is not None:
            entry["lastCommit"] = {"id": commit.oid, "title": commit.title, "date": commit.date}
        return entry

    def dir_entry(self, path: str) -> dict:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}

    def info(self, repo: Repo, commit: Commit) -> dict:
        siblings = []
        for path, f in sorted(commit.files.items()):
            s: dict[str, Any] = {"rfilename": path, "size": len(f.data), "blobId": f.blob_id}
            if f.lfs:
                s["lfs"] = {"size": len(f.data), "sha256": f.sha256,
                            "pointerSize": len(_lfs_pointer(f.sha256, len(f.data)))}
            siblings.append(s)
        card = {}
        readme = commit.files.get("README.md")
        if readme is not None:
            card = _front_matter(readme.data.decode("utf-8", "replace"))[0] or {}
        namespace = repo.repo_id.split("/")[0]
        return {"_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id,
                "modelId" if repo.repo_type == "model" else "name": repo.repo_id, "author": namespace,
                "sha": commit.oid, "lastModified": commit.date, "createdAt": repo.created_at,
                "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                "tags": list(card.get("tags") or []), "cardData": card, "siblings": siblings,
                "usedStorage": sum(len(f.data) for f in commit.files.values())}

    def tree(self, commit: Commit, path: str, recursive: bool, expand: bool) -> list[dict]:
        path = path.strip("/")
        prefix = path + "/" if path else ""
        if path and path in commit.files:
            raise HubError(400, f"{path} is a file, not a folder")
        entries: dict[str, dict] = {}
        for p, f in sorted(commit.files.items()):
            if not p.startswith(prefix):
                continue
            rest = p[len(prefix):].split("/")
            if recursive:
                for i in range(1, len(rest)):
                    d = prefix + "/".join(rest[:i])
                    entries.setdefault(d, self.dir_entry(d))
                entries[p] = self.file_entry(p, f, commit if expand else None)
            elif len(rest) == 1:
                entries[p] = self.file_entry(p, f, commit if expand else None)
            else:
                d = prefix + rest[0]
                entries.setdefault(d, self.dir_entry(d))
        if path and not entries:
            raise HubError(404, f"{path} does not exist on this revision", "EntryNotFound")
        return list(entries.values())

    def paths_info(self, commit: Commit, paths: list[str], expand: bool) -> list[dict]:
        out = []
        for p in paths:
            p = p.strip("/")
            if p in commit.files:
                out.append(self.file_entry(p, commit.files[p], commit if expand else None))
            elif any(q.startswith(p + "/") for q in commit.files) or p == "":
                out.append(self.dir_entry(p))
        return out


@contextlib.contextmanager
def isolated_hf_home(root: str | os.PathLike) -> Iterator[str]:
    """Point every Hugging Face cache of this process (Hub downloads, ``datasets`` cache, token file) at
    ``root``, then restore. Downloads made inside land there, and offline loads inside read from there,
    so a test neither reads nor writes the user's ``~/.cache/huggingface``."""
    from huggingface_hub import constants

    root = os.path.abspath(os.fspath(root))
    os.makedirs(root, exist_ok=True)
    patches: list[tuple[Any, str, Any]] = [
        (constants, "HF_HOME", root),
        (constants, "HF_HUB_CACHE", os.path.join(root, "hub")),
        (constants, "HF_ASSETS_CACHE", os.path.join(root, "assets")),
        (constants, "HF_TOKEN_PATH", os.path.join(root, "token")),
        (constants, "HF_STORED_TOKENS_PATH", os.path.join(root, "stored_tokens")),
    ]
    if hasattr(constants, "AGENT_HARNESSES_PATH"):
        patches.append((constants, "AGENT_HARNESSES_PATH", os.path.join(root, ".agent_harnesses.json")))
    if "datasets" in sys.modules or _importable("datasets"):
        from pathlib import Path

        from datasets import config as ds_config

        ds_cache = Path(root) / "datasets"
        patches += [(ds_config, "HF_CACHE_HOME", root), (ds_config, "HF_DATASETS_CACHE", ds_cache),
                    (ds_config, "HF_MODULES_CACHE", Path(root) / "modules"),
                    (ds_config, "DOWNLOADED_DATASETS_PATH", ds_cache / "downloads"),
                    (ds_config, "EXTRACTED_DATASETS_PATH", ds_cache / "downloads" / "extracted")]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    saved_env = os.environ.get("HF_HOME")
    try:
        for obj, name, value in patches:
            setattr(obj, name, value)
        os.environ["HF_HOME"] = root
        yield root
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
        if saved_env is None:
            os.environ.pop("HF_HOME", None)
        else:
            os.environ["HF_HOME"] = saved_env


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _clear_fs_caches() -> None:
    """``HfFileSystem`` instances are cached with their endpoint and listings: start clean."""
    try:
        from huggingface_hub import HfFileSystem

        HfFileSystem.clear_instance_cache()
    except Exception:  # noqa: BLE001 - cache clearing is best effort
        pass


def _front_matter(text: str) -> tuple[dict | None, str | None]:
    """YAML metadata of a README (``None`` if absent) and a parse error message (``None`` if fine)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.S)
    if not match:
        return None, None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return None, f"invalid YAML: {err}"
    if data is not None and not isinstance(data, dict):
        return None, "metadata must be a YAML mapping"
    return data or {}, None


def _model_index_errors(meta: dict) -> list[str]:
    """The checks the Hub applies to ``model-index`` (each result needs task.type, dataset, metrics)."""
    errors = []
    index = meta.get("model-index")
    if index is None:
        return errors
    if not isinstance(index, list):
        return ['"model-index" must be a list']
    for i, model in enumerate(index):
        if not isinstance(model, dict) or "name" not in model:
            errors.append(f'"model-index[{i}].name" is required')
            continue
        for j, res in enumerate(model.get("results") or []):
            where = f"model-index[{i}].results[{j}]"
            if not isinstance(res.get("task"), dict) or not res["task"].get("type"):
                errors.append(f'"{where}.task.type" is required')
            ds = res.get("dataset")
            if not isinstance(ds, dict) or not ds.get("type") or not ds.get("name"):
                errors.append(f'"{where}.dataset.type" and ".name" are required')
            metrics = res.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{where}.metrics" must be a non-empty list')
                continue
            for k, m in enumerate(metrics):
                if not isinstance(m, dict) or not m.get("type") or "value" not in m:
                    errors.append(f'"{where}.metrics[{k}]" needs "type" and "value"')
    return errors


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub  # set on the subclass bound to one server
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: requests are recorded instead
        pass

    # ---- plumbing --------------------------------------------------------------------------
    def _body(self) -> bytes:
        return self._raw_body

    def _read_body(self) -> bytes:
        """Read the whole request body first, so an error answer never leaves bytes on a kept-alive socket."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json", head: bool = False, length: int | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)
        self.hub.requests.append((self.command, self.path, status))

    def _json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message.replace("\n", " ")[:500]}
        if err.code:
            headers["X-Error-Code"] = err.code
        body = json.dumps({"error": err.message, **err.extra}).encode()
        self._send(err.status, b"" if self.command == "HEAD" else body, headers,
                   head=self.command == "HEAD", length=None if self.command != "HEAD" else 0)

    def _dispatch(self) -> None:
        try:
            self._raw_body = self._read_body()
            self._route()
        except HubError as err:
            self._error(err)
        except Exception as err:  # noqa: BLE001 - report server bugs as 500 with the message
            self._error(HubError(500, f"loopback hub error: {type(err).__name__}: {err}"))

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # ---- routes ----------------------------------------------------------------------------
    def _route(self) -> None:
        hub = self.hub
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        segs = [unquote(s) for s in url.path.split("/")[1:]]
        method = self.command
        auth = self.headers.get("Authorization")

        if segs[:1] == ["__lfs"]:
            return self._lfs_transfer(segs[1:], method)
        if segs[:2] == ["api", "agent-harnesses"]:
            # huggingface_hub caches this registry in the user's HF_HOME for a day: answer 404 so a test
            # server never leaves a file there (the client then simply detects no agent)
            raise HubError(404, "no agent-harness registry on the loopback hub")
        if segs[:2] == ["api", "whoami-v2"]:
            hub._check_failure("whoami")
            token = hub._auth(auth, write=False)
            if token is None:
                raise HubError(401, "Invalid user token")
            role = "write" if token == hub.token else "read"
            return self._json({"type": "user", "name": hub.user, "fullname": hub.user, "orgs": [],
                               "auth": {"type": "access_token", "accessToken": {"displayName": "loopback",
                                                                                "role": role}}})
        if segs[:3] == ["api", "repos", "create"] and method == "POST":
            hub._check_failure("create_repo")
            token = hub._auth(auth, write=True)
            return self._json(hub.create_repo(json.loads(self._body() or b"{}"), token))
        if segs[:2] == ["api", "validate-yaml"] and method == "POST":
            hub._check_failure("validate_yaml")
            payload = json.loads(self._body() or b"{}")
            meta, error = _front_matter(payload.get("content", ""))
            errors = [error] if error else _model_index_errors(meta or {})
            if errors:
                return self._json({"errors": [{"message": e} for e in errors]}, status=400)
            warnings = [] if meta else [{"message": "Empty or missing yaml metadata in repo card"}]
            return self._json({"warnings": warnings})
        if len(segs) >= 4 and segs[0] == "api" and segs[1] in _PLURAL:
            return self._api_repo(_PLURAL[segs[1]], f"{segs[2]}/{segs[3]}", segs[4:], query, method, auth)
        # /{prefix}{ns}/{name}.git/info/lfs/objects/batch  and  /{prefix}{ns}/{name}/resolve/{rev}/{path}
        repo_type = "model"
        if segs and segs[0] in _PLURAL and len(segs) > 3:
            repo_type, segs = _PLURAL[segs[0]], segs[1:]
        if len(segs) >= 6 and segs[1].endswith(".git") and segs[2:6] == ["info", "lfs", "objects", "batch"]:
            return self._lfs_batch(repo_type, f"{segs[0]}/{segs[1][:-4]}", auth)
        if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
            return self._resolve(repo_type, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]), auth)
        raise HubError(404, f"the loopback hub does not serve {method} {url.path}")

    def _api_repo(self, repo_type: str, repo_id: str, rest: list[str], query: dict, method: str,
                  auth: str | None) -> None:
        hub = self.hub
        action = rest[0] if rest else ""
        write = action in ("preupload", "commit", "branch") and method in ("POST", "DELETE")
        token = hub._auth(auth, write=write)
        if action in ("", "revision") and method == "GET":
            hub._check_failure("info")
            repo = hub._repo(repo_type, repo_id, token)
            commit = hub._revision(repo, rest[1] if action == "revision" and len(rest) > 1 else "main")
            return self._json(hub.info(repo, commit))
        repo = hub._repo(repo_type, repo_id, token)
        if action == "tree" and method == "GET":
            hub._check_failure("tree")
            commit = hub._revision(repo, rest[1] if len(rest) > 1 else "main")
            recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
            expand = query.get("expand", ["false"])[0].lower() in ("1", "true")
            return self._json(hub.tree(commit, "/".join(rest[2:]), recursive, expand))
        if action == "paths-info" and method == "POST":
            hub._check_failure("paths_info")
            commit = hub._revision(repo, rest[1] if len(rest) > 1 else "main")
            body = self._body().decode()
            if self.headers.get("Content-Type", "").startswith("application/json"):
                form = json.loads(body or "{}")
                paths, expand = form.get("paths", []), bool(form.get("expand"))
            else:
                form = parse_qs(body, keep_blank_values=True)
                paths, expand = form.get("paths", []), form.get("expand", ["False"])[0].lower() == "true"
            return self._json(hub.paths_info(commit, paths, expand))
        if action == "refs" and method == "GET":
            hub._check_failure("refs")
            return self._json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid}
                                            for b, oid in sorted(repo.branches.items())],
                               "tags": [], "converts": []})
        if action == "commits" and method == "GET":
            hub._check_failure("commits")
            commit: Commit | None = hub._revision(repo, rest[1] if len(rest) > 1 else "main")
            history = []
            while commit is not None:
                history.append({"id": commit.oid, "title": commit.title, "message": commit.message,
                                "authors": [{"user": hub.user}], "date": commit.date})
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return self._json(history)
        if action == "branch" and len(rest) > 1:
            hub._check_failure("branch")
            branch = "/".join(rest[1:])
            with hub._lock:
                if method == "POST":
                    if branch in repo.branches:
                        raise HubError(409, f"Reference refs/heads/{branch} already exists")
                    start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
                    repo.branches[branch] = hub._revision(repo, start).oid
                    return self._json({})
                if method == "DELETE":
                    if repo.branches.pop(branch, None) is None:
                        raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
                    return self._json({})
        if action == "preupload" and method == "POST":
            hub._check_failure("preupload")
            revision = rest[1] if len(rest) > 1 else "main"
            head = hub._revision(repo, revision)
            files = []
            for f in json.loads(self._body() or b"{}").get("files", []):
                sample = base64.b64decode(f.get("sample", ""))
                lfs = hub.is_lfs(f["path"], int(f.get("size", 0)), sample)
                existing = head.files.get(f["path"])
                oid = None
                if existing is not None:
                    oid = existing.sha256 if lfs else git_blob_sha1(existing.data)
                files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                              "shouldIgnore": False, "oid": oid})
            return self._json({"files": files, "commitOid": head.oid})
        if action == "commit" and method == "POST":
            hub._check_failure("commit")
            revision = rest[1] if len(rest) > 1 else "main"
            body = self._body()
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            params = {k: v[0] for k, v in query.items()}
            return self._json(hub.commit(repo, revision, lines, params))
        raise HubError(404, f"the loopback hub does not serve {method} /api/{repo_type}s/{repo_id}/{'/'.join(rest)}")

    def _lfs_batch(self, repo_type: str, repo_id: str, auth: str | None) -> None:
        hub = self.hub
        hub._check_failure("lfs_batch")
        token = hub._auth(auth, write=True)
        hub._repo(repo_type, repo_id, token)
        payload = json.loads(self._body() or b"{}")
        if payload.get("operation") != "upload":
            raise HubError(400, "the loopback hub only serves LFS uploads (downloads go through /resolve)")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            with hub._lock:
                have = oid in hub.lfs_objects
            if not have:
                entry["actions"] = {"upload": {"href": f"{hub.endpoint}/__lfs/{oid}?size={size}"},
                                    "verify": {"href": f"{hub.endpoint}/__lfs/verify"}}
            objects.append(entry)
        self._send(200, json.dumps({"transfer": "basic", "objects": objects}).encode(),
                   content_type="application/vnd.git-lfs+json")

    def _lfs_transfer(self, rest: list[str], method: str) -> None:
        hub = self.hub
        if method == "PUT" and len(rest) == 1:
            hub._check_failure("lfs_upload")
            data = self._body()
            oid = rest[0]
            if hashlib.sha256(data).hexdigest() != oid:
                raise HubError(400, f"uploaded content does not match sha256 {oid}")
            with hub._lock:
                hub.lfs_objects[oid] = data
            return self._send(200, b"", {"ETag": f'"{hashlib.md5(data).hexdigest()}"'})
        if method == "POST" and rest == ["verify"]:
            hub._check_failure("lfs_verify")
            payload = json.loads(self._body() or b"{}")
            with hub._lock:
                data = hub.lfs_objects.get(payload.get("oid", ""))
            if data is None or len(data) != payload.get("size"):
                raise HubError(404, f"LFS object {payload.get('oid')} not found or of the wrong size")
            return self._json({})
        raise HubError(404, "unknown LFS transfer route")

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str, auth: str | None) -> None:
        hub = self.hub
        hub._check_failure("resolve")
        token = hub._auth(auth, write=False)
        repo = hub._repo(repo_type, repo_id, token)
        commit = hub._revision(repo, revision)
        f = commit.files.get(path)
        head = self.command == "HEAD"
        base = {"X-Repo-Commit": commit.oid, "ETag": f'"{f.etag}"' if f else "", "Accept-Ranges": "bytes"}
        if f is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        if f.lfs:
            base.update({"X-Linked-Etag": f'"{f.etag}"', "X-Linked-Size": str(len(f.data))})
        data = f.data
        rng = self.headers.get("Range")
        if rng and not head:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m:
                raise HubError(416, f"unsupported Range {rng!r}")
            start_s, end_s = m.groups()
            if start_s == "":
                start, end = max(0, len(data) - int(end_s)), len(data) - 1
            else:
                start, end = int(start_s), min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
            if start >= len(data) and len(data) > 0:
                raise HubError(416, f"Range {rng!r} beyond end of {len(data)}-byte file")
            chunk = data[start:end + 1]
            base["Content-Range"] = f"bytes {start}-{start + len(chunk) - 1}/{len(data)}"
            return self._send(206, chunk, base, content_type="application/octet-stream")
        self._send(200, data, base, content_type="application/octet-stream", head=head, length=len(data))


__all__ = ["LoopbackHub", "HubError", "StoredFile", "git_blob_sha1", "isolated_hf_home", "OPERATIONS"]
