"""Validating requests (pure: JSON bodies in, a GenerationRequest or an HTTPError naming
the field out), for every API the server speaks."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from constraints import Constraint, ConstraintInvalid, ConstraintUnavailable
from engine import SEEDS, GenerationRequest, Sampling
from httpserver import HTTPError
import tools as toolcalls

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
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HTTPError(400, f"'{name}' must be a number")
    try:
        number = float(value)
    except OverflowError:  # an integer of 309 digits or more (valid JSON) has no float
        raise HTTPError(400, f"'{name}' is out of range") from None
    if not math.isfinite(number):
        raise HTTPError(400, f"'{name}' must be a number")
    if low is not None and (value < low or (low_open and value == low)):
        raise HTTPError(400, f"'{name}' must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise HTTPError(400, f"'{name}' must be <= {high}")
    return number


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


def _of_type(name: str, value, kind: type, words: str):
    if not isinstance(value, kind):
        raise HTTPError(400, f"'{name}' must be {words}")
    return value


def boolean_field(name: str, value) -> bool:
    return _of_type(name, value, bool, "true or false")


def optional_boolean(fields: dict, name: str, default: bool, where: str | None = None) -> bool:
    """fields[name], true or false, or `default` when it is absent or null; `where`:
    what the client calls it, if not `name`."""
    value = fields.get(name)
    return default if value is None else boolean_field(where or name, value)


def string_field(name: str, value) -> str:
    return _of_type(name, value, str, "a string")


def list_field(name: str, value) -> list:
    return _of_type(name, value, list, "a list")


# The model thread matches every stop string against each token's text, about 1 us per
# stop per token here: 100k stops (a 1 MiB body) cost 57 ms a token, for every row of
# the batch. Clients send a handful (OpenAI allows 4).
MAX_STOPS = 64


def _stops(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOPS:
            raise HTTPError(400, f"'stop' holds {len(value)} strings; at most {MAX_STOPS} are taken")
        return [s for s in value if s]
    raise HTTPError(400, "'stop' must be a string or a list of strings")


MAX_TOKENS_ALIASES = ("max_tokens", "num_predict", "max_completion_tokens")  # the last given wins
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
    for name in ("repeat_penalty", "repetition_penalty"):  # the second: transformers' and vLLM's name
        if name in given:
            s.repeat_penalty = _number(name, given[name], 0.01, 10)
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
            max_tokens = _integer(name, given[name], -2 if name == "num_predict" else -1)
            if max_tokens == -2:  # Ollama's "fill the context": what -1 does here
                max_tokens = -1
            if max_tokens == 0:
                raise HTTPError(400, f"'{name}' must be a positive integer (or -1: until the context is full)")
    return s, max_tokens, _stops(given.get("stop"))


def parse_generate(body: dict, system_alone: bool = False) -> tuple[GenerationRequest, bool]:
    """MiniVault's /generate body (Ollama's /api/generate fields) -> (request, stream?).
    `system_alone`: a `system` with no prompt is answered as Ollama does, the user's turn
    left empty (Ollama's /api/generate; not for `raw`, which has no turns)."""
    alone = system_alone and body.get("system") and not body.get("raw") and body.get("prompt") in (None, "")
    if ("prompt" not in body or body["prompt"] is None) and not alone:
        raise HTTPError(400, "'prompt' is required")
    prompt = string_field("prompt", body.get("prompt") or "")
    if not prompt.strip() and not alone:
        raise HTTPError(400, "'prompt' must not be empty")
    for name in ("tools", "tool_choice"):  # a completion of a prompt reads no calls: refused, not dropped
        if body.get(name) not in (None, [], ""):
            raise HTTPError(400, f"'{name}' is not supported on a generate endpoint: send tools to /api/chat")
    sampling, max_tokens, stop = parse_options(_options_fields(body))
    system = body.get("system")
    if system is not None:
        system = string_field("system", system)
    raw = optional_boolean(body, "raw", False)
    stream = optional_boolean(body, "stream", True)
    req = GenerationRequest(prompt=prompt, system=system or None, raw=raw, max_tokens=max_tokens,
                            stop=stop, sampling=sampling,
                            constraint=parse_ollama_format(body.get("format")).constraint)
    refuse_stop_in_json(req)
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


def parse_messages(value, openai: bool = False, field: str = "messages") -> list[dict]:
    """Chat messages -> [{"role", "content"}] with text content only. Earlier tool calls
    and tool results become text the way tools.py renders them for the model. `field`:
    what the client called them (the Responses API's items, checked before, are `input`)."""
    if not isinstance(value, list) or not value:
        raise HTTPError(400, f"'{field}' must be a non-empty list")
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
            calls = [_history_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(list_field(
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
        raise HTTPError(400, f"'{field}' needs a user message with content")
    return messages


def _history_call(where: str, call) -> str:
    """An assistant's earlier tool call (OpenAI: arguments as a JSON string; Ollama: an object)."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise HTTPError(400, f"'{where}' must hold a function with a name")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        arguments = _json_arguments(f"{where}.function.arguments", arguments)
    if arguments is None:
        arguments = {}
    return toolcalls.render_call(function["name"], arguments)


def _json_arguments(where: str, text: str):
    """A tool call's arguments sent as a JSON string (OpenAI's way), parsed; empty is {}."""
    try:
        return json.loads(text) if text.strip() else {}
    except (ValueError, RecursionError):  # RecursionError: nested deeper than Python parses
        raise HTTPError(400, f"'{where}' is not valid JSON") from None


def json_constraint(field: str, schema: dict | None) -> Constraint:
    """JSON output (an object, or valid against `schema`), or a 400 naming `field`."""
    if schema is not None and not isinstance(schema, dict):
        raise HTTPError(400, f"'{field}' must be a JSON schema object")
    try:
        return Constraint.json(schema, field)
    except ConstraintInvalid as exc:
        raise HTTPError(400, f"'{field}': not a JSON schema this server supports: {exc}") from None
    except ConstraintUnavailable as exc:
        raise HTTPError(400, f"'{field}' cannot be honoured here: {exc}") from None


def refuse_stop_in_json(req: GenerationRequest, text_allowed: bool = False, why: str = "") -> None:
    """A 400 naming 'stop' when the reply can only be JSON (a format, or tool calls) and
    stop strings are given: the grammar ends the reply once the JSON is whole, so a
    stop string could only ever match inside it and cut it short, a reply that no
    longer parses but says it ended normally ('stop'). `text_allowed`: the reply may
    be plain text instead (tools left to the model), where stop strings apply to that
    text, never to a call (GenerationRequest.calls_start)."""
    if req.stop and req.constraint is not None and not text_allowed:
        raise HTTPError(400, "'stop' cannot be used with JSON output or required tool calls" + why
                             + ": the reply ends when its JSON is whole, and a stop string could only cut "
                               "the JSON short")


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
                eager: bool = False, flat_tools: bool = False) -> bool:
    """Set the request's messages and constraint from `tools` (and `tool_choice`, on
    OpenAI) and the output format. True when the reply is to be read for tool calls.

    `eager`: when the client leaves the choice to us (Ollama has no `tool_choice`) and
    the user spoke last, the reply is a call; after a tool's result the model may answer.
    Left to choose, the embedded 135M model put 0.1-2% on starting a call and answered
    in text in every try, so tools would never be called."""
    given = body.get("tools")
    parallel = optional_boolean(body, "parallel_tool_calls", False)
    try:
        tools = toolcalls.parse_tools(given, flat=flat_tools) if given not in (None, []) else []
        choice = toolcalls.parse_tool_choice(body.get("tool_choice") if choice_field else None, tools)
        last = body["messages"][-1] if isinstance(body.get("messages"), list) and body["messages"] else {}
        if eager and tools and body.get("tool_choice") is None and last.get("role") == "user":
            choice = "required"
        if not tools or choice == "none":
            if choice_field and body.get("tool_choice") not in (None, "none", "auto") and not tools:
                raise toolcalls.ToolsInvalid("'tool_choice' needs 'tools'")
            req.constraint = output.constraint
            refuse_stop_in_json(req)
            return False
        # One call per reply unless asked for more: allowed several, the embedded 135M
        # model added a call nobody asked for (Paris, then Bordeaux) in most tries.
        req.constraint = toolcalls.call_constraint(tools, choice, parallel, output.schema, output.json)
        eager_call = eager and body.get("tool_choice") is None and choice == "required"
        refuse_stop_in_json(req, text_allowed=choice == "auto" and not output.json,
                            why=" (with tools and no tool_choice, this server's --tool-calls eager policy makes "
                                "the reply to a user message a call)" if eager_call else "")
    except toolcalls.ToolsInvalid as exc:
        raise HTTPError(400, str(exc)) from None
    req.messages = toolcalls.with_tools(req.messages, tools)
    req.calls_start = toolcalls.CALLS_START  # a stop string ends plain text, never a call
    return True


def parse_chat(body: dict, eager_tools: bool = False) -> tuple[GenerationRequest, bool, bool]:
    """Ollama's /api/chat body -> (request, stream?, read tool calls?)."""
    output = parse_ollama_format(body.get("format"))
    messages = parse_messages(body.get("messages"))
    sampling, max_tokens, stop = parse_options(_options_fields(body))
    stream = optional_boolean(body, "stream", True)
    req = GenerationRequest(messages=messages, max_tokens=max_tokens, stop=stop, sampling=sampling)
    reads_calls = apply_tools(body, req, output, choice_field=False, eager=eager_tools)
    return req, stream, reads_calls


# OpenAI request fields we cannot honour: refused rather than silently ignored.
# (and modalities other than ["text"], checked on its own)
OPENAI_UNSUPPORTED = ("functions", "function_call", "logprobs", "top_logprobs", "logit_bias", "suffix",
                      "audio", "prediction", "reasoning_effort", "verbosity", "web_search_options")


# Sampling fields beyond OpenAI's that its clients send (`extra_body`, as vLLM takes them):
# honoured, or (FIXED_OPTIONS) refused unless they ask for nothing.
OPENAI_SAMPLING_EXTRAS = ("top_k", "repeat_penalty", "repetition_penalty", *FIXED_OPTIONS)
# OpenAI request fields that parse_options reads; others would let Ollama's options in.
OPENAI_OPTIONS = ("temperature", "top_p", "seed", "max_tokens", "max_completion_tokens", "stop", "presence_penalty",
                  "frequency_penalty", *OPENAI_SAMPLING_EXTRAS)


def openai_sampling_fields(body: dict, names) -> dict:
    """The fields of `names` given (not null). Ollama's `options` is refused: OpenAI's
    endpoints take sampling fields at the top level."""
    if body.get("options") is not None:
        raise HTTPError(400, "'options' is not supported here: give sampling fields at the top level")
    fields = {k: body[k] for k in names if body.get(k) is not None}
    if "repeat_penalty" in fields and "repetition_penalty" in fields:
        raise HTTPError(400, "give 'repeat_penalty' or 'repetition_penalty', not both")
    if "temperature" in fields:
        _number("temperature", fields["temperature"], 0, 2)  # OpenAI's range (Ollama's goes to 100)
    return fields


def _one_choice(body: dict, what: str) -> None:
    """OpenAI's `n` and `best_of` may only ask for the one `what` a request gets."""
    for name in ("n", "best_of"):
        if body.get(name) is not None and _integer(name, body[name], 1) != 1:
            raise HTTPError(400, f"'{name}' must be 1: one {what} per request")


def parse_openai(body: dict, chat: bool, eager_tools: bool = False) -> tuple[GenerationRequest, bool, bool, bool]:
    """OpenAI's /v1/chat/completions or /v1/completions body -> (request, stream?,
    include usage?, read tool calls?)."""
    if body.get("modalities") != ["text"]:  # ["text"]: what is given anyway
        refuse_unsupported(body, ("modalities",))
    refuse_unsupported(body, OPENAI_UNSUPPORTED, off=("none",))  # function_call, reasoning_effort 'none'
    if not chat:
        refuse_unsupported(body, ("tools", "tool_choice"))
    output = parse_response_format(body.get("response_format"))
    _one_choice(body, "completion")
    if body.get("echo"):
        raise HTTPError(400, "'echo' is not supported")
    fields = openai_sampling_fields(body, OPENAI_OPTIONS)
    sampling, max_tokens, stop = parse_options(fields)
    stream = optional_boolean(body, "stream", False)
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise HTTPError(400, "'stream_options' must be an object")
    include_usage = optional_boolean(stream_options, "include_usage", False, "stream_options.include_usage")
    if chat:
        req = GenerationRequest(messages=parse_messages(body.get("messages"), openai=True))
    else:
        prompts = completion_prompts(body.get("prompt"))
        if len(prompts) > 1 and stream:
            raise HTTPError(400, "'prompt' as a list of several prompts cannot be streamed: send one per "
                                 "request, or 'stream': false")
        # Completions continue the text as given. Several prompts: this is the first's
        # request, the others' are copies of it with their own prompt (Api.openai_completions).
        req = GenerationRequest(prompt=prompts[0], raw=True)
    req.max_tokens, req.stop, req.sampling = max_tokens, stop, sampling
    if chat:
        reads_calls = apply_tools(body, req, output, choice_field=True, eager=eager_tools)
    else:
        req.constraint, reads_calls = output.constraint, False
        refuse_stop_in_json(req)
    return req, stream, include_usage, reads_calls


# A count of 0 that asks for nothing; elsewhere 0 asks (max_tool_calls 0 forbids calls,
# /v1/completions' logprobs 0 still wants the chosen tokens' log probabilities).
ZERO_IS_OFF = frozenset({"top_logprobs", "width", "height", "steps"})


def asks_for(name: str, value, off=()) -> bool:
    """Whether a field's value asks for something: not absent, null, false, empty, or
    one of `off`. Compared by identity for False, as 0 == False in Python."""
    if value is None or value is False or value in off:
        return False
    if isinstance(value, (str, list, dict)):
        return bool(value)
    return not (value == 0 and name in ZERO_IS_OFF)


def completion_prompts(prompt) -> list[str]:
    """/v1/completions' `prompt`: a string, or a list of them (OpenAI's batch of prompts,
    one choice each, as LangChain's `OpenAI.batch` sends them)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) or isinstance(p, list) for p in prompt):
        raise HTTPError(400, "'prompt' as token ids is not supported: send the text")
    several = isinstance(prompt, list) and len(prompt) > 0
    prompts = prompt if several else [prompt]
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            name = f"'prompt[{i}]'" if several else "'prompt'"
            raise HTTPError(400, f"{name} must be a non-empty string (or a list of them)")
    return prompts


def refuse_unsupported(body: dict, names, off=(), hints: dict | None = None, where: str = "") -> None:
    """A 400 naming the first of these fields that asks for something (see asks_for),
    with its hint when there is one."""
    for name in names:
        if asks_for(name, body.get(name), off):
            hint = (hints or {}).get(name)
            raise HTTPError(400, f"'{name}' is not supported{where}" + (f": {hint}" if hint else ""))


# Ollama fields that would change the answer and are not implemented: refused rather
# than dropped. `think` asks a reasoning model for its thoughts, `template` and
# `context` replace the prompt's making, `images` is input for a vision model (on
# /api/chat each message's, refused by parse_messages), the rest are fill-in-the-middle,
# token probabilities and image generation.
OLLAMA_CHAT_UNSUPPORTED = ("think", "logprobs", "top_logprobs")
OLLAMA_GENERATE_UNSUPPORTED = OLLAMA_CHAT_UNSUPPORTED + ("images", "suffix", "template", "context", "width",
                                                         "height", "steps")


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
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ("float", "base64"):
        raise HTTPError(400, "'encoding_format' must be 'float' or 'base64'")
    return value, encoding


def _is_token(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Responses API fields we cannot honour (with a value that asks for something).
RESPONSES_UNSUPPORTED = ("previous_response_id", "reasoning", "background", "top_logprobs",
                         "conversation", "prompt", "include", "max_tool_calls")
# Chat Completions fields a Responses request may carry by mistake: each is refused, naming
# the field, rather than dropped (a dropped max_tokens let the reply run to the default
# length; a dropped response_format gave free text where JSON was asked for).
RESPONSES_CHAT_FIELDS = {"max_tokens": "use 'max_output_tokens'", "max_completion_tokens": "use 'max_output_tokens'",
                         "response_format": "use 'text.format'", "messages": "use 'input'",
                         "logprobs": "token probabilities are not available", "echo": None, "suffix": None,
                         "logit_bias": None, "functions": "use 'tools'", "function_call": "use 'tool_choice'"}
# Sampling fields beyond the Responses API's that the engine honours, as on chat.
RESPONSES_OPTIONS = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
                     *OPENAI_SAMPLING_EXTRAS)
RESPONSES_TEXT_PARTS = ("input_text", "output_text", "text")
RESPONSES_ROLES = ("user", "assistant", "system", "developer")


def parse_responses(body: dict, eager_tools: bool = False) -> tuple[GenerationRequest, bool, bool]:
    """OpenAI's /v1/responses body -> (request, stream?, read tool calls?)."""
    refuse_unsupported(body, RESPONSES_UNSUPPORTED)
    _one_choice(body, "response")
    refuse_unsupported(body, RESPONSES_CHAT_FIELDS, hints=RESPONSES_CHAT_FIELDS, where=" by /v1/responses")
    if body.get("truncation") not in (None, "disabled"):  # "auto" would drop earlier items to fit
        raise HTTPError(400, "'truncation' must be 'disabled': an input longer than the context is refused, "
                             "not cut")
    text_format = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if body.get("text") is not None and not isinstance(body.get("text"), dict):
        raise HTTPError(400, "'text' must be an object")
    for name, value in (body.get("text") or {}).items():
        if name != "format" and value is not None:  # verbosity, for one: this model cannot be asked for it
            raise HTTPError(400, f"'text.{name}' is not supported")
    output = parse_response_format(text_format, field="text.format")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise HTTPError(400, "'metadata' must be an object of strings")  # echoed in the reply as given
    value = body.get("input")
    if isinstance(value, str):
        if not value.strip():
            raise HTTPError(400, "'input' must not be empty")
        items = [{"role": "user", "content": value}]
    elif isinstance(value, list) and value:
        items = _responses_items(value)
    else:
        raise HTTPError(400, "'input' must be a string or a non-empty list of input items")
    instructions = body.get("instructions")
    if instructions is not None:
        items = [{"role": "system", "content": string_field("instructions", instructions)}] + items
    fields = openai_sampling_fields(body, RESPONSES_OPTIONS)
    sampling, _, stop = parse_options(fields)
    max_tokens = None
    if body.get("max_output_tokens") is not None:
        max_tokens = _integer("max_output_tokens", body["max_output_tokens"], 1)
    stream = optional_boolean(body, "stream", False)
    req = GenerationRequest(messages=parse_messages(items, openai=True, field="input"), max_tokens=max_tokens,
                            stop=stop, sampling=sampling)
    # Responses' tools are chat's, flattened: {"type": "function", "name", "parameters"}.
    chat = {"messages": items, "parallel_tool_calls": body.get("parallel_tool_calls")}
    if body.get("tools") not in (None, []):
        chat["tools"] = [_responses_tool(i, t) for i, t in enumerate(list_field("tools", body["tools"]))]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        choice = {"type": "function", "function": {"name": choice["name"]}}
    elif choice not in (None, "auto", "none", "required"):  # in Responses' words, not chat's
        raise HTTPError(400, "'tool_choice' must be 'auto', 'none', 'required' or "
                             "{\"type\": \"function\", \"name\": ...}")
    chat["tool_choice"] = choice
    reads_calls = apply_tools(chat, req, output, choice_field=True, eager=eager_tools, flat_tools=True)
    return req, stream, reads_calls


def _responses_tool(i: int, tool) -> dict:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise HTTPError(400, f"'tools[{i}].type': only function tools are supported, not {kind!r}")
    return {"type": "function", "function": {k: tool.get(k) for k in ("name", "description", "parameters")}}


def _responses_items(value: list) -> list[dict]:
    """Responses input items -> chat messages: messages, the model's earlier function
    calls (one assistant turn for consecutive calls) and their outputs."""
    messages: list[dict] = []
    for i, item in enumerate(value):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments", ""), str):
                raise HTTPError(400, f"'input[{i}]' must have a 'name' and 'arguments' (a JSON string)")
            arguments = _json_arguments(f"input[{i}].arguments", item.get("arguments", ""))
            call = {"id": item.get("call_id"), "function": {"name": item["name"], "arguments": arguments}}
            last = messages[-1] if messages else {}
            if last.get("role") == "assistant" and last.get("tool_calls") and not last.get("content"):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(output, str):
                raise HTTPError(400, f"'input[{i}].output' must be a string")
            messages.append({"role": "tool", "content": output})
        else:
            messages.append(_responses_message(i, item))
    return messages


def _responses_message(i: int, item) -> dict:
    """A Responses input item -> a chat message; only text messages are understood."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        raise HTTPError(400, f"'input[{i}]' must be a message, function_call or function_call_output item "
                             f"(other item types are not supported)")
    if item.get("role") not in RESPONSES_ROLES:
        raise HTTPError(400, f"'input[{i}].role' must be one of {', '.join(RESPONSES_ROLES)}")
    content = item.get("content")
    if not isinstance(content, (str, list)):
        raise HTTPError(400, f"'input[{i}].content' must be a string or a list of text parts")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in RESPONSES_TEXT_PARTS \
                    or not isinstance(part.get("text"), str):
                raise HTTPError(400, f"'input[{i}].content' may only hold text parts")
            texts.append(part["text"])
        content = "".join(texts)
    return {"role": item.get("role"), "content": content}
