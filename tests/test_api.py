import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# The pure validation and encoding in api.py: bodies in, GenerationRequest or HTTPError out.

import json

import pytest

from api import final_fields, ndjson_line, parse_generate, parse_json_body
from engine import Final, Stats
from httpserver import HTTPError


def rejected(fn, *args) -> HTTPError:
    with pytest.raises(HTTPError) as info:
        fn(*args)
    assert info.value.status == 400
    return info.value


# ---------------------------------------------------------------------------
# parse_json_body


@pytest.mark.parametrize("body, says", [
    (b"", "empty"),
    (b"  \r\n\t ", "empty"),
    (b'{"prompt": "hi"', "invalid JSON"),
    (b"{'prompt': 'hi'}", "invalid JSON"),
    (b'{"prompt": "\xff\xfe"}', "UTF-8"),
    (b'["prompt"]', "JSON object"),
    (b'"prompt"', "JSON object"),
    (b"42", "JSON object"),
    (b"null", "JSON object"),
])
def test_bad_body_is_400_saying_what_is_wrong(body, says):
    assert says in rejected(parse_json_body, body).message


def test_json_object_body_is_returned_as_dict():
    assert parse_json_body('{"prompt": "héllo 😀"}'.encode()) == {"prompt": "héllo 😀"}


# ---------------------------------------------------------------------------
# parse_generate: the prompt


@pytest.mark.parametrize("body", [
    {},
    {"prompt": None},
    {"prompt": ""},
    {"prompt": " \n\t "},
    {"prompt": 42},
    {"prompt": ["hi"]},
    {"prompt": {"text": "hi"}},
], ids=["missing", "null", "empty", "whitespace", "number", "list", "object"])
def test_bad_prompt_is_400_naming_prompt(body):
    assert "prompt" in rejected(parse_generate, body).message


# ---------------------------------------------------------------------------
# parse_generate: optional fields of the wrong type or range


@pytest.mark.parametrize("field, value", [
    ("temperature", "hot"),
    ("temperature", True),
    ("temperature", -0.5),
    ("top_p", 0),
    ("top_p", 1.5),
    ("top_k", -1),
    ("top_k", 1.5),
    ("repeat_penalty", 0),
    ("seed", "x"),
    ("stop", 5),
    ("stop", [1]),
    ("max_tokens", 0),
    ("max_tokens", "10"),
    ("max_tokens", 2.5),
    ("num_predict", 0),
    ("num_predict", "10"),
    ("raw", "yes"),
    ("stream", "no"),
    ("system", 5),
    ("options", []),
    ("options", "temperature=0"),
], ids=lambda v: repr(v))
def test_wrong_field_is_400_naming_the_field(field, value):
    assert f"'{field}'" in rejected(parse_generate, {"prompt": "hi", field: value}).message


def test_wrong_field_inside_options_is_400_naming_the_field():
    err = rejected(parse_generate, {"prompt": "hi", "options": {"temperature": "hot"}})
    assert "'temperature'" in err.message


# ---------------------------------------------------------------------------
# parse_generate: valid requests


def test_prompt_alone_gets_defaults_and_streams():
    req, stream = parse_generate({"prompt": "What is an AI model?"})
    assert stream is True
    assert req.prompt == "What is an AI model?"
    assert (req.system, req.raw, req.max_tokens, req.stop) == (None, False, None, [])


def test_full_request_maps_every_field():
    req, stream = parse_generate({
        "prompt": "Hi", "system": "Be brief.", "raw": True, "stream": False, "max_tokens": 5,
        "temperature": 0, "top_p": 0.5, "top_k": 3, "seed": 42, "stop": ["\n", "END"],
        "repeat_penalty": 1.2,
    })
    assert stream is False
    assert (req.prompt, req.system, req.raw, req.max_tokens, req.stop) == ("Hi", "Be brief.", True, 5, ["\n", "END"])
    s = req.sampling
    assert (s.temperature, s.top_p, s.top_k, s.seed, s.repeat_penalty) == (0.0, 0.5, 3, 42, 1.2)


def test_temperature_zero_is_kept_as_greedy():
    req, _ = parse_generate({"prompt": "hi", "temperature": 0})
    assert req.sampling.temperature == 0


def test_stop_as_string_becomes_a_list():
    req, _ = parse_generate({"prompt": "hi", "stop": "END"})
    assert req.stop == ["END"]


def test_stop_as_list_is_kept():
    req, _ = parse_generate({"prompt": "hi", "stop": ["a", "b"]})
    assert req.stop == ["a", "b"]


def test_num_predict_is_an_alias_of_max_tokens():
    req, _ = parse_generate({"prompt": "hi", "num_predict": 7})
    assert req.max_tokens == 7


def test_max_tokens_minus_one_means_until_the_context_is_full():
    req, _ = parse_generate({"prompt": "hi", "max_tokens": -1})
    assert req.max_tokens == -1


def test_ollama_options_are_merged_and_top_level_fields_win():
    req, _ = parse_generate({"prompt": "hi", "temperature": 0.5,
                             "options": {"temperature": 0.2, "seed": 7, "num_predict": 9, "stop": ["x"]}})
    assert req.sampling.temperature == 0.5
    assert req.sampling.seed == 7
    assert req.max_tokens == 9
    assert req.stop == ["x"]


# ---------------------------------------------------------------------------
# final_fields and ndjson_line


def test_final_fields_use_ollama_names_and_integer_nanoseconds():
    stats = Stats(prompt_tokens=12, completion_tokens=87, load_ns=0, prompt_eval_ns=21_000_000,
                  eval_ns=1_790_000_000, total_ns=1_840_000_000)
    fields = final_fields(Final("stop", stats))
    assert fields == {"done": True, "done_reason": "stop", "prompt_eval_count": 12, "eval_count": 87,
                      "total_duration": 1_840_000_000, "load_duration": 0,
                      "prompt_eval_duration": 21_000_000, "eval_duration": 1_790_000_000}
    for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert type(fields[name]) is int


@pytest.mark.parametrize("text", ["plain", "two\nlines\n", "cr\r\nlf", "", "quote \" and 😀 世界"])
def test_ndjson_line_is_one_object_and_one_newline(text):
    line = ndjson_line({"response": text})
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert json.loads(line) == {"response": text}
