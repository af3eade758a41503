"""A tool-call reply as each API sends it, and as the log records it: a scripted model
writes the call (or plain text), so the reply does not depend on what a model chooses."""

from __future__ import annotations

import asyncio
import json

import pytest

from inprocess import ScriptedRunner, http, live_server

pytest.importorskip("llguidance")

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def sse(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def serve(folder, tmp_path, script: str, scenario):
    from transformers import AutoTokenizer

    runner = ScriptedRunner(AutoTokenizer.from_pretrained(folder), script, context_length=1024)

    async def main():
        async with live_server(folder, tmp_path / "log.jsonl", runner=runner) as live:
            out = await scenario(live)
            await live.settled()
            return out, live.log_lines()
    return asyncio.run(main())


def chat_body(**fields) -> dict:
    return {"messages": ASK, "tools": [WEATHER], "tool_choice": "auto", "max_tokens": 100, **fields}


async def openai_chat(live, stream: bool, **fields) -> tuple[str | None, list[dict], str]:
    """(content, calls as {name, arguments}, finish_reason) of a chat completion."""
    reply = await http(live.port, "POST", "/v1/chat/completions", chat_body(model=live.engine.model_name, stream=stream, **fields))
    assert reply.status == 200, reply.body
    if not stream:
        choice = reply.json()["choices"][0]
        calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                 for c in choice["message"].get("tool_calls") or []]
        return choice["message"]["content"], calls, choice["finish_reason"]
    content, calls, finish = [], [], None
    for event in sse(reply.body):
        choice = event["choices"][0]
        delta = choice["delta"]
        if delta.get("content"):
            content.append(delta["content"])
        for c in delta.get("tool_calls") or []:
            calls.append({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])})
        finish = choice["finish_reason"] or finish
    return "".join(content) or None, calls, finish


async def ollama_chat(live, stream: bool, **options) -> tuple[str, list[dict], str]:
    body = {"model": live.engine.model_name, "messages": ASK, "tools": [WEATHER], "stream": stream, "options": options}
    reply = await http(live.port, "POST", "/api/chat", body)
    assert reply.status == 200, reply.body
    lines = reply.lines()
    content = "".join(line["message"]["content"] for line in lines)
    calls = [dict(c["function"]) for line in lines for c in line["message"].get("tool_calls") or []]
    return content, calls, lines[-1]["done_reason"]


async def responses(live, stream: bool, **fields) -> tuple[str, list[dict], str]:
    body = {"model": live.engine.model_name, "input": "Weather in Paris?", "stream": stream, "max_output_tokens": 100,
            "tools": [{"type": "function", **WEATHER["function"]}], "tool_choice": "auto", **fields}
    reply = await http(live.port, "POST", "/v1/responses", body)
    assert reply.status == 200, reply.body
    response = reply.json() if not stream else \
        next(e["response"] for e in sse(reply.body) if e["type"].startswith("response.") and
             e["type"] in ("response.completed", "response.incomplete"))
    text = "".join(part["text"] for item in response["output"] if item["type"] == "message"
                   for part in item["content"])
    calls = [{"name": i["name"], "arguments": json.loads(i["arguments"])} for i in response["output"]
             if i["type"] == "function_call"]
    return text, calls, response["status"]


PARIS = [{"name": "get_weather", "arguments": {"city": "Paris"}}]


@pytest.mark.parametrize("stream", [True, False])
def test_a_stop_string_never_cuts_a_tool_call(tiny_gpt2_folder, tmp_path, stream):
    # '}' and '"city"' both occur inside the call's JSON: cut there, the call came back as
    # its '<tool_call>...' text in content, with finish_reason 'stop'.
    async def scenario(live):
        return [await openai_chat(live, stream, stop=["}", '"city"']),
                await ollama_chat(live, stream, stop=["}"]),
                await responses(live, stream, stop=["}"])]
    (chat, ollama, resp), _ = serve(tiny_gpt2_folder, tmp_path, CALL, scenario)
    assert chat == (None, PARIS, "tool_calls")
    assert ollama == ("", PARIS, "stop")
    assert resp == ("", PARIS, "completed")


@pytest.mark.parametrize("stream", [True, False])
def test_a_stop_string_still_ends_a_plain_text_reply_beside_tools(tiny_gpt2_folder, tmp_path, stream):
    async def scenario(live):
        return [await openai_chat(live, stream, stop=["}"]), await ollama_chat(live, stream, stop=["}"]),
                await responses(live, stream, stop=["}"])]
    (chat, ollama, resp), _ = serve(tiny_gpt2_folder, tmp_path, "Sunny, {mild} and dry", scenario)
    assert chat == ("Sunny, {mild", [], "stop")
    assert ollama == ("Sunny, {mild", [], "stop")
    assert resp == ("Sunny, {mild", [], "completed")


def sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("stream", [True, False])
def test_the_log_line_of_a_tool_call_reply_says_what_the_client_got(tiny_gpt2_folder, tmp_path, stream):
    # It held the raw '<tool_call>...' text as the response, done_reason 'stop', no calls.
    async def scenario(live):
        await openai_chat(live, stream)
        await ollama_chat(live, stream)
        await responses(live, stream)
    _, lines = serve(tiny_gpt2_folder, tmp_path, CALL, scenario)
    assert [(line["endpoint"], line["status"], line["response"], without_ids(line["tool_calls"]),
             line["done_reason"]) for line in lines] == [("/v1/chat/completions", "done", "", PARIS, "tool_calls"),
                                                         ("/api/chat", "done", "", PARIS, "stop"),
                                                         ("/v1/responses", "done", "", PARIS, "stop")]
    # an id where the client got one (Ollama's calls have none)
    assert ["id" in line["tool_calls"][0] for line in lines] == [True, False, True]


def without_ids(calls: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "id"} for c in calls]


@pytest.mark.parametrize("stream", [True, False])
def test_a_logged_call_has_the_id_the_client_got(tiny_gpt2_folder, tmp_path, stream):
    # The id a client's tool result names (tool_call_id, call_id): a random one each time
    # the reply was read, so the log's could not be the client's.
    async def scenario(live):
        chat = await http(live.port, "POST", "/v1/chat/completions",
                          chat_body(model=live.engine.model_name, stream=stream))
        resp = await http(live.port, "POST", "/v1/responses",
                          {"model": live.engine.model_name, "input": "Weather?", "stream": stream,
                           "tools": [{"type": "function", **WEATHER["function"]}]})
        if stream:
            chat_id = next(c["id"] for e in sse(chat.body) for c in e["choices"][0]["delta"].get("tool_calls") or [])
            resp_id = next(e["item"]["call_id"] for e in sse(resp.body) if e["type"] == "response.output_item.done")
        else:
            chat_id = chat.json()["choices"][0]["message"]["tool_calls"][0]["id"]
            resp_id = resp.json()["output"][0]["call_id"]
        return chat_id, resp_id
    (chat_id, resp_id), lines = serve(tiny_gpt2_folder, tmp_path, CALL, scenario)
    assert [line["tool_calls"][0]["id"] for line in lines] == [chat_id, resp_id]
    assert chat_id != resp_id


def test_a_tool_call_logged_without_prompts_has_its_name_and_the_arguments_length_and_hash(tiny_gpt2_folder,
                                                                                           tmp_path):
    from api import Policy

    async def scenario(live):
        live.api.policy = Policy(log_prompts=False)
        await openai_chat(live, False)
    _, (line,) = serve(tiny_gpt2_folder, tmp_path, CALL, scenario)
    assert "Paris" not in json.dumps(line)
    arguments = '{"city": "Paris"}'  # as the client got them (OpenAI's function.arguments)
    assert without_ids(line["tool_calls"]) == [{"name": "get_weather", "arguments_chars": len(arguments),
                                                "arguments_sha256": sha256(arguments)}]
    assert (line["response_chars"], line["response_sha256"], line["done_reason"]) == (0, sha256(""), "tool_calls")


def test_a_text_reply_beside_tools_is_logged_as_before(tiny_gpt2_folder, tmp_path):
    async def scenario(live):
        await openai_chat(live, False)
    _, (line,) = serve(tiny_gpt2_folder, tmp_path, "Sunny and dry", scenario)
    assert (line["response"], line["done_reason"], "tool_calls" in line) == ("Sunny and dry", "stop", False)


def test_api_show_lists_tools_only_where_tool_requests_can_be_served(tiny_gpt2_folder, tmp_path, monkeypatch):
    import sys

    async def scenario(live):
        model = live.engine.model_name
        shown = (await http(live.port, "POST", "/api/show", {"model": model})).json()["capabilities"]
        monkeypatch.setitem(sys.modules, "llguidance", None)  # what an import of a missing package meets
        without = (await http(live.port, "POST", "/api/show", {"model": model})).json()["capabilities"]
        refused = await http(live.port, "POST", "/api/chat", {"model": model, "messages": ASK, "tools": [WEATHER]})
        return shown, without, refused.status
    (shown, without, refused), _ = serve(tiny_gpt2_folder, tmp_path, "Hi", scenario)
    assert shown == ["completion", "tools", "embedding"]
    assert (without, refused) == (["completion", "embedding"], 400)
