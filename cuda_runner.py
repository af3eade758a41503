"""The runner for a GPU: our Llama forward (llama_runner.LlamaModel) on the device, with
static shapes, so that a decode step replays as one CUDA graph.

Why: launched op by op from Python, a step of this small model costs about the same at
batch 1 as at batch 256 on an H100 (transformers' eager loop: 97 ms and 70 ms a step;
captured in CUDA graphs: 2.4 ms and 5.1 ms, issue 13).

- One KV cache allocated at load: a slot per batch row (`--max-batch`, or as many as
  fit in the GPU's memory, up to 256), each as long as the context served. Rows 0..n-1
  of the batch are slots 0..n-1; when rows end, the last rows move into their slots
  (one device copy of each moved row's used positions).
- A decode step runs at a batch bucket (1, 2, 4, ..., >= the rows) and a span bucket
  (256, 512, ..., >= the longest row), padding rows beyond the batch with position 0 of
  free slots. Each pair is captured once at load as a CUDA graph, with whichever of
  two decode attentions replays faster there (DecodeGraphs).
- Prefill runs eagerly (its shapes vary): the new prompts of a step in one padded pass,
  straight into their slots.

Without CUDA (`--runner static` on the CPU, and the tests) the same code runs with no
graphs. No threads, no asyncio.
"""

from __future__ import annotations

import logging
import math
import time

import torch

from llama_runner import (SPAN_BUCKET, KVRows, LlamaModel, PartialEmbedding, PartialPrefill, all_start_with,
                          give_back_freed_memory, read_folder)
from transfer import to_device

log = logging.getLogger("minivault.cuda")

SMALLEST_SPAN = 256  # decode attention spans: 256, 512, ... (a multiple of SPAN_BUCKET)
KV_MEMORY_SHARE = 0.85  # of the GPU memory free after loading the weights (vLLM takes 0.9 of all)
MIN_GPU_SLOTS = 8
# Padded prompt tokens a prefill may hold before padding counts (engine._prefill_groups):
# an eager pass on an H100 costs its ~700 launches, not its size, at these sizes
# (transformers' eager step: 97 ms at batch 1, 70 ms at 256, issue 13).
GPU_FREE_PADDING = 4096
CPU_SLOT_POSITIONS = 2048
TIMED_REPLAYS = 10  # per attention and (batch, span) pair at load
FUSED_MARGIN = 0.05  # the fused attention serves a pair only where it is this much faster


def batch_bucket(rows: int, slots: int) -> int:
    """The rows a step computes: the next power of two, or all the slots (a --max-batch
    that is no power of two has no slots to pad up to the next one)."""
    return min(slots, 1 << max(0, rows - 1).bit_length())


def span_buckets(capacity: int) -> list[int]:
    spans, span = [], SMALLEST_SPAN
    while span < capacity:
        spans.append(span)
        span *= 2
    return spans + [capacity]


class CudaCapture:
    """Captures a step as a CUDA graph (graphs share one memory pool: they never run at
    once). Returns (replay, output): replay() recomputes output in place."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, step):
        serving = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(serving)
        with torch.cuda.stream(side):  # warm-up runs, as torch.cuda.graphs asks
            for _ in range(2):
                step()
        serving.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                output = step()
        except Exception:
            # A capture that fails ends in capture_end raising, before torch.cuda.graph
            # puts the stream it captured on back: serve on ours again.
            torch.cuda.set_stream(serving)
            torch.cuda.synchronize()
            raise
        return graph.replay, output

    @staticmethod
    def seconds(replay, repeats: int = TIMED_REPLAYS) -> float:
        """A replay's device time, the mean of `repeats` after two unmeasured ones."""
        replay()
        replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats


class EagerCapture:
    """CudaCapture's contract without a GPU (tests): replay runs the step again into
    the same output tensor."""

    def __call__(self, step):
        output = step()
        return (lambda: output.copy_(step())), output

    @staticmethod
    def seconds(replay, repeats: int = TIMED_REPLAYS) -> float:
        started = time.perf_counter()
        for _ in range(repeats):
            replay()
        return (time.perf_counter() - started) / repeats


eager_capture = EagerCapture()


class DecodeGraphs:
    """A decode step captured for every (batch bucket, span bucket); inputs are copied
    into each batch bucket's static tensors, and a replay leaves the logits in that
    capture's own output tensor.

    Two decode attentions compute the same values (LlamaModel._attend_one): two
    matmuls, a mask add and a softmax, or one fused kernel (90 fewer a step). Which is
    faster depends on the rows and the span (the fused kernel runs a block per key head
    and row), and on the GPU: with `attentions` (False, True), each pair is captured
    both ways and the faster replay is kept, unless the fused one gains under
    FUSED_MARGIN. `timings` keeps both times of each pair, `fused` the pairs that use it.
    """

    def __init__(self, model: LlamaModel, cache: KVRows, max_batch: int, capacity: int, capture,
                 attentions: tuple[bool, ...] = (False,)):
        self.model, self.cache = model, cache
        self.inputs: dict[int, tuple] = {}
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.timings: dict[tuple[int, int], dict[bool, float]] = {}
        self.fused: set[tuple[int, int]] = set()
        self._attentions = attentions
        started = time.monotonic()
        for rows in sorted({batch_bucket(n, max_batch) for n in range(1, max_batch + 1)}):
            self.inputs[rows] = (torch.zeros(rows, 1, dtype=torch.long, device=model.device),
                                 torch.zeros(rows, 1, dtype=torch.long, device=model.device))
            for span in span_buckets(capacity):
                self.graphs[(rows, span)] = self._fastest(rows, span, capture)
        log.info("captured %d decode graphs in %.1f s%s", len(self.graphs), time.monotonic() - started,
                 f" (the fused attention in {len(self.fused)}, faster there)" if len(self._attentions) > 1 else "")

    def _fastest(self, rows: int, span: int, capture):
        served = self.model.fused_decode_attention
        candidates = {}
        try:
            for fused in self._attentions:
                self.model.fused_decode_attention = fused
                try:
                    candidates[fused] = capture(lambda: self._step(rows, span))
                except Exception as exc:  # another GPU, another torch: serve the matmuls
                    if not fused or len(self._attentions) == 1:
                        raise
                    log.warning("the fused decode attention could not be captured (%r): two matmuls serve", exc)
                    self._attentions = (False,)
        finally:
            self.model.fused_decode_attention = served
        if len(candidates) == 1:
            return next(iter(candidates.values()))
        times = self.timings[(rows, span)] = {fused: capture.seconds(replay) for fused, (replay, _) in
                                              candidates.items()}
        if times[True] < times[False] * (1 - FUSED_MARGIN):
            self.fused.add((rows, span))
            return candidates[True]
        return candidates[False]

    def _step(self, rows: int, span: int):
        tokens, positions = self.inputs[rows]
        return self.model.decode_logits(tokens, positions, self.cache.kv[:, :, :rows], span)

    def run(self, tokens, positions, span: int):
        """Logits for tokens and positions [rows, 1], rows a batch bucket."""
        static_tokens, static_positions = self.inputs[tokens.shape[0]]
        static_tokens.copy_(tokens)
        static_positions.copy_(positions)
        replay, logits = self.graphs[(tokens.shape[0], span)]
        replay()
        return logits


class StaticRunner:
    """The runner interface (runner.py) over LlamaModel with a static KV cache."""

    def __init__(self, model: LlamaModel, codec, config: dict, dtype: str, eos_ids: frozenset[int],
                 parameters: int, max_batch: int, capacity: int, capture=None,
                 attentions: tuple[bool, ...] = (False,)):
        self.model = model
        self.codec = codec
        self.dtype = dtype
        self.device = str(model.device)
        self.architecture = config.get("model_type", "llama")
        self.eos_ids = eos_ids
        self.parameters = parameters
        self.max_batch = max_batch
        self.capacity = capacity  # positions a slot holds: a whole number of SPAN_BUCKETs
        self._spans = span_buckets(capacity)  # a decode step attends over the first that holds its rows
        self.context_length = min(capacity, model.context)
        self._cache = model.new_cache(rows=max_batch, capacity=capacity)
        self._lengths: list[int] = []
        self._prefix: tuple[list[int], KVRows] | None = None
        self.free_padding = GPU_FREE_PADDING if self.device.startswith("cuda") else 0
        self.asynchronous = self.device.startswith("cuda")  # kernels are queued; sampling's .cpu() waits
        # decode takes the last sampled tokens where they are (a device tensor), so the
        # engine launches step N+1 before it reads step N's tokens (engine._decode_step)
        self.pipelined = self.asynchronous
        # capture: CudaCapture() on a GPU; None computes each step eagerly.
        self._graphs = DecodeGraphs(model, self._cache, max_batch, capacity, capture, attentions) if capture else None

    @property
    def rows(self) -> int:
        return len(self._lengths)

    def reset(self) -> None:
        self._lengths = []

    def _slots(self, first: int, count: int, lengths: list[int]) -> KVRows:
        """Slots first..first+count-1 of the static cache as a KVRows (a view: writes land
        in the cache)."""
        if first + count > self.max_batch:
            raise RuntimeError(f"{first + count} rows for {self.max_batch} slots")
        return KVRows.over(self._cache.kv[:, :, first:first + count], lengths)

    def _known(self, *prompts: list[int]) -> None:
        # An id past the embedding table is a device-side assert on a GPU, which leaves
        # the whole CUDA context unusable: refuse it here, for this request alone.
        vocab = self.model.embed.shape[0]
        if any(not 0 <= t < vocab for p in prompts for t in p):
            raise ValueError(f"token ids must be in [0, {vocab})")

    def _fits(self, prompts: list[list[int]]) -> None:
        self._known(*prompts)
        # A prefill span past the slots' length would make KVRows.ensure reallocate the
        # view, away from the cache: refuse it instead.
        longest = max(len(p) for p in prompts)
        if longest >= self.context_length or math.ceil(longest / SPAN_BUCKET) * SPAN_BUCKET > self.capacity:
            raise RuntimeError(f"a prompt of {longest} tokens does not fit {self.context_length} positions")

    @torch.inference_mode()
    def remember_prefix(self, ids: list[int]) -> None:
        self._prefix = (list(ids), self.model.cached(ids))

    def _seed(self, rows: KVRows, prompts: list[list[int]]) -> None:
        """Copy the shared prefix into fresh rows when every prompt starts with it."""
        if self._prefix is None:
            return
        ids, cached = self._prefix
        if all_start_with(prompts, ids):
            n = len(ids)
            rows.kv[:, :, :, :, :n] = cached.kv[:, :, :, :, :n]
            rows.lengths = [n] * len(prompts)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]):
        self._fits(prompts)
        rows = self._slots(self.rows, len(prompts), [0] * len(prompts))
        self._seed(rows, prompts)
        rests = [p[n:] for p, n in zip(prompts, rows.lengths)]
        width = max(len(r) for r in rests)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rests])
        logits = self.model.forward(tokens, rows, [len(r) - 1 for r in rests])
        self._lengths += rows.lengths
        return logits

    def begin(self, prompt: list[int]) -> PartialPrefill:
        self._fits([prompt])
        cache = self.model.new_cache(rows=1, capacity=self._prefix[1].capacity if self._prefix else 0)
        self._seed(cache, [prompt])
        return PartialPrefill(prompt, cache)

    @torch.inference_mode()
    def advance(self, partial: PartialPrefill, tokens: int):
        done = partial.cache.lengths[0]
        chunk = partial.prompt[done:done + tokens]
        logits = self.model.forward(torch.tensor([chunk]), partial.cache, [len(chunk) - 1])
        length = partial.cache.lengths[0]
        if length < len(partial.prompt):
            return None
        slot = self._slots(self.rows, 1, [length])
        slot.kv[:, :, :, :, :length] = partial.cache.kv[:, :, :, :, :length]
        self._lengths.append(length)
        return logits

    @torch.inference_mode()
    def decode(self, tokens):
        """Logits [rows, vocab] for each row's next token: a list of ids, or a long
        tensor [rows] on the device (the sampling's output, not yet read by the host)."""
        if len(tokens) != self.rows:
            raise ValueError(f"{len(tokens)} tokens for a batch of {self.rows} rows")
        rows = batch_bucket(self.rows, self.max_batch)
        longest = max(self._lengths) + 1
        if longest > self.context_length:
            raise RuntimeError(f"a row would pass the {self.context_length} positions of its slot")
        span = next(s for s in self._spans if s >= longest)
        pad = [0] * (rows - len(tokens))  # rows past the batch: position 0 of free slots
        device = self.model.device
        if isinstance(tokens, torch.Tensor):
            padded = (torch.cat([tokens, tokens.new_zeros(len(pad))]) if pad else tokens).unsqueeze(1)
        else:
            padded = to_device(tokens + pad, device).unsqueeze(1)
        positions = to_device(self._lengths + pad, device).unsqueeze(1)
        if self._graphs is not None:
            logits = self._graphs.run(padded, positions, span)
        else:
            logits = self.model.decode_logits(padded, positions, self._cache.kv[:, :, :rows], span)
        self._lengths = [n + 1 for n in self._lengths]
        return logits[:len(tokens)]

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        """Only rows whose place changes move. The engine fills the places of rows that
        ended with the last rows, so no row moves onto one still to be moved: each is one
        copy of its used positions, with no temporary (gathering them all first would
        hold every moved row at once, ~23 GB for 128 rows of 8k positions)."""
        moves = [(i, r) for i, r in enumerate(rows) if r != i]
        kv = self._cache.kv
        if not {r for _, r in moves} & {i for i, _ in moves}:
            for i, r in moves:
                used = self._lengths[r]
                kv[:, :, i, :, :used] = kv[:, :, r, :, :used]
        else:  # another order, with cycles: read every moved row before writing any
            places, sources = zip(*moves)
            used = max(self._lengths[r] for r in sources)
            to, source = to_device(places, kv.device), to_device(sources, kv.device)
            kv[:, :, to, :, :used] = kv[:, :, source, :, :used]
        self._lengths = [self._lengths[r] for r in rows]

    def begin_embedding(self, ids: list[int]) -> PartialEmbedding:
        self._known(ids)
        return self.model.begin_embedding(ids)

    @torch.inference_mode()
    def advance_embedding(self, partial: PartialEmbedding, tokens: int) -> list[float] | None:
        return self.model.advance_embedding(partial, tokens)


def slot_plan(model: LlamaModel, max_batch: int, fixed: bool = True) -> tuple[int, int]:
    """(slots, positions per slot), a multiple of SPAN_BUCKET. On a GPU the cache takes
    KV_MEMORY_SHARE of the memory free after the weights. `fixed` false (no --max-batch
    given): max_batch is an upper bound, and the slots are as many of the whole context
    as fit (a power of two, at least MIN_GPU_SLOTS). A slot is shortened only where the
    slots do not fit whole. On the CPU: max_batch slots of at most CPU_SLOT_POSITIONS."""
    context = math.ceil(model.context / SPAN_BUCKET) * SPAN_BUCKET
    if not str(model.device).startswith("cuda"):
        # On the CPU this runner is the GPU's code under test: 8 float32 slots of the
        # embedded model's whole 8,192 positions would hold 3 GB.
        return max_batch, min(context, CPU_SLOT_POSITIONS)
    per_position = 2 * model.layers * model.kv_heads * model.head_dim * torch.finfo(model.cache_dtype).bits // 8
    torch.cuda.empty_cache()  # the float32 copies made while loading count as used until then
    free, _ = torch.cuda.mem_get_info(torch.device(model.device))
    budget = int(free * KV_MEMORY_SHARE)
    slots = max_batch
    if not fixed:
        whole = budget // (per_position * context)
        slots = min(max_batch, max(MIN_GPU_SLOTS, 1 << max(0, whole.bit_length() - 1)))
    fits = budget // (per_position * slots)
    capacity = min(context, fits // SPAN_BUCKET * SPAN_BUCKET)
    if capacity < SPAN_BUCKET:
        raise RuntimeError(f"--max-batch {slots}: the GPU's free memory ({free / 2 ** 30:.1f} GiB) holds "
                           f"{fits} cached positions a row; use a smaller --max-batch")
    return slots, capacity


def load_folder(folder, dtype: str, device: str, max_batch: int, capture=None,
                fixed_batch: bool = True, attention: str | None = None) -> StaticRunner | None:
    """A StaticRunner from a servable folder (None if its tokenizer needs transformers).
    `dtype` `auto` is bfloat16 on a GPU (weights, cache) and float32 on the CPU. Decode
    steps are CUDA graphs on a GPU, eager elsewhere, unless `capture` says otherwise.
    Slots: slot_plan's (`fixed_batch` false: max_batch is an upper bound).
    `attention` (DecodeGraphs): `matmuls`, `fused`, or `fastest` of the two for each
    captured (batch, span) pair; by default `fastest` on a GPU, `matmuls` elsewhere."""
    read = read_folder(folder)
    if read is None:
        return None
    config, weights, codec, eos, parameters = read
    gpu = device.startswith("cuda")
    if dtype == "auto":
        dtype = "bfloat16" if gpu else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise RuntimeError(f"--dtype {dtype}: the static runner serves bfloat16 or float32 "
                           f"(int8, int4 and fbgemm float16 are CPU kernels)")
    if gpu and torch.device(device).index is not None:
        # Graphs are captured on, and kernels launched to, the thread's current device:
        # make it this one (the model thread loads and steps; cuda:1 must not run on 0).
        torch.cuda.set_device(torch.device(device))
    if gpu:
        # scaled_dot_product_attention goes to cuDNN's kernels for bfloat16 on Hopper with
        # a recent cuDNN, ahead of the memory-efficient one the tests and the timings
        # assume; cuDNN's has failed to plan some shapes (pytorch #122695, #138529): a
        # prefill that raises would end every request.
        torch.backends.cuda.enable_cudnn_sdp(False)
    cache_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = LlamaModel(config, weights, dtype, device=device, cache_dtype=cache_dtype, activations=cache_dtype,
                       fused_decode_attention=attention == "fused")
    del weights, read
    give_back_freed_memory()
    slots, capacity = slot_plan(model, max_batch, fixed_batch)
    if capacity < model.context:
        log.warning("slots hold %d positions each (the model's context is %d): %s", capacity, model.context,
                    f"the GPU's memory for {slots} rows" if gpu else "the static runner's limit on the CPU")
    attention = attention or ("fastest" if gpu else "matmuls")
    attentions = {"matmuls": (False,), "fused": (True,), "fastest": (False, True)}[attention]
    return StaticRunner(model, codec, config, dtype, eos, parameters, slots, capacity,
                        capture=capture or (CudaCapture() if gpu else None), attentions=attentions)
