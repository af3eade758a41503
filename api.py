"""The endpoints: validating requests, running them through the engine, encoding replies."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from engine import Engine, Final, GenerationRequest, QueueFull, Sampling, TokenStream
from httpserver import ClientGone, HTTPError, Request, ResponseWriter, Router, json_bytes
from requestlog import RequestLog, utc_timestamp

log = logging.getLogger("minivault.api")

NDJSON = "application/x-ndjson"
# Tell proxies (nginx) and caches not to hold streamed tokens back.
STREAM_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
CANCEL_GRACE_S = 30.0  # the engine answers a cancel within a step; this only guards a bug


# ---------------------------------------------------------------------------
# Validation (pure: dicts in, GenerationRequest or HTTPError out)


def parse_json_body(body: bytes) -> dict:
    if not body.strip():
        raise HTTPError(400, "request body is empty; expected a JSON object")
    try:
        value = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise HTTPError(400, "request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise HTTPError(400, f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(value, dict):
        raise HTTPError(400, "expected a JSON object")
    return value


def _number(name: str, value, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HTTPError(400, f"'{name}' must be a number")
    if low is not None and (value < low or (low_open and value == low)):
        raise HTTPError(400, f"'{name}' must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        raise HTTPError(400, f"'{name}' must be <= {high}")
    return float(value)


def _integer(name: str, value, low: int | None = None) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, f"'{name}' must be an integer")
    if low is not None and value < low:
        raise HTTPError(400, f"'{name}' must be >= {low}")
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


def parse_options(fields: dict) -> tuple[Sampling, int | None, list[str]]:
    """Sampling options, `max_tokens` and `stop` from a flat dict of fields."""
    s = Sampling()
    if fields.get("temperature") is not None:
        s.temperature = _number("temperature", fields["temperature"], 0, 100)
    if fields.get("top_p") is not None:
        s.top_p = _number("top_p", fields["top_p"], 0, 1, low_open=True)
    if fields.get("top_k") is not None:
        s.top_k = _integer("top_k", fields["top_k"], 0)
    if fields.get("repeat_penalty") is not None:
        s.repeat_penalty = _number("repeat_penalty", fields["repeat_penalty"], 0, 10, low_open=True)
    if fields.get("seed") is not None:
        s.seed = _integer("seed", fields["seed"])
    max_tokens = None
    for name in ("max_tokens", "num_predict"):
        if fields.get(name) is not None:
            max_tokens = _integer(name, fields[name], -1)
            if max_tokens == 0:
                raise HTTPError(400, f"'{name}' must be a positive integer (or -1: until the context is full)")
    return s, max_tokens, _stops(fields.get("stop"))


def parse_generate(body: dict) -> tuple[GenerationRequest, bool]:
    """MiniVault's /generate body (Ollama's /api/generate fields) -> (request, stream?)."""
    if "prompt" not in body or body["prompt"] is None:
        raise HTTPError(400, "'prompt' is required")
    prompt = _string("prompt", body["prompt"])
    if not prompt.strip():
        raise HTTPError(400, "'prompt' must not be empty")
    options = body.get("options")
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise HTTPError(400, "'options' must be an object")
    # Top-level fields win over Ollama's `options` object; null means "not given".
    fields = {**options, **{k: v for k, v in body.items() if k != "options" and v is not None}}
    sampling, max_tokens, stop = parse_options(fields)
    system = body.get("system")
    if system is not None:
        system = _string("system", system)
    raw = _boolean("raw", body["raw"]) if body.get("raw") is not None else False
    stream = _boolean("stream", body["stream"]) if body.get("stream") is not None else True
    req = GenerationRequest(prompt=prompt, system=system or None, raw=raw, max_tokens=max_tokens,
                            stop=stop, sampling=sampling)
    return req, stream


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
# Handlers


class Api:
    def __init__(self, engine: Engine, request_log: RequestLog):
        self.engine = engine
        self.request_log = request_log

    def routes(self, router: Router) -> None:
        router.add("POST", "/generate", self.generate)
        router.add("GET", "/health", self.health)

    async def health(self, request: Request, writer: ResponseWriter) -> None:
        e = self.engine
        if e.load_error:
            await writer.send_json(503, {"status": "error", "error": e.load_error})
        elif not e.ready:
            await writer.send_json(503, {"status": "loading", "model": e.model_name, "queued": e.queued})
        else:
            await writer.send_json(200, {"status": "ok", "model": e.model_name,
                                         "queued": e.queued, "active": e.active_count})

    async def generate(self, request: Request, writer: ResponseWriter) -> None:
        gen, stream = parse_generate(parse_json_body(request.body))
        await self._run(request, writer, gen, stream, "/generate")

    async def _run(self, request: Request, writer: ResponseWriter, gen: GenerationRequest,
                   stream_mode: bool, endpoint: str) -> None:
        """Submit, then stream (or collect) the text; log the outcome whatever happens."""
        try:
            stream = self.engine.submit(gen)
        except QueueFull as exc:
            raise HTTPError(503, f"server busy: {exc}; retry later", [("Retry-After", "2")]) from None
        writer.on_disconnect(stream.cancel)
        pieces: list[str] = []
        started = time.monotonic()
        try:
            item = await stream.next()
            if isinstance(item, Final) and item.error:
                status = 400 if item.client_error else 500
                await writer.send_json(status, {"error": item.error})
                return
            if stream_mode:
                await writer.start_stream(200, NDJSON, STREAM_HEADERS + [("X-Request-Id", str(stream.id))])
                try:
                    while not isinstance(item, Final):
                        pieces.append(item)
                        await writer.write(ndjson_line({"response": item}))
                        item = await stream.next()
                    if item.error:
                        await writer.write(ndjson_line({"error": item.error}))
                    else:
                        await writer.write(ndjson_line({"response": "", **final_fields(item)}))
                except ClientGone:
                    raise
                except Exception:
                    # The status line is gone already: end the stream with an error line.
                    log.exception("stream %s failed", stream.id)
                    await writer.write(ndjson_line({"error": "internal server error"}))
                await writer.end()
            else:
                while not isinstance(item, Final):
                    pieces.append(item)
                    item = await stream.next()
                if item.error:
                    await writer.send_json(500, {"error": item.error})
                else:
                    await writer.send_json(200, {"response": "".join(pieces), **final_fields(item)},
                                           [("X-Request-Id", str(stream.id))])
        finally:
            await self._log(request, stream, gen, endpoint, "".join(pieces), started)

    async def _log(self, request: Request, stream: TokenStream, gen: GenerationRequest,
                   endpoint: str, response: str, started: float) -> None:
        final = stream.final
        if final is None:
            stream.cancel()  # the handler is ending early: the client left or we are stopping
            try:
                final = await asyncio.wait_for(stream.wait_final(), CANCEL_GRACE_S)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                final = None
        if final is None:
            status, stats = "cancelled", None
        else:
            status = {"stop": "done", "length": "done", "cancelled": "cancelled"}.get(final.done_reason, "error")
            stats = final.stats
        record = {
            "timestamp": utc_timestamp(),
            "id": stream.id,
            "endpoint": endpoint,
            "status": status,
            "prompt": gen.prompt if gen.messages is None else gen.messages,
            "response": response,
            "done_reason": final.done_reason if final else "cancelled",
            "prompt_tokens": stats.prompt_tokens if stats else 0,
            "completion_tokens": stats.completion_tokens if stats else 0,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
            "client": request.client,
        }
        if final is not None and final.error:
            record["error"] = final.error
        self.request_log.write(record)
