"""MiniVault: a local LLM streaming server. Run `python minivault.py --help`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from api import DEFAULT_CORS_ORIGINS, Api, Policy, allowed_hosts_option, is_loopback
from engine import Engine
from runner import RUNNERS, resolve_device
from httpserver import HTTPServer, Limits, Router
from metrics import Metrics
from ratelimit import RateLimiter, parse_rate
from requestlog import RequestLog

log = logging.getLogger("minivault")

CPU_MAX_BATCH = 8  # 8 rows cost ~2.3x one step on a 2-core CPU: more rows gain little there
# A CUDA-graph step of the embedded model: 2.4 ms at 1 row, 5.1 ms at 256 (H100). An
# upper bound: without --max-batch the GPU runner keeps as many slots as fit its memory.
GPU_MAX_BATCH = 256


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where it is None: those defaults are decided at
    start (from the device, --max-batch, --host), and their help says so in words."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="minivault.py",
        description="MiniVault: stream a local language model's answers over HTTP as NDJSON.",
        formatter_class=_HelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=3000, help="port to listen on (11434 answers where Ollama clients look)")
    p.add_argument("--model", default=None,
                   help="model to serve: default the embedded SmolLM2-135M-Instruct; or a Hugging Face "
                        "model id (e.g. gpt2, needs a reachable hub), a local model folder, or a .gguf file")
    p.add_argument("--max-tokens", type=int, default=300, help="default tokens to generate per request")
    p.add_argument("--log-file", default="logs/log.jsonl", help="JSONL request log ('' to disable)")
    p.add_argument("--queue-size", type=int, default=None,
                   help="requests that may wait for the model; beyond it clients get 503 (default: 64, or "
                        "--max-batch if larger)")
    p.add_argument("--max-batch", type=int, default=None,
                   help=f"sequences decoded together in one forward pass (default {CPU_MAX_BATCH} on the CPU; on "
                        f"a GPU as many as fit its memory with the whole context, up to {GPU_MAX_BATCH})")
    p.add_argument("--device", default="auto",
                   help="where the model computes: auto (a CUDA GPU when torch sees one, else the CPU), cpu, "
                        "cuda or cuda:N (exits with an error when there is no such GPU)")
    p.add_argument("--runner", choices=RUNNERS, default="auto",
                   help="what computes the model: auto: on a GPU the static runner (CUDA graphs; Llama "
                        "architectures); on the CPU our own Llama runner for Llama-architecture models "
                        "(SmolLM2, Llama, Mistral), transformers for every other; static: the GPU's runner "
                        "on the CPU (float32, no graphs)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "int8", "int4", "bfloat16"], default="auto",
                   help="number type (float16: float16 weights, float32 sums; int8: int8 weights, bfloat16 "
                        "activations, llama runner only; int4: 4-bit weights where the model's are 4-bit "
                        "already (a Q4_1 GGUF), int8 elsewhere; auto: int4 where the CPU has bfloat16 "
                        "instructions and the llama runner serves, else float16 where fbgemm runs (AVX2 + "
                        "F16C), else float32; bfloat16 only when asked: with transformers it is not "
                        "batch-invariant)")
    p.add_argument("--tool-calls", choices=["eager", "auto"], default="eager",
                   help="a request with tools and no tool_choice (Ollama never sends one): eager: the reply to a "
                        "user message is a tool call, after a tool result the model may answer in text; auto: the "
                        "model always chooses (the embedded 135M model then practically never calls a tool)")
    p.add_argument("--cache-dir", default="~/.cache/minivault",
                   help="where a GGUF model's converted weights are cached ('' to disable)")
    p.add_argument("--max-body", type=int, default=1024 * 1024, help="largest request body in bytes (413 beyond)")
    p.add_argument("--max-request-line", type=int, default=8 * 1024, help="longest request line (414 beyond)")
    p.add_argument("--max-header-bytes", type=int, default=64 * 1024, help="largest header section (431 beyond)")
    p.add_argument("--max-headers", type=int, default=100, help="most header fields (431 beyond)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a request's head may take to arrive (408 beyond; stops slowloris)")
    p.add_argument("--keepalive-timeout", type=float, default=5.0,
                   help="idle seconds before a keep-alive connection closes")
    p.add_argument("--body-timeout", type=float, default=30.0, help="seconds a request body may take to arrive")
    p.add_argument("--write-timeout", type=float, default=30.0,
                   help="seconds a client may stop reading its stream before it is dropped (and its generation "
                        "stopped)")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections before new ones get 503")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish on SIGTERM/SIGINT")
    p.add_argument("--log-max-bytes", type=int, default=0, help="rotate the request log past this size (0: never)")
    p.add_argument("--log-backups", type=int, default=3, help="rotated request logs to keep")
    p.add_argument("--no-log-prompts", action="store_true",
                   help="log lengths and SHA-256 of prompts and responses instead of their text")
    p.add_argument("--rate-limit", default="auto",
                   help="per-client limit on generation requests, e.g. 30/min, 5/s, off "
                        "(auto: 30/min when bound to a non-loopback address, else off)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every endpoint but /health "
                        "(or set $MINIVAULT_API_KEY)")
    p.add_argument("--cors-origins", default=",".join(DEFAULT_CORS_ORIGINS),
                   help="comma-separated browser origins allowed to call the API ('*' for any; "
                        "host:* for any port)")
    p.add_argument("--allowed-hosts", default=None,
                   help="comma-separated host names requests may be addressed to (the Host header), besides "
                        "localhost, 127.x.x.x and [::1]; '*' for any (default: those only when --host is a "
                        "loopback address, which stops DNS rebinding; any host otherwise)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server messages on stderr")
    return p


async def serve(args: argparse.Namespace) -> int:
    try:
        device = resolve_device(args.device)
        max_batch = args.max_batch
        if max_batch is None:
            max_batch = CPU_MAX_BATCH if device == "cpu" else GPU_MAX_BATCH
        queue_size = args.queue_size if args.queue_size is not None else max(64, max_batch)
        engine = Engine(model=args.model, dtype=args.dtype, max_batch=max_batch, queue_size=queue_size,
                        default_max_tokens=args.max_tokens, cache_dir=args.cache_dir or None,
                        runner=args.runner, device=device, max_batch_fixed=args.max_batch is not None)
    except RuntimeError as exc:
        log.error("%s", exc)
        return 2
    loopback = is_loopback(args.host)
    args.api_key = args.api_key or os.environ.get("MINIVAULT_API_KEY") or None
    try:
        rate = parse_rate("off" if args.rate_limit == "auto" and loopback else
                          "30/min" if args.rate_limit == "auto" else args.rate_limit)
    except ValueError as exc:
        log.error("--rate-limit: %s", exc)
        return 2
    if not loopback and not args.api_key:
        log.warning("listening on %s without --api-key: anyone who can reach this address can use the model",
                    args.host)
    policy = Policy(api_key=args.api_key, rate_limiter=RateLimiter(*rate) if rate else None,
                    cors_origins=tuple(o.strip() for o in args.cors_origins.split(",") if o.strip()),
                    log_prompts=not args.no_log_prompts,
                    allowed_hosts=allowed_hosts_option(args.allowed_hosts, loopback))
    request_log = RequestLog(args.log_file or None, max_bytes=args.log_max_bytes, backups=args.log_backups)
    router = Router()
    limits = Limits(max_request_line=args.max_request_line, max_header_bytes=args.max_header_bytes,
                    max_header_count=args.max_headers, max_body=args.max_body,
                    header_timeout=args.header_timeout, keepalive_timeout=args.keepalive_timeout,
                    body_timeout=args.body_timeout, write_timeout=args.write_timeout)
    server = HTTPServer(router, limits, max_connections=args.max_connections)
    api = Api(engine, request_log, policy, Metrics(), is_draining=lambda: server.draining,
              eager_tools=args.tool_calls == "eager")
    api.routes(router)
    server.observer = api.observe_response
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("%s received: finishing in-flight requests (up to %.0f s); again to exit now",
                 signal.Signals(signum).name, args.shutdown_timeout)
        stop.set()

    # Before the port opens: a supervisor that signals as soon as it sees "listening"
    # must not meet the default action (killed, nothing logged).
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    try:
        await server.start(args.host, args.port)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", args.host, args.port, exc)
        request_log.close()
        return 2
    log.info("listening on http://%s:%d (model %s loading; requests are queued meanwhile)",
             args.host, server.port, engine.model_name)
    engine.start()

    async def stop_on_load_error() -> None:
        await engine.wait_loaded()
        if engine.load_error:
            log.error("%s; stopping", engine.load_error)
            stop.set()

    watcher = loop.create_task(stop_on_load_error())
    await stop.wait()
    watcher.cancel()
    await server.shutdown(args.shutdown_timeout)
    await engine.close()
    request_log.close()
    log.info("stopped")
    code = 1 if engine.load_error else 0
    if engine.thread_alive:
        # Still loading the model (or stuck in a step): letting the interpreter exit
        # under it aborts the process in torch's C++ code (status 134). Everything is
        # written out by now.
        logging.shutdown()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # transformers' progress bars and advice would clutter the server's terminal.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
