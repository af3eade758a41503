"""cuda_runner.py's shapes without a GPU: the batch and span buckets a decode step is
captured at, and the slots a prefill may not overrun."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import cuda_runner
from cuda_runner import batch_bucket, span_buckets


def test_batch_buckets_are_powers_of_two_at_or_above_the_rows_within_the_slots():
    assert [batch_bucket(n, 512) for n in (1, 2, 3, 5, 8, 9, 200, 256, 257)] == [1, 2, 4, 8, 8, 16, 256, 256, 512]
    assert [batch_bucket(n, 100) for n in (1, 3, 64, 65, 100)] == [1, 4, 64, 100, 100]
    # past 1,024 rows too: a few buckets for many slots, not one for each row count
    assert [batch_bucket(n, 4096) for n in (1025, 2000, 2049, 4096)] == [2048, 2048, 4096, 4096]
    assert len({batch_bucket(n, 3000) for n in range(1, 3001)}) == 13


def test_a_batch_as_large_as_slots_that_are_no_power_of_two_decodes(tiny_llama_folder):
    """--max-batch 3: three rows step at bucket 3 (there is no fourth slot to pad into)."""
    for capture in (None, cuda_runner.eager_capture):
        runner = cuda_runner.load_folder(tiny_llama_folder, "float32", "cpu", max_batch=3, capture=capture)
        runner.prefill([[5, 6, 7], [8, 9], [10]])
        assert runner.decode([1, 2, 3]).shape[0] == 3
        assert capture is None or sorted({rows for rows, _ in runner._graphs.graphs}) == [1, 2, 3]


def test_span_buckets_double_from_256_and_end_at_the_slot_length():
    assert span_buckets(256) == [256]
    assert span_buckets(2048) == [256, 512, 1024, 2048]
    assert span_buckets(7936) == [256, 512, 1024, 2048, 4096, 7936]  # a slot shortened to fit the GPU


def test_a_prompt_that_would_overrun_its_slot_is_refused_and_the_batch_is_kept(tiny_llama_folder):
    runner = cuda_runner.load_folder(tiny_llama_folder, "float32", "cpu", max_batch=2)
    runner.prefill([[5, 6, 7]])
    with pytest.raises(RuntimeError):
        runner.prefill([list(range(1, runner.context_length + 1))])
    with pytest.raises(RuntimeError):
        runner.prefill([[1, 2], [3, 4]])  # two more rows for one free slot
    assert runner.rows == 1 and runner.decode([8]).shape[0] == 1


def test_bfloat16_keeps_its_activations_and_tracks_float32_logits(tiny_llama_folder):
    """What a GPU serves by default, run on the CPU: a layer's work, its rotary table and
    the cache in bfloat16 (no conversion around each matmul), the residual stream and
    the logits float32, close to the float32 runner's through a prefill and decode
    steps with a cut."""
    import torch

    exact = cuda_runner.load_folder(tiny_llama_folder, "float32", "cpu", max_batch=4)
    half = cuda_runner.load_folder(tiny_llama_folder, "bfloat16", "cpu", max_batch=4,
                                   capture=cuda_runner.eager_capture)
    model = half.model
    assert model.activations == torch.bfloat16 and model.norm.dtype == torch.float32
    assert model.cos.dtype == torch.bfloat16 and half._cache.kv.dtype == torch.bfloat16
    prompts = [[5, 17, 33, 2, 9], [40, 41], [7, 8, 9, 10, 11, 12]]
    pairs = [(exact.prefill(prompts), half.prefill(prompts))]
    tokens = [int(t) for t in pairs[0][0].argmax(-1)]
    for step in range(4):
        if step == 2:
            exact.keep([2, 0])
            half.keep([2, 0])
            tokens = [tokens[2], tokens[0]]
        # clone: a replayed step's logits are valid until the next step
        pairs.append((exact.decode(tokens), half.decode(tokens).clone()))
        tokens = [int(t) for t in pairs[-1][0].argmax(-1)]
    for want, got in pairs:
        assert got.dtype == torch.float32 and got.shape == want.shape
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() > 0.999


# Ops that make the host wait for the device (a value read back, or an output whose
# shape depends on the data) or copy host memory in: a CUDA graph cannot capture them.
HOST_BOUND_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default",
                  "aten.is_nonzero.default", "aten.equal.default", "aten.repeat_interleave.Tensor",
                  "aten.lift_fresh.default", "aten._unique2.default", "aten.unique_consecutive.default"}


@pytest.mark.parametrize("device,dtype", [("cpu", "float32"), pytest.param("cuda", "bfloat16", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU"))])
def test_fused_decode_attention_computes_what_the_two_matmuls_do(tiny_llama_folder, device, dtype):
    """bench/gpu.py's other decode attention (one scaled_dot_product_attention, each key
    head's query heads as its query positions): the same logits as the matmul path
    through a prefill, decode steps and a cut, with every row seeing only its own
    positions. On a GPU: in bfloat16, as served, each step a replayed CUDA graph, the
    attention kernels whichever torch picks there (rounded apart: close, not equal)."""
    import torch

    capture = cuda_runner.eager_capture if device == "cpu" else None
    runners = [cuda_runner.load_folder(tiny_llama_folder, dtype, device, max_batch=4, attention=attention,
                                       capture=capture) for attention in ("matmuls", "fused")]
    assert [r.model.fused_decode_attention for r in runners] == [False, True]
    prompts = [[5, 17, 33, 2, 9], [40, 41], [7, 8, 9, 10, 11, 12]]
    pairs = [tuple(r.prefill(prompts) for r in runners)]
    tokens = [int(t) for t in pairs[0][0].argmax(-1)]
    for step in range(4):
        if step == 2:
            for r in runners:
                r.keep([2, 0])
            tokens = [tokens[2], tokens[0]]
        pairs.append(tuple(r.decode(tokens).clone() for r in runners))
        tokens = [int(t) for t in pairs[-1][0].argmax(-1)]
    for matmuls, fused in pairs:
        if dtype == "float32":
            torch.testing.assert_close(fused, matmuls, rtol=1e-5, atol=1e-5)
        else:
            assert torch.nn.functional.cosine_similarity(fused, matmuls, dim=-1).min() > 0.999


class TimedCapture(cuda_runner.EagerCapture):
    """Eager capture whose replays 'take' a set time: the fused attention is faster for
    one or two rows only, and its captures can be made to fail."""

    def __init__(self, model=None, fail_fused=False):
        self.model, self.fail_fused = model, fail_fused
        self.times = {}

    def __call__(self, step):
        fused = self.model.fused_decode_attention
        if fused and self.fail_fused:
            raise RuntimeError("operation not permitted when stream is capturing")
        replay, output = super().__call__(step)
        self.times[replay] = 1.0 if not fused else 0.5 if self.rows <= 2 else 2.0
        return replay, output

    def seconds(self, replay, repeats=1):
        return self.times[replay]


def graphs_timed(runner, capture: TimedCapture):
    """Recaptures runner's decode graphs with both attentions under `capture`."""
    capture.model = runner.model
    real_step = cuda_runner.DecodeGraphs._step

    def step(graphs, rows, span):
        capture.rows = rows
        return real_step(graphs, rows, span)

    cuda_runner.DecodeGraphs._step = step
    try:
        return cuda_runner.DecodeGraphs(runner.model, runner._cache, runner.max_batch, runner.capacity, capture,
                                        attentions=(False, True))
    finally:
        cuda_runner.DecodeGraphs._step = real_step


def test_each_captured_step_keeps_the_faster_attention_and_computes_the_same(tiny_llama_folder):
    import torch

    runner = cuda_runner.load_folder(tiny_llama_folder, "float32", "cpu", max_batch=4,
                                     capture=cuda_runner.eager_capture)
    assert runner._graphs.timings == {} and runner._graphs.fused == set()  # the CPU's default: the matmuls alone
    plain = cuda_runner.load_folder(tiny_llama_folder, "float32", "cpu", max_batch=4)
    runner._graphs = graphs_timed(runner, TimedCapture())
    span = cuda_runner.span_buckets(runner.capacity)[0]
    assert runner._graphs.fused == {(1, span), (2, span)}
    assert runner._graphs.timings[(2, span)] == {False: 1.0, True: 0.5}
    assert runner._graphs.timings[(4, span)] == {False: 1.0, True: 2.0}
    assert not runner.model.fused_decode_attention  # only the captures used it
    for r in (runner, plain):
        r.prefill([[5, 6, 7], [8, 9], [10]])
    tokens = [5, 9, 11]  # three rows: bucket 4, the matmuls; after the cut, two: bucket 2, fused
    for step in range(4):
        if step == 2:
            for r in (runner, plain):
                r.keep([2, 0])
            tokens = tokens[2:] + tokens[:1]
        want, got = plain.decode(tokens), runner.decode(tokens)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tokens = [int(t) for t in want.argmax(-1)]


def test_a_fused_attention_that_cannot_be_captured_leaves_the_matmuls(tiny_llama_folder):
    runner = cuda_runner.load_folder(tiny_llama_folder, "float32", "cpu", max_batch=2,
                                     capture=cuda_runner.eager_capture)
    graphs = graphs_timed(runner, TimedCapture(fail_fused=True))
    assert graphs.fused == set() and graphs.timings == {} and len(graphs.graphs) == 2 * len(
        cuda_runner.span_buckets(runner.capacity))


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("fused", [False, True])
def test_a_captured_decode_step_never_needs_the_host(tiny_llama_folder, fused, device):
    """What DecodeGraphs captures, run once under a dispatch mode on the CPU: no op that
    syncs or reads host memory, no boolean indexing (a nonzero inside), and no copy
    between devices. On a GPU any of them fails the capture at load, or worse, is
    replayed with the values it saw when it was captured."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        seen: list[tuple[str, list]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            self.seen.append((str(func), tensors))
            return func(*args, **(kwargs or {}))

    # On "meta" (shapes, no values) a host tensor in the step shows as another device.
    runner = cuda_runner.load_folder(tiny_llama_folder, "bfloat16", device, max_batch=4,
                                     capture=cuda_runner.eager_capture, attention="fused" if fused else "matmuls")
    runner.prefill([[5, 6, 7], [8, 9]])
    with Ops() as ops:
        runner._graphs._step(4, 256)
    names = {name for name, _ in ops.seen}
    assert len(ops.seen) > 100 and "aten.index_put_.default" in names  # the step itself ran
    assert not names & HOST_BOUND_OPS
    for name, tensors in ops.seen:
        assert all(t.dtype != torch.bool for t in tensors[1:]) or not name.startswith("aten.index"), name
        assert all(t.device == torch.device(runner.model.device) for t in tensors), name


class OneDevice(TorchDispatchMode):
    """Records every op whose tensors lie on more than one device: on a GPU such an op
    fails, or copies a host tensor in and waits for it. A CPU scalar (0-dim) is
    allowed, as CUDA allows it, and so are the explicit copies between devices."""

    def __init__(self):
        super().__init__()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        devices = {t.device for t in tensors if not (t.device.type == "cpu" and t.dim() == 0)}
        if len(devices) > 1 and str(func) not in ("aten._to_copy.default", "aten.copy_.default"):
            self.mixed.append(f"{func}: {[(str(t.device), tuple(t.shape)) for t in tensors]}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", ["matmuls", "fastest"])
def test_the_static_runner_and_its_sampling_keep_their_tensors_on_the_device(tiny_llama_folder, attention):
    """The whole static runner on a stand-in device ("meta": shapes without values, and
    no CUDA needed), so that a tensor left on the host shows: loading, the shared
    prefix, prefill, decode steps, cuts (with and without moved rows that cross),
    a prompt fed in chunks, the batched sampling up to the one read of its tokens, and a
    step started from sampled tokens that were not read (pipelined)."""
    from engine import Sampling
    from sampling import RowSampler, followed_by, launch_rows, sample_rows

    with OneDevice() as mode:
        runner = cuda_runner.load_folder(tiny_llama_folder, "bfloat16", "meta", max_batch=4,
                                         capture=cuda_runner.eager_capture, attention=attention)
        runner.remember_prefix([5, 6])
        runner.prefill([[5, 6, 7], [8, 9]])
        runner.decode([1, 2])
        runner.keep([1])
        runner.prefill([[5, 6, 7, 8]])
        runner.keep([1, 0])
        partial = runner.begin([3] * 40)
        assert runner.advance(partial, 16) is None
        runner.advance(partial, 30)
        logits = runner.decode([1, 3, 4])
        samplers = [RowSampler(s, seed=7, prompt_ids=[1, 2, 3]) for s in
                    (Sampling(), Sampling(temperature=0), Sampling(frequency_penalty=0.5))]
        samplers[2].accept(4)
        launched = []
        with pytest.raises(NotImplementedError, match="meta"):  # the read: meta tensors hold no data
            sample_rows(logits, samplers, before_waiting=lambda: launched.append(True))
        # pipelined: the next step starts from the sampled tokens, on the device
        runner.keep([0, 1])
        runner.prefill([[9, 9]])
        runner.decode(followed_by(launch_rows(logits[:2], samplers[:2]).on_device(), [5]))
    assert launched == [True]  # every op was queued before the read
    assert logits.device.type == "meta" and runner.rows == 3
    assert mode.mixed == []


def test_the_static_runner_refuses_other_architectures(tiny_gpt2_folder):
    from modelsource import resolve_model
    from runner import load_runner

    with pytest.raises(RuntimeError, match="only Llama-architecture"):
        load_runner(resolve_model(str(tiny_gpt2_folder)), "float32", None, "static")


def embedded_model_on_a_gpu(monkeypatch, free_bytes: int):
    """The embedded model's shape in bfloat16 (23,040 bytes a cached position) on a GPU
    with that much memory free."""
    import types

    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free_bytes, 80 * 2 ** 30))
    return types.SimpleNamespace(context=8192, device="cuda:0", layers=30, kv_heads=3, head_dim=64,
                                 cache_dtype=torch.bfloat16)


@pytest.mark.parametrize("free_gib,fixed,expected", [
    (78, False, (256, 8192)),  # an H100: 256 slots of the whole context
    (8, False, (32, 8192)),  # a smaller GPU: fewer slots, each whole
    (1, False, (8, 4864)),  # at least 8 slots, shortened to fit
    (8, True, (256, 1024)),  # --max-batch 256 given: shorter slots
])
def test_slots_are_planned_from_the_gpus_free_memory(monkeypatch, free_gib, fixed, expected):
    model = embedded_model_on_a_gpu(monkeypatch, free_gib * 2 ** 30)
    assert cuda_runner.slot_plan(model, 256, fixed) == expected


def test_slots_that_cannot_hold_a_span_are_refused(monkeypatch):
    model = embedded_model_on_a_gpu(monkeypatch, 2 ** 20)
    with pytest.raises(RuntimeError, match="smaller --max-batch"):
        cuda_runner.slot_plan(model, 64, True)


def test_auto_is_the_cpu_without_a_driver_or_a_gpu_torch_can_see(monkeypatch):
    import torch

    import runner

    monkeypatch.setattr(runner, "_driver_present", lambda: False)
    assert runner.resolve_device("auto") == "cpu"
    monkeypatch.setattr(runner, "_driver_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runner.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="--device cpu"):
        runner.resolve_device("cuda:1")
    with pytest.raises(RuntimeError, match="auto, cpu, cuda or cuda:N"):
        runner.resolve_device("gpu")


def test_a_cpu_only_runner_asked_for_on_a_gpu_is_refused(tiny_llama_folder):
    from modelsource import resolve_model
    from runner import load_runner

    for kind in ("llama", "transformers"):
        with pytest.raises(RuntimeError, match=f"--runner {kind} computes on the CPU only"):
            load_runner(resolve_model(str(tiny_llama_folder)), "auto", None, kind, device="cuda:0")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU"))])
def test_host_values_reach_the_device_intact(device):
    import torch

    from transfer import to_device

    seeds = [2 ** 63 - 1, -2 ** 63, 0, 12345]
    assert to_device(seeds, device, torch.long).cpu().tolist() == seeds
    assert to_device([[0.5], [2.0]], device).dtype == torch.float32
    # queued copies land in order before the ops that read them
    total = sum(to_device([i] * 1000, device, torch.long).sum() for i in range(50))
    assert int(total) == 1000 * sum(range(50))


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_reading_sampled_tokens_waits_for_their_step_alone():
    """Pipelined, the engine reads step N's tokens after it launched step N+1: the read
    must not wait for N+1 (a plain .cpu() would, queued behind it)."""
    import torch

    from engine import Sampling
    from sampling import RowSampler, launch_rows

    logits = torch.randn(4, 1000, device="cuda")
    samplers = [RowSampler(Sampling(temperature=0), seed=i, prompt_ids=[1]) for i in range(4)]
    expected = torch.argmax(logits, dim=-1).tolist()
    sampled = launch_rows(logits, samplers)
    torch.cuda._sleep(2 ** 31)  # the next step: about a second of device time queued after the sampling
    assert sampled.read() == expected
    assert not torch.cuda.current_stream().query()  # that "step" still runs: the read did not wait for it
    torch.cuda.synchronize()
