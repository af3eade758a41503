"""Constrained decoding without a model: grammars, row masks, the tools grammar and
the reader that turns output back into calls."""

from __future__ import annotations

import json
import re
from typing import Optional

import openai
import pytest
import torch
from pydantic import BaseModel

from constraints import Constraint, ConstraintInvalid, Grammars
from schemas import closed_objects, moved_under
from sampling import RowSampler
from engine import Sampling
import tools as toolcalls

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "color", "size"],
          "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                         "size": {"type": "integer", "minimum": 0, "maximum": 9}}}


# pydantic's schemas for a nested model and a recursive one use $ref into $defs.

class Loc(BaseModel):
    city: str


class GetWeather(BaseModel):
    loc: Loc


class Node(BaseModel):
    value: int
    next: Optional[Node] = None


@pytest.fixture(scope="module")
def grammars(tiny_gpt2_folder):
    tokenizer_json = (tiny_gpt2_folder / "tokenizer.json").read_text()
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer_json)
    eos = backend.token_to_id("<|endoftext|>")
    return Grammars(tokenizer_json, [eos], backend.get_vocab_size()), backend, eos


def sample_under(grammars, constraint, seed: int, steps: int = 400, width_extra: int = 0) -> str:
    """Random logits, masked by the grammar, sampled until the end token."""
    g, backend, eos = grammars
    generator = torch.Generator().manual_seed(seed)
    sampler = RowSampler(Sampling(temperature=1.0, top_k=0, top_p=1.0, repeat_penalty=1.0), seed, [0],
                         g.row(constraint))
    out = []
    for _ in range(steps):
        logits = torch.randn(backend.get_vocab_size() + width_extra, generator=generator) * 3
        token = sampler.next(logits)
        if token == eos:
            break
        out.append(token)
        if sampler.complete:
            break
    else:
        pytest.fail("the grammar never let the output end")
    return backend.decode(out)


def test_random_logits_under_a_schema_always_give_valid_json(grammars):
    constraint = Constraint.json(SCHEMA)
    for seed in range(20):
        value = json.loads(sample_under(grammars, constraint, seed))
        assert set(value) == {"ok", "color", "size"}
        assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue")
        assert isinstance(value["size"], int) and 0 <= value["size"] <= 9


def test_logits_wider_than_the_vocabulary_never_pick_a_padding_id(grammars):
    constraint = Constraint.json(SCHEMA)
    for seed in range(5):
        json.loads(sample_under(grammars, constraint, seed, width_extra=64))


def test_greedy_masked_pick_is_the_best_allowed_token(grammars):
    g, backend, eos = grammars
    row = g.row(Constraint.json(SCHEMA))
    logits = torch.randn(backend.get_vocab_size())
    masked = row.masked(logits)
    allowed = torch.isfinite(masked)
    assert 0 < int(allowed.sum()) < logits.numel()
    assert torch.equal(masked[allowed], logits[allowed].float())  # allowed logits are untouched
    assert int(torch.argmax(masked)) == int(torch.argmax(torch.where(allowed, logits, -torch.inf)))


def test_compiled_grammars_are_cached_and_each_row_has_its_own_state(grammars):
    g, backend, eos = grammars
    constraint = Constraint.json(SCHEMA)
    a, b = g.row(constraint), g.row(constraint)
    assert len([k for k in g._compiled if k == constraint.grammar]) == 1
    for token in backend.encode('{"ok": true').ids:
        a.advance(token)
    assert not torch.equal(torch.isfinite(a.masked(torch.zeros(backend.get_vocab_size()))),
                           torch.isfinite(b.masked(torch.zeros(backend.get_vocab_size()))))


@pytest.mark.parametrize("schema", [{"type": "objekt"}, {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}},
                                    # llguidance takes no integer past 64 bits: it raised ValueError (a 500)
                                    {"type": "integer", "maximum": 10 ** 30}, {"const": -10 ** 30}])
def test_a_schema_that_cannot_compile_is_refused_with_the_reason(schema):
    with pytest.raises(ConstraintInvalid):
        Constraint.json(schema)


def test_a_schema_number_llguidance_cannot_hold_is_refused_not_raised():
    # grammar_from_json_schema raised a bare ValueError ("not JSON serializable"): a 500
    schema = {"type": "integer", "minimum": 10 ** 400}
    with pytest.raises(ConstraintInvalid):
        Constraint.json(schema)
    with pytest.raises(toolcalls.ToolsInvalid):
        toolcalls.call_constraint([toolcalls.Tool("f", "", {"type": "object", "properties": {"a": schema}})],
                                  "required")


LOOKAHEAD = {"type": "object", "properties": {"code": {"type": "string", "pattern": "(?=a)b"}}}


def test_a_refused_schema_says_why_and_a_refused_tool_is_named():
    # llguidance's regex error spans lines; the first alone said only "regex parse error:".
    with pytest.raises(ConstraintInvalid, match="look-around.* is not supported"):
        Constraint.json(LOOKAHEAD)
    ok = toolcalls.Tool("ok", "", {"type": "object", "properties": {"a": {"type": "string"}}})
    bad = toolcalls.Tool("lookup", "", LOOKAHEAD)
    unique = toolcalls.Tool("tags", "", {"type": "object", "properties": {"t": {"type": "array", "uniqueItems": True}}})
    for tools, says in (([ok, bad], "'lookup'.*look-around"), ([unique, ok], "'tags'.*uniqueItems")):
        with pytest.raises(toolcalls.ToolsInvalid, match="'tools': the parameters of " + says):
            toolcalls.call_constraint(tools, "required")


ITSELF = {"x": {"$ref": "#/$defs/x"}}
# References that loop without reaching a value. llguidance compiles each and fails only
# when the output reaches the loop: at once, after '{"a": ', or never letting it end.
LOOPS = {
    "a ref to itself": ({"$ref": "#/$defs/x", "$defs": ITSELF}, "#/$defs/x"),
    "a required property": ({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "required": ["a"],
                             "$defs": ITSELF}, "#/$defs/x"),
    "an optional property": ({"type": "object", "properties": {"a": {"$ref": "#/$defs/x"}}, "$defs": ITSELF},
                             "#/$defs/x"),
    "through anyOf and oneOf": ({"$ref": "#/$defs/a", "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/b"}]},
                                                               "b": {"oneOf": [{"$ref": "#/$defs/a"}]}}}, "#/$defs/a"),
    "an object requiring itself": ({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}, "#"),
    "a list of at least one of itself": ({"type": "object", "required": ["a"], "properties": {
        "a": {"type": "array", "items": {"$ref": "#"}, "minItems": 1}}}, "#"),
    "an escaped pointer": ({"$ref": "#/$defs/a~1b%20c", "$defs": {"a/b c": {"$ref": "#/$defs/a~1b%20c"}}},
                           "#/$defs/a~1b%20c"),
}


@pytest.mark.parametrize("schema, ref", LOOPS.values(), ids=LOOPS.keys())
def test_references_no_value_can_match_are_refused_naming_the_ref(grammars, schema, ref):
    with pytest.raises(ConstraintInvalid, match="no finite JSON value matches '\\$ref' " + re.escape(repr(ref))):
        Constraint.json(schema)
    with pytest.raises(toolcalls.ToolsInvalid, match="'tools': the parameters of 'f' .*: no finite JSON value"):
        toolcalls.call_constraint([toolcalls.Tool("f", "", schema)], "required")


RECURSIVE = {
    "optional by anyOf": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
    "a list of itself": {"type": "object", "required": ["a"],
                         "properties": {"a": {"type": "array", "items": {"$ref": "#"}}}},
    "pydantic's recursive model": Node.model_json_schema(),
    "unused": {"type": "object", "properties": {"n": {"type": "integer"}}, "$defs": ITSELF},
    "its own $id": {"type": "object", "required": ["s"], "$defs": ITSELF,
                    "properties": {"s": {"$id": "urn:s", "$ref": "#/$defs/x", "$defs": {"x": {"type": "integer"}}}}},
}


@pytest.mark.parametrize("schema", RECURSIVE.values(), ids=RECURSIVE.keys())
def test_recursive_schemas_a_value_can_end_are_served(grammars, schema):
    constraint = Constraint.json(schema)
    g, backend, eos = grammars
    g.row(constraint).masked(torch.zeros(backend.get_vocab_size()))  # no error at the first token


WEATHER = toolcalls.Tool("get_weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = toolcalls.Tool("get_time", "The time now", {"type": "object", "properties": {}})


def accepts(grammars, constraint, text: str) -> bool:
    g, backend, eos = grammars
    row = g.row(constraint)
    try:
        for token in backend.encode(text).ids + [eos]:
            row.advance(token)
    except RuntimeError:
        return False
    return True


def test_tools_grammar_allows_text_or_calls_with_valid_arguments_only(grammars):
    auto = toolcalls.call_constraint([WEATHER, TIME], "auto", parallel=True)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    two = call + "\n" + call.replace("get_weather", "get_time").replace('"city": "Oslo"', "")
    assert accepts(grammars, auto, "It is sunny.")
    assert accepts(grammars, auto, call)
    assert accepts(grammars, auto, two)
    assert not accepts(grammars, toolcalls.call_constraint([WEATHER, TIME], "auto"), two)  # one call by default
    assert not accepts(grammars, auto, call.replace('"Oslo"}', '"Oslo", "zip": 1}'))  # parameters are closed
    assert not accepts(grammars, auto, call.replace('"city"', '"town"'))  # required argument missing
    assert not accepts(grammars, auto, call.replace("get_weather", "get_mood"))  # no such tool
    required = toolcalls.call_constraint([WEATHER, TIME], "required")
    assert not accepts(grammars, required, "It is sunny.")
    named = toolcalls.call_constraint([WEATHER, TIME], "get_time", parallel=False)
    assert accepts(grammars, named, '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert not accepts(grammars, named, call)
    json_or_calls = toolcalls.call_constraint([WEATHER], "auto", text_schema=SCHEMA, text_json=True)
    assert accepts(grammars, json_or_calls, '{"ok": true, "color": "red", "size": 3}')
    assert not accepts(grammars, json_or_calls, "It is sunny.")


def test_random_logits_under_required_tools_always_give_calls_that_parse(grammars):
    # Bounded arguments: random logits would fill a free string forever.
    light = toolcalls.Tool("set_light", "", {**SCHEMA, "required": ["ok"]})
    clock = toolcalls.Tool("get_time", "", {"type": "object", "properties": {}, "additionalProperties": False})
    constraint = toolcalls.call_constraint([light, clock], "required", parallel=False)
    for seed in range(10):
        content, calls = toolcalls.ToolCallReader().feed(sample_under(grammars, constraint, seed))
        assert content == "" and len(calls) == 1
        assert calls[0]["arguments"] == {} if calls[0]["name"] == "get_time" else \
            isinstance(calls[0]["arguments"]["ok"], bool)


def read_calls_in_chunks(text: str, size: int) -> list[dict]:
    """The calls a reader finds in `text` fed `size` characters at a time (all calls: no
    content, nothing left over)."""
    reader = toolcalls.ToolCallReader()
    calls = []
    for i in range(0, len(text), size):
        content, found = reader.feed(text[i:i + size])
        assert content == ""
        calls += found
    assert reader.finish() == ""
    return calls


def test_reader_splits_text_and_calls_across_any_chunking():
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    for size in (1, 3, 7, len(text)):
        calls = read_calls_in_chunks(text, size)
        assert [(c["name"], c["arguments"]) for c in calls] == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
        assert len({c["id"] for c in calls}) == 2
    reader = toolcalls.ToolCallReader()
    assert reader.feed("Sunny") == ("Sunny", []) and reader.feed(" <b>") == (" <b>", [])
    cut = toolcalls.ToolCallReader()
    assert cut.feed('<tool_call>\n{"name": "get_') == ("", []) and cut.finish() == '<tool_call>\n{"name": "get_'


def test_a_call_nested_deeper_than_python_parses_is_not_read_and_raises_nothing():
    # An object schema without properties lets a reply nest as deep as its tokens go;
    # json.loads raised RecursionError out of the reply's encoding (an error line, a 500)
    deep = '{"name": "f", "arguments": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}"
    reader = toolcalls.ToolCallReader()
    assert reader.feed(f"<tool_call>\n{deep}\n</tool_call>") == ("", []) and reader.calls == []


def test_reader_takes_calls_whose_arguments_hold_the_tags_themselves(grammars):
    # The grammar lets a string argument hold any text, tags included: the call ends at
    # the closing tag after its JSON, not at the first one inside a string.
    echo = toolcalls.Tool("echo", "", {"type": "object", "properties": {"text": {"type": "string"}},
                                       "required": ["text"]})
    text = ('<tool_call>\n{"name": "echo", "arguments": {"text": "a </tool_call> b <tool_call> c"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "echo", "arguments": {"text": "</tool_call>"}}\n</tool_call>')
    assert accepts(grammars, toolcalls.call_constraint([echo], "required", parallel=True), text)
    for size in (1, 2, 5, len(text)):
        calls = read_calls_in_chunks(text, size)
        assert [c["arguments"]["text"] for c in calls] == ["a </tool_call> b <tool_call> c", "</tool_call>"]


def test_call_arguments_are_an_object_whatever_the_parameters_allow(grammars):
    # {} (or a schema without a type) allows any value: a string or a list of arguments
    # would break every client, which reads them as an object.
    for parameters in ({}, {"anyOf": [{"type": "string"}, {"type": "object"}]}, {"description": "anything"}):
        required = toolcalls.call_constraint(toolcalls.parse_tools(
            [{"type": "function", "function": {"name": "f", "parameters": parameters}}]), "required")
        assert accepts(grammars, required, '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
        for value in ('"Paris"', "[1]", "3", "null"):
            assert not accepts(grammars, required, '<tool_call>\n{"name": "f", "arguments": %s}\n</tool_call>' % value)
        for seed in range(4):
            _, calls = toolcalls.ToolCallReader().feed(sample_under(grammars, required, seed))
            assert isinstance(calls[0]["arguments"], dict)
    for kind in ("string", "array", ["string", "null"]):
        with pytest.raises(toolcalls.ToolsInvalid, match=r"'tools\[0\].function.parameters' must be a schema of type"):
            toolcalls.parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": kind}}}])
    toolcalls.parse_tools([{"type": "function", "function": {"name": "f", "parameters": {"type": ["object", "null"]}}}])


def test_tools_are_described_in_the_system_turn():
    messages = toolcalls.with_tools([{"role": "user", "content": "hi"}], [WEATHER])
    assert messages[0]["role"] == "system" and '"name": "get_weather"' in messages[0]["content"]
    kept = toolcalls.with_tools([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                                [WEATHER])
    assert len(kept) == 2 and kept[0]["content"].startswith("Be brief.\n\n# Tools")


@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, "'tools' must be a list"),
    ([{"type": "function", "function": {"name": "bad name"}}], "'tools[0].function.name'"),
    ([{"type": "retrieval"}], "'tools[0]'"),
    ([{"type": "function", "function": {"name": "f", "parameters": []}}], "'tools[0].function.parameters'"),
    ([{"type": "function", "function": {"name": "f"}}] * 2, "given twice"),
])
def test_bad_tools_are_refused_naming_the_field(tools, message):
    with pytest.raises(toolcalls.ToolsInvalid, match=message.replace("[", r"\[").replace("]", r"\]")):
        toolcalls.parse_tools(tools)


def test_tool_choice_values():
    assert toolcalls.parse_tool_choice(None, [WEATHER]) == "auto"
    assert toolcalls.parse_tool_choice({"type": "function", "function": {"name": "get_weather"}},
                                       [WEATHER]) == "get_weather"
    for bad in ("always", {"type": "function", "function": {"name": "nope"}}):
        with pytest.raises(toolcalls.ToolsInvalid, match="tool_choice"):
            toolcalls.parse_tool_choice(bad, [WEATHER])


def test_closed_objects_closes_only_what_says_nothing():
    schema = {"type": "object", "$defs": {"D": {"properties": {"x": {}}}},
              "properties": {"properties": {"type": "object", "properties": {"a": {}}},
                             "free": {"type": "object", "properties": {}, "additionalProperties": True},
                             "any": {"anyOf": [{"$ref": "#/$defs/D"}, {"type": "null"}]},
                             "list": {"items": {"properties": {"y": {}}}}}}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False and "additionalProperties" not in schema
    assert closed["$defs"]["D"]["additionalProperties"] is False
    assert set(closed["properties"]) == {"properties", "free", "any", "list"}  # names, not keywords
    assert closed["properties"]["properties"]["additionalProperties"] is False
    assert closed["properties"]["free"]["additionalProperties"] is True
    assert closed["properties"]["list"]["items"]["additionalProperties"] is False
    assert closed_objects({"type": "object"}) == {"type": "object"}  # "json": any object
    merged = {"allOf": [{"properties": {"a": {}}, "required": ["a"]}, {"properties": {"b": {}}, "required": ["b"]}]}
    assert closed_objects(merged) == merged  # closing each part would make it unsatisfiable
    # a key required but not listed keeps any value, rather than nothing matching at all
    undeclared = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name", "age"]}
    assert closed_objects(undeclared)["properties"] == {"name": {"type": "string"}, "age": {}}
    assert "age" not in undeclared["properties"]
    Constraint.json(undeclared)  # was refused: "required property 'age' is unsatisfiable"


def weather_call(arguments: str, name: str = "get_weather") -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


@pytest.mark.parametrize("parameters", [GetWeather.model_json_schema(),
                                        openai.pydantic_function_tool(GetWeather)["function"]["parameters"]],
                         ids=["model_json_schema", "pydantic_function_tool"])
def test_tool_parameters_with_defs_constrain_the_call_as_the_model_says(grammars, parameters):
    """pydantic puts a nested model in $defs and refers to it with "#/$defs/Loc": the
    pointer is relative to the parameters, not to the call around them."""
    constraint = toolcalls.call_constraint([toolcalls.Tool("get_weather", "", parameters)], "required")
    assert accepts(grammars, constraint, weather_call('{"loc": {"city": "Oslo"}}'))
    assert not accepts(grammars, constraint, weather_call('{"loc": "Oslo"}'))
    assert not accepts(grammars, constraint, weather_call('{"loc": {"town": "Oslo"}}'))


def test_recursive_tool_parameters_recurse_into_themselves_not_into_the_call(grammars):
    by_root = {"type": "object", "required": ["value", "next"],
               "properties": {"value": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}}
    for parameters in (by_root, Node.model_json_schema()):
        constraint = toolcalls.call_constraint([toolcalls.Tool("walk", "", parameters)], "required")
        assert accepts(grammars, constraint, weather_call('{"value": 1, "next": {"value": 2, "next": null}}', "walk"))
        inner_call = '{"name": "walk", "arguments": {"value": 2, "next": null}}'
        assert not accepts(grammars, constraint, weather_call(f'{{"value": 1, "next": {inner_call}}}', "walk"))


def test_each_tool_refers_to_its_own_definitions(grammars):
    """Draft-07 `definitions` (pydantic v1), a pointer into `properties`, and two tools
    whose definitions share a name."""
    by_city = toolcalls.Tool("by_city", "", {"type": "object", "required": ["loc"],
                                             "properties": {"loc": {"$ref": "#/definitions/Loc"}},
                                             "definitions": {"Loc": {"type": "string"}}})
    by_point = toolcalls.Tool("by_point", "", {"type": "object", "required": ["loc", "again"],
                                               "properties": {"loc": {"$ref": "#/$defs/Loc"},
                                                              "again": {"$ref": "#/properties/loc"}},
                                               "$defs": {"Loc": {"type": "integer"}}})
    constraint = toolcalls.call_constraint([by_city, by_point], "required")
    assert accepts(grammars, constraint, weather_call('{"loc": "Oslo"}', "by_city"))
    assert accepts(grammars, constraint, weather_call('{"loc": 59, "again": 10}', "by_point"))
    assert not accepts(grammars, constraint, weather_call('{"loc": 59}', "by_city"))
    assert not accepts(grammars, constraint, weather_call('{"loc": "Oslo", "again": 10}', "by_point"))
    assert not accepts(grammars, constraint, weather_call('{"loc": 59, "again": "Oslo"}', "by_point"))


def test_a_schema_moved_under_another_keeps_its_pointers_and_nothing_else_changes():
    schema = {"type": "object", "$defs": {"A": {"type": "string", "$anchor": "a"}},
              "properties": {"p": {"$ref": "#/$defs/A"}, "root": {"$ref": "#"}, "named": {"$ref": "#a"},
                             "remote": {"$ref": "https://example.com/s.json"},
                             "own": {"$id": "urn:own", "$defs": {"B": {}}, "items": {"$ref": "#/$defs/B"}},
                             "value": {"const": {"$ref": "#/$defs/A"}, "default": {"$ref": "#"}},
                             "$ref": {"anyOf": [{"$ref": "#/properties/p"}]}}}
    moved = moved_under(schema, "#/$defs/t")
    properties = moved["properties"]
    assert properties["p"] == {"$ref": "#/$defs/t/$defs/A"} and properties["root"] == {"$ref": "#/$defs/t"}
    assert properties["$ref"] == {"anyOf": [{"$ref": "#/$defs/t/properties/p"}]}  # a property's name, not a keyword
    for kept in ("named", "remote", "own", "value"):  # an anchor, a URI, its own base, values
        assert properties[kept] == schema["properties"][kept]
    assert moved_under(schema, "#/$defs/t") == moved and schema["properties"]["p"] == {"$ref": "#/$defs/A"}


def test_a_grammar_compiled_on_other_threads_is_cached_once_and_each_row_gets_its_own_copy(grammars):
    from concurrent.futures import ThreadPoolExecutor

    g = grammars[0]
    constraint = Constraint.json({**SCHEMA, "title": "compiled elsewhere"})  # not cached by another test
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: g.compiled(constraint), range(2))
    cached = g.compiled(constraint)
    assert cached in (first, second)  # two threads may both compile; one copy is kept
    row = g.row(constraint, first)
    assert row.matcher is not first
    brace = g.tokenizer.tokenize_str("{")[0]
    row.advance(brace)
    g.row(constraint, first).advance(brace)  # the compiled one still starts at the beginning
    g.row(constraint).advance(brace)


def test_a_grammar_the_tokenizer_cannot_compile_raises_from_compiled(grammars, monkeypatch):
    import constraints

    class Refusing:
        def __init__(self, tokenizer, grammar):
            pass

        def is_error(self):
            return True

        def get_error(self):
            return "grammar too large\n  for this tokenizer"

    class Fake:
        LLMatcher = Refusing
    monkeypatch.setattr(constraints, "_llguidance", lambda: Fake)
    with pytest.raises(ConstraintInvalid, match="grammar too large for this tokenizer"):
        grammars[0].compiled(Constraint("%llguidance {}\nstart: \"never cached\"", "format"))
