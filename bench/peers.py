"""MiniVault against llama.cpp's server on the same GGUF, the same threads, one run.

    .venv/bin/python bench/peers.py [--max-tokens 128] [--llama-python PATH]

Starts, one after the other: llama.cpp's server (llama-cpp-python[server], from
requirements-bench.txt; `--n_threads 2 --interrupt_requests False`, so concurrent
requests are not cut), MiniVault with its defaults, MiniVault with --max-batch 1, and
MiniVault with --runner transformers (the path before our own Llama runner).
Each gets the same OpenAI /v1/completions load, greedy, streamed: 8 fixed prompts one
after another (1 client), then all 8 at once (8 clients); then one long prompt each of
~0.7k, ~2.7k and ~5.3k tokens (prefill rate = prompt tokens / time to first token).
Tokens are counted as streamed text events (one per token on both servers). Prints
tok/s, TTFT p50/max, prefill tok/s, resident memory, and the ratios.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from modelsource import embedded_model_file  # noqa: E402

PROMPTS = [
    "The history of the printing press begins", "A guide to growing tomatoes at home:",
    "Once upon a time, in a small village by the sea,", "The main differences between cats and dogs are",
    "Here is a recipe for a simple vegetable soup.", "The solar system consists of",
    "In the year 2050, cities will", "To learn a new language quickly, you should",
]
LONG_TOKENS = (700, 2700, 5300)
TEXT = ROOT / "bench" / "data" / "public_domain.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return 0.0


class Server:
    def __init__(self, name: str, argv: list[str], port: int):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 600
        while True:
            assert self.proc.poll() is None, f"{name} exited"
            assert time.monotonic() < deadline, f"{name} did not start"
            try:  # ready: a one-token completion is answered (MiniVault queues it while loading)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
                conn.request("POST", "/v1/completions", json.dumps({"prompt": "Hi", "max_tokens": 1}),
                             {"Content-Type": "application/json"})
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def complete(port: int, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: its TTFT, duration and tokens (text events)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True})
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, (resp.status, resp.read()[:300])
    first, tokens, text = None, 0, []
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        piece = json.loads(line[6:])["choices"]
        if piece and piece[0].get("text"):
            first = first or time.perf_counter()
            tokens += 1
            text.append(piece[0]["text"])
    end = time.perf_counter()
    return {"ttft": (first or end) - start, "seconds": end - start, "tokens": tokens, "text": "".join(text)}


def long_prompts() -> list[tuple[int, str]]:
    from tokenizers import Tokenizer

    from modelsource import weights_folder, resolve_model

    folder = weights_folder(resolve_model(None), "~/.cache/minivault")
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    words = TEXT.read_text().split()
    out = []
    for target in LONG_TOKENS:
        text = ""
        i = 0
        while len(tokenizer.encode(text).ids) < target:
            text += " ".join(words[i % len(words):i % len(words) + 50]) + " "
            i += 50
        out.append((len(tokenizer.encode(text).ids), text + "\n\nIn one sentence, this text says"))
    return out


def measure(server: Server, max_tokens: int, longs) -> dict:
    complete(server.port, "Warm up.", 4)
    single = [complete(server.port, p, max_tokens) for p in PROMPTS]
    start = time.perf_counter()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        many = list(pool.map(lambda p: complete(server.port, p, max_tokens), PROMPTS))
    wall = time.perf_counter() - start
    prefill = [(n, complete(server.port, text, 1)["ttft"]) for n, text in longs]
    return {
        "single_tps": sum(r["tokens"] for r in single) / sum(r["seconds"] for r in single),
        "single_ttft": statistics.median(r["ttft"] for r in single),
        "many_tps": sum(r["tokens"] for r in many) / wall,
        "many_ttft_p50": statistics.median(r["ttft"] for r in many),
        "many_ttft_max": max(r["ttft"] for r in many),
        "many_tokens": [r["tokens"] for r in many],
        "prefill": [(n, n / t) for n, t in prefill],
        "rss_mb": rss_mb(server.proc.pid),
        "texts": [r["text"] for r in single],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--llama-python", default=sys.executable,
                        help="a Python with llama-cpp-python[server] installed")
    parser.add_argument("--minivault-args", default="", help="extra arguments for MiniVault (e.g. '--dtype float16')")
    parser.add_argument("--skip-transformers", action="store_true",
                        help="leave out the transformers runner (the slowest run; only a baseline)")
    args = parser.parse_args()
    gguf = str(embedded_model_file())
    longs = long_prompts()
    runs = {}
    port = free_port()
    servers = [
        ("llama.cpp", [args.llama_python, "-m", "llama_cpp.server", "--model", gguf, "--n_threads", "2",
                       "--n_threads_batch", "2", "--n_ctx", "8192", "--interrupt_requests", "False",
                       "--verbose", "False", "--host", "127.0.0.1", "--port", str(port)]),
        ("minivault", [sys.executable, "minivault.py", "--port", str(port), "--log-file", "",
                       *args.minivault_args.split()]),
        ("minivault --max-batch 1", [sys.executable, "minivault.py", "--port", str(port), "--log-file", "",
                                     "--max-batch", "1", *args.minivault_args.split()]),
        # The path every model had before our own runner: the baseline for TTFT and prefill.
        ("minivault --runner transformers", [sys.executable, "minivault.py", "--port", str(port), "--log-file", "",
                                             "--runner", "transformers"]),
    ]
    if args.skip_transformers:
        servers = servers[:-1]
    for name, argv in servers:
        if argv[0] != sys.executable and not shutil.which(argv[0]) and not os.path.exists(argv[0]):
            print(f"skipping {name}: {argv[0]} not found")
            continue
        started = time.perf_counter()
        server = Server(name, argv, port)
        ready = time.perf_counter() - started
        try:
            runs[name] = {**measure(server, args.max_tokens, longs), "ready_s": ready}
        finally:
            server.stop()
    print(f"\nSame GGUF ({pathlib.Path(gguf).name}), 2 threads, greedy, {args.max_tokens} tokens, "
          f"{len(PROMPTS)} prompts, OpenAI /v1/completions streamed\n")
    print(f"{'server':26} {'1 client tok/s':>14} {'8 clients tok/s':>15} {'TTFT p50/max (8)':>17} "
          f"{'prefill tok/s ' + '/'.join(f'{n // 100 / 10:g}k' for n in LONG_TOKENS):>26} {'RSS MB':>7} {'ready s':>7}")
    for name, r in runs.items():
        prefill = " / ".join(f"{tps:.0f}" for _, tps in r["prefill"])
        print(f"{name:26} {r['single_tps']:14.1f} {r['many_tps']:15.1f} "
              f"{r['many_ttft_p50']:8.2f}/{r['many_ttft_max']:.2f} s {prefill:>26} {r['rss_mb']:7.0f} "
              f"{r['ready_s']:7.1f}")
        print(f"{'':26} tokens per client at 8: {r['many_tokens']}")
    ours, peer, one = runs.get("minivault"), runs.get("llama.cpp"), runs.get("minivault --max-batch 1")
    if ours and peer:
        print(f"\nMiniVault / llama.cpp: 1 client {ours['single_tps'] / peer['single_tps']:.2f}x, "
              f"8 clients {ours['many_tps'] / peer['many_tps']:.2f}x, "
              f"memory {ours['rss_mb'] / peer['rss_mb']:.2f}x")
    if ours and one:
        print(f"MiniVault 8 clients / its own --max-batch 1: {ours['many_tps'] / one['many_tps']:.2f}x")
    before = runs.get("minivault --runner transformers")
    if ours and before:
        print(f"MiniVault / its transformers runner: 1 client {ours['single_tps'] / before['single_tps']:.2f}x, "
              f"8 clients {ours['many_tps'] / before['many_tps']:.2f}x, TTFT p50 at 8 "
              f"{ours['many_ttft_p50'] / before['many_ttft_p50']:.2f}x, prefill " +
              " / ".join(f"{a[1] / b[1]:.2f}x" for a, b in zip(ours["prefill"], before["prefill"])))


if __name__ == "__main__":
    main()
