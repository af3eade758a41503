"""Constrained decoding: the grammar a request's output must match, and each row's
token mask, computed with llguidance (bench/grammars.py has why that engine).

A `Constraint` is built and checked at the API edge (no tokenizer needed), so a bad
schema is a 400 before anything is queued. The model thread turns it into a
`RowGrammar` per request: before each token the row's logits are masked to what the
grammar allows next, and the chosen token advances the row's parser. Other rows are
never touched, so unconstrained rows in the same batch sample exactly as alone.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from schemas import closed_objects, unmatchable_ref


class ConstraintUnavailable(RuntimeError):
    """This server's Python has no grammar engine: no request can constrain its output."""


def _llguidance():
    """llguidance, imported on the first constrained request rather than at start-up
    (49 ms here), so a server that never constrains output never loads it."""
    try:
        import llguidance
    except ImportError:  # an install without it (the GPU machines' packages have none)
        raise ConstraintUnavailable("constrained output needs the llguidance package, which this server's "
                                    "Python lacks (requirements.txt pins the version to install)") from None
    return llguidance


def available() -> bool:
    """Whether this install can constrain output (JSON formats, tool calls): whether
    llguidance imports, the check every constrained request meets."""
    try:
        _llguidance()
    except ConstraintUnavailable:
        return False
    return True

# JSON as people (and models) write it on one line: `{"a": 1, "b": [2, 3]}`. Without
# fixed separators the grammar allows any whitespace, and a small model can emit
# newlines forever inside a valid document.
JSON_LAYOUT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


class ConstraintInvalid(ValueError):
    """The schema or grammar cannot be compiled (the message says why)."""


def _reason(error: str) -> str:
    """llguidance's error on one line. Some span lines (a regex error names the pattern,
    points at it, then says why): the first alone read only "regex parse error:"."""
    return " ".join(error.split())[:300]


@dataclass(frozen=True)
class Constraint:
    """What the output must be: an llguidance grammar (JSON text) and a short name
    for logs and errors."""

    grammar: str
    name: str

    @classmethod
    def json(cls, schema: dict | None = None, name: str = "json") -> Constraint:
        """A JSON object (schema None) or a JSON value valid against `schema`."""
        body = _as_compiled(schema)
        return cls._compiled(lambda matcher: matcher.grammar_from_json_schema(body, defaults=JSON_LAYOUT), name)

    @classmethod
    def lark(cls, text: str, name: str) -> Constraint:
        return cls._compiled(lambda matcher: matcher.grammar_from_lark(text), name)

    @classmethod
    def _compiled(cls, make: Callable[[object], str], name: str) -> Constraint:
        """The grammar `make(LLMatcher)` returns, once llguidance accepts it; else
        ConstraintInvalid with its reason."""
        matcher = _llguidance().LLMatcher
        try:
            grammar = make(matcher)
            error = matcher.validate_grammar(grammar)
        except Exception as exc:  # malformed input can raise instead of returning the error
            # (a schema number beyond 64 bits: ValueError from grammar_from_json_schema)
            error = str(exc) or type(exc).__name__
        if error:
            raise ConstraintInvalid(_reason(error))
        return cls(grammar, name)


def json_rule(schema: dict | None) -> str:
    """A lark rule body that embeds a JSON schema (for grammars mixing JSON and text)."""
    body = _as_compiled(schema)
    return "%json " + json.dumps({**body, "x-guidance": JSON_LAYOUT})


def _as_compiled(schema: dict | None) -> dict:
    """The schema as llguidance gets it: any object when None, else with its objects
    closed, once no `$ref` in it is a loop no value can match (llguidance accepts one
    and fails only when the output reaches it, mid-reply)."""
    if schema is None:
        return {"type": "object"}
    ref = unmatchable_ref(schema)
    if ref is not None:
        raise ConstraintInvalid(f"no finite JSON value matches '$ref' {ref!r}: "
                                "its references loop back to it without ever reaching a value")
    return closed_objects(schema)


class Grammars:
    """One tokenizer's grammar engine: compiled grammars cached by their text, a fresh
    matcher per request copied from the cached one.

    `compiled` may run on any thread: the engine calls it on its compile worker before a
    request is queued, since compiling releases the GIL and takes tens of milliseconds
    for a big schema (20-80 ms for a 20,000-value enum or 200 tools, 2-core CPU), time
    every running stream stalled for when the model thread did it."""

    CACHE_SIZE = 64

    def __init__(self, tokenizer_json: str, eos_ids: list[int], vocab_size: int):
        # Building the token trie takes ~0.17 s for a 49k vocabulary and holds the GIL
        # throughout (no other thread runs meanwhile): the engine does it once, at load.
        self.tokenizer = _llguidance().LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_ids))
        self.vocab_size = self.tokenizer.vocab_size
        self._compiled: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()  # the cache, not the compiling: two threads may compile at once

    def compiled(self, constraint: Constraint):
        """The constraint's matcher, compiled (or cached) and never advanced: a request
        takes a copy of it (`row`). Raises ConstraintInvalid."""
        with self._lock:
            matcher = self._compiled.get(constraint.grammar)
            if matcher is not None:
                self._compiled.move_to_end(constraint.grammar)
                return matcher
        matcher = _llguidance().LLMatcher(self.tokenizer, constraint.grammar)
        if matcher.is_error():
            raise ConstraintInvalid(_reason(matcher.get_error()))
        with self._lock:
            self._compiled[constraint.grammar] = matcher
            while len(self._compiled) > self.CACHE_SIZE:
                self._compiled.popitem(last=False)
        return matcher

    def row(self, constraint: Constraint, compiled=None) -> RowGrammar:
        """A request's parser: a copy of `compiled` (what `compiled()` gave earlier) or,
        when None, of the constraint compiled now."""
        matcher = compiled if compiled is not None else self.compiled(constraint)
        return RowGrammar(matcher.deep_copy(), self.vocab_size)


class RowGrammar:
    """One request's parser state: which tokens may come next."""

    def __init__(self, matcher, vocab_size: int):
        import torch

        self._torch = torch
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._words = torch.empty((vocab_size + 31) // 32, dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def masked(self, logits):
        """A float copy of `logits` with every token the grammar forbids at -inf."""
        return self.mask_(logits.float().clone())

    def mask_(self, logits):
        """Sets every token the grammar forbids to -inf in `logits` (a float row the
        caller owns: sampling's copy of the model's output), and returns it."""
        from transfer import to_device  # imports torch: not at start-up, where this module is

        torch = self._torch
        words = self._words
        self.matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        self._raise_on_error()
        allowed = to_device(((words.unsqueeze(1) >> self._shifts) & 1).bool().view(-1), logits.device)
        width = min(logits.numel(), self.vocab_size)
        logits[:width].masked_fill_(~allowed[:width], -torch.inf)
        logits[width:] = -torch.inf  # ids past the tokenizer's vocabulary are never text
        return logits

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            self._raise_on_error()
            raise RuntimeError(f"token {token} does not fit the grammar")

    @property
    def finished(self) -> bool:
        """The output is complete and nothing more may follow but the end."""
        return self.matcher.is_stopped()

    def _raise_on_error(self) -> None:
        if self.matcher.is_error():
            raise RuntimeError("grammar: " + _reason(self.matcher.get_error()))
