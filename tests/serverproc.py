"""Start `python minivault.py` as a child process and talk to it over raw sockets."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[1]
START_TIMEOUT = 240.0  # a first start converts the GGUF file (about 35 s here)


class ServerProcess:
    def __init__(self, args: list[str], log_file=None, port: int = 0, env: dict[str, str] | None = None):
        self.log_file = log_file
        if log_file is not None:
            args = ["--log-file", str(log_file), *args]
        self.args = args
        self.stderr_lines: list[str] = []
        self._listening = threading.Event()
        self._loaded = threading.Event()
        self.port = 0
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "minivault.py"), "--host", "127.0.0.1", "--port", str(port), *args],
            cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True)
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            self.stderr_lines.append(line)
            m = re.search(r"listening on http://[\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                self._listening.set()
            if "loaded in" in line:
                self._loaded.set()
        self._listening.set()
        self._loaded.set()

    @property
    def stderr(self) -> str:
        return "".join(self.stderr_lines)

    def wait_for_stderr(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stderr:
            assert time.monotonic() < deadline, f"server never said {text!r}"
            time.sleep(0.02)

    def wait_listening(self) -> None:
        assert self._listening.wait(START_TIMEOUT), "server did not open its port"
        assert self.port, f"server exited before listening:\n{self.stderr}"

    def wait_ready(self) -> None:
        self.wait_listening()
        assert self._loaded.wait(START_TIMEOUT), "model did not load in time"
        assert self.proc.poll() is None, f"server exited:\n{self.stderr}"

    def stop(self, sig=signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def wait_health(self, field: str, at_least: int, timeout: float = 120.0) -> dict:
        """Poll /health until its `field` (e.g. "active", "queued") reaches `at_least`."""
        deadline = time.monotonic() + timeout
        while (health := self.request("GET", "/health").json())[field] < at_least:
            assert time.monotonic() < deadline, f"/health {field} never reached {at_least}"
            time.sleep(0.02)
        return health

    def connect(self, timeout: float = 120.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def request(self, method: str, path: str, body=None, headers: dict | None = None) -> "Response":
        with self.connect() as sock:
            send_request(sock, method, path, body, headers)
            return read_response(sock)

    def generate(self, **fields) -> "Response":
        return self.request("POST", "/generate", fields)


def encode_request(method: str, path: str, body=None, headers: dict | None = None) -> bytes:
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    hdrs = {"Host": "127.0.0.1", **(headers or {})}
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
        hdrs["Content-Length"] = str(len(body))
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
    return head.encode() + (body or b"")


def send_request(sock: socket.socket, method: str, path: str, body=None, headers: dict | None = None) -> None:
    sock.sendall(encode_request(method, path, body, headers))


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: list[bytes] = field(default_factory=list)  # chunked bodies, one entry per chunk
    chunk_times: list[float] = field(default_factory=list)  # when each chunk was complete

    def json(self):
        return json.loads(self.body)

    def lines(self) -> list[dict]:
        """The NDJSON objects of a streamed body, checking one object per chunk."""
        return [json.loads(c) for c in self.chunks]

    def text(self) -> str:
        return "".join(obj.get("response", "") for obj in self.lines())


class _Reader:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed mid-response")
        self.buf += data

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return data


def iter_chunks(r: _Reader):
    """The chunks of a chunked body, each checked for correct framing, up to the last one."""
    while (size := int(r.line(), 16)) != 0:
        data = r.exactly(size)
        assert r.exactly(2) == b"\r\n", "chunk data must be followed by CRLF"
        yield data
    assert r.line() == b"", "chunked body must end with an empty line"


def read_response(sock: socket.socket, reader: _Reader | None = None, max_chunks: int | None = None,
                  head_only: bool = False) -> Response:
    """Read one response; chunked bodies are checked for correct framing chunk by chunk."""
    r = reader or _Reader(sock)
    status_line = r.line().decode()
    status = int(status_line.split(" ")[1])
    headers = {}
    while line := r.line():
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    resp = Response(status, headers)
    if head_only or status in (100, 204, 304):
        return resp
    if headers.get("transfer-encoding") == "chunked":
        for data in iter_chunks(r):
            resp.chunks.append(data)
            resp.chunk_times.append(time.monotonic())
            if max_chunks is not None and len(resp.chunks) >= max_chunks:
                break
        resp.body = b"".join(resp.chunks)
    else:
        resp.body = r.exactly(int(headers.get("content-length", "0")))
    return resp


def read_log(path) -> list[dict]:
    """The log's whole lines. A last line without its newline is a write still in
    progress: the server writes each line with one write(), but a reader racing it
    can see part of it (CI once read '..."status":"don')."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def wait_for_log(path, predicate, timeout: float = 60.0) -> dict:
    """The first log record matching `predicate`, waiting for the log writer if needed."""
    deadline = time.monotonic() + timeout
    while True:
        for record in read_log(path):
            if predicate(record):
                return record
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching log line in {path}")
        time.sleep(0.05)
