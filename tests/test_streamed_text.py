"""The streamed text and its counts, on every endpoint: what a reply says the model
wrote, streamed or whole, is the same text, and the counts are the tokens'."""

from __future__ import annotations

import asyncio
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from inprocess import ScriptedRunner, http, live_server
from textstream import Detokenizer

# A space and the first 3 of the 4 bytes of U+1F600, in byte-level BPE's alphabet: one
# token, as the embedded model's vocabulary has it (id 40303, 'ĠðŁĺ').
SPACE_AND_PART_OF_AN_EMOJI = "ĠðŁĺ"


def byte_bpe() -> Tokenizer:
    """Byte-level BPE with one token per byte and the one above (no merges: it is only
    decoded, or encodes plain ASCII a byte a token)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[SPACE_AND_PART_OF_AN_EMOJI] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def test_flush_gives_the_whole_characters_of_a_last_token_that_ends_inside_a_character():
    tok = byte_bpe()
    ids = tok.encode("Hi").ids + [tok.token_to_id(SPACE_AND_PART_OF_AN_EMOJI)]
    d = Detokenizer(tok)
    assert [d.step(i) for i in ids] == ["H", "i", ""]
    assert d.flush() == " "  # the space; the 3 bytes of the emoji make no character
    assert d.flush() == ""


def test_flush_gives_nothing_when_nothing_is_held():
    tok = byte_bpe()
    d = Detokenizer(tok)
    assert "".join(d.step(i) for i in tok.encode("Hi 😀").ids) == "Hi 😀"
    assert d.flush() == ""


def test_the_emoji_completed_after_a_held_token_is_streamed_whole():
    tok = byte_bpe()
    ids = [tok.token_to_id(SPACE_AND_PART_OF_AN_EMOJI), tok.token_to_id("Ģ")]  # + the 4th byte, 0x80
    d = Detokenizer(tok)
    assert [d.step(i) for i in ids] == ["", " 😀"]
    assert d.flush() == ""


# ---------------------------------------------------------------------------
# Through the server: a scripted model writes "Hi" and the held token, then stops.

ENDPOINTS = ("/generate", "/api/generate", "/api/chat", "/v1/completions", "/v1/chat/completions", "/v1/responses")


def body_for(endpoint: str, model: str, max_tokens: int | None, stream: bool, **extra) -> dict:
    body = {"model": model, "stream": stream, **extra}
    if endpoint in ("/api/chat", "/v1/chat/completions"):
        body["messages"] = [{"role": "user", "content": "Say hi"}]
    elif endpoint == "/v1/responses":
        body["input"] = "Say hi"
    else:
        body["prompt"] = "Say hi"
    if max_tokens is not None:
        body["max_output_tokens" if endpoint == "/v1/responses" else "max_tokens"] = max_tokens
    if stream and endpoint in ("/v1/completions", "/v1/chat/completions"):
        body["stream_options"] = {"include_usage": True}
    return body


def read_reply(endpoint: str, reply, stream: bool) -> tuple[str, str, int, int]:
    """(text, done_reason or finish_reason or status, prompt tokens, completion tokens)."""
    assert reply.status == 200, reply.body
    if endpoint in ("/generate", "/api/generate", "/api/chat"):
        objs = reply.lines() if stream else [reply.json()]
        text = "".join(o["message"]["content"] if endpoint == "/api/chat" else o["response"] for o in objs)
        last = objs[-1]
        return text, last["done_reason"], last["prompt_eval_count"], last["eval_count"]
    if not stream:
        j = reply.json()
        if endpoint == "/v1/responses":
            text = "".join(p["text"] for o in j["output"] if o["type"] == "message" for p in o["content"])
            return text, j["status"], j["usage"]["input_tokens"], j["usage"]["output_tokens"]
        choice = j["choices"][0]
        text = choice["text"] if endpoint == "/v1/completions" else choice["message"]["content"]
        return text, choice["finish_reason"], j["usage"]["prompt_tokens"], j["usage"]["completion_tokens"]
    events = [json.loads(line[6:]) for line in reply.body.decode().split("\n")
              if line.startswith("data: ") and line != "data: [DONE]"]
    if endpoint == "/v1/responses":
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        done = events[-1]["response"]
        return text, done["status"], done["usage"]["input_tokens"], done["usage"]["output_tokens"]
    choices = [e["choices"][0] for e in events if e["choices"]]
    key = "text" if endpoint == "/v1/completions" else "delta"
    text = "".join((c[key] if key == "text" else c[key].get("content")) or "" for c in choices)
    finish = [c["finish_reason"] for c in choices if c["finish_reason"]]
    usage = [e["usage"] for e in events if e.get("usage")][0]
    assert len(finish) == 1
    return text, finish[0], usage["prompt_tokens"], usage["completion_tokens"]


def scripted_runner(tokenizer_folder, ids: list[int]) -> ScriptedRunner:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_bpe(), eos_token="<|endoftext|>")
    runner = ScriptedRunner(tokenizer, "")
    runner._script = ids + [tokenizer.eos_token_id]
    return runner


def run_scripted(folder, tmp_path, ids, scenario):
    async def main():
        async with live_server(folder, tmp_path / "log.jsonl", runner=scripted_runner(folder, ids)) as live:
            await scenario(live)
            await live.settled()
            return live.log_lines()
    return asyncio.run(main())


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_reply_cut_by_its_token_limit_inside_a_character_keeps_the_characters_before_it(
        tiny_gpt2_folder, tmp_path, endpoint):
    tok = byte_bpe()
    ids = tok.encode("Hi").ids + [tok.token_to_id(SPACE_AND_PART_OF_AN_EMOJI), tok.token_to_id("Ģ")]

    async def scenario(live):
        model = live.engine.model_name
        for stream in (False, True):
            reply = await http(live.port, "POST", endpoint, body_for(endpoint, model, 3, stream))
            text, reason, _, completion = read_reply(endpoint, reply, stream)
            assert text == "Hi ", (stream, text)
            assert reason in ("length", "incomplete") and completion == 3
            reply = await http(live.port, "POST", endpoint, body_for(endpoint, model, 4, stream))
            text, reason, _, completion = read_reply(endpoint, reply, stream)
            assert text == "Hi 😀", (stream, text)
            assert completion == 4

    lines = run_scripted(tiny_gpt2_folder, tmp_path, ids, scenario)
    assert [line["response"] for line in lines] == ["Hi ", "Hi 😀"] * 2


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_reply_the_model_ends_after_a_token_that_ends_inside_a_character_keeps_the_characters_before_it(
        tiny_gpt2_folder, tmp_path, endpoint):
    tok = byte_bpe()
    ids = tok.encode("Hi").ids + [tok.token_to_id(SPACE_AND_PART_OF_AN_EMOJI)]  # then end-of-sequence

    async def scenario(live):
        model = live.engine.model_name
        for stream in (False, True):
            reply = await http(live.port, "POST", endpoint, body_for(endpoint, model, None, stream))
            text, reason, _, completion = read_reply(endpoint, reply, stream)
            assert text == "Hi ", (stream, text)
            assert reason in ("stop", "completed") and completion == 3

    run_scripted(tiny_gpt2_folder, tmp_path, ids, scenario)


# ---------------------------------------------------------------------------
# Streamed and whole, the same request gives the same text and counts on every endpoint.


def run_model(folder, tmp_path, scenario):
    async def main():
        async with live_server(folder, tmp_path / "log.jsonl") as live:
            await scenario(live)
            await live.settled()
            return live.log_lines()
    return asyncio.run(main())


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.5, "seed": 11}])
def test_streamed_and_whole_replies_are_the_same_text_and_counts(tiny_gpt2_folder, tmp_path, endpoint, sampling):
    async def scenario(live):
        model = live.engine.model_name
        got = []
        for stream in (False, True, False):
            reply = await http(live.port, "POST", endpoint, body_for(endpoint, model, 12, stream, **sampling))
            got.append(read_reply(endpoint, reply, stream))
        assert got[0] == got[1] == got[2]
        return got[0]

    replies = []

    async def collect(live):
        replies.append(await scenario(live))

    lines = run_model(tiny_gpt2_folder, tmp_path, collect)
    text, _, prompt_tokens, completion_tokens = replies[0]
    assert [(line["response"], line["prompt_tokens"], line["completion_tokens"]) for line in lines] == \
        [(text, prompt_tokens, completion_tokens)] * 3


def test_responses_takes_seed_and_stop_as_chat_does():
    from validation import parse_responses

    req, *_ = parse_responses({"input": "hi", "seed": 5, "stop": ["x", "y"], "presence_penalty": 1,
                               "frequency_penalty": 0.5})
    assert (req.sampling.seed, req.stop) == (5, ["x", "y"])
    assert (req.sampling.presence_penalty, req.sampling.frequency_penalty) == (1, 0.5)


@pytest.mark.parametrize("field, value", [("max_tokens", 5), ("max_completion_tokens", 5), ("n", 2), ("best_of", 3),
                                          ("logprobs", True), ("response_format", {"type": "json_object"}),
                                          ("messages", [{"role": "user", "content": "hi"}]), ("echo", True),
                                          ("logit_bias", {"1": 5}), ("suffix", "x")])
def test_a_chat_completions_field_sent_to_responses_is_400_naming_it(field, value):
    from httpserver import HTTPError
    from validation import parse_responses

    with pytest.raises(HTTPError) as info:
        parse_responses({"input": "hi", field: value})
    assert info.value.status == 400 and f"'{field}'" in info.value.message
    parse_responses({"input": "hi", "n": 1, "logprobs": False})  # what asks for nothing is fine


# ---------------------------------------------------------------------------
# SentencePiece-style tokenizers (Llama 2, Mistral): '▁' for a space, byte fallback
# tokens <0x..> for characters outside the vocabulary, the first space stripped.


def sentencepiece_bpe() -> Tokenizer:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for word in ("▁Hello", "▁world", "a", "b"):
        vocab[word] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def test_a_continuation_keeps_the_space_its_first_token_begins_with():
    tok = sentencepiece_bpe()
    hello, world = tok.token_to_id("▁Hello"), tok.token_to_id("▁world")
    assert Detokenizer(tok, [1, hello]).step(world) == " world"
    assert Detokenizer(tok).step(world) == "world"  # a reply on its own, as decode gives it


def test_bytes_that_make_no_character_after_one_that_does_do_not_fail_the_stream():
    tok = sentencepiece_bpe()
    byte = lambda b: tok.token_to_id(f"<0x{b:02X}>")  # noqa: E731
    ids = [tok.token_to_id("a"), byte(0xC3), byte(0xA9), byte(0xF0), tok.token_to_id("a"), tok.token_to_id("b")]
    d = Detokenizer(tok)
    text = "".join(d.step(i) for i in ids) + d.flush()  # DecodeStream alone raised 'Invalid prefix'
    assert text == "aé\ufffdab"


def sentencepiece_runner(ids: list[int]) -> ScriptedRunner:
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=sentencepiece_bpe(), eos_token="</s>", bos_token="<s>")
    runner = ScriptedRunner(tokenizer, "")
    runner._script = ids + [tokenizer.eos_token_id]
    return runner


def test_a_completion_continues_the_prompts_text_and_a_bad_byte_does_not_end_it(tiny_gpt2_folder, tmp_path):
    tok = sentencepiece_bpe()
    byte = lambda b: tok.token_to_id(f"<0x{b:02X}>")  # noqa: E731
    ids = [tok.token_to_id("▁world"), byte(0xC3), byte(0xA9), byte(0xF0), tok.token_to_id("a")]

    async def scenario(live):
        for endpoint in ("/v1/completions", "/generate"):
            for stream in (False, True):
                body = body_for(endpoint, live.engine.model_name, None, stream, raw=True)
                text, reason, _, completion = read_reply(endpoint, await http(live.port, "POST", endpoint, body),
                                                         stream)
                assert (text, reason, completion) == (" worldé\ufffda", "stop", 5), (endpoint, stream)

    async def main():
        async with live_server(tiny_gpt2_folder, tmp_path / "log.jsonl", runner=sentencepiece_runner(ids)) as live:
            await scenario(live)
            await live.settled()
            return live.log_lines()
    lines = asyncio.run(main())
    assert [line["status"] for line in lines] == ["done"] * 4


def test_completions_logprobs_0_still_asks_for_log_probabilities_and_is_400():
    from httpserver import HTTPError
    from validation import parse_openai

    with pytest.raises(HTTPError) as info:
        parse_openai({"prompt": "hi", "logprobs": 0}, False)
    assert info.value.status == 400 and "'logprobs'" in info.value.message
    parse_openai({"prompt": "hi", "logprobs": None}, False)
    parse_openai({"messages": [{"role": "user", "content": "hi"}], "logprobs": False, "top_logprobs": 0}, True)


# ---------------------------------------------------------------------------
# Characters str.splitlines() breaks lines at (httpx's iter_lines, which the ollama
# client reads NDJSON with) inside the text.

LINE_BREAKING_TEXT = "a\u2028b\u2029c\x85d"


def test_a_streamed_piece_holding_line_breaking_characters_is_one_line_of_json():
    from engine import Final, Stats
    from replies import OllamaChat, OllamaGenerate, OpenAIChat, Shape

    for shape in (Shape("m"), OllamaGenerate("m"), OllamaChat("m")):
        for data in (shape.piece(LINE_BREAKING_TEXT), shape.piece(LINE_BREAKING_TEXT),
                     shape.end(Final("stop", Stats()))):
            lines = data.decode().splitlines()
            assert len(lines) == 1 and json.loads(lines[0])
    data = OpenAIChat("m").piece(LINE_BREAKING_TEXT).decode()
    assert json.loads(data.splitlines()[0].removeprefix("data: "))["choices"][0]["delta"]["content"] \
        == LINE_BREAKING_TEXT


def test_the_ollama_client_reads_a_reply_holding_line_breaking_characters(tiny_gpt2_folder, tmp_path):
    import ollama

    tok = byte_bpe()
    ids = tok.encode(LINE_BREAKING_TEXT).ids

    async def scenario(live):
        client = ollama.AsyncClient(host=f"http://127.0.0.1:{live.port}")
        model = live.engine.model_name
        parts = [p async for p in await client.generate(model=model, prompt="Say hi", stream=True)]
        assert "".join(p.response for p in parts) == LINE_BREAKING_TEXT
        parts = [p async for p in await client.chat(model=model, messages=[{"role": "user", "content": "hi"}],
                                                    stream=True)]
        assert "".join(p.message.content for p in parts) == LINE_BREAKING_TEXT
        assert (await client.generate(model=model, prompt="Say hi")).response == LINE_BREAKING_TEXT

    run_scripted(tiny_gpt2_folder, tmp_path, ids, scenario)
