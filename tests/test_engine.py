import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# The pure pieces behind the engine: stop strings, incremental detokenising (textstream),
# sampling, model lookup (modelsource).

import functools
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from engine import Sampling
from modelsource import resolve_model
from sampling import REPEAT_LAST_N, RowSampler, sample_rows, uniforms
from textstream import Detokenizer, StopMatcher


# ---------------------------------------------------------------------------
# StopMatcher


def feed_all(matcher: StopMatcher, chunks: list[str]) -> tuple[list[str], bool]:
    """Feed chunks as the engine does (stop at the first hit); returns (emitted pieces, hit)."""
    out = []
    for chunk in chunks:
        text, hit = matcher.feed(chunk)
        out.append(text)
        if hit:
            return out, True
    out.append(matcher.flush())
    return out, False


def test_stop_inside_one_chunk_cuts_text_before_it():
    assert StopMatcher(["END"]).feed("Hello END world") == ("Hello ", True)


def test_a_reply_opening_with_the_spared_start_is_never_cut_by_a_stop():
    # Tool calls left to the model: '<' opens calls, whose JSON holds '}' and quotes.
    call = ['', '<tool_call>\n{"name": "f", ', '"arguments": {}}', '\n</tool_call>']
    assert feed_all(StopMatcher(["}", '"'], "<"), call) == (call + [""], False)
    assert feed_all(StopMatcher(["}"], "<"), ["", "Plain {text}", " more"]) == (["", "Plain {text"], True)
    assert feed_all(StopMatcher(["}"], "<"), ["Plain text ", "<b>}"]) == (["Plain text ", "<b>"], True)


def test_stop_split_across_chunks_is_never_emitted_even_in_part():
    m = StopMatcher(["END"])
    assert m.feed("Hello E") == ("Hello ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("D and more") == ("", True)


def test_false_start_of_a_stop_is_released_once_it_diverges():
    m = StopMatcher(["END"])
    assert m.feed("The EN") == ("The ", False)
    assert m.feed("ough") == ("ENough", False)
    assert m.flush() == ""


def test_earliest_of_several_stops_wins():
    assert StopMatcher(["world", "lo"]).feed("hello world") == ("hel", True)
    pieces, hit = feed_all(StopMatcher(["world", "lo w"]), ["hel", "lo", " w", "orld"])
    assert hit and "".join(pieces) == "hel"


def test_flush_releases_held_text():
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.flush() == "E"
    assert m.flush() == ""


def test_no_stops_is_passthrough():
    m = StopMatcher([])
    assert m.feed("END E") == ("END E", False)
    assert m.flush() == ""
    assert StopMatcher([""]).feed("anything") == ("anything", False)


def test_stop_inside_a_longer_stop_gives_same_text_whatever_the_chunking():
    # "c" lies strictly inside "abcd": fed whole, the earlier-starting "abcd" wins;
    # fed in pieces, "c" completes first. The same model text should stop the same way.
    whole, _ = feed_all(StopMatcher(["abcd", "c"]), ["xabcd"])
    pieces, _ = feed_all(StopMatcher(["abcd", "c"]), ["xab", "c", "d"])
    assert "".join(whole) == "".join(pieces)


def _has_inner_stop(stops: list[str]) -> bool:
    """One stop strictly inside another (covered by the test above, where chunking matters)."""
    return any(b in a[1:-1] for a in stops for b in stops if a != b)


@st.composite
def text_and_chunks(draw, alphabet="abEND \n"):
    text = draw(st.text(alphabet=alphabet, max_size=40))
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    return text, [text[i:j] for i, j in zip(bounds, bounds[1:])]


@settings(deadline=None, max_examples=300)
@given(text_and_chunks(), st.lists(st.text(alphabet="abEND \n", min_size=1, max_size=4), min_size=1, max_size=3)
       .filter(lambda stops: not _has_inner_stop(stops)))
def test_emitted_text_is_text_up_to_first_stop_for_any_chunking(tc, stops):
    text, chunks = tc
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    pieces, hit = feed_all(StopMatcher(stops), chunks)
    assert hit == bool(found)
    assert "".join(pieces) == (text[: min(found)] if found else text)


# ---------------------------------------------------------------------------
# Detokenizer

EMOJI_AND_CJK = ["😀", "👍🏽", "世界你好"]


@functools.lru_cache(maxsize=1)
def small_bpe() -> Tokenizer:
    """A byte-level BPE too small to have whole tokens for emoji or CJK characters."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(["The quick brown fox jumps over the lazy dog.",
                             "Hello world, this is a test of the tokenizer.",
                             "Streaming text arrives one token at a time."], trainer=trainer)
    return tok


def stream_chunks(tok: Tokenizer, ids: list[int]) -> list[str]:
    d = Detokenizer(tok)
    return [d.step(i) for i in ids] + [d.flush()]  # the engine flushes at a reply's last token


def test_emoji_and_cjk_characters_span_several_tokens():
    tok = small_bpe()
    assert any(len(tok.encode(ch).ids) > 1 for text in EMOJI_AND_CJK for ch in text)


@pytest.mark.parametrize("text", EMOJI_AND_CJK + ["Hi 😀, 世界你好 👍🏽!"])
def test_chunks_never_split_a_character_and_add_up_to_the_decoded_text(text):
    tok = small_bpe()
    ids = tok.encode(text).ids
    chunks = stream_chunks(tok, ids)
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == text


def test_special_tokens_are_skipped():
    tok = small_bpe()
    eot = tok.token_to_id("<|endoftext|>")
    ids = tok.encode("Hi 😀").ids + [eot] + tok.encode(" there").ids
    chunks = stream_chunks(tok, ids)
    assert "".join(chunks) == "Hi 😀 there"
    assert all("<|endoftext|>" not in c for c in chunks)


@settings(deadline=None, max_examples=200)
@given(st.text(alphabet=st.one_of(st.sampled_from(["😀", "👍", "🏽", "世", "界", "你", "好", "é", " ", "a"]),
                                  st.characters(codec="utf-8")), max_size=30))
def test_incremental_text_equals_full_decode_for_any_unicode(text):
    tok = small_bpe()
    ids = tok.encode(text).ids
    chunks = stream_chunks(tok, ids)
    # A genuine U+FFFD as the very last character looks like an incomplete character to
    # the decoder (both decode as U+FFFD), and flush drops that (README, /generate).
    expected = tok.decode(ids)
    assert "".join(chunks) == (expected.removesuffix("\ufffd") if text.endswith("\ufffd") else expected)
    if "\ufffd" not in text:
        assert all("\ufffd" not in c for c in chunks)


# ---------------------------------------------------------------------------
# sampling

PLAIN = dict(top_p=1.0, top_k=0, repeat_penalty=1.0)


def sample_token(logits, sampling_, history=(), seed: int = 0, counts=None) -> int:
    """One row's token from a fresh sampler whose recent tokens are `history`."""
    from collections import Counter

    sampler = RowSampler(sampling_, seed, list(history))
    sampler._counts = Counter(counts or {})
    return sample_rows(logits.unsqueeze(0), [sampler])[0]


def test_temperature_zero_returns_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, Sampling(temperature=0, **PLAIN)) == 1


def test_top_k_one_returns_argmax_at_any_temperature():
    logits = torch.tensor([1.0, 1.2, 1.1, 0.9])
    s = Sampling(temperature=2.0, top_k=1, top_p=1.0, repeat_penalty=1.0)
    assert {sample_token(logits, s, seed=seed) for seed in range(50)} == {1}


def draws(seed: int, n: int = 20) -> list[int]:
    sampler = RowSampler(Sampling(temperature=1.0, seed=seed, **PLAIN), seed, [])
    return [sampler.next(torch.zeros(50)) for _ in range(n)]


def test_same_seed_gives_same_samples():
    assert draws(1234) == draws(1234)


def test_different_seeds_give_different_samples():
    assert draws(1) != draws(2)


def test_a_row_draws_a_new_token_each_step():
    assert len(set(draws(7))) > 5


def test_draws_follow_the_distribution():
    """20,000 draws (seeds x steps) from probabilities 0.5 / 0.3 / 0.2 / 0."""
    from collections import Counter

    logits = torch.tensor([0.5, 0.3, 0.2, 0.0]).log()
    seen = Counter()
    for seed in range(200):
        sampler = RowSampler(Sampling(temperature=1.0, **PLAIN), seed, [])
        seen.update(sampler.next(logits) for _ in range(100))
    assert seen[3] == 0
    for token, p in ((0, 0.5), (1, 0.3), (2, 0.2)):
        assert abs(seen[token] / 20_000 - p) < 0.02, seen


def frequencies(logits, sampling_, seeds: int = 100, steps: int = 50) -> dict:
    from collections import Counter

    seen = Counter()
    for seed in range(seeds):
        sampler = RowSampler(sampling_, seed, [])
        seen.update(sampler.next(logits) for _ in range(steps))
    return {token: n / (seeds * steps) for token, n in seen.items()}


@pytest.mark.parametrize("cut", [dict(top_k=2, top_p=1.0), dict(top_k=0, top_p=0.7), dict(top_k=3, top_p=0.7)])
def test_top_k_and_top_p_keep_the_likeliest_and_renormalise(cut):
    """0.5 / 0.3 / 0.15 / 0.05 (and 4,996 unlikely tokens, more than the candidates a
    top-p row starts from): each cut keeps the first two, drawn 0.625 / 0.375."""
    logits = torch.cat([torch.tensor([0.5, 0.3, 0.15, 0.05]).log(), torch.full((4996,), -30.0)])
    seen = frequencies(logits, Sampling(temperature=1.0, repeat_penalty=1.0, **cut))
    assert set(seen) == {0, 1}
    assert abs(seen[0] - 0.625) < 0.03, seen


def test_top_p_reaching_past_the_first_candidates_sorts_the_whole_vocabulary():
    """5,000 equally likely tokens and top_p 0.5: 2,500 may be drawn, more than the
    first NUCLEUS_CANDIDATES, so the draw falls back to the whole sorted vocabulary."""
    from sampling import NUCLEUS_CANDIDATES

    seen = frequencies(torch.zeros(5000), Sampling(temperature=1.0, top_k=0, top_p=0.5, repeat_penalty=1.0),
                       seeds=60, steps=50)
    assert NUCLEUS_CANDIDATES < len(seen) <= 2500


def test_uniform_draws_are_splitmix64_with_wrapping_64_bit_products():
    """The tensor ops give the same bits as splitmix64 in Python's exact integers."""
    def mix(x):
        x = (x + 0x9E3779B97F4A7C15) % 2 ** 64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2 ** 64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2 ** 64
        return x ^ (x >> 31)

    seeds = [0, 1, 2 ** 62 + 12345, 2 ** 63 + 7, 2 ** 64 - 1]
    steps = [0, 1, 999, 5, 2 ** 31]
    signed = [s - 2 ** 64 if s >= 2 ** 63 else s for s in seeds]
    got = uniforms(torch.tensor(signed), torch.tensor(steps)).tolist()
    want = [(mix((mix(s) + t) % 2 ** 64) >> 40) / 2 ** 24 for s, t in zip(seeds, steps)]
    assert got == want


def test_every_row_samples_the_same_in_a_batch_as_alone():
    """Mixed settings in one batch: greedy, sampled, top-k, top-p, penalties."""
    from collections import Counter

    settings_ = [Sampling(temperature=0, **PLAIN), Sampling(temperature=0.8, top_p=0.9, top_k=40, repeat_penalty=1.1),
                 Sampling(temperature=1.0, **PLAIN), Sampling(temperature=1.5, top_k=5, top_p=1.0, repeat_penalty=1.3),
                 Sampling(temperature=0.7, top_p=0.5, top_k=0, repeat_penalty=1.0, presence_penalty=0.5,
                          frequency_penalty=0.3),
                 Sampling(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.2, frequency_penalty=1.0)]
    generator = torch.Generator().manual_seed(0)
    steps = [torch.randn(len(settings_), 300, generator=generator) * 3 for _ in range(30)]

    def run(rows):
        samplers = [RowSampler(settings_[r], 100 + r, [r, r + 1, 7]) for r in rows]
        out = {r: [] for r in rows}
        for logits in steps:
            for r, sampler, token in zip(rows, samplers, sample_rows(logits[rows], samplers)):
                sampler.accept(token)
                out[r].append(token)
        return out

    together = run(list(range(len(settings_))))
    assert all(together[r] == run([r])[r] for r in range(len(settings_)))
    assert len(Counter(together[2])) > 5  # the sampled rows really drew


@pytest.mark.parametrize("greedy", [[True, False, True, False], [True, True], [False, False, False]])
def test_launched_tokens_on_the_device_are_the_tokens_read(greedy):
    """What a pipelined step starts from (Sampled.on_device: greedy and drawn rows put
    back in row order, on the logits' device) is what the host then reads; rows that
    joined since follow as host tokens."""
    from sampling import followed_by, launch_rows

    logits = torch.randn(len(greedy), 300, generator=torch.Generator().manual_seed(1)) * 3
    samplers = [RowSampler(Sampling(temperature=0 if g else 1.0), 5 + r, [r]) for r, g in enumerate(greedy)]
    sampled = launch_rows(logits, samplers)
    tokens = sampled.read()
    assert sampled.on_device().tolist() == tokens == sample_rows(logits, samplers)
    assert followed_by(sampled.on_device(), [7, 8]).tolist() == tokens + [7, 8]


def test_settings_kept_between_steps_follow_each_batch_and_are_never_written():
    """sample_rows keeps a batch's per-row settings on the device from step to step,
    keyed by their values: batches with other settings alternating with it get their
    own, and sampling never writes into a kept tensor."""
    import sampling

    logits = torch.tensor([[1.0, 1.2, 1.1, 0.9]] * 2)
    narrow = [RowSampler(Sampling(temperature=2.0, top_k=1, top_p=1.0, repeat_penalty=1.0), s, [0]) for s in (1, 2)]
    wide = [RowSampler(Sampling(temperature=2.0, top_k=4, top_p=1.0, repeat_penalty=1.1), s, [0]) for s in (1, 2)]
    drawn = set()
    for _ in range(40):
        for samplers in (narrow, wide):
            tokens = sample_rows(logits, samplers)
            for sampler, token in zip(samplers, tokens):
                sampler.accept(token)
            if samplers is narrow:
                assert tokens == [1, 1]
            else:
                drawn.update(tokens)
    assert len(drawn) > 2
    assert sampling._KEPT
    for (values, dtype, _), tensor in sampling._KEPT.items():
        assert torch.equal(tensor, torch.tensor(values, dtype=dtype)), values


def test_before_waiting_runs_once_between_launching_and_reading_the_tokens():
    """Greedy and sampled rows together: the hook runs once, and the tokens are those
    sampled without it."""
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    settings_ = [Sampling(temperature=0, **PLAIN), Sampling(temperature=1.0, **PLAIN), Sampling(temperature=0.7)]
    calls = []
    with_hook = sample_rows(logits, [RowSampler(s, i, [1, 2]) for i, s in enumerate(settings_)],
                            before_waiting=lambda: calls.append("waiting"))
    assert calls == ["waiting"]
    assert with_hook == sample_rows(logits, [RowSampler(s, i, [1, 2]) for i, s in enumerate(settings_)])


def test_tiny_top_p_keeps_only_the_top_token():
    logits = torch.tensor([1.0, 2.0, 1.9, 0.5])
    s = Sampling(temperature=1.0, top_p=1e-6, top_k=0, repeat_penalty=1.0)
    assert {sample_token(logits, s, seed=seed) for seed in range(50)} == {1}


def test_repeat_penalty_lowers_a_repeated_positive_logit():
    logits = torch.tensor([2.0, 1.9, 0.0])
    s = Sampling(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.1)
    assert sample_token(logits.clone(), s) == 0
    assert sample_token(logits.clone(), s, [0]) == 1


def test_repeat_penalty_applies_once_to_a_token_seen_many_times():
    """2.0 / 1.1 = 1.82 stays above 1.7; penalised three times it would fall to 1.50."""
    logits = torch.tensor([2.0, 1.7, 0.0])
    s = Sampling(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.1)
    assert sample_token(logits.clone(), s, [0, 0, 0, 2]) == 0


def test_repeat_penalty_lowers_a_repeated_negative_logit():
    logits = torch.tensor([-1.0, -1.05, -5.0])
    s = Sampling(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.1)
    assert sample_token(logits.clone(), s, [0]) == 1


def test_repeat_penalty_only_looks_at_recent_tokens():
    logits = torch.tensor([2.0, 1.9, 0.0])
    s = Sampling(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.1)
    history = [0] + [2] * REPEAT_LAST_N
    assert sample_token(logits.clone(), s, history) == 0


@pytest.mark.parametrize("prompt", [0, 10, 64, 100])
@pytest.mark.parametrize("completion", [0, 30, 64, 150])
def test_the_penalty_window_is_the_last_tokens_of_prompt_and_completion(prompt, completion):
    prompt_ids, completion_ids = list(range(1000, 1000 + prompt)), list(range(completion))
    sampler = RowSampler(Sampling(), seed=0, prompt_ids=prompt_ids)
    for t in completion_ids:
        sampler.accept(t)
    assert sampler.recent() == (prompt_ids + completion_ids)[-REPEAT_LAST_N:]
    assert sampler.steps == completion


def test_sampling_does_not_modify_the_callers_logits():
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0])
    before = logits.clone()
    sample_token(logits, Sampling(temperature=0.7, top_p=0.9, top_k=2, repeat_penalty=1.3), [0, 3])
    assert torch.equal(logits, before)


# ---------------------------------------------------------------------------
# resolve_model


def test_missing_gguf_file_raises(tmp_path):
    with pytest.raises(RuntimeError):
        resolve_model(str(tmp_path / "missing.gguf"))


def test_existing_gguf_file_is_kind_gguf(tmp_path):
    f = tmp_path / "tiny.gguf"
    f.write_bytes(b"GGUF")
    src = resolve_model(str(f))
    assert (src.kind, src.location, src.name) == ("gguf", str(f), "tiny")


def test_existing_folder_is_kind_folder(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    src = resolve_model(str(folder))
    assert (src.kind, src.location, src.name) == ("folder", str(folder), "my-model")


def test_bare_name_is_kind_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder called gpt2
    src = resolve_model("gpt2")
    assert (src.kind, src.location, src.name) == ("hub", "gpt2", "gpt2")


def test_no_model_means_the_embedded_gguf_file():
    src = resolve_model(None)
    assert src.kind == "gguf"
    assert Path(src.location).is_file() and src.location.endswith(".gguf")


# Issue 11, row 2: settings at the edge of their ranges never make sampling fail.
@pytest.mark.parametrize("settings_", [
    dict(temperature=1e-300), dict(temperature=5e-324), dict(temperature=100.0),
    dict(repeat_penalty=1e-300, temperature=0.7), dict(repeat_penalty=1e300, temperature=0.7),
    dict(presence_penalty=2.0, frequency_penalty=2.0, temperature=0.7), dict(top_p=1e-300, temperature=1.0)])
def test_extreme_settings_still_give_a_token(settings_):
    from collections import Counter

    logits = torch.tensor([0.0, 3.0, -2.0, 1e4, float("-inf")])
    s = Sampling(**{**PLAIN, **settings_})
    token = sample_token(logits, s, [1, 3], counts=Counter({3: 5}))
    assert 0 <= token < 4


def test_presence_and_frequency_penalties_lower_tokens_already_generated():
    from collections import Counter

    logits = torch.tensor([2.0, 1.9, 1.0])
    greedy = dict(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.0)
    assert sample_token(logits, Sampling(**greedy), counts=Counter({0: 1})) == 0
    assert sample_token(logits, Sampling(**greedy, presence_penalty=0.2), counts=Counter({0: 1})) == 1
    assert sample_token(logits, Sampling(**greedy, frequency_penalty=0.06), counts=Counter({0: 1})) == 0
    assert sample_token(logits, Sampling(**greedy, frequency_penalty=0.06), counts=Counter({0: 2})) == 1


def test_a_row_sampler_takes_any_integer_seed_and_repeats_itself():
    from sampling import RowSampler

    logits = torch.zeros(50)
    for seed in (0, 2 ** 64, 10 ** 30, -(2 ** 70)):
        a, b = (RowSampler(Sampling(temperature=1.0, **PLAIN), seed, [1, 2]) for _ in range(2))
        assert [a.next(logits) for _ in range(10)] == [b.next(logits) for _ in range(10)]


def test_prefill_groups_split_by_padding_unless_the_runner_pads_freely():
    from types import SimpleNamespace

    from engine import Engine

    engine = Engine.__new__(Engine)  # grouping alone: no model, no thread
    seqs = [SimpleNamespace(prompt_ids=[1] * n) for n in (30, 8, 9, 10, 120)]

    def lengths(free_padding):
        engine._runner = SimpleNamespace(free_padding=free_padding)
        return [[len(s.prompt_ids) for s in g] for g in engine._prefill_groups(seqs)]

    assert lengths(0) == [[8, 9, 10], [30], [120]]  # a CPU: padding costs its work
    assert lengths(4096) == [[8, 9, 10, 30, 120]]  # a GPU: one pass of 600 padded tokens
    assert lengths(300) == [[8, 9, 10, 30], [120]]


@given(st.lists(st.booleans(), max_size=40))
def test_rows_that_end_leave_holes_the_last_rows_fill(ended):
    """A cut keeps every survivor once; one already within the new batch keeps its
    place, so only as many rows move as ended among the first places."""
    from engine import holes_filled_from_the_end

    kept = [i for i, e in enumerate(ended) if not e]
    order = holes_filled_from_the_end(kept)
    assert sorted(order) == kept
    assert all(order[i] == i for i in kept if i < len(kept))
    assert sum(r != i for i, r in enumerate(order)) == sum(ended[:len(kept)])
    assert holes_filled_from_the_end([1, 2, 3]) == [3, 1, 2] and holes_filled_from_the_end([0, 2]) == [0, 2]
