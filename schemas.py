"""JSON Schema rewritten before the grammar engine compiles it (pure: dicts in, dicts
out, no llguidance): objects closed as Ollama closes them, a schema moved inside
another with its references still pointing where they did, and the references no
value can ever match."""

from __future__ import annotations

import json
from collections import deque
from urllib.parse import unquote

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


def _applied(schema: dict):
    """The direct subschemas that apply to a value: all but the definitions, which
    apply only where a `$ref` names them."""
    for key in _SUBSCHEMA:
        if isinstance(schema.get(key), dict):
            yield schema[key]
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            yield from schema[key]
    for key in _SUBSCHEMA_MAPS:
        if key not in ("$defs", "definitions") and isinstance(schema.get(key), dict):
            yield from schema[key].values()


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
        # A key it requires but does not list stays allowed (any value, as before):
        # closed without it, the schema matched nothing and was refused.
        required = out["required"] if isinstance(out.get("required"), list) else []
        missing = [name for name in required if isinstance(name, str) and name not in out["properties"]]
        if missing:
            out["properties"] = {**out["properties"], **{name: {} for name in missing}}
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


def unmatchable_ref(schema) -> str | None:
    """A `$ref` (a JSON pointer) in use whose target no finite JSON value can match,
    or None. Only a loop of references makes one: `a` defined as `a`, or an
    object that requires a property of its own type. llguidance compiles references
    lazily and does not see these: once the output reaches one, no token is allowed
    (a reply cut by an error) or the output can never end."""
    targets: dict[int, tuple[str, object, dict]] = {}  # id(target) -> (a $ref to it, target, its base)
    users: dict[int, set[int]] = {}  # id(target) -> the targets whose own subschemas refer to it
    pending = [(None, schema, schema)] if isinstance(schema, dict) else []
    while pending:
        owner, node, base = pending.pop()
        for ref, found in _refs_in(node, base):
            key = id(found[0])
            if owner is not None:
                users.setdefault(key, set()).add(owner)
            if key not in targets:
                targets[key] = (ref, *found)
                pending.append((key, *found))
    # Least fixpoint: a target matches some value once the targets it needs are known to;
    # each is checked again only once one of those becomes known.
    matched: set[int] = set()
    todo, queued = deque(targets), set(targets)
    while todo:
        key = todo.popleft()
        queued.discard(key)
        if key not in matched and _matchable(*targets[key][1:], matched):
            matched.add(key)
            again = users.get(key, set()) - matched - queued
            todo.extend(again)
            queued |= again
    return next((ref for key, (ref, _, _) in targets.items() if key not in matched), None)


def _refs_in(schema: dict, base: dict):
    """(`$ref`, (its target, the target's base)) for each JSON-pointer reference in
    `schema` and the subschemas that apply with it (definitions only where referred to)."""
    stack = [(schema, base)]
    while stack:
        node, base = stack.pop()
        if not isinstance(node, dict):
            continue
        base = node if _is_resource(node) else base
        stack.extend((child, base) for child in _applied(node))
        found = _target(node, base)
        if found is not None:
            yield node["$ref"], found


def _matchable(schema, base: dict, matched: set[int]) -> bool:
    """Some finite value matches `schema`, given the targets known to be matchable.
    Only what a value must hold counts (an optional property may be left out); other
    unsatisfiable keywords are llguidance's to refuse."""
    if schema is False:
        return False
    if not isinstance(schema, dict):
        return True
    base = schema if _is_resource(schema) else base
    found = _target(schema, base)
    if found is not None and id(found[0]) not in matched:
        return False

    def can(s) -> bool:
        return _matchable(s, base, matched)

    def listed(key) -> list:
        return schema[key] if isinstance(schema.get(key), list) else []

    if not all(can(s) for s in listed("allOf")):
        return False
    if any(listed(key) and not any(can(s) for s in listed(key)) for key in ("anyOf", "oneOf")):
        return False
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    if not all(can(properties[name]) for name in listed("required")
               if isinstance(name, str) and name in properties):
        return False
    least = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
    prefix = listed("prefixItems") or listed("items")  # draft-07 spells a tuple as a list of `items`
    rest = schema.get("additionalItems") if listed("items") else schema.get("items")
    return all(can(s) for s in prefix[:least]) and (least <= len(prefix) or rest is None or can(rest))


def _target(schema: dict, base: dict):
    """(what the schema's `$ref` points to, the base of the pointers inside that), or
    None when it is no JSON pointer or points nowhere (llguidance refuses that)."""
    ref = schema.get("$ref")
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        return None
    node = base
    for token in ref[2:].split("/") if ref != "#" else ():
        token = unquote(token).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return None
        if isinstance(node, dict) and _is_resource(node):
            base = node
    return (node, base) if isinstance(node, (dict, bool)) else None
