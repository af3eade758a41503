"""cuda_runner.py's shapes without a GPU: the batch and span buckets a decode step is
captured at, and the slots a prefill may not overrun."""

from __future__ import annotations

import pytest

import cuda_runner
from cuda_runner import batch_bucket, span_buckets


def test_batch_buckets_are_powers_of_two_at_or_above_the_rows():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 200, 256, 257)] == [1, 2, 4, 8, 8, 16, 256, 256, 512]


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


def test_the_static_runner_refuses_other_architectures(tiny_gpt2_folder):
    from modelsource import resolve_model
    from runner import load_runner

    with pytest.raises(RuntimeError, match="only Llama-architecture"):
        load_runner(resolve_model(str(tiny_gpt2_folder)), "float32", None, "static")
