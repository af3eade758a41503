"""Choosing the next token of every row of a batch from its logits, in one sequence
of batched tensor ops (pure: tensors in, token ids out; no per-row arithmetic).

Each request keeps its own settings and its own random stream: a row's random draw
depends only on its seed and how many tokens it has sampled, never on the other
rows, so a row samples the same tokens alone as beside others in a batch. The ops
work on any device, so a GPU runner samples where its logits are.
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import TYPE_CHECKING, Callable

import torch

from engine import SEEDS
from transfer import HostCopy, to_device

if TYPE_CHECKING:
    from engine import Sampling

REPEAT_LAST_N = 64  # tokens the repeat penalty looks back over (Ollama's default)

# splitmix64's constants (as signed 64-bit integers: torch has no unsigned 64-bit
# arithmetic; its int64 products wrap, which tests/test_engine.py checks).
_GOLDEN = 0x9E3779B97F4A7C15 - 2 ** 64
_MIX1 = 0xBF58476D1CE4E5B9 - 2 ** 64
_MIX2 = 0x94D049BB133111EB - 2 ** 64


def _signed(value: int) -> int:
    value %= SEEDS
    return value - SEEDS if value >= 2 ** 63 else value


def _shifted(x, bits: int):
    """Logical right shift of int64 values (torch's >> keeps the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x):
    x = x + _GOLDEN
    x = (x ^ _shifted(x, 30)) * _MIX1
    x = (x ^ _shifted(x, 27)) * _MIX2
    return x ^ _shifted(x, 31)


def uniforms(seeds, steps):
    """One uniform draw in [0, 1) per row, from its seed and its step count (int64
    tensors): a counter-based stream, so no generator state lives between steps."""
    bits = _shifted(_splitmix64(_splitmix64(seeds) + steps), 40)  # the top 24 bits
    return bits.to(torch.float32) / float(1 << 24)


class RowSampler:
    """One request's sampling state: its settings, seed, grammar and penalty history."""

    def __init__(self, sampling: Sampling, seed: int, prompt_ids: list[int], grammar=None):
        self.sampling = sampling
        self.grammar = grammar  # constraints.RowGrammar: only tokens it allows are chosen
        self.seed = _signed(seed)
        # The last REPEAT_LAST_N tokens (prompt, then completion), a ring once full: the
        # penalty's ids are then one array extend a row per step (building them from
        # lists cost ~0.6 ms a step at 256 rows here; order does not matter to it).
        self._window = array("q", prompt_ids[-REPEAT_LAST_N:])
        self._oldest = 0  # where the next token goes once the window is full
        self._steps = 0
        self._counts: Counter = Counter()

    def recent(self) -> list[int]:
        """The tokens the repeat penalty sees, oldest first."""
        w = self._window
        return list(w[self._oldest:] + w[:self._oldest])

    @property
    def steps(self) -> int:
        return self._steps

    def accept(self, token: int) -> None:
        if self.grammar is not None:
            self.grammar.advance(token)
        if len(self._window) < REPEAT_LAST_N:
            self._window.append(token)
        else:
            self._window[self._oldest] = token
            self._oldest = (self._oldest + 1) % REPEAT_LAST_N
        self._steps += 1
        self._counts[token] += 1

    def next(self, logits) -> int:
        """Sample and take this row's next token from its logits [vocab] (a batch of one)."""
        token = sample_rows(logits.unsqueeze(0), [self])[0]
        self.accept(token)
        return token

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing more: the output is whole."""
        return self.grammar is not None and self.grammar.finished


def _ids(rows: list, device):
    """Rows of token ids (lists or arrays) as a [rows, width] tensor, each padded with
    its own first id (an empty row with 0). Through array: torch.tensor of nested lists
    took ~1.4 ms for 256 rows of 64 ids here, most of the host's sampling time then."""
    width = max(1, max(len(r) for r in rows))
    flat = array("q")
    for r in rows:
        flat.extend(r)
        if len(r) < width:
            flat.extend([r[0] if r else 0] * (width - len(r)))
    return to_device(torch.frombuffer(flat, dtype=torch.long).view(len(rows), width), device)


def _penalised(logits, samplers: list[RowSampler]):
    """Ollama's repeat penalty over each row's recent tokens, then OpenAI's presence
    and frequency penalties over its completion so far; rows without them unchanged."""
    device = logits.device
    settings = [s.sampling for s in samplers]
    if any(s.repeat_penalty != 1.0 for s in settings):
        # A token that recurs gets its penalty once: every copy of it is gathered from,
        # and scattered back with, the same unpenalised logit.
        recent = [r._window if s.repeat_penalty != 1.0 else () for r, s in zip(samplers, settings)]
        index = _ids(recent, device)
        factor = _column([s.repeat_penalty if t else 1.0 for s, t in zip(settings, recent)], logits)
        picked = logits.gather(1, index)
        logits.scatter_(1, index, torch.where(picked > 0, picked / factor, picked * factor))
    penalised = [bool(r._counts and (s.presence_penalty or s.frequency_penalty)) for r, s in zip(samplers, settings)]
    if any(penalised):
        # Only the rows that ask: the others' counts would widen every row's index.
        tokens = [list(r._counts) if p else [] for r, p in zip(samplers, penalised)]
        amounts = [[s.presence_penalty + s.frequency_penalty * n for n in r._counts.values()] if p else []
                   for r, s, p in zip(samplers, settings, penalised)]
        width = max(1, max(len(t) for t in tokens))
        index = to_device([t + [0] * (width - len(t)) for t in tokens], device)
        amount = to_device([a + [0.0] * (width - len(a)) for a in amounts], device)
        logits.scatter_add_(1, index, -amount)
    return logits


def sample_rows(logits, samplers: list[RowSampler], before_waiting: Callable[[], None] | None = None) -> list[int]:
    """The next token of each row: logits [rows, vocab], one sampler per row.
    `before_waiting` runs once every op is launched, before the host waits for the
    tokens (on a GPU: while the device computes the step and the sampling).

    Never fails on finite settings: logits that extreme settings push to inf or NaN
    fall back to the row's most likely token instead of a draw.
    """
    sampled = launch_rows(logits, samplers)
    if before_waiting is not None:
        before_waiting()
    return sampled.read()


def launch_rows(logits, samplers: list[RowSampler]) -> Sampled:
    """sample_rows' ops, launched (on a GPU: queued), their tokens not yet read."""
    logits = logits.float().clone()  # never write into the model's output
    for row, sampler in enumerate(samplers):
        if sampler.grammar is not None:
            sampler.grammar.mask_(logits[row])  # logits are this call's own copy
    logits = torch.nan_to_num(_penalised(logits, samplers), nan=-torch.inf)
    picked = [(rows, pick(rows_of(logits, rows), [samplers[r] for r in rows]))
              for rows, pick in ((_rows_where(samplers, greedy=True), _greedy),
                                 (_rows_where(samplers, greedy=False), _draw)) if rows]
    return Sampled(picked, len(samplers), logits.device)


class Sampled:
    """A batch's next tokens, computed where its logits are and not yet read: a GPU's
    next decode step can start from them (on_device) before the host reads them. Their
    copy to the host is queued at once, so read() waits for this step's sampling and
    not for a step launched after it."""

    def __init__(self, picked: list, rows: int, device):
        """picked: [(row numbers, their tokens)], the greedy rows and the drawn ones."""
        if len(picked) == 1:  # the rows of one kind are all of them, in order
            self._tokens = picked[0][1]
        else:
            self._tokens = torch.empty(rows, dtype=torch.long, device=device)
            for numbers, chosen in picked:
                _put(self._tokens, numbers, chosen)
        self._host = HostCopy(self._tokens)

    def on_device(self):
        """The tokens [rows] in row order, on the logits' device (no host wait)."""
        return self._tokens

    def read(self) -> list[int]:
        return self._host.read()


def followed_by(tokens, more: list[int]):
    """Device tokens [rows] (Sampled.on_device) and then host tokens, as one tensor
    on that device: a decode step's input when rows joined after the sampling."""
    return torch.cat([tokens, to_device(more, tokens.device, torch.long)]) if more else tokens


def _rows_where(samplers: list[RowSampler], greedy: bool) -> list[int]:
    return [row for row, s in enumerate(samplers) if (s.sampling.temperature <= 0) == greedy]


def _greedy(logits, samplers: list[RowSampler]):
    return torch.argmax(logits, dim=-1)


# A row with top_p but no top_k draws from the few hundred likeliest tokens, whose
# mass nearly always reaches top_p; sorting the whole vocabulary instead took 3.7 ms a
# row here (49,152 tokens).
NUCLEUS_CANDIDATES = 1024


def _draw(logits, samplers: list[RowSampler]):
    """Temperature, top-k and top-p, then one draw per row from its own stream."""
    vocab = logits.shape[-1]
    settings = [s.sampling for s in samplers]
    uncut = [not 0 < s.top_k < vocab and not 0 < s.top_p < 1 for s in settings]
    whole = [r for r, u in enumerate(uncut) if u]
    cut = [r for r, u in enumerate(uncut) if not u]
    tokens = torch.empty(len(settings), dtype=torch.long, device=logits.device)
    if whole:  # nothing to leave out: no sort needed
        rows, some = [samplers[r] for r in whole], rows_of(logits, whole)
        probs = torch.softmax(some / _column([s.sampling.temperature for s in rows], logits), dim=-1)
        _put(tokens, whole, _pick(probs, torch.arange(vocab, device=logits.device).expand(len(whole), vocab),
                                  rows, fallback=lambda: torch.argmax(some, dim=-1)))
    if cut:
        _put(tokens, cut, _draw_cut(rows_of(logits, cut), [samplers[r] for r in cut]))
    return tokens


def _put(t, rows: list[int], values) -> None:
    """values into those rows of `t`."""
    t.index_copy_(0, _kept(rows, t.device, torch.long), values)


def rows_of(t, rows: list[int]):
    """Those rows of `t` (a view when they are all of them)."""
    return t if len(rows) == t.shape[0] else t.index_select(0, _kept(rows, t.device, torch.long))


def _draw_cut(logits, samplers: list[RowSampler], candidates: int = NUCLEUS_CANDIDATES):
    """Rows with top-k, top-p or both, from their sorted likeliest tokens."""
    device = logits.device
    vocab = logits.shape[-1]
    settings = [s.sampling for s in samplers]
    ks = [s.top_k if 0 < s.top_k < vocab else vocab for s in settings]
    limited = _column([k < vocab for k in ks], logits, torch.bool)
    values, order = torch.topk(logits, min(vocab, max(min(k, candidates) for k in ks)), dim=-1)  # sorted
    temperature = _column([s.temperature for s in settings], logits)
    values = values / temperature
    rank = torch.arange(values.shape[-1], device=device)
    values = values.masked_fill(rank >= _column(ks, logits, torch.long), -torch.inf)
    # Within its top-k a row's probabilities sum to 1 (llama.cpp's and Ollama's order:
    # top-k, then top-p over what is left); without top-k they are the whole
    # vocabulary's probabilities, of which the candidates are the largest.
    normaliser = torch.logsumexp(values, dim=-1, keepdim=True)
    all_limited = all(k < vocab for k in ks)  # known on the host: no device sync to ask
    if not all_limited:
        normaliser = torch.where(limited, normaliser, torch.logsumexp(logits / temperature, dim=-1, keepdim=True))
    probs = torch.exp(values - normaliser)
    top_p = _column([s.top_p if 0 < s.top_p < 1 else torch.inf for s in settings], logits)
    # (a device sync, only for rows that have top_p without top_k)
    if not all_limited and values.shape[-1] < vocab and bool((~limited & (probs.sum(-1, keepdim=True) < top_p)).any()):
        return _draw_cut(logits, samplers, candidates=vocab)  # the candidates fall short of top_p
    # Keep the smallest prefix whose mass reaches top_p, and always the top token (a
    # tiny top_p rounds to 0 in float32, which would otherwise drop them all).
    beyond = torch.cumsum(probs, dim=-1) - probs >= top_p
    beyond[:, 0] = False
    return _pick(probs.masked_fill(beyond, 0.0), order, samplers, fallback=lambda: order[:, 0])


def _pick(probs, order, samplers: list[RowSampler], fallback):
    """One draw per row among its candidates (`order`: their token ids) by their
    probabilities, from the row's own stream; `fallback()` (the likeliest tokens) where
    probabilities are unusable (extreme settings)."""
    cdf = torch.cumsum(probs, dim=-1)
    total = cdf[:, -1:]
    u = uniforms(_kept([s.seed for s in samplers], probs.device, torch.long),
                 to_device([s.steps for s in samplers], probs.device, torch.long)).unsqueeze(1)
    # The first candidate whose cumulative mass passes u * total (a zero-mass one never does).
    pick = torch.searchsorted(cdf, u * total, right=True).clamp_(max=probs.shape[-1] - 1)
    chosen = order.gather(1, pick).squeeze(1)
    usable = (torch.isfinite(total) & (total > 0)).squeeze(1)  # an inf or NaN reaches the total
    return torch.where(usable, chosen, fallback())  # no host sync to ask whether any row needs it


def _column(values: list, like, dtype=torch.float32):
    """Per-row settings as a [rows, 1] tensor on `like`'s device."""
    return _kept(values, like.device, dtype).unsqueeze(1)


# A running batch's per-row settings (temperatures, top-k, top-p, seeds, row indices)
# are the same step after step: their device tensors are kept, keyed by the values
# themselves (so never stale), instead of built and copied every step. At 256 rows
# that was 8 host-to-device tensors a step. Kept tensors are only read, never written.
_KEPT: dict = {}
KEPT_MAX = 64


def _kept(values: list, device, dtype):
    key = (tuple(values), dtype, device)
    tensor = _KEPT.get(key)
    if tensor is None:
        if len(_KEPT) >= KEPT_MAX:
            _KEPT.clear()
        tensor = _KEPT[key] = to_device(values, device, dtype)
    return tensor
