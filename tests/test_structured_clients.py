"""Structured output and tool calls through the client libraries people use against an
Ollama or OpenAI server: `ollama` (format=schema), `openai` (the parse and stream
helpers, streamed tool calls), LangChain (ChatOllama and ChatOpenAI
with_structured_output) and pydantic-ai (an agent with a tool and a typed output).

Every constrained reply is checked to have ended by itself, never at the token limit:
the prompts and schemas here are ones the greedy model completes well within it.
"""

from __future__ import annotations

import asyncio
import json
from typing import Literal, Optional

import openai
import pytest
from pydantic import BaseModel, ConfigDict

GREEDY = {"temperature": 0, "seed": 1}


class Pet(BaseModel):
    name: str
    species: Literal["cat", "dog", "bird", "fish"]
    age_years: int
    vaccinated: bool


PET_PROMPT = "My dog Rex is 3 years old and has had his shots. Describe him."
# For JSON without a schema: asked for open-ended JSON ("Describe him in JSON") the model
# writes made-up URLs and ids until the token limit; told the keys, it stops.
JSON_PROMPT = "Return a JSON object with keys name and age for: Rex, 3 years old."


class GetWeather(BaseModel):
    """Get the current weather for a city."""

    model_config = ConfigDict(extra="forbid")
    city: str
    unit: Literal["celsius", "fahrenheit"]


WEATHER_TOOL = openai.pydantic_function_tool(GetWeather, name="get_weather")
WEATHER_SCHEMA = WEATHER_TOOL["function"]["parameters"]
WEATHER_QUESTION = [{"role": "user", "content": "What's the weather in Paris?"}]
WEATHER_RESULT = "sunny, 21 degrees celsius"


def check_schema(value, schema: dict) -> None:
    """`value` against `schema`: jsonschema when installed, else the keywords used here."""
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        jsonschema.validate(value, schema)
        return
    types = {"object": dict, "string": str, "integer": int, "boolean": bool, "array": list}
    if "type" in schema:
        assert isinstance(value, types[schema["type"]]), (value, schema)
        assert not (schema["type"] == "integer" and isinstance(value, bool))
    if "enum" in schema:
        assert value in schema["enum"], (value, schema)
    if isinstance(value, dict):
        assert set(schema.get("required", ())) <= set(value), (value, schema)
        properties = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(properties), (value, schema)
        for key, item in value.items():
            if key in properties:
                check_schema(item, properties[key])


# ---- ollama: format = a pydantic model's schema ----

def test_ollama_format_schema_chat_and_generate_streamed_and_not(ol):
    schema = Pet.model_json_schema()
    options = {"num_predict": 96, **GREEDY}
    messages = [{"role": "user", "content": PET_PROMPT}]
    whole = ol.chat(model="smollm2", messages=messages, format=schema, options=options)
    assert whole.done_reason == "stop", whole.message.content
    assert isinstance(Pet.model_validate_json(whole.message.content), Pet)
    parts = list(ol.chat(model="smollm2", messages=messages, format=schema, options=options, stream=True))
    assert parts[-1].done and parts[-1].done_reason == "stop"
    streamed = "".join(p.message.content for p in parts)
    assert streamed == whole.message.content and isinstance(Pet.model_validate_json(streamed), Pet)

    made = ol.generate(model="smollm2", prompt=PET_PROMPT, format=schema, options=options)
    assert made.done_reason == "stop" and isinstance(Pet.model_validate_json(made.response), Pet)
    parts = list(ol.generate(model="smollm2", prompt=PET_PROMPT, format=schema, options=options, stream=True))
    assert parts[-1].done_reason == "stop"
    assert isinstance(Pet.model_validate_json("".join(p.response for p in parts)), Pet)

    anything = ol.generate(model="smollm2", prompt=JSON_PROMPT, format="json", options=options)
    assert anything.done_reason == "stop" and isinstance(json.loads(anything.response), dict)


class Owner(BaseModel):
    name: str
    phone: Optional[str] = None


class OwnedPet(BaseModel):
    name: str
    species: Literal["cat", "dog", "bird", "fish"]
    age_years: int
    owner: Owner


def test_ollama_format_closes_objects_as_ollama_does(ol):
    """pydantic's schemas say nothing of other keys; Ollama's grammar (llama.cpp's) then
    allows none. Left open, the model adds "breed", "leash", ... until the token limit."""
    schema = OwnedPet.model_json_schema()
    assert "additionalProperties" not in json.dumps(schema)
    messages = [{"role": "user", "content": "My dog Rex is 3 years old, owned by Ann. Describe him."}]
    reply = ol.chat(model="smollm2", messages=messages, format=schema, options={"num_predict": 128, **GREEDY})
    assert reply.done_reason == "stop", reply.message.content
    value = json.loads(reply.message.content)
    assert set(value) <= set(OwnedPet.model_fields) and set(value["owner"]) <= set(Owner.model_fields)
    assert isinstance(OwnedPet.model_validate(value), OwnedPet)


# ---- openai: the parse and stream helpers ----

def test_openai_parse_gives_a_model_instance(oa):
    parse = getattr(oa.chat.completions, "parse", None) or oa.beta.chat.completions.parse
    kwargs = dict(model="smollm2", messages=[{"role": "user", "content": PET_PROMPT}], max_tokens=96, **GREEDY)
    done = parse(response_format=Pet, **kwargs).choices[0]
    assert done.finish_reason == "stop" and isinstance(done.message.parsed, Pet)
    assert Pet.model_validate_json(done.message.content) == done.message.parsed

    with oa.chat.completions.stream(response_format=Pet, **kwargs) as stream:
        events = list(stream)
        streamed = stream.get_final_completion().choices[0]
    assert streamed.finish_reason == "stop" and streamed.message.parsed == done.message.parsed
    assert any(e.type == "content.delta" for e in events)

    # json_object: any object; Responses' text.format takes the same schema.
    anything = oa.chat.completions.create(response_format={"type": "json_object"},
                                          **{**kwargs, "messages": [{"role": "user", "content": JSON_PROMPT}]})
    anything = anything.choices[0]
    assert anything.finish_reason == "stop" and isinstance(json.loads(anything.message.content), dict)
    response = oa.responses.parse(model="smollm2", input=PET_PROMPT, text_format=Pet, max_output_tokens=96,
                                  temperature=0)
    assert response.status == "completed" and isinstance(response.output_parsed, Pet)


def test_openai_parse_reads_strict_tool_arguments_and_the_round_trip_ends_in_text(oa):
    messages = list(WEATHER_QUESTION)
    first = oa.chat.completions.parse(model="smollm2", messages=messages, tools=[WEATHER_TOOL],
                                      tool_choice="required", parallel_tool_calls=False, max_tokens=64,
                                      **GREEDY).choices[0]
    assert first.finish_reason == "tool_calls" and first.message.content is None
    [call] = first.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(call.function.parsed_arguments, GetWeather)

    # As the openai docs do it: the assistant message object itself, then the result.
    messages += [first.message, {"role": "tool", "tool_call_id": call.id, "content": WEATHER_RESULT}]
    final = oa.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER_TOOL], max_tokens=64,
                                       **GREEDY).choices[0]
    assert final.finish_reason == "stop" and not final.message.tool_calls
    assert final.message.content and "21" in final.message.content  # the result reached the model


CHOICES = [("required", True), ({"type": "function", "function": {"name": "get_weather"}}, False)]


@pytest.mark.parametrize("choice,parallel", CHOICES, ids=["required", "named"])
def test_openai_streamed_tool_call_arguments_validate_against_the_schema(oa, choice, parallel):
    events = list(oa.chat.completions.create(
        model="smollm2", messages=WEATHER_QUESTION, tools=[WEATHER_TOOL], tool_choice=choice,
        parallel_tool_calls=parallel, stream=True, max_tokens=128, **GREEDY))
    calls: dict[int, dict] = {}
    for event in events:
        delta = event.choices[0].delta
        assert not delta.content  # under a required or named choice there is no text
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            if part.function:
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
    finishes = [e.choices[0].finish_reason for e in events if e.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert calls and sorted(calls) == list(range(len(calls)))
    if not parallel:
        assert len(calls) == 1
    for call in calls.values():
        assert call["name"] == "get_weather" and call["id"].startswith("call_")
        arguments = json.loads(call["arguments"])
        check_schema(arguments, WEATHER_SCHEMA)
        GetWeather.model_validate(arguments)


# ---- openai: the Responses API's function tools ----

RESPONSES_TOOL = {"type": "function", "name": "get_weather", "description": "Get the current weather for a city.",
                  "parameters": WEATHER_SCHEMA, "strict": True}


def test_openai_responses_tool_call_whole_and_streamed_then_the_round_trip_ends_in_text(oa):
    kwargs = dict(model="smollm2", input="What's the weather in Paris?", tools=[RESPONSES_TOOL],
                  max_output_tokens=96, temperature=0)
    whole = oa.responses.create(**kwargs)
    assert whole.status == "completed"
    [call] = whole.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    check_schema(json.loads(call.arguments), WEATHER_SCHEMA)

    events = list(oa.responses.create(stream=True, **kwargs))
    types = [e.type for e in events]
    assert types == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.function_call_arguments.delta", "response.function_call_arguments.done",
                     "response.output_item.done", "response.completed"]
    [streamed] = events[-1].response.output
    assert (streamed.type, streamed.name, streamed.arguments) == ("function_call", call.name, call.arguments)
    assert events[4].arguments == call.arguments

    # The call and its output go back as input items; the model then answers in text.
    final = oa.responses.create(**{**kwargs, "input": [
        {"role": "user", "content": "What's the weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": WEATHER_RESULT}]})
    assert [item.type for item in final.output] == ["message"] and "21" in final.output_text


def test_openai_responses_tool_choice_names_a_function_or_is_refused(oa):
    named = oa.responses.create(model="smollm2", input="Hello!", tools=[RESPONSES_TOOL], max_output_tokens=96,
                                tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
    assert [item.type for item in named.output] == ["function_call"]
    with pytest.raises(openai.BadRequestError) as err:
        oa.responses.create(model="smollm2", input="hi", tools=[RESPONSES_TOOL],
                            tool_choice={"type": "function", "name": "get_time"})
    assert "get_time" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        oa.responses.create(model="smollm2", input="hi", tools=[{"type": "web_search"}])
    assert "tools[0].type" in str(err.value)


# ---- ollama: tools ----

def get_weather(city: str) -> str:
    """Get the current weather for a city.

    Args:
      city: The name of the city
    """
    return WEATHER_RESULT


def test_ollama_tools_reply_is_a_call_or_text(ol):
    """Ollama has no tool_choice: the model may answer in text (it does, greedily)."""
    options = {"num_predict": 64, **GREEDY}
    whole = ol.chat(model="smollm2", messages=WEATHER_QUESTION, tools=[get_weather], options=options)
    parts = list(ol.chat(model="smollm2", messages=WEATHER_QUESTION, tools=[get_weather], options=options,
                         stream=True))
    assert parts[-1].done and parts[-1].done_reason == whole.done_reason
    streamed_calls = [c for p in parts for c in p.message.tool_calls or ()]
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert whole.message.role == "assistant"
    if whole.message.tool_calls:
        assert whole.done_reason == "stop" and not whole.message.content
        assert len(streamed_calls) == len(whole.message.tool_calls)
        for call in whole.message.tool_calls:
            assert call.function.name == "get_weather" and isinstance(call.function.arguments["city"], str)
    else:
        assert whole.message.content and not streamed_calls


def test_ollama_tool_round_trip_ends_in_a_plain_answer(ol):
    messages = WEATHER_QUESTION + [
        {"role": "assistant", "content": "",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": get_weather("Paris"), "tool_name": "get_weather"},
    ]
    options = {"num_predict": 64, **GREEDY}
    final = ol.chat(model="smollm2", messages=messages, tools=[get_weather], options=options)
    assert final.message.role == "assistant" and not final.message.tool_calls
    assert final.done_reason == "stop" and "21" in final.message.content
    parts = list(ol.chat(model="smollm2", messages=messages, tools=[get_weather], options=options, stream=True))
    assert "".join(p.message.content for p in parts) == final.message.content
    assert not any(p.message.tool_calls for p in parts)


# ---- LangChain ----

@pytest.fixture
def no_tiktoken(monkeypatch):
    """ChatOpenAI counts tokens with tiktoken, which downloads its files: never here."""
    import tiktoken

    def refuse(*args, **kwargs):
        raise AssertionError("tiktoken was asked for an encoding (it would download it)")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    monkeypatch.setattr(tiktoken, "encoding_for_model", refuse)
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGCHAIN_TRACING"):
        monkeypatch.delenv(name, raising=False)


def test_langchain_chat_ollama_with_structured_output(server, no_tiktoken):
    from langchain_ollama import ChatOllama

    llm = ChatOllama(model="smollm2", base_url=f"http://127.0.0.1:{server.port}", num_predict=96, **GREEDY)
    assert isinstance(llm.with_structured_output(Pet).invoke(PET_PROMPT), Pet)
    out = llm.with_structured_output(Pet, include_raw=True).invoke(PET_PROMPT)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Pet)
    assert out["raw"].response_metadata["done_reason"] == "stop"


def test_langchain_chat_openai_with_structured_output(server, no_tiktoken):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="smollm2", base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x",
                     max_tokens=96, max_retries=0, **GREEDY)
    assert isinstance(llm.with_structured_output(Pet).invoke(PET_PROMPT), Pet)
    out = llm.with_structured_output(Pet, include_raw=True).invoke(PET_PROMPT)
    assert out["parsing_error"] is None and isinstance(out["parsed"], Pet)
    assert out["raw"].response_metadata["finish_reason"] == "stop"


# ---- pydantic-ai ----

class Weather(BaseModel):
    city: str
    temperature_c: int


REQUEST_LIMIT = 4  # a looping model ends in UsageLimitExceeded, never a hang


def weather_agent(server):
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    provider = OpenAIProvider(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="x")
    model = OpenAIChatModel("smollm2", provider=provider)
    agent = Agent(model, output_type=Weather, model_settings={"max_tokens": 128, **GREEDY})
    cities: list[str] = []

    @agent.tool_plain
    def get_temperature(city: str) -> int:
        """Current temperature in Celsius for a city."""
        cities.append(city)
        return 21

    return agent, cities


def test_pydantic_ai_agent_with_a_tool_returns_a_model(server):
    from pydantic_ai.usage import UsageLimits

    agent, cities = weather_agent(server)
    result = agent.run_sync("What is the temperature in Paris? Use the tool.",
                            usage_limits=UsageLimits(request_limit=REQUEST_LIMIT))
    assert isinstance(result.output, Weather)
    assert cities and all(isinstance(c, str) for c in cities)  # the tool was called, and ran
    assert result.usage.requests <= REQUEST_LIMIT


def test_pydantic_ai_agent_streamed_returns_a_model(server):
    from pydantic_ai.usage import UsageLimits

    agent, _ = weather_agent(server)

    async def run():
        async with agent.run_stream("What is the temperature in Paris? Use the tool.",
                                    usage_limits=UsageLimits(request_limit=REQUEST_LIMIT)) as stream:
            return await stream.get_output()

    assert isinstance(asyncio.run(run()), Weather)
