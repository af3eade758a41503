"""MiniVault in the test's own process: the real engine, API and HTTP server on a real
socket, so a test can look at the scheduler's books (slots, queue, live requests)
after its clients are done, and inject failures into any stage of a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Callable

import sampling
import textstream
from api import Api, Policy
from engine import Engine, TokenStream
from httpserver import HTTPServer, Limits, Router
from metrics import Metrics
from requestlog import RequestLog

STAGES = ("prepare", "prefill", "chunked prefill", "decode", "cut", "sample", "detokenise", "embed")


class InjectedFault(RuntimeError):
    pass


@dataclass
class Faults:
    """Which calls of each stage fail: {stage: {call numbers, from 0}}."""

    plan: dict[str, set[int]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)

    def check(self, stage: str) -> None:
        n = self.calls.get(stage, 0)
        self.calls[stage] = n + 1
        if n in self.plan.get(stage, ()):
            raise InjectedFault(f"injected failure in {stage}")

    def wrap(self, stage: str, fn):
        def faulty(*args, **kwargs):
            self.check(stage)
            return fn(*args, **kwargs)
        return faulty


class FaultyRunner:
    """A real runner whose calls fail where the plan says."""

    def __init__(self, runner, faults: Faults):
        self._runner = runner
        for name, stage in (("prefill", "prefill"), ("begin", "chunked prefill"), ("advance", "chunked prefill"),
                            ("decode", "decode"), ("keep", "cut"), ("begin_embedding", "embed"),
                            ("advance_embedding", "embed")):
            setattr(self, name, faults.wrap(stage, getattr(runner, name)))

    def __getattr__(self, name):
        return getattr(self._runner, name)


@contextlib.contextmanager
def faulty_text_stages(faults: Faults):
    """Sampling and detokenising fail where the plan says (patched for the whole
    process). A failed batch of samples is retried row by row by the engine, so a
    plan can fail the whole batch, then single rows."""
    saved = sampling.sample_rows, sampling.launch_rows, textstream.Detokenizer.step
    real_sample, real_launch, real_step = saved

    def sample_rows(logits, samplers, **kwargs):
        faults.check("sample")
        return real_sample(logits, samplers, **kwargs)

    def launch_rows(logits, samplers):  # the pipelined engine's (a GPU's) way in
        faults.check("sample")
        return real_launch(logits, samplers)

    def step(self, token_id):
        faults.check("detokenise")
        return real_step(self, token_id)

    sampling.sample_rows, sampling.launch_rows, textstream.Detokenizer.step = sample_rows, launch_rows, step
    try:
        yield
    finally:
        sampling.sample_rows, sampling.launch_rows, textstream.Detokenizer.step = saved


class LiveServer:
    def __init__(self, engine: Engine, api: Api, server: HTTPServer, log_path):
        self.engine, self.api, self.server, self.log_path = engine, api, server, log_path
        self.streams: list[TokenStream] = []
        self._all_final = asyncio.Event()
        real_submit = engine.submit

        def submit(request):
            stream = real_submit(request)
            self.streams.append(stream)
            self._all_final.clear()
            stream.on_final(lambda s: self._check_all_final())
            return stream

        engine.submit = submit

    def _check_all_final(self) -> None:
        if all(s.final is not None for s in self.streams):
            self._all_final.set()

    @property
    def port(self) -> int:
        return self.server.port

    async def settled(self, timeout: float = 20.0) -> None:
        """Wait until every submitted request has had its final event (a hang fails here)."""
        self._check_all_final()
        await asyncio.wait_for(self._all_final.wait(), timeout)
        await asyncio.sleep(0)  # callbacks queued with the last final run

    def log_lines(self) -> list[dict]:
        self.api.request_log.close()
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    def books(self) -> dict:
        """The scheduler's counts, which must all be back at rest when idle."""
        e = self.engine
        return {"free_slots": e.free_slots, "queued": e.queued, "active": e.active_count,
                "live": len(e._live)}


@contextlib.asynccontextmanager
async def live_server(model_folder, log_path, faults: Faults | None = None, policy: Policy | None = None,
                      runner=None, kind: str = "auto", asynchronous: bool = False, pipelined: bool = False,
                      **engine_kwargs):
    """`runner`: a runner to serve instead of the folder's model (the folder still names
    it); `kind`: which runner loads the folder (runner.RUNNERS); `asynchronous`: the
    engine treats the runner as a GPU's (text handed off while a step computes);
    `pipelined` too: each decode step starts from the last one's sampled tokens before
    the host reads them (the static runner's decode takes them as a tensor)."""
    def load(source, dtype, cache_dir):
        from runner import load_runner

        real = runner if runner is not None else load_runner(source, dtype, cache_dir, kind,
                                                             max_batch=engine_kwargs.get("max_batch", 8))
        if asynchronous or pipelined:
            real.asynchronous = True
        if pipelined:
            real.pipelined = True
        return FaultyRunner(real, faults) if faults is not None else real

    engine = Engine(model=str(model_folder), dtype="float32", cache_dir=None, load_runner=load, **engine_kwargs)
    router = Router()
    server = HTTPServer(router, Limits())
    api = Api(engine, RequestLog(str(log_path)), policy or Policy(), Metrics(),
              is_draining=lambda: server.draining)
    api.routes(router)
    await server.start("127.0.0.1", 0)
    engine.start()
    await engine.wait_loaded()
    if faults is not None:
        engine._prompts.encode = faults.wrap("prepare", engine._prompts.encode)
    live = LiveServer(engine, api, server, log_path)
    try:
        yield live
    finally:
        await server.shutdown(5.0)
        await engine.close()
        api.request_log.close()


async def wait_until(condition, timeout: float = 20.0) -> None:
    """Poll a condition on the event loop (the server runs in this loop too)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.005)


class GatedRunner:
    """A real runner whose decode steps wait until the test opens the gate: requests
    stay in the model thread for as long as a test needs them there."""

    def __init__(self, runner):
        import threading

        self._runner = runner
        self.gate = threading.Event()
        self.waiting = threading.Event()  # a decode step is waiting at the gate

    def decode(self, tokens):
        self.waiting.set()
        self.gate.wait(30)
        return self._runner.decode(tokens)

    def __getattr__(self, name):
        return getattr(self._runner, name)


class LoopPacedRunner:
    """A real runner whose decode steps each wait until the event loop has run a few
    iterations (once `loop` is set): every handler woken by the last step's text, or by
    a callback due at this step (after_steps), has run by then, as beside a model
    slower than the loop, however loaded the machine."""

    # The hand-back, the handler it wakes (through asyncio.wait_for's inner task, on
    # Python 3.11), and some to spare.
    ITERATIONS = 8

    def __init__(self, runner):
        self._runner = runner
        self.loop: asyncio.AbstractEventLoop | None = None
        self.steps = 0  # decode steps begun since `loop` was set
        self._due: list[tuple[int, Callable[[], None]]] = []

    def after_steps(self, steps: int, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop, as this is called) when the model begins
        its `steps`-th decode step from now, before that step computes."""
        self._due.append((self.steps + steps, callback))

    def decode(self, tokens):
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self._step_begins(), self.loop).result(30)
        return self._runner.decode(tokens)

    async def _step_begins(self) -> None:
        self.steps += 1
        due = [callback for step, callback in self._due if step <= self.steps]
        self._due = [(step, callback) for step, callback in self._due if step > self.steps]
        for callback in due:
            callback()
        for _ in range(self.ITERATIONS):
            await asyncio.sleep(0)

    def __getattr__(self, name):
        return getattr(self._runner, name)


class EmbeddingHookedRunner:
    """A real runner that, before computing embedding chunk n (counted from 0), waits
    on the model thread for `hooks[n]()`, a coroutine function, to finish on the event
    loop: a test acts while an embedding is part way through, at a point of the
    scheduler's loop it chooses, however fast or loaded the machine."""

    def __init__(self, runner):
        self._runner = runner
        self.loop: asyncio.AbstractEventLoop | None = None
        self.hooks: dict[int, Callable] = {}
        self.chunks = 0  # embedding chunks computed (or begun)

    def advance_embedding(self, partial, tokens):
        hook = self.hooks.pop(self.chunks, None)
        if hook is not None:
            asyncio.run_coroutine_threadsafe(hook(), self.loop).result(30)
        self.chunks += 1
        return self._runner.advance_embedding(partial, tokens)

    def __getattr__(self, name):
        return getattr(self._runner, name)


class ScriptedRunner:
    """Answers every prompt with the same tokens and then end-of-sequence, whatever the
    sampling: the logits put all weight on the next scripted token."""

    architecture, parameters, dtype, device = "scripted", 0, "float32", "cpu"

    def __init__(self, tokenizer, text: str, context_length: int = 64):
        from prompts import TextCodec

        self.codec = TextCodec.from_transformers(tokenizer)
        self.context_length = context_length
        eos = tokenizer.eos_token_id
        self.eos_ids = frozenset([eos])
        self._script = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos]
        self._vocab = len(tokenizer)
        self._at: list[int] = []  # each row's place in the script

    @property
    def rows(self) -> int:
        return len(self._at)

    def _logits(self, places):
        import torch

        logits = torch.full((len(places), self._vocab), -1e4)
        for row, place in enumerate(places):
            logits[row, self._script[min(place, len(self._script) - 1)]] = 1e4
        return logits

    def remember_prefix(self, ids):
        pass

    def prefill(self, prompts):
        self._at += [0] * len(prompts)
        return self._logits([0] * len(prompts))

    def begin(self, prompt):
        return prompt

    def advance(self, partial, tokens):
        return self.prefill([partial])

    def decode(self, tokens):
        self._at = [place + 1 for place in self._at]
        return self._logits(self._at)

    def keep(self, rows):
        self._at = [self._at[r] for r in rows]

    def reset(self):
        self._at = []


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.body.decode().splitlines() if line.strip()]


async def http(port: int, method: str, path: str, body=None, headers: dict | None = None,
               leave: str | None = None) -> Reply | None:
    """One request on a new connection. `leave`: "at once" closes right after sending,
    "after head" after the status line arrives; both return None."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else b""
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close",
            f"Content-Length: {len(data)}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    await writer.drain()
    try:
        if leave == "at once":
            return None
        if leave == "after head":
            await reader.readline()
            return None
        raw = await reader.read()
    finally:
        writer.close()
    head_bytes, _, rest = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    hdrs = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if hdrs.get("transfer-encoding") == "chunked":
        rest = _dechunk(rest)
    return Reply(status, hdrs, rest)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2:]
    return out
