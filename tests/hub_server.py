"""A real Hub-compatible server on 127.0.0.1 for the Hub tests: olah (reads) + a small write API.

* olah (https://github.com/vtuber-plan/olah, MIT) runs in its OWN virtualenv (see ``.ci/olah_env.sh``;
  it needs huggingface_hub >= 1.27) as a subprocess on a free loopback port, in offline mode, serving
  the git repositories under ``<root>/mirrors/models/<org>/<repo>`` as Hub model repos. Its upstream
  points at a closed loopback port, so it can never reach the internet.
* olah has no write endpoints, so a front server (this module, a thread in the test process) listens
  on a second port: GET/HEAD are forwarded verbatim to olah; POST implements the calls the real
  huggingface_hub client makes for ``create_repo``/``create_branch``/``create_commit`` (with the
  README ``validate-yaml`` check) and commits the
  files into the git repository olah serves. Clients use the front server as their endpoint.

olah quirks worked around here: every error comes back as 401 "Repository Not Found"; a bare
``model_info(repo)`` (no revision) fails; files of 121-149 bytes that are not UTF-8 break its tree
listing (``commit_files`` refuses them so a test never trips on it by accident).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OLAH_ENV_SCRIPT = REPO_ROOT / ".ci" / "olah_env.sh"
HOP_HEADERS = {"connection", "transfer-encoding", "keep-alive", "server", "date"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def olah_python() -> tuple[str | None, str]:
    """(python of the olah virtualenv, or None; why not).

    ``$SPARSE_CLT_OLAH_PYTHON`` (set by .ci/run) or ``$OLAH_PYTHON`` wins; else ``.ci/olah_env.sh`` creates
    or reuses /tmp/olah-venv (about 15 s the first time, needs PyPI).
    """
    for var in ("SPARSE_CLT_OLAH_PYTHON", "OLAH_PYTHON"):
        given = os.environ.get(var)
        if given:
            return (given, "") if Path(given).exists() else (None, f"{var}={given} does not exist")
    try:
        out = subprocess.run(
            ["bash", str(OLAH_ENV_SCRIPT)], capture_output=True, text=True, timeout=300, check=True
        )
    except (subprocess.SubprocessError, OSError) as exc:
        err = getattr(exc, "stderr", "") or ""
        return None, f"could not set up olah with {OLAH_ENV_SCRIPT}: {exc} {err[-500:]}"
    return out.stdout.strip().splitlines()[-1], ""


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@localhost",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@localhost",
    }
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {repo}: {out.stderr}")
    return out.stdout.strip()


class HubServer:
    """olah + write front server. ``url`` is the endpoint for huggingface_hub (HF_ENDPOINT)."""

    def __init__(self, root: Path, python: str) -> None:
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        self.python = python
        self.olah_port = free_port()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.httpd: ThreadingHTTPServer | None = None
        self.lock = threading.Lock()
        self.commits: list[tuple[str, str, list[str]]] = []  # (repo, revision, paths) of every push
        self.requests: list[tuple[str, str]] = []  # (method, path) of every read forwarded to olah

    # ------------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> HubServer:
        closed = free_port()  # nothing listens there: olah's "upstream"
        cfg = self.root / "olah.toml"
        cfg.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.olah_port}\n'
            f'repos-path = "{self.root / "olah-cache"}"\nmirrors-path = ["{self.mirrors}"]\n'
            f'hf-scheme = "http"\nhf-netloc = "127.0.0.1:{closed}"\nhf-lfs-netloc = "127.0.0.1:{closed}"\n'
            f'mirror-scheme = "http"\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\nmetadata-cache-ttl = 0\n'
            "[accessibility]\noffline = true\n"
        )
        log = open(self.root / "olah.log", "wb")
        self.proc = subprocess.Popen(
            [self.python, "-m", "olah.server", "--config", str(cfg), "--log-path", str(self.root / "logs")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.root,
        )
        handler = type("Handler", (_Handler,), {"hub": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with socket.create_connection(("127.0.0.1", self.olah_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"olah did not start; log:\n{(self.root / 'olah.log').read_text()[-3000:]}")

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None

    # ------------------------------------------------------------------ repos
    def repo_path(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def create_repo(self, repo_id: str) -> Path:
        path = self.repo_path(repo_id)
        if not (path / ".git").exists():
            path.mkdir(parents=True, exist_ok=True)
            git(path, "init", "-q", "-b", "main")
            (path / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
            git(path, "add", "-A")
            git(path, "commit", "-q", "-m", "initial commit")
        return path

    def commit_files(
        self,
        repo_id: str,
        files: dict[str, bytes | Path],
        *,
        revision: str = "main",
        message: str = "add files",
        deleted: tuple[str, ...] = (),
    ) -> str:
        """Commit ``files`` (repo path -> bytes or local file) on branch ``revision``; the commit sha."""
        with self.lock:
            path = self.create_repo(repo_id)
            branches = git(path, "branch", "--format=%(refname:short)").split()
            git(path, "checkout", "-q", *([revision] if revision in branches else ["-b", revision]))
            try:
                for rel, content in files.items():
                    data = content.read_bytes() if isinstance(content, Path) else content
                    _check_olah_size_quirk(rel, data)
                    target = path / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                for rel in deleted:
                    (path / rel).unlink(missing_ok=True)
                git(path, "add", "-A")
                git(path, "commit", "-q", "--allow-empty", "-m", message)
                return git(path, "rev-parse", "HEAD")
            finally:
                git(path, "checkout", "-q", "main")

    def add_folder(self, repo_id: str, folder: Path, *, subfolder: str = "", revision: str = "main") -> str:
        """Commit every file of a local folder (under ``subfolder``); the commit sha."""
        prefix = f"{subfolder.strip('/')}/" if subfolder else ""
        files = {
            prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()
        }
        return self.commit_files(repo_id, files, revision=revision)

    def tag(self, repo_id: str, name: str, rev: str = "main") -> None:
        git(self.repo_path(repo_id), "tag", name, rev)

    def create_branch(self, repo_id: str, branch: str, start: str = "main") -> bool:
        path = self.repo_path(repo_id)
        if branch in git(path, "branch", "--format=%(refname:short)").split():
            return False
        git(path, "branch", branch, start)
        return True


def _check_olah_size_quirk(rel: str, data: bytes) -> None:
    if 121 <= len(data) <= 149:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(
                f"{rel}: {len(data)} bytes of non-UTF-8 data break olah's tree listing (121-149 bytes); "
                "make the test file bigger or smaller"
            ) from None


class _Handler(BaseHTTPRequestHandler):
    """Front server: forwards reads to olah, implements the Hub write API on the git mirrors."""

    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # keep pytest output clean
        pass

    # ------------------------------------------------------------------ reads -> olah
    def _forward(self) -> None:
        self.hub.requests.append((self.command, self.path))
        conn = http.client.HTTPConnection("127.0.0.1", self.hub.olah_port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        status = resp.status
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if m and self.command == "GET" and status == 200 and int(m[1]) < len(body):
            # olah serves mirror files whole (200, Range ignored); the Hub answers ranges with 206
            end = min(int(m[2]) if m[2] else len(body) - 1, len(body) - 1)
            total, body, status = len(body), body[int(m[1]) : end + 1], 206
        self.send_response(status)
        if status == 206:
            self.send_header("Content-Range", f"bytes {int(m[1])}-{end}/{total}")
        for key, value in resp.getheaders():
            if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                self.send_header(key, value)
        length = resp.getheader("content-length")
        self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        conn.close()

    do_GET = _forward
    do_HEAD = _forward

    # ------------------------------------------------------------------ writes
    def _reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = self.path.split("?")[0]
        parts = path.strip("/").split("/")
        try:
            if path == "/api/repos/create":
                req = json.loads(body)
                repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                self.hub.create_repo(repo_id)
                return self._reply(200, {"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
            if path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body).get("content", ""))
            if len(parts) >= 6 and parts[:2] == ["api", "models"]:
                repo_id, action, rev = f"{parts[2]}/{parts[3]}", parts[4], "/".join(parts[5:])
                if action == "preupload":
                    files = json.loads(body).get("files", [])
                    return self._reply(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in files
                            ]
                        },
                    )
                if action == "commit":
                    return self._commit(repo_id, rev, body)
                if action == "branch":
                    if not self.hub.create_branch(repo_id, rev):
                        return self._reply(409, {"error": f"branch {rev} already exists"})
                    return self._reply(200, {})
            self._reply(404, {"error": f"not implemented: POST {path}"})
        except Exception as exc:  # report server-side bugs to the client instead of hanging
            self._reply(500, {"error": f"{type(exc).__name__}: {exc}"})

    def _validate_yaml(self, content: str) -> None:
        """The model card check the client runs before committing a README.md: front matter must parse."""
        import yaml

        front = content.split("---")[1] if content.startswith("---") and content.count("---") >= 2 else ""
        try:
            meta = yaml.safe_load(front) if front else {}
        except yaml.YAMLError as exc:
            return self._reply(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
        if front and not isinstance(meta, dict):
            return self._reply(400, {"errors": [{"message": "metadata must be a mapping"}]})
        self._reply(200, {"errors": [], "warnings": []})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        files: dict[str, bytes | Path] = {}
        deleted: list[str] = []
        message = "commit"
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value.get("summary") or message
            elif key == "file":
                raw = value["content"]
                files[value["path"]] = (
                    base64.b64decode(raw) if value.get("encoding") == "base64" else raw.encode()
                )
            elif key == "deletedFile":
                deleted.append(value["path"])
            else:
                return self._reply(
                    400, {"error": f"unsupported commit operation {key!r} (lfs is not served)"}
                )
        from urllib.parse import unquote

        revision = unquote(revision)
        sha = self.hub.commit_files(
            repo_id, files, revision=revision, message=message, deleted=tuple(deleted)
        )
        self.hub.commits.append((repo_id, revision, sorted(files)))
        self._reply(
            200,
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}",
                "pullRequestUrl": None,
            },
        )


def cleanup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
