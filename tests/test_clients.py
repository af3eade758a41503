"""The official `ollama` and `openai` Python clients, and curl, against a running server."""

from __future__ import annotations

import json
import shutil
import subprocess

import ollama
import openai
import pytest

from serverproc import wait_for_log

GREEDY = {"temperature": 0}


# ---- ollama ----

def test_ollama_generate_streamed_equals_not_streamed(ol):
    options = {"num_predict": 16, **GREEDY}
    whole = ol.generate(model="smollm2", prompt="What is an AI model?", options=options)
    parts = list(ol.generate(model="smollm2", prompt="What is an AI model?", options=options, stream=True))
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 16
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].done and parts[-1].eval_count == 16 and parts[-1].model == "smollm2"
    assert all(p.created_at for p in parts)


def test_ollama_chat_streamed_equals_not_streamed(ol):
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hi."}]
    options = {"num_predict": 12, **GREEDY}
    whole = ol.chat(model="smollm2-135m-instruct", messages=messages, options=options)
    parts = list(ol.chat(model="smollm2-135m-instruct", messages=messages, options=options, stream=True))
    assert whole.message.role == "assistant" and whole.message.content
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")


def test_ollama_chat_keeps_the_conversation(ol):
    first = [{"role": "user", "content": "Hello"}]
    longer = first + [{"role": "assistant", "content": "Hi! How can I help?"},
                      {"role": "user", "content": "Tell me a fact."}]
    a = ol.chat(model="smollm2", messages=first, options={"num_predict": 1})
    b = ol.chat(model="smollm2", messages=longer, options={"num_predict": 1})
    assert b.prompt_eval_count > a.prompt_eval_count


def test_ollama_stop_sequence_and_max_tokens(ol):
    options = {"num_predict": 40, **GREEDY}
    full = ol.generate(model="smollm2", prompt="List the days of the week.", options=options).response
    stop = full.split()[len(full.split()) // 2]
    cut = ol.generate(model="smollm2", prompt="List the days of the week.", options={**options, "stop": [stop]})
    assert cut.response == full[: full.index(stop)] and cut.done_reason == "stop"


def test_ollama_empty_prompt_loads_the_model_as_ollama_does(ol):
    loaded = ol.generate(model="smollm2", prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    chat = ol.chat(model="smollm2", messages=[])
    assert chat.done and chat.done_reason == "load"


def test_ollama_generate_answers_a_system_prompt_alone(ol):
    reply = ol.generate(model="smollm2", system="You are a pirate. Greet the user.", options={"num_predict": 4})
    assert reply.done and reply.eval_count >= 1 and reply.response  # a 400 'prompt is required' before


def test_ollama_keep_alive_zero_answers_unload_and_pull_knows_the_served_model(ol):
    assert ol.generate(model="smollm2", prompt="", keep_alive=0).done_reason == "unload"
    assert ol.pull("smollm2").status == "success"
    assert [p.status for p in ol.pull("smollm2", stream=True)][-1] == "success"
    with pytest.raises(ollama.ResponseError) as err:
        ol.pull("llama3:8b")
    assert err.value.status_code == 404


def test_ollama_model_management_is_refused_clearly_not_as_a_missing_model(ol, tmp_path):
    blob = tmp_path / "adapter.bin"
    blob.write_bytes(b"weights")
    calls = {"delete": lambda: ol.delete("smollm2"), "copy": lambda: ol.copy("smollm2", "mine"),
             "create": lambda: ol.create(model="mine", from_="smollm2"),
             "push": lambda: list(ol.push("smollm2", stream=True)), "upload blobs": lambda: ol.create_blob(blob)}
    for verb, call in calls.items():
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 501 and f"cannot {verb}" in err.value.error


def test_ollama_fields_that_cannot_be_honoured_are_refused(ol):
    with pytest.raises(ollama.ResponseError) as err:
        ol.generate(model="smollm2", prompt="def f(", suffix="    return 1")
    assert err.value.status_code == 400 and "suffix" in err.value.error
    for kwargs in (dict(format={"type": "objekt"}), dict(think=True)):  # never a 200 that ignores them
        with pytest.raises(ollama.ResponseError) as err:
            ol.chat(model="smollm2", messages=[{"role": "user", "content": "hi"}], **kwargs)
        assert err.value.status_code == 400 and list(kwargs)[0] in err.value.error


def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b))  # the vectors are L2-normalised


PAIRS = [("The cat sat on the mat.", "A kitten rested on the rug.", "Stock markets fell sharply today."),
         ("How do I bake bread?", "What is a recipe for making bread?", "The train leaves at noon.")]


def test_ollama_embed_is_deterministic_alone_or_batched_and_ranks_a_paraphrase_first(ol):
    for text, paraphrase, unrelated in PAIRS:
        alone = ol.embed(model="smollm2", input=text)
        batch = ol.embed(model="smollm2", input=[text, paraphrase, unrelated]).embeddings
        assert alone.embeddings[0] == batch[0] == ol.embed(model="smollm2", input=text).embeddings[0]
        assert abs(cosine(batch[0], batch[0]) - 1) < 1e-5
        assert cosine(batch[0], batch[1]) > cosine(batch[0], batch[2])
    assert ol.embeddings(model="smollm2", prompt=PAIRS[0][0]).embedding == alone_vector(ol, PAIRS[0][0])


def test_ollama_embed_without_input_answers_no_embeddings_as_ollama_does(ol):
    for kwargs in ({}, {"input": ""}, {"input": []}):  # the client's default input is '': a preload
        reply = ol.embed(model="smollm2", **kwargs)
        assert reply.embeddings == [] and reply.model == "smollm2"
    with pytest.raises(ollama.ResponseError) as err:
        ol.embed(model="smollm2", input=["a", ""])  # an empty text among others is still refused
    assert err.value.status_code == 400


def alone_vector(ol, text):
    return ol.embed(model="smollm2", input=text).embeddings[0]


def test_ollama_model_not_found(ol):
    with pytest.raises(ollama.ResponseError) as err:
        ol.generate(model="llama3:8b", prompt="hi")
    assert err.value.status_code == 404 and err.value.error == "model 'llama3:8b' not found"


def test_ollama_invalid_request(ol):
    with pytest.raises(ollama.ResponseError) as err:
        ol.generate(model="smollm2", prompt="hi", options={"temperature": "hot"})
    assert err.value.status_code == 400 and "temperature" in err.value.error


def test_ollama_list_show_ps(ol, server):
    models = ol.list().models
    assert [m.model for m in models] == ["smollm2:latest"]  # name:tag, as Ollama lists it
    assert models[0].details.family == "llama" and models[0].details.parameter_size == "135M"
    shown = ol.show("smollm2")
    assert "im_start" in shown.template and shown.modelinfo["llama.context_length"] == 8192
    assert shown.modelinfo["minivault.device"] == "cpu" and shown.modelinfo["minivault.dtype"]  # what serves
    assert ol.ps().models[0].context_length == 8192 and ol.ps().models[0].size_vram == 0
    assert server.request("GET", "/api/version").json()["version"]


# ---- openai ----

def test_openai_chat_streamed_equals_not_streamed(oa):
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": "Name a colour."}],
                  max_tokens=12, temperature=0, seed=1)
    whole = oa.chat.completions.create(**kwargs)
    events = list(oa.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == whole.choices[0].message.content and text
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    finishes = [e.choices[0].finish_reason for e in events if e.choices and e.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens


def test_openai_completion_streamed_equals_not_streamed(oa):
    kwargs = dict(model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0)
    whole = oa.completions.create(**kwargs)
    events = list(oa.completions.create(stream=True, **kwargs))
    assert "".join(e.choices[0].text for e in events) == whole.choices[0].text
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 8


def test_openai_completion_of_several_prompts_has_a_choice_each_as_langchain_batches_them(oa, server):
    prompts = ["The capital of France is", "One, two,"]
    kwargs = dict(model="smollm2", max_tokens=6, temperature=0)
    both = oa.completions.create(prompt=prompts, **kwargs)
    alone = [oa.completions.create(prompt=p, **kwargs) for p in prompts]
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [a.choices[0].text for a in alone]
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    from langchain_openai import OpenAI as LangChainOpenAI  # .batch sends one request of all its prompts

    llm = LangChainOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", model="smollm2",
                          max_tokens=6, temperature=0, max_retries=0)
    assert llm.batch(prompts) == [a.choices[0].text for a in alone]
    with pytest.raises(openai.BadRequestError) as err:
        oa.completions.create(prompt=[504, 2960], **kwargs)
    assert "token ids" in err.value.body["message"]


def test_openai_completion_of_several_prompts_answers_the_first_failure_and_stops_the_others(oa, server):
    first = "Write a very long essay about every river of Europe."
    with pytest.raises(openai.BadRequestError) as err:  # the second is past the context, found at tokenising
        oa.completions.create(model="smollm2", prompt=[first, "word " * 9000], max_tokens=2000)
    assert err.value.body["message"].startswith("'prompt[1]': prompt is")
    record = wait_for_log(server.log_file, lambda r: r["endpoint"] == "/v1/completions" and r["prompt"] == first)
    assert record["status"] == "cancelled"  # not left to generate its 2000 tokens for nobody


def test_openai_stop_and_max_completion_tokens(oa):
    base = dict(model="smollm2", messages=[{"role": "user", "content": "Count from one to ten in words."}],
                temperature=0)
    full = oa.chat.completions.create(max_completion_tokens=30, **base).choices[0].message.content
    stop = full.split()[len(full.split()) // 2]
    cut = oa.chat.completions.create(max_completion_tokens=30, stop=[stop], **base).choices[0]
    assert cut.message.content == full[: full.index(stop)] and cut.finish_reason == "stop"


def test_openai_embeddings_float_base64_and_token_ids(oa, ol):
    import base64
    import struct

    text = PAIRS[0][0]
    floats = oa.embeddings.create(model="smollm2", input=[text, PAIRS[0][1]])
    assert [d.index for d in floats.data] == [0, 1] and floats.usage.prompt_tokens > 0
    assert floats.data[0].embedding == alone_vector(ol, text)
    packed = oa.embeddings.create(model="smollm2", input=text, encoding_format="base64").data[0].embedding
    decoded = struct.unpack(f"<{len(packed) * 3 // 4 // 4}f", base64.b64decode(packed))
    assert max(abs(a - b) for a, b in zip(decoded, floats.data[0].embedding)) < 1e-6
    ids = oa.embeddings.create(model="smollm2", input=[[504, 2960, 2352]]).data[0].embedding
    assert len(ids) == len(floats.data[0].embedding)
    with pytest.raises(openai.BadRequestError):
        oa.embeddings.create(model="smollm2", input=text, dimensions=8)


def test_openai_responses_streamed_equals_not_streamed(oa):
    kwargs = dict(model="smollm2", instructions="Be brief.", max_output_tokens=16, temperature=0,
                  input=[{"role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}])
    whole = oa.responses.create(**kwargs)
    assert whole.object == "response" and whole.output_text and whole.usage.output_tokens > 0
    assert whole.status in ("completed", "incomplete")
    events = list(oa.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == whole.output_text
    assert events[-1].response.output_text == whole.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert oa.responses.create(model="smollm2", input="Say hi.", max_output_tokens=8).output_text


def raw_sse(server, path: str, body: dict) -> list[dict]:
    import httpx  # the openai client's own transport

    with httpx.stream("POST", f"http://127.0.0.1:{server.port}{path}", json=body, timeout=120) as reply:
        return [json.loads(line[6:]) for line in reply.iter_lines()
                if line.startswith("data: ") and line != "data: [DONE]"]


def test_openai_replies_validate_against_the_clients_own_types(oa, server):
    """The client builds its objects without validating them: a field its types require
    but the reply lacks only fails when read (`event.logprobs`). Validate strictly here."""
    import typing

    from openai.types import CreateEmbeddingResponse, Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response, ResponseStreamEvent

    events = typing.get_args(typing.get_args(ResponseStreamEvent)[0])
    event_types = {typing.get_args(e.model_fields["type"].annotation)[0]: e for e in events}
    tool = {"type": "function", "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    chat = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    for body in ({"input": "Hi", "max_output_tokens": 4},
                 {"input": "Weather in Paris?", "tools": [tool], "tool_choice": "required", "max_output_tokens": 40}):
        Response.model_validate(raw_response(server, "/v1/responses", {"model": "smollm2", **body}))
        streamed = raw_sse(server, "/v1/responses", {"model": "smollm2", "stream": True, **body})
        for event in streamed:
            event_types[event["type"]].model_validate(event)
        assert streamed[-1]["type"] in ("response.completed", "response.incomplete")
    ChatCompletion.model_validate(raw_response(server, "/v1/chat/completions", chat))
    for chunk in raw_sse(server, "/v1/chat/completions",
                         {**chat, "stream": True, "stream_options": {"include_usage": True}}):
        ChatCompletionChunk.model_validate(chunk)
    CreateEmbeddingResponse.model_validate(raw_response(server, "/v1/embeddings", {"model": "smollm2",
                                                                                   "input": ["a", "b"]}))
    Model.model_validate(server.request("GET", "/v1/models/smollm2").json())


def raw_response(server, path: str, body: dict) -> dict:
    reply = server.request("POST", path, body)
    assert reply.status == 200, reply.body
    return reply.json()


def test_openai_responses_refuses_what_it_cannot_honour(oa):
    with pytest.raises(openai.BadRequestError) as err:
        oa.responses.create(model="smollm2", input="hi", previous_response_id="resp_1")
    assert "previous_response_id" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        oa.responses.create(model="smollm2", input=[{"type": "reasoning", "summary": []}])
    assert "input[0]" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        oa.responses.create(model="smollm2", input="hi", text={"verbosity": "low"})
    assert "text.verbosity" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        oa.responses.create(model="smollm2", input="hi", truncation="auto")
    assert "truncation" in str(err.value)
    assert oa.responses.create(model="smollm2", input="hi", truncation="disabled", max_output_tokens=2).output


def test_openai_chat_refuses_reasoning_and_verbosity_it_cannot_honour(oa):
    for field, value in (("reasoning_effort", "high"), ("verbosity", "low"), ("web_search_options", {"a": 1})):
        with pytest.raises(openai.BadRequestError) as err:
            oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2, extra_body={field: value})
        assert field in str(err.value)


def test_openai_models(oa):
    assert [m.id for m in oa.models.list()] == ["smollm2-135m-instruct"]
    assert oa.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve("gpt-4o")


def test_openai_errors_have_openai_shape(oa):
    with pytest.raises(openai.NotFoundError) as nf:
        oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert nf.value.body["code"] == "model_not_found" and nf.value.param == "model"
    with pytest.raises(openai.BadRequestError) as hot:
        oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert hot.value.param == "temperature" and "'temperature'" in hot.value.message  # the field, as OpenAI names it
    with pytest.raises(openai.BadRequestError) as n2:
        oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], n=2)
    assert n2.value.body["type"] == "invalid_request_error" and "'n'" in n2.value.body["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}
    with pytest.raises(openai.BadRequestError) as bad:  # a schema that cannot compile
        oa.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert "'tools'" in bad.value.body["message"]


def test_async_clients_stream_many_requests_at_once_and_leave_nothing_running(server):
    import asyncio

    import ollama as ollama_module

    async def run() -> tuple[list, list]:
        oa = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
        ol = ollama_module.AsyncClient(host=f"http://127.0.0.1:{server.port}")

        async def chat(i: int):
            stream = await oa.chat.completions.create(
                model="smollm2", messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=6,
                stream=True, stream_options={"include_usage": True})
            events = [e async for e in stream]
            return "".join(e.choices[0].delta.content or "" for e in events if e.choices), events[-1].usage

        async def generate(i: int):
            return [p async for p in await ol.generate(model="smollm2", prompt=f"Name {i} fruits.", stream=True,
                                                       options={"num_predict": 6})][-1]
        try:
            return await asyncio.gather(*(chat(i) for i in range(12))), \
                await asyncio.gather(*(generate(i) for i in range(6)))
        finally:
            await oa.close()

    chats, generates = asyncio.run(run())
    assert all(text and usage.completion_tokens >= 1 for text, usage in chats)
    assert all(last.done and last.eval_count >= 1 for last in generates)
    health = server.request("GET", "/health").json()
    assert health["active"] == 0 and health["queued"] == 0


def test_a_client_pointed_at_the_wrong_root_is_told_where_the_api_is(server):
    no_v1 = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:  # its message was empty: the body was Ollama-shaped
        no_v1.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}])
    assert "/v1" in err.value.message and "base_url" in err.value.message
    with_v1 = ollama.Client(host=f"http://127.0.0.1:{server.port}/v1")
    with pytest.raises(ollama.ResponseError) as err:
        with_v1.list()
    assert err.value.status_code == 404 and "host=" in err.value.error


# ---- curl -N on every streaming endpoint ----

CURL_CASES = [
    ("/generate", {"prompt": "Hi", "max_tokens": 4, **GREEDY}, "ndjson"),
    ("/api/generate", {"model": "smollm2", "prompt": "Hi", "options": {"num_predict": 4}}, "ndjson"),
    ("/api/chat", {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                   "options": {"num_predict": 4}}, "ndjson"),
    ("/v1/completions", {"model": "smollm2", "prompt": "Hi", "max_tokens": 4, "stream": True}, "sse"),
    ("/v1/chat/completions", {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 4, "stream": True}, "sse"),
]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("path,body,kind", CURL_CASES, ids=[c[0] for c in CURL_CASES])
def test_curl_streams_every_endpoint(server, path, body, kind):
    out = subprocess.run(["curl", "-sS", "-N", "-i", f"http://127.0.0.1:{server.port}{path}",
                          "-H", "Content-Type: application/json", "-d", json.dumps(body)],
                         capture_output=True, timeout=120, check=True).stdout.decode()
    head, _, payload = out.partition("\r\n\r\n")
    assert "200 OK" in head and "transfer-encoding: chunked" in head.lower()
    if kind == "ndjson":
        objs = [json.loads(line) for line in payload.splitlines()]
        assert objs[-1]["done"] is True and not any(o.get("done") for o in objs[:-1])
    else:
        events = [e for e in payload.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_log_records_the_endpoint(ol, server):
    ol.chat(model="smollm2", messages=[{"role": "user", "content": "Log this chat."}], options={"num_predict": 2})
    record = wait_for_log(server.log_file, lambda r: r["endpoint"] == "/api/chat"
                          and r["prompt"][-1]["content"] == "Log this chat.")
    assert record["status"] == "done" and record["completion_tokens"] >= 1
