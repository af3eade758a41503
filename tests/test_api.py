import sys, pathlib; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

# The pure validation and encoding in api.py: bodies in, GenerationRequest or HTTPError out.

import json

import pytest

from api import allowed_hosts_option, gguf_tag, host_allowed, same_origin
from replies import final_fields, ndjson_line
from validation import (
    MAX_JSON_DEPTH, _options_fields, parse_chat, parse_generate, parse_json_body, parse_openai, parse_options,
    completion_prompts,
)
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


# ---------------------------------------------------------------------------
# Issue 11: bodies json.loads accepts but nothing after it can use


@pytest.mark.parametrize("body", [
    rb'{"prompt": "hi", "model": "\ud800"}',
    rb'{"prompt": "a\udfffb"}',
    rb'{"\ud800": 1}',
    rb'{"messages": [{"role": "user", "content": ["\udc00"]}]}',
    rb'{"options": {"stop": ["x\ud83d"]}}',
], ids=["value", "low half", "key", "nested", "high half then nothing"])
def test_lone_surrogate_escape_anywhere_is_400(body):
    assert rejected(parse_json_body, body).message == \
        "request body holds an invalid Unicode escape (lone surrogate)"


def test_surrogate_pair_escape_is_one_character_and_accepted():
    assert parse_json_body(rb'{"prompt": "\ud83d\ude00"}') == {"prompt": "😀"}


@pytest.mark.parametrize("body", [
    b"[" * 100_000,
    b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"a": ' + b"[" * 65 + b"]" * 65 + b"}",
], ids=["unclosed", "closed", "just over the limit"])
def test_deep_nesting_is_400_not_a_recursion_error(body):
    assert "nested deeper than" in rejected(parse_json_body, body).message


def test_nesting_at_the_limit_is_accepted():
    body = b'{"a": ' + b"[" * (MAX_JSON_DEPTH - 1) + b"]" * (MAX_JSON_DEPTH - 1) + b"}"
    assert "a" in parse_json_body(body)


def test_integer_of_thousands_of_digits_is_400():
    assert "too many digits" in rejected(parse_json_body, b'{"seed": ' + b"9" * 5000 + b"}").message


# ---------------------------------------------------------------------------
# Chat messages: a role that is a list or an object (unhashable) is a 400, not a 500


@pytest.mark.parametrize("role", [["user"], {"user": 1}, 5, None, True])
@pytest.mark.parametrize("parse", [
    lambda m: parse_chat({"messages": m}),
    lambda m: parse_openai({"messages": m}, chat=True),
], ids=["ollama", "openai"])
def test_chat_role_of_the_wrong_type_is_400_naming_it(parse, role):
    err = rejected(parse, [{"role": "user", "content": "hi"}, {"role": role, "content": "x"}])
    assert "'messages[1].role'" in err.message


@pytest.mark.parametrize("content", [["hi"], {"text": "hi"}, 5])
def test_ollama_chat_content_of_the_wrong_type_is_400_naming_it(content):
    assert "'messages[0].content'" in rejected(parse_chat, {"messages": [{"role": "user", "content": content}]}).message


@pytest.mark.parametrize("prompt, says", [
    ([], "'prompt' must be a non-empty string"), ([5], "token ids"), ([[504, 2960]], "token ids"),
    (["a", " "], "'prompt[1]' must be a non-empty"), ("  ", "non-empty"), (None, "non-empty")])
def test_completions_prompt_errors_say_what_is_taken(prompt, says):
    assert says in rejected(parse_openai, {"prompt": prompt}, False).message


def test_ollama_generate_with_a_system_prompt_alone_answers_it_as_ollama_does():
    req, _ = parse_generate({"system": "You are a pirate."}, system_alone=True)
    assert req.prompt == "" and req.system == "You are a pirate."
    for body in ({"system": "You are a pirate.", "raw": True}, {"system": "", "prompt": ""}):
        rejected(parse_generate, body, True)  # raw has no turns; nothing at all is no request
    assert "'prompt'" in rejected(parse_generate, {"system": "You are a pirate."}).message  # /generate's own


def test_ollama_num_predict_minus_two_fills_the_context_as_minus_one_does():
    req, _ = parse_generate({"prompt": "hi", "options": {"num_predict": -2}})
    assert req.max_tokens == -1
    assert "'max_tokens'" in rejected(parse_generate, {"prompt": "hi", "max_tokens": -2}).message  # Ollama's alone
    assert "'num_predict'" in rejected(parse_generate, {"prompt": "hi", "options": {"num_predict": -3}}).message


def test_openai_modalities_text_asks_for_nothing_and_audio_is_refused():
    hi = {"messages": [{"role": "user", "content": "hi"}]}
    parse_openai({**hi, "modalities": ["text"]}, chat=True)
    assert "'modalities'" in rejected(parse_openai, {**hi, "modalities": ["text", "audio"]}, True).message


def test_completions_several_prompts_are_taken_but_not_streamed():
    assert completion_prompts(["a", "b"]) == ["a", "b"] and completion_prompts("a") == ["a"]
    req, *_ = parse_openai({"prompt": ["a", "b"]}, chat=False)
    assert req.prompt == "a"
    assert "cannot be streamed" in rejected(parse_openai, {"prompt": ["a", "b"], "stream": True}, False).message


def test_completions_prompt_as_a_list_of_one_is_that_prompt():
    req, *_ = parse_openai({"prompt": ["Hello"]}, chat=False)
    assert req.prompt == "Hello"


def test_stop_lists_are_capped_on_every_parser():
    from validation import MAX_STOPS
    many = [f"s{i}" for i in range(MAX_STOPS + 1)]
    assert "'stop'" in rejected(parse_generate, {"prompt": "hi", "stop": many}).message
    assert "'stop'" in rejected(parse_generate, {"prompt": "hi", "options": {"stop": many}}).message
    assert "'stop'" in rejected(parse_openai, {"prompt": "hi", "stop": many}, False).message
    chat = {"messages": [{"role": "user", "content": "hi"}], "stop": many}
    assert "'stop'" in rejected(parse_openai, chat, True).message
    req, *_ = parse_openai({"prompt": "hi", "stop": many[:MAX_STOPS]}, chat=False)
    assert req.stop == many[:MAX_STOPS]


def test_include_usage_of_the_wrong_type_is_400():
    body = {"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": "yes"}}
    assert "include_usage" in rejected(parse_openai, body, True).message


# ---------------------------------------------------------------------------
# Options: top-level fields win over `options`, aliases included


@pytest.mark.parametrize("top, inner", [
    ({"max_tokens": 10}, {"num_predict": 3}),
    ({"num_predict": 10}, {"max_tokens": 3}),
    ({"max_tokens": 10}, {"max_tokens": 3}),
])
def test_top_level_max_tokens_wins_over_either_alias_in_options(top, inner):
    _, max_tokens, _ = parse_options(_options_fields({**top, "options": inner}))
    assert max_tokens == 10


def test_max_tokens_in_options_alone_is_used():
    _, max_tokens, _ = parse_options(_options_fields({"options": {"num_predict": 3}}))
    assert max_tokens == 3


# ---------------------------------------------------------------------------
# Options: ranges, the penalties, the seed, the temperature epsilon


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), "str", {}, [], True, 2.01, -2.5])
def test_openai_penalty_outside_its_range_or_type_is_400_naming_it(name, value):
    assert f"'{name}'" in rejected(parse_options, {name: value}).message


@pytest.mark.parametrize("name", ["temperature", "top_p", "repeat_penalty", "presence_penalty", "mirostat", "tfs_z"])
def test_an_integer_too_large_for_a_float_is_400_naming_the_field(name):
    # 400 digits is valid JSON; float() of it raises OverflowError, which was a 500
    assert f"'{name}'" in rejected(parse_options, {name: 10 ** 400}).message
    assert f"'{name}'" in rejected(parse_options, {name: -10 ** 400}).message


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_openai_penalties_reach_sampling_from_every_endpoint(name):
    s, _, _ = parse_options({name: -1.5})
    assert getattr(s, name) == -1.5
    req, *_ = parse_openai({"prompt": "hi", name: 2}, chat=False)
    assert getattr(req.sampling, name) == 2.0
    req, _ = parse_generate({"prompt": "hi", "options": {name: 0.5}})
    assert getattr(req.sampling, name) == 0.5


@pytest.mark.parametrize("seed, expected", [
    (42, 42),
    (-1, 2 ** 64 - 1),
    (2 ** 64, 0),
    (2 ** 70 + 5, 5),
    (1e308, int(1e308) % 2 ** 64),
    (-5.0, 2 ** 64 - 5),
])
def test_any_integer_seed_is_reduced_to_the_generator_range(seed, expected):
    s, _, _ = parse_options({"seed": seed})
    assert s.seed == expected and 0 <= s.seed < 2 ** 64


@pytest.mark.parametrize("seed", [1.5, "7", float("nan"), float("inf")])
def test_seed_that_is_no_integer_is_400(seed):
    assert "'seed'" in rejected(parse_options, {"seed": seed}).message


def test_openai_endpoints_take_openai_temperature_range_and_ollama_its_own():
    from validation import parse_responses

    assert "'temperature'" in rejected(parse_openai, {"prompt": "hi", "temperature": 2.5}, False).message
    assert "'temperature'" in rejected(parse_responses, {"input": "hi", "temperature": 2.5}).message
    assert parse_openai({"prompt": "hi", "temperature": 2}, False)[0].sampling.temperature == 2.0
    assert parse_generate({"prompt": "hi", "temperature": 50})[0].sampling.temperature == 50.0


@pytest.mark.parametrize("temperature, expected", [(1e-300, 0.0), (5e-5, 0.0), (1e-4, 1e-4), (0.7, 0.7)])
def test_temperature_too_small_to_divide_by_is_greedy(temperature, expected):
    s, _, _ = parse_options({"temperature": temperature})
    assert s.temperature == expected


@pytest.mark.parametrize("field, value", [
    ("repeat_penalty", 0.009),
    ("repeat_penalty", 10.5),
    ("top_k", 1_000_001),
    ("top_k", 10 ** 30),
    ("mirostat", 1),
    ("mirostat", "2"),
    ("tfs_z", 0.95),
    ("typical_p", 0.5),
    ("min_p", 0.05),
    ("repeat_last_n", 128),
], ids=lambda v: repr(v))
def test_option_we_cannot_honour_or_out_of_range_is_400_naming_it(field, value):
    assert f"'{field}'" in rejected(parse_generate, {"prompt": "hi", "options": {field: value}}).message


def test_options_at_their_neutral_values_and_resource_options_are_accepted():
    options = {"mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "tfs_z": 1.0, "typical_p": 1,
               "min_p": 0.0, "repeat_last_n": 64, "penalize_newline": True, "num_ctx": 4096,
               "num_thread": 4, "num_gpu": 0, "num_batch": 512, "use_mmap": True, "use_mlock": False,
               "numa": False, "low_vram": False, "main_gpu": 0, "num_keep": 4,
               "repeat_penalty": 0.01, "top_k": 1_000_000}
    req, _ = parse_generate({"prompt": "hi", "options": options})
    assert (req.sampling.repeat_penalty, req.sampling.top_k) == (0.01, 1_000_000)


# ---------------------------------------------------------------------------
# Host names (DNS rebinding) and same-origin pages


@pytest.mark.parametrize("host, allowed, ok", [
    ("127.0.0.1:3000", (), True),
    ("127.1.2.3", (), True),
    ("localhost:3000", (), True),
    ("LocalHost", (), True),
    ("[::1]:3000", (), True),
    ("[::1]", (), True),
    (None, (), True),  # HTTP/1.0 without Host: no browser
    ("evil.example:3000", (), False),
    ("evil.example", (), False),
    ("localhost.evil.example", (), False),
    ("127.0.0.1.evil.example", (), False),
    ("myhost.lan:3000", ("myhost.lan",), True),
    ("other.lan:3000", ("myhost.lan",), False),
    ("evil.example", None, True),
    ("evil.example", ("*",), True),
])
def test_host_allowed(host, allowed, ok):
    assert host_allowed(host, allowed) is ok


@pytest.mark.parametrize("value, loopback, expected", [
    (None, True, ()),
    (None, False, None),
    ("myhost.lan, Other.lan:3000", True, ("myhost.lan", "other.lan")),
    ("*", True, None),
    ("a.lan,*", False, None),
])
def test_allowed_hosts_option(value, loopback, expected):
    assert allowed_hosts_option(value, loopback) == expected


@pytest.mark.parametrize("origin, host, same", [
    ("http://127.0.0.1:3000", "127.0.0.1:3000", True),
    ("http://192.168.1.5:3000", "192.168.1.5:3000", True),
    ("http://evil.example", "127.0.0.1:3000", False),
    ("null", "127.0.0.1:3000", False),
    ("http://127.0.0.1:3000", None, False),
])
def test_same_origin(origin, host, same):
    assert same_origin(origin, host) is same


# ---------------------------------------------------------------------------
# OpenAI endpoints: sampling fields beyond OpenAI's are honoured or refused, never dropped


def test_openai_top_k_and_repeat_penalty_reach_sampling_under_either_name():
    from validation import parse_responses

    for parse, base in ((parse_openai, ({"prompt": "hi"}, False)),
                        (parse_openai, ({"messages": [{"role": "user", "content": "hi"}]}, True)),
                        (parse_responses, ({"input": "hi"},))):
        body, *rest = base
        req, *_ = parse({**body, "top_k": 7, "repetition_penalty": 1.3}, *rest)
        assert (req.sampling.top_k, req.sampling.repeat_penalty) == (7, 1.3)
        req, *_ = parse({**body, "repeat_penalty": 1.2}, *rest)
        assert req.sampling.repeat_penalty == 1.2


@pytest.mark.parametrize("field, value", [("min_p", 0.05), ("typical_p", 0.5), ("mirostat", 2), ("tfs_z", 0.9),
                                          ("top_k", "x"), ("repetition_penalty", -1), ("options", {"top_k": 3})])
def test_openai_sampling_field_it_cannot_honour_is_400_naming_it(field, value):
    from validation import parse_responses

    assert f"'{field}'" in rejected(parse_openai, {"prompt": "hi", field: value}, False).message
    assert f"'{field}'" in rejected(parse_openai, {"messages": [{"role": "user", "content": "hi"}], field: value},
                                    True).message
    assert f"'{field}'" in rejected(parse_responses, {"input": "hi", field: value}).message


def test_max_completion_tokens_is_named_in_its_own_errors_and_wins_over_max_tokens():
    message = rejected(parse_openai, {"messages": [{"role": "user", "content": "hi"}],
                                      "max_completion_tokens": "x"}, True).message
    assert "'max_completion_tokens'" in message
    req, *_ = parse_openai({"prompt": "hi", "max_tokens": 3, "max_completion_tokens": 5}, False)
    assert req.max_tokens == 5


@pytest.mark.parametrize("value", ["x", 2.5, {}, 1])
def test_parallel_tool_calls_of_the_wrong_type_is_400_with_or_without_tools(value):
    from validation import parse_responses

    chat = {"messages": [{"role": "user", "content": "hi"}], "parallel_tool_calls": value}
    assert "'parallel_tool_calls'" in rejected(parse_openai, chat, True).message
    assert "'parallel_tool_calls'" in rejected(parse_responses, {"input": "hi", "parallel_tool_calls": value}).message


@pytest.mark.parametrize("value", [[], False, 0, "", "int8"])
def test_embeddings_encoding_format_of_another_value_or_type_is_400(value):
    from validation import parse_openai_embeddings

    assert "'encoding_format'" in rejected(parse_openai_embeddings, {"input": "hi", "encoding_format": value}).message
    assert parse_openai_embeddings({"input": "hi", "encoding_format": None}) == (["hi"], "float")


@pytest.mark.parametrize("value", ["x", [], {"a": 1}])
def test_responses_metadata_that_is_no_object_of_strings_is_400(value):
    from validation import parse_responses

    assert "'metadata'" in rejected(parse_responses, {"input": "hi", "metadata": value}).message
    parse_responses({"input": "hi", "metadata": {"a": "b"}})


def test_tool_call_arguments_nested_deeper_than_python_parses_is_400_naming_them():
    deep = "[" * 100_000 + "]" * 100_000
    body = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": deep}}]},
                         {"role": "tool", "content": "ok"}]}
    assert "'messages[1].tool_calls[0].function.arguments'" in rejected(parse_openai, body, True).message


@pytest.mark.parametrize("path, tag", [
    ("/m/smollm2-135m-instruct.Q4_1.gguf", "Q4_1"),
    ("model.q8_0.gguf", "Q8_0"),
    ("/models/model.gguf", None),  # was 'MODEL'
    ("/home/a.b/model.gguf", None),  # was 'B/MODEL': a dot in a folder's name
    ("/home/a.b/.gguf", None),
])
def test_the_quantization_listed_for_a_gguf_file_is_the_tag_in_its_file_name(path, tag):
    assert gguf_tag(path) == tag


@pytest.mark.parametrize("parse, body, field", [
    (parse_generate, {"prompt": "hi", "stream": "yes"}, "'stream'"),
    (parse_generate, {"prompt": "hi", "raw": 1}, "'raw'"),
    (parse_chat, {"messages": [{"role": "user", "content": "hi"}], "stream": "no"}, "'stream'"),
    (lambda b: parse_openai(b, True), {"messages": [{"role": "user", "content": "hi"}],
                                       "stream_options": {"include_usage": "yes"}}, "'stream_options.include_usage'"),
    (lambda b: parse_openai(b, True), {"messages": [{"role": "user", "content": "hi"}],
                                       "parallel_tool_calls": "yes"}, "'parallel_tool_calls'"),
])
def test_a_flag_that_is_not_true_or_false_is_400_naming_it(parse, body, field):
    assert field in rejected(parse, body).message


def test_a_null_flag_takes_its_default():
    assert parse_generate({"prompt": "hi", "stream": None, "raw": None})[1] is True
    assert parse_openai({"prompt": "hi", "stream": None, "stream_options": {"include_usage": None}}, False)[1:3] \
        == (False, False)


# ---------------------------------------------------------------------------
# A field the server cannot honour: 0 asks for something, except a count of 0

def test_zero_asks_for_something_unless_it_counts_nothing():
    from validation import parse_responses
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert "'max_tool_calls'" in rejected(parse_responses, {"input": "hi", "max_tool_calls": 0}).message
    refused = rejected(parse_responses, {"input": "hi", "max_tokens": 0}).message
    assert "'max_tokens'" in refused and "/v1/responses" in refused and "max_output_tokens" in refused
    assert "'logprobs'" in rejected(parse_openai, {"prompt": "hi", "logprobs": 0}, False).message
    parse_responses({"input": "hi", "top_logprobs": 0})
    parse_openai({**chat, "top_logprobs": 0, "logprobs": False, "function_call": "none"}, True)
    parse_openai({"prompt": "hi", "suffix": "", "logprobs": None}, False)
