"""What the grammar buys, and what it costs: schema-valid output with and without
constraints, and decode speed of constrained rows beside unconstrained ones.

Starts `python minivault.py` (the embedded model, default settings) and asks, through
Ollama's /api/chat, for JSON matching a few schemas. The same prompt (which shows the
schema) is sent with and without `format`, sampled (temperature 0.7, seeds 1..N) so the
attempts differ. A reply counts as valid when it parses and validates against the schema
(jsonschema). Then one stream alone, and 8 at once (4 constrained, 4 not), for the
decode rate each sees.

    .venv/bin/pip install -r requirements-bench.txt   # jsonschema
    .venv/bin/python bench/structured.py [--attempts 10]

Run it with nothing else running: the machine has 2 cores.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor

import jsonschema

from peers import ROOT, Server, free_port

SCHEMAS = {
    "person": ("Invent a person: name, age and whether they like cats.", {
        "type": "object", "additionalProperties": False, "required": ["name", "age", "likes_cats"],
        "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                       "likes_cats": {"type": "boolean"}}}),
    "product": ("Describe a product for sale in a shop.", {
        "type": "object", "required": ["title", "price", "currency", "tags"],
        "properties": {"title": {"type": "string"}, "price": {"type": "number", "exclusiveMinimum": 0},
                       "currency": {"enum": ["EUR", "USD", "GBP"]},
                       "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4}}}),
    "address": ("Give the address of a museum.", {
        "type": "object", "required": ["museum", "address"],
        "properties": {"museum": {"type": "string"},
                       "address": {"type": "object", "required": ["street", "city", "country"],
                                   "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                  "country": {"type": "string"}}}}}),
    "weather_call": ("Call a weather service for the weather in Lisbon in celsius.", {
        "type": "object", "additionalProperties": False, "required": ["city", "unit"],
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}}),
}


def chat(port: int, body: dict) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/api/chat", json.dumps({"model": "smollm2", "stream": False, **body}),
                 {"Content-Type": "application/json"})
    resp = conn.getresponse()
    reply = json.loads(resp.read())
    assert resp.status == 200, reply
    return reply


def ask(task: str, schema: dict) -> list[dict]:
    return [{"role": "system", "content": "Reply with only a JSON object that matches this JSON schema: "
                                          + json.dumps(schema)},
            {"role": "user", "content": task}]


def valid(text: str, schema: dict) -> tuple[bool, bool]:
    """(parses as JSON, validates against the schema)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False, False
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return True, False
    return True, True


def validity(port: int, attempts: int) -> None:
    print(f"## Valid output, {attempts} sampled attempts per schema (temperature 0.7, 300 tokens at most)\n")
    print("| schema | parses, free | valid, free | parses, constrained | valid, constrained | "
          "cut by the token limit, constrained |")
    print("| --- | --- | --- | --- | --- | --- |")
    totals = [0, 0, 0, 0]
    for name, (task, schema) in SCHEMAS.items():
        counts = [0, 0, 0, 0]
        cut = 0
        for seed in range(1, attempts + 1):
            options = {"temperature": 0.7, "seed": seed, "num_predict": 300}
            free = chat(port, {"messages": ask(task, schema), "options": options})
            bound = chat(port, {"messages": ask(task, schema), "options": options, "format": schema})
            for i, ok in enumerate(valid(free["message"]["content"], schema) + valid(bound["message"]["content"], schema)):
                counts[i] += ok
            cut += bound["done_reason"] == "length"
        totals = [t + c for t, c in zip(totals, counts)]
        print(f"| {name} | " + " | ".join(f"{c}/{attempts}" for c in counts) + f" | {cut}/{attempts} |")
    n = attempts * len(SCHEMAS)
    print("| all | " + " | ".join(f"{100 * t / n:.0f}%" for t in totals) + " | |\n")


def rate(reply: dict) -> float:
    return reply["eval_count"] / max(reply["eval_duration"] / 1e9, 1e-9)


def speed(port: int) -> None:
    task, schema = SCHEMAS["product"]
    plain = {"messages": [{"role": "user", "content": "Tell me about the sea."}],
             "options": {"temperature": 0, "num_predict": 128}}
    bound = {"messages": ask(task, schema), "format": schema, "options": {"temperature": 0, "num_predict": 128}}
    chat(port, plain)  # warm
    alone_plain = statistics.median(rate(chat(port, plain)) for _ in range(3))
    alone_bound = statistics.median(rate(chat(port, bound)) for _ in range(3))
    print("## Decode rate, greedy (tok/s per stream)\n")
    print(f"- alone: unconstrained {alone_plain:.1f}, constrained {alone_bound:.1f} "
          f"({alone_bound / alone_plain:.2f}x)")
    for mix in (0, 4):
        bodies = [bound] * mix + [plain] * (8 - mix)
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda b: chat(port, b), bodies))
        plain_rates = [rate(r) for r, b in zip(replies, bodies) if b is plain]
        bound_rates = [rate(r) for r, b in zip(replies, bodies) if b is bound]
        line = f"- 8 at once, {mix} constrained: unconstrained rows {statistics.median(plain_rates):.1f}"
        if bound_rates:
            line += f", constrained rows {statistics.median(bound_rates):.1f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attempts", type=int, default=10)
    args = parser.parse_args()
    port = free_port()
    server = Server("minivault", [sys.executable, str(ROOT / "minivault.py"), "--port", str(port),
                                  "--log-file", ""], port)
    try:
        validity(port, args.attempts)
        speed(port)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
