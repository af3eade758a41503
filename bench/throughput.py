"""Throughput and latency of the real server under concurrent streaming clients.

    .venv/bin/python bench/throughput.py [--concurrency 1 4 8 16] [--max-tokens 64]

Starts `minivault.py` twice, with `--max-batch 1` and with the default batch, drives
N concurrent greedy streaming clients over raw sockets on 127.0.0.1, and prints per
concurrency: aggregate tokens/s, time to first token and inter-token latency (p50,
p95). Then the time to first token of one extra request while 8 stream, against its
idle value, and single-stream tokens/s over HTTP against a bare in-process decode
loop of the same model (the ceiling). Every figure comes from this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from serverproc import ServerProcess  # noqa: E402

REPEATS = 3  # single-stream figures are the median of this many runs on both sides

PROMPTS = [
    "What is an AI model?", "Name three rivers in Europe.", "How do bees make honey?",
    "Write a haiku about the sea.", "Explain recursion to a child.", "What is the capital of Japan?",
    "Give two tips for better sleep.", "Why is the sky blue?", "Describe a cat in one sentence.",
    "What does a compiler do?", "List four planets.", "How does rain form?",
    "What is photosynthesis?", "Suggest a name for a bakery.", "Why do we dream?",
    "What is a prime number?", "Tell me about the moon.",
]


async def stream_once(port: int, prompt: str, max_tokens: int) -> dict:
    """One greedy streaming request; returns the arrival time of every chunk."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    start = time.perf_counter()
    writer.write(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
    await reader.readuntil(b"\r\n\r\n")
    times, tokens = [], 0
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        obj = json.loads(await reader.readexactly(size))
        await reader.readexactly(2)
        if obj.get("done"):
            tokens = obj["eval_count"]
        elif obj.get("response"):
            times.append(time.perf_counter())
    writer.close()
    return {"start": start, "times": times, "tokens": tokens}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


async def run_clients(port: int, n: int, max_tokens: int) -> dict:
    t0 = time.perf_counter()
    results = await asyncio.gather(*[stream_once(port, PROMPTS[i % len(PROMPTS)], max_tokens)
                                     for i in range(n)])
    elapsed = time.perf_counter() - t0
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"tokens_per_s": sum(r["tokens"] for r in results) / elapsed,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "itl_p50": pct(itl, 0.5), "itl_p95": pct(itl, 0.95),
            "tokens": [r["tokens"] for r in results]}


async def ttft_while_busy(port: int, busy: int, max_tokens: int) -> tuple[float, float]:
    """Time to first token of one request: idle, then while `busy` others stream."""
    idle = await stream_once(port, "Say hello.", 4)
    idle_ttft = idle["times"][0] - idle["start"]
    others = [asyncio.ensure_future(stream_once(port, PROMPTS[i], max_tokens * 2)) for i in range(busy)]
    await asyncio.sleep(3.0)  # let them all join the batch and start decoding
    late = await stream_once(port, "Say hello.", 4)
    await asyncio.gather(*others)
    return idle_ttft, late["times"][0] - late["start"]


def bare_decode_rate(max_tokens: int, dtype: str) -> float:
    """Greedy tokens/s of a plain in-process loop over the runner the server picks (same
    model, dtype and KV cache), argmax only: no server, no sampling, no detokenising."""
    from engine import GenerationRequest
    from modelsource import resolve_model
    from prompts import PromptBuilder
    from runner import load_runner

    runner = load_runner(resolve_model(None), dtype, "~/.cache/minivault")
    ids = PromptBuilder(runner.codec).encode(GenerationRequest(prompt=PROMPTS[0]))
    rates = []
    for _ in range(REPEATS):
        runner.reset()
        token = int(runner.prefill([ids])[0].argmax())
        start = time.perf_counter()
        for _ in range(max_tokens - 1):
            token = int(runner.decode([token])[0].argmax())
        rates.append((max_tokens - 1) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    args = ap.parse_args()

    print(f"model: embedded SmolLM2-135M-Instruct, dtype {args.dtype}, greedy, max_tokens {args.max_tokens}, "
          f"streaming over HTTP on 127.0.0.1")
    table: dict[str, dict[int, dict]] = {}
    latency = single_http = None
    for label, batch in (("max-batch 1", "1"), ("max-batch 8", "8")):
        with tempfile.TemporaryDirectory() as tmp:
            proc = ServerProcess(["--max-batch", batch, "--dtype", args.dtype, "--queue-size", "256"],
                                 log_file=pathlib.Path(tmp) / "log.jsonl")
            try:
                proc.wait_ready()
                asyncio.run(run_clients(proc.port, 2, 8))  # warm-up
                table[label] = {}
                for n in args.concurrency:
                    table[label][n] = r = asyncio.run(run_clients(proc.port, n, args.max_tokens))
                    print(f"{label:12s} clients {n:3d}: {r['tokens_per_s']:6.1f} tok/s  "
                          f"TTFT p50 {r['ttft_p50']:.2f}s p95 {r['ttft_p95']:.2f}s  "
                          f"ITL p50 {r['itl_p50'] * 1000:.0f}ms p95 {r['itl_p95'] * 1000:.0f}ms", flush=True)
                    if n == 8:  # answers that end early leave the batch narrower for the rest
                        print(f"{'':12s} tokens per client: {r['tokens']}", flush=True)
                if batch != "1":
                    latency = asyncio.run(ttft_while_busy(proc.port, 8, args.max_tokens))
                    rates = []
                    for _ in range(REPEATS):
                        one = asyncio.run(stream_once(proc.port, PROMPTS[0], args.max_tokens))
                        rates.append((len(one["times"]) - 1) / (one["times"][-1] - one["times"][0]))
                    single_http = statistics.median(rates)
            finally:
                proc.stop()
    bare = bare_decode_rate(args.max_tokens, args.dtype)

    print("\nratios (batched / max-batch 1):")
    for n in args.concurrency:
        a, b = table["max-batch 8"][n]["tokens_per_s"], table["max-batch 1"][n]["tokens_per_s"]
        print(f"  clients {n:3d}: {a:6.1f} / {b:6.1f} tok/s = {a / b:.2f}x")
    idle, busy = latency
    print(f"TTFT of a request arriving while 8 stream: {busy:.2f}s vs idle {idle:.2f}s = {busy / idle:.2f}x")
    print(f"single stream over HTTP {single_http:.1f} tok/s vs bare decode loop {bare:.1f} tok/s "
          f"= {single_http / bare:.2f}x (medians of {REPEATS})")


if __name__ == "__main__":
    main()
