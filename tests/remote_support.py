"""Servers on 127.0.0.1 for the remote tests: an HTTP server with range support that counts
what it serves, and an S3 endpoint (moto's server mode).

``python tests/remote_support.py FOLDER`` serves FOLDER on 127.0.0.1 until its standard
input closes (the benchmark's HTTP rows use it): it prints its base URL, answers
``/.stats`` with the counts as JSON and ``/.reset`` by zeroing them.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import sys
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeServer(http.server.ThreadingHTTPServer):
    """Serves the files of ``root`` with HEAD and single-range GETs, counting GET requests
    and the bytes sent.  ``ranges=False`` answers every GET with the whole file (200);
    ``fail`` answers the next N GETs with 503; ``deny`` lists names answered with 403."""

    daemon_threads = True

    def __init__(self, root: str, *, ranges: bool = True) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.ranges = ranges
        self.fail = 0
        self.deny: set[str] = set()
        self.requests = 0  # GETs
        self.heads = 0
        self.bytes = 0
        self.log: list[tuple[str, int, int]] = []  # (name, start, end) of each GET
        self.lock = threading.Lock()
        self.delay = 0.0  # seconds each ranged GET waits before its answer: a distant server
        self.in_flight = 0  # GETs being answered now
        self.peak = 0  # the most GETs answered at once

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{name}"

    def reset(self) -> None:
        with self.lock:
            self.requests = self.heads = self.bytes = self.peak = 0
            self.log = []


class _Handler(http.server.BaseHTTPRequestHandler):
    server: RangeServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _file(self) -> str | None:
        name = self.path.split("?", 1)[0].lstrip("/")
        if name in self.server.deny:
            self._answer(403, b"forbidden")
            return None
        path = os.path.join(self.server.root, name)
        if not os.path.isfile(path):
            self._answer(404, b"not found")
            return None
        return path

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":  # an answer to HEAD has no body
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        with self.server.lock:
            self.server.heads += 1
        path = self._file()
        if path is None:
            return
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(path)))
        if self.server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        if self.path in ("/.stats", "/.reset"):
            self._stats(reset=self.path == "/.reset")
            return
        with self.server.lock:
            if self.server.fail:
                self.server.fail -= 1
                failing = True
            else:
                failing = False
        if failing:
            self._answer(503, b"busy")
            return
        path = self._file()
        if path is None:
            return
        with self.server.lock:
            self.server.in_flight += 1
            self.server.peak = max(self.server.peak, self.server.in_flight)
        try:
            self._send_range(path)
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def _send_range(self, path: str) -> None:
        size = os.path.getsize(path)
        start, end = 0, size
        match = _RANGE.match(self.headers.get("Range", ""))
        ranged = bool(match) and self.server.ranges
        if ranged and match:
            start = int(match.group(1))
            end = min(size, int(match.group(2)) + 1) if match.group(2) else size
        if ranged and self.server.delay:
            time.sleep(self.server.delay)
        with open(path, "rb") as f:
            f.seek(start)
            body = f.read(end - start)
        with self.server.lock:
            self.server.requests += 1
            self.server.bytes += len(body)
            self.server.log.append((os.path.basename(path), start, end))
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.wfile.write(body)


    def _stats(self, reset: bool) -> None:
        server = self.server
        with server.lock:
            counts = {"requests": server.requests, "heads": server.heads, "bytes": server.bytes}
        if reset:
            server.reset()
        self._answer(200, json.dumps(counts).encode())


@contextlib.contextmanager
def range_server(root: str, *, ranges: bool = True) -> Iterator[RangeServer]:
    server = RangeServer(root, ranges=ranges)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """An S3 endpoint on 127.0.0.1 (moto), with dummy credentials in the environment;
    yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


if __name__ == "__main__":
    with range_server(sys.argv[1]) as running:
        print(running.url(""), flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            sys.stdin.read()  # until the parent closes the pipe (or is gone)
