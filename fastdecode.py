"""Measured fixes that make the transformers runner's steps cheaper on CPU.

Imported by the model thread only (it imports torch, which takes seconds).

- `new_cache`: a KV cache whose layers keep spare room along the sequence, so a
  decode step writes its keys and values in place. transformers' DynamicLayer
  concatenates, which copies the whole cache every step: ~10% of an 8-row step.
- `SharedPrefix`: the keys and values of the prompt prefix most requests share (the
  default system turn and user header), computed once; a prefill seeded with them
  computes only the rest of each prompt.
- `speed_up_output_head`: the output head computes W @ x^T instead of x @ W^T when
  2-64 rows come in. MKL packs the right-hand matrix on every call, so the usual
  order re-packs the 49152x576 head each step; swapped, only the few rows are packed.
  Measured on a 2-core AVX2 CPU at 8 rows: 20.7 -> 10.8 ms; one row is unchanged.
- `use_half_weights` (`--dtype float16`): every Linear keeps its weight as float16
  packed for fbgemm, while inputs, outputs and sums stay float32. Decoding reads the
  weights once a step, so halving them halves the memory traffic, and fbgemm's
  kernels suit a few rows: a decode step went 67 -> 36 ms at 1 row and 135 -> 66 ms
  at 8 rows, with the same greedy tokens as float32 over 8 rows x 40 steps. Prefill
  multiplies a float32 copy of the rounded weights (faster for many rows).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from linears import Float16Linear, build_in_parallel


class RoomyLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers with spare room.

    Code that assigns `keys`/`values` directly (joining or cutting rows of the
    batch) keeps working: the next update sees the tensors are no longer its own
    views and copies them into fresh buffers, which costs one concatenation.
    """

    SPARE = 64  # positions of room added whenever a buffer is (re)built

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        new = old + key_states.shape[-2]
        if self.keys is not getattr(self, "_own_keys", None) or self._key_room.shape[-2] < new:
            self._key_room = self._with_room(self.keys, key_states, old, new)
            self._value_room = self._with_room(self.values, value_states, old, new)
        self._key_room[:, :, old:new] = key_states
        self._value_room[:, :, old:new] = value_states
        self.keys = self._own_keys = self._key_room[:, :, :new]
        self.values = self._value_room[:, :, :new]
        return self.keys, self.values

    def _with_room(self, current, incoming, old: int, new: int):
        shape = list(incoming.shape)
        shape[-2] = new + self.SPARE
        room = incoming.new_empty(shape)
        if old:
            room[:, :, :old] = current
        return room


def new_cache(config) -> DynamicCache:
    """transformers' cache for this model, with roomy layers where it would use plain ones."""
    cache = DynamicCache(config=config)
    cache.layers = [RoomyLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class SharedPrefix:
    """The KV cache of a prompt prefix most requests share, computed once.

    With the embedded model every templated prompt starts with the same ~24 tokens
    (the default system turn and the user header), two thirds of a short prompt; a
    prefill seeded with their cached keys and values computes only the rest.
    """

    def __init__(self, ids: list[int], cache: DynamicCache):
        self.ids = ids
        self._layers = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]

    def covers(self, prompt_ids: list[int]) -> bool:
        return len(prompt_ids) > len(self.ids) and prompt_ids[:len(self.ids)] == self.ids

    def seed(self, cache: DynamicCache, rows: int) -> None:
        """Fill an empty cache with the prefix, once per row."""
        for layer, (keys, values) in zip(cache.layers, self._layers):
            layer.update(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))


class FewRowsHead(torch.nn.Module):
    """The output head's Linear, computed in the order MKL handles best for few rows."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.weight = linear.weight
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        rows = x.numel() // x.shape[-1]
        if not 2 <= rows <= 64:  # one row is a gemv either way; many rows amortise the packing
            return torch.nn.functional.linear(x, self.weight, self.bias)
        y = torch.mm(self.weight, x.reshape(rows, x.shape[-1]).t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def speed_up_output_head(model) -> None:
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear:
        model.set_output_embeddings(FewRowsHead(head))


class HalfWeightLinear(torch.nn.Module):
    """A Linear whose weight is rounded to float16; activations and sums stay float32.

    Few rows (decoding) go through fbgemm with the weight packed as float16. Many
    rows (prefill) are compute-bound, where MKL's float32 gemm is faster (360 rows:
    0.63 s against 0.98 s for the embedded model), so they multiply a float32 copy
    of the same rounded weight: either way a row gets the same product up to the
    summation order, whatever else is in its batch.
    """

    MANY_ROWS = 64

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        self.few_rows = Float16Linear(weight, linear.bias.detach() if linear.bias is not None else None)
        self.register_buffer("weight", weight.to(torch.float16).float(), persistent=False)
        self.register_buffer("bias", self.few_rows.bias, persistent=False)

    def forward(self, x):
        rows = x.reshape(-1, self.in_features).float()
        if rows.shape[0] >= self.MANY_ROWS:
            y = torch.nn.functional.linear(rows, self.weight, self.bias)
        else:
            y = self.few_rows(rows)
        return y.reshape(*x.shape[:-1], self.out_features)


def use_half_weights(model) -> None:
    """Swap every nn.Linear of a float32 model for a HalfWeightLinear."""
    slots = [(module, name, child) for module in model.modules()
             for name, child in module.named_children() if type(child) is torch.nn.Linear]
    halves = build_in_parallel(HalfWeightLinear, [child for _, _, child in slots])
    for (module, name, _), half in zip(slots, halves):
        setattr(module, name, half)


def speed_up(model, dtype: str) -> None:
    """Apply what suits the served dtype; `float16` needs a float32 model."""
    if dtype == "float16":
        use_half_weights(model)
    else:
        speed_up_output_head(model)
