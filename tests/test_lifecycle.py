"""The request lifecycle under attack: random bodies with extreme values on every
endpoint, clients that leave at any moment, and failures injected into every stage of
the model thread. After each example every request has had exactly one final event
and one log line, the slots are all back, and the queue is empty.

The real engine, API and HTTP server run in this process on the tiny GPT-2 (issue 11).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Final
from inprocess import (STAGES, EmbeddingHookedRunner, Faults, GatedRunner, LoopPacedRunner, ScriptedRunner,
                       faulty_text_stages, http, live_server, wait_until)

GENERATION_ENDPOINTS = ("/generate", "/api/generate", "/api/chat", "/v1/completions", "/v1/chat/completions")
ENDPOINTS = GENERATION_ENDPOINTS + ("/v1/responses", "/api/embed", "/v1/embeddings")
EXTREMES = [None, 0, -1, 1, 2, 0.5, 1e-300, 5e-324, 1e308, -1e308, 2 ** 64, 10 ** 30, -(2 ** 63) - 1, "x", "",
            [], {}, True, False, [1], ["\n", "e"], {"a": 1}, {"num_predict": 3}, {"temperature": 1e-300},
            "\ud800"]
VALID = {"temperature": [0, 0.7, 1.5], "top_p": [0.5, 1], "top_k": [0, 1, 40], "seed": [0, 7, 2 ** 63],
         "repeat_penalty": [1, 1.3], "max_tokens": [1, 4, 20], "num_predict": [2, 5], "stop": ["e", ["o", "x"]],
         "presence_penalty": [0, 1.5], "frequency_penalty": [-1, 2], "stream": [True, False], "raw": [True],
         "system": ["Be brief."], "options": [{"temperature": 0}, {"num_predict": 3}]}
FIELD_VALUES = st.sampled_from(sorted(VALID)).flatmap(
    lambda name: st.tuples(st.just(name), st.one_of(st.sampled_from(VALID[name]), st.sampled_from(EXTREMES))))
PROMPTS = st.one_of(st.sampled_from(["The quick brown fox", "A language model", "Streaming servers send"]),
                    st.text(max_size=24),
                    st.sampled_from(["<|endoftext|> jumps", "x" * 5000, "", "   ", "\ud800"]))


def body_for(endpoint: str, model: str, prompt: str, fields: dict) -> dict:
    if endpoint in ("/api/chat", "/v1/chat/completions"):
        body = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    elif endpoint in ("/api/embed", "/v1/embeddings"):
        body = {"model": model, "input": [prompt, "The quick brown fox"]}
    elif endpoint == "/v1/responses":
        return {"model": model, "input": prompt, "max_output_tokens": 6, **fields}
    else:
        body = {"model": model, "prompt": prompt}
    return {**body, "max_tokens": 6, **fields}


REQUESTS = st.lists(st.tuples(st.sampled_from(ENDPOINTS), PROMPTS,
                              st.lists(FIELD_VALUES, max_size=3).map(dict),
                              st.sampled_from([None, None, "at once", "after head"])),
                    min_size=1, max_size=6)
FAULTS = st.dictionaries(st.sampled_from(STAGES), st.sets(st.integers(0, 5), min_size=1, max_size=2), max_size=3)


def check_reply(reply, endpoint: str, faulty: bool) -> None:
    """Every reply is a whole answer or a JSON error; 500s only where a fault was injected."""
    if reply.status != 200:
        assert reply.status in (400, 404, 503) or (faulty and reply.status == 500), (reply.status, reply.body)
        assert "error" in reply.json()
        return
    content_type = reply.headers["content-type"]
    if content_type.startswith("text/event-stream") and endpoint == "/v1/responses":
        last = json.loads(reply.body.decode().rstrip().rsplit("data: ", 1)[1])
        assert last["type"] in ("response.completed", "response.incomplete") or \
            (faulty and last["type"] == "response.failed"), last
    elif content_type.startswith("text/event-stream"):
        assert reply.body.endswith(b"data: [DONE]\n\n")
        events = [json.loads(e[6:]) for e in reply.body.decode().split("\n\n") if e and e != "data: [DONE]"]
        assert faulty or not any("error" in e for e in events)
    elif content_type.startswith("application/x-ndjson"):
        lines = reply.lines()
        assert lines[-1].get("done") is True or (faulty and "error" in lines[-1])
    else:
        assert reply.json().get("error") is None


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(requests=REQUESTS, plan=FAULTS, max_batch=st.integers(1, 3), queue_size=st.integers(1, 4),
       chunk=st.sampled_from([8, 256]),
       model=st.sampled_from(["gpt2", "llama", "static", "static async", "static pipelined"]))
def test_any_mix_of_bodies_disconnects_and_failures_leaves_the_books_balanced(
        tiny_gpt2_folder, tiny_llama_folder, requests, plan, max_batch, queue_size, chunk, model):
    faults = Faults(plan={k: set(v) for k, v in plan.items()})
    # transformers' runner, ours, or the GPU's static one (on the CPU; "async": the
    # engine hands text off as it does beside a GPU, while the next step computes;
    # "pipelined": each step starts from the last one's tokens before they are read)
    folder = tiny_gpt2_folder if model == "gpt2" else tiny_llama_folder
    kind = "static" if model.startswith("static") else "auto"
    asynchronous, pipelined = model == "static async", model == "static pipelined"

    async def main(log_path):
        async with live_server(folder, log_path, faults=faults, max_batch=max_batch, queue_size=queue_size,
                               kind=kind, asynchronous=asynchronous, pipelined=pipelined) as live:
            live.engine.PREFILL_CHUNK = chunk  # 8: the tiny model's prompts are prefilled in chunks
            finals = count_finals(live.engine)
            model = live.engine.model_name
            replies = await asyncio.gather(*[
                http(live.port, "POST", endpoint, body_for(endpoint, model, prompt, fields), leave=leave)
                for endpoint, prompt, fields, leave in requests])
            await live.settled()
            for (endpoint, *_), reply in zip(requests, replies):
                if reply is not None:
                    check_reply(reply, endpoint, faulty=bool(plan))
            assert live.books() == {"free_slots": max_batch, "queued": 0, "active": 0, "live": 0}
            # Exactly one final event: from the model thread, or from the queue for one
            # whose client left before it got a slot.
            assert all(s.final is not None and finals[s.id] == (1 if s.in_model else 0) for s in live.streams)
            faults.plan.clear()  # the server must still answer normally
            after = await http(live.port, "POST", "/generate", {"prompt": "The quick", "max_tokens": 3,
                                                                "stream": False})
            assert after.status == 200 and after.json()["done"] is True
            await live.settled()
            logged = [line["id"] for line in live.log_lines()]
            assert sorted(logged) == sorted(s.id for s in live.streams), "one log line per request"

    with tempfile.TemporaryDirectory() as tmp, faulty_text_stages(faults):
        asyncio.run(main(Path(tmp) / "log.jsonl"))


MODES = {"step by step": {}, "async": {"asynchronous": True}, "pipelined": {"pipelined": True}}


def test_text_handed_off_while_the_device_computes_is_the_same_text(tiny_llama_folder, tmp_path):
    """Beside an asynchronous runner (a GPU) a step's text reaches the event loop while
    the next step computes instead of at the end of its own step, and pipelined, each
    step starts from the last one's sampled tokens before the host reads them: the same
    streamed texts and ends for requests streamed together, with rows ending at
    different steps."""
    bodies = [{"prompt": p, "max_tokens": n, "temperature": 0, "stream": True}
              for p, n in (("The quick brown fox", 9), ("A language model", 3), ("Streaming servers", 6))]

    def run(mode: str):
        async def main():
            async with live_server(tiny_llama_folder, tmp_path / f"{mode}.jsonl", kind="static", max_batch=3,
                                   **MODES[mode]) as live:
                assert (live.engine._asynchronous, live.engine._pipelined) == (mode != "step by step",
                                                                               mode == "pipelined")
                replies = await asyncio.gather(*[http(live.port, "POST", "/generate", b) for b in bodies])
                await live.settled()
                assert live.books() == {"free_slots": 3, "queued": 0, "active": 0, "live": 0}
                return [[line.get("response", "") for line in r.lines()] + [r.lines()[-1]["done_reason"]]
                        for r in replies]
        return asyncio.run(main())

    handed_off_later = run("async")
    assert handed_off_later == run("step by step") == run("pipelined")
    assert [len(r) for r in handed_off_later] != [len(handed_off_later[0])] * 3  # rows ended apart


def test_pipelined_steps_sample_what_steps_one_by_one_do(tiny_llama_folder, tmp_path):
    """Pipelined against step by step, for requests that wait for a slot and join the
    running batch at different steps (two slots for five), a prompt prefilled in chunks,
    seeded draws with repeat and frequency penalties, top-p without top-k, a stop string,
    and a JSON grammar: the same texts and ends."""
    requests = [("/generate", {"prompt": "The quick brown fox", "max_tokens": 9, "temperature": 0}),
                ("/generate", {"prompt": "A language model", "max_tokens": 3, "temperature": 0}),
                ("/generate", {"prompt": "Streaming servers send each piece", "max_tokens": 12, "temperature": 0.9,
                               "seed": 7, "repeat_penalty": 1.3, "top_k": 0, "top_p": 0.8}),
                ("/generate", {"prompt": "The lazy dog", "max_tokens": 10, "temperature": 1.2, "seed": 3,
                               "frequency_penalty": 1.0, "stop": ["e"]}),
                ("/api/generate", {"prompt": "Give JSON", "format": "json",
                                   "options": {"num_predict": 10, "temperature": 0.7, "seed": 1}})]

    def run(mode: str):
        async def main():
            async with live_server(tiny_llama_folder, tmp_path / f"{mode}.jsonl", kind="static", max_batch=2,
                                   **MODES[mode]) as live:
                live.engine.PREFILL_CHUNK = 8  # the third prompt is prefilled a chunk per step
                runner, inputs, events = live.engine._runner, [], []
                decode = runner.decode

                def traced_decode(tokens):
                    inputs.append(type(tokens).__name__)
                    events.append("decode")
                    return decode(tokens)
                runner.decode = traced_decode
                with tracing_host_copies(events):
                    replies = await asyncio.gather(*[
                        http(live.port, "POST", path, {"model": live.engine.model_name, "stream": False, **body})
                        for path, body in requests])
                await live.settled()
                assert live.books() == {"free_slots": 2, "queued": 0, "active": 0, "live": 0}
                assert all(r.status == 200 for r in replies), [r.json() for r in replies]
                # pipelined, steps start from the device's tokens (a tensor), not the host's
                assert ("Tensor" in inputs) == (mode == "pipelined") and "list" in inputs
                # pipelined, a step's tokens were on their way to the host before the next
                # step was launched, so reading them waited for their step alone
                assert bool(reads_after_a_later_step(events)) == (mode == "pipelined")
                return [(r.json()["response"], r.json()["done_reason"]) for r in replies]
        return asyncio.run(main())

    pipelined = run("pipelined")
    assert pipelined == run("step by step")
    assert all(text for text, _ in pipelined)


@pytest.mark.parametrize("mode", ["step by step", "pipelined"])
def test_a_failed_batch_sampling_is_logged_and_its_rows_sampled_one_by_one(tiny_llama_folder, tmp_path, caplog, mode):
    """The first batch's sampling fails: the engine says so once and samples its rows
    one by one, so both requests get the same text as without the failure."""
    bodies = [{"prompt": p, "max_tokens": 5, "temperature": 0, "stream": False} for p in ("The quick", "A model")]

    def run(faults: Faults):
        async def main():
            async with live_server(tiny_llama_folder, tmp_path / "log.jsonl", kind="static", max_batch=2,
                                   **MODES[mode]) as live:
                replies = await asyncio.gather(*[http(live.port, "POST", "/generate", b) for b in bodies])
                await live.settled()
                assert live.books() == {"free_slots": 2, "queued": 0, "active": 0, "live": 0}
                return [(r.status, r.json()["response"]) for r in replies]
        with faulty_text_stages(faults):
            return asyncio.run(main())

    clean = run(Faults())
    with caplog.at_level(logging.WARNING, logger="minivault.engine"):
        assert run(Faults(plan={"sample": {0}})) == clean
    said = [r.getMessage() for r in caplog.records if "sampling a batch" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("sampling a batch of ")
    assert said[0].endswith("failed (InjectedFault: injected failure in sample); sampling them row by row")
    assert all(status == 200 for status, _ in clean)


@contextlib.contextmanager
def tracing_host_copies(events: list):
    """Each HostCopy (sampled tokens on their way to the host) queued and read, into
    `events` as ("copy", n) and ("read", n)."""
    import transfer

    init, read = transfer.HostCopy.__init__, transfer.HostCopy.read

    def traced_init(self, tensor):
        init(self, tensor)
        events.append(("copy", id(self)))

    def traced_read(self):
        events.append(("read", id(self)))
        return read(self)

    transfer.HostCopy.__init__, transfer.HostCopy.read = traced_init, traced_read
    try:
        yield
    finally:
        transfer.HostCopy.__init__, transfer.HostCopy.read = init, read


def reads_after_a_later_step(events: list) -> list:
    """The copies read after a decode step launched since they were queued."""
    queued_at = {}
    later = []
    for i, event in enumerate(events):
        if event[0] == "copy":
            queued_at[event[1]] = i
        elif event[0] == "read" and "decode" in events[queued_at[event[1]]:i]:
            later.append(event[1])
    return later


def count_finals(engine) -> collections.Counter:
    """Final events the model thread hands back, per request id (duplicates included)."""
    counts = collections.Counter()
    real = engine._deliver

    def deliver(batch):
        for stream, item in batch:
            if isinstance(item, Final):
                counts[stream.id] += 1
        real(batch)

    engine._deliver = deliver
    return counts



# ---------------------------------------------------------------------------
# One regression test per row of issue 11's table that lives in the engine
# (the HTTP and validation rows are in test_api.py and test_http_sockets.py).


def answer_text(reply: dict) -> str:
    """The generated text of a non-streamed reply, in any of the API shapes."""
    if "choices" in reply:
        choice = reply["choices"][0]
        return choice["message"]["content"] if "message" in choice else choice["text"]
    return reply["message"]["content"] if "message" in reply else reply["response"]


def run_live(folder, tmp_path, scenario, **kwargs):
    async def main():
        async with live_server(folder, tmp_path / "log.jsonl", **kwargs) as live:
            await scenario(live)
            await live.settled()
            assert live.books() == {"free_slots": live.engine.max_batch, "queued": 0, "active": 0, "live": 0}
            return live.log_lines()
    return asyncio.run(main())


def generate(live, leave=None, **fields):
    return http(live.port, "POST", "/generate", {"prompt": "The quick brown fox", "max_tokens": 5, **fields},
                leave=leave)


@pytest.mark.parametrize("seed", [10 ** 23, 2 ** 64, 1e308, -(2 ** 70)])
def test_row1_an_out_of_range_seed_is_answered_beside_normal_requests(tiny_gpt2_folder, tmp_path, seed):
    async def scenario(live):
        replies = await asyncio.gather(*[generate(live, seed=seed, temperature=1) for _ in range(8)],
                                       *[generate(live) for _ in range(3)])
        assert all(r.status == 200 and r.lines()[-1]["done"] for r in replies), [r.body for r in replies]
    run_live(tiny_gpt2_folder, tmp_path, scenario, max_batch=2)


@pytest.mark.parametrize("endpoint", GENERATION_ENDPOINTS)
@pytest.mark.parametrize("temperature", [1e-300, 5e-324])
def test_row2_a_vanishing_temperature_is_greedy_on_every_endpoint(tiny_gpt2_folder, tmp_path, endpoint,
                                                                   temperature):
    async def scenario(live):
        model = live.engine.model_name
        tiny = body_for(endpoint, model, "The quick brown fox", {"temperature": temperature, "stream": False})
        greedy = body_for(endpoint, model, "The quick brown fox", {"temperature": 0, "stream": False})
        replies = await asyncio.gather(http(live.port, "POST", endpoint, tiny),
                                       http(live.port, "POST", endpoint, greedy))
        assert [r.status for r in replies] == [200, 200]
        assert answer_text(replies[0].json()) == answer_text(replies[1].json())
    run_live(tiny_gpt2_folder, tmp_path, scenario, max_batch=2)


def test_row3_a_client_that_leaves_before_its_handler_listens_still_stops_its_generation(
        tiny_gpt2_folder, tmp_path):
    gated = {}

    async def scenario(live):
        await generate(live, leave="at once", stream=False, max_tokens=-1)
        await wait_until(lambda: live.streams and live.streams[0].cancelled)
        gated["runner"].gate.set()

    from runner import load_runner
    from modelsource import resolve_model

    gated["runner"] = GatedRunner(load_runner(resolve_model(str(tiny_gpt2_folder)), "float32", None))
    lines = run_live(tiny_gpt2_folder, tmp_path, scenario, runner=gated["runner"])
    assert [(line["status"], line["done_reason"]) for line in lines] == [("cancelled", "cancelled")]


def test_row4_every_request_writes_its_log_line_whoever_leaves_when(tiny_gpt2_folder, tmp_path):
    async def scenario(live):
        await asyncio.gather(generate(live, leave="at once"), generate(live, leave="after head"),
                             generate(live, seed=2 ** 80), generate(live, temperature=1e-300, stream=False))
    lines = run_live(tiny_gpt2_folder, tmp_path, scenario, max_batch=1)
    assert len(lines) == 4 and len({line["id"] for line in lines}) == 4


def test_row5_queued_clients_that_leave_give_their_places_back_at_once(tiny_gpt2_folder, tmp_path):
    from modelsource import resolve_model
    from runner import load_runner

    gated = GatedRunner(load_runner(resolve_model(str(tiny_gpt2_folder)), "float32", None))

    async def scenario(live):
        running = asyncio.ensure_future(generate(live))
        await wait_until(lambda: gated.waiting.is_set())  # the one slot is taken
        for _ in range(4):
            await generate(live, leave="at once")
        await wait_until(lambda: len(live.streams) == 5)
        await wait_until(lambda: live.engine.queued == 0)  # not when a slot frees: now
        newcomer = asyncio.ensure_future(generate(live))
        await wait_until(lambda: len(live.streams) == 6)
        assert live.engine.queued == 1  # admitted to the queue, not refused with 503
        gated.gate.set()
        assert (await running).status == 200 and (await newcomer).status == 200

    lines = run_live(tiny_gpt2_folder, tmp_path, scenario, runner=gated, max_batch=1, queue_size=4)
    assert sorted(line["status"] for line in lines) == ["cancelled"] * 4 + ["done"] * 2


def test_row6_text_held_back_for_a_stop_string_that_never_comes_is_kept_at_the_end(tiny_gpt2_folder, tmp_path):
    from transformers import AutoTokenizer

    scripted = ScriptedRunner(AutoTokenizer.from_pretrained(tiny_gpt2_folder), "How are you today?")

    async def scenario(live):
        for stop in (None, ["?ZZZ"], "y?Z"):
            for stream in (True, False):
                reply = await generate(live, stop=stop, stream=stream, max_tokens=50)
                text = "".join(line["response"] for line in reply.lines())
                assert text == "How are you today?", (stop, stream, text)
                assert reply.lines()[-1]["done_reason"] == "stop"
    run_live(tiny_gpt2_folder, tmp_path, scenario, runner=scripted)


def test_row11_a_prompt_too_long_for_the_context_is_refused_before_the_model_thread(tiny_gpt2_folder, tmp_path):
    faults = Faults()  # counts the calls of every stage, fails none

    async def scenario(live):
        limit = live.engine.facts.max_prompt_chars
        reply = await http(live.port, "POST", "/generate", {"prompt": "x" * (limit + 1)})
        assert reply.status == 400 and "characters" in reply.json()["error"]
        assert faults.calls.get("prepare", 0) == 0  # never tokenised
        reply = await http(live.port, "POST", "/generate", {"prompt": "0123456789" * 10})  # fits the
        assert reply.status == 400 and "tokens" in reply.json()["error"]  # characters, not the tokens
        long = "x" * (limit + 1)  # an embedding may be truncated instead, as Ollama's default asks
        reply = await http(live.port, "POST", "/api/embed", {"model": live.engine.model_name, "input": long})
        assert reply.status == 200 and len(reply.json()["embeddings"]) == 1
        reply = await http(live.port, "POST", "/api/embed",
                           {"model": live.engine.model_name, "input": long, "truncate": False})
        assert reply.status == 400
    run_live(tiny_gpt2_folder, tmp_path, scenario, faults=faults)


# ---------------------------------------------------------------------------
# A long embedding is computed a chunk per step, like a long prompt's prefill.

LONG_INPUT = list(range(10, 70))  # token ids: 8 chunks of 8, within both tiny models' context


def hooked_runner(folder) -> EmbeddingHookedRunner:
    from modelsource import resolve_model
    from runner import load_runner

    return EmbeddingHookedRunner(load_runner(resolve_model(str(folder)), "float32", None))


def embed_body(live) -> dict:
    return {"model": live.engine.model_name, "input": [LONG_INPUT]}


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_a_generation_beside_a_long_embedding_gets_its_tokens_before_the_embedding_ends(
        tiny_llama_folder, tiny_gpt2_folder, tmp_path, model):
    """The generation arrives while the embedding's second chunk is about to compute:
    it streams, and ends, while the embedding goes on, and the embedding's vector is
    the one it has alone."""
    folder = tiny_llama_folder if model == "llama" else tiny_gpt2_folder
    hooked = hooked_runner(folder)
    order = []
    replies = {}

    async def scenario(live):
        live.engine.PREFILL_CHUNK = 8
        hooked.loop = asyncio.get_running_loop()

        async def a_generation_arrives():
            replies["generation"] = asyncio.ensure_future(generate(live, temperature=0, max_tokens=4))
            await wait_until(lambda: len(live.streams) == 2 and live.streams[1].in_model)
            generation = live.streams[1]
            generation.on_final(lambda s: order.append(("generation ended", len(s.text) > 0)))
            embedding.on_final(lambda s: order.append(("embedding ended", len(generation.text) > 0)))

        hooked.hooks[1] = a_generation_arrives
        beside = asyncio.ensure_future(http(live.port, "POST", "/v1/embeddings", embed_body(live)))
        await wait_until(lambda: live.streams)
        embedding = live.streams[0]
        replies["beside"] = await beside
        if "generation" in replies:
            replies["generation"] = await replies["generation"]
        replies["alone"] = await http(live.port, "POST", "/v1/embeddings", embed_body(live))

    lines = run_live(folder, tmp_path, scenario, runner=hooked, max_batch=2)
    assert replies["beside"].status == replies["alone"].status == 200
    assert order == [("generation ended", True), ("embedding ended", True)]
    assert replies["generation"].status == 200 and replies["generation"].lines()[-1]["done"] is True
    assert replies["beside"].json()["data"] == replies["alone"].json()["data"]
    assert [line["status"] for line in lines] == ["done"] * 3


def test_an_embedding_whose_client_leaves_stops_at_its_next_chunk_and_is_logged_cancelled(
        tiny_llama_folder, tmp_path):
    hooked = hooked_runner(tiny_llama_folder)

    async def scenario(live):
        live.engine.PREFILL_CHUNK = 8
        hooked.loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)

        async def the_client_leaves():
            writer.close()
            await wait_until(lambda: live.streams[0].cancelled)

        hooked.hooks[2] = the_client_leaves  # while the third of 8 chunks is about to compute
        data = json.dumps(embed_body(live)).encode()
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        await writer.drain()
        await wait_until(lambda: live.streams and live.streams[0].final is not None)
        assert live.streams[0].final.done_reason == "cancelled", live.streams[0].final
        assert hooked.chunks == 3  # it stopped before the fourth
        after = await http(live.port, "POST", "/v1/embeddings", embed_body(live))  # the engine goes on
        assert after.status == 200 and len(after.json()["data"]) == 1
        assert hooked.chunks == 3 + 8

    lines = run_live(tiny_llama_folder, tmp_path, scenario, runner=hooked)
    assert [(line["status"], line["done_reason"]) for line in lines] == [("cancelled", "cancelled"),
                                                                         ("done", "stop")]


# ---------------------------------------------------------------------------
# Text written from the hand-back itself (TokenStream.follow), and queued for the
# handler while the client's socket is backed up.


def streamed_text(reply, endpoint: str) -> str:
    """The text of a streamed reply, in any of the generation shapes."""
    if endpoint in ("/v1/completions", "/v1/chat/completions"):
        events = [json.loads(e[6:]) for e in reply.body.decode().split("\n\n") if e and e != "data: [DONE]"]
        choices = [e["choices"][0] for e in events if e.get("choices")]
        return "".join(c.get("text") or c.get("delta", {}).get("content") or "" for c in choices)
    return "".join(line.get("response") or line.get("message", {}).get("content", "") for line in reply.lines())


@contextlib.contextmanager
def followed_texts(taken: list):
    """Every text a stream's `take` writes straight from the hand-back, into `taken`
    as (request id, text) while it is being taken."""
    import engine

    real = engine.TokenStream.follow

    def follow(self, take):
        def counted(text):
            taken.append((self.id, text))
            try:
                return take(text)
            finally:
                taken.append(None)
        real(self, counted)

    engine.TokenStream.follow = follow
    try:
        yield
    finally:
        engine.TokenStream.follow = real


def texts_taken(taken: list) -> list:
    return [t for t in taken if t is not None]


def paced_script(folder) -> LoopPacedRunner:
    """A reply of many pieces whatever the prompt (the tiny random model's greedy text
    depends on the weights it drew, and can be empty), each step after the event loop
    has caught up with the last: whether text is queued when a handler follows its
    stream then depends on the test's plan alone, not on the machine's speed or load."""
    from transformers import AutoTokenizer

    return LoopPacedRunner(ScriptedRunner(AutoTokenizer.from_pretrained(folder),
                                          "Every piece of this reply comes in a step of its own, in order.",
                                          context_length=256))


@pytest.mark.parametrize("endpoint", GENERATION_ENDPOINTS)
def test_streams_whose_sockets_back_up_now_and_then_get_every_piece_in_order(tiny_gpt2_folder, tmp_path,
                                                                             endpoint, monkeypatch):
    import httpserver

    # Two chunks in every six of a connection back its socket up, each until the model
    # begins its third step from then (two steps' text queued by then): the text after
    # the first queues for the handler, which waits for the socket; the second backs up
    # while text is still queued (following the stream then would put the next step's
    # text before it); the handler then writes what queued, and follows the stream
    # again once nothing is.
    real, calls = httpserver._Connection.write_now, collections.Counter()
    paced = paced_script(tiny_gpt2_folder)

    def write_now(self, data):
        calls[self] += 1  # the head is 1, the first piece 2
        if real(self, data) and calls[self] % 6 not in (2, 3):
            return True
        self._can_write.clear()
        paced.after_steps(3, self._can_write.set)
        asyncio.get_running_loop().call_later(0.2, self._can_write.set)  # should the batch end first
        return False
    monkeypatch.setattr(httpserver._Connection, "write_now", write_now)
    taken: list = []

    async def scenario(live):
        paced.loop = asyncio.get_running_loop()
        body = body_for(endpoint, live.engine.model_name, "The quick brown fox",
                        {"temperature": 0, "max_tokens": 16, "stream": True})
        replies[:] = await asyncio.gather(*[http(live.port, "POST", endpoint, body) for _ in range(3)])

    replies: list = []
    with followed_texts(taken):
        lines = run_live(tiny_gpt2_folder, tmp_path, scenario, max_batch=2, runner=paced)
    logged = {line["id"]: line["response"] for line in lines}
    assert [r.status for r in replies] == [200] * 3
    assert [streamed_text(r, endpoint) for r in replies] == [logged[int(r.headers["x-request-id"])] for r in replies]
    assert texts_taken(taken), "no text was written from the hand-back"
    assert all(logged.values())


def test_a_chunk_that_fails_to_encode_in_the_hand_back_ends_its_stream_alone(tiny_gpt2_folder, tmp_path,
                                                                             monkeypatch, caplog):
    import replies as shapes

    real, failed, taken = shapes.Shape.piece, [], []

    def piece(self, text):
        # The first chunk encoded inside a `take` (the hand-back), of whichever stream
        # gets there first, fails.
        if not failed and taken and taken[-1] is not None:
            failed.append(self.request_id)
            raise RuntimeError("injected failure encoding a chunk")
        return real(self, text)
    monkeypatch.setattr(shapes.Shape, "piece", piece)

    paced = paced_script(tiny_gpt2_folder)

    async def scenario(live):
        paced.loop = asyncio.get_running_loop()
        body = {"prompt": "The quick brown fox", "temperature": 0, "max_tokens": 16}
        replies[:] = await asyncio.gather(*[http(live.port, "POST", "/generate", body) for _ in range(2)])

    replies: list = []
    with followed_texts(taken), caplog.at_level(logging.ERROR, logger="minivault"):
        lines = run_live(tiny_gpt2_folder, tmp_path, scenario, max_batch=2, runner=paced)
    assert failed, "no chunk was encoded in the hand-back"
    by_id = {int(r.headers["x-request-id"]): r for r in replies}
    victim, other = by_id.pop(failed[0]), next(iter(by_id.values()))
    assert victim.status == 200 and victim.lines()[-1] == {"error": "internal server error"}
    assert victim.lines()[:-1] and all("response" in line for line in victim.lines()[:-1])
    assert other.lines()[-1]["done"] is True
    assert streamed_text(other, "/generate") == next(line["response"] for line in lines if line["id"] != failed[0])
    assert "injected failure encoding a chunk" in caplog.text


def test_stopping_while_the_model_loads_ends_and_logs_every_request_it_was_handed(tiny_gpt2_folder, tmp_path,
                                                                                  caplog):
    """The feeder hands requests to the model thread while it loads; a load cannot be
    stopped, so on shutdown those requests end (cancelled, logged) from the event loop.
    They used to get no final event and no log line, and the slots stayed taken."""
    import threading

    from api import Api
    from engine import Engine
    from httpserver import HTTPServer, Limits, Router
    from metrics import Metrics
    from requestlog import RequestLog

    loading = threading.Event()
    release = threading.Event()

    def load(source, dtype, cache_dir):
        loading.set()
        release.wait(30)
        raise RuntimeError("load given up by the test")

    async def main():
        engine = Engine(model=str(tiny_gpt2_folder), cache_dir=None, load_runner=load, max_batch=2, queue_size=4)
        router = Router()
        server = HTTPServer(router, Limits())
        request_log = RequestLog(str(tmp_path / "log.jsonl"))
        api = Api(engine, request_log, metrics=Metrics(), is_draining=lambda: server.draining)
        api.routes(router)
        await server.start("127.0.0.1", 0)
        engine.start()
        streams = []
        real_submit = engine.submit
        engine.submit = lambda request: streams.append(real_submit(request)) or streams[-1]
        clients = [asyncio.ensure_future(http(server.port, "POST", "/generate", {"prompt": "The quick brown fox"}))
                   for _ in range(3)]
        await wait_until(lambda: len(streams) == 3 and sum(s.in_model for s in streams) == 2)
        assert loading.is_set() and not engine.ready
        await server.shutdown(0)
        await engine.close()
        assert all(s.final is not None and s.final.done_reason == "cancelled" for s in streams)
        assert engine.active_count == 0 and engine.queued == 0
        await asyncio.gather(*clients, return_exceptions=True)
        release.set()  # the load ends (failed) and the thread hands back its own finals: ignored
        await asyncio.get_running_loop().run_in_executor(None, engine._thread.join, 30)
        await asyncio.sleep(0)
        request_log.close()
        return streams, [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]

    with caplog.at_level(logging.ERROR, logger="minivault.engine"):
        streams, lines = asyncio.run(main())
    assert sorted(line["id"] for line in lines) == [s.id for s in streams]
    assert {line["status"] for line in lines} == {"cancelled"}
    assert "second final event" not in caplog.text


def test_a_client_that_leaves_after_a_large_body_still_stops_its_generation(tiny_gpt2_folder, tmp_path):
    """A body over the connection's read high-water mark (256 KiB) paused reading, and
    nothing resumed it once the body was read: the client's leaving went unseen while
    its handler ran, and a non-streamed generation ran to its end, logged done."""
    from modelsource import resolve_model
    from runner import load_runner

    gated = GatedRunner(load_runner(resolve_model(str(tiny_gpt2_folder)), "float32", None))
    body = json.dumps({"prompt": "The quick brown fox", "max_tokens": -1, "stream": False}).encode()
    body += b" " * 400_000  # whitespace after the JSON value: still one valid body

    async def scenario(live):
        await http(live.port, "POST", "/generate", body, leave="at once")
        await wait_until(lambda: live.streams and live.streams[0].cancelled)
        gated.gate.set()

    lines = run_live(tiny_gpt2_folder, tmp_path, scenario, runner=gated)
    assert [(line["status"], line["done_reason"]) for line in lines] == [("cancelled", "cancelled")]


def test_a_queued_generation_when_the_drain_time_ends_gets_503_and_one_log_line(tiny_gpt2_folder, tmp_path):
    """Shutdown: the stream under way is cut, the request still queued behind it is
    answered 503 (it used to see its connection reset), and each is logged once."""
    from modelsource import resolve_model
    from runner import load_runner

    gated = GatedRunner(load_runner(resolve_model(str(tiny_gpt2_folder)), "float32", None))

    async def main():
        async with live_server(tiny_gpt2_folder, tmp_path / "log.jsonl", runner=gated, max_batch=1) as live:
            live.server.observer = live.api.observe_response  # as minivault.py wires it
            running = asyncio.ensure_future(generate(live, max_tokens=-1))
            await wait_until(lambda: gated.waiting.is_set())
            queued = asyncio.ensure_future(http(live.port, "POST", "/v1/chat/completions", {
                "model": live.engine.model_name, "messages": [{"role": "user", "content": "Hi"}]}))
            await wait_until(lambda: live.engine.queued == 1)
            await live.server.shutdown(0.0)
            gated.gate.set()
            await live.engine.close()
            reply = await queued
            assert reply.status == 503 and reply.headers["retry-after"]
            assert reply.json()["error"]["message"] == "server is shutting down"  # OpenAI's shape under /v1/
            assert isinstance(await asyncio.gather(running, return_exceptions=True), list)
            await live.settled()
            assert live.books() == {"free_slots": 1, "queued": 0, "active": 0, "live": 0}
            text = live.api.metrics.render()
            assert 'minivault_http_responses_total{code="503",route="/v1/chat/completions"} 1' in text
            assert 'code="200",route="/v1/chat/completions"' not in text
            return live.log_lines()

    lines = asyncio.run(main())
    assert sorted((line["endpoint"], line["status"]) for line in lines) == [
        ("/generate", "cancelled"), ("/v1/chat/completions", "cancelled")]


class AdvancePermitRunner:
    """A real runner whose chunked prefill computes one chunk per permit the test gives."""

    def __init__(self, runner):
        import threading

        self._runner = runner
        self.permits = threading.Semaphore(0)
        self.waiting = threading.Event()  # a chunk is waiting for its permit

    def advance(self, partial, tokens):
        self.waiting.set()
        assert self.permits.acquire(timeout=30), "the test gave no permit"
        self.waiting.clear()
        return self._runner.advance(partial, tokens)

    def __getattr__(self, name):
        return getattr(self._runner, name)


def test_a_long_prompt_cancelled_behind_another_ends_at_the_next_step(tiny_gpt2_folder, tmp_path):
    """Only the long prompt at the front of the chunked prefills was checked for a
    client that left: one behind it kept its slot until every prompt before it was
    prefilled."""
    from engine import GenerationRequest
    from modelsource import resolve_model
    from runner import load_runner

    runner = AdvancePermitRunner(load_runner(resolve_model(str(tiny_gpt2_folder)), "float32", None))
    long_prompt = "The quick brown fox jumps over the lazy dog. " * 3  # several chunks of 8 tokens

    async def main():
        async with live_server(tiny_gpt2_folder, tmp_path / "log.jsonl", runner=runner, max_batch=3) as live:
            live.engine.PREFILL_CHUNK = 8
            front = live.engine.submit(GenerationRequest(prompt=long_prompt, raw=True, max_tokens=2))
            await wait_until(lambda: runner.waiting.is_set())  # its first chunk waits for a permit
            behind = live.engine.submit(GenerationRequest(prompt=long_prompt, raw=True, max_tokens=2))
            await wait_until(lambda: behind.in_model)
            runner.permits.release()  # the front's first chunk; meanwhile the one behind arrives
            await wait_until(lambda: runner.waiting.is_set() and len(live.engine._long) == 2)
            behind.cancel()
            runner.permits.release()  # one more chunk of the front's, and a step after it
            await wait_until(lambda: behind.final is not None)
            assert front.final is None  # the front is still being prefilled
            assert live.engine.free_slots == 2
            for _ in range(64):
                runner.permits.release()
            await live.settled()
            assert front.final.done_reason in ("stop", "length") and behind.final.done_reason == "cancelled"

    asyncio.run(main())


JSON_FORMAT = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def test_a_grammar_is_compiled_before_the_model_thread_takes_the_request(tiny_gpt2_folder, tmp_path, monkeypatch):
    """The model thread only copies a matcher compiled on the compile worker (compiling
    there stalled every running stream), the API's check of the grammar runs off the
    event loop, and the tokenizer's trie exists from load."""
    import threading

    import constraints

    compiled_on, real = [], constraints.Grammars.compiled
    checked_on, check = [], constraints.Constraint._compiled.__func__

    def compiled(self, constraint):
        compiled_on.append(threading.current_thread().name)
        return real(self, constraint)

    def checked(cls, make, name):  # the API edge's check of the grammar, before queuing
        checked_on.append(threading.current_thread() is threading.main_thread())
        return check(cls, make, name)
    monkeypatch.setattr(constraints.Grammars, "compiled", compiled)
    monkeypatch.setattr(constraints.Constraint, "_compiled", classmethod(checked))

    async def main():
        async with live_server(tiny_gpt2_folder, tmp_path / "log.jsonl", max_batch=2) as live:
            built_at_load = live.engine._grammars is not None
            replies = await asyncio.gather(*[
                http(live.port, "POST", "/generate", {"prompt": f"Give JSON {i}", "format": JSON_FORMAT,
                                                      "stream": False, "max_tokens": 12})
                for i in range(3)])
            await live.settled()
            return built_at_load, replies, [s.request.compiled is not None for s in live.streams], live.books()
    built_at_load, replies, compiled_first, books = asyncio.run(main())
    assert built_at_load
    assert [r.status for r in replies] == [200] * 3
    assert compiled_first == [True] * 3
    assert compiled_on and all(name.startswith("grammar-compile") for name in compiled_on)
    assert checked_on == [False] * 3  # not on the event loop's thread either
    assert books == {"free_slots": 2, "queued": 0, "active": 0, "live": 0}


def test_a_grammar_that_fails_to_compile_is_a_400_naming_the_field_and_takes_no_slot(tiny_gpt2_folder, tmp_path,
                                                                                      monkeypatch):
    import constraints

    def refuse(self, constraint):
        raise constraints.ConstraintInvalid("grammar too large for this tokenizer")
    monkeypatch.setattr(constraints.Grammars, "compiled", refuse)

    async def main():
        async with live_server(tiny_gpt2_folder, tmp_path / "log.jsonl", max_batch=2) as live:
            refused = await http(live.port, "POST", "/generate", {"prompt": "x", "format": JSON_FORMAT,
                                                                  "stream": False})
            several = await http(live.port, "POST", "/v1/completions", {
                "model": tiny_gpt2_folder.name, "prompt": ["a", "b"], "max_tokens": 3, "response_format": {"type": "json_object"}})
            plain = await http(live.port, "POST", "/generate", {"prompt": "x", "max_tokens": 3})
            await live.settled()
            return refused, several, plain, len(live.streams), live.books()
    refused, several, plain, submitted, books = asyncio.run(main())
    assert refused.status == 400 and "format" in refused.json()["error"]
    assert "grammar too large for this tokenizer" in refused.json()["error"]
    assert several.status == 400 and "prompt[0]" in several.json()["error"]["message"]
    assert plain.status == 200
    assert submitted == 1  # the refused ones were never queued
    assert books == {"free_slots": 2, "queued": 0, "active": 0, "live": 0}


def test_a_client_that_leaves_while_its_grammar_compiles_ends_cancelled_and_frees_everything(
        tiny_gpt2_folder, tmp_path, monkeypatch):
    import threading

    import constraints

    started, release, real = threading.Event(), threading.Event(), constraints.Grammars.compiled

    def slow(self, constraint):
        started.set()
        release.wait(20)
        return real(self, constraint)
    monkeypatch.setattr(constraints.Grammars, "compiled", slow)

    async def main():
        async with live_server(tiny_gpt2_folder, tmp_path / "log.jsonl", max_batch=2) as live:
            await http(live.port, "POST", "/generate", {"prompt": "x", "format": "json", "max_tokens": -1},
                       leave="at once")
            await wait_until(started.is_set)
            release.set()
            after = await http(live.port, "POST", "/generate", {"prompt": "y", "max_tokens": 3})
            await live.settled()
            return after, {s.request.prompt: s.final.done_reason for s in live.streams}, live.books()
    after, reasons, books = asyncio.run(main())
    assert after.status == 200 and reasons["y"] == "length"
    assert reasons.get("x", "cancelled") == "cancelled"  # cancelled as it is queued, or never queued
    assert books == {"free_slots": 2, "queued": 0, "active": 0, "live": 0}
