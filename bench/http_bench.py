"""Speed of the HTTP layer alone: our server against uvicorn + Starlette.

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python bench/http_bench.py [--seconds 5]

Each server streams 200 NDJSON chunks per response from an instant fake token
source (this file only; never reachable from minivault.py), in its own process on
asyncio's default event loop (no uvloop for either). A load generator in this
process keeps N keep-alive connections busy for a fixed time, at concurrency 1 and
32, and prints complete responses/s, chunks/s and the ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHUNKS = 200
LINES = [json.dumps({"response": f" tok{i}"}).encode() + b"\n" for i in range(CHUNKS)]
LINES.append(json.dumps({"response": "", "done": True}).encode() + b"\n")


def serve_ours(port: int) -> None:
    from httpserver import HTTPServer, Limits, Router

    async def stream(request, writer):
        await writer.start_stream(200, "application/x-ndjson")
        for line in LINES:
            await writer.write(line)
        await writer.end()

    async def main():
        router = Router()
        router.add("POST", "/generate", stream)
        server = HTTPServer(router, Limits())
        await server.start("127.0.0.1", port)
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_uvicorn(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def lines():
        for line in LINES:
            yield line

    async def stream(request):
        await request.body()
        return StreamingResponse(lines(), media_type="application/x-ndjson")

    app = Starlette(routes=[Route("/generate", stream, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, loop="asyncio", log_level="warning", access_log=False)


REQUEST = (b"POST /generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
           b"Content-Length: 17\r\n\r\n{\"prompt\": \"hi\"}\n")
END = b"\r\n0\r\n\r\n"  # cannot occur inside an NDJSON chunk


async def client(port: int, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    while time.perf_counter() < until:
        writer.write(REQUEST)
        tail = b""
        while True:
            data = await reader.read(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            tail = (tail + data)[-len(END):]
            if tail == END:
                break
        counts[0] += 1
    writer.close()


async def load(port: int, concurrency: int, seconds: float) -> float:
    counts = [0]
    start = time.perf_counter()
    await asyncio.gather(*[client(port, start + seconds, counts) for _ in range(concurrency)])
    return counts[0] / (time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--serve", choices=["ours", "uvicorn"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        (serve_ours if args.serve == "ours" else serve_uvicorn)(args.port)
        return

    print(f"{CHUNKS} NDJSON chunks per response, keep-alive, {args.seconds:.0f} s per run, 127.0.0.1")
    results: dict[tuple[str, int], float] = {}
    for kind in ("ours", "uvicorn"):
        port = free_port()
        proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)])
        try:
            wait_port(port)
            asyncio.run(load(port, 4, 1.0))  # warm-up
            for conc in (1, 32):
                rps = asyncio.run(load(port, conc, args.seconds))
                results[kind, conc] = rps
                name = "MiniVault httpserver" if kind == "ours" else "uvicorn + Starlette"
                print(f"{name:22s} concurrency {conc:2d}: {rps:8.1f} responses/s {rps * (CHUNKS + 1):10.0f} chunks/s",
                      flush=True)
        finally:
            proc.terminate()
            proc.wait()
    for conc in (1, 32):
        print(f"ratio at concurrency {conc:2d}: {results['ours', conc] / results['uvicorn', conc]:.2f}x")


if __name__ == "__main__":
    main()
