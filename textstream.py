"""Streamed text, pure: stop strings across chunk boundaries and incremental detokenising."""

from __future__ import annotations


class StopMatcher:
    """Finds stop strings in streamed text, across chunk boundaries.

    Text that could still be the start of a stop string is held back, so a stop
    string is never emitted, not even in part. Whatever ends the answer, `flush`
    gives back what is still held (nothing after a stop string was hit).
    """

    def __init__(self, stops: list[str], spared_start: str = ""):
        self.stops = [s for s in stops if s]
        self._held = ""
        # A reply whose first character is `spared_start` is no plain text (tool calls,
        # when the tools grammar lets the model choose): no stop string applies to it,
        # since one matching inside a call's JSON would cut the call short.
        self._spared_start = spared_start

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if self._spared_start and text:
            if text.startswith(self._spared_start):
                self.stops = []
            self._spared_start = ""  # the first character has decided
        if not self.stops:
            return text, False
        buf = self._held + text
        # The stop that completes first wins (ties: the one starting first), which is
        # what streaming sees, so the result does not depend on how text is chunked.
        hits = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if hits:
            self._held = ""
            return buf[: min(hits)[1]], True
        keep = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), 0, -1):
                if buf.endswith(s[:n]):
                    keep = max(keep, n)
                    break
        self._held = buf[len(buf) - keep:]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class Detokenizer:
    """Incremental detokeniser: never a split UTF-8 character, chunks add up to the whole.

    Wraps `tokenizers.decoders.DecodeStream`, which buffers byte-level tokens until
    they form whole characters. `context`: the prompt's tokens when the reply
    continues its text (no chat template): decoded after them, a SentencePiece
    model's first token keeps its space (' world' after 'Hello', not 'world').
    """

    CONTEXT_TOKENS = 4  # the prompt's last tokens a continuation is decoded after

    def __init__(self, tokenizer, context: list[int] | tuple = ()):
        self._tokenizer = tokenizer  # a `tokenizers.Tokenizer`
        self._context = self._context_of(list(context))
        self._base = self._decode(self._context) if self._context else ""
        self._stream = self._new_stream(self._context)
        self._ids: list[int] = []  # every token stepped, for flush
        self._given: list[str] = []  # the text given out so far
        self._upto = 0  # tokens whose text has been given out
        self._holding = False  # the last step gave nothing: its bytes wait for more

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    @staticmethod
    def _new_stream(context: list[int]):
        from tokenizers.decoders import DecodeStream

        return DecodeStream(ids=context, skip_special_tokens=True) if context else \
            DecodeStream(skip_special_tokens=True)

    def _context_of(self, ids: list[int]) -> list[int]:
        """The prompt's last few tokens, starting at a whole character (none when they
        end inside one: DecodeStream would then give their text out as the reply's)."""
        for n in range(self.CONTEXT_TOKENS, 4 * self.CONTEXT_TOKENS + 1):
            window = ids[-n:]
            text = self._decode(window)
            if text.endswith("\ufffd"):
                return []
            if not text.startswith("\ufffd") or n >= len(ids):
                return window
        return []

    def step(self, token_id: int) -> str:
        self._ids.append(token_id)
        try:
            text = self._stream.step(self._tokenizer, token_id) or ""
            if text:
                self._upto = len(self._ids)
        except Exception:
            # DecodeStream's 'Invalid prefix': with byte fallback, a character's bytes
            # followed by bytes that make no character decode, together, as U+FFFDs
            # for all of them, which is not the text already given. One bad sample
            # failed the whole request; now its tokens start a new stream.
            text = self._restart()
        if text:
            self._given.append(text)
        self._holding = self._upto < len(self._ids)
        return text

    def _restart(self) -> str:
        pending = self._ids[self._upto:]
        self._stream = self._new_stream([])
        out = []
        try:
            for i, token in enumerate(pending):
                piece = self._stream.step(self._tokenizer, token) or ""
                if piece:
                    out.append(piece)
                    self._upto = len(self._ids) - len(pending) + i + 1
        except Exception:
            self._stream = self._new_stream([])
            self._upto = len(self._ids)
            return self._decode(pending)
        return "".join(out)

    def flush(self) -> str:
        """What the held tokens still hold once no token follows: their whole
        characters, not the incomplete ones at the very end (Ollama drops those too).
        DecodeStream holds a whole token while it ends in part of a character, so
        without this a last token such as ' \xf0\x9f\x98' (a space and 3 bytes of an
        emoji) lost its space."""
        if not self._holding:
            return ""
        self._holding = False
        text = self._decode(self._context + self._ids)
        given = self._base + "".join(self._given)
        if not text.startswith(given):  # byte fallback decodes invalid bytes apart from the stream
            return ""
        rest = text[len(given):].rstrip("\ufffd")
        if rest:
            self._given.append(rest)
        return rest
