"""Turning a request into prompt token ids: the chat template, and user text kept as text.

User text is tokenised with special tokens split, so `<|im_end|>` typed by a user is
plain characters, never a control token: only the template makes special tokens.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine import GenerationRequest


class PromptTooLong(ValueError):
    pass


class PromptBuilder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # a transformers tokenizer
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        # No token decodes to more characters than its vocabulary entry has (byte-level
        # and SentencePiece entries map characters 1:1, byte fallback overestimates),
        # so a prompt longer than context x this cannot fit, without tokenising it.
        self.longest_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1)
        # Added tokens (the special ones among them) are matched in text before BPE.
        self._added = [t for t in tokenizer.get_added_vocab() if t]

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
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens,
                                   split_special_tokens=True)["input_ids"])

    def _templated(self, messages: list[dict]) -> list[int]:
        if not any(t in m["content"] for m in messages for t in self._added):
            return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                           tokenize=True, return_dict=False))
        return self._templated_apart(messages)

    def _templated_apart(self, messages: list[dict]) -> list[int]:
        """The template rendered around placeholders; template text may hold special
        tokens, each message's content is tokenised as plain text. (Tokens can differ
        from a whole-text tokenisation at a content's edges, so this is used only
        when some content holds a special token's text.)"""
        marks = [f"\x00{secrets.token_hex(8)}\x00" for _ in messages]
        rendered = self.tokenizer.apply_chat_template(
            [{**m, "content": mark} for m, mark in zip(messages, marks)],
            add_generation_prompt=True, tokenize=False)
        ids: list[int] = []
        for mark, message in zip(marks, messages):
            before, found, rendered = rendered.partition(mark)
            if not found:  # the template dropped or changed this message: never guess
                raise ValueError("the chat template did not render a message as given")
            ids += self._template_part(before) + self._text(message["content"])
        return ids + self._template_part(rendered)

    def _template_part(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
