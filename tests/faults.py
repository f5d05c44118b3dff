"""Storage faults on demand: an HTTP proxy on 127.0.0.1 in front of the test S3 server (moto)
that fails a seeded share of requests the way object stores do.

Each request is forwarded to the real server unless its draw says otherwise:
- `slowdown`: 503 SlowDown (S3's throttling answer), the request never reaches the server;
- `internal`: 500 InternalError, likewise;
- `reset`: the connection is reset (RST) after the request was read, before it is forwarded;
- `stall`: the request is held `stall_seconds` (a range) and then forwarded (a slow store).

Draws are deterministic: a request's fate is a function of the seed, the request (method,
path, query keys, Range) and how many times that same request came before, never of thread
timing. No request fails more than `max_in_a_row` times running, so a client that retries as
the pipeline does always gets through a storm; `fail_for_good(method, path)` picks requests
that fail with 503 on every attempt instead. Faults are injected before the server sees the
request: a reset after a conditional PUT was applied would look to the client like someone
else's object (see the report of issue 26).

Bounded: at most `MAX_FORWARDS` requests are forwarded at once, a stall is at most the top of
its range, and every upstream call has a timeout.
"""

from __future__ import annotations

import collections
import hashlib
import http.client
import http.server
import socket
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

MAX_FORWARDS = 16
UPSTREAM_TIMEOUT_S = 60
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "expect", "te", "upgrade"}
FAULT_KINDS = ("slowdown", "internal", "reset", "stall")
ERROR_BODIES = {
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass(frozen=True)
class Storm:
    """Shares of requests that meet each fault (the rest go through untouched)."""

    slowdown: float = 0.08
    internal: float = 0.05
    reset: float = 0.08
    stall: float = 0.04
    stall_seconds: tuple[float, float] = (0.5, 2.0)
    max_in_a_row: int = 2
    seed: int = 0

    def to_dict(self) -> dict:
        return {"slowdown": self.slowdown, "internal": self.internal, "reset": self.reset, "stall": self.stall,
                "stall_seconds": list(self.stall_seconds), "max_in_a_row": self.max_in_a_row, "seed": self.seed}


CALM = Storm(slowdown=0, internal=0, reset=0, stall=0)


class FaultProxy:
    """`with FaultProxy(upstream, storm) as proxy:` -> `proxy.url` is an S3 endpoint that misbehaves.

    `counts` tallies requests ("requests") and each fault injected ("slowdown", ..., "for_good").
    """

    def __init__(self, upstream: str, storm: Storm = Storm(),
                 fail_for_good: Callable[[str, str], bool] | None = None):
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream = (parsed.hostname, parsed.port)
        self.storm = storm
        self.fail_for_good = fail_for_good
        self.counts: collections.Counter = collections.Counter()
        self._seen: collections.Counter = collections.Counter()  # times each request came
        self._in_a_row: collections.Counter = collections.Counter()  # faults it met running
        self._lock = threading.Lock()
        self._forwards = threading.BoundedSemaphore(MAX_FORWARDS)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def faults(self) -> dict[str, int]:
        """Faults injected so far, by kind (requests too)."""
        with self._lock:
            return {kind: self.counts[kind] for kind in ("requests", *FAULT_KINDS, "for_good")}

    def fate(self, method: str, path: str, query: str, byte_range: str) -> str | None:
        """The fault this request meets (a FAULT_KINDS name, "for_good"), or None: go through."""
        if self.fail_for_good is not None and self.fail_for_good(method, path):
            fault = "for_good"
        else:
            request = f"{method} {path} {sorted(urllib.parse.parse_qs(query, keep_blank_values=True))} {byte_range}"
            with self._lock:
                attempt = self._seen[request]
                self._seen[request] += 1
                digest = hashlib.sha256(f"{self.storm.seed}|{request}|{attempt}".encode()).digest()
                draw = int.from_bytes(digest[:8], "big") / 2**64
                fault, edge = None, 0.0
                for kind in FAULT_KINDS:
                    edge += getattr(self.storm, kind)
                    if draw < edge:
                        fault = kind
                        break
                if fault in ("slowdown", "internal", "reset"):
                    if self._in_a_row[request] >= self.storm.max_in_a_row:
                        fault = None
                    else:
                        self._in_a_row[request] += 1
                if fault is None:
                    self._in_a_row.pop(request, None)
        with self._lock:
            self.counts["requests"] += 1
            if fault:
                self.counts[fault] += 1
        return fault


def _handler(proxy: FaultProxy) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:  # quiet: the counts tell what happened
            pass

        def _body(self) -> bytes:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            if self.command != "HEAD" or not any(n.lower() == "content-length" for n, _ in headers):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _reset(self) -> None:
            # SO_LINGER 0: close() sends RST, as a dropped connection does.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.connection.close()

        def _handle(self) -> None:
            body = self._body()
            split = urllib.parse.urlsplit(self.path)
            fault = proxy.fate(self.command, split.path, split.query, self.headers.get("Range", ""))
            if fault == "reset":
                return self._reset()
            if fault in ("slowdown", "internal", "for_good"):
                status, code, message = ERROR_BODIES["internal" if fault == "internal" else "slowdown"]
                xml = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}"
                       f"</Message><Resource>{split.path}</Resource></Error>").encode()
                return self._answer(status, [("Content-Type", "application/xml")], xml)
            if fault == "stall":
                time.sleep(_stall_seconds(proxy.storm, split.path))
            with proxy._forwards:
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                            upstream.putheader(name, value)
                    upstream.putheader("Content-Length", str(len(body)))
                    upstream.endheaders(body)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
            headers = [(n, v) for n, v in response.getheaders() if n.lower() not in HOP_BY_HOP
                       and (self.command == "HEAD" or n.lower() != "content-length")]
            self._answer(response.status, headers, data)

        def finish(self) -> None:
            try:
                super().finish()
            except OSError:  # the connection was reset on purpose
                pass

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

    return Handler


def _stall_seconds(storm: Storm, path: str) -> float:
    low, high = storm.stall_seconds
    digest = hashlib.sha256(f"{storm.seed}|stall|{path}".encode()).digest()
    return low + (high - low) * int.from_bytes(digest[:8], "big") / 2**64

