"""A tiny stand-in for the Hugging Face hub, served on 127.0.0.1 for the tests.

It answers what `huggingface_hub.hf_hub_download` asks: HEAD and GET on
`/<org>/<repo>/resolve/<revision>/<file>` with the `ETag`, `X-Repo-Commit` and `Content-Length`
headers, and `Range: bytes=N-` requests for resuming. It records every request, can close (or
reset) the connection part-way through a file once (an interrupted download), stall part-way
through a file on every request (a server that stops sending without closing the connection)
and can serve altered bytes (a corrupted file).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_REPO_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(/revision/[^/]+)?$")
_TREE = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/tree/[^/]+$")


@dataclass
class Request:
    method: str
    path: str
    range: str | None


@dataclass
class HubServer:
    repos: dict[str, dict[str, Path]]  # repo id -> {filename: local file}
    requests: list[Request] = field(default_factory=list)
    interrupt_once: dict[str, int] = field(default_factory=dict)  # filename -> bytes sent first
    reset_once: dict[str, int] = field(default_factory=dict)  # the same, then a reset (RST)
    corrupt: set[str] = field(default_factory=set)  # filenames served with one byte flipped
    status: dict[str, int] = field(default_factory=dict)  # filename -> HTTP error answered
    error_code: dict[str, str] = field(default_factory=dict)  # filename -> its X-Error-Code
    # filename -> offset where each GET stops sending (None: no answer at all, HEAD or GET)
    stall: dict[str, int | None] = field(default_factory=dict)
    _stopping: threading.Event = field(default_factory=threading.Event)

    def start(self) -> HubServer:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._stopping.set()  # stalled answers end
        self._httpd.shutdown()
        self._httpd.server_close()

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def content(self, repo: str, filename: str) -> bytes | None:
        path = self.repos.get(repo, {}).get(filename)
        if path is None:
            return None
        data = path.read_bytes()
        if filename in self.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
        return data

    def downloads(self, filename: str | None = None) -> list[Request]:
        """The GET requests for repository files (one file, or all)."""
        return [
            r
            for r in self.requests
            if r.method == "GET"
            and "/resolve/" in r.path
            and (filename is None or r.path.endswith("/" + filename))
        ]


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool):
        hub = self.hub
        hub.requests.append(Request(self.command, self.path, self.headers.get("Range")))
        path = self.path.split("?")[0]
        info, tree = _REPO_INFO.match(path), _TREE.match(path)
        if (info or tree) and (info or tree)["repo"] in hub.repos:  # what snapshot_download asks
            repo = hub.repos[(info or tree)["repo"]]
            if info:
                files = [{"rfilename": f} for f in repo]
                listing = {"id": info["repo"], "sha": COMMIT, "siblings": files}
            else:
                listing = [
                    {"type": "file", "path": f, "size": p.stat().st_size, "oid": COMMIT}
                    for f, p in repo.items()
                ]
            data = json.dumps(listing).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)
            return
        m = _RESOLVE.match(self.path.split("?")[0])
        if m and m["file"] in hub.stall and hub.stall[m["file"]] is None:
            hub._stopping.wait()  # the connection accepted, the request read: no answer
            return
        if m and m["file"] in hub.status:  # a server error, or a mirror without the file
            self.send_response(hub.status[m["file"]])
            if code := hub.error_code.get(m["file"]):  # as the hub says why (GatedRepo, ...)
                self.send_header("X-Error-Code", code)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = m and hub.content(m["repo"], m["file"])
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = _range_start(self.headers.get("Range"))
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if (stop := hub.stall.get(m["file"])) is not None:  # a stall after the headers
            self.wfile.write(data[start : max(start, stop)])
            self.wfile.flush()
            hub._stopping.wait()  # headers and bytes up to `stop` sent; then nothing
            return
        cut = hub.interrupt_once.pop(m["file"], None)
        if cut is not None and cut > start:
            self.wfile.write(data[start:cut])
            self.wfile.flush()
            self.close_connection = True
            return  # the client sees the connection close before Content-Length bytes
        cut = hub.reset_once.pop(m["file"], None)
        if cut is not None and cut > start:
            self.wfile.write(data[start:cut])
            self.wfile.flush()
            linger = struct.pack("ii", 1, 0)  # close with a reset, as a dropped link or proxy
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            self.connection.close()
            self.close_connection = True
            return
        self.wfile.write(data[start:])


def _range_start(header: str | None) -> int:
    m = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(m[1]) if m else 0
