"""The endpoints: validating requests, running them through the engine, encoding replies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

from engine import (SEEDS, Engine, Final, GenerationRequest, QueueFull, RequestInvalid, Sampling,
                    ShuttingDown, TokenStream)
from constraints import Constraint, ConstraintInvalid
from modelsource import EMBEDDED_NAME
from httpserver import ClientGone, HTTPError, Request, ResponseWriter, Router, json_bytes
from metrics import Metrics
from ratelimit import RateLimiter
from requestlog import RequestLog, utc_timestamp
from staticfiles import StaticFiles
import tools as toolcalls

log = logging.getLogger("minivault.api")

VERSION = "0.1.0"
WEB_ROOT = Path(__file__).resolve().parent / "web"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
# Tell proxies (nginx) and caches not to hold streamed tokens back.
STREAM_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]


# ---------------------------------------------------------------------------
# Validation (pure: dicts in, GenerationRequest or HTTPError out)


MAX_JSON_DEPTH = 64  # no request shape nests deeper than 5; the limit only stops abuse


def parse_json_body(body: bytes) -> dict:
    if not body.strip():
        raise HTTPError(400, "request body is empty; expected a JSON object")
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, "request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise HTTPError(400, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:  # the C scanner recurses once per level: [[[[... runs out of stack
        raise HTTPError(400, f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # Python's guard against quadratic int(): over 4300 digits
        raise HTTPError(400, "invalid JSON: a number has too many digits") from None
    if not isinstance(value, dict):
        raise HTTPError(400, "expected a JSON object")
    _check_json_value(value)
    return value


_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _check_json_value(value) -> None:
    """Refuse nesting beyond MAX_JSON_DEPTH and strings holding a lone surrogate.

    A lone surrogate can only come from a `\\ud800`-style escape (json.loads joins valid
    pairs); it cannot be encoded as UTF-8, so it would fail wherever the text goes next
    (the tokenizer, the log, an error message). Iterative, so depth costs no stack.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise HTTPError(400, f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            for text in (key, child):
                if isinstance(text, str) and _LONE_SURROGATE.search(text):
                    raise HTTPError(400, "request body holds an invalid Unicode escape (lone surrogate)")
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))


def _number(name: str, value, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HTTPError(400, f"'{name}' must be a number")
    if low is not None and (value < low or (low_open and value == low)):
        raise HTTPError(400, f"'{name}' must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise HTTPError(400, f"'{name}' must be <= {high}")
    return float(value)


def _integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, f"'{name}' must be an integer")
    if low is not None and value < low:
        raise HTTPError(400, f"'{name}' must be >= {low}")
    if high is not None and value > high:
        raise HTTPError(400, f"'{name}' must be <= {high}")
    return value


def _boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise HTTPError(400, f"'{name}' must be true or false")
    return value


def _string(name: str, value) -> str:
    if not isinstance(value, str):
        raise HTTPError(400, f"'{name}' must be a string")
    return value


def _stops(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return [s for s in value if s]
    raise HTTPError(400, "'stop' must be a string or a list of strings")


MAX_TOKENS_ALIASES = ("max_tokens", "num_predict")
# Below this a temperature divides the logits into inf and NaN; it means greedy anyway.
MIN_TEMPERATURE = 1e-4
MAX_TOP_K = 1_000_000  # beyond any vocabulary: the sampler takes min(top_k, vocabulary)
# Ollama options that change sampling in ways we do not implement, with the only value we
# honour (the one that turns them off; our repeat penalty always looks back 64 tokens).
# Anything else is refused rather than silently ignored. Other options are accepted and
# ignored: those that only tune resources (num_ctx, num_thread, num_gpu, num_batch,
# use_mmap, use_mlock, numa, low_vram, main_gpu, num_keep, f16_kv, vocab_only),
# mirostat_tau and mirostat_eta (inert while mirostat is 0), and penalize_newline
# (Ollama itself ignores it now).
FIXED_OPTIONS = {"mirostat": 0, "tfs_z": 1, "typical_p": 1, "min_p": 0, "repeat_last_n": 64}


def parse_options(fields: dict) -> tuple[Sampling, int | None, list[str]]:
    """Sampling options, `max_tokens` and `stop` from a flat dict of fields."""
    given = {k: v for k, v in fields.items() if v is not None}
    s = Sampling()
    if "temperature" in given:
        s.temperature = _number("temperature", given["temperature"], 0, 100)
        if s.temperature < MIN_TEMPERATURE:
            s.temperature = 0.0
    if "top_p" in given:
        s.top_p = _number("top_p", given["top_p"], 0, 1, low_open=True)
    if "top_k" in given:
        s.top_k = _integer("top_k", given["top_k"], 0, MAX_TOP_K)
    if "repeat_penalty" in given:
        s.repeat_penalty = _number("repeat_penalty", given["repeat_penalty"], 0.01, 10)
    for name in ("presence_penalty", "frequency_penalty"):
        if name in given:  # OpenAI's range
            setattr(s, name, _number(name, given[name], -2, 2))
    if "seed" in given:
        # Any integer is a seed (negative, 1e308, a 20-digit hash): reduced to the
        # generator's range, so the same seed still gives the same text.
        s.seed = _integer("seed", given["seed"]) % SEEDS
    for name, value in FIXED_OPTIONS.items():
        if name in given and _number(name, given[name]) != value:
            raise HTTPError(400, f"'{name}' is not supported: only {value} is")
    max_tokens = None
    for name in MAX_TOKENS_ALIASES:
        if name in given:
            max_tokens = _integer(name, given[name], -1)
            if max_tokens == 0:
                raise HTTPError(400, f"'{name}' must be a positive integer (or -1: until the context is full)")
    return s, max_tokens, _stops(given.get("stop"))


def parse_generate(body: dict) -> tuple[GenerationRequest, bool]:
    """MiniVault's /generate body (Ollama's /api/generate fields) -> (request, stream?)."""
    if "prompt" not in body or body["prompt"] is None:
        raise HTTPError(400, "'prompt' is required")
    prompt = _string("prompt", body["prompt"])
    if not prompt.strip():
        raise HTTPError(400, "'prompt' must not be empty")
    sampling, max_tokens, stop = parse_options(_options_fields(body))
    system = body.get("system")
    if system is not None:
        system = _string("system", system)
    raw = _boolean("raw", body["raw"]) if body.get("raw") is not None else False
    stream = _boolean("stream", body["stream"]) if body.get("stream") is not None else True
    req = GenerationRequest(prompt=prompt, system=system or None, raw=raw, max_tokens=max_tokens,
                            stop=stop, sampling=sampling,
                            constraint=parse_ollama_format(body.get("format")).constraint)
    return req, stream


def _options_fields(body: dict) -> dict:
    """Ollama's `options` merged under the top-level fields (which win); null = not given."""
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise HTTPError(400, "'options' must be an object")
    top = {k: v for k, v in body.items() if k != "options" and v is not None}
    if any(name in top for name in MAX_TOKENS_ALIASES):
        # The aliases are one field: a top-level max_tokens wins over options.num_predict too.
        options = {k: v for k, v in options.items() if k not in MAX_TOKENS_ALIASES}
    return {**options, **top}


CHAT_ROLES = {"system", "user", "assistant", "tool"}


def parse_messages(value, openai: bool = False) -> list[dict]:
    """Chat messages -> [{"role", "content"}] with text content only. Earlier tool calls
    and tool results become text the way tools.py renders them for the model."""
    if not isinstance(value, list) or not value:
        raise HTTPError(400, "'messages' must be a non-empty list")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise HTTPError(400, f"'messages[{i}]' must be an object")
        role = m.get("role")
        if openai and role == "developer":
            role = "system"
        if not isinstance(role, str) or role not in CHAT_ROLES:  # a list or object is unhashable
            raise HTTPError(400, f"'messages[{i}].role' must be one of system, user, assistant, tool")
        content = m.get("content")
        if openai and isinstance(content, list):  # content parts: text only
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise HTTPError(400, f"'messages[{i}].content' may only hold text parts")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise HTTPError(400, f"'messages[{i}].content' must be a string")
        if m.get("images"):
            raise HTTPError(400, f"'messages[{i}].images': images are not supported")
        if m.get("tool_calls"):
            if role != "assistant":
                raise HTTPError(400, f"'messages[{i}].tool_calls' belongs to an assistant message")
            calls = [_history_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(_list(
                f"messages[{i}].tool_calls", m["tool_calls"]))]
            content = "\n".join(([content] if content else []) + calls)
        if role == "tool":
            result = toolcalls.render_result(content)
            if messages and messages[-1].get("results"):  # results of one turn's calls go together
                messages[-1]["content"] += "\n" + result
                continue
            messages.append({"role": "user", "content": result, "results": True})
            continue
        messages.append({"role": role, "content": content})
    for m in messages:
        m.pop("results", None)
    if messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not any(m["content"].strip() for m in messages if m["role"] == "user"):
        raise HTTPError(400, "'messages' needs a user message with content")
    return messages


def _list(name: str, value) -> list:
    if not isinstance(value, list):
        raise HTTPError(400, f"'{name}' must be a list")
    return value


def _history_call(where: str, call) -> str:
    """An assistant's earlier tool call (OpenAI: arguments as a JSON string; Ollama: an object)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise HTTPError(400, f"'{where}' must hold a function with a name")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise HTTPError(400, f"'{where}.function.arguments' is not valid JSON") from None
    if arguments is None:
        arguments = {}
    return toolcalls.render_call(function["name"], arguments)


def json_constraint(field: str, schema: dict | None) -> Constraint:
    """JSON output (an object, or valid against `schema`), or a 400 naming `field`."""
    if schema is not None and not isinstance(schema, dict):
        raise HTTPError(400, f"'{field}' must be a JSON schema object")
    try:
        return Constraint.json(schema, field)
    except ConstraintInvalid as exc:
        raise HTTPError(400, f"'{field}': not a JSON schema this server supports: {exc}") from None


@dataclass
class OutputFormat:
    """What the reply must be, from format / response_format: JSON (against a schema
    when given) or free text."""

    json: bool = False
    schema: dict | None = None
    constraint: Constraint | None = None

    @classmethod
    def json_output(cls, field: str, schema: dict | None) -> OutputFormat:
        return cls(True, schema, json_constraint(field, schema))


def parse_ollama_format(value) -> OutputFormat:
    """Ollama's `format`: "json" or a JSON schema."""
    if value in (None, ""):
        return OutputFormat()
    if value == "json":
        return OutputFormat.json_output("format", None)
    if isinstance(value, dict):
        return OutputFormat.json_output("format", value)
    raise HTTPError(400, "'format' must be \"json\" or a JSON schema object")


def parse_response_format(value, field: str = "response_format") -> OutputFormat:
    """OpenAI's `response_format`: text, json_object, or json_schema {name, schema, strict}."""
    if value is None:
        return OutputFormat()
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return OutputFormat()
    if kind == "json_object":
        return OutputFormat.json_output(field, None)
    if kind == "json_schema":
        spec = value.get("json_schema") if field == "response_format" else value
        if not isinstance(spec, dict):
            raise HTTPError(400, f"'{field}.json_schema' must be an object with a 'schema'")
        where = f"{field}.json_schema.schema" if field == "response_format" else f"{field}.schema"
        return OutputFormat.json_output(where, spec.get("schema"))
    raise HTTPError(400, f"'{field}.type' must be 'text', 'json_object' or 'json_schema'")


def apply_tools(body: dict, req: GenerationRequest, output: OutputFormat, choice_field: bool,
                eager: bool = False) -> bool:
    """Set the request's messages and constraint from `tools` (and `tool_choice`, on
    OpenAI) and the output format. True when the reply is to be read for tool calls.

    `eager`: when the client leaves the choice to us (Ollama has no `tool_choice`) and
    the user spoke last, the reply is a call; after a tool's result the model may answer.
    Left to choose, the embedded 135M model put 0.1-2% on starting a call and answered
    in text in every try, so tools would never be called."""
    given = body.get("tools")
    try:
        tools = toolcalls.parse_tools(given) if given not in (None, []) else []
        choice = toolcalls.parse_tool_choice(body.get("tool_choice") if choice_field else None, tools)
        last = body["messages"][-1] if isinstance(body.get("messages"), list) and body["messages"] else {}
        if eager and tools and body.get("tool_choice") is None and last.get("role") == "user":
            choice = "required"
        if not tools or choice == "none":
            if choice_field and body.get("tool_choice") not in (None, "none", "auto") and not tools:
                raise toolcalls.ToolsInvalid("'tool_choice' needs 'tools'")
            req.constraint = output.constraint
            return False
        # One call per reply unless asked for more: allowed several, the embedded 135M
        # model added a call nobody asked for (Paris, then Bordeaux) in most tries.
        parallel = body.get("parallel_tool_calls")
        parallel = _boolean("parallel_tool_calls", parallel) if parallel is not None else False
        req.constraint = toolcalls.call_constraint(tools, choice, parallel, output.schema, output.json)
    except toolcalls.ToolsInvalid as exc:
        raise HTTPError(400, str(exc)) from None
    req.messages = toolcalls.with_tools(req.messages, tools)
    return True


def parse_chat(body: dict, eager_tools: bool = False) -> tuple[GenerationRequest, bool, bool]:
    """Ollama's /api/chat body -> (request, stream?, read tool calls?)."""
    output = parse_ollama_format(body.get("format"))
    messages = parse_messages(body.get("messages"))
    sampling, max_tokens, stop = parse_options(_options_fields(body))
    stream = _boolean("stream", body["stream"]) if body.get("stream") is not None else True
    req = GenerationRequest(messages=messages, max_tokens=max_tokens, stop=stop, sampling=sampling)
    reads_calls = apply_tools(body, req, output, choice_field=False, eager=eager_tools)
    return req, stream, reads_calls


# OpenAI request fields we cannot honour: refused rather than silently ignored.
OPENAI_UNSUPPORTED = ("functions", "function_call", "logprobs", "top_logprobs", "logit_bias", "suffix",
                      "audio", "modalities", "prediction")


# OpenAI request fields that parse_options reads; others would let Ollama's options in.
OPENAI_OPTIONS = ("temperature", "top_p", "seed", "max_tokens", "stop", "presence_penalty", "frequency_penalty")


def parse_openai(body: dict, chat: bool, eager_tools: bool = False) -> tuple[GenerationRequest, bool, bool, bool]:
    """OpenAI's /v1/chat/completions or /v1/completions body -> (request, stream?,
    include usage?, read tool calls?)."""
    for name in OPENAI_UNSUPPORTED:
        if body.get(name) not in (None, False, "none", [], {}):
            raise HTTPError(400, f"'{name}' is not supported")
    if not chat:
        refuse_unsupported(body, ("tools", "tool_choice"))
    output = parse_response_format(body.get("response_format"))
    for name in ("n", "best_of"):
        if body.get(name) is not None and _integer(name, body[name], 1) != 1:
            raise HTTPError(400, f"'{name}' must be 1: one completion per request")
    if body.get("echo"):
        raise HTTPError(400, "'echo' is not supported")
    fields = {k: v for k, v in body.items() if v is not None}
    if "max_completion_tokens" in fields:
        fields["max_tokens"] = fields.pop("max_completion_tokens")
    if fields.get("temperature") is not None:
        _number("temperature", fields["temperature"], 0, 2)
    sampling, max_tokens, stop = parse_options({k: fields[k] for k in OPENAI_OPTIONS if k in fields})
    stream = _boolean("stream", body["stream"]) if body.get("stream") is not None else False
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise HTTPError(400, "'stream_options' must be an object")
    include_usage = stream_options.get("include_usage")
    include_usage = _boolean("stream_options.include_usage", include_usage) if include_usage is not None else False
    if chat:
        req = GenerationRequest(messages=parse_messages(body.get("messages"), openai=True))
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt.strip():
            raise HTTPError(400, "'prompt' must be a non-empty string")
        req = GenerationRequest(prompt=prompt, raw=True)  # completions continue the text as given
    req.max_tokens, req.stop, req.sampling = max_tokens, stop, sampling
    if chat:
        reads_calls = apply_tools(body, req, output, choice_field=True, eager=eager_tools)
    else:
        req.constraint, reads_calls = output.constraint, False
    return req, stream, include_usage, reads_calls


def refuse_unsupported(body: dict, names) -> None:
    """A 400 naming the first of these fields that asks for something (not null, false or empty)."""
    for name in names:
        if body.get(name) not in (None, False, "", [], {}):
            raise HTTPError(400, f"'{name}' is not supported")


# Ollama fields that would change the answer and are not implemented: refused rather
# than dropped. `think` asks a reasoning model for its thoughts, `template` and
# `context` replace the prompt's making, the rest are fill-in-the-middle, token
# probabilities and image generation.
OLLAMA_CHAT_UNSUPPORTED = ("think", "logprobs", "top_logprobs")
OLLAMA_GENERATE_UNSUPPORTED = OLLAMA_CHAT_UNSUPPORTED + ("suffix", "template", "context", "width", "height",
                                                         "steps")


def parse_openai_embeddings(body: dict) -> tuple[list, str]:
    """OpenAI's /v1/embeddings `input` (a string, strings, token ids or lists of them)
    and `encoding_format`."""
    refuse_unsupported(body, ("dimensions",))
    value = body.get("input")
    if isinstance(value, str) or (isinstance(value, list) and value and all(_is_token(t) for t in value)):
        value = [value]
    if (not isinstance(value, list) or not value or
            not all(isinstance(v, str) or (isinstance(v, list) and v and all(_is_token(t) for t in v))
                    for v in value)):
        raise HTTPError(400, "'input' must be a non-empty string, list of strings, token ids or lists of them")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise HTTPError(400, "'encoding_format' must be 'float' or 'base64'")
    return value, encoding


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _base64_floats(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# Responses API fields we cannot honour (with a value that asks for something).
RESPONSES_UNSUPPORTED = ("tools", "previous_response_id", "reasoning", "background", "top_logprobs",
                         "conversation", "prompt", "include", "max_tool_calls")
RESPONSES_TEXT_PARTS = ("input_text", "output_text", "text")


def parse_responses(body: dict) -> tuple[GenerationRequest, bool]:
    """OpenAI's /v1/responses body -> (request, stream?)."""
    refuse_unsupported(body, RESPONSES_UNSUPPORTED)
    if body.get("tool_choice") not in (None, "auto", "none"):
        raise HTTPError(400, "'tool_choice' is not supported")
    text_format = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if body.get("text") is not None and not isinstance(body.get("text"), dict):
        raise HTTPError(400, "'text' must be an object")
    output = parse_response_format(text_format, field="text.format")
    value = body.get("input")
    if isinstance(value, str):
        if not value.strip():
            raise HTTPError(400, "'input' must not be empty")
        items = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        items = [_responses_message(i, item) for i, item in enumerate(value)]
    else:
        raise HTTPError(400, "'input' must be a string or a non-empty list of message items")
    instructions = body.get("instructions")
    if instructions is not None:
        items = [{"role": "system", "content": _string("instructions", instructions)}] + items
    fields = {k: body[k] for k in ("temperature", "top_p") if body.get(k) is not None}
    if body.get("temperature") is not None:
        _number("temperature", body["temperature"], 0, 2)
    sampling, _, _ = parse_options(fields)
    max_tokens = None
    if body.get("max_output_tokens") is not None:
        max_tokens = _integer("max_output_tokens", body["max_output_tokens"], 1)
    stream = _boolean("stream", body["stream"]) if body.get("stream") is not None else False
    messages = parse_messages(items, openai=True)
    return GenerationRequest(messages=messages, max_tokens=max_tokens, sampling=sampling,
                             constraint=output.constraint), stream


def _responses_message(i: int, item) -> dict:
    """A Responses input item -> a chat message; only text messages are understood."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        raise HTTPError(400, f"'input[{i}]' must be a message item (other item types are not supported)")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in RESPONSES_TEXT_PARTS \
                    or not isinstance(part.get("text"), str):
                raise HTTPError(400, f"'input[{i}].content' may only hold text parts")
            texts.append(part["text"])
        content = "".join(texts)
    return {"role": item.get("role"), "content": content}


def ndjson_line(obj: dict) -> bytes:
    return json_bytes(obj) + b"\n"


def final_fields(final: Final) -> dict:
    """Ollama's statistics for the last object of a reply (durations in nanoseconds)."""
    s = final.stats
    return {"done": True, "done_reason": final.done_reason,
            "prompt_eval_count": s.prompt_tokens, "eval_count": s.completion_tokens,
            "total_duration": s.total_ns, "load_duration": s.load_ns,
            "prompt_eval_duration": s.prompt_eval_ns, "eval_duration": s.eval_ns}


# ---------------------------------------------------------------------------
# Reply shapes: how each API encodes the same generation (pure)


class Shape:
    """MiniVault's own /generate: NDJSON {"response"} lines, Ollama statistics last."""

    content_type = NDJSON
    request_id = 0  # the engine's id, set once the request is queued

    def __init__(self, model: str):
        self.model = model

    def piece(self, text: str) -> bytes:
        return ndjson_line({"response": text})

    def end(self, final: Final) -> bytes:
        return ndjson_line(self.whole("", final))

    def error_line(self, message: str) -> bytes:
        return ndjson_line({"error": message})

    def whole(self, text: str, final: Final) -> dict:
        return {"response": text, **final_fields(final)}

    def error(self, message: str, status: int) -> dict:
        return {"error": message}


class OllamaGenerate(Shape):
    def content(self, text: str) -> dict:
        return {"response": text}

    def piece(self, text: str) -> bytes:
        return ndjson_line({"model": self.model, "created_at": utc_timestamp("auto"), **self.content(text),
                            "done": False})

    def whole(self, text: str, final: Final) -> dict:
        return {"model": self.model, "created_at": utc_timestamp("auto"), **self.content(text),
                **final_fields(final)}


class OllamaChat(OllamaGenerate):
    def __init__(self, model: str, reads_calls: bool = False):
        super().__init__(model)
        self.calls = toolcalls.ToolCallReader() if reads_calls else None

    def content(self, text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}

    def piece(self, text: str) -> bytes:
        if self.calls is None:
            return super().piece(text)
        content, calls = self.calls.feed(text)
        out = super().piece(content) if content else b""
        if calls:  # Ollama streams each call whole, in a message of its own
            out += ndjson_line({"model": self.model, "created_at": utc_timestamp("auto"),
                                "message": {"role": "assistant", "content": "", "tool_calls": ollama_calls(calls)},
                                "done": False})
        return out

    def end(self, final: Final) -> bytes:
        rest = self.calls.finish() if self.calls is not None else ""
        return (super().piece(rest) if rest else b"") + super().end(final)

    def whole(self, text: str, final: Final) -> dict:
        if self.calls is None or not text:
            return super().whole(text, final)
        content, calls = self.calls.feed(text)
        body = super().whole(content + self.calls.finish(), final)
        if calls:
            body["message"]["tool_calls"] = ollama_calls(calls)
        return body


def ollama_calls(calls: list[dict]) -> list[dict]:
    return [{"function": {"name": c["name"], "arguments": c["arguments"]}} for c in calls]


def openai_error(message: str, status: int) -> dict:
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {404: "model_not_found", 503: "server_busy", 429: "rate_limit_exceeded"}.get(status)
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


class OpenAICompletion(Shape):
    """OpenAI's /v1/completions: Server-Sent Events when streaming."""

    content_type = SSE
    object_name = "text_completion"
    id_prefix = "cmpl-"

    def __init__(self, model: str, include_usage: bool = False):
        super().__init__(model)
        self.include_usage = include_usage
        self.created = int(time.time())

    @property
    def id(self) -> str:
        return f"{self.id_prefix}{self.request_id}"

    def _event(self, obj) -> bytes:
        return b"data: " + json_bytes(obj) + b"\n\n"

    def _chunk(self, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [choice], **extra}

    def _choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def piece(self, text: str) -> bytes:
        return self._event(self._chunk(self._choice(text, None)))

    def _finish(self, final: Final) -> str:
        return finish_reason(final)

    def end(self, final: Final) -> bytes:
        out = self._event(self._chunk(self._choice("", self._finish(final))))
        if self.include_usage:
            out += self._event({**self._chunk({}), "choices": [], "usage": usage(final)})
        return out + b"data: [DONE]\n\n"

    def error_line(self, message: str) -> bytes:
        return self._event(openai_error(message, 500)) + b"data: [DONE]\n\n"

    def whole(self, text: str, final: Final) -> dict:
        return self._chunk(self._choice(text, self._finish(final)), usage=usage(final))

    def error(self, message: str, status: int) -> dict:
        return openai_error(message, status)


class OpenAIChat(OpenAICompletion):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"

    def __init__(self, model: str, include_usage: bool = False, reads_calls: bool = False):
        super().__init__(model, include_usage)
        self._first = True
        self.calls = toolcalls.ToolCallReader() if reads_calls else None

    def _finish(self, final: Final) -> str:
        if self.calls is not None and self.calls.calls and final.done_reason == "stop":
            return "tool_calls"
        return finish_reason(final)

    def piece(self, text: str) -> bytes:
        if self.calls is None:
            return super().piece(text)
        content, calls = self.calls.feed(text)
        out = super().piece(content) if content else b""
        for call in calls:  # each call whole in one delta: id, name and all its arguments
            delta = {"tool_calls": [{"index": self.calls.calls.index(call), **openai_call(call)}]}
            if self._first:
                delta = {"role": "assistant", "content": None, **delta}
                self._first = False
            out += self._event(self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}))
        return out

    def end(self, final: Final) -> bytes:
        rest = self.calls.finish() if self.calls is not None else ""
        return (super().piece(rest) if rest else b"") + super().end(final)

    def _choice(self, text: str, finish: str | None, whole: bool = False) -> dict:
        key = "message" if whole else "delta"
        content = {"role": "assistant", "content": text} if (whole or self._first) else {"content": text}
        if finish and not whole:
            content = {}
        self._first = False
        return {"index": 0, key: content, "logprobs": None, "finish_reason": finish}

    def whole(self, text: str, final: Final) -> dict:
        calls = []
        if self.calls is not None and text:
            text, calls = self.calls.feed(text)
            text += self.calls.finish()
        body = self._chunk(self._choice(text, self._finish(final), whole=True), usage=usage(final))
        body["object"] = "chat.completion"
        if calls:
            message = body["choices"][0]["message"]
            message["content"] = text or None
            message["tool_calls"] = [openai_call(c) for c in calls]
        return body


def openai_call(call: dict) -> dict:
    return {"id": call["id"], "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}


class OpenAIResponse(Shape):
    """OpenAI's /v1/responses: a `response` object, or its documented event stream
    (created, in_progress, output item and content part added, text deltas, done
    events, completed)."""

    content_type = SSE

    def __init__(self, model: str, request_fields: dict):
        super().__init__(model)
        self.created = int(time.time())
        self.fields = request_fields  # echoed in the response object, as OpenAI does
        self._sequence = 0
        self._text: list[str] = []
        self._opened = False

    @property
    def id(self) -> str:
        return f"resp_{self.request_id}"

    @property
    def item_id(self) -> str:
        return f"msg_{self.request_id}"

    def _event(self, kind: str, **fields) -> bytes:
        body = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return b"event: " + kind.encode() + b"\ndata: " + json_bytes(body) + b"\n\n"

    def _part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": []}

    def _item(self, status: str, parts: list) -> dict:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": parts}

    def _response(self, status: str, final: Final | None = None, error: dict | None = None) -> dict:
        text = "".join(self._text)
        incomplete = final is not None and final.done_reason == "length"
        body = {"id": self.id, "object": "response", "created_at": self.created,
                "status": "incomplete" if incomplete else status, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "model": self.model, "output": [], "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {},
                "usage": None, **self.fields}
        if final is not None:
            body["output"] = [self._item("incomplete" if incomplete else "completed", [self._part(text)])]
            s = final.stats
            body["usage"] = {"input_tokens": s.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                             "output_tokens": s.completion_tokens,
                             "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": s.prompt_tokens + s.completion_tokens}
        return body

    def _open(self) -> bytes:
        if self._opened:
            return b""
        self._opened = True
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return (self._event("response.created", response=self._response("in_progress"))
                + self._event("response.in_progress", response=self._response("in_progress"))
                + self._event("response.output_item.added", output_index=0, item=self._item("in_progress", []))
                + self._event("response.content_part.added", **where, part=self._part("")))

    def piece(self, text: str) -> bytes:
        self._text.append(text)
        return self._open() + self._event("response.output_text.delta", item_id=self.item_id, output_index=0,
                                          content_index=0, delta=text)

    def end(self, final: Final) -> bytes:
        text = "".join(self._text)
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        done = self._response("completed", final)
        return (self._open() + self._event("response.output_text.done", **where, text=text)
                + self._event("response.content_part.done", **where, part=self._part(text))
                + self._event("response.output_item.done", output_index=0, item=done["output"][0])
                + self._event("response.completed" if done["status"] == "completed" else "response.incomplete",
                              response=done))

    def error_line(self, message: str) -> bytes:
        return self._open() + self._event("response.failed", response=self._response(
            "failed", error={"code": "server_error", "message": message}))

    def whole(self, text: str, final: Final) -> dict:
        self._text = [text]
        return self._response("completed", final)

    def error(self, message: str, status: int) -> dict:
        return openai_error(message, status)


def finish_reason(final: Final) -> str:
    return "length" if final.done_reason == "length" else "stop"


def usage(final: Final) -> dict:
    s = final.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens}


# ---------------------------------------------------------------------------
# Handlers


DEFAULT_CORS_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*")


def origin_allowed(origin: str, patterns) -> bool:
    """`*` allows all; `scheme://host:*` allows that host on any port (or none)."""
    for pattern in patterns:
        if pattern == "*" or origin == pattern:
            return True
        if pattern.endswith(":*"):
            base = pattern[:-2]
            if origin == base or (origin.startswith(base + ":") and origin[len(base) + 1:].isdigit()):
                return True
    return False


def host_name(value: str) -> str:
    """The host part of a Host header (or of an --allowed-hosts entry), lower-cased:
    'LocalHost:3000' -> 'localhost', '[::1]:3000' -> '[::1]'."""
    value = value.strip().lower()
    head, sep, port = value.rpartition(":")
    return head if sep and port.isdigit() else value


def is_loopback(host: str) -> bool:
    """'localhost', 127.x.x.x, ::1 (bracketed or not): names only this machine can use."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.removeprefix("[").removesuffix("]")).is_loopback
    except ValueError:
        return False


def host_allowed(host: str | None, allowed: tuple[str, ...] | None) -> bool:
    """None (or '*' among them) allows any host; else loopback names and those listed."""
    # A browser always sends Host, so a request without one (HTTP/1.0) is no rebinding.
    if allowed is None or "*" in allowed or not host:
        return True
    name = host_name(host)
    return is_loopback(name) or name in allowed


def allowed_hosts_option(value: str | None, loopback: bool) -> tuple[str, ...] | None:
    """--allowed-hosts (comma-separated, '*' for any) -> Policy.allowed_hosts. Not given:
    loopback names only when bound to loopback (DNS rebinding), else any host."""
    if value is None:
        return () if loopback else None
    names = tuple(host_name(n) for n in value.split(",") if n.strip())
    return None if "*" in names else names


def same_origin(origin: str, host: str | None) -> bool:
    """A page this server served (the playground) calling back, whatever --cors-origins says.
    Only DNS rebinding could make a foreign page's origin match its Host: the Host check's job."""
    return bool(host) and origin.lower() == f"http://{host.strip().lower()}"


@dataclass
class Policy:
    """Who may call what: API key, rate limit, browser origins, host names, what the log keeps."""

    api_key: str | None = None
    rate_limiter: RateLimiter | None = None
    cors_origins: tuple[str, ...] = DEFAULT_CORS_ORIGINS
    log_prompts: bool = True
    # Host header names (no port) a request may carry besides loopback ones; None: any.
    # A foreign page whose name is re-pointed at 127.0.0.1 (DNS rebinding) sends its own.
    allowed_hosts: tuple[str, ...] | None = None


class Api:
    def __init__(self, engine: Engine, request_log: RequestLog, policy: Policy | None = None,
                 metrics: Metrics | None = None, is_draining: Callable[[], bool] = lambda: False,
                 eager_tools: bool = False):
        self.engine = engine
        self.eager_tools = eager_tools  # --tool-calls eager: see apply_tools
        self.request_log = request_log
        self.policy = policy or Policy()
        self.metrics = metrics or Metrics()
        self.is_draining = is_draining
        self.started_at = utc_timestamp("auto")
        self.static = StaticFiles(WEB_ROOT)
        self._register_metrics()

    def routes(self, router: Router) -> None:
        add = self._add
        add(router, "POST", "/generate", self.generate, generation=True)
        add(router, "GET", "/health", self.health, public=True)
        add(router, "GET", "/metrics", self.metrics_page)
        add(router, "POST", "/api/generate", self.ollama_generate, generation=True)
        add(router, "POST", "/api/chat", self.ollama_chat, generation=True)
        add(router, "GET", "/api/tags", self.ollama_tags)
        add(router, "POST", "/api/show", self.ollama_show)
        add(router, "GET", "/api/ps", self.ollama_ps)
        add(router, "GET", "/api/version", self.ollama_version)
        add(router, "POST", "/api/pull", self.ollama_pull)
        add(router, "POST", "/api/embed", self.ollama_embed, generation=True)
        add(router, "POST", "/api/embeddings", self.ollama_embeddings, generation=True)
        add(router, "POST", "/v1/embeddings", self.openai_embeddings, generation=True)
        add(router, "POST", "/v1/completions", self.openai_completions, generation=True)
        add(router, "POST", "/v1/chat/completions", self.openai_chat, generation=True)
        add(router, "POST", "/v1/responses", self.openai_responses, generation=True)
        add(router, "GET", "/v1/models", self.openai_models)
        add(router, "GET", "/v1/models/", self.openai_model, prefix=True)
        # The playground page: public files, no secrets in them; only the Host is checked.
        router.add("GET", "/", self._host_guard(self.static.index))
        router.add_prefix("GET", self.static.prefix, self._host_guard(self.static.file))
        router.error_shape = self._error_body  # also for the server's own 404, 405, 413...

    # ---- the guard in front of every route: Host, Origin, API key, rate limit ----

    def _add(self, router: Router, method: str, path: str, handler, generation: bool = False,
             public: bool = False, prefix: bool = False) -> None:
        add = router.add_prefix if prefix else router.add
        add(method, path, self._guard(handler, lambda r, w: self._check(r, w, generation, public)))
        add("OPTIONS", path, self._host_guard(self._preflight_for(path)))

    @staticmethod
    def _guard(handler, check: Callable[[Request, ResponseWriter], HTTPError | None]):
        async def guarded(request: Request, writer: ResponseWriter) -> None:
            refusal = check(request, writer)
            if refusal is not None:
                raise refusal  # the server answers it in the path's error shape
            await handler(request, writer)
        return guarded

    def _host_guard(self, handler):
        return self._guard(handler, lambda request, writer: self._host_refusal(request))

    def _host_refusal(self, request: Request) -> HTTPError | None:
        host = request.header("host")
        if host_allowed(host, self.policy.allowed_hosts):
            return None
        return HTTPError(403, f"host {host!r} is not allowed; start with --allowed-hosts {host_name(host)} "
                              f"to allow it")

    def _error_body(self, path: str, message: str, status: int) -> dict:
        return openai_error(message, status) if path.startswith("/v1/") else {"error": message}

    def _check(self, request: Request, writer: ResponseWriter, generation: bool, public: bool) -> HTTPError | None:
        """None when the request may go on, else the refusal (403, 401 or 429)."""
        refusal = self._host_refusal(request)
        if refusal is not None:
            return refusal
        origin = request.header("origin")
        if origin and origin_allowed(origin, self.policy.cors_origins):
            writer.extra_headers += [("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                                     ("Access-Control-Expose-Headers", "X-Request-Id, Retry-After, RateLimit-Limit, "
                                                                       "RateLimit-Remaining, RateLimit-Reset")]
        elif origin and not same_origin(origin, request.header("host")):
            # A page elsewhere can send a "simple" POST (text/plain, no preflight) that runs
            # although it cannot read the answer: refused before any handler runs.
            return HTTPError(403, f"origin {origin!r} is not allowed")
        key = self.policy.api_key
        if key and not public:
            given = request.header("authorization") or ""
            scheme, _, token = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                return HTTPError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                 [("WWW-Authenticate", 'Bearer realm="minivault"')])
        limiter = self.policy.rate_limiter
        if generation and limiter is not None:
            decision = limiter.check(request.client, time.monotonic())
            if not decision.allowed:
                self.metrics.inc("minivault_rate_limited_total")
                return HTTPError(429, f"rate limit of {limiter.limit} requests per {limiter.period:g} s "
                                      f"exceeded; retry later", decision.headers())
            writer.extra_headers += decision.headers()
        return None

    def _preflight_for(self, path: str):
        async def preflight(request: Request, writer: ResponseWriter) -> None:
            origin = request.header("origin")
            if not origin or not origin_allowed(origin, self.policy.cors_origins):
                raise HTTPError(403, f"origin {origin!r} is not allowed")
            asked = request.header("access-control-request-headers") or "Authorization, Content-Type"
            await writer.send(204, b"", "", [
                ("Access-Control-Allow-Origin", origin), ("Vary", "Origin"),
                ("Access-Control-Allow-Methods", "GET, POST, OPTIONS"),
                ("Access-Control-Allow-Headers", asked), ("Access-Control-Max-Age", "600")])
        return preflight

    # ---- metrics ----

    def _register_metrics(self) -> None:
        m, e = self.metrics, self.engine
        m.counter("minivault_requests_total", "Generation requests by endpoint and outcome.")
        m.counter("minivault_http_responses_total", "HTTP responses by route and status code.")
        m.counter("minivault_tokens_generated_total", "Completion tokens generated.")
        m.counter("minivault_prompt_tokens_total", "Prompt tokens processed.")
        m.counter("minivault_cancellations_total", "Generations stopped because the client left.")
        m.counter("minivault_queue_rejections_total", "Requests refused with 503 because the queue was full.")
        m.counter("minivault_rate_limited_total", "Requests refused with 429.")
        m.histogram("minivault_time_to_first_token_seconds", "Time from request to first token.")
        m.histogram("minivault_request_duration_seconds", "Time from request to end of reply.")
        m.gauge("minivault_queue_depth", "Requests waiting for a batch slot.", lambda: e.queued)
        m.gauge("minivault_active_sequences", "Sequences in the running batch.", lambda: e.active_count)
        m.gauge("minivault_model_load_seconds", "Seconds the model took to load.", lambda: e.load_seconds)
        m.gauge("minivault_model_loaded", "1 once the model is ready.", lambda: 1.0 if e.ready else 0.0)
        m.gauge("minivault_log_write_errors_total", "Request log lines that could not be written.",
                lambda: self.request_log.errors)

    def observe_response(self, route: str, status: int) -> None:
        self.metrics.inc("minivault_http_responses_total", route=route, code=str(status))

    async def metrics_page(self, request: Request, writer: ResponseWriter) -> None:
        await writer.send(200, self.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8")

    # ---- model names ----

    def model_names(self) -> set[str]:
        """Names a request may use for the loaded model: its name, a short alias, ':latest'."""
        name = self.engine.model_name.lower()
        names = {name, name.split("/")[-1]}
        if name == EMBEDDED_NAME:
            names |= {"smollm2", "smollm2:135m", "smollm2:135m-instruct"}
        return names | {n + ":latest" for n in names}

    def check_model(self, body: dict, required: bool = False) -> str:
        model = body.get("model")
        if model is None or model == "":
            if required:
                raise HTTPError(400, "'model' is required")
            return self.engine.model_name
        if not isinstance(model, str):
            raise HTTPError(400, "'model' must be a string")
        if model.lower() not in self.model_names():
            raise HTTPError(404, f"model '{model}' not found")
        return model

    def _details(self) -> dict:
        e = self.engine
        facts = e.facts
        params = facts.parameters
        size = f"{params / 1e6:.0f}M" if params < 1e9 else f"{params / 1e9:.1f}B"
        fmt = "gguf" if e.source.kind == "gguf" else "safetensors"
        quant = e.source.location.rsplit(".", 2)[-2].upper() if fmt == "gguf" and "." in e.source.location else e.dtype.upper()
        return {"parent_model": "", "format": fmt, "family": facts.architecture,
                "families": [facts.architecture] if facts.architecture else None,
                "parameter_size": size if params else "", "quantization_level": quant}

    def listed_names(self) -> list[str]:
        """The names Ollama clients see in /api/tags, `name:tag` as Ollama lists them:
        clients match a bare name against these (ChatOllama, llm-ollama)."""
        name = self.engine.model_name.lower()
        return ["smollm2:latest" if name == EMBEDDED_NAME else f"{name}:latest"]

    def _model_entry(self, name: str) -> dict:
        e = self.engine
        try:
            size = os.path.getsize(e.source.location) if os.path.isfile(e.source.location) else 0
        except OSError:
            size = 0
        digest = hashlib.sha256(f"{e.model_name}:{e.dtype}".encode()).hexdigest()
        return {"name": name, "model": name, "modified_at": self.started_at, "size": size,
                "digest": digest, "details": self._details()}

    # ---- MiniVault ----

    async def health(self, request: Request, writer: ResponseWriter) -> None:
        e = self.engine
        if self.is_draining():
            await writer.send_json(503, {"status": "draining", "model": e.model_name})
        elif e.load_error:
            await writer.send_json(503, {"status": "error", "error": e.load_error})
        elif not e.ready:
            await writer.send_json(503, {"status": "loading", "model": e.model_name, "queued": e.queued})
        else:
            await writer.send_json(200, {"status": "ok", "model": e.model_name, "device": e.facts.device,
                                         "dtype": e.dtype, "queued": e.queued, "active": e.active_count})

    async def generate(self, request: Request, writer: ResponseWriter) -> None:
        body = parse_json_body(request.body)
        model = self.check_model(body)
        gen, stream = parse_generate(body)
        await self._run(request, writer, gen, stream, "/generate", Shape(model))

    # ---- Ollama ----

    async def ollama_generate(self, request: Request, writer: ResponseWriter) -> None:
        body = parse_json_body(request.body)
        model = self.check_model(body, required=True)
        if body.get("images"):
            raise HTTPError(400, "images are not supported")
        refuse_unsupported(body, OLLAMA_GENERATE_UNSUPPORTED)
        if body.get("prompt") in (None, "") and not body.get("system"):
            await self._loaded_reply(writer, body, {"response": ""})
            return
        gen, stream = parse_generate(body)
        await self._run(request, writer, gen, stream, "/api/generate", OllamaGenerate(model))

    async def ollama_chat(self, request: Request, writer: ResponseWriter) -> None:
        body = parse_json_body(request.body)
        model = self.check_model(body, required=True)
        refuse_unsupported(body, OLLAMA_CHAT_UNSUPPORTED)
        if body.get("messages") in (None, []):
            await self._loaded_reply(writer, body, {"message": {"role": "assistant", "content": ""}})
            return
        gen, stream, reads_calls = parse_chat(body, self.eager_tools)
        await self._run(request, writer, gen, stream, "/api/chat", OllamaChat(model, reads_calls))

    async def _loaded_reply(self, writer: ResponseWriter, body: dict, content: dict) -> None:
        """Ollama's answer to an empty prompt: a request to load the model, done at once."""
        await self.engine.wait_loaded()
        if self.engine.load_error:
            raise HTTPError(500, self.engine.load_error)
        # keep_alive 0 asks Ollama to unload; the only model here stays loaded, but the
        # answer says what was asked, as clients check it.
        unload = body.get("keep_alive") in (0, "0", "0s", "0m")
        obj = {"model": body["model"], "created_at": utc_timestamp("auto"), **content,
               "done": True, "done_reason": "unload" if unload else "load"}
        if body.get("stream") is False:
            await writer.send_json(200, obj)
        else:
            await writer.start_stream(200, NDJSON, STREAM_HEADERS)
            await writer.write(ndjson_line(obj))
            await writer.end()

    async def ollama_tags(self, request: Request, writer: ResponseWriter) -> None:
        await writer.send_json(200, {"models": [self._model_entry(name) for name in self.listed_names()]})

    async def ollama_pull(self, request: Request, writer: ResponseWriter) -> None:
        """Nothing to download: the model a client asks for is the one served, or a 404."""
        body = parse_json_body(request.body)
        if body.get("model") is None and body.get("name") is not None:
            body["model"] = body["name"]
        self.check_model(body, required=True)
        if body.get("stream") is False:
            await writer.send_json(200, {"status": "success"})
        else:  # Ollama's status stream, in short
            await writer.start_stream(200, NDJSON, STREAM_HEADERS)
            await writer.write(ndjson_line({"status": "pulling manifest"}) + ndjson_line({"status": "success"}))
            await writer.end()

    async def ollama_show(self, request: Request, writer: ResponseWriter) -> None:
        body = parse_json_body(request.body)
        if body.get("model") is None and body.get("name") is not None:
            body["model"] = body["name"]
        self.check_model(body, required=True)
        e = self.engine
        arch = e.facts.architecture
        await writer.send_json(200, {
            "modelfile": f"FROM {e.source.location}\n",
            "parameters": "temperature 0.8\ntop_p 0.9\ntop_k 40\nrepeat_penalty 1.1",
            "template": e.facts.chat_template,
            "details": self._details(),
            "model_info": {"general.architecture": arch, "general.parameter_count": e.facts.parameters,
                           f"{arch}.context_length": e.context_length},
            "capabilities": ["completion", "tools", "embedding"],
            "modified_at": self.started_at,
        })

    async def ollama_ps(self, request: Request, writer: ResponseWriter) -> None:
        models = []
        if self.engine.ready:
            entry = self._model_entry(self.listed_names()[0])
            entry.pop("modified_at")
            models.append({**entry, "expires_at": "2999-12-31T23:59:59Z", "size_vram": 0,
                           "context_length": self.engine.context_length})
        await writer.send_json(200, {"models": models})

    async def ollama_version(self, request: Request, writer: ResponseWriter) -> None:
        await writer.send_json(200, {"version": VERSION})

    # ---- OpenAI ----

    async def openai_completions(self, request: Request, writer: ResponseWriter) -> None:
        await self._openai(request, writer, chat=False)

    async def openai_chat(self, request: Request, writer: ResponseWriter) -> None:
        await self._openai(request, writer, chat=True)

    async def _openai(self, request: Request, writer: ResponseWriter, chat: bool) -> None:
        try:
            body = parse_json_body(request.body)
            model = self.check_model(body)
            gen, stream, include_usage, reads_calls = parse_openai(body, chat, self.eager_tools)
        except HTTPError as err:  # OpenAI clients expect their own error shape
            await writer.send_json(err.status, openai_error(err.message, err.status), err.headers)
            return
        shape = OpenAIChat(model, include_usage, reads_calls) if chat else OpenAICompletion(model, include_usage)
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        await self._run(request, writer, gen, stream, endpoint, shape)

    async def openai_responses(self, request: Request, writer: ResponseWriter) -> None:
        try:
            body = parse_json_body(request.body)
            model = self.check_model(body)
            gen, stream = parse_responses(body)
        except HTTPError as err:  # OpenAI clients expect their own error shape
            await writer.send_json(err.status, openai_error(err.message, err.status), err.headers)
            return
        # Echoed as OpenAI does, with the values actually used (MiniVault's defaults differ).
        echoed = {"instructions": body.get("instructions"), "max_output_tokens": gen.max_tokens,
                  "temperature": gen.sampling.temperature, "top_p": gen.sampling.top_p,
                  "metadata": body.get("metadata") or {}, "store": False, "user": body.get("user"),
                  "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}}}
        await self._run(request, writer, gen, stream, "/v1/responses", OpenAIResponse(model, echoed))

    def _openai_model(self, name: str) -> dict:
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "minivault"}

    async def openai_models(self, request: Request, writer: ResponseWriter) -> None:
        await writer.send_json(200, {"object": "list", "data": [self._openai_model(self.engine.model_name)]})

    async def openai_model(self, request: Request, writer: ResponseWriter) -> None:
        """GET /v1/models/{id}: the served model under any name it answers to."""
        name = unquote(request.path[len("/v1/models/"):])
        if name.lower() not in self.model_names():
            raise HTTPError(404, f"model '{name}' not found")
        await writer.send_json(200, self._openai_model(name))

    # ---- embeddings ----

    async def ollama_embed(self, request: Request, writer: ResponseWriter) -> None:
        body = parse_json_body(request.body)
        model = self.check_model(body, required=True)
        refuse_unsupported(body, ("dimensions",))
        inputs = body.get("input")
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise HTTPError(400, "'input' must be a string or a list of strings")
        truncate = _boolean("truncate", body["truncate"]) if body.get("truncate") is not None else True
        started = time.monotonic()
        final = await self._embed(request, writer, inputs, truncate, "/api/embed") if inputs else None
        await writer.send_json(200, {
            "model": model, "embeddings": final.embeddings if final else [],
            "total_duration": final.stats.total_ns if final else int((time.monotonic() - started) * 1e9),
            "load_duration": final.stats.load_ns if final else 0,
            "prompt_eval_count": final.stats.prompt_tokens if final else 0})

    async def ollama_embeddings(self, request: Request, writer: ResponseWriter) -> None:
        """Ollama's older endpoint: one `prompt`, one `embedding`."""
        body = parse_json_body(request.body)
        self.check_model(body, required=True)
        prompt = _string("prompt", body.get("prompt", ""))
        if not prompt:  # as Ollama answers an empty prompt
            await writer.send_json(200, {"embedding": []})
            return
        final = await self._embed(request, writer, [prompt], True, "/api/embeddings")
        await writer.send_json(200, {"embedding": final.embeddings[0]})

    async def openai_embeddings(self, request: Request, writer: ResponseWriter) -> None:
        try:
            body = parse_json_body(request.body)
            model = self.check_model(body)
            inputs, encoding = parse_openai_embeddings(body)
            final = await self._embed(request, writer, inputs, False, "/v1/embeddings")
        except HTTPError as err:  # OpenAI clients expect their own error shape
            await writer.send_json(err.status, openai_error(err.message, err.status), err.headers)
            return
        data = [{"object": "embedding", "index": i,
                 "embedding": _base64_floats(v) if encoding == "base64" else v}
                for i, v in enumerate(final.embeddings)]
        tokens = final.stats.prompt_tokens
        await writer.send_json(200, {"object": "list", "data": data, "model": model,
                                     "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def _embed(self, request: Request, writer: ResponseWriter, inputs: list, truncate: bool,
                     endpoint: str) -> Final:
        """Run an embedding request through the engine's queue; its Final, or an HTTPError."""
        gen = GenerationRequest(embed_inputs=inputs, truncate=truncate)
        stream = self._submit(request, writer, gen, endpoint, time.monotonic())
        try:
            final = await stream.wait_final()
        finally:
            stream.cancel()  # a no-op once it has ended
        if final.error:
            raise HTTPError(400 if final.client_error else 500, final.error)
        if final.embeddings is None:
            raise HTTPError(503, "the embedding was cancelled")
        return final

    # ---- the one generation path behind every shape ----

    async def _run(self, request: Request, writer: ResponseWriter, gen: GenerationRequest,
                   stream_mode: bool, endpoint: str, shape: Shape) -> None:
        """Submit, then stream (or collect) the text."""
        started = time.monotonic()
        try:
            stream = self._submit(request, writer, gen, endpoint, started)
        except HTTPError as err:
            await writer.send_json(err.status, shape.error(err.message, err.status), err.headers)
            return
        shape.request_id = stream.id
        id_header = [("X-Request-Id", str(stream.id))]
        try:
            item = await stream.next()
            if isinstance(item, str):
                self.metrics.observe("minivault_time_to_first_token_seconds", time.monotonic() - started)
            if isinstance(item, Final) and item.error:
                status = 400 if item.client_error else 500
                await writer.send_json(status, shape.error(item.error, status), id_header)
                return
            if stream_mode:
                await writer.start_stream(200, shape.content_type, STREAM_HEADERS + id_header)
                try:
                    while not isinstance(item, Final):
                        await writer.write(shape.piece(item))
                        item = await stream.next()
                    await writer.write(shape.error_line(item.error) if item.error else shape.end(item))
                except ClientGone:
                    raise
                except Exception:
                    # The status line is gone already: end the stream with an error line.
                    log.exception("stream %s failed", stream.id)
                    await writer.write(shape.error_line("internal server error"))
                await writer.end()
            else:
                final = await stream.wait_final()
                if final.error:
                    await writer.send_json(500, shape.error(final.error, 500), id_header)
                else:
                    await writer.send_json(200, shape.whole("".join(stream.text), final), id_header)
        finally:
            stream.cancel()  # a no-op once it has ended; else the client left or we are stopping

    def _submit(self, request: Request, writer: ResponseWriter, gen: GenerationRequest, endpoint: str,
                started: float) -> TokenStream:
        """Queue a request for the engine, or raise the HTTPError that refuses it (400, or
        503 with Retry-After). Once queued, its log line is written from its final event,
        whatever happens to the handler, and a client that leaves cancels it."""
        try:
            stream = self.engine.submit(gen)
        except RequestInvalid as exc:
            raise HTTPError(400, str(exc)) from None
        except (QueueFull, ShuttingDown) as exc:
            self.metrics.inc("minivault_queue_rejections_total")
            retry = self.engine.estimated_wait_s()
            raise HTTPError(503, f"server busy: {exc}; retry in about {retry} s",
                            [("Retry-After", str(retry))]) from None
        stream.on_final(lambda s: self._log(request, s, endpoint, started))
        writer.on_disconnect(stream.cancel)
        return stream

    def _log(self, request: Request, stream: TokenStream, endpoint: str, started: float) -> None:
        """One JSONL line and the request metrics, from a stream's final event (exactly once)."""
        final, gen, response = stream.final, stream.request, "".join(stream.text)
        status = {"stop": "done", "length": "done", "cancelled": "cancelled"}.get(final.done_reason, "error")
        stats = final.stats
        record = {
            "timestamp": utc_timestamp(),
            "id": stream.id,
            "endpoint": endpoint,
            "status": status,
            "prompt": (gen.embed_inputs if gen.embed_inputs is not None else
                       gen.prompt if gen.messages is None else gen.messages),
            "response": response,
            "done_reason": final.done_reason,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
            "client": request.client,
        }
        if final.error:
            record["error"] = final.error
        if not self.policy.log_prompts:
            prompt_text = json.dumps(record["prompt"]) if not isinstance(record["prompt"], str) else record["prompt"]
            for key, text in (("prompt", prompt_text), ("response", response)):
                del record[key]
                record[f"{key}_chars"] = len(text)
                record[f"{key}_sha256"] = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        self.request_log.write(record)
        m = self.metrics
        m.inc("minivault_requests_total", endpoint=endpoint, status=status)
        m.observe("minivault_request_duration_seconds", time.monotonic() - started, endpoint=endpoint)
        m.inc("minivault_tokens_generated_total", stats.completion_tokens)
        m.inc("minivault_prompt_tokens_total", stats.prompt_tokens)
        if status == "cancelled":
            m.inc("minivault_cancellations_total")
