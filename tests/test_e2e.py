"""End to end over real sockets against the real embedded model."""

from __future__ import annotations

import json
import signal
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from serverproc import (ServerProcess, _Reader, iter_chunks, read_log, read_response, send_request,
                        wait_for_log)

GREEDY = {"temperature": 0}


def test_stream_is_chunked_ndjson_arriving_piece_by_piece(server):
    resp = server.generate(prompt="What is an AI model?", max_tokens=24, **GREEDY)
    assert resp.status == 200
    assert resp.headers["content-type"] == "application/x-ndjson"
    assert resp.headers["transfer-encoding"] == "chunked"
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-accel-buffering"] == "no"
    lines = resp.lines()
    # Each chunk is exactly one JSON object and its newline.
    assert all(c.endswith(b"\n") and c.count(b"\n") == 1 for c in resp.chunks)
    pieces, final = lines[:-1], lines[-1]
    assert len(pieces) >= 5 and all(set(p) == {"response"} and p["response"] for p in pieces)
    # Several pieces were complete at distinct moments: they were streamed, not buffered.
    assert len(set(resp.chunk_times[:-1])) >= 3
    assert final["done"] is True and final["response"] == ""
    assert final["done_reason"] == "length" and final["eval_count"] == 24
    for key in ("prompt_eval_count", "total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int) and final[key] >= 0
    assert final["prompt_eval_count"] > 5
    assert final["total_duration"] >= final["eval_duration"] > 0
    assert "AI" in resp.text() or "model" in resp.text()


def test_no_special_tokens_reach_the_client(server):
    resp = server.generate(prompt="Say hello.", max_tokens=40, **GREEDY)
    text = resp.text()
    assert "<|im_end|>" not in text and "<|im_start|>" not in text and "\ufffd" not in text


def test_greedy_is_repeatable_and_non_streaming_matches(server):
    body = {"prompt": "Name three colours.", "max_tokens": 20, **GREEDY}
    first = server.generate(**body)
    second = server.generate(**body)
    whole = server.generate(stream=False, **body)
    assert first.text() == second.text()
    assert whole.status == 200 and whole.headers["content-type"] == "application/json"
    obj = whole.json()
    assert obj["response"] == first.text()
    assert obj["done"] is True and obj["eval_count"] == first.lines()[-1]["eval_count"]


def test_seed_makes_sampling_repeatable(server):
    body = {"prompt": "Write a name for a cat.", "max_tokens": 16, "temperature": 1.0, "top_p": 1.0,
            "top_k": 0, "seed": 1234}
    a, b = server.generate(**body).text(), server.generate(**body).text()
    assert a == b
    others = {server.generate(**{**body, "seed": s}).text() for s in (1, 2, 3)}
    assert len(others | {a}) > 1, "different seeds should not all give the same text"


def test_ollama_options_object_is_honoured(server):
    resp = server.generate(prompt="Count to ten.", options={"num_predict": 5, "temperature": 0})
    assert resp.lines()[-1]["eval_count"] == 5


def test_raw_skips_the_chat_template(server):
    templated = server.generate(prompt="Hello", max_tokens=1, **GREEDY).lines()[-1]
    raw = server.generate(prompt="Hello", raw=True, max_tokens=1, **GREEDY).lines()[-1]
    # The template adds the role markers and the default system prompt.
    assert raw["prompt_eval_count"] < 5 < templated["prompt_eval_count"]


def test_system_prompt_changes_the_prompt(server):
    plain = server.generate(prompt="Hi", max_tokens=1, **GREEDY).lines()[-1]
    with_system = server.generate(prompt="Hi", system="You answer only in French, briefly and politely.",
                                  max_tokens=1, **GREEDY).lines()[-1]
    assert with_system["prompt_eval_count"] != plain["prompt_eval_count"]


def test_stop_sequence_ends_the_text_before_it(server):
    body = {"prompt": "List the days of the week.", "max_tokens": 40, **GREEDY}
    full = server.generate(**body).text()
    words = full.split()
    stop = words[len(words) // 2]
    resp = server.generate(stop=[stop], **body)
    assert resp.text() == full[: full.index(stop)]
    assert resp.lines()[-1]["done_reason"] == "stop"


BAD_BODIES = [
    (b"{not json", "invalid JSON"),
    (b"", "empty"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({}).encode(), "'prompt' is required"),
    (json.dumps({"prompt": ""}).encode(), "'prompt' must not be empty"),
    (json.dumps({"prompt": 42}).encode(), "'prompt' must be a string"),
    (json.dumps({"prompt": "hi", "temperature": "hot"}).encode(), "'temperature'"),
    (json.dumps({"prompt": "hi", "max_tokens": "ten"}).encode(), "'max_tokens'"),
    (json.dumps({"prompt": "hi", "stream": "yes"}).encode(), "'stream'"),
    (json.dumps({"prompt": "hi", "stop": 7}).encode(), "'stop'"),
    (b"\xff\xfe{}", "UTF-8"),
]


@pytest.mark.parametrize("body,message", BAD_BODIES)
def test_bad_input_gets_a_json_400(server, body, message):
    resp = server.request("POST", "/generate", body)
    assert resp.status == 400
    assert resp.headers["content-type"] == "application/json"
    assert message in resp.json()["error"]


def test_prompt_longer_than_the_context_is_refused(server):
    resp = server.generate(prompt="word " * 9000, max_tokens=5)
    assert resp.status == 400
    assert "context" in resp.json()["error"]


def test_unknown_path_and_wrong_method(server):
    missing = server.request("GET", "/nope")
    assert missing.status == 404 and "error" in missing.json()
    wrong = server.request("GET", "/generate")
    assert wrong.status == 405 and set(wrong.headers["allow"].split(", ")) == {"POST", "OPTIONS"}
    assert "error" in wrong.json()


def test_body_over_the_limit_is_413(server):
    resp = server.request("POST", "/generate", b"{" + b" " * (1024 * 1024 + 10) + b"}")
    assert resp.status == 413 and "error" in resp.json()


def test_server_keeps_serving_after_errors(server):
    for body, _ in BAD_BODIES:
        server.request("POST", "/generate", body)
    assert server.request("GET", "/health").json()["status"] == "ok"
    assert server.generate(prompt="Hi", max_tokens=2).status == 200


def test_keep_alive_serves_several_requests_on_one_connection(server):
    with server.connect() as sock:
        reader = _Reader(sock)
        for n in (2, 3):
            send_request(sock, "POST", "/generate", {"prompt": "Hi", "max_tokens": n, **GREEDY})
            resp = read_response(sock, reader)
            assert resp.status == 200 and resp.lines()[-1]["eval_count"] == n
        send_request(sock, "GET", "/health")
        assert read_response(sock, reader).status == 200


def test_concurrent_clients_all_finish(server):
    prompts = [f"Give me a fact about the number {n}." for n in range(6)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        results = list(pool.map(lambda p: server.generate(prompt=p, max_tokens=12, **GREEDY), prompts))
    assert all(r.status == 200 for r in results)
    assert all(r.lines()[-1]["done"] and r.lines()[-1]["eval_count"] == 12 for r in results)
    ids = {r.headers["x-request-id"] for r in results}
    assert len(ids) == len(prompts)
    for request_id in ids:
        record = wait_for_log(server.log_file, lambda r: str(r["id"]) == request_id)
        assert record["status"] == "done" and record["completion_tokens"] == 12


def _start_stream_and_leave(server, prompt: str, chunks_before_leaving: int = 3) -> str:
    """Open a long greedy stream, read a few chunks, then vanish. Returns the request id."""
    sock = server.connect()
    send_request(sock, "POST", "/generate", {"prompt": prompt, "max_tokens": 300, **GREEDY})
    resp = read_response(sock, max_chunks=chunks_before_leaving)
    assert resp.status == 200 and len(resp.chunks) == chunks_before_leaving
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()
    return resp.headers["x-request-id"]


def test_client_that_leaves_stops_its_generation(server):
    request_id = _start_stream_and_leave(server, "Write a long essay about the history of Rome.")
    record = wait_for_log(server.log_file, lambda r: str(r["id"]) == request_id)
    assert record["status"] == "cancelled"
    # It stopped within a few steps of the client leaving, far short of max_tokens.
    assert 3 <= record["completion_tokens"] < 20


def test_cancelled_stream_lets_the_next_queued_request_run(tmp_path):
    log_file = tmp_path / "log.jsonl"
    proc = ServerProcess(["--max-batch", "1"], log_file=log_file)
    try:
        proc.wait_ready()
        holder = threading.Thread(target=_start_stream_and_leave,
                                  args=(proc, "Write a long story about a dragon.", 2))
        sock = proc.connect()
        holder.start()
        # Queued behind the long stream (batch of one); it runs once that one is cancelled.
        send_request(sock, "POST", "/generate", {"prompt": "Hi", "max_tokens": 4, **GREEDY})
        holder.join()
        resp = read_response(sock)
        sock.close()
        assert resp.status == 200 and resp.lines()[-1]["eval_count"] == 4
        cancelled = wait_for_log(log_file, lambda r: r["status"] == "cancelled")
        assert cancelled["completion_tokens"] < 20
    finally:
        assert proc.stop() == 0


def test_requests_sent_while_loading_are_served_and_logged(tmp_path):
    log_file = tmp_path / "new" / "folder" / "log.jsonl"  # folder does not exist yet
    proc = ServerProcess([], log_file=log_file)
    try:
        proc.wait_listening()
        with proc.connect() as sock:
            send_request(sock, "POST", "/generate", {"prompt": "What is an AI model?", "max_tokens": 8})
            health = proc.request("GET", "/health")
            resp = read_response(sock)
        assert health.status == 503 and health.json()["status"] == "loading"
        assert resp.status == 200
        final = resp.lines()[-1]
        assert final["done"] and final["eval_count"] == 8 and final["load_duration"] > 0
        assert "loaded in" in proc.stderr
        record = wait_for_log(log_file, lambda r: True)
        assert record["status"] == "done" and record["prompt"] == "What is an AI model?"
        assert record["response"] == resp.text()
    finally:
        assert proc.stop() == 0


def test_log_lines_have_the_documented_fields(server):
    resp = server.generate(prompt="Log me.", max_tokens=3, **GREEDY)
    record = wait_for_log(server.log_file, lambda r: str(r["id"]) == resp.headers["x-request-id"])
    assert record["timestamp"].endswith("Z") and "T" in record["timestamp"]
    assert record["prompt"] == "Log me." and record["response"] == resp.text()
    assert record["endpoint"] == "/generate" and record["status"] == "done"
    assert record["prompt_tokens"] > 0 and record["completion_tokens"] == 3
    assert isinstance(record["duration_ms"], (int, float)) and record["duration_ms"] > 0
    # Every line in the file is one whole JSON object.
    assert all(isinstance(r, dict) for r in read_log(server.log_file))


def test_head_and_health(server):
    with server.connect() as sock:
        send_request(sock, "HEAD", "/health")
        resp = read_response(sock, head_only=True)
    assert resp.status == 200 and int(resp.headers["content-length"]) > 0


def test_sigterm_lets_the_stream_in_flight_finish_then_exits_0(tmp_path):
    proc = ServerProcess(["--max-tokens", "40"], log_file=tmp_path / "log.jsonl")
    try:
        proc.wait_ready()
        with proc.connect() as sock:
            send_request(sock, "POST", "/generate", {"prompt": "Tell me about the sea.", "temperature": 0})
            reader = _Reader(sock)
            first = read_response(sock, reader, max_chunks=1)
            assert first.status == 200
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_for_stderr("SIGTERM received")
            # New connections are refused (or told 503) while the stream in flight finishes.
            try:
                with socket.create_connection(("127.0.0.1", proc.port), timeout=5) as late:
                    assert read_response(late).status == 503
            except OSError:
                pass
            rest = [json.loads(chunk) for chunk in iter_chunks(reader)]
        assert rest[-1]["done"] is True
        assert proc.proc.wait(30) == 0
        assert read_log(tmp_path / "log.jsonl")[-1]["status"] == "done"
    finally:
        proc.stop()


def test_a_second_signal_exits_at_once(tmp_path):
    proc = ServerProcess(["--max-tokens", "300"], log_file=tmp_path / "log.jsonl")
    try:
        proc.wait_ready()
        with proc.connect() as sock:
            send_request(sock, "POST", "/generate", {"prompt": "Write a long story.", "temperature": 0})
            assert read_response(sock, max_chunks=1).status == 200
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_for_stderr("SIGTERM received")  # else the kernel may merge the two signals
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(30) != 0  # did not wait for 300 tokens
    finally:
        proc.stop()


def test_sigterm_while_the_model_loads_exits_0_and_logs_the_request_it_held(tmp_path):
    """A load cannot be stopped: the server exits without waiting for it, the request
    handed to the model thread meanwhile logged cancelled. The interpreter's exit under
    the loading thread used to abort in torch's C++ code (status 134, 'terminate called
    without an active exception'), that request never logged."""
    log_file = tmp_path / "log.jsonl"
    # An empty cache: the GGUF is converted at start, which takes seconds.
    proc = ServerProcess(["--cache-dir", str(tmp_path / "cache"), "--shutdown-timeout", "0"], log_file=log_file)
    try:
        proc.wait_listening()
        with proc.connect() as sock:
            send_request(sock, "POST", "/generate", {"prompt": "Hi", "max_tokens": 4})
            proc.wait_for_stderr("converting", timeout=120)
            assert proc.request("GET", "/health").json()["status"] == "loading"
            proc.proc.send_signal(signal.SIGTERM)
            assert proc.proc.wait(60) == 0, proc.stderr
        assert "terminate called" not in proc.stderr
        assert [(r["id"], r["status"]) for r in read_log(log_file)] == [(1, "cancelled")]
    finally:
        proc.stop()


def test_device_cuda_without_a_gpu_exits_with_a_clear_error():
    """CI has no GPU (and MiniVault no CUDA runner yet): refused at start, never served on the CPU instead."""
    import subprocess
    import sys

    from serverproc import ROOT

    done = subprocess.run([sys.executable, "minivault.py", "--device", "cuda", "--port", "0"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--device cuda" in done.stderr and "--device cpu" in done.stderr
