"""A small stand-in for the Hugging Face Hub's HTTP API, for tests, on 127.0.0.1 only.

It implements what huggingface_hub's create_repo, create_branch, upload_folder (preupload +
commit with inline base64 files), model_info, list_repo_tree, hf_hub_download and
snapshot_download use. State is in memory. Run as a process:

    python tests/hubserver.py --port-file PATH [--refuse-commits] [--token TOKEN]

It writes the port it listens on to PATH; tests stop it by PID.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

REPOS: dict[str, dict] = {}
LOCK = threading.Lock()
OPTIONS = {"refuse_commits": False, "token": None}


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _new_commit(parent_files: dict[str, bytes], changes: dict[str, bytes | None], message: str) -> tuple[str, dict]:
    files = dict(parent_files)
    for path, content in changes.items():
        if content is None:
            files.pop(path, None)
        else:
            files[path] = content
    sha = hashlib.sha1((message + str(time.time_ns()) + "".join(sorted(files))).encode()).hexdigest()
    return sha, files


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    # ------------------------------------------------------------------ helpers
    def _send(
        self, code: int, body: bytes | dict | list = b"", headers: dict | None = None, head: bool = False
    ) -> None:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        auth = self.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:]:
            return False
        return OPTIONS["token"] is None or auth[7:] == OPTIONS["token"]

    def _repo(self, repo_id: str) -> dict | None:
        return REPOS.get(repo_id)

    def _head_files(self, repo: dict, rev: str) -> tuple[str, dict[str, bytes]] | None:
        rev = unquote(rev)
        sha = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
        if sha is None:
            return None
        return sha, repo["commits"][sha]

    def _info(self, repo_id: str, repo: dict, sha: str, files: dict[str, bytes]) -> dict:
        return {
            "id": repo_id,
            "modelId": repo_id,
            "sha": sha,
            "private": repo["private"],
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "lastModified": "2026-01-01T00:00:00.000Z",
            "createdAt": "2026-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": p, "size": len(b)} for p, b in sorted(files.items())],
        }

    # ------------------------------------------------------------------ routes
    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        body = self._body()
        if not self._authorized():
            return self._send(401, {"error": "Invalid credentials in Authorization header"})
        with LOCK:
            if parts[:2] == ["api", "validate-yaml"]:
                return self._send(200, {"errors": [], "warnings": []})
            if parts[:3] == ["api", "repos", "create"]:
                req = json.loads(body or b"{}")
                repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
                url_out = f"http://{self.headers['Host']}/{repo_id}"
                if repo_id in REPOS:
                    return self._send(409, {"error": "You already created this model repo", "url": url_out})
                sha, files = _new_commit({}, {".gitattributes": b"*.safetensors filter=lfs\n"}, "initial commit")
                REPOS[repo_id] = {
                    "private": bool(req.get("private")),
                    "refs": {"main": sha},
                    "commits": {sha: files},
                    "prs": 0,
                }
                return self._send(200, {"url": url_out, "name": repo_id, "id": repo_id})
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo_id = f"{parts[2]}/{parts[3]}"
                action, rev = parts[4], "/".join(parts[5:])
                repo = self._repo(repo_id)
                if repo is None:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                if action == "branch":
                    if rev in repo["refs"]:
                        return self._send(409, {"error": "Reference already exists"})
                    repo["refs"][rev] = repo["refs"]["main"]
                    return self._send(200, {})
                if action == "preupload":
                    req = json.loads(body or b"{}")
                    head = self._head_files(repo, rev)
                    return self._send(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                for f in req.get("files", [])
                            ],
                            "commitOid": head[0] if head else None,
                        },
                    )
                if action == "commit":
                    if OPTIONS["refuse_commits"]:
                        return self._send(403, {"error": "You don't have the rights to commit to this repo"})
                    head = self._head_files(repo, rev)
                    if head is None:
                        return self._send(
                            404, {"error": f"Revision not found: {rev}"}, {"X-Error-Code": "RevisionNotFound"}
                        )
                    changes: dict[str, bytes | None] = {}
                    summary = "commit"
                    for line in body.decode().splitlines():
                        if not line.strip():
                            continue
                        item = json.loads(line)
                        value = item["value"]
                        if item["key"] == "header":
                            summary = value.get("summary", summary)
                        elif item["key"] == "file":
                            changes[value["path"]] = base64.b64decode(value["content"])
                        elif item["key"] in ("deletedFile", "deletedFolder"):
                            changes[value["path"]] = None
                        else:
                            return self._send(400, {"error": f"unsupported commit operation {item['key']}"})
                    sha, files = _new_commit(head[1], changes, summary)
                    repo["commits"][sha] = files
                    host = f"http://{self.headers['Host']}"
                    if parse_qs(url.query).get("create_pr") == ["1"]:
                        repo["prs"] += 1
                        ref = f"refs/pr/{repo['prs']}"
                        repo["refs"][ref] = sha
                        return self._send(
                            200,
                            {
                                "commitUrl": f"{host}/{repo_id}/commit/{sha}",
                                "commitOid": sha,
                                "pullRequestUrl": f"{host}/{repo_id}/discussions/{repo['prs']}",
                            },
                        )
                    repo["refs"][unquote(rev)] = sha
                    return self._send(200, {"commitUrl": f"{host}/{repo_id}/commit/{sha}", "commitOid": sha})
        return self._send(404, {"error": f"not implemented: POST {url.path}"})

    def do_HEAD(self) -> None:  # noqa: N802
        self._get(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._get(head=False)

    def _get(self, head: bool) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        with LOCK:
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id = f"{parts[2]}/{parts[3]}"
                repo = self._repo(repo_id)
                if repo is None or (repo["private"] and not self._authorized()):
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
                if len(parts) == 4 or parts[4] == "revision":
                    rev = "/".join(parts[5:]) if len(parts) > 5 else "main"
                    found = self._head_files(repo, rev)
                    if found is None:
                        return self._send(
                            404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}, head
                        )
                    return self._send(200, self._info(repo_id, repo, *found), head=head)
                if parts[4] == "tree":
                    found = self._head_files(repo, parts[5] if len(parts) > 5 else "main")
                    if found is None:
                        return self._send(
                            404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}, head
                        )
                    prefix = "/".join(parts[6:])
                    entries = [
                        {"type": "file", "path": p, "size": len(b), "oid": _sha(b)}
                        for p, b in sorted(found[1].items())
                        if not prefix or p.startswith(prefix + "/")
                    ]
                    return self._send(200, entries, head=head)
            if len(parts) >= 5 and parts[2] == "resolve":
                repo_id = f"{parts[0]}/{parts[1]}"
                repo = self._repo(repo_id)
                if repo is None or (repo["private"] and not self._authorized()):
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
                found = self._head_files(repo, parts[3])
                if found is None:
                    return self._send(404, {"error": "Revision not found"}, {"X-Error-Code": "RevisionNotFound"}, head)
                path = "/".join(parts[4:])
                if path not in found[1]:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, head)
                data = found[1][path]
                return self._send(
                    200,
                    data,
                    {"X-Repo-Commit": found[0], "ETag": f'"{_sha(data)}"', "Content-Type": "application/octet-stream"},
                    head,
                )
        return self._send(404, {"error": f"not implemented: GET {url.path}"}, head=head)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-file", type=Path, required=True)
    ap.add_argument("--refuse-commits", action="store_true")
    ap.add_argument("--token", default=None, help="the only token accepted (default: any non-empty token)")
    args = ap.parse_args()
    OPTIONS["refuse_commits"] = args.refuse_commits
    OPTIONS["token"] = args.token
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(server.server_address[1]))
    tmp.rename(args.port_file)
    server.serve_forever()


if __name__ == "__main__":
    main()
