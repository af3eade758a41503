"""JSON Schema rewritten before the grammar engine compiles it (pure: dicts in, dicts
out, no llguidance): objects closed as Ollama closes them, and a schema moved inside
another with its references still pointing where they did."""

from __future__ import annotations

import json

# Keywords whose value is a schema, a list of schemas, or a map of names to schemas.
# Only these hold schemas: `const`, `enum`, `default` or `examples` hold values, which
# are never rewritten even when they look like schemas.
_SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "contains", "not", "if", "then", "else",
              "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _mapped(schema: dict, change) -> dict:
    """A copy of `schema` with `change` applied to each of its direct subschemas."""
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict):
            out[key] = change(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [change(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: change(s) for name, s in out[key].items()}
    return out


def closed_objects(schema):
    """The schema with each object that lists `properties` and is silent on other keys
    closed to them, as Ollama's grammar (llama.cpp's json_schema_to_grammar) makes it.
    Clients send pydantic's model_json_schema(), which is silent: left open, the small
    model invented keys until the token limit. Whatever the closed schema allows, the
    open one does too. A schema using `allOf` is left as given: closing each part would
    forbid the other parts' keys."""
    if '"allOf"' in json.dumps(schema):
        return schema
    return _closed(schema)


def _closed(schema):
    if not isinstance(schema, dict):
        return schema
    out = _mapped(schema, _closed)
    if isinstance(out.get("properties"), dict) and not any(
            k in out for k in ("additionalProperties", "patternProperties", "unevaluatedProperties")):
        out["additionalProperties"] = False
    return out


def moved_under(schema, location: str):
    """`schema` as it must read once placed at `location` (a JSON pointer such as
    "#/$defs/name") inside another schema: each `$ref` that is a JSON pointer ("#" or
    "#/...") gets `location` in front, so it still points into `schema` and not into
    the new root. Anchors and URIs resolve as they did; a subschema with its own `$id`
    is the base of the pointers inside it, so those are left as they are."""
    if not isinstance(schema, dict) or _is_resource(schema):
        return schema
    out = _mapped(schema, lambda s: moved_under(s, location))
    ref = out.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = location + ref[1:]
    return out


def _is_resource(schema: dict) -> bool:
    """Has its own base URI: a `$id` that is not just a fragment (draft-07's "#name" is an anchor)."""
    schema_id = schema.get("$id")
    return isinstance(schema_id, str) and not schema_id.startswith("#")
