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
from sampling import REPEAT_LAST_N, sample_token
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
    return [d.step(i) for i in ids]


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
    assert "".join(chunks) == tok.decode(ids)
    if "\ufffd" not in text:
        assert all("\ufffd" not in c for c in chunks)


# ---------------------------------------------------------------------------
# sample_token

PLAIN = dict(top_p=1.0, top_k=0, repeat_penalty=1.0)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_temperature_zero_returns_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_token(logits, Sampling(temperature=0, **PLAIN), [], gen()) == 1


def test_top_k_one_returns_argmax_at_any_temperature():
    logits = torch.tensor([1.0, 1.2, 1.1, 0.9])
    s = Sampling(temperature=2.0, top_k=1, top_p=1.0, repeat_penalty=1.0)
    g = gen()
    assert {sample_token(logits, s, [], g) for _ in range(50)} == {1}


def draws(seed: int, n: int = 20) -> list[int]:
    logits = torch.zeros(50)
    s = Sampling(temperature=1.0, seed=seed, **PLAIN)
    g = gen(seed)
    return [sample_token(logits, s, [], g) for _ in range(n)]


def test_same_seed_gives_same_samples():
    assert draws(1234) == draws(1234)


def test_different_seeds_give_different_samples():
    assert draws(1) != draws(2)


def test_tiny_top_p_keeps_only_the_top_token():
    logits = torch.tensor([1.0, 2.0, 1.9, 0.5])
    s = Sampling(temperature=1.0, top_p=1e-6, top_k=0, repeat_penalty=1.0)
    g = gen()
    assert {sample_token(logits, s, [], g) for _ in range(50)} == {1}


def test_repeat_penalty_lowers_a_repeated_positive_logit():
    logits = torch.tensor([2.0, 1.9, 0.0])
    s = Sampling(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.1)
    assert sample_token(logits.clone(), s, [], gen()) == 0
    assert sample_token(logits.clone(), s, [0], gen()) == 1


def test_repeat_penalty_lowers_a_repeated_negative_logit():
    logits = torch.tensor([-1.0, -1.05, -5.0])
    s = Sampling(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.1)
    assert sample_token(logits.clone(), s, [0], gen()) == 1


def test_repeat_penalty_only_looks_at_recent_tokens():
    logits = torch.tensor([2.0, 1.9, 0.0])
    s = Sampling(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.1)
    history = [0] + [2] * REPEAT_LAST_N
    assert sample_token(logits.clone(), s, history, gen()) == 0


def test_sampling_does_not_modify_the_callers_logits():
    logits = torch.tensor([2.0, 1.9, 0.0, -1.0])
    before = logits.clone()
    sample_token(logits, Sampling(temperature=0.7, top_p=0.9, top_k=2, repeat_penalty=1.3), [0, 3], gen())
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
    token = sample_token(logits, s, [1, 3], gen(), Counter({3: 5}))
    assert 0 <= token < 4


def test_presence_and_frequency_penalties_lower_tokens_already_generated():
    from collections import Counter

    logits = torch.tensor([2.0, 1.9, 1.0])
    greedy = dict(temperature=0, top_p=1.0, top_k=0, repeat_penalty=1.0)
    assert sample_token(logits, Sampling(**greedy), [], gen(), Counter({0: 1})) == 0
    assert sample_token(logits, Sampling(**greedy, presence_penalty=0.2), [], gen(), Counter({0: 1})) == 1
    assert sample_token(logits, Sampling(**greedy, frequency_penalty=0.06), [], gen(), Counter({0: 1})) == 0
    assert sample_token(logits, Sampling(**greedy, frequency_penalty=0.06), [], gen(), Counter({0: 2})) == 1


def test_a_row_sampler_takes_any_integer_seed_and_repeats_itself():
    from sampling import RowSampler

    logits = torch.zeros(50)
    for seed in (0, 2 ** 64, 10 ** 30, -(2 ** 70)):
        a, b = (RowSampler(Sampling(temperature=1.0, **PLAIN), seed, [1, 2]) for _ in range(2))
        assert [a.next(logits) for _ in range(10)] == [b.next(logits) for _ in range(10)]
