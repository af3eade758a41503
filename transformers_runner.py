"""The model runner for any architecture transformers knows: loading, prefill, decode
steps over a batch, joining and cutting KV-cache rows. No threads, no asyncio.

The batch's KV cache has one row per sequence, left-padded to a common length;
`_mask` marks real positions and `_lengths` counts each row's real tokens (its next
position). Prompts that arrive together are prefilled in one padded pass and
concatenated in; rows that end are cut out with batch_select_indices.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import fastdecode
from modelsource import weights_folder
from prompts import TextCodec

log = logging.getLogger("minivault.runner")


def torch_dtype(dtype: str):
    """The dtype a transformers model is held in: float16 means float16 weights on a
    float32 model (fastdecode.use_half_weights)."""
    return {"float32": torch.float32, "float16": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_model(source, dtype: str, cache_dir: str | None):
    """Returns (model, tokenizer). A GGUF file is converted once and cached as safetensors."""
    held = torch_dtype(dtype)
    if source.kind == "gguf":
        cached = weights_folder(source, cache_dir)
        if cached is not None and (cached / "config.json").exists():
            log.info("loading cached weights from %s", cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=held)
            tokenizer = AutoTokenizer.from_pretrained(cached)
        else:
            folder, name = os.path.split(source.location)
            log.info("converting %s (first start only; later starts use the cache)", name)
            # float32: the dequantised weights exactly, whatever dtype is served.
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            if cached is not None:
                _save_cache(model, tokenizer, cached)
            model = model.to(held)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.location, dtype=held)
        tokenizer = AutoTokenizer.from_pretrained(source.location)
    model.eval()
    return model, tokenizer


def _save_cache(model, tokenizer, target: Path) -> None:
    # A GGUF-loaded model refuses save_pretrained although its weights are plain
    # floats; dropping the quantizer records makes it serialisable.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written cache is never used
        log.info("cached converted weights in %s", target)
    except OSError as exc:
        log.warning("could not cache converted weights in %s: %s", target, exc)
        shutil.rmtree(tmp, ignore_errors=True)


def cache_argument(model) -> str:
    """The name a model's forward takes its KV cache by: `cache` from transformers 5.2x on
    (where `past_key_values` still works but warns), `past_key_values` before (5.17, as on
    the GPU machines, ignores `cache` and would decode every step without its context)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return frozenset(ids)


class PartialPrefill:
    """A prompt being prefilled a chunk at a time, in a cache of its own."""

    def __init__(self, prompt: list[int], cache, done: int):
        self.prompt = prompt
        self.cache = cache
        self.done = done


class PartialEmbedding(PartialPrefill):
    """An input being embedded a chunk at a time, apart from the batch; `total`: the sum
    of its final hidden states so far."""

    total = None


class TransformersRunner:
    device = "cpu"

    def __init__(self, model, tokenizer, dtype: str, eos_ids: frozenset[int]):
        self.model = model
        self.codec = TextCodec.from_transformers(tokenizer)
        self.dtype = dtype
        config = model.config
        self.architecture = str(getattr(config, "model_type", "unknown"))
        self.parameters = sum(p.numel() for p in model.parameters())
        self.context_length = int(getattr(config, "max_position_embeddings", 0)
                                  or getattr(config, "n_positions", 0) or 2048)
        self.eos_ids = eos_ids
        fastdecode.speed_up(model, dtype)
        self._cache_argument = cache_argument(model)
        self._prefix: fastdecode.SharedPrefix | None = None
        self.reset()

    @property
    def rows(self) -> int:
        return len(self._lengths)

    def reset(self) -> None:
        self._cache = None
        self._mask = None
        self._lengths: list[int] = []

    def _new_cache(self):
        return fastdecode.new_cache(self.model.config)

    def _forward(self, cache=None, **kwargs):
        if cache is not None:
            kwargs[self._cache_argument] = cache
        return self.model(use_cache=True, **kwargs)

    @torch.inference_mode()
    def remember_prefix(self, ids: list[int]) -> None:
        cache = self._new_cache()
        if not all(type(layer) is fastdecode.RoomyLayer for layer in cache.layers):
            return  # e.g. sliding-window layers: keep to the plain path
        self._forward(input_ids=torch.tensor([ids]), cache=cache, logits_to_keep=1)
        self._prefix = fastdecode.SharedPrefix(list(ids), cache)

    def _cache_for(self, prompts: list[list[int]]) -> tuple[object, int]:
        """A fresh cache for a prefill, seeded with the shared prefix when every prompt
        starts with it; returns (cache, tokens already in it)."""
        cache = self._new_cache()
        if self._prefix is not None and all(self._prefix.covers(p) for p in prompts):
            self._prefix.seed(cache, len(prompts))
            return cache, len(self._prefix.ids)
        return cache, 0

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]):
        cache, done = self._cache_for(prompts)
        # Each row: [shared prefix, if cached][left padding][rest of its prompt].
        rests = [p[done:] for p in prompts]
        width = max(len(r) for r in rests)
        ids = torch.tensor([[0] * (width - len(r)) + r for r in rests])
        mask = torch.tensor([[1] * done + [0] * (width - len(r)) + [1] * len(r) for r in rests])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, done:]
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            logits_to_keep=1)
        self._join(cache, mask, [len(p) for p in prompts])
        return out.logits[:, -1]

    @torch.inference_mode()
    def begin(self, prompt: list[int]) -> PartialPrefill:
        cache, done = self._cache_for([prompt])
        return PartialPrefill(prompt, cache, done)

    @torch.inference_mode()
    def advance(self, partial: PartialPrefill, tokens: int):
        done = partial.done
        chunk = partial.prompt[done:done + tokens]
        out = self._forward(input_ids=torch.tensor([chunk]), cache=partial.cache, logits_to_keep=1,
                            position_ids=torch.arange(done, done + len(chunk)).unsqueeze(0))
        partial.done = done + len(chunk)
        if partial.done < len(partial.prompt):
            return None
        mask = torch.ones((1, len(partial.prompt)), dtype=torch.long)
        self._join(partial.cache, mask, [len(partial.prompt)])
        return out.logits[:, -1]

    @torch.inference_mode()
    def decode(self, tokens: list[int]):
        if len(tokens) != self.rows:
            raise ValueError(f"{len(tokens)} tokens for a batch of {self.rows} rows")
        ids = torch.tensor([[t] for t in tokens])
        positions = torch.tensor([[n] for n in self._lengths])
        mask = torch.cat([self._mask, torch.ones((len(tokens), 1), dtype=torch.long)], dim=1)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=self._cache)
        self._mask = mask
        self._lengths = [n + 1 for n in self._lengths]
        return out.logits[:, -1]

    def _join(self, cache, mask, lengths: list[int]) -> None:
        if self._cache is None:
            self._cache, self._mask, self._lengths = cache, mask, list(lengths)
            return
        width = max(self._mask.shape[1], mask.shape[1])
        for mine, new in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(new.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(new.values, width)])
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self._lengths += lengths

    def begin_embedding(self, ids: list[int]) -> PartialEmbedding:
        return PartialEmbedding(list(ids), self._new_cache(), 0)

    @torch.inference_mode()
    def advance_embedding(self, partial: PartialEmbedding, tokens: int) -> list[float] | None:
        done = partial.done
        chunk = partial.prompt[done:done + tokens]
        out = self._forward(input_ids=torch.tensor([chunk]), cache=partial.cache, logits_to_keep=1,
                            position_ids=torch.arange(done, done + len(chunk)).unsqueeze(0),
                            output_hidden_states=True)
        summed = out.hidden_states[-1][0].float().sum(dim=0)  # the last entry is after the final norm
        partial.total = summed if partial.total is None else partial.total + summed
        partial.done = done + len(chunk)
        if partial.done < len(partial.prompt):
            return None
        return torch.nn.functional.normalize(partial.total / len(partial.prompt), dim=0).tolist()

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        if rows == list(range(self.rows)):
            return
        if not rows:
            self.reset()
            return
        index = torch.tensor(rows, dtype=torch.long)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._lengths = [self._lengths[r] for r in rows]
        # Columns that are padding in every remaining row can go.
        used = self._mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, start:]
                layer.values = layer.values[:, :, start:]
            self._mask = self._mask[:, start:]


def _left_pad(t, width: int, dim: int = 2):
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=t.dtype), t], dim=dim)
