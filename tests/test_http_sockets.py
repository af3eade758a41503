"""httpserver.py over real sockets, in-process, with toy handlers (no model).

Covers what a parser test cannot: pipelining, keep-alive, 100-continue, slow and
stalled clients, many idle connections, connection limits, handler crashes and
graceful shutdown.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from httpserver import HTTPServer, Limits, Router
from serverproc import _Reader, encode_request, read_response


class LiveServer:
    """An HTTPServer running on its own event loop in a background thread."""

    def __init__(self, limits: Limits, max_connections: int = 1024):
        self.router = Router()
        self.loop = asyncio.new_event_loop()
        self.server = HTTPServer(self.router, limits, max_connections)
        self.stalled_writer_gone = threading.Event()
        self.stream_release = asyncio.Event()
        self._add_routes()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.call(self.server.start("127.0.0.1", 0))
        self.port = self.server.port

    def call(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _add_routes(self) -> None:
        async def echo(request, writer):
            await writer.send(200, request.body, "application/octet-stream",
                              [("X-Method", request.method), ("X-Path", request.path)])

        async def crash(request, writer):
            raise RuntimeError("secret internal detail /srv/path")

        async def crash_mid_stream(request, writer):
            await writer.start_stream(200, "application/x-ndjson")
            await writer.write(b'{"response": "a"}\n')
            raise RuntimeError("boom")

        async def firehose(request, writer):
            # Far more than socket buffers hold: a client that does not read stalls us.
            await writer.start_stream(200, "application/octet-stream")
            try:
                for _ in range(10_000):
                    await writer.write(b"x" * 65536)
            finally:
                if writer.client_gone:
                    self.stalled_writer_gone.set()

        async def slow_stream(request, writer):
            await writer.start_stream(200, "application/x-ndjson")
            await writer.write(b'{"response": "first"}\n')
            await self.stream_release.wait()
            await writer.write(b'{"response": "last"}\n')
            await writer.end()

        self.router.add("POST", "/echo", echo)
        self.router.add("GET", "/echo", echo)
        self.router.add("GET", "/crash", crash)
        self.router.add("GET", "/crash-mid-stream", crash_mid_stream)
        self.router.add("GET", "/firehose", firehose)
        self.router.add("GET", "/slow", slow_stream)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def close(self) -> None:
        self.call(self.server.shutdown(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def live():
    srv = LiveServer(Limits(header_timeout=1.0, keepalive_timeout=1.0, body_timeout=1.0,
                            write_timeout=1.0, max_body=1000))
    yield srv
    srv.close()


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_pipelined_requests_are_answered_in_order(live):
    with live.connect() as sock:
        sock.sendall(encode_request("POST", "/echo", b"one") + encode_request("POST", "/echo", b"two")
                     + encode_request("GET", "/echo?x=1"))
        reader = _Reader(sock)
        bodies = [read_response(sock, reader).body for _ in range(3)]
    assert bodies == [b"one", b"two", b""]


def test_connection_close_is_honoured(live):
    with live.connect() as sock:
        sock.sendall(encode_request("GET", "/echo", headers={"Connection": "close"}))
        resp = read_response(sock)
        assert resp.headers["connection"] == "close"
        assert closed_by_server(sock)


def test_http10_closes_by_default_and_keeps_alive_when_asked(live):
    with live.connect() as sock:
        sock.sendall(b"GET /echo HTTP/1.0\r\n\r\n")
        assert read_response(sock).status == 200
        assert closed_by_server(sock)
    with live.connect() as sock:
        reader = _Reader(sock)
        for _ in range(2):
            sock.sendall(b"GET /echo HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            assert read_response(sock, reader).headers["connection"] == "keep-alive"


def test_expect_100_continue(live):
    with live.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
        reader = _Reader(sock)
        assert reader.line() == b"HTTP/1.1 100 Continue"
        assert reader.line() == b""
        sock.sendall(b"hello")
        assert read_response(sock, reader).body == b"hello"


def test_expect_100_continue_with_a_body_too_large_gets_413_instead(live):
    with live.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n")
        resp = read_response(sock)
    assert resp.status == 413 and b"error" in resp.body


def test_expect_100_continue_on_an_unknown_path_gets_404_without_waiting_for_the_body():
    srv = LiveServer(Limits(body_timeout=60.0))
    try:
        with srv.connect() as sock:
            sock.settimeout(10)  # far less than the body timeout: the 404 must not wait for it
            sock.sendall(b"POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n")
            resp = read_response(sock)
        assert resp.status == 404 and b"error" in resp.body
    finally:
        srv.close()


def test_chunked_request_body(live):
    with live.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n")
        assert read_response(sock).body == b"abcde"


def test_slowloris_headers_get_408_and_close(live):
    with live.connect() as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n")  # never finishes its head
        resp = read_response(sock)
        assert resp.status == 408 and b"error" in resp.body
        assert closed_by_server(sock)


def test_trickling_body_is_cut_off(live):
    with live.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        assert read_response(sock).status == 408


def test_idle_keep_alive_connection_is_closed(live):
    with live.connect() as sock:
        sock.sendall(encode_request("GET", "/echo"))
        assert read_response(sock).status == 200
        assert closed_by_server(sock)  # after keepalive_timeout with nothing sent


def test_bad_framing_gets_400_and_close(live):
    with live.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        resp = read_response(sock)
        assert resp.status == 400 and resp.headers["connection"] == "close"
        assert closed_by_server(sock)


def test_handler_crash_is_a_500_json_without_details_and_the_server_goes_on(live):
    resp = _one(live, "GET", "/crash")
    assert resp.status == 500
    assert resp.body == b'{"error":"internal server error"}'
    assert _one(live, "GET", "/echo").status == 200


def test_crash_mid_stream_closes_that_connection_only(live):
    with live.connect() as sock:
        sock.sendall(encode_request("GET", "/crash-mid-stream"))
        reader = _Reader(sock)
        reader.line()  # status line: the stream had started
        while reader.line():
            pass
        assert reader.line() == b"12"  # the one chunk that was sent
        reader.exactly(18 + 2)
        # No last chunk: the connection is closed, so the client sees a cut stream.
        with pytest.raises(ConnectionError):
            reader.line()
    assert _one(live, "GET", "/echo").status == 200


def test_stalled_reader_is_dropped_and_does_not_block_others(live):
    with live.connect() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(encode_request("GET", "/firehose"))
        # While it stalls, others are served.
        assert _one(live, "GET", "/echo").status == 200
        assert live.stalled_writer_gone.wait(30), "the stalled stream was never dropped"


def test_many_idle_connections_do_not_delay_a_request():
    srv = LiveServer(Limits(keepalive_timeout=60.0, header_timeout=60.0))
    idle = [srv.connect() for _ in range(500)]
    try:
        assert _one(srv, "GET", "/echo").status == 200
    finally:
        for s in idle:
            s.close()
        srv.close()


def test_connections_over_the_limit_get_503():
    srv = LiveServer(Limits(keepalive_timeout=60.0, header_timeout=60.0), max_connections=3)
    held = [srv.connect() for _ in range(3)]
    try:
        # Make sure the server has accepted the three before the fourth arrives.
        for s in held:
            s.sendall(encode_request("GET", "/echo"))
            read_response(s)
        with srv.connect() as extra:
            resp = read_response(extra)
        assert resp.status == 503 and "retry-after" in resp.headers
    finally:
        for s in held:
            s.close()
        srv.close()


def test_shutdown_lets_a_stream_finish_and_closes_idle_connections(live):
    idle = live.connect()
    streaming = live.connect()
    streaming.sendall(encode_request("GET", "/slow"))
    reader = _Reader(streaming)
    first = read_response(streaming, reader, max_chunks=1)
    assert first.chunks == [b'{"response": "first"}\n']
    shutdown = asyncio.run_coroutine_threadsafe(live.server.shutdown(10.0), live.loop)
    assert closed_by_server(idle)
    live.loop.call_soon_threadsafe(live.stream_release.set)
    assert reader.line() == b"%x" % len(b'{"response": "last"}\n')  # the rest of the stream still arrives
    shutdown.result(10)
    streaming.close()
    idle.close()


def _one(srv, method: str, path: str):
    with srv.connect() as sock:
        sock.sendall(encode_request(method, path))
        return read_response(sock)
