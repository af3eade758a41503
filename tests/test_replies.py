import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# The reply shapes' streamed chunks: encoded through a template made once a stream, each
# must be byte for byte what encoding the whole chunk gives (the wire format the
# clients parse), whatever the text.

from hypothesis import given, strategies as st

import replies
from httpserver import json_bytes
from replies import OllamaChat, OllamaGenerate, OpenAIChat, OpenAICompletion, OpenAIResponse, PieceTemplate, Shape

# Any code point, lone surrogates included (a JSON escape can make one).
TEXTS = st.lists(st.text(st.characters(exclude_categories=())), min_size=1, max_size=6)
MODELS = st.sampled_from(["smollm2", 'a "quoted" \\ name', "模型 ✨", "\x00minivault-slot-0\x00"])


def openai_chunk(shape, object_name: str, choice: dict) -> bytes:
    return b"data: " + json_bytes({"id": shape.id, "object": object_name, "created": shape.created,
                                   "model": shape.model, "choices": [choice]}) + b"\n\n"


@given(TEXTS)
def test_minivault_chunks_are_the_whole_encoding(texts):
    shape = Shape("m")
    assert [shape.piece(t) for t in texts] == [json_bytes({"response": t}) + b"\n" for t in texts]


@given(TEXTS, MODELS)
def test_openai_completion_chunks_are_the_whole_encoding(texts, model):
    shape = OpenAICompletion(model)
    shape.request_id = 7
    assert [shape.piece(t) for t in texts] == [
        openai_chunk(shape, "text_completion", {"index": 0, "text": t, "logprobs": None, "finish_reason": None})
        for t in texts]


@given(TEXTS, MODELS)
def test_openai_chat_chunks_are_the_whole_encoding_the_first_naming_the_role(texts, model):
    shape = OpenAIChat(model)
    shape.request_id = 7
    deltas = [{"role": "assistant", "content": texts[0]}] + [{"content": t} for t in texts[1:]]
    assert [shape.piece(t) for t in texts] == [
        openai_chunk(shape, "chat.completion.chunk", {"index": 0, "delta": d, "logprobs": None, "finish_reason": None})
        for d in deltas]


@given(TEXTS, MODELS, st.lists(st.text(), min_size=6, max_size=6))
def test_ollama_chunks_are_the_whole_encoding_with_each_chunks_own_time(texts, model, times):
    clock = iter(times)
    real = replies.utc_timestamp  # (hypothesis runs many examples a test: no monkeypatch fixture)
    replies.utc_timestamp = lambda timespec="milliseconds": next(clock)
    try:
        generate, chat = OllamaGenerate(model), OllamaChat(model)
        got = [(generate.piece(t), chat.piece(t)) for t in texts[:3]]
    finally:
        replies.utc_timestamp = real
    assert got == [(json_bytes({"model": model, "created_at": times[2 * i], "response": t, "done": False}) + b"\n",
                    json_bytes({"model": model, "created_at": times[2 * i + 1],
                                "message": {"role": "assistant", "content": t}, "done": False}) + b"\n")
                   for i, t in enumerate(texts[:3])]


@given(TEXTS, MODELS)
def test_responses_text_deltas_are_the_whole_encoding_numbered_in_sequence(texts, model):
    shape = OpenAIResponse(model, {})
    shape.request_id = 7
    events = b"".join(shape.piece(t) for t in texts).split(b"\n\n")[:-1]
    opening = [b"response.created", b"response.in_progress", b"response.output_item.added",
               b"response.content_part.added"]
    assert [e.split(b"\n")[0] for e in events[:4]] == [b"event: " + kind for kind in opening]
    assert [e + b"\n\n" for e in events[4:]] == [
        b"event: response.output_text.delta\ndata: " + json_bytes(
            {"type": "response.output_text.delta", "sequence_number": 4 + i, "item_id": shape.item_id,
             "output_index": 0, "content_index": 0, "delta": t, "logprobs": []}) + b"\n\n"
        for i, t in enumerate(texts)]


def test_int_slots_are_their_json():
    template = PieceTemplate(lambda n, text: json_bytes({"n": n, "text": text}), 2)
    for n in (0, 7, -3, 10 ** 30):
        assert template(n, "x") == json_bytes({"n": n, "text": "x"})


def test_a_template_whose_fixed_part_holds_its_mark_renders_each_time():
    calls = []

    def render(text):
        calls.append(text)
        return json_bytes({"fixed": "\x00minivault-slot-0\x00", "text": text})

    template = PieceTemplate(render)
    assert template('say "hi"') == json_bytes({"fixed": "\x00minivault-slot-0\x00", "text": 'say "hi"'})
    assert calls[-1] == 'say "hi"'


def test_reply_ids_differ_between_processes_though_request_ids_restart_at_one():
    """Clients key on these ids (LangGraph replaces a message whose id it has seen): a
    restarted server, or a second replica, must not answer 'resp_1' again."""
    import subprocess
    import sys

    code = ("from replies import OpenAIChat, OpenAIResponse\n"
            "chat, resp = OpenAIChat('m'), OpenAIResponse('m', {})\n"
            "chat.request_id = resp.request_id = 1\n"
            "print(chat.id, resp.id, resp.item_id)")
    root = str(__import__("pathlib").Path(__file__).resolve().parents[1])
    runs = [subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
            .stdout.split() for _ in range(2)]
    assert all(len(ids) == 3 and ids[0].startswith("chatcmpl-") and ids[0].endswith("-1") for ids in runs)
    assert not set(runs[0]) & set(runs[1])
