"""Continuous batching against the real embedded model: same text alone or in a batch,
a late request joins a running batch, and the event loop stays responsive."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from serverproc import read_response, send_request

PROMPTS = [
    "What is an AI model?",
    "Name three rivers in Europe.",
    "How do bees make honey?",
    "Write a haiku about the sea.",
    "Explain recursion to a child.",
    "What is the capital of Japan?",
    "Give two tips for better sleep.",
    "Why is the sky blue?",
]


def _greedy(server, prompt: str, n: int = 48):
    return server.generate(prompt=prompt, max_tokens=n, temperature=0)


def test_greedy_text_is_the_same_alone_and_in_a_batch_of_eight(server):
    alone = [_greedy(server, p).text() for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        batched = list(pool.map(lambda p: _greedy(server, p), PROMPTS))
    assert all(r.status == 200 for r in batched)
    assert [r.text() for r in batched] == alone


def test_a_request_joins_a_running_batch_without_waiting_for_it(server):
    """A short request sent while long ones stream finishes first."""
    long_done: list[float] = []

    def long_stream(i):
        _greedy(server, PROMPTS[i], 120)
        long_done.append(time.monotonic())

    threads = [threading.Thread(target=long_stream, args=(i,)) for i in range(3)]
    with server.connect() as probe:
        for t in threads:
            t.start()
        server.wait_health("active", 3)  # the long streams are generating
        send_request(probe, "POST", "/generate", {"prompt": "Hi", "max_tokens": 3, "temperature": 0})
        short = read_response(probe)
        short_done = time.monotonic()
    for t in threads:
        t.join()
    assert short.status == 200 and short.lines()[-1]["eval_count"] == 3
    assert len(long_done) == 3 and short_done < min(long_done)


def test_health_answers_while_eight_streams_run(server):
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(_greedy, server, p, 40) for p in PROMPTS]
        server.wait_health("active", 8)
        health = server.request("GET", "/health").json()
        results = [f.result() for f in futures]
    assert health["status"] == "ok" and health["active"] == 8
    assert all(r.status == 200 and r.lines()[-1]["done"] for r in results)


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_streaming(server):
    """A long prompt does not freeze the running streams for its whole prefill."""
    arrivals: list[float] = []

    def running_stream():
        with server.connect() as sock:
            send_request(sock, "POST", "/generate",
                         {"prompt": "Write a long story about a lighthouse.", "max_tokens": 250, "temperature": 0})
            resp = read_response(sock)
            arrivals.extend(resp.chunk_times)

    runner = threading.Thread(target=running_stream)
    runner.start()
    server.wait_health("active", 1)
    long_prompt = "Summarise this. " + "The lighthouse keeper climbed the stairs at dusk. " * 120
    sent = time.monotonic()
    with server.connect() as sock:
        send_request(sock, "POST", "/generate", {"prompt": long_prompt, "max_tokens": 3, "temperature": 0})
        resp = read_response(sock)
    first_token = resp.chunk_times[0]
    runner.join()
    final = resp.lines()[-1]
    assert resp.status == 200 and final["done"] and final["prompt_eval_count"] > 1000
    # The running stream got tokens while the long prompt was being prefilled.
    assert sum(sent < t < first_token for t in arrivals) >= 3


def test_the_static_runner_on_the_cpu_gives_our_runners_float32_text_alone_and_in_a_batch():
    """`--runner static` is the GPU's runner (a slot per row, span buckets) run on the
    CPU without graphs: its greedy text equals the Llama runner's in float32, alone and
    in a batch of eight. The rows end at different steps (10 to 24 tokens), so later
    rows move into the slots of those that ended while the others stream on."""
    from serverproc import ServerProcess

    texts = {}
    limits = [10 + 2 * i for i in range(len(PROMPTS))]
    for args in (["--runner", "static"], ["--dtype", "float32"]):
        proc = ServerProcess(args)
        try:
            proc.wait_ready()
            alone = [proc.generate(prompt=p, max_tokens=n, temperature=0).text() for p, n in zip(PROMPTS, limits)]
            with ThreadPoolExecutor(len(PROMPTS)) as pool:
                batched = [r.text() for r in pool.map(lambda p, n: proc.generate(prompt=p, max_tokens=n,
                                                                                   temperature=0), PROMPTS, limits)]
            assert batched == alone, args
            texts[args[1]] = alone
            assert proc.request("GET", "/health").json()["dtype"] == "float32"
        finally:
            proc.stop()
    assert texts["static"] == texts["float32"]
