"""What the grammar buys, and what it costs: schema-valid output with and without
constraints, and decode speed of constrained rows beside unconstrained ones.

Starts `python minivault.py` (the embedded model, default settings) and asks, through
Ollama's /api/chat, for JSON matching a few schemas. The same prompt (which shows the
schema) is sent with and without `format`, sampled (temperature 0.7, seeds 1..N) so the
attempts differ. A reply counts as valid when it parses and validates against the schema
(jsonschema). Then the decode rate of one stream with and without the grammar, and, in
process, the model thread's time per step for 8 rows with 0, 4 and 8 of them constrained.

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

import jsonschema

from peers import ROOT, Server, free_port

sys.path.insert(0, str(ROOT))

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
    """(parses as JSON, validates against the schema). Leniently: the first {...} of the
    reply counts, so a free reply wrapped in a code fence or a sentence is not failed for that."""
    start, end = text.find("{"), text.rfind("}")
    try:
        value = json.loads(text[start:end + 1] if 0 <= start < end else text)
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
            checks = valid(free["message"]["content"], schema) + valid(bound["message"]["content"], schema)
            for i, ok in enumerate(checks):
                counts[i] += ok
            cut += bound["done_reason"] == "length"
        totals = [t + c for t, c in zip(totals, counts)]
        print(f"| {name} | " + " | ".join(f"{c}/{attempts}" for c in counts) + f" | {cut}/{attempts} |")
    n = attempts * len(SCHEMAS)
    print("| all | " + " | ".join(f"{100 * t / n:.0f}%" for t in totals) + " | |\n")


def rate(reply: dict) -> float:
    return reply["eval_count"] / max(reply["eval_duration"] / 1e9, 1e-9)


def mask_cost(rows: int = 8, steps: int = 40) -> None:
    """In-process, the model thread's work per decode step with 0, half or all rows
    constrained: the forward pass, then sampling (with the masks) for every row."""
    import time

    from constraints import Constraint, Grammars
    from engine import GenerationRequest, Sampling
    from modelsource import resolve_model
    from prompts import PromptBuilder
    from runner import load_runner
    from sampling import RowSampler

    runner = load_runner(resolve_model(None), "auto", "~/.cache/minivault")
    builder = PromptBuilder(runner.codec)
    grammars = Grammars(runner.codec.backend.to_str(), sorted(runner.eos_ids), builder.vocab_size)
    task, schema = SCHEMAS["product"]
    constraint = Constraint.json(schema)
    prompt = builder.encode(GenerationRequest(messages=ask(task, schema)))
    print(f"\n## The model thread per decode step, {rows} rows, greedy (ms, median of {steps} steps)\n")
    print("| constrained rows | forward pass | sampling all rows (masks included) |")
    print("| --- | --- | --- |")
    for bound in (0, rows // 2, rows):
        runner.reset()
        logits = runner.prefill([prompt] * rows)
        samplers = [RowSampler(Sampling(temperature=0), 1, prompt, grammars.row(constraint) if i < bound else None)
                    for i in range(rows)]
        tokens = [s.next(logits[i]) for i, s in enumerate(samplers)]
        forward, sample = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            logits = runner.decode(tokens)
            t1 = time.perf_counter()
            tokens = [s.next(logits[i]) if not s.complete else tokens[i] for i, s in enumerate(samplers)]
            sample.append(time.perf_counter() - t1)
            forward.append(t1 - t0)
        print(f"| {bound} | {1000 * statistics.median(forward):.2f} | {1000 * statistics.median(sample):.2f} |")


def speed(port: int) -> None:
    task, schema = SCHEMAS["product"]
    plain = {"messages": [{"role": "user", "content": "Tell me about the sea."}],
             "options": {"temperature": 0, "num_predict": 128}}
    bound = {"messages": ask(task, schema), "format": schema, "options": {"temperature": 0, "num_predict": 128}}
    chat(port, plain)  # warm
    alone_plain = statistics.median(rate(chat(port, plain)) for _ in range(3))
    alone_bound = statistics.median(rate(chat(port, bound)) for _ in range(3))
    print("## One stream over HTTP, greedy (tok/s)\n")
    print(f"- unconstrained {alone_plain:.1f}, constrained {alone_bound:.1f} ({alone_bound / alone_plain:.2f}x)")


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
    mask_cost()


if __name__ == "__main__":
    main()
