"""Structured output and tool calls against the real embedded model, over raw sockets:
every constrained reply parses, streamed equals not streamed, and unconstrained
requests give the same text while constrained ones run beside them."""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from validation import parse_chat, parse_generate, parse_messages, parse_openai, parse_responses
from httpserver import HTTPError
from test_batching import PROMPTS

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "likes_cats"],
          "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                         "likes_cats": {"type": "boolean"}}}
ASK = "Describe a person called Ann, aged 31, who likes cats, as JSON."
GREEDY = {"temperature": 0}


def check_person(text: str) -> dict:
    value = json.loads(text)
    assert set(value) == {"name", "age", "likes_cats"}
    assert isinstance(value["name"], str) and len(value["name"]) <= 20
    assert isinstance(value["age"], int) and isinstance(value["likes_cats"], bool)
    return value


def sse_events(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().split("\n")
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_unconstrained_text_is_the_same_beside_constrained_requests(server):
    plain = [{"prompt": p, "max_tokens": 48, **GREEDY} for p in PROMPTS[:4]]
    alone = [server.generate(**body).text() for body in plain]
    constrained = [{"prompt": f"{ASK} ({i})", "format": PERSON, "max_tokens": 80, **GREEDY} for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda body: server.generate(**body), plain + constrained))
    assert [r.text() for r in replies[:4]] == alone
    for reply in replies[4:]:
        check_person(reply.text())
        assert reply.lines()[-1]["done_reason"] == "stop"


@pytest.mark.parametrize("fmt", ["json", PERSON])
def test_ollama_format_streamed_and_not_on_generate_and_chat(server, fmt):
    for path, body, text_of in (
            ("/api/generate", {"prompt": ASK}, lambda obj: obj.get("response", "")),
            ("/api/chat", {"messages": [{"role": "user", "content": ASK}]},
             lambda obj: obj.get("message", {}).get("content", ""))):
        body = {"model": "smollm2", "format": fmt, "options": {"temperature": 0, "num_predict": 120}, **body}
        streamed = server.request("POST", path, {**body, "stream": True})
        whole = server.request("POST", path, {**body, "stream": False}).json()
        text = "".join(text_of(obj) for obj in streamed.lines())
        assert text == text_of(whole)
        assert whole["done_reason"] == "stop"
        value = json.loads(text)
        assert isinstance(value, dict)
        if fmt is PERSON:
            check_person(text)


def test_openai_json_schema_and_json_object_streamed_and_not(server):
    for response_format in ({"type": "json_object"},
                            {"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON, "strict": True}}):
        body = {"model": "smollm2", "messages": [{"role": "user", "content": ASK}], "temperature": 0,
                "max_tokens": 120, "response_format": response_format}
        whole = server.request("POST", "/v1/chat/completions", body).json()
        events = sse_events(server.request("POST", "/v1/chat/completions", {**body, "stream": True}).body)
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        assert text == whole["choices"][0]["message"]["content"]
        assert whole["choices"][0]["finish_reason"] == "stop"
        assert isinstance(json.loads(text), dict)
        if response_format["type"] == "json_schema":
            check_person(text)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}


def test_openai_required_tool_call_streamed_as_deltas_and_whole(server):
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "temperature": 0, "max_tokens": 120, "tools": [WEATHER], "tool_choice": "required",
            "parallel_tool_calls": False}
    whole = server.request("POST", "/v1/chat/completions", body).json()
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    arguments = json.loads(call["function"]["arguments"])
    assert call["function"]["name"] == "get_weather" and isinstance(arguments["city"], str)
    assert set(arguments) <= {"city", "unit"}
    events = sse_events(server.request("POST", "/v1/chat/completions", {**body, "stream": True}).body)
    deltas = [d for e in events for d in e["choices"][0]["delta"].get("tool_calls") or []]
    assert [d["index"] for d in deltas] == [0]
    assert json.loads(deltas[0]["function"]["arguments"]) == arguments
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


# What pydantic (and openai.pydantic_function_tool) send for a nested model: a $ref into $defs.
NESTED_PARAMETERS = {"type": "object", "required": ["loc"], "properties": {"loc": {"$ref": "#/$defs/Loc"}},
                     "$defs": {"Loc": {"type": "object", "required": ["city"],
                                       "properties": {"city": {"type": "string", "maxLength": 30}}}}}


def test_tool_parameters_with_defs_are_called_on_every_api(server):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    function = {"name": "get_weather", "description": "The current weather", "parameters": NESTED_PARAMETERS}
    chat = server.request("POST", "/v1/chat/completions", {
        "model": "smollm2", "messages": ask, "temperature": 0, "max_tokens": 60,
        "tools": [{"type": "function", "function": function}], "tool_choice": "required"})
    assert chat.status == 200, chat.body
    [call] = chat.json()["choices"][0]["message"]["tool_calls"]
    ollama = server.request("POST", "/api/chat", {
        "model": "smollm2", "messages": ask, "stream": False, "options": {"temperature": 0, "num_predict": 60},
        "tools": [{"type": "function", "function": function}]})
    assert ollama.status == 200, ollama.body
    [ollama_call] = ollama.json()["message"]["tool_calls"]
    responses = server.request("POST", "/v1/responses", {
        "model": "smollm2", "input": ask, "temperature": 0, "max_output_tokens": 60,
        "tools": [{"type": "function", **function}], "tool_choice": "required"})
    assert responses.status == 200, responses.body
    [item] = responses.json()["output"]
    for arguments in (json.loads(call["function"]["arguments"]), ollama_call["function"]["arguments"],
                      json.loads(item["arguments"])):
        assert set(arguments) == {"loc"} and set(arguments["loc"]) == {"city"}
        assert isinstance(arguments["loc"]["city"], str)


def test_ollama_tool_round_trip_over_the_wire(server):
    tools = [WEATHER]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    history = ask + [{"role": "assistant", "content": "",
                      "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                     {"role": "tool", "content": "18 degrees and sunny"}]
    reply = server.request("POST", "/api/chat", {"model": "smollm2", "messages": history, "tools": tools,
                                                 "stream": False, "options": {"temperature": 0, "num_predict": 60}})
    message = reply.json()["message"]
    assert reply.status == 200 and message["role"] == "assistant"
    assert message["content"] or message.get("tool_calls")
    for call in message.get("tool_calls") or []:
        assert call["function"]["name"] == "get_weather" and isinstance(call["function"]["arguments"], dict)


def test_ollama_tools_call_after_a_user_message_and_answer_after_the_result(server):
    """The server's default, --tool-calls eager: Ollama sends no tool_choice."""
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": [WEATHER],
            "options": {"temperature": 0, "num_predict": 120}}
    lines = server.request("POST", "/api/chat", body).lines()
    calls = [c for line in lines for c in line.get("message", {}).get("tool_calls") or []]
    assert lines[-1]["done"] is True and lines[-1]["done_reason"] == "stop"
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather"
    assert isinstance(calls[0]["function"]["arguments"]["city"], str)
    body["messages"] += [{"role": "assistant", "content": "", "tool_calls": calls},
                         {"role": "tool", "content": "22 degrees, clear sky", "tool_name": "get_weather"}]
    answer = server.request("POST", "/api/chat", {**body, "stream": False}).json()["message"]
    assert answer["content"] and not answer.get("tool_calls")


def test_tool_choice_left_to_the_server_follows_its_policy():
    body = {"messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": [WEATHER]}
    eager, _, reads = parse_chat(dict(body), eager_tools=True)
    free, _, _ = parse_chat(dict(body), eager_tools=False)
    assert reads and "TEXT" not in eager.constraint.grammar and "TEXT" in free.constraint.grammar
    chosen, *_ = parse_openai({**body, "tool_choice": "auto"}, chat=True, eager_tools=True)
    assert "TEXT" in chosen.constraint.grammar  # a client's explicit choice wins
    after = {**body, "messages": body["messages"] + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {}}}]},
        {"role": "tool", "content": "sunny"}]}
    answered, _, _ = parse_chat(after, eager_tools=True)
    assert "TEXT" in answered.constraint.grammar


LOOP = {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}
LOOP_INSIDE = {"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "required": ["a"],
               "$defs": {"x": {"$ref": "#/$defs/x"}}}


@pytest.mark.parametrize("path, body, field", [
    ("/api/chat", {"model": "smollm2", "format": "xml"}, "'format'"),
    ("/api/generate", {"model": "smollm2", "format": {"type": "objekt"}, "prompt": "hi"}, "'format'"),
    ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "'response_format.type'"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}},
     "'response_format.json_schema.schema'"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "a b"}}]},
     "'tools[0].function.name'"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "'tool_choice'"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "'tool_choice'"),
    ("/v1/completions", {"tools": [WEATHER], "prompt": "hi"}, "'tools'"),
    ("/api/generate", {"tools": [WEATHER], "prompt": "hi"}, "'tools'"),
    ("/generate", {"tools": [WEATHER], "prompt": "hi"}, "'tools'"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "'functions'"),
    # $refs that loop without reaching a value: llguidance fails only once the output gets there.
    ("/api/generate", {"prompt": "x", "format": LOOP}, "'format'"),
    ("/api/chat", {"format": LOOP_INSIDE}, "'format'"),
    ("/api/chat", {"format": {"type": "integer", "maximum": 10 ** 30}}, "'format'"),  # was a 500
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": LOOP}}},
     "'response_format.json_schema.schema'"),
    ("/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": LOOP_INSIDE}}},
     "'text.format.schema'"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": LOOP_INSIDE}}],
                              "tool_choice": "required"}, "'tools'"),
    ("/api/chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": LOOP}}]}, "'tools'"),
])
def test_what_cannot_be_honoured_is_a_400_naming_the_field(server, path, body, field):
    if not {"messages", "prompt", "input"} & set(body):
        body = {**body, "messages": [{"role": "user", "content": "hi"}]}
    reply = server.request("POST", path, {"model": "smollm2", **body})
    assert reply.status == 400
    error = reply.json()["error"]
    assert field in (error["message"] if isinstance(error, dict) else error)


def test_tool_history_is_rendered_as_text_for_the_model():
    messages = parse_messages([
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ], openai=True)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"].count("<tool_call>") == 2 and '"city": "Rome"' in messages[1]["content"]
    assert messages[2]["content"] == "<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    for bad in ({"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{x"}}]}):
        with pytest.raises(HTTPError, match="tool_calls"):
            parse_messages([{"role": "user", "content": "hi"}, bad])


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("parse, body, field", [
    (parse_chat, {"messages": HI, "format": "json"}, "'format'"),
    (parse_chat, {"messages": HI, "tools": [WEATHER]}, "'tools'"),
    (lambda b: parse_openai(b, chat=True), {"messages": HI, "response_format": {"type": "json_object"}},
     "'response_format'"),
    (lambda b: parse_openai(b, chat=True), {"messages": HI, "tools": [WEATHER], "tool_choice": "required"},
     "'tools'"),
    (parse_responses, {"input": "hi", "text": {"format": {"type": "json_object"}}}, "'text.format'"),
])
def test_without_the_grammar_engine_constrained_output_is_a_400_naming_the_field(monkeypatch, parse, body,
                                                                                 field):
    monkeypatch.setitem(sys.modules, "llguidance", None)  # what an import of a missing package meets
    with pytest.raises(HTTPError) as refused:
        parse({"model": "smollm2", **body})
    assert refused.value.status == 400
    assert field in refused.value.message and "llguidance" in refused.value.message


@pytest.mark.parametrize("body, says", [
    ({"input": [{"role": "bot", "content": "x"}]}, "'input[0].role'"),
    ({"input": [{"role": "user", "content": 5}]}, "'input[0].content'"),
    ({"input": [{"role": "user", "content": "hi"}, {"type": "function_call", "name": "f", "arguments": "{bad"}]},
     "'input[1].arguments' is not valid JSON"),
    ({"input": [{"role": "user", "content": "hi"},
                {"type": "function_call", "name": "f", "arguments": "[" * 100_000}]}, "'input[1].arguments'"),
    ({"input": [{"role": "assistant", "content": "hi"}]}, "'input' needs a user message"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
      "tool_choice": {"type": "function"}}, '{"type": "function", "name": ...}'),
    ({"input": "hi", "tools": [{"type": "function", "name": "a b"}]}, "'tools[0].name'"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": {"type": "string"}}]},
     "'tools[0].parameters'"),
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "f"}]},
     "'tools[1].name'"),
])
def test_responses_errors_name_the_responses_fields_not_chats(body, says):
    with pytest.raises(HTTPError) as refused:
        parse_responses(body)
    message = refused.value.message
    assert refused.value.status == 400 and says in message and "messages" not in message and ".function." not in message


JSON_OUT = {"type": "json_object"}
STOPS = {"stop": ["}"]}


@pytest.mark.parametrize("parse, body", [
    (parse_generate, {"prompt": "hi", "format": "json", "options": STOPS}),
    (parse_chat, {"messages": HI, "format": PERSON, "options": STOPS}),
    (parse_chat, {"messages": HI, "tools": [WEATHER], "options": STOPS}),  # eager: the reply is a call
    (lambda b: parse_openai(b, chat=True), {"messages": HI, "response_format": JSON_OUT, **STOPS}),
    (lambda b: parse_openai(b, chat=True), {"messages": HI, "tools": [WEATHER], "tool_choice": "required", **STOPS}),
    (lambda b: parse_openai(b, chat=True), {"messages": HI, "tools": [WEATHER], "response_format": JSON_OUT,
                                            **STOPS}),
    (lambda b: parse_openai(b, chat=False), {"prompt": "hi", "response_format": JSON_OUT, **STOPS}),
    (parse_responses, {"input": "hi", "text": {"format": JSON_OUT}, **STOPS}),
])
def test_stop_strings_with_json_only_replies_are_a_400_naming_stop(parse, body):
    # The grammar ends the reply once its JSON is whole: a stop string could only match
    # inside it, and cut {"name": "Rex" short with finish_reason 'stop'.
    with pytest.raises(HTTPError) as refused:
        parse({"model": "smollm2", **body}) if parse is not parse_chat else parse_chat(body, eager_tools=True)
    assert refused.value.status == 400 and "'stop'" in refused.value.message
    assert ("--tool-calls eager" in refused.value.message) == (parse is parse_chat and "tools" in body)


def test_stop_strings_apply_where_the_reply_may_be_text():
    chat = lambda body: parse_openai({"messages": HI, **STOPS, **body}, chat=True)[0]
    assert chat({}).stop == ["}"]
    assert chat({"tools": [WEATHER], "tool_choice": "auto"}).stop == ["}"]
    assert chat({"tools": [WEATHER], "tool_choice": "none", "response_format": {"type": "text"}}).stop == ["}"]
    assert parse_chat({"messages": HI, "options": STOPS, "format": ""})[0].stop == ["}"]
