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

from api import Api, Policy
from httpserver import HTTPError, HTTPServer, Limits, Router
from metrics import Metrics
from ratelimit import RateLimiter
from serverproc import _Reader, encode_request, iter_chunks, read_response


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

        async def refuse(request, writer):
            # As the API's guard does: headers for whatever reply goes out, then a refusal.
            writer.extra_headers.append(("X-Extra", "kept"))
            raise HTTPError(400, "refused by the handler")

        self.router.add("POST", "/refuse", refuse)
        self.router.add("POST", "/echo", echo)
        self.router.add("GET", "/echo", echo)
        self.router.add("GET", "/crash", crash)
        self.router.add("GET", "/crash-mid-stream", crash_mid_stream)
        self.router.add("GET", "/firehose", firehose)
        self.router.add("GET", "/slow", slow_stream)

        async def queued(request, writer):  # as a generation waiting for a batch slot
            await self.stream_release.wait()
            await writer.send(200, b"served", "text/plain")

        self.router.add("GET", "/queued", queued)

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
            # Its body may or may not follow the 404: only closing keeps us in step.
            assert resp.headers["connection"] == "close" and closed_by_server(sock)
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


def test_a_request_not_answered_when_the_drain_time_ends_gets_503_not_a_cut_connection(live):
    """It used to be aborted: the client saw its connection reset with no response."""
    waiting = live.connect()
    waiting.sendall(encode_request("GET", "/queued"))
    live.call(wait_for_handlers(live.server, 1))
    live.call(live.server.shutdown(0.0))
    resp = read_response(waiting)
    assert resp.status == 503 and resp.headers["retry-after"] and resp.headers["connection"] == "close"
    assert resp.json() == {"error": "server is shutting down"}
    assert closed_by_server(waiting)
    live.loop.call_soon_threadsafe(live.stream_release.set)  # its handler's late answer goes nowhere
    waiting.close()


def test_a_response_under_way_when_the_drain_time_ends_is_cut(live):
    streaming = live.connect()
    streaming.sendall(encode_request("GET", "/slow"))
    reader = _Reader(streaming)
    assert read_response(streaming, reader, max_chunks=1).status == 200
    live.call(live.server.shutdown(0.0))
    with pytest.raises((ConnectionError, OSError)):
        list(iter_chunks(reader))
    streaming.close()


def test_a_pipelined_request_behind_one_that_finishes_during_the_drain_gets_503(live):
    conn = live.connect()
    conn.sendall(encode_request("GET", "/slow") + encode_request("GET", "/echo"))
    reader = _Reader(conn)
    assert read_response(conn, reader, max_chunks=1).status == 200
    shutdown = asyncio.run_coroutine_threadsafe(live.server.shutdown(10.0), live.loop)
    live.loop.call_soon_threadsafe(live.stream_release.set)
    assert list(iter_chunks(reader)) == [b'{"response": "last"}\n']
    second = read_response(conn, reader)
    assert second.status == 503 and second.json() == {"error": "server is shutting down"}
    assert closed_by_server(conn)
    shutdown.result(10)
    conn.close()


async def wait_for_handlers(server, n: int) -> None:
    while sum(c._current is not None for c in server.connections) < n:
        await asyncio.sleep(0.001)


def _one(srv, method: str, path: str):
    with srv.connect() as sock:
        sock.sendall(encode_request(method, path))
        return read_response(sock)


# ---------------------------------------------------------------------------
# Refusals of well-formed requests keep the connection (issue 11)


def test_pipelined_unknown_paths_each_get_a_404_on_one_connection(live):
    with live.connect() as sock:
        sock.sendall(encode_request("GET", "/nope") + encode_request("GET", "/nope") + encode_request("GET", "/echo"))
        reader = _Reader(sock)
        statuses = [read_response(sock, reader) for _ in range(3)]
    assert [r.status for r in statuses] == [404, 404, 200]
    assert statuses[0].headers["connection"] == "keep-alive"


def test_a_404_or_405_with_a_body_drops_the_body_and_keeps_the_connection(live):
    with live.connect() as sock:
        sock.sendall(encode_request("POST", "/nope", b"dropped") + encode_request("DELETE", "/echo", b"also")
                     + encode_request("POST", "/echo", b"kept"))
        reader = _Reader(sock)
        missing, wrong, echoed = (read_response(sock, reader) for _ in range(3))
    assert (missing.status, wrong.status) == (404, 405) and wrong.headers["allow"] == "GET, HEAD, POST"
    assert echoed.body == b"kept"


def test_a_compressed_body_is_a_415_whose_body_is_dropped_and_the_connection_kept(live):
    import gzip

    with live.connect() as sock:
        sock.sendall(encode_request("POST", "/echo", gzip.compress(b"{}"), headers={"Content-Encoding": "gzip"})
                     + encode_request("POST", "/echo", b"plain", headers={"Content-Encoding": "identity"}))
        reader = _Reader(sock)
        refused, echoed = read_response(sock, reader), read_response(sock, reader)
    assert refused.status == 415 and "Content-Encoding gzip" in refused.json()["error"]
    assert echoed.body == b"plain"


def test_handler_refusal_carries_the_handlers_headers_and_keeps_the_connection(live):
    with live.connect() as sock:
        sock.sendall(encode_request("POST", "/refuse", b"{}") + encode_request("GET", "/echo"))
        reader = _Reader(sock)
        refused = read_response(sock, reader)
        assert (refused.status, refused.json()) == (400, {"error": "refused by the handler"})
        assert refused.headers["x-extra"] == "kept" and refused.headers["connection"] == "keep-alive"
        assert read_response(sock, reader).status == 200


def test_handler_refusal_still_closes_when_the_request_asked_to(live):
    with live.connect() as sock:
        sock.sendall(encode_request("POST", "/refuse", b"{}", headers={"Connection": "close"}))
        assert read_response(sock).headers["connection"] == "close"
        assert closed_by_server(sock)


def test_the_router_error_shape_shapes_every_error_reply(live):
    live.router.error_shape = lambda path, message, status: {"path": path, "status": status}
    with live.connect() as sock:
        sock.sendall(encode_request("GET", "/nope") + encode_request("PUT", "/echo")
                     + encode_request("POST", "/refuse", b"{}")
                     + b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
        reader = _Reader(sock)
        bodies = [read_response(sock, reader).json() for _ in range(4)]
    assert bodies == [{"path": "/nope", "status": 404}, {"path": "/echo", "status": 405},
                      {"path": "/refuse", "status": 400}, {"path": "/echo", "status": 400}]


# ---------------------------------------------------------------------------
# The API's guard over real sockets, with a fake engine (no model)


class _FakeEngine:
    model_name, ready, load_error, queued, active_count, load_seconds = "m", True, None, 0, 0, 1.0

    def __init__(self):
        self.submitted = []

    def submit(self, gen):
        self.submitted.append(gen)
        raise AssertionError("the guard should have refused this request")


class _FakeLog:
    errors = 0


@pytest.fixture
def api_server():
    """A LiveServer with the API's routes, for a given Policy; yields (server, engine)."""
    servers = []

    def start(policy: Policy):
        srv = LiveServer(Limits())
        engine = _FakeEngine()
        Api(engine, _FakeLog(), policy, Metrics()).routes(srv.router)
        servers.append(srv)
        return srv, engine

    yield start
    for srv in servers:
        srv.close()


def _ask(srv, method, path, body=None, headers=None):
    with srv.connect() as sock:
        sock.sendall(encode_request(method, path, body, headers))
        return read_response(sock)


EVIL = "http://evil.example"


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}'),
    ("/v1/completions", b'{"prompt": "hi", "temperature": "hot"}'),
    ("/v1/responses", b'{"input": "hi", "max_tokens": 5}'),
    ("/v1/embeddings", b'{"input": 5}'),
    ("/v1/chat/completions", b'{"messages": '),
])
def test_a_refused_openai_body_is_a_400_in_openai_shape_before_the_engine(api_server, path, body):
    srv, engine = api_server(Policy())
    resp = _ask(srv, "POST", path, body)
    error = resp.json()["error"]
    assert resp.status == 400 and error["type"] == "invalid_request_error" and error["message"]
    assert resp.headers["connection"] == "keep-alive" and engine.submitted == []


@pytest.mark.parametrize("path, body, field", [
    ("/api/generate", b'{"model": "m", "prompt": "hi", "images": ["aGk="]}', "'images'"),
    ("/api/chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi", "images": ["aGk="]}]}',
     "'messages[0].images'"),
    ("/api/generate", b'{"model": "m", "prompt": "hi", "think": true}', "'think'"),
])
def test_an_ollama_field_that_cannot_be_honoured_is_a_400_naming_it(api_server, path, body, field):
    srv, engine = api_server(Policy())
    resp = _ask(srv, "POST", path, body)
    assert resp.status == 400 and field in resp.json()["error"] and engine.submitted == []


def test_cross_site_simple_post_is_refused_before_the_generation_runs(api_server):
    srv, engine = api_server(Policy())
    text_plain = {"Content-Type": "text/plain", "Origin": EVIL}
    resp = _ask(srv, "POST", "/generate", b'{"prompt": "hi"}', text_plain)
    assert (resp.status, resp.json()) == (403, {"error": f"origin '{EVIL}' is not allowed"})
    assert "access-control-allow-origin" not in resp.headers
    openai = _ask(srv, "POST", "/v1/chat/completions", b'{"messages": []}', text_plain).json()
    assert openai["error"]["message"] == f"origin '{EVIL}' is not allowed"
    assert _ask(srv, "GET", "/api/version", headers={"Origin": EVIL}).status == 403
    assert engine.submitted == []


def test_requests_without_origin_or_from_allowed_and_same_origins_go_through(api_server):
    srv, _ = api_server(Policy(cors_origins=("http://localhost:*",)))
    assert _ask(srv, "GET", "/api/version").status == 200
    allowed = _ask(srv, "GET", "/api/version", headers={"Origin": "http://localhost:5173"})
    assert allowed.status == 200 and allowed.headers["access-control-allow-origin"] == "http://localhost:5173"
    own = f"127.0.0.1:{srv.port}"  # the playground's own fetches, whatever --cors-origins says
    assert _ask(srv, "GET", "/api/version", headers={"Host": own, "Origin": f"http://{own}"}).status == 200


@pytest.mark.parametrize("method, path", [("GET", "/api/tags"), ("POST", "/generate"), ("GET", "/"),
                                          ("GET", "/web/app.js"), ("OPTIONS", "/api/chat"),
                                          ("GET", "/health")])
def test_foreign_host_is_refused_on_every_route_when_bound_to_loopback(api_server, method, path):
    srv, engine = api_server(Policy(allowed_hosts=()))
    resp = _ask(srv, method, path, b'{"prompt": "hi"}' if method == "POST" else None,
                {"Host": "rebound.example:3000", "Origin": "http://localhost:5173"})
    assert resp.status == 403
    assert resp.json() == {"error": "host 'rebound.example:3000' is not allowed; "
                                    "start with --allowed-hosts rebound.example to allow it"}
    assert engine.submitted == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:3000", "localhost:3000", "[::1]:3000", "myhost.lan:80"])
def test_loopback_and_listed_hosts_are_served(api_server, host):
    srv, _ = api_server(Policy(allowed_hosts=("myhost.lan",)))
    assert _ask(srv, "GET", "/api/version", headers={"Host": host}).status == 200
    assert _ask(srv, "GET", "/", headers={"Host": host}).status == 200


def test_any_host_is_served_when_the_policy_allows_any(api_server):
    srv, _ = api_server(Policy(allowed_hosts=None))
    assert _ask(srv, "GET", "/api/version", headers={"Host": "anything.example"}).status == 200


def test_error_reply_on_generate_carries_cors_and_rate_limit_headers_and_keeps_the_connection(api_server):
    srv, _ = api_server(Policy(rate_limiter=RateLimiter(100, 60.0)))
    origin = {"Origin": "http://localhost:5173"}
    with srv.connect() as sock:
        sock.sendall(encode_request("POST", "/generate", {"prompt": ""}, origin)
                     + encode_request("GET", "/api/version", headers=origin))
        reader = _Reader(sock)
        refused = read_response(sock, reader)
        assert refused.status == 400 and "prompt" in refused.json()["error"]
        assert refused.headers["access-control-allow-origin"] == "http://localhost:5173"
        assert refused.headers["ratelimit-limit"] == "100"
        assert refused.headers["connection"] == "keep-alive"
        assert read_response(sock, reader).status == 200


def test_lone_surrogate_in_a_body_is_a_400_on_every_api(api_server):
    srv, _ = api_server(Policy())
    body = rb'{"prompt": "hi", "model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}'
    for path in ("/generate", "/api/generate", "/v1/chat/completions"):
        resp = _ask(srv, "POST", path, body)
        assert resp.status == 400 and "lone surrogate" in resp.body.decode()


def test_everything_under_v1_answers_in_openai_error_shape(api_server):
    srv, _ = api_server(Policy(api_key="k"))
    missing = _ask(srv, "GET", "/v1/nope")
    wrong = _ask(srv, "GET", "/v1/chat/completions")
    unauthorised = _ask(srv, "GET", "/v1/models")
    for resp, status in ((missing, 404), (wrong, 405), (unauthorised, 401)):
        assert resp.status == status
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert wrong.headers["allow"] == "OPTIONS, POST"
    assert missing.json()["error"]["code"] is None  # a path, not a model: no model_not_found
    assert _ask(srv, "GET", "/nope").json() == {"error": "not found: /nope"}


# ---------------------------------------------------------------------------
# Write coalescing, over stand-in transports (what each send carries)


class RecordingTransport:
    def __init__(self, fails: bool = False):
        self.sent: list[bytes] = []
        self.fails = fails

    def write(self, data: bytes) -> None:
        if self.fails:
            raise RuntimeError("this transport is broken")
        self.sent.append(data)

    def is_closing(self) -> bool:
        return False


def test_a_steps_writes_to_many_connections_go_out_one_send_each_from_one_callback():
    from httpserver import _Connection

    async def step_and_flush():
        server = HTTPServer(Router())
        conns = []
        for fails in [False, True, False, False]:
            conn = _Connection(server)
            conn.transport = RecordingTransport(fails)
            conns.append(conn)
        loop = asyncio.get_running_loop()
        scheduled = []
        real_call_soon = loop.call_soon
        loop.call_soon = lambda cb, *args, **kw: scheduled.append(cb) or real_call_soon(cb, *args, **kw)
        try:
            for piece in (b"a", b"b"):  # two tokens of one step, to every stream
                for i, conn in enumerate(conns):
                    assert conn.write_now(piece + str(i).encode())
            assert all(conn.transport.sent == [] for conn in conns)  # nothing before the iteration ends
            await asyncio.sleep(0)
        finally:
            loop.call_soon = real_call_soon
        return conns, scheduled

    conns, scheduled = asyncio.run(step_and_flush())
    flushes = [cb for cb in scheduled if "flush" in getattr(cb, "__name__", "")]
    assert len(flushes) == 1  # one flush for all four connections, not one each
    assert [conn.transport.sent for conn in conns] == [[b"a0b0"], [], [b"a2b2"], [b"a3b3"]]
