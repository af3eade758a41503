"""Reply shapes: how each API encodes the same generation (pure: text and final events
in, bytes or JSON objects out)."""

from __future__ import annotations

import base64
import re
import secrets
import struct
import time
from typing import Callable

from engine import Final
from httpserver import json_bytes
from requestlog import utc_timestamp
import tools as toolcalls

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
# In the ids replies carry (chatcmpl-, cmpl-, resp_, msg_), before the log's request id:
# request ids start at 1 again in every process, and clients key on these ids (LangChain
# makes a Responses id the AIMessage's id, and LangGraph replaces a message whose id it has
# seen), so two replicas, or one restarted, must never hand out the same id.
PROCESS_TAG = secrets.token_hex(6)


def reply_call_id(request_id: int, n: int) -> str:
    """A tool call's id: unique across processes and requests, as the reply ids, and the
    same wherever the reply is read (the client's reply, the log line), so a log line
    names the call that a client's tool result answers (its tool_call_id)."""
    return f"call_{PROCESS_TAG}-{request_id}-{n}"


def ndjson_line(obj: dict) -> bytes:
    return json_bytes(obj) + b"\n"


class PieceTemplate:
    """A chunk's bytes encoded once with its varying values (strings, or ints) left as
    slots; each token then encodes only those values. Beside a GPU the event loop
    writes one chunk per stream per decode step: building and encoding a whole OpenAI
    completion chunk took 7.2 us here, through the template 1.4. `render(*values)` must
    depend on nothing else that changes; the bytes are exactly render's."""

    _MARK = "\x00minivault-slot-{}\x00"  # JSON escapes the NULs: no text can look like it

    def __init__(self, render: Callable[..., bytes], slots: int = 1):
        self._render = render
        marks = [json_bytes(self._MARK.format(i)) for i in range(slots)]
        rest = render(*(self._MARK.format(i) for i in range(slots)))
        parts: list[bytes] | None = []
        for mark in marks:
            if rest.count(mark) != 1:  # out of order, or a fixed field holds it: render each time
                parts = None
                break
            before, _, rest = rest.partition(mark)
            parts.append(before)
        self._parts = None if parts is None else parts + [rest]

    def __call__(self, *values: str | int) -> bytes:
        parts = self._parts
        if parts is None:
            return self._render(*values)
        if len(values) == 1:
            return parts[0] + _slot_bytes(values[0]) + parts[1]
        out = [parts[0]]
        for value, part in zip(values, parts[1:]):
            out += (_slot_bytes(value), part)
        return b"".join(out)


def _slot_bytes(value: str | int) -> bytes:
    # an int's JSON is its digits: 0.08 us against json.dumps' 1.8 here
    return b"%d" % value if type(value) is int else json_bytes(value)


def final_fields(final: Final) -> dict:
    """Ollama's statistics for the last object of a reply (durations in nanoseconds)."""
    s = final.stats
    return {"done": True, "done_reason": final.done_reason,
            "prompt_eval_count": s.prompt_tokens, "eval_count": s.completion_tokens,
            "total_duration": s.total_ns, "load_duration": s.load_ns,
            "prompt_eval_duration": s.prompt_eval_ns, "eval_duration": s.eval_ns}


class Shape:
    """MiniVault's own /generate: NDJSON {"response"} lines, Ollama statistics last."""

    content_type = NDJSON
    request_id = 0  # the engine's id, set once the request is queued

    def __init__(self, model: str):
        self.model = model
        self._template: PieceTemplate | None = None

    def _templated(self, render: Callable[..., bytes], *values: str | int) -> bytes:
        """render(*values), through a template of it made at the first call (a shape's
        one streamed text chunk)."""
        if self._template is None:
            self._template = PieceTemplate(render, len(values))
        return self._template(*values)

    def piece(self, text: str) -> bytes:
        return self._templated(lambda t: ndjson_line({"response": t}), text)

    def end(self, final: Final) -> bytes:
        return ndjson_line(self.whole("", final))

    def error_line(self, message: str) -> bytes:
        return ndjson_line({"error": message})

    def whole(self, text: str, final: Final) -> dict:
        return {"response": text, **final_fields(final)}

    def error(self, message: str, status: int) -> dict:
        return {"error": message}

    sends_call_ids = False  # its replies give each tool call an id (OpenAI's do, Ollama's not)

    def call_id(self, n: int) -> str:
        """The id of this reply's call number `n`."""
        return reply_call_id(self.request_id, n)

    def logged_reason(self, final: Final, made_calls: bool) -> str:
        """The reason this shape gives the client, in the log's words (Ollama's
        done_reason, which OpenAI's finish_reason matches but for 'tool_calls')."""
        return final.done_reason


class OllamaGenerate(Shape):
    def content(self, text: str) -> dict:
        return {"response": text}

    def piece(self, text: str) -> bytes:
        return self._templated(lambda at, t: ndjson_line({"model": self.model, "created_at": at, **self.content(t),
                                                          "done": False}), utc_timestamp("auto"), text)

    def whole(self, text: str, final: Final) -> dict:
        return {"model": self.model, "created_at": utc_timestamp("auto"), **self.content(text),
                **final_fields(final)}


class OllamaChat(OllamaGenerate):
    def __init__(self, model: str, reads_calls: bool = False):
        super().__init__(model)
        self.calls = toolcalls.ToolCallReader(self.call_id) if reads_calls else None

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


# A refusal names its field first, quoted: "'temperature' must be <= 2".
_FIELD_FIRST = re.compile(r"'([A-Za-z_][\w.\[\]]*)'")


def openai_error(message: str, status: int) -> dict:
    """OpenAI's error object. `param` is the field at fault, as OpenAI's clients read it
    (`BadRequestError.param`); `code` as OpenAI names the case, where it has a name."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {401: "invalid_api_key", 503: "server_busy", 429: "rate_limit_exceeded"}.get(status)
    param = None
    if status == 404 and message.startswith("model "):  # Api.check_model's; an unknown path has no code
        code, param = "model_not_found", "model"
    elif status == 400 and (field := _FIELD_FIRST.match(message)):
        param = field.group(1)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


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
        return f"{self.id_prefix}{PROCESS_TAG}-{self.request_id}"

    def _event(self, obj) -> bytes:
        return b"data: " + json_bytes(obj) + b"\n\n"

    def _chunk(self, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": self.object_name, "created": self.created, "model": self.model,
                "choices": [choice], **extra}

    def _choice(self, text: str, finish: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    def piece(self, text: str) -> bytes:
        return self._text_chunk(text)

    def _text_chunk(self, text: str) -> bytes:
        return self._templated(lambda t: self._event(self._chunk(self._choice(t, None))), text)

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

    def whole_of_several(self, texts: list[str], finals: list[Final]) -> dict:
        """A batch of prompts: one choice each, in prompt order; the usage is their sum."""
        choices = [{**self._choice(text, self._finish(final)), "index": i}
                   for i, (text, final) in enumerate(zip(texts, finals))]
        each = [usage(final) for final in finals]
        return {**self._chunk({}), "choices": choices, "usage": {k: sum(u[k] for u in each) for k in each[0]}}

    def error(self, message: str, status: int) -> dict:
        return openai_error(message, status)


class OpenAIChat(OpenAICompletion):
    object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl-"
    sends_call_ids = True

    def __init__(self, model: str, include_usage: bool = False, reads_calls: bool = False):
        super().__init__(model, include_usage)
        self._first = True
        self.calls = toolcalls.ToolCallReader(self.call_id) if reads_calls else None

    def _finish(self, final: Final) -> str:
        if self.calls is not None and self.calls.calls and final.done_reason == "stop":
            return "tool_calls"
        return finish_reason(final)

    def logged_reason(self, final: Final, made_calls: bool) -> str:
        return "tool_calls" if made_calls and final.done_reason == "stop" else final.done_reason

    def _text_chunk(self, text: str) -> bytes:
        if self._first:  # the first delta names the role; the template is the others'
            return self._event(self._chunk(self._choice(text, None)))
        return super()._text_chunk(text)

    def piece(self, text: str) -> bytes:
        if self.calls is None:
            return self._text_chunk(text)
        content, calls = self.calls.feed(text)
        out = self._text_chunk(content) if content else b""
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
            "function": {"name": call["name"], "arguments": toolcalls.arguments_text(call)}}


class OpenAIResponse(Shape):
    """OpenAI's /v1/responses: a `response` object, or its documented event stream
    (created, in_progress, output item and content part added, text deltas, done
    events, completed). With tools, each call the model makes is a `function_call`
    output item, streamed as added, arguments delta and done, item done."""

    content_type = SSE
    sends_call_ids = True

    def __init__(self, model: str, request_fields: dict, reads_calls: bool = False):
        super().__init__(model)
        self.created = int(time.time())
        self.fields = request_fields  # echoed in the response object, as OpenAI does
        self.calls = toolcalls.ToolCallReader(self.call_id) if reads_calls else None
        self._sequence = 0
        self._text: list[str] = []
        self._started = False
        self._opened = False  # the message item (text) is open

    @property
    def id(self) -> str:
        return f"resp_{PROCESS_TAG}-{self.request_id}"

    @property
    def item_id(self) -> str:
        return f"msg_{PROCESS_TAG}-{self.request_id}"

    def _event(self, kind: str, **fields) -> bytes:
        return self._numbered(kind, self._next_number(), **fields)

    def _next_number(self) -> int:
        self._sequence += 1
        return self._sequence - 1

    @staticmethod
    def _numbered(kind: str, sequence: int, **fields) -> bytes:
        body = {"type": kind, "sequence_number": sequence, **fields}
        return b"event: " + kind.encode() + b"\ndata: " + json_bytes(body) + b"\n\n"

    def _delta(self, sequence: int, text: str) -> bytes:
        return self._numbered("response.output_text.delta", sequence, item_id=self.item_id,
                              output_index=self._text_index, content_index=0, delta=text, logprobs=[])

    def _part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _item(self, status: str, parts: list) -> dict:
        return {"type": "message", "id": self.item_id, "status": status, "role": "assistant", "content": parts}

    @staticmethod
    def _call_item(call: dict, status: str = "completed") -> dict:
        return {"type": "function_call", "id": f"fc_{call['id']}", "call_id": call["id"], "name": call["name"],
                "arguments": toolcalls.arguments_text(call), "status": status}

    @property
    def _made_calls(self) -> list[dict]:
        return self.calls.calls if self.calls is not None else []

    @property
    def _text_index(self) -> int:
        return len(self._made_calls)  # the message item comes after any calls

    def _output(self, status: str) -> list[dict]:
        items = [self._call_item(c) for c in self._made_calls]
        if self._text or not items:
            items.append(self._item(status, [self._part("".join(self._text))]))
        return items

    def _response(self, status: str, final: Final | None = None, error: dict | None = None) -> dict:
        incomplete = final is not None and final.done_reason == "length"
        body = {"id": self.id, "object": "response", "created_at": self.created,
                "status": "incomplete" if incomplete else status, "error": error,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "model": self.model, "output": [], "parallel_tool_calls": True, "tool_choice": "auto",
                "tools": [], "text": {"format": {"type": "text"}}, "truncation": "disabled", "metadata": {},
                "usage": None, **self.fields}
        if final is not None:
            body["output"] = self._output("incomplete" if incomplete else "completed")
            s = final.stats
            body["usage"] = {"input_tokens": s.prompt_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                             "output_tokens": s.completion_tokens,
                             "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": s.prompt_tokens + s.completion_tokens}
        return body

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return (self._event("response.created", response=self._response("in_progress"))
                + self._event("response.in_progress", response=self._response("in_progress")))

    def _open(self) -> bytes:
        if self._opened:
            return self._start()
        self._opened = True
        where = {"item_id": self.item_id, "output_index": self._text_index, "content_index": 0}
        return (self._start()
                + self._event("response.output_item.added", output_index=self._text_index,
                              item=self._item("in_progress", []))
                + self._event("response.content_part.added", **where, part=self._part("")))

    def _text_piece(self, text: str) -> bytes:
        self._text.append(text)
        opened = self._open()  # (its events are numbered before the delta)
        number = self._next_number()
        if self.calls is not None:  # a call can move the message item's output_index
            return opened + self._delta(number, text)
        # 4.3 us a delta encoded whole here, 2.2 through the template
        return opened + self._templated(self._delta, number, text)

    def _call_events(self, call: dict, index: int) -> bytes:
        done = self._call_item(call)
        return (self._start()
                + self._event("response.output_item.added", output_index=index,
                              item={**done, "arguments": "", "status": "in_progress"})
                + self._event("response.function_call_arguments.delta", item_id=done["id"], output_index=index,
                              delta=done["arguments"])
                + self._event("response.function_call_arguments.done", item_id=done["id"], output_index=index,
                              arguments=done["arguments"])
                + self._event("response.output_item.done", output_index=index, item=done))

    def piece(self, text: str) -> bytes:
        if self.calls is None:
            return self._text_piece(text)
        content, calls = self.calls.feed(text)
        out = self._text_piece(content) if content else b""
        for call in calls:
            out += self._call_events(call, self._made_calls.index(call))
        return out

    def end(self, final: Final) -> bytes:
        rest = self.calls.finish() if self.calls is not None else ""
        out = self._text_piece(rest) if rest else b""
        done = self._response("completed", final)
        if self._text or not self._made_calls:
            text = "".join(self._text)
            where = {"item_id": self.item_id, "output_index": self._text_index, "content_index": 0}
            out += (self._open() + self._event("response.output_text.done", **where, text=text, logprobs=[])
                    + self._event("response.content_part.done", **where, part=self._part(text))
                    + self._event("response.output_item.done", output_index=self._text_index,
                                  item=done["output"][-1]))
        return out + self._start() + self._event(
            "response.completed" if done["status"] == "completed" else "response.incomplete", response=done)

    def error_line(self, message: str) -> bytes:
        return self._start() + self._event("response.failed", response=self._response(
            "failed", error={"code": "server_error", "message": message}))

    def whole(self, text: str, final: Final) -> dict:
        if self.calls is not None and text:
            text, _ = self.calls.feed(text)
            text += self.calls.finish()
        self._text = [text] if text else []
        return self._response("completed", final)

    def error(self, message: str, status: int) -> dict:
        return openai_error(message, status)


def finish_reason(final: Final) -> str:
    return "length" if final.done_reason == "length" else "stop"


def usage(final: Final) -> dict:
    s = final.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens}


def base64_floats(vector: list[float]) -> str:
    """OpenAI's base64 encoding: the little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
