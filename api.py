"""The endpoints: who may call what, and each handler: validate (validation.py), run
through the engine, encode the reply (replies.py)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from urllib.parse import unquote

import constraints
from engine import Engine, Final, GenerationRequest, QueueFull, RequestInvalid, Sampling, ShuttingDown, TokenStream
from modelsource import EMBEDDED_NAME
from httpserver import ClientGone, HTTPError, Request, ResponseWriter, Router
from metrics import Metrics
from ratelimit import RateLimiter
from replies import (NDJSON, OllamaChat, OllamaGenerate, OpenAIChat, OpenAICompletion, OpenAIResponse, Shape,
                     base64_floats, ndjson_line, openai_error, reply_call_id)
from requestlog import RequestLog, utc_timestamp
from staticfiles import StaticFiles
import tools as toolcalls
from validation import (OLLAMA_CHAT_UNSUPPORTED, OLLAMA_GENERATE_UNSUPPORTED, completion_prompts, optional_boolean,
                        parse_chat, parse_generate, parse_json_body, parse_openai, parse_openai_embeddings,
                        parse_responses, refuse_unsupported, string_field)

log = logging.getLogger("minivault.api")

VERSION = "0.1.0"
WEB_ROOT = Path(__file__).resolve().parent / "web"
# Tell proxies (nginx) and caches not to hold streamed tokens back.
STREAM_HEADERS = [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
# The sampling defaults /api/show lists, as Ollama lists a Modelfile's PARAMETERs.
SHOWN_PARAMETERS = ("temperature", "top_p", "top_k", "repeat_penalty")
# OpenAI's paths without their /v1 (a client's base_url missing it): answered in its shape.
OPENAI_PATHS = ("/chat/completions", "/completions", "/embeddings", "/models", "/responses")


# ---------------------------------------------------------------------------
# Who may call what (Host, Origin, key, rate), then the handlers


DEFAULT_CORS_ORIGINS = ("http://localhost:*", "http://127.0.0.1:*", "http://[::1]:*")


CONSTRAINING_FIELDS = ("format", "response_format", "tools", "text")  # text: the Responses API's text.format


async def off_loop_if_constrained(parse, body: dict, *args, **kwargs):
    """`parse(body, ...)`, on a worker thread when the body may ask for constrained output:
    checking its grammar (llguidance's validate_grammar, which releases the GIL) takes
    45-80 ms for a 20,000-value enum (2-core CPU), time every stream this loop writes
    would stop for. Other bodies are parsed here (no thread hop)."""
    if not any(name in body for name in CONSTRAINING_FIELDS):
        return parse(body, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(parse, body, *args, **kwargs))


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


def gguf_tag(path: str) -> str | None:
    """The quantisation a GGUF file's name gives, as Ollama lists it: 'model.Q8_0.gguf' ->
    'Q8_0'; None when the name has no tag ('model.gguf')."""
    parts = os.path.basename(path).rsplit(".", 2)
    return parts[1].upper() if len(parts) == 3 and parts[0] and parts[1] else None


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
        # Ollama's model management: a clear refusal rather than a 404 that reads as
        # "model not found" (ollama.delete, copy, create, push, create_blob).
        for method, path, verb in (("POST", "/api/create", "create"), ("POST", "/api/copy", "copy"),
                                   ("DELETE", "/api/delete", "delete"), ("POST", "/api/push", "push")):
            add(router, method, path, self._cannot(verb))
        for method in ("POST", "HEAD"):
            add(router, method, "/api/blobs/", self._cannot("upload blobs for"), prefix=True)
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
        router.error_shape = self._error_body  # any HTTPError raised, the server's own 404s too

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
        if status == 404 and path.startswith(OPENAI_PATHS):  # an openai client's base_url without /v1
            return openai_error(f"{message}; the OpenAI API is under /v1: base_url='http://HOST:PORT/v1'", 404)
        if status == 404 and path.startswith("/v1/api/"):  # an ollama client's host with /v1: its shape
            return {"error": f"{message}; the Ollama API is at the root: host='http://HOST:PORT'"}
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
        m.counter_read("minivault_log_write_errors_total", "Request log lines that could not be written.",
                       lambda: self.request_log.errors)
        m.counter_read("minivault_model_thread_seconds_total",
                       "The model thread's time by stage of its loop (decode: the runner's step, on a GPU "
                       "only its launch; sampling: choosing tokens, on a GPU waiting for the step too; "
                       "streaming: detokenising and stop strings; handoff: to the event loop).",
                       lambda: e.clock.totals(), label="stage")
        m.counter_read("minivault_decode_steps_total", "Decode steps the model thread ran.", lambda: e.decode_steps)
        m.counter_read("minivault_decoded_rows_total", "Rows of all decode steps, summed (over the steps: the "
                       "mean batch).", lambda: e.decoded_rows)

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
        quant = (gguf_tag(e.source.location) if fmt == "gguf" else None) or e.dtype.upper()
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
        gen, stream = await off_loop_if_constrained(parse_generate, body)
        await self._run(request, writer, gen, stream, "/generate", Shape(model))

    # ---- Ollama ----

    async def ollama_generate(self, request: Request, writer: ResponseWriter) -> None:
        body = parse_json_body(request.body)
        model = self.check_model(body, required=True)
        refuse_unsupported(body, OLLAMA_GENERATE_UNSUPPORTED)
        if body.get("prompt") in (None, "") and not body.get("system"):
            await self._loaded_reply(writer, body, {"response": ""})
            return
        gen, stream = await off_loop_if_constrained(parse_generate, body, system_alone=True)
        await self._run(request, writer, gen, stream, "/api/generate", OllamaGenerate(model))

    async def ollama_chat(self, request: Request, writer: ResponseWriter) -> None:
        body = parse_json_body(request.body)
        model = self.check_model(body, required=True)
        refuse_unsupported(body, OLLAMA_CHAT_UNSUPPORTED)
        if body.get("messages") in (None, []):
            await self._loaded_reply(writer, body, {"message": {"role": "assistant", "content": ""}})
            return
        gen, stream, reads_calls = await off_loop_if_constrained(parse_chat, body, self.eager_tools)
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
        defaults = Sampling()
        await writer.send_json(200, {
            "modelfile": f"FROM {e.model_name}\n",  # the name: the file's path is the server's own
            "parameters": "\n".join(f"{name} {getattr(defaults, name)}" for name in SHOWN_PARAMETERS),
            "template": e.facts.chat_template,
            "details": self._details(),
            "model_info": {"general.architecture": arch, "general.parameter_count": e.facts.parameters,
                           f"{arch}.context_length": e.context_length,
                           "minivault.device": e.facts.device, "minivault.dtype": e.facts.dtype},
            "capabilities": self.capabilities(),
            "modified_at": self.started_at,
        })

    @staticmethod
    def capabilities() -> list[str]:
        """What this install can do, as Ollama names it: tool requests need the grammar
        engine (without it they are a 400), completion and embedding every runner has."""
        return ["completion", *(["tools"] if constraints.available() else []), "embedding"]

    async def ollama_ps(self, request: Request, writer: ResponseWriter) -> None:
        models = []
        if self.engine.ready:
            entry = self._model_entry(self.listed_names()[0])
            entry.pop("modified_at")
            on_gpu = self.engine.facts.device.startswith("cuda")
            models.append({**entry, "expires_at": "2999-12-31T23:59:59Z",
                           "size_vram": entry["size"] if on_gpu else 0,
                           "context_length": self.engine.context_length})
        await writer.send_json(200, {"models": models})

    def _cannot(self, verb: str):
        async def refuse(request: Request, writer: ResponseWriter) -> None:
            raise HTTPError(501, f"MiniVault serves one model, {self.engine.model_name}, chosen at start "
                                 f"(--model); it cannot {verb} models")
        return refuse

    async def ollama_version(self, request: Request, writer: ResponseWriter) -> None:
        await writer.send_json(200, {"version": VERSION})

    # ---- OpenAI ----

    async def openai_completions(self, request: Request, writer: ResponseWriter) -> None:
        await self._openai(request, writer, chat=False)

    async def openai_chat(self, request: Request, writer: ResponseWriter) -> None:
        await self._openai(request, writer, chat=True)

    async def _openai(self, request: Request, writer: ResponseWriter, chat: bool) -> None:
        body = parse_json_body(request.body)
        model = self.check_model(body)
        gen, stream, include_usage, reads_calls = await off_loop_if_constrained(parse_openai, body, chat,
                                                                                 self.eager_tools)
        shape = OpenAIChat(model, include_usage, reads_calls) if chat else OpenAICompletion(model, include_usage)
        endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        prompts = [] if chat else completion_prompts(body.get("prompt"))
        if len(prompts) > 1:
            limit = self.engine.queue_size
            if len(prompts) > limit:  # more than may wait at once: a 503 whatever the load
                message = f"'prompt' holds {len(prompts)} prompts; at most {limit} (--queue-size) in one request"
                raise HTTPError(400, message)
            await self._run_several(request, writer, [replace(gen, prompt=p) for p in prompts], endpoint, shape)
            return
        await self._run(request, writer, gen, stream, endpoint, shape)

    async def openai_responses(self, request: Request, writer: ResponseWriter) -> None:
        body = parse_json_body(request.body)
        model = self.check_model(body)
        gen, stream, reads_calls = await off_loop_if_constrained(parse_responses, body, self.eager_tools)
        # Echoed as OpenAI does, with the values actually used (MiniVault's defaults differ).
        echoed = {"instructions": body.get("instructions"), "max_output_tokens": gen.max_tokens,
                  "temperature": gen.sampling.temperature, "top_p": gen.sampling.top_p,
                  "metadata": body.get("metadata") or {}, "store": False, "user": body.get("user"),
                  "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
                  "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice") or "auto",
                  "parallel_tool_calls": body.get("parallel_tool_calls") is True}
        await self._run(request, writer, gen, stream, "/v1/responses", OpenAIResponse(model, echoed, reads_calls))

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
        # No input, or "" (the client's default): Ollama loads the model and answers no
        # embeddings, as `ollama.embed(model=...)` preloads an embedding model.
        inputs = [] if inputs in (None, "") else [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise HTTPError(400, "'input' must be a string or a list of strings")
        truncate = optional_boolean(body, "truncate", True)
        started = time.monotonic()
        if not inputs:
            await self.engine.wait_loaded()
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
        prompt = string_field("prompt", body.get("prompt", ""))
        if not prompt:  # as Ollama answers an empty prompt
            await writer.send_json(200, {"embedding": []})
            return
        final = await self._embed(request, writer, [prompt], True, "/api/embeddings")
        await writer.send_json(200, {"embedding": final.embeddings[0]})

    async def openai_embeddings(self, request: Request, writer: ResponseWriter) -> None:
        body = parse_json_body(request.body)
        model = self.check_model(body)
        inputs, encoding = parse_openai_embeddings(body)
        final = await self._embed(request, writer, inputs, False, "/v1/embeddings")
        data = [{"object": "embedding", "index": i,
                 "embedding": base64_floats(v) if encoding == "base64" else v}
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
        await self._compile(gen)  # or an HTTPError (400, 503)
        stream = self._submit(request, writer, gen, endpoint, started, shape)  # or an HTTPError (400, 503)
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

                def take(text: str) -> bool:  # written from the hand-back itself, no task wake-up
                    return writer.write_now(shape.piece(text))
                try:
                    while not isinstance(item, Final):
                        await writer.write(shape.piece(item))
                        stream.follow(take)  # until the socket backs up
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

    async def _run_several(self, request: Request, writer: ResponseWriter, gens: list[GenerationRequest],
                           endpoint: str, shape: OpenAICompletion) -> None:
        """OpenAI's batch of prompts, not streamed: a request for each, queued together (so
        they share decode steps), each logged as its own; one reply with a choice each."""
        started = time.monotonic()
        streams: list[TokenStream] = []
        try:
            try:
                for gen in gens:
                    await self._compile(gen)
                    streams.append(self._submit(request, writer, gen, endpoint, started, shape))
            except HTTPError as err:  # the ones already queued are cancelled below
                message = f"'prompt[{len(streams)}]': {err.message}"
                await writer.send_json(err.status, shape.error(message, err.status), err.headers)
                return
            shape.request_id = streams[0].id
            id_header = [("X-Request-Id", ", ".join(str(s.id) for s in streams))]

            async def final_of(i: int) -> tuple[int, Final]:
                return i, await streams[i].wait_final()
            for ended in asyncio.as_completed([final_of(i) for i in range(len(streams))]):
                i, final = await ended
                if final.error:  # the first to fail answers, and the others stop (below)
                    status = 400 if final.client_error else 500
                    await writer.send_json(status, shape.error(f"'prompt[{i}]': {final.error}", status), id_header)
                    return
            texts = ["".join(s.text) for s in streams]
            await writer.send_json(200, shape.whole_of_several(texts, [s.final for s in streams]), id_header)
        finally:
            for stream in streams:
                stream.cancel()  # a no-op once it has ended

    async def _compile(self, gen: GenerationRequest) -> None:
        """The request's grammar compiled off the model thread (and off this loop), or the
        HTTPError that refuses it. A client that leaves meanwhile has its stream
        cancelled as soon as it is submitted (writer.on_disconnect)."""
        try:
            await self.engine.compile_constraint(gen)
        except RequestInvalid as exc:
            raise HTTPError(400, str(exc)) from None
        except ShuttingDown as exc:
            raise HTTPError(503, f"server busy: {exc}", [("Retry-After", str(self.engine.estimated_wait_s()))]) from None

    def _submit(self, request: Request, writer: ResponseWriter, gen: GenerationRequest, endpoint: str,
                started: float, shape: Shape | None = None) -> TokenStream:
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
        stream.on_final(lambda s: self._log(request, s, endpoint, started, shape))
        writer.on_disconnect(stream.cancel)
        return stream

    def _log(self, request: Request, stream: TokenStream, endpoint: str, started: float,
             shape: Shape | None = None) -> None:
        """One JSONL line and the request metrics, from a stream's final event (exactly once).
        A reply read for tool calls is logged as the client gets it: its content as
        `response`, its calls in `tool_calls`, the reason as the shape gives it."""
        final, gen, response = stream.final, stream.request, "".join(stream.text)
        calls = []
        if gen.calls_start:  # set exactly when the reply is read for calls
            response, calls = toolcalls.read_reply(response, lambda n: reply_call_id(stream.id, n))
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
            "done_reason": shape.logged_reason(final, bool(calls)) if shape is not None else final.done_reason,
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "duration_ms": round((time.monotonic() - started) * 1000, 1),
            "client": request.client,
        }
        if calls:
            ids = shape is not None and shape.sends_call_ids  # the id a client's tool result names
            record["tool_calls"] = [{**({"id": c["id"]} if ids else {}), "name": c["name"],
                                     "arguments": c["arguments"]} for c in calls]
        if final.error:
            record["error"] = final.error
        if not self.policy.log_prompts:
            for logged, call in zip(record.get("tool_calls", ()), calls):
                arguments = toolcalls.arguments_text(call)
                del logged["arguments"]
                logged["arguments_chars"] = len(arguments)
                logged["arguments_sha256"] = hashlib.sha256(arguments.encode("utf-8", "surrogatepass")).hexdigest()
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
