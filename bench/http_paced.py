"""The HTTP layer at GPU rates: many paced token streams, our server against uvicorn + Starlette.

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python bench/http_paced.py [--streams 64 256] [--tick-ms 20] [--seconds 10] [--tokens 128]

What it measures. Inside each server process a shared ticker stands in for the decode
step of a batched model: every tick (`--tick-ms`, 20 ms by default; 0 means as fast as
the server can) it puts one NDJSON line `{"response": " tokN"}` on the asyncio.Queue of
every open stream, and after `--tokens` tokens a final `{"done": true}` line, as the
engine hands a step's tokens to the event loop. Each server turns its queues into chunked
HTTP responses: ours with `httpserver.HTTPServer`, the other with a Starlette
StreamingResponse under uvicorn (both on asyncio's default loop, as in http_bench.py). A
load generator in this process keeps N keep-alive connections (asyncio protocols on raw
sockets), each asking for one stream after another; their first requests are spread over
one stream's length so that streams end at different ticks, as in a running server. After
a warm-up it measures, for `--seconds`:

  tokens/s     tokens the clients received;
  of ideal     that against N * 1000 / tick_ms (a slot without a token: the server fell behind);
  late ticks   ticks that started a whole interval or more after they were due (the loop
               was still busy with the tick before); the ticker then restarts its schedule
               from that moment, so the slots in between are lost, not sent in a burst;
  server CPU   utime + stime of the server process (/proc/<pid>/stat), per token and in
               % of one core;
  gap          time between two tokens of one stream as the client sees it, p50 / p95;
  client CPU   the load generator's own CPU (it shares the machine: with --tick-ms 0 it
               may be what limits tokens/s).

Why. http_bench.py writes all 200 chunks of a response at once, so our write coalescing
sends them in one syscall, which never happens when tokens come from a model. The GPU
path will deliver 20,000+ tokens/s as one token per stream per step across hundreds of
streams: one small write per stream per tick, which is what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time

from http_bench import REQUEST, free_port, wait_port  # importing it also puts the repo root on sys.path

DONE = b'{"done": true}\n'
WARMUP = 1.0  # seconds after the last connection opens, before measuring
NAMES = {"ours": "MiniVault httpserver", "uvicorn": "uvicorn + Starlette"}


class Ticker:
    """One token per open stream per tick, like one decode step of a batched model."""

    def __init__(self, tick_ms: float, tokens: int):
        self.interval = tick_ms / 1000
        self.lines = [json.dumps({"response": f" tok{i}"}).encode() + b"\n" for i in range(tokens)]
        self.streams: dict[asyncio.Queue, int] = {}  # queue -> tokens sent
        self.ticks = self.late = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def open(self) -> asyncio.Queue:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[queue] = 0
        self._wake.set()
        return queue

    def drop(self, queue: asyncio.Queue) -> None:
        self.streams.pop(queue, None)

    def stats(self) -> dict:
        return {"ticks": self.ticks, "late": self.late}

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            if not self.streams:
                self._wake.clear()
                await self._wake.wait()
                due = loop.time()
            await asyncio.sleep(max(0.0, due - loop.time()))
            now = loop.time()
            self.ticks += 1
            if self.interval and now - due >= self.interval:
                self.late += 1
                due = now
            due += self.interval
            finished = []
            for queue, sent in self.streams.items():
                queue.put_nowait(self.lines[sent])
                if sent + 1 == len(self.lines):
                    queue.put_nowait(DONE)
                    finished.append(queue)
                else:
                    self.streams[queue] = sent + 1
            for queue in finished:
                del self.streams[queue]


def serve_ours(port: int, tick_ms: float, tokens: int) -> None:
    from httpserver import HTTPServer, Limits, Router

    async def main():
        ticker = Ticker(tick_ms, tokens)

        async def generate(request, writer):
            queue = ticker.open()
            try:
                await writer.start_stream(200, "application/x-ndjson")
                while True:
                    line = await queue.get()
                    await writer.write(line)
                    if line is DONE:
                        break
                await writer.end()
            finally:
                ticker.drop(queue)

        async def stats(request, writer):
            await writer.send_json(200, ticker.stats())

        router = Router()
        router.add("POST", "/generate", generate)
        router.add("GET", "/stats", stats)
        server = HTTPServer(router, Limits())
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_uvicorn(port: int, tick_ms: float, tokens: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    ticker = Ticker(tick_ms, tokens)

    async def generate(request):
        await request.body()
        queue = ticker.open()

        async def lines():
            try:
                while True:
                    line = await queue.get()
                    yield line
                    if line is DONE:
                        return
            finally:
                ticker.drop(queue)

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def stats(request):
        return JSONResponse(ticker.stats())

    app = Starlette(routes=[Route("/generate", generate, methods=["POST"]), Route("/stats", stats)])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="asyncio", log_level="warning", access_log=False)


# ---------------------------------------------------------------------------
# The load generator


class Load:
    """What all the clients of one run saw."""

    def __init__(self):
        self.tokens = 0
        self.gaps: list[float] = []  # seconds between two tokens of one stream, while measuring
        self.measuring = False
        self.running = True
        self.error: Exception | None = None


class Client(asyncio.Protocol):
    """One keep-alive connection that asks for one stream after another and parses the
    chunked replies as they arrive (a protocol, not streams: the client shares the CPUs)."""

    def __init__(self, load: Load):
        self.load = load
        self.buf = b""
        self.in_body = False
        self.last: float | None = None  # when this stream's previous token arrived

    def connection_made(self, transport):
        self.transport = transport
        self.ask()

    def ask(self) -> None:
        self.in_body, self.last = False, None
        self.transport.write(REQUEST)

    def data_received(self, data):
        try:
            self.parse(self.buf + data, time.perf_counter())
        except Exception as exc:
            self.fail(exc)

    def parse(self, buf: bytes, now: float) -> None:
        load, pos = self.load, 0
        while True:
            if not self.in_body:
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                head = buf[pos:end].lower()
                if not head.startswith(b"http/1.1 200 ") or b"transfer-encoding: chunked" not in head:
                    raise RuntimeError(f"unexpected reply: {head[:200]!r}")
                self.in_body, pos = True, end + 4
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                break
            size = int(buf[pos:eol], 16)
            end = eol + 2 + size + 2
            if len(buf) < end:
                break
            pos = end
            if size == 0:  # the response is complete
                if load.running:
                    self.ask()
                continue
            tokens = buf.count(b'"response"', eol + 2, eol + 2 + size)
            load.tokens += tokens
            if tokens and load.measuring:
                if self.last is not None:
                    load.gaps.append(now - self.last)
                load.gaps.extend([0.0] * (tokens - 1))
            if tokens:
                self.last = now
        self.buf = buf[pos:]

    def connection_lost(self, exc):
        if self.load.running:
            self.fail(exc or ConnectionError("server closed the connection"))

    def fail(self, exc: Exception) -> None:
        if self.load.error is None:
            self.load.error = exc
        self.transport.abort()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def ticker_stats(port: int) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stats HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    reply = await reader.read()
    writer.close()
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])


def percentile(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def measure(port: int, pid: int, streams: int, args) -> dict:
    loop = asyncio.get_running_loop()
    load = Load()
    transports = []
    spread = args.tokens * args.tick_ms / 1000 / streams  # first requests over one stream's length
    try:
        for _ in range(streams):
            transport, _ = await loop.create_connection(lambda: Client(load), "127.0.0.1", port)
            transports.append(transport)
            if spread:
                await asyncio.sleep(spread)
        await asyncio.sleep(WARMUP)
        server0, client0, ticks0, tokens0 = cpu_seconds(pid), time.process_time(), await ticker_stats(port), load.tokens
        load.measuring, start = True, time.perf_counter()
        await asyncio.sleep(args.seconds)
        load.measuring, elapsed = False, time.perf_counter() - start
        server1, client1, ticks1, tokens1 = cpu_seconds(pid), time.process_time(), await ticker_stats(port), load.tokens
    finally:
        load.running = False
        for transport in transports:
            transport.abort()
    if load.error is not None:
        raise RuntimeError(f"a client failed: {load.error!r}") from load.error
    tokens = tokens1 - tokens0
    ticks = ticks1["ticks"] - ticks0["ticks"]
    return {
        "tokens_s": tokens / elapsed,
        "ideal": tokens / (streams * elapsed * 1000 / args.tick_ms) if args.tick_ms else None,
        "late": (ticks1["late"] - ticks0["late"]) / ticks if ticks else 0.0,
        "cpu_us": (server1 - server0) / tokens * 1e6 if tokens else float("nan"),
        "cpu_pct": (server1 - server0) / elapsed * 100,
        "client_pct": (client1 - client0) / elapsed * 100,
        "gap_p50": percentile(load.gaps, 0.5) * 1000,
        "gap_p95": percentile(load.gaps, 0.95) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, nargs="+", default=[64, 256], help="concurrent streams, one run each")
    ap.add_argument("--tick-ms", type=float, default=20.0, help="ms between ticks; 0: as fast as the server can")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per stream")
    ap.add_argument("--seconds", type=float, default=10.0, help="measured seconds per run")
    ap.add_argument("--serve", choices=list(NAMES), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        (serve_ours if args.serve == "ours" else serve_uvicorn)(args.port, args.tick_ms, args.tokens)
        return

    pace = f"one tick every {args.tick_ms:g} ms" if args.tick_ms else "ticks as fast as the server can"
    print(f"{pace}, {args.tokens} tokens per stream, {args.seconds:g} s measured per run, 127.0.0.1", flush=True)
    results: dict[tuple[str, int], dict] = {}
    for kind in NAMES:
        port = free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port),
                                 "--tick-ms", str(args.tick_ms), "--tokens", str(args.tokens)])
        try:
            wait_port(port)
            for streams in args.streams:
                r = results[kind, streams] = asyncio.run(measure(port, proc.pid, streams, args))
                print(f"{NAMES[kind]:22s} {streams:4d} streams: {r['tokens_s']:9.0f} tokens/s, "
                      f"server CPU {r['cpu_us']:6.1f} us/token", flush=True)
        finally:
            proc.terminate()
            proc.wait()

    print("\n| server | streams | tokens/s | of ideal | late ticks | server CPU per token | server CPU "
          "| gap p50 / p95 | client CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for streams in args.streams:
        for kind in NAMES:
            r = results[kind, streams]
            ideal = f"{r['ideal']:.1%}" if r["ideal"] is not None else "-"
            late = f"{r['late']:.1%}" if args.tick_ms else "-"
            print(f"| {NAMES[kind]} | {streams} | {r['tokens_s']:,.0f} | {ideal} | {late} | {r['cpu_us']:.1f} us "
                  f"| {r['cpu_pct']:.0f}% | {r['gap_p50']:.1f} / {r['gap_p95']:.1f} ms | {r['client_pct']:.0f}% |")
    print()
    for streams in args.streams:
        ours, theirs = results["ours", streams], results["uvicorn", streams]
        print(f"ours / uvicorn at {streams} streams: tokens/s {ours['tokens_s'] / theirs['tokens_s']:.2f}x, "
              f"server CPU per token {ours['cpu_us'] / theirs['cpu_us']:.2f}x")


if __name__ == "__main__":
    main()
