"""HTTP/1.1 on asyncio: a pure parser over bytes, a chunked writer, and a thin
connection layer with limits, timeouts, keep-alive and routing.

Nothing here knows about models. Handlers get a `Request` and a `ResponseWriter`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("minivault.http")


# ---------------------------------------------------------------------------
# Errors and limits


class HTTPError(Exception):
    """A request we refuse; becomes a JSON error reply with this status."""

    def __init__(self, status: int, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or []


@dataclass
class Limits:
    max_request_line: int = 8 * 1024
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 100
    max_body: int = 1024 * 1024
    header_timeout: float = 10.0  # slowloris: the whole head must arrive in this time
    keepalive_timeout: float = 5.0  # idle time allowed between requests
    body_timeout: float = 30.0  # the whole body must arrive in this time
    write_timeout: float = 30.0  # a reader that accepts no bytes for this long is dropped


# ---------------------------------------------------------------------------
# Parsing (pure: bytes in, Request or HTTPError out)

# RFC 9110 token characters, for methods and field names.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
# Field values: visible ASCII, obs-text, space and tab; no other control bytes.
_BAD_VALUE_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)[ \t]*(;.*)?")
_HEAD_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class Request:
    method: str
    target: str
    version: tuple[int, int]
    headers: list[tuple[str, str]]  # names lower-cased, in arrival order
    body: bytes = b""
    client: str = ""
    content_length: int | None = None
    chunked: bool = False

    def header(self, name: str) -> str | None:
        """The value of a header (several occurrences joined by ', ')."""
        name = name.lower()
        values = [v for k, v in self.headers if k == name]
        return ", ".join(values) if values else None

    def _split(self) -> tuple[str, str]:
        """(path, query). An origin-form target ("/x?y") splits at its "?" alone:
        urlsplit would read "//host/x" as a host and the path "/x"."""
        if self.target.startswith("/"):
            path, _, query = self.target.partition("#")[0].partition("?")
            return path, query
        parts = urlsplit(self.target)  # absolute-form, "http://host/x?y"
        return parts.path, parts.query

    @property
    def path(self) -> str:
        return self._split()[0] or "/"

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self._split()[1])

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if "close" in tokens:
            return False
        if self.version >= (1, 1):
            return True
        return "keep-alive" in tokens

    @property
    def expects_continue(self) -> bool:
        return self.version >= (1, 1) and (self.header("expect") or "").lower() == "100-continue"


def _parse_request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    parts = line.split(b" ")
    if len(parts) != 3 or not all(parts):
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HTTPError(400, "malformed method in request line")
    if _TARGET_BAD.search(target):
        raise HTTPError(400, "malformed request target")
    try:
        urlsplit(target.decode("latin-1"))
    except ValueError:
        raise HTTPError(400, "malformed request target") from None
    m = _VERSION.fullmatch(version)
    if not m:
        raise HTTPError(400, "malformed HTTP version")
    ver = (int(m.group(1)), int(m.group(2)))
    if ver[0] != 1:
        raise HTTPError(400, f"unsupported HTTP version {version.decode()}")
    return method.decode(), target.decode("latin-1"), ver


def _parse_header_line(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise HTTPError(400, "obsolete line folding is not allowed")
    name, sep, value = line.partition(b":")
    if not sep:
        raise HTTPError(400, "header line without a colon")
    if not _TOKEN.fullmatch(name):
        # Covers whitespace between the name and the colon (RFC 9112 5.1).
        raise HTTPError(400, "invalid header name")
    value = value.strip(b" \t")
    if _BAD_VALUE_BYTE.search(value):
        raise HTTPError(400, "invalid character in header value")
    return name.decode("ascii").lower(), value.decode("latin-1")


def parse_head(data: bytes, limits: Limits) -> Request:
    """Parse a complete request head (request line and fields, without the blank line)."""
    lines = [ln[:-1] if ln.endswith(b"\r") else ln for ln in data.split(b"\n")]
    if any(b"\r" in ln for ln in lines):
        raise HTTPError(400, "bare CR in request head")
    if len(lines[0]) > limits.max_request_line:
        raise HTTPError(414, "request line too long")
    method, target, version = _parse_request_line(lines[0])
    fields = [_parse_header_line(ln) for ln in lines[1:]]
    if len(fields) > limits.max_header_count:
        raise HTTPError(431, f"more than {limits.max_header_count} header fields")
    req = Request(method, target, version, fields)
    _check_framing(req, limits)
    return req


def _check_framing(req: Request, limits: Limits) -> None:
    """Decide how the body is delimited, refusing anything ambiguous (smuggling)."""
    hosts = [v for k, v in req.headers if k == "host"]
    if len(hosts) > 1:
        raise HTTPError(400, "more than one Host header")
    if req.version >= (1, 1) and not hosts:
        raise HTTPError(400, "HTTP/1.1 requires a Host header")
    te = req.header("transfer-encoding")
    cl = [v for k, v in req.headers if k == "content-length"]
    if te is not None and cl:
        raise HTTPError(400, "both Content-Length and Transfer-Encoding")
    if te is not None:
        if req.version < (1, 1):
            raise HTTPError(400, "Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip().lower() for c in te.split(",")]
        if codings != ["chunked"]:
            raise HTTPError(501, f"unsupported transfer coding: {te}")
        req.chunked = True
        return
    if cl:
        values = {v.strip() for item in cl for v in item.split(",")}
        if len(values) != 1:
            raise HTTPError(400, "conflicting Content-Length values")
        value = values.pop()
        if not value.isascii() or not value.isdigit() or len(value) > 20:
            raise HTTPError(400, "invalid Content-Length")
        length = int(value)
        if length > limits.max_body:
            raise HTTPError(413, f"request body larger than {limits.max_body} bytes")
        req.content_length = length
    else:
        req.content_length = 0


class ChunkedDecoder:
    """Decodes a chunked body incrementally; chunk extensions and trailers are ignored."""

    _MAX_LINE = 4096

    def __init__(self, max_body: int):
        self.max_body = max_body
        self.body = bytearray()
        self.done = False
        self._state = "size"  # size -> data -> data_end -> size ... -> trailer
        self._remaining = 0

    def feed(self, buf: bytearray) -> None:
        """Consume what it can from the front of `buf`."""
        while not self.done:
            if self._state == "data":
                if not buf:
                    return
                take = min(self._remaining, len(buf))
                self.body += buf[:take]
                del buf[:take]
                self._remaining -= take
                if self._remaining == 0:
                    self._state = "data_end"
                continue
            line = self._take_line(buf)
            if line is None:
                return
            if self._state == "size":
                m = _CHUNK_SIZE.fullmatch(line)
                if not m or len(m.group(1)) > 16:
                    raise HTTPError(400, "invalid chunk size")
                size = int(m.group(1), 16)
                if len(self.body) + size > self.max_body:
                    raise HTTPError(413, f"request body larger than {self.max_body} bytes")
                self._remaining = size
                self._state = "data" if size else "trailer"
            elif self._state == "data_end":
                if line:
                    raise HTTPError(400, "chunk data not followed by CRLF")
                self._state = "size"
            else:  # trailer fields until an empty line
                if not line:
                    self.done = True
                elif line[:1] in (b" ", b"\t") or b":" not in line:
                    raise HTTPError(400, "invalid trailer field")

    def _take_line(self, buf: bytearray) -> bytes | None:
        end = buf.find(b"\n")
        if end < 0:
            if len(buf) > self._MAX_LINE:
                raise HTTPError(400, "chunk line too long")
            return None
        line = bytes(buf[:end])
        del buf[: end + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        if b"\r" in line or len(line) > self._MAX_LINE:
            raise HTTPError(400, "invalid chunk framing")
        return line


class RequestParser:
    """Incremental request parser: feed bytes, then ask for the head and the body.

    Pipelined requests stay in the buffer until the previous one is complete.
    """

    def __init__(self, limits: Limits):
        self.limits = limits
        self.buffer = bytearray()
        self._head: Request | None = None
        self._chunked: ChunkedDecoder | None = None

    def feed(self, data: bytes) -> None:
        self.buffer += data

    @property
    def started(self) -> bool:
        """True once any byte of the next request has arrived."""
        return self._head is not None or bool(self.buffer.lstrip(b"\r\n"))

    def head(self) -> Request | None:
        if self._head is not None:
            return self._head
        # RFC 9112 2.2: ignore empty lines before a request line.
        while self.buffer[:2] == b"\r\n" or self.buffer[:1] == b"\n":
            del self.buffer[: 2 if self.buffer[:1] == b"\r" else 1]
        m = _HEAD_END.search(self.buffer)
        if m is None:
            # Line-ending bytes at the end may be the start of a terminator: not counted.
            first_line_end = self.buffer.find(b"\n")
            first_line = self.buffer if first_line_end < 0 else self.buffer[:first_line_end]
            if len(first_line.rstrip(b"\r")) > self.limits.max_request_line:
                raise HTTPError(414, "request line too long")
            if len(self.buffer.rstrip(b"\r\n")) > self.limits.max_header_bytes:
                raise HTTPError(431, "request header section too large")
            return None
        if m.start() > self.limits.max_header_bytes:
            raise HTTPError(431, "request header section too large")
        raw = bytes(self.buffer[: m.start()])
        del self.buffer[: m.end()]
        self._head = parse_head(raw, self.limits)
        if self._head.chunked:
            self._chunked = ChunkedDecoder(self.limits.max_body)
        return self._head

    def body(self) -> bytes | None:
        """The complete body of the current request, or None until it has arrived.

        Returning it resets the parser for the next request.
        """
        req = self._head
        assert req is not None, "head() first"
        if self._chunked is not None:
            self._chunked.feed(self.buffer)
            if not self._chunked.done:
                return None
            body = bytes(self._chunked.body)
        else:
            n = req.content_length or 0
            if len(self.buffer) < n:
                return None
            body = bytes(self.buffer[:n])
            del self.buffer[:n]
        self._head = None
        self._chunked = None
        return body


# ---------------------------------------------------------------------------
# Encoding responses (pure)


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def encode_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason(status)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body. Empty data would end the body, so it encodes to nothing."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"


# Characters Python's str.splitlines() (so httpx's iter_lines, which the official
# `ollama` client reads NDJSON with) takes for line ends, which JSON leaves raw: a
# reply holding one was cut into two halves that are no JSON. Escaped, they decode
# the same.
_LINE_BREAKING = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


def json_bytes(obj) -> bytes:
    # Error messages echo what clients sent: a lone surrogate (from a JSON escape) has no
    # UTF-8 form, and backslashreplace writes it as the JSON escape it came from.
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    if "\x85" in text or "\u2028" in text or "\u2029" in text:
        text = text.translate(_LINE_BREAKING)
    return text.encode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------
# Routing

Handler = Callable[[Request, "ResponseWriter"], Awaitable[None]]


def error_body(path: str, message: str, status: int) -> dict:
    """The body of an error reply, unless the application shapes it (Router.error_shape)."""
    return {"error": message}


class Router:
    """Exact paths, plus prefixes (`add_prefix`) for a folder of files."""

    def __init__(self):
        self._routes: dict[str, dict[str, Handler]] = {}
        self._prefixes: dict[str, dict[str, Handler]] = {}
        # (path, message, status) -> the body of every error reply for that path, the
        # server's own (404, 405, 413...) included: an application whose clients expect
        # another shape under some paths sets this.
        self.error_shape: Callable[[str, str, int], dict] = error_body

    def add(self, method: str, path: str, handler: Handler) -> None:
        self._routes.setdefault(path, {})[method] = handler

    def add_prefix(self, method: str, prefix: str, handler: Handler) -> None:
        self._prefixes.setdefault(prefix, {})[method] = handler

    def resolve(self, method: str, path: str) -> Handler:
        return self.match(method, path)[0]

    def match(self, method: str, path: str) -> tuple[Handler, str]:
        """The handler and the route it was registered under (the path or its prefix)."""
        route, methods = path, self._routes.get(path)
        if methods is None:
            matches = [p for p in self._prefixes if path.startswith(p)]
            route = max(matches, key=len) if matches else path
            methods = self._prefixes[route] if matches else None
        if methods is None:
            raise HTTPError(404, f"not found: {path}")
        if method in methods:
            return methods[method], route
        if method == "HEAD" and "GET" in methods:
            return methods["GET"], route
        allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
        raise HTTPError(405, f"method {method} not allowed on {path}", [("Allow", ", ".join(allowed))])


# ---------------------------------------------------------------------------
# The connection layer


class ClientGone(Exception):
    """The client closed the connection or stopped reading."""


class ResponseWriter:
    """How a handler answers: one whole response, or a chunked stream."""

    def __init__(self, conn: "_Connection", request: Request):
        self._conn = conn
        self._request = request
        self._head_only = request.method == "HEAD"
        self.status = 0
        self.started = False
        self.finished = False
        self.keep_alive = request.keep_alive
        self.extra_headers: list[tuple[str, str]] = []  # added to whatever response is sent

    @property
    def client_gone(self) -> bool:
        return self._conn.closed

    def on_disconnect(self, callback: Callable[[], None]) -> None:
        """Call `callback` (once) if the client goes away before the response ends,
        at once if it already has (a client may close before its handler gets here)."""
        if self._conn.closed:
            callback()
        else:
            self._conn.disconnect_callbacks.append(callback)

    def _common_headers(self) -> list[tuple[str, str]]:
        keep = self.keep_alive and not self._conn.server.draining
        self.keep_alive = keep
        return [("Date", _http_date()), ("Server", "MiniVault"),
                ("Connection", "keep-alive" if keep else "close")] + self.extra_headers

    async def send(self, status: int, body: bytes, content_type: str,
                   headers: list[tuple[str, str]] | None = None) -> None:
        assert not self.started
        self.started = True
        self.status = status
        framing = [] if status in (204, 304) else [("Content-Type", content_type),
                                                   ("Content-Length", str(len(body)))]
        hdrs = self._common_headers() + framing + (headers or [])
        data = encode_head(status, hdrs) + (b"" if self._head_only else body)
        await self._conn.write(data)
        self.finished = True

    async def send_json(self, status: int, obj, headers: list[tuple[str, str]] | None = None) -> None:
        await self.send(status, json_bytes(obj), "application/json", headers)

    async def start_stream(self, status: int, content_type: str,
                           headers: list[tuple[str, str]] | None = None) -> None:
        assert not self.started
        self.started = True
        self.status = status
        hdrs = self._common_headers() + [("Content-Type", content_type),
                                         ("Transfer-Encoding", "chunked")] + (headers or [])
        await self._conn.write(encode_head(status, hdrs))

    async def write(self, data: bytes) -> None:
        """Send one chunk; writes made in one event-loop iteration go out together (_Connection.write)."""
        if self._head_only or not data:
            return
        await self._conn.write(encode_chunk(data))

    def write_now(self, data: bytes) -> bool:
        """write without waiting: False when the client's socket is backed up (await
        write for the next chunk then)."""
        if self._head_only or not data:
            return True
        return self._conn.write_now(encode_chunk(data))

    async def end(self) -> None:
        if self.finished:
            return
        self.finished = True
        if not self._head_only:
            await self._conn.write(LAST_CHUNK)


def _http_date() -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())


# Statuses after which the connection cannot be trusted to be in step: close it.
CLOSING_STATUSES = frozenset({408, 413, 414, 431, 501})


def _refuse_content_coding(request: Request) -> None:
    """415 for a compressed body (Content-Encoding: gzip...): handlers read bodies as
    they are, and would call gzip bytes invalid UTF-8."""
    coding = request.header("content-encoding")
    if coding is not None and coding.strip().lower() not in ("", "identity"):
        raise HTTPError(415, f"Content-Encoding {coding} is not supported: send the body uncompressed")


SHUTTING_DOWN = "server is shutting down"


def _refusal(err: HTTPError) -> Handler:
    """A handler that refuses with `err` (a well-formed request for no route)."""
    async def refuse(request: Request, writer: "ResponseWriter") -> None:
        raise err
    return refuse


class _Connection(asyncio.Protocol):
    """One client connection: reads requests in order and runs their handlers."""

    _READ_HIGH_WATER = 256 * 1024
    _COALESCE_LIMIT = 64 * 1024  # hand queued bytes to the transport at least this often

    def __init__(self, server: "HTTPServer"):
        self.server = server
        self.limits = server.limits
        self.parser = RequestParser(self.limits)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle = True  # between requests: safe to close on shutdown
        self.disconnect_callbacks: list[Callable[[], None]] = []
        self._data_event = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._out: list[bytes] = []  # written, not yet handed to the transport
        self._out_bytes = 0
        self._flush_scheduled = False
        self._task: asyncio.Task | None = None
        self._paused = False
        self.client = ""
        self._current: tuple[str, Request, ResponseWriter] | None = None  # (route, request, writer) being handled
        self._answered_for_shutdown = False

    # asyncio.Protocol callbacks -------------------------------------------------

    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else ""
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if len(self.server.connections) >= self.server.max_connections or self.server.draining:
            busy = "server busy: too many connections" if not self.server.draining else SHUTTING_DOWN
            transport.write(self._error_bytes(HTTPError(503, busy, [("Retry-After", "1")]), ""))
            transport.close()
            self.closed = True
            return
        self.server.connections.add(self)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def data_received(self, data):
        self.parser.feed(data)
        if len(self.parser.buffer) > self._READ_HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._data_event.set()

    def eof_received(self):
        # A half-closed client is treated as gone (as uvicorn does).
        return False

    def connection_lost(self, exc):
        self.closed = True
        self.server.connections.discard(self)
        self._data_event.set()
        self._can_write.set()
        callbacks, self.disconnect_callbacks = self.disconnect_callbacks, []
        for cb in callbacks:
            try:
                cb()
            except Exception:
                log.exception("disconnect callback failed")

    def pause_writing(self):
        self._can_write.clear()

    def resume_writing(self):
        self._can_write.set()

    # I/O helpers -------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Queue bytes for the client and wait while its socket is backed up."""
        if not self.write_now(data):
            try:
                await asyncio.wait_for(self._can_write.wait(), self.limits.write_timeout)
            except asyncio.TimeoutError:
                log.warning("client %s stopped reading for %.0fs; dropping it",
                            self.client, self.limits.write_timeout)
                self.abort()
            if self.closed:
                raise ClientGone()

    def write_now(self, data: bytes) -> bool:
        """Queue bytes for the client without waiting; False when its socket is backed
        up (then wait as write does before writing more).

        Writes made in one event-loop iteration go out in one send: a token that
        arrives alone is still sent at once, but a burst costs one syscall, not one
        per chunk.
        """
        if self.closed:
            raise ClientGone()
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= self._COALESCE_LIMIT:
            self.flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self.server.flush_soon(self)
        return self._can_write.is_set()

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.closed and not self.transport.is_closing():
            self.transport.write(b"".join(self._out))
        self._out.clear()
        self._out_bytes = 0

    def close(self) -> None:
        """Close after sending what is queued."""
        if self.transport is not None and not self.transport.is_closing():
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def end_for_shutdown(self) -> None:
        """The drain time is over: a request whose response has not begun (still queued,
        or still arriving) is answered 503, as any request refused for shutting down is;
        a response under way can only be cut."""
        if self.transport is None or self.transport.is_closing():
            return
        route, request, writer = self._current or ("-", None, None)
        if writer is not None and writer.started:
            self.abort()
            return
        self._observe(route, 503)
        self._answered_for_shutdown = True  # what its handler sends later is not a response
        path = request.path if request is not None else ""
        self.flush()  # the end of a reply finished this iteration goes out first
        self.transport.write(self._error_bytes(HTTPError(503, SHUTTING_DOWN, [("Retry-After", "1")]), path))
        self.transport.close()  # whatever the handler writes later is dropped (flush: closing)

    async def _wait_data(self, deadline: float) -> None:
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._data_event.clear()
        timeout = deadline - asyncio.get_running_loop().time()
        if timeout <= 0:
            raise asyncio.TimeoutError()
        await asyncio.wait_for(self._data_event.wait(), timeout)

    async def _read_head(self) -> Request | None:
        loop = asyncio.get_running_loop()
        idle_deadline = loop.time() + self.limits.keepalive_timeout
        head_deadline = None
        while True:
            head = self.parser.head()
            if head is not None:
                return head
            if self.closed:
                return None
            if self.parser.started and head_deadline is None:
                head_deadline = loop.time() + self.limits.header_timeout
                self.idle = False
            try:
                await self._wait_data(head_deadline or idle_deadline)
            except asyncio.TimeoutError:
                if head_deadline is None:
                    return None  # idle keep-alive connection: close quietly
                raise HTTPError(408, "request headers not received in time")

    async def _read_body(self) -> bytes:
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout
        while True:
            body = self.parser.body()
            if body is not None:
                if self._paused and len(self.parser.buffer) <= self._READ_HIGH_WATER:
                    # A body over the high-water mark left reading paused: resume, or a
                    # client that leaves while its handler runs goes unnoticed (its
                    # generation ran to the end).
                    self._paused = False
                    self.transport.resume_reading()
                return body
            if self.closed:
                raise ClientGone()
            try:
                await self._wait_data(deadline)
            except asyncio.TimeoutError:
                raise HTTPError(408, "request body not received in time")

    def _observe(self, route: str, status: int) -> None:
        if self.server.observer is not None:
            try:
                self.server.observer(route, status)
            except Exception:
                log.exception("response observer failed")

    async def _send_error(self, err: HTTPError, route: str = "-", request: Request | None = None) -> None:
        """A protocol error: the framing of what follows is unknown, so the connection closes."""
        self._observe(route, err.status)
        try:
            await self.write(self._error_bytes(err, request.path if request is not None else ""))
        except ClientGone:
            pass

    def _error_bytes(self, err: HTTPError, path: str) -> bytes:
        """A whole error response in the path's error shape, closing the connection."""
        body = json_bytes(self.server.router.error_shape(path, err.message, err.status))
        headers = [("Date", _http_date()), ("Server", "MiniVault"),
                   ("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                   ("Connection", "close")] + err.headers
        return encode_head(err.status, headers) + body

    # The request loop --------------------------------------------------------------

    async def _run(self) -> None:
        try:
            while not self.closed:
                self.idle = True
                if self.server.draining:
                    if self.parser.started:  # a pipelined request that will not be served
                        await self._send_error(HTTPError(503, SHUTTING_DOWN, [("Retry-After", "1")]))
                    break
                request, route = None, "-"  # "-": no route matched (yet)
                try:
                    request = await self._read_head()
                    if request is None:
                        break
                    self.idle = False
                    request.client = self.client
                    try:
                        handler, route = self.server.router.match(request.method, request.path)
                        _refuse_content_coding(request)
                    except HTTPError as err:  # 404, 405 or 415
                        if request.expects_continue:
                            # It waits for 100 Continue before sending its body, which may
                            # or may not follow our answer: only closing is safe.
                            raise
                        # A well-formed request: its body is read and dropped like any
                        # other's, so the connection stays in step and is kept.
                        handler = _refusal(err)
                    if request.expects_continue and self.parser.buffer == b"":
                        await self.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    request.body = await self._read_body()
                except HTTPError as err:
                    await self._send_error(err, route, request)
                    break
                writer = ResponseWriter(self, request)
                await self._call(handler, route, request, writer)
                if not writer.keep_alive or self.closed:
                    break
        except ClientGone:
            pass
        except Exception:
            log.exception("connection handler crashed")
        finally:
            self.disconnect_callbacks.clear()
            self.close()
            self.server.connections.discard(self)

    async def _call(self, handler: Handler, route: str, request: Request, writer: ResponseWriter) -> None:
        self._current = (route, request, writer)
        try:
            await handler(request, writer)
            if writer.started and not writer.finished:
                await writer.end()
        except ClientGone:
            writer.keep_alive = False
        except Exception as exc:
            err = exc if isinstance(exc, HTTPError) else None
            if err is None:
                log.exception("handler for %s %s failed", request.method, request.path)
                err = HTTPError(500, "internal server error")
                writer.keep_alive = False  # a bug: let the client start afresh
            await self._send_handler_error(err, request, writer)
        finally:
            self._current = None
            self.disconnect_callbacks.clear()
            if writer.started and not self._answered_for_shutdown:
                self._observe(route, writer.status)

    async def _send_handler_error(self, err: HTTPError, request: Request, writer: ResponseWriter) -> None:
        """Answer a request (read whole) that its handler refused, as its success would be
        sent: with the headers the handler added (CORS, rate limit), keeping the connection."""
        if err.status in CLOSING_STATUSES:
            writer.keep_alive = False
        if writer.started:
            writer.keep_alive = False  # mid-reply: a cut connection is the only signal left
            return
        body = self.server.router.error_shape(request.path, err.message, err.status)
        try:
            await writer.send_json(err.status, body, err.headers)
        except ClientGone:
            writer.keep_alive = False


class HTTPServer:
    def __init__(self, router: Router, limits: Limits | None = None, max_connections: int = 1024):
        self.router = router
        # Called with (route, status) once per response; route is what the router
        # matched (a prefix for static files, "-" when nothing did), so the set of
        # labels stays bounded whatever paths clients send.
        self.observer: Callable[[str, int], None] | None = None
        self.limits = limits or Limits()
        self.max_connections = max_connections
        self.connections: set[_Connection] = set()
        self.draining = False
        self._server: asyncio.AbstractServer | None = None
        self._to_flush: list[_Connection] = []  # written to in this loop iteration

    def flush_soon(self, conn: "_Connection") -> None:
        """Hand conn's queued bytes to its transport at the end of this loop iteration,
        with every other connection written to in it: one callback an iteration for all
        of them, not one a connection (a decode step writes to every stream at once)."""
        if not self._to_flush:
            asyncio.get_running_loop().call_soon(self._flush_all)
        self._to_flush.append(conn)

    def _flush_all(self) -> None:
        conns, self._to_flush = self._to_flush, []
        for conn in conns:
            try:
                conn.flush()
            except Exception:  # one connection's failure is its own
                log.exception("flushing a connection failed")

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port,
                                                reuse_address=True, backlog=2048)

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def shutdown(self, timeout: float) -> None:
        """Stop accepting, close idle connections, give in-flight requests `timeout` seconds."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for conn in list(self.connections):
                if conn.idle and conn.transport is not None:
                    conn.close()
                    self.connections.discard(conn)
            if not self.connections or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.end_for_shutdown()
