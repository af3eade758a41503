"""Turning a request into prompt token ids: the chat template, and user text kept as text.

User text is tokenised with special tokens split, so `<|im_end|>` typed by a user is
plain characters, never a control token: only the template makes special tokens.

The tokenizer is a `tokenizers.Tokenizer` and the template is rendered with jinja2 as
transformers renders it, so a model folder can be served without importing
transformers (about 2.4 s of a warm start here).
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine import GenerationRequest


@dataclass
class TextCodec:
    """A model's tokenizer and chat template."""

    backend: object  # tokenizers.Tokenizer
    chat_template: str | None
    special: dict  # bos_token, eos_token, ... as the template sees them
    eos_token_id: int | None

    @classmethod
    def from_transformers(cls, tokenizer) -> TextCodec:
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        return cls(tokenizer.backend_tokenizer, getattr(tokenizer, "chat_template", None) or None,
                   {n: getattr(tokenizer, n, None) for n in names}, tokenizer.eos_token_id)

    @classmethod
    def from_folder(cls, folder: Path) -> TextCodec | None:
        """From tokenizer.json, tokenizer_config.json and chat_template.jinja, or None
        when the folder lacks them (transformers then loads the tokenizer)."""
        from tokenizers import Tokenizer

        if not (folder / "tokenizer.json").exists() or not (folder / "tokenizer_config.json").exists():
            return None
        config = json.loads((folder / "tokenizer_config.json").read_text())
        template_file = folder / "chat_template.jinja"
        template = template_file.read_text() if template_file.exists() else config.get("chat_template")
        if not isinstance(template, (str, type(None))):
            return None  # several named templates: leave them to transformers
        special = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name)
            special[name] = value.get("content") if isinstance(value, dict) else value
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        eos = backend.token_to_id(special["eos_token"]) if special["eos_token"] else None
        return cls(backend, template, special, eos)

    def render(self, messages: list[dict]) -> str:
        return _compiled(self.chat_template).render(messages=messages, add_generation_prompt=True,
                                                    tools=None, documents=None, **self.special)


class TemplateRefused(ValueError):
    """The chat template refused the conversation (its `raise_exception`, as Mistral's
    does for roles out of turn): the request's fault, so a 400 (engine.RequestInvalid)."""


_templates: dict[str, object] = {}


def _compiled(template: str):
    """The template compiled as transformers compiles it: a sandbox, trimmed blocks."""
    if template not in _templates:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateRefused(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        env.filters["tojson"] = lambda value, indent=None, separators=None, sort_keys=False: json.dumps(
            value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.now().strftime(fmt))
        _templates[template] = env.from_string(template)
    return _templates[template]


class PromptBuilder:
    def __init__(self, codec: TextCodec):
        self.codec = codec
        self.backend = codec.backend
        self.has_template = bool(codec.chat_template)
        vocab = self.backend.get_vocab(with_added_tokens=True)
        # No token decodes to more characters than its vocabulary entry has (byte-level
        # and SentencePiece entries map characters 1:1, byte fallback overestimates),
        # so a prompt longer than context x this cannot fit, without tokenising it.
        self.longest_token_chars = max((len(t) for t in vocab), default=1)
        # Added tokens (the special ones among them) are matched in text before BPE.
        self._added = [t.content for t in self.backend.get_added_tokens_decoder().values() if t.content]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode_plain(self, text: str) -> list[int]:
        """Text as it is, no template (what an embedding is computed over)."""
        return self._text(text, add_special_tokens=True)

    def max_prompt_chars(self, context_length: int) -> int:
        return context_length * max(1, self.longest_token_chars)

    def encode(self, req: GenerationRequest) -> list[int]:
        if req.messages is not None and self.has_template:
            return self._templated(req.messages)
        if not req.raw and self.has_template:
            messages = ([{"role": "system", "content": req.system}] if req.system else []) + \
                       [{"role": "user", "content": req.prompt}]
            return self._templated(messages)
        if req.messages is not None:  # no template: plain "role: content" lines
            text = "".join(f"{m['role']}: {m['content']}\n" for m in req.messages) + "assistant:"
        else:
            text = req.prompt
        return self._text(text, add_special_tokens=True)

    def _text(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """User text: added tokens' text stays text."""
        self.backend.encode_special_tokens = True
        try:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        finally:
            self.backend.encode_special_tokens = False

    def _template_part(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids if text else []

    def _templated(self, messages: list[dict]) -> list[int]:
        if not any(t in m["content"] for m in messages for t in self._added):
            return self._template_part(self.codec.render(messages))
        return self._templated_apart(messages)

    def _templated_apart(self, messages: list[dict]) -> list[int]:
        """The template rendered around placeholders; template text may hold special
        tokens, each message's content is tokenised as plain text. (Tokens can differ
        from a whole-text tokenisation at a content's edges, so this is used only
        when some content holds a special token's text.)"""
        marks = [f"\x00{secrets.token_hex(8)}\x00" for _ in messages]
        rendered = self.codec.render([{**m, "content": mark} for m, mark in zip(messages, marks)])
        ids: list[int] = []
        for mark, message in zip(marks, messages):
            before, found, rendered = rendered.partition(mark)
            if not found:  # the template dropped or changed this message: never guess
                raise ValueError("the chat template did not render a message as given")
            ids += self._template_part(before) + self._text(message["content"])
        return ids + self._template_part(rendered)
