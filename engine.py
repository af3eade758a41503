"""The scheduler: admission queue, batch slots, the model thread's loop, the request
lifecycle, and the hand-back to the event loop with `call_soon_threadsafe`.

Knows nothing of HTTP, and has no torch code: the model is behind a runner
(runner.py). The event loop talks to it through `Engine.submit`, which returns a
`TokenStream`; the model thread never touches any other asyncio object.

The lifecycle invariant lives here, in one place: every request taken off the
admission queue is tracked (`_live`) until its one final event is handed back, and
every path (validation, prefill, decode, sampling, detokenising, cancel, failure,
shutdown) ends it through `_end`, which is idempotent. The slot comes back when the
final event reaches the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from modelsource import resolve_model
from runner import ModelFacts
from stageclock import StageClock

log = logging.getLogger("minivault.engine")


# ---------------------------------------------------------------------------
# Requests, events and the asyncio-side stream


SEEDS = 2 ** 64  # torch.Generator takes seeds in [0, 2**64); any integer seed is reduced to it


@dataclass
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per earlier occurrence in the completion
    seed: int | None = None


@dataclass
class GenerationRequest:
    prompt: str = ""
    system: str | None = None
    messages: list[dict] | None = None  # chat: [{"role", "content"}], used instead of prompt
    raw: bool = False  # skip the chat template
    max_tokens: int | None = None  # None: the engine's default
    stop: list[str] = field(default_factory=list)
    # A reply opening with this character is tool calls, which stop strings never cut
    # (tools.CALLS_START, set when the model may answer in text or call a tool).
    calls_start: str = ""
    sampling: Sampling = field(default_factory=Sampling)
    constraint: object = None  # constraints.Constraint: the grammar the output must match
    # Its llguidance matcher, compiled off the model thread (Engine.compile_constraint);
    # None: the model thread compiles it when the request joins.
    compiled: object = None
    # An embedding request instead: texts (embedded as given, no template) or token id lists.
    embed_inputs: list | None = None
    truncate: bool = True  # an input longer than the context is cut to it (else a 400)

    def text_chars(self) -> int:
        """Characters of user text: what the prompt size limit counts before tokenising."""
        if self.embed_inputs is not None:
            return max((len(i) for i in self.embed_inputs if isinstance(i, str)), default=0)
        if self.messages is not None:
            return sum(len(m.get("content") or "") for m in self.messages)
        return len(self.prompt) + len(self.system or "")


@dataclass
class Stats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    load_ns: int = 0  # time this request waited for the model to load
    prompt_eval_ns: int = 0
    eval_ns: int = 0
    total_ns: int = 0


@dataclass
class Final:
    """The last event of every stream, exactly once."""

    done_reason: str  # "stop", "length", "cancelled" or "error"
    stats: Stats
    error: str | None = None
    client_error: bool = False  # the request was at fault (e.g. prompt too long): a 400
    embeddings: list[list[float]] | None = None  # an embedding request's vectors, in input order


class QueueFull(Exception):
    pass


class RequestInvalid(ValueError):
    """The request cannot be served as asked (a 400), found before it reaches the model."""


class ShuttingDown(Exception):
    pass


class _Raised:
    """An exception that TokenStream.follow's `take` raised, for next() to raise."""

    def __init__(self, exc: Exception):
        self.exc = exc


class TokenStream:
    """The asyncio side of one generation: iterate it for text, then read `final`."""

    _ids = 0

    def __init__(self, request: GenerationRequest, unqueue: Callable[["TokenStream"], None] = lambda s: None):
        TokenStream._ids += 1
        self.id = TokenStream._ids
        self.request = request
        self.final: Final | None = None
        self.text: list[str] = []  # every piece delivered, for the log
        self.cancelled = False  # read by the model thread between steps
        self.in_model = False  # handed to the model thread, which then owns the final event
        self.submitted_ns = time.monotonic_ns()
        self._items: asyncio.Queue = asyncio.Queue()
        self._take: Callable[[str], bool] | None = None  # follow's
        self._unqueue = unqueue
        self._on_final: list[Callable[[TokenStream], None]] = []

    def cancel(self) -> None:
        """Stop this generation: at once if still queued (its place is given back),
        else at the model's next step."""
        if self.cancelled or self.final is not None:
            return
        self.cancelled = True
        if not self.in_model:
            self._unqueue(self)
            self._push(Final("cancelled", Stats(total_ns=time.monotonic_ns() - self.submitted_ns)))

    def on_final(self, callback: Callable[["TokenStream"], None]) -> None:
        """Call `callback(stream)` once, when the final event arrives (now if it has)."""
        if self.final is not None:
            callback(self)
        else:
            self._on_final.append(callback)

    def follow(self, take: Callable[[str], bool]) -> None:
        """Hand text to `take(text)` as it arrives, instead of queueing it for next(),
        while take returns True. Text after it returned False, and the final event,
        queue as before; an exception take raises is raised by next(). Only while
        nothing is queued, so that the order holds. Why: beside a GPU each stream
        gets a token a decode step, and waking its handler for each (a future, a task
        step) costs ~4 us a token in a bare event loop here; with this and the chunk
        templates (replies.PieceTemplate) the event loop's CPU a token at 256 streams
        went from ~27 to ~16 us."""
        if self.final is None and self._items.empty():
            self._take = take

    def _push(self, item) -> None:  # runs on the event loop
        if self.final is not None:  # exactly one final event; nothing after it
            return
        take, self._take = self._take, None
        if isinstance(item, Final):
            self.final = item
        else:
            self.text.append(item)
            if take is not None:
                try:
                    if take(item):
                        self._take = take
                    return
                except Exception as exc:
                    item = _Raised(exc)
        self._items.put_nowait(item)
        if isinstance(item, Final):
            callbacks, self._on_final = self._on_final, []
            for callback in callbacks:
                try:
                    callback(self)
                except Exception:
                    log.exception("final-event callback of request %s failed", self.id)

    async def next(self) -> str | Final:
        item = await self._items.get()
        if isinstance(item, _Raised):
            raise item.exc
        return item

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        if self.final is not None and self._items.empty():
            raise StopAsyncIteration
        item = await self.next()
        if isinstance(item, Final):
            raise StopAsyncIteration
        return item

    async def wait_final(self) -> Final:
        while self.final is None or not self._items.empty():
            await self._items.get()
        return self.final


class AdmissionQueue(asyncio.Queue):
    """The bounded asyncio queue requests wait in, from which a request whose client
    left can be taken out at once (its place given back)."""

    def discard(self, item) -> None:
        try:
            self._queue.remove(item)
        except ValueError:
            return
        self._wakeup_next(self._putters)


# ---------------------------------------------------------------------------
# The model thread's view of one request


@dataclass
class _Sequence:
    stream: TokenStream
    prompt_ids: list[int] = field(default_factory=list)
    max_tokens: int = 0
    detok: object = None  # textstream.Detokenizer
    stopper: object = None  # textstream.StopMatcher
    sampler: object = None  # sampling.RowSampler
    partial: object = None  # the runner's partial prefill of a long prompt, or embedding of an input
    inputs: list = field(default_factory=list)  # an embedding request's token ids, per input
    vectors: list = field(default_factory=list)  # ... and the vectors computed so far
    pending: int = -1  # sampled, not yet fed through the model
    completion_tokens: int = 0
    first_token_ns: int = 0
    prompt_eval_ns: int = 0
    load_ns: int = 0
    ended: bool = False


def holes_filled_from_the_end(kept: list[int]) -> list[int]:
    """The order the surviving rows (`kept`, ascending) keep: a row already within the
    first len(kept) places stays, and the places of rows that ended there take the
    survivors from beyond, in order. A static cache moves only the rows whose place
    changes: at 256 rows, cutting row 0 in place order moved 255 rows' caches; this
    moves one."""
    staying = {i for i in kept if i < len(kept)}
    movers = iter(i for i in kept if i >= len(kept))
    return [i if i in staying else next(movers) for i in range(len(kept))]


def _log_batch_sampling_failure(rows: int, exc: Exception) -> None:
    """Said once for a batch; then its rows are sampled one by one, and only the rows
    that fail again end, each with its own error."""
    log.warning("sampling a batch of %d rows failed (%s: %s); sampling them row by row", rows, type(exc).__name__, exc)


class Engine:
    # A prompt longer than PREFILL_CHUNK is prefilled a chunk per step, and an input
    # to embed is computed so too, so the running streams keep getting tokens
    # meanwhile instead of pausing for the whole prompt (about 5 ms a prompt token on
    # a 2-core CPU).
    PREFILL_CHUNK = 256

    def __init__(self, model: str | None = None, dtype: str = "auto", max_batch: int = 8,
                 queue_size: int = 64, default_max_tokens: int = 300,
                 cache_dir: str | None = "~/.cache/minivault", runner: str = "auto", device: str = "cpu",
                 max_batch_fixed: bool = True, load_runner: Callable | None = None):
        self.source = resolve_model(model)
        self.model_name = self.source.name
        self.requested_dtype = dtype
        self.max_batch = max(1, max_batch)
        self.default_max_tokens = default_max_tokens
        self.cache_dir = cache_dir
        self.queue_size = queue_size
        self.facts = ModelFacts(name=self.model_name)  # replaced once, by the loaded model's
        self.ready = False
        self.load_error: str | None = None
        self.runner_kind = runner
        self.device = device
        self.max_batch_fixed = max_batch_fixed  # else max_batch is an upper bound the runner may lower
        self._load_runner = load_runner  # (source, dtype, cache_dir) -> a runner; tests inject their own
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admission: AdmissionQueue | None = None
        # Loop side: streams handed to the model thread (a batch slot each) whose final
        # event has not come back, by id.
        self._held: dict[int, TokenStream] = {}
        self._slot_freed = asyncio.Event()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._feeder: asyncio.Task | None = None
        self._closing = False
        self._loaded = asyncio.Event()
        self._started_ns = 0
        self._finished_at: collections.deque = collections.deque(maxlen=32)  # loop-side clock
        # Model thread only:
        self._runner = None
        self._facts: ModelFacts | None = None  # the loaded model's, before `facts` is published
        self._asynchronous = False  # the runner's steps run on a device while the host goes on
        self._pipelined = False  # and its decode takes the last sampled tokens on the device
        # Pipelined: the rows of the last decode step (the batch's first rows) and their
        # sampling, launched and not yet read (_decode_step).
        self._launched: tuple[list[_Sequence], object] | None = None
        self._live: dict[int, _Sequence] = {}  # every request taken off the inbox, until it ends
        self._batch: list[_Sequence] = []  # row i of the runner's batch is _batch[i]
        self._long: list[_Sequence] = []  # long prompts being prefilled a chunk per step
        self._embedding: list[_Sequence] = []  # embedding requests, a chunk of one input computed per step
        self._outbox: list = []  # (stream, text or Final)
        # constraints.Grammars: made at load (else by the first constrained request), then
        # used by the model thread and the compile worker (one thread: a burst of big
        # schemas takes one core, not every one the decode step could use).
        self._grammars = None
        self._compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        # Written by the model thread, read by /metrics:
        self.clock = StageClock()  # seconds per stage of the model thread's loop
        self.decode_steps = 0
        self.decoded_rows = 0  # rows summed over decode steps (their mean is the batch)

    # ---- what the event loop reads ----

    @property
    def dtype(self) -> str:
        return self.facts.dtype or self.requested_dtype

    @property
    def context_length(self) -> int:
        return self.facts.context_length

    @property
    def load_seconds(self) -> float:
        return self.facts.load_seconds

    @property
    def queued(self) -> int:
        return self._admission.qsize() if self._admission else 0

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self._held)

    @property
    def active_count(self) -> int:
        """Requests the model thread holds (a batch slot each), until their final event is back."""
        return len(self._held)

    # ---- the event-loop side ----

    def start(self) -> None:
        """Start loading in the model thread; requests may be submitted at once."""
        self._loop = asyncio.get_running_loop()
        self._admission = AdmissionQueue(maxsize=max(1, self.queue_size))
        self._started_ns = time.monotonic_ns()
        self._thread = threading.Thread(target=self._thread_main, name="model", daemon=True)
        self._thread.start()
        self._feeder = self._loop.create_task(self._feed())

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a request. Raises RequestInvalid (a prompt that cannot fit, found without
        tokenising it), QueueFull or ShuttingDown."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        limit = self.facts.max_prompt_chars
        if limit and request.embed_inputs is not None and request.truncate:
            # Text beyond `limit` characters lies past the context's worth of tokens, which
            # truncating drops anyway: cut it here instead of tokenising it all.
            request.embed_inputs = [i[:limit] if isinstance(i, str) else i for i in request.embed_inputs]
        if limit and request.text_chars() > limit:
            raise RequestInvalid(f"prompt is {request.text_chars()} characters; the model's context of "
                                 f"{self.facts.context_length} tokens holds at most {limit}")
        if self._admission.full():  # before the stream takes an id: logged ids have no gaps
            raise QueueFull(f"{self._admission.maxsize} requests already waiting")
        stream = TokenStream(request, unqueue=self._admission.discard)
        self._admission.put_nowait(stream)
        return stream

    async def compile_constraint(self, request: GenerationRequest) -> None:
        """Compile the request's grammar on the compile worker, before it is queued, so
        the model thread only copies a ready matcher when the request joins the batch
        (compiling there stops every running stream: 20-80 ms for a 20,000-value enum or
        200 tools on a 2-core CPU; llguidance releases the GIL meanwhile). Raises
        RequestInvalid when this tokenizer cannot compile it, ShuttingDown. Before the
        model has loaded there is no tokenizer yet: the model thread compiles it then."""
        grammars = self._grammars
        if request.constraint is None or request.compiled is not None or grammars is None:
            return
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        import constraints

        try:
            request.compiled = await asyncio.get_running_loop().run_in_executor(
                self._compiler, grammars.compiled, request.constraint)
        except constraints.ConstraintInvalid as exc:
            raise RequestInvalid(f"{request.constraint.name}: {exc}") from None

    async def _feed(self) -> None:
        # Moves requests to the model thread only when it has a free slot, so the
        # bounded asyncio queue is where requests wait (and where a client that
        # leaves is dropped without ever reaching the model).
        while True:
            while len(self._held) >= self.max_batch:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            stream = await self._admission.get()  # only this task adds to _held: still a slot free
            stream.in_model = True
            self._held[stream.id] = stream
            self._inbox.put(stream)

    def _deliver(self, batch: list) -> None:  # runs on the event loop
        for stream, item in batch:
            if isinstance(item, Final):
                if self._held.pop(stream.id, None) is None:
                    if not self._closing:  # closing ends what the model thread still holds itself
                        log.error("request %s got a second final event; ignored", stream.id)
                    continue
                self._finished_at.append(time.monotonic())
                self._slot_freed.set()
            stream._push(item)

    def _publish(self, facts: ModelFacts | None, error: str | None) -> None:  # runs on the event loop
        if facts is not None:
            self.facts = facts
            self.ready = True
        self.load_error = error
        self._loaded.set()

    def estimated_wait_s(self) -> int:
        """Seconds until a queue slot is likely free, from the recent completion rate."""
        recent = self._finished_at
        if len(recent) >= 2 and recent[-1] > recent[0]:
            rate = (len(recent) - 1) / (recent[-1] - recent[0])
        else:
            rate = 0.5
        return max(1, min(120, math.ceil((self.queued + 1) / rate)))

    async def wait_loaded(self) -> None:
        await self._loaded.wait()

    async def close(self) -> None:
        """Stop: queued requests end cancelled at once, the model thread ends the rest;
        what it still holds when it cannot (loading, or stuck in a step for 5 s) ends
        cancelled here, so every request submitted gets its final event."""
        self._closing = True
        self._compiler.shutdown(wait=False, cancel_futures=True)
        if self._feeder is not None:
            self._feeder.cancel()
        if self._admission is not None:
            while not self._admission.empty():
                self._admission.get_nowait().cancel()
        self._inbox.put(None)
        if self._thread is not None and self._loaded.is_set():  # a load cannot be stopped: no wait for it
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
        await asyncio.sleep(0)  # let the last hand-back run
        now = time.monotonic_ns()
        self._deliver([(stream, Final("cancelled", Stats(total_ns=now - stream.submitted_ns)))
                       for stream in list(self._held.values())])

    @property
    def thread_alive(self) -> bool:
        """The model thread still runs (after close: loading, or stuck in a step)."""
        return self._thread is not None and self._thread.is_alive()

    # ---- the model thread: hand-back ----
    # Everything the model thread produces in one step goes back in one
    # call_soon_threadsafe: one wake-up of the event loop per step, not one per
    # token, which on a 2-core machine keeps torch's threads from being preempted.

    def _emit(self, seq: _Sequence, text: str) -> None:
        if text:
            self._outbox.append((seq.stream, text))

    def _flush_unless_sampling_will(self) -> None:
        """The end of a step's work: hand its text to the event loop now, unless a decode
        step follows on an asynchronous device. Then that step's sampling hands it over
        once the device has the step (sample_rows' before_waiting), and the event loop
        writes while the device computes, instead of holding the GIL while the next
        step waits to be launched."""
        if not (self._asynchronous and self._batch):
            self._flush()

    def _flush(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        with self.clock.stage("handoff"):
            try:
                self._loop.call_soon_threadsafe(self._deliver, batch)
            except RuntimeError:  # the loop has closed: shutting down
                pass

    def _end(self, seq: _Sequence, reason: str, error: str | None = None, client_error: bool = False) -> None:
        """The one way a request ends: exactly once, whatever calls it."""
        if seq.ended:
            return
        seq.ended = True
        self._live.pop(seq.stream.id, None)
        if reason in ("stop", "length") and seq.stopper is not None:
            self._emit(seq, seq.stopper.flush())  # text held back as a possible stop prefix
        now = time.monotonic_ns()
        stats = Stats(prompt_tokens=len(seq.prompt_ids), completion_tokens=seq.completion_tokens,
                      load_ns=seq.load_ns, prompt_eval_ns=seq.prompt_eval_ns,
                      eval_ns=now - seq.first_token_ns if seq.first_token_ns else 0,
                      total_ns=now - seq.stream.submitted_ns)
        embeddings = seq.vectors if seq.inputs and reason == "stop" else None
        self._outbox.append((seq.stream, Final(reason, stats, error=error, client_error=client_error,
                                               embeddings=embeddings)))

    def _fail(self, seqs, exc: BaseException, stage: str) -> None:
        log.error("%s failed for %d request(s): %r", stage, len(seqs), exc, exc_info=exc)
        for seq in list(seqs):
            self._end(seq, "error", error=f"generation failed ({stage}): {exc}")

    # ---- the model thread: loading ----

    def _thread_main(self) -> None:
        t0 = time.monotonic()
        try:
            with self.clock.stage("loading"):
                facts = self._load(t0)
        except Exception as exc:
            log.exception("model failed to load")
            error = f"model failed to load: {exc}"
            self._loop.call_soon_threadsafe(self._publish, None, error)
            self._fail_forever(error)
            return
        self._facts = facts
        log.info("model %s loaded in %.1f s (%s on %s, context %d tokens, batch up to %d)",
                 self.model_name, facts.load_seconds, facts.dtype, facts.device, facts.context_length,
                 self.max_batch)
        self._loop.call_soon_threadsafe(self._publish, facts, None)
        self._serve()

    def _load(self, t0: float) -> ModelFacts:
        """The runner, the prompt builder and the shared prefix; the model's facts."""
        # These import torch (seconds): the server listens meanwhile.
        import runner

        if self._load_runner is not None:
            self._runner = self._load_runner(self.source, self.requested_dtype, self.cache_dir)
        else:
            self._runner = runner.load_runner(self.source, self.requested_dtype, self.cache_dir,
                                              self.runner_kind, self.device, self.max_batch,
                                              self.max_batch_fixed)
        # A runner with fewer slots than asked (what fits a GPU): admit no more than those.
        self.max_batch = min(self.max_batch, getattr(self._runner, "max_batch", self.max_batch))
        self._asynchronous = bool(getattr(self._runner, "asynchronous", False))
        self._pipelined = self._asynchronous and bool(getattr(self._runner, "pipelined", False))
        from prompts import PromptBuilder

        self._prompts = PromptBuilder(self._runner.codec)
        self._cache_shared_prefix()
        self._make_grammars()
        r = self._runner
        return ModelFacts(
            name=self.model_name, architecture=r.architecture, parameters=r.parameters,
            chat_template=r.codec.chat_template or "",
            context_length=r.context_length, dtype=r.dtype, device=r.device,
            max_prompt_chars=self._prompts.max_prompt_chars(r.context_length),
            load_seconds=time.monotonic() - t0)

    def _cache_shared_prefix(self) -> None:
        """The prompt prefix every default-templated request starts with (the system
        turn and the user header, ~24 tokens for the embedded model), prefilled once."""
        if not self._prompts.has_template:
            return
        try:
            a, b = (self._prompts.encode(GenerationRequest(prompt=p)) for p in ("Hello", "1 + 1?"))
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            if n >= 8:  # shorter is not worth a special path
                self._runner.remember_prefix(a[:n])
        except Exception:  # only an optimisation: serve without it
            log.exception("could not cache the shared prompt prefix")

    def _make_grammars(self) -> None:
        """The grammar engine for this tokenizer, built now rather than by the first
        constrained request: its token trie holds the GIL for ~0.17 s (49k vocabulary),
        which then stalled every running stream (a 230 ms gap between tokens) and would
        on any thread."""
        import constraints

        try:
            self._grammars = self._new_grammars()
        except constraints.ConstraintUnavailable:
            pass  # no request can be constrained: the API refuses them before queuing
        except Exception:  # only an optimisation: the first constrained request tries again
            log.exception("could not build the grammar engine at load")

    def _new_grammars(self):
        import constraints

        r = self._runner
        return constraints.Grammars(r.codec.backend.to_str(), sorted(r.eos_ids), self._prompts.vocab_size)

    def _fail_forever(self, error: str) -> None:
        while (stream := self._inbox.get()) is not None:
            self._outbox.append((stream, Final("error", Stats(), error=error)))
            self._flush()

    # ---- the model thread: the loop ----

    def _serve(self) -> None:
        while True:
            try:
                if not self._step():
                    break
            except Exception as exc:
                # A bug outside the guarded stages: whatever state the batch is in is
                # suspect, so every request the thread holds ends with an error.
                self._fail(list(self._live.values()), exc, "model step")
                self._forget_all()
            self._flush_unless_sampling_will()
        for seq in list(self._live.values()):
            self._end(seq, "cancelled")
        while (stream := self._next_inbox(block=False)) is not None:
            self._end(_Sequence(stream), "cancelled")
        self._forget_all()
        self._flush()

    def _forget_all(self) -> None:
        self._batch, self._long, self._embedding = [], [], []
        self._launched = None
        try:
            self._runner.reset()
        except Exception:
            log.exception("runner reset failed")

    def _step(self) -> bool:
        """One turn: admit, prefill, decode. False once told to stop."""
        stage = self.clock.stage
        with stage("admitting"):
            arrived, stop = self._admit()
        self._embedding += [s for s in arrived if s.inputs]
        with stage("prefill"):
            self._prefill_arrivals([s for s in arrived if not s.inputs])
        if self._embedding:
            with stage("embedding"):
                self._embed_chunk()
        if self._long:
            with stage("prefill"):
                self._prefill_chunk()
        self._flush_unless_sampling_will()  # first tokens go out before the next step
        with stage("cutting"):
            self._cut_ended()
        if self._batch and not stop:
            self._decode_step()
            with stage("cutting"):
                self._cut_ended()
        self._check_accounts()
        return not stop

    def _next_inbox(self, block: bool):
        try:
            return self._inbox.get(block=block)
        except queue.Empty:
            return None

    def _admit(self) -> tuple[list[_Sequence], bool]:
        """Take waiting requests between steps (block only when idle) and prepare them.
        Returns (the prepared ones, whether the engine is told to stop)."""
        arrived: list[_Sequence] = []
        while len(self._live) < self.max_batch:
            idle = not self._live
            if idle:
                self._flush()  # nothing may wait in the outbox while we sleep
            try:
                with self.clock.stage("waiting" if idle else "admitting"):
                    stream = self._inbox.get(block=idle)
            except queue.Empty:
                break
            if stream is None:
                return arrived, True
            seq = _Sequence(stream)
            self._live[stream.id] = seq
            if stream.cancelled:
                self._end(seq, "cancelled")
                continue
            try:
                self._prepare(seq)
            except RequestInvalid as exc:
                self._end(seq, "error", error=str(exc), client_error=True)
                continue
            except Exception as exc:
                self._fail([seq], exc, "preparing the prompt")
                continue
            arrived.append(seq)
        return arrived, False

    def _prepare(self, seq: _Sequence) -> None:
        """Tokenise and check one request; raises RequestInvalid when it cannot be served."""
        import sampling
        from textstream import Detokenizer, StopMatcher

        req = seq.stream.request
        context = self._facts.context_length
        if req.embed_inputs is not None:
            seq.inputs = [self._embedding_ids(i, req.truncate, context) for i in req.embed_inputs]
            seq.prompt_ids = [t for ids in seq.inputs for t in ids]  # counted as prompt tokens
            return
        try:
            ids = self._prompts.encode(req)
        except ValueError as exc:
            raise RequestInvalid(f"could not build the prompt: {exc}") from None
        seq.prompt_ids = ids
        if not ids:
            raise RequestInvalid("the prompt is empty after tokenising")
        if len(ids) >= context:
            raise RequestInvalid(f"prompt is {len(ids)} tokens; the model's context is {context} tokens")
        want = req.max_tokens if req.max_tokens is not None else self.default_max_tokens
        if want < 0:
            want = context
        seq.max_tokens = min(want, context - len(ids))
        seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(63)
        seq.sampler = sampling.RowSampler(req.sampling, seed, ids, self._row_grammar(req))
        continues = req.messages is None and (req.raw or not self._prompts.has_template)
        seq.detok = Detokenizer(self._runner.codec.backend, ids if continues else ())
        seq.stopper = StopMatcher(req.stop, req.calls_start)
        loaded_ns = self._started_ns + int(self._facts.load_seconds * 1e9)
        seq.load_ns = max(0, loaded_ns - seq.stream.submitted_ns)

    def _row_grammar(self, req: GenerationRequest):
        """The request's parser, or None when unconstrained: a copy of the matcher compiled
        before it was queued, else (submitted before the model loaded) compiled here."""
        constraint = req.constraint
        if constraint is None:
            return None
        import constraints

        if self._grammars is None:  # not built at load (it failed there): try again now
            self._grammars = self._new_grammars()
        try:
            return self._grammars.row(constraint, req.compiled)
        except constraints.ConstraintInvalid as exc:
            raise RequestInvalid(f"{constraint.name}: {exc}") from None

    def _embedding_ids(self, value, truncate: bool, context: int) -> list[int]:
        ids = self._prompts.encode_plain(value) if isinstance(value, str) else list(value)
        if not ids:
            raise RequestInvalid("an input to embed is empty")
        if any(not 0 <= t < self._prompts.vocab_size for t in ids):
            raise RequestInvalid(f"token ids must be in [0, {self._prompts.vocab_size})")
        if len(ids) > context:
            if not truncate:
                raise RequestInvalid(f"an input is {len(ids)} tokens; the model's context is {context} tokens")
            ids = ids[:context]
        return ids

    def _embed_chunk(self) -> None:
        """Advance the oldest embedding request by one chunk of its current input, as a
        long prompt is prefilled, so streams keep flowing and a client that left stops
        it at the next chunk (in one pass, a 4,000-token input held every other request
        for 14-20 s); each input alone, so its vector never depends on what else is
        computed."""
        seq = self._embedding[0]
        if seq.stream.cancelled:
            self._embedding.pop(0)
            self._end(seq, "cancelled")
            return
        started = time.monotonic_ns()
        try:
            if seq.partial is None:
                seq.partial = self._runner.begin_embedding(seq.inputs[len(seq.vectors)])
            vector = self._runner.advance_embedding(seq.partial, self.PREFILL_CHUNK)
        except Exception as exc:
            self._embedding.pop(0)
            self._fail([seq], exc, "embedding")
            return
        seq.prompt_eval_ns += time.monotonic_ns() - started
        if vector is None:
            return
        seq.partial = None
        seq.vectors.append(vector)
        if len(seq.vectors) == len(seq.inputs):
            self._embedding.pop(0)
            self._end(seq, "stop")

    def _prefill_arrivals(self, arrived: list[_Sequence]) -> None:
        short = [s for s in arrived if len(s.prompt_ids) <= self.PREFILL_CHUNK]
        for seq in arrived:
            if len(seq.prompt_ids) > self.PREFILL_CHUNK:
                try:
                    seq.partial = self._runner.begin(seq.prompt_ids)
                except Exception as exc:
                    self._fail([seq], exc, "prefill")
                    continue
                self._long.append(seq)
        for group in self._prefill_groups(short):
            started = time.monotonic_ns()
            try:
                logits = self._runner.prefill([s.prompt_ids for s in group])
            except Exception as exc:  # the runner's batch is as it was: only this group fails
                self._fail(group, exc, "prefill")
                continue
            self._joined(group, logits, time.monotonic_ns() - started)

    def _prefill_groups(self, seqs: list[_Sequence]) -> list[list[_Sequence]]:
        """Requests that arrived together are prefilled together, unless padding the
        shorter prompts to the longest would waste more than a quarter of the work. A
        runner whose eager pass costs its launches rather than its size (a GPU) pads
        freely up to its `free_padding` tokens: one pass instead of one per length."""
        free = getattr(self._runner, "free_padding", 0)
        groups: list[list[_Sequence]] = []
        for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
            group = groups[-1] if groups else None
            if group is not None:
                longest = len(seq.prompt_ids)
                real = sum(len(s.prompt_ids) for s in group) + longest
                if longest * (len(group) + 1) <= max(1.25 * real, free):
                    group.append(seq)
                    continue
            groups.append([seq])
        return groups

    def _prefill_chunk(self) -> None:
        """Advance the oldest long prefill by one chunk; it joins the batch when done."""
        seq = self._long[0]
        if seq.stream.cancelled:
            self._long.pop(0)
            self._end(seq, "cancelled")
            return
        started = time.monotonic_ns()
        try:
            logits = self._runner.advance(seq.partial, self.PREFILL_CHUNK)
        except Exception as exc:
            self._long.pop(0)
            self._fail([seq], exc, "chunked prefill")
            return
        seq.prompt_eval_ns += time.monotonic_ns() - started
        if logits is not None:
            self._long.pop(0)
            seq.partial = None
            self._joined([seq], logits, 0)

    def _joined(self, group: list[_Sequence], logits, prefill_ns: int) -> None:
        """Prefilled rows have joined the runner's batch: sample their first tokens."""
        for seq in group:
            seq.prompt_eval_ns += prefill_ns
            self._batch.append(seq)
        self._sample(group, logits)

    def _decode_step(self) -> None:
        """One decode step of the batch. Pipelined (a GPU runner whose decode takes the
        sampled tokens where they are): step N+1 is launched from step N's tokens still
        on the device, and the host reads and takes them (text, stop strings, ends)
        while the device computes it; the rows that ended then leave, and step N+1's
        sampling is launched for the rest, to be read in the next step. A row that ended
        at N has computed one step for nothing. Without it, ~2 ms of the host's work a
        step at 256 rows left the device idle (bench/engine_rate.py's streaming stage)."""
        self.decode_steps += 1
        self.decoded_rows += len(self._batch)
        launched, self._launched = self._launched, None
        try:
            with self.clock.stage("decode"):  # on a GPU: launching it; sampling waits for it
                logits = self._runner.decode(self._step_tokens(launched))
        except Exception as exc:
            # The batch's cache is suspect: end its requests and start clean.
            self._fail(self._batch, exc, "decode")
            self._batch = []
            self._runner.reset()
            return
        if not self._pipelined:
            self._sample(self._batch, logits)
            return
        self._flush()  # first tokens of rows that joined, while the device computes
        if launched is not None:
            self._read_and_take(*launched)
        with self.clock.stage("cutting"):
            kept = self._cut_ended()
        if self._batch:
            import sampling

            self._launch_sampling(list(self._batch), logits if kept is None else sampling.rows_of(logits, kept))
        self._flush()  # the text of the tokens just taken, while the device computes

    def _step_tokens(self, launched):
        """The batch's next tokens: the host's, or (pipelined) the last step's sampled
        tokens still on the device, then the host's of the rows that joined since."""
        if launched is None:
            return [s.pending for s in self._batch]
        import sampling

        rows, sampled = launched
        if len(rows) > len(self._batch) or any(a is not b for a, b in zip(rows, self._batch)):
            raise RuntimeError("the launched tokens are not the batch's first rows")
        return sampling.followed_by(sampled.on_device(), [s.pending for s in self._batch[len(rows):]])

    def _launch_sampling(self, seqs: list[_Sequence], logits) -> None:
        """Launch the batch's sampling, to be read in the next step; if that fails,
        sample now, row by row (_sample)."""
        import sampling

        with self.clock.stage("sampling"):
            try:
                self._launched = (seqs, sampling.launch_rows(logits, [s.sampler for s in seqs]))
                return
            except Exception as exc:
                _log_batch_sampling_failure(len(seqs), exc)
        self._sample(seqs, logits)

    def _read_and_take(self, seqs: list[_Sequence], sampled) -> None:
        """Read launched tokens (waiting for their sampling, not for a step launched
        after it) and take them."""
        with self.clock.stage("sampling"):
            try:
                tokens = sampled.read()
            except Exception as exc:
                self._fail(seqs, exc, "sampling")
                return
        with self.clock.stage("streaming"):
            for seq, token in zip(seqs, tokens):
                if not seq.ended:
                    self._take(seq, token)

    def _drain(self) -> None:
        """Take the launched tokens now (before the batch changes under them)."""
        if self._launched is not None:
            launched, self._launched = self._launched, None
            self._read_and_take(*launched)

    def _sample(self, seqs: list[_Sequence], logits) -> None:
        """The next token of every row at once (logits [rows, vocab]); if that fails,
        row by row, so a failure ends only the rows it belongs to."""
        import sampling

        hand_off = self._flush if self._asynchronous else None
        with self.clock.stage("sampling"):
            try:
                tokens = sampling.sample_rows(logits, [s.sampler for s in seqs], before_waiting=hand_off)
            except Exception as exc:
                _log_batch_sampling_failure(len(seqs), exc)
                tokens = []
                for row, seq in enumerate(seqs):
                    try:
                        tokens += sampling.sample_rows(logits[row:row + 1], [seq.sampler],
                                                       before_waiting=hand_off)
                    except Exception as exc:
                        self._fail([seq], exc, "sampling")
                        tokens.append(None)
        with self.clock.stage("streaming"):  # detokenising, stop strings, the outbox
            for seq, token in zip(seqs, tokens):
                if token is not None:
                    self._take(seq, token)

    def _take(self, seq: _Sequence, token: int) -> None:
        """Take `seq`'s next token and stream its text; a failure ends `seq` alone."""
        try:
            seq.sampler.accept(token)
            if not seq.first_token_ns:
                seq.first_token_ns = time.monotonic_ns()
            if token in self._runner.eos_ids:
                text, _ = seq.stopper.feed(seq.detok.flush())
                self._emit(seq, text)
                self._end(seq, "stop")
                return
            seq.completion_tokens += 1
            text = seq.detok.step(token)
            if seq.sampler.complete or seq.completion_tokens >= seq.max_tokens:
                text += seq.detok.flush()  # the last token: nothing will complete what it holds
            text, hit = seq.stopper.feed(text)
            self._emit(seq, text)
            if hit or seq.sampler.complete:
                self._end(seq, "stop")
            elif seq.completion_tokens >= seq.max_tokens:
                self._end(seq, "length")
            else:
                seq.pending = token
        except Exception as exc:
            self._fail([seq], exc, "sampling")

    def _cut_ended(self) -> list[int] | None:
        """Cancelled requests end here (prefilling or embedding too); rows that ended leave the runner's batch.
        Returns the rows kept, in their new order (None: all stay where they are)."""
        for waiting in (self._long, self._embedding):
            # Not only the one at the front, which its next chunk checks: one behind it
            # would keep its slot (and its partial cache) until every prompt before it
            # was prefilled, and end only then.
            for seq in [s for s in waiting if s.stream.cancelled]:
                waiting.remove(seq)
                self._end(seq, "cancelled")
        if self._launched is not None and any(s.stream.cancelled or s.ended for s in self._batch):
            self._drain()  # the launched tokens are these rows': take them first
        for seq in self._batch:
            if seq.stream.cancelled:
                self._end(seq, "cancelled")
        kept = [i for i, s in enumerate(self._batch) if not s.ended]
        if len(kept) == len(self._batch):
            return None
        keep = holes_filled_from_the_end(kept)
        try:
            self._runner.keep(keep)
        except Exception as exc:
            self._fail(self._batch, exc, "cutting ended rows")
            keep = []
            self._runner.reset()
        self._batch = [self._batch[i] for i in keep]
        return keep

    def _check_accounts(self) -> None:
        """Every live request is in the batch, a long prefill or an embedding, and the
        batch is the runner's: anything else is a bug, and ends those requests rather
        than hang them."""
        placed = {id(s) for s in self._batch + self._long + self._embedding}
        lost = [s for s in self._live.values() if id(s) not in placed]
        if lost:
            self._fail(lost, RuntimeError("request lost by the scheduler"), "scheduling")
        if self._runner.rows != len(self._batch):
            self._fail(self._batch, RuntimeError(f"runner has {self._runner.rows} rows for "
                                                 f"{len(self._batch)} requests"), "scheduling")
            self._batch = []
            self._runner.reset()
