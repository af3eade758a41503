"""Operating MiniVault: health, metrics, backpressure, rate limits, API keys, CORS, the log."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api import Api, Policy, origin_allowed
from metrics import Metrics
from ratelimit import RateLimiter, parse_rate
from serverproc import ServerProcess, read_log, read_response, send_request, wait_for_log



def metric_families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


# ---- pure parts ----


def test_parse_rate():
    assert parse_rate("30/min") == (30, 60.0)
    assert parse_rate("5/s") == (5, 1.0)
    assert parse_rate("off") is None
    for bad in ("30", "x/min", "0/min", "5/fortnight"):
        with pytest.raises(ValueError):
            parse_rate(bad)


def test_token_bucket_allows_the_limit_then_refuses_then_refills():
    limiter = RateLimiter(3, 60.0)
    decisions = [limiter.check("a", 0.0) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]
    assert decisions[2].remaining == 0 and decisions[3].retry_after_s == 20
    assert limiter.check("b", 0.0).allowed, "each client has its own bucket"
    assert limiter.check("a", 20.0).allowed, "one token back after period/limit"
    refused = dict(decisions[3].headers())
    assert refused["Retry-After"] == "20" and refused["RateLimit-Limit"] == "3"


def test_origin_patterns():
    allowed = ("http://localhost:*", "http://127.0.0.1:*")
    assert origin_allowed("http://localhost:5173", allowed)
    assert origin_allowed("http://localhost", allowed)
    assert not origin_allowed("http://localhost.evil.com", allowed)
    assert not origin_allowed("https://example.com", allowed)
    assert origin_allowed("https://example.com", ("*",))


def test_metrics_render_parses_as_prometheus_text():
    m = Metrics()
    m.counter("x_total", "Things.")
    m.histogram("lat_seconds", "Latency.")
    m.gauge("depth", "Depth.", lambda: 3)
    m.inc("x_total", endpoint="/a", status="done")
    m.observe("lat_seconds", 0.3, endpoint="/a")
    families = metric_families(m.render())
    assert families["x"].samples[0].value == 1.0
    assert families["depth"].samples[0].value == 3
    buckets = [s for s in families["lat_seconds"].samples if s.name == "lat_seconds_bucket"]
    assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == 1


def test_counters_kept_elsewhere_render_as_counters_with_their_label():
    m = Metrics()
    m.counter_read("steps_total", "Steps.", lambda: 7)
    m.counter_read("busy_seconds_total", "Busy.", lambda: {"decode": 1.5, "sampling": 0.25}, label="stage")
    families = metric_families(m.render())
    assert families["steps"].type == "counter" and families["steps"].samples[0].value == 7
    assert {s.labels["stage"]: s.value for s in families["busy_seconds"].samples} == {"decode": 1.5,
                                                                                       "sampling": 0.25}


class _FakeEngine:
    model_name, ready, load_error, queued, active_count, load_seconds = "m", True, None, 0, 0, 1.0


class _FakeWriter:
    def __init__(self):
        self.sent = None

    async def send_json(self, status, obj, headers=None):
        self.sent = (status, obj)


def test_health_says_draining_during_shutdown():
    class Log:
        errors = 0
    api = Api(_FakeEngine(), Log(), Policy(), Metrics(), is_draining=lambda: True)
    writer = _FakeWriter()
    asyncio.run(api.health(None, writer))
    assert writer.sent == (503, {"status": "draining", "model": "m"})


# ---- against the running server (default policy) ----


def test_response_metrics_are_labelled_by_route_not_by_whatever_path_was_asked(server):
    for path in ("/web/no-such-1", "/web/no-such-2", "/no-such-route"):
        assert server.request("GET", path).status == 404
    samples = metric_families(server.request("GET", "/metrics").body.decode())["minivault_http_responses"].samples
    routes = {s.labels["route"] for s in samples}
    assert "/web/" in routes and "-" in routes
    assert not any("no-such" in route for route in routes)


def test_metrics_endpoint(server):
    server.generate(prompt="Count me.", max_tokens=3, temperature=0)
    resp = server.request("GET", "/metrics")
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/plain")
    families = metric_families(resp.body.decode())
    for name in ("minivault_requests", "minivault_tokens_generated", "minivault_time_to_first_token_seconds",
                 "minivault_request_duration_seconds", "minivault_queue_depth", "minivault_active_sequences",
                 "minivault_cancellations", "minivault_model_load_seconds", "minivault_log_write_errors"):
        assert name in families, name
    done = [s for s in families["minivault_requests"].samples
            if s.labels.get("endpoint") == "/generate" and s.labels.get("status") == "done"]
    assert done and done[0].value >= 1
    assert families["minivault_model_load_seconds"].samples[0].value > 0


def test_metrics_say_where_the_model_threads_time_goes(server):
    def read():
        families = metric_families(server.request("GET", "/metrics").body.decode())
        stages = {s.labels["stage"]: s.value for s in families["minivault_model_thread_seconds"].samples}
        return stages, families["minivault_decode_steps"].samples[0].value, \
            families["minivault_decoded_rows"].samples[0].value

    before, steps_before, rows_before = read()
    reply = server.generate(prompt="Name three colours.", max_tokens=6, temperature=0, stream=False).json()
    after, steps, rows = read()
    # The first token comes from the prefill; each later one from a decode step of this row.
    assert steps - steps_before >= reply["eval_count"] - 1 >= 1
    assert rows - rows_before >= steps - steps_before
    for stage in ("waiting", "prefill", "decode", "sampling", "streaming", "handoff"):
        assert after[stage] > before.get(stage, 0.0), stage
    assert all(after[stage] >= seconds for stage, seconds in before.items())
    assert after["loading"] > 0  # the model's load, before any request


def test_cors_preflight_allowed_and_foreign_origins(server):
    asked = {"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "content-type"}
    ok = server.request("OPTIONS", "/api/chat", headers=asked)
    assert ok.status == 204 and ok.headers["access-control-allow-origin"] == "http://localhost:5173"
    assert "POST" in ok.headers["access-control-allow-methods"]
    foreign = server.request("OPTIONS", "/api/chat", headers={**asked, "Origin": "https://evil.example"})
    assert foreign.status == 403 and "access-control-allow-origin" not in foreign.headers
    simple = server.request("GET", "/api/tags", headers={"Origin": "http://127.0.0.1:8080"})
    assert simple.headers["access-control-allow-origin"] == "http://127.0.0.1:8080"
    other = server.request("GET", "/api/tags", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in other.headers


# ---- servers with their own settings ----


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    log_file = tmp_path_factory.mktemp("guarded") / "log.jsonl"
    proc = ServerProcess(["--api-key", "s3cret", "--rate-limit", "4/min", "--no-log-prompts"], log_file=log_file)
    proc.wait_ready()
    yield proc
    proc.stop()


def test_api_key_is_required_except_for_health(guarded):
    assert guarded.request("GET", "/health").status == 200
    missing = guarded.request("GET", "/api/tags")
    assert missing.status == 401 and "API key" in missing.json()["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = guarded.request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
                            headers={"Authorization": "Bearer nope"})
    assert wrong.status == 401 and wrong.json()["error"]["type"] == "invalid_request_error"
    import openai  # a 401 does not spend the rate limit the next test counts

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{guarded.port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "invalid_api_key" and "API key" in err.value.message  # as OpenAI answers
    assert guarded.request("GET", "/api/tags", headers={"Authorization": "Bearer s3cret"}).status == 200


def test_rate_limit_gives_429_with_headers_and_logs_without_prompts(guarded):
    auth = {"Authorization": "Bearer s3cret"}
    statuses = []
    for _ in range(5):
        resp = guarded.request("POST", "/generate", {"prompt": "secret prompt", "max_tokens": 1}, headers=auth)
        statuses.append(resp.status)
    assert statuses == [200, 200, 200, 200, 429]
    assert int(resp.headers["retry-after"]) >= 1 and resp.headers["ratelimit-remaining"] == "0"
    assert "rate limit" in resp.json()["error"]
    record = wait_for_log(guarded.log_file, lambda r: True)
    assert "prompt" not in record and record["prompt_chars"] == len("secret prompt")
    assert len(record["prompt_sha256"]) == 64
    assert "secret prompt" not in open(guarded.log_file).read()


def test_burst_over_the_queue_is_refused_clearly_and_counts_add_up(tmp_path):
    log_file = tmp_path / "log.jsonl"
    proc = ServerProcess(["--queue-size", "2", "--max-batch", "1"], log_file=log_file)
    try:
        proc.wait_ready()
        n = 30
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(lambda i: proc.generate(prompt=f"Burst {i}", max_tokens=6, temperature=0),
                                    range(n)))
        ok = [r for r in results if r.status == 200]
        busy = [r for r in results if r.status == 503]
        assert len(ok) + len(busy) == n and busy and len(ok) >= 3
        assert all(r.lines()[-1]["done"] for r in ok)
        assert all(int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"] for r in busy)
        families = metric_families(proc.request("GET", "/metrics").body.decode())
        assert families["minivault_queue_rejections"].samples[0].value == len(busy)
        assert proc.generate(prompt="After the burst", max_tokens=2).status == 200
        assert proc.stop() == 0
        records = read_log(log_file)
        assert len(records) == len(ok) + 1
        assert sorted(r["id"] for r in records) == list(range(1, len(ok) + 2))  # refusals take no id
    finally:
        proc.stop()


def test_queued_request_whose_client_leaves_never_reaches_the_model(tmp_path):
    log_file = tmp_path / "log.jsonl"
    proc = ServerProcess(["--max-batch", "1"], log_file=log_file)
    try:
        proc.wait_ready()
        with proc.connect() as busy:
            send_request(busy, "POST", "/generate", {"prompt": "Write a long story.", "max_tokens": 60})
            assert read_response(busy, max_chunks=1).status == 200  # now generating
            waiting = proc.connect()
            send_request(waiting, "POST", "/generate", {"prompt": "I will leave.", "max_tokens": 60})
            proc.wait_health("queued", 1, timeout=30)
            waiting.close()
            record = wait_for_log(log_file, lambda r: r["prompt"] == "I will leave.")
        assert record["status"] == "cancelled" and record["prompt_tokens"] == 0
        assert record["completion_tokens"] == 0
    finally:
        proc.stop()


def test_log_survives_sigkill_and_continues_after_restart(tmp_path):
    log_file = tmp_path / "log.jsonl"
    proc = ServerProcess([], log_file=log_file)
    try:
        proc.wait_ready()
        with ThreadPoolExecutor(6) as pool:
            list(pool.map(lambda i: proc.generate(prompt=f"Short {i}", max_tokens=2), range(6)))
            streams = [pool.submit(proc.generate, prompt=f"Long {i}", max_tokens=200) for i in range(4)]
            wait_for_log(log_file, lambda r: r["prompt"] == "Short 5")
            proc.stop(signal.SIGKILL)
            for f in streams:
                with pytest.raises(Exception):
                    f.result()
    finally:
        proc.stop(signal.SIGKILL)
    lines = open(log_file).read().splitlines()
    assert len(lines) >= 6 and all(isinstance(json.loads(line), dict) for line in lines)
    again = ServerProcess([], log_file=log_file)
    try:
        again.wait_ready()
        again.generate(prompt="After restart", max_tokens=2)
        wait_for_log(log_file, lambda r: r["prompt"] == "After restart")
        assert all(isinstance(json.loads(line), dict) for line in open(log_file))
        assert oct(os.stat(log_file).st_mode & 0o777) == "0o600"
    finally:
        again.stop()


def test_failing_log_disk_never_fails_requests(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the log folder should be")
    proc = ServerProcess([], log_file=blocker / "log.jsonl")
    try:
        proc.wait_ready()
        for _ in range(3):
            assert proc.generate(prompt="Hi", max_tokens=2).lines()[-1]["done"]
        # The log thread writes after the replies: its report first, then the count it made before.
        proc.wait_for_stderr("cannot write the request log")
        families = metric_families(proc.request("GET", "/metrics").body.decode())
        errors = families["minivault_log_write_errors"]
        assert errors.type == "counter" and errors.samples[0].name == "minivault_log_write_errors_total"
        assert errors.samples[0].value >= 1
        assert proc.stderr.count("cannot write the request log") == 1
    finally:
        proc.stop()


def test_log_rotates_by_size(tmp_path):
    from requestlog import RequestLog

    path = tmp_path / "log.jsonl"
    log = RequestLog(str(path), max_bytes=300, backups=2)
    for i in range(30):
        log.write({"i": i, "pad": "x" * 50})
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["log.jsonl", "log.jsonl.1", "log.jsonl.2"]
    assert all(p.stat().st_size <= 300 for p in tmp_path.iterdir())
    newest = [json.loads(line)["i"] for line in open(path)]
    assert newest[-1] == 29


def test_rate_limiter_memory_stays_bounded_and_forgets_the_least_recent_client(monkeypatch):
    monkeypatch.setattr(RateLimiter, "MAX_CLIENTS", 3)
    limiter = RateLimiter(1, 60.0)
    for key in ("a", "b", "c"):
        assert limiter.check(key, 0.0).allowed
    assert not limiter.check("a", 1.0).allowed  # "a" is now the most recent
    assert limiter.check("d", 2.0).allowed  # "b", the least recent, is forgotten
    assert len(limiter._buckets) == 3
    assert not limiter.check("a", 3.0).allowed and not limiter.check("c", 3.0).allowed
