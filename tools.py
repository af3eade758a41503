"""Tool calls: the tools rendered into the prompt, the grammar a call is decoded under,
and the model's output read back as calls (pure: no model, no sockets).

The embedded model's chat template has no tool syntax, so tools are rendered the way
Ollama's templates for Qwen 2.5 and Hermes-style models do: signatures inside
<tools></tools> in the system turn, each call a JSON object inside
<tool_call></tool_call>, results in the user turn inside <tool_response>. A call is
decoded under a grammar made from the tools' parameter schemas, so its arguments
always parse and validate.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Callable

from constraints import Constraint, ConstraintInvalid, ConstraintUnavailable, json_rule
from schemas import moved_under

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
CALLS_START = CALL_OPEN[0]  # under the tools grammar, plain text never opens with it: calls always do
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
JSON_TYPES = ("string", "number", "integer", "boolean", "array", "null", "object")


class ToolsInvalid(ValueError):
    """The tools or tool choice cannot be used (the message names the field)."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict

    def signature(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


def parse_tools(value, field: str = "tools", flat: bool = False) -> list[Tool]:
    """OpenAI's and Ollama's `tools`: [{"type": "function", "function": {name, description, parameters}}].
    `flat`: they came as the Responses API writes them, {"type": "function", name, ...},
    so an error names `tools[i].name`, a field the client sent."""
    if not isinstance(value, list):
        raise ToolsInvalid(f"'{field}' must be a list")
    tools, names = [], set()
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict) or item.get("type", "function") != "function" \
                or not isinstance(item.get("function"), dict):
            raise ToolsInvalid(f"'{where}' must be {{\"type\": \"function\", \"function\": {{...}}}}")
        function = item["function"]
        key = where if flat else f"{where}.function"
        name = function.get("name")
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ToolsInvalid(f"'{key}.name' must be 1-64 letters, digits, '_', '.' or '-'")
        if name in names:
            raise ToolsInvalid(f"'{key}.name': '{name}' is given twice")
        names.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise ToolsInvalid(f"'{key}.description' must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise ToolsInvalid(f"'{key}.parameters' must be a JSON schema object")
        kind = parameters.get("type", "object")
        kinds = kind if isinstance(kind, list) else [kind]
        if "object" not in kinds and all(k in JSON_TYPES for k in kinds):  # an unknown type fails to compile
            raise ToolsInvalid(f"'{key}.parameters' must be a schema of type 'object', not {kind!r}: "
                               "a call's arguments are a JSON object")
        tools.append(Tool(name, description, parameters))
    return tools


def parse_tool_choice(value, tools: list[Tool]) -> str:
    """'auto', 'none', 'required', or the name of the one function that must be called."""
    if value is None:
        return "auto"
    if value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict):
        function = value.get("function") if value.get("type", "function") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if isinstance(name, str):
            if name not in {t.name for t in tools}:
                raise ToolsInvalid(f"'tool_choice' names '{name}', which is not among 'tools'")
            return name
    raise ToolsInvalid("'tool_choice' must be 'auto', 'none', 'required' or "
                       "{\"type\": \"function\", \"function\": {\"name\": ...}}")


def system_text(tools: list[Tool]) -> str:
    """What the system turn says about the tools (Qwen 2.5's wording, as Ollama renders it)."""
    signatures = "\n".join(json.dumps(t.signature(), ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{signatures}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{CALL_OPEN}{CALL_CLOSE} XML tags:\n"
            f"{CALL_OPEN}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n{CALL_CLOSE}")


def with_tools(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """The messages with the tools described at the end of the system turn (one is added)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{system_text(tools)}"}] + messages[1:]
    return [{"role": "system", "content": system_text(tools)}] + messages


def render_call(name: str, arguments: dict | str) -> str:
    """An earlier call as the model writes one (history the client sends back)."""
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def render_result(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def call_constraint(tools: list[Tool], choice: str, parallel: bool = False,
                    text_schema: dict | None = None, text_json: bool = False) -> Constraint:
    """The grammar of the reply: tool calls only (`required` or a named function), or
    either plain text or calls (`auto`). With `text_json` the text alternative is JSON
    (against `text_schema` when given): structured output and tools together."""
    chosen = [t for t in tools if choice in ("auto", "required") or t.name == choice]
    if choice not in ("auto", "required"):
        parallel = False  # a named function is called once
    # Each tool's parameters go under the body's $defs, their references rewritten to
    # match: placed inline, "#" and "#/$defs/..." in them would point into the call body.
    # A name needs no escaping in a JSON pointer (NAME_PATTERN has no '/' or '~').
    # Arguments are an object whatever the parameters leave open ({} allows any value):
    # clients read them as one (Ollama's a mapping, OpenAI's a JSON object in a string).
    where = {t.name: f"#/$defs/{t.name}" for t in chosen}
    bodies = [{"type": "object", "properties": {"name": {"const": t.name},
                                                "arguments": {"$ref": where[t.name], "type": "object"}},
               "required": ["name", "arguments"], "additionalProperties": False} for t in chosen]
    body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
    body["$defs"] = {t.name: moved_under(t.parameters, where[t.name]) for t in chosen}
    try:  # json_rule refuses a schema too, before llguidance sees it
        return Constraint.lark(_calls_grammar(body, choice, parallel, text_schema, text_json), "tools")
    except ConstraintInvalid as exc:
        raise ToolsInvalid(f"'tools': {_failing_tool(chosen) or exc}") from None
    except ConstraintUnavailable as exc:
        raise ToolsInvalid(f"'tools' cannot be honoured here: {exc}") from None


def _failing_tool(chosen: list[Tool]) -> str | None:
    """Which tool's parameters the grammar engine refuses, and why; None when each
    compiles alone. The whole grammar's error names only a place in it ("at 4(7)")."""
    for tool in chosen:
        try:
            Constraint.json(tool.parameters)
        except ConstraintInvalid as exc:
            return f"the parameters of '{tool.name}' are not a JSON schema this server supports: {exc}"
    return None


def _calls_grammar(body: dict, choice: str, parallel: bool, text_schema: dict | None, text_json: bool) -> str:
    """The reply's grammar in lark, a call's JSON being `body`."""
    calls = 'call ("\\n" call)*' if parallel else "call"
    lines = [f"calls: {calls}",
             f'call: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"',
             f"body: {json_rule(body)}"]
    if choice == "auto":
        if text_json:
            lines = ["start: calls | answer", f"answer: {json_rule(text_schema)}"] + lines
        else:
            # Plain text is anything not opening with '<': the first character decides.
            lines = ["start: calls | TEXT", f"TEXT: /[^{CALLS_START}][\\s\\S]*/"] + lines
    else:
        lines = ["start: calls"] + lines
    return "\n".join(lines)


def call_id() -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallReader:
    """Splits generated text into plain content and complete tool calls, as it streams.

    Under the tools grammar a reply is either text (never opening with '<') or calls,
    so the first character decides; calls are handed on whole, once closed."""

    def __init__(self, ids: Callable[[int], str] | None = None):
        self._ids = ids or (lambda n: call_id())  # a call's id from its place in the reply
        self.mode: str | None = None  # None until the first character, then "text" or "calls"
        self._pending = ""
        self._searched = 0  # where in _pending to look for the next closing tag
        self.calls: list[dict] = []  # every call read so far: {"id", "name", "arguments"}

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content to pass on now, calls completed by this text)."""
        if self.mode is None:
            if not text:
                return "", []
            self.mode = "calls" if text.startswith(CALLS_START) else "text"
        if self.mode == "text":
            return text, []
        self._pending += text
        found = []
        # A call is complete once its JSON is followed by the closing tag. Its strings may
        # hold "</tool_call>" themselves (the grammar allows any string), so the JSON is
        # read whole first; a closing tag seen earlier, inside a string, is no end.
        while (end := self._pending.find(CALL_CLOSE, self._searched)) >= 0:
            read = _read_call(self._pending)
            if read is None:  # the tag was inside a string: wait for the rest
                self._searched = end + 1
                continue
            call, used = read
            call = {"id": self._ids(len(self.calls)), **call}
            self._pending, self._searched = self._pending[used:], 0
            self.calls.append(call)
            found.append(call)
        return "", found

    def finish(self) -> str:
        """Text left over at the end (an unfinished call, cut by the token limit): as content."""
        rest, self._pending, self._searched = self._pending, "", 0
        return rest if rest.strip() else ""


def read_reply(text: str, ids: Callable[[int], str] | None = None) -> tuple[str, list[dict]]:
    """A whole reply as clients get it: (its content, its calls), as ToolCallReader
    reads it streamed (an unfinished call's text is content)."""
    reader = ToolCallReader(ids)
    content, calls = reader.feed(text)
    return content + reader.finish(), calls


def arguments_text(call: dict) -> str:
    """A call's arguments as OpenAI's clients get them: a JSON object in a string."""
    return json.dumps(call["arguments"], ensure_ascii=False)


_DECODER = json.JSONDecoder()


def _read_call(text: str) -> tuple[dict, int] | None:
    """The first call in `text` (opening tag, the call's JSON, closing tag) and the
    length of text it took, or None while it is not all there."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return None
    at = start + len(CALL_OPEN)
    while at < len(text) and text[at].isspace():
        at += 1
    try:
        value, at = _DECODER.raw_decode(text, at)
    except (ValueError, RecursionError):
        return None
    close = text.find(CALL_CLOSE, at)
    if close < 0 or text[at:close].strip():
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments")
    call = {"name": value["name"], "arguments": arguments if arguments is not None else {}}
    return call, close + len(CALL_CLOSE)
