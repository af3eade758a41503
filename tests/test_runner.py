"""transformers_runner.py without threads or sockets: the batch it keeps gives every row
the logits that row would get alone, through joins, cuts, chunked and seeded prefills."""

from __future__ import annotations

import pytest
import torch

from modelsource import resolve_model
from transformers_runner import TransformersRunner

PROMPTS = [[5, 17, 33, 2, 9], [40, 41], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


@pytest.fixture()
def runner(tiny_gpt2_folder):
    return TransformersRunner.load(resolve_model(str(tiny_gpt2_folder)), "float32", None)


def alone(runner, ids) -> torch.Tensor:
    with torch.inference_mode():
        return runner.model(input_ids=torch.tensor([ids])).logits[0, -1]


def assert_rows_match(runner, logits, histories) -> None:
    assert logits.shape[0] == len(histories)
    for row, ids in enumerate(histories):
        assert torch.allclose(logits[row], alone(runner, ids), atol=1e-4), f"row {row}"


def test_prefill_decode_join_and_cut_give_each_row_its_own_logits(runner):
    histories = [list(p) for p in PROMPTS[:2]]
    logits = runner.prefill(PROMPTS[:2])
    assert_rows_match(runner, logits, histories)
    for step in range(3):
        tokens = [int(x) for x in logits.argmax(-1)]
        for h, t in zip(histories, tokens):
            h.append(t)
        logits = runner.decode(tokens)
        assert_rows_match(runner, logits, histories)
        if step == 1:  # a third request joins mid-way, with a longer prompt
            joined = runner.prefill([PROMPTS[2]])
            assert_rows_match(runner, joined, [PROMPTS[2]])
            histories.append(list(PROMPTS[2]))
            logits = torch.cat([logits, joined])
    assert runner.rows == 3
    runner.keep([2, 0])  # the middle row ends; the order may change
    histories = [histories[2], histories[0]]
    logits = torch.stack([logits[2], logits[0]])
    tokens = [int(x) for x in logits.argmax(-1)]
    for h, t in zip(histories, tokens):
        h.append(t)
    assert_rows_match(runner, runner.decode(tokens), histories)
    runner.keep([])
    assert runner.rows == 0


def test_a_chunked_prefill_equals_a_whole_one_and_joins_the_batch(runner):
    runner.prefill([PROMPTS[0]])
    partial = runner.begin(PROMPTS[2])
    assert runner.advance(partial, 4) is None and runner.advance(partial, 4) is None
    assert runner.rows == 1  # not in the batch until its last chunk
    logits = runner.advance(partial, 4)
    assert runner.rows == 2
    assert torch.allclose(logits[0], alone(runner, PROMPTS[2]), atol=1e-4)


def test_a_remembered_prefix_seeds_prefills_that_start_with_it(runner):
    runner.remember_prefix(PROMPTS[2][:6])
    prompts = [PROMPTS[2][:8], PROMPTS[2], PROMPTS[0]]  # two start with the prefix, one does not
    for group in (prompts[:2], prompts):
        runner.reset()
        assert_rows_match(runner, runner.prefill(group), group)


def test_a_failed_prefill_leaves_the_batch_as_it_was(runner):
    logits = runner.prefill([PROMPTS[0]])
    token = int(logits[0].argmax())
    with pytest.raises(Exception):
        runner.prefill([[10 ** 6]])  # no such token
    assert runner.rows == 1
    assert_rows_match(runner, runner.decode([token]), [PROMPTS[0] + [token]])


def test_decode_refuses_a_token_count_that_is_not_the_batch(runner):
    runner.prefill(PROMPTS[:2])
    with pytest.raises(ValueError):
        runner.decode([1])
