"""Our own runner for Llama-architecture models (SmolLM2, Llama 2/3, Mistral), on plain
torch ops, gpt-fast style: one readable forward, fused projections, a KV cache laid
out for the scheduler's join and cut. No threads, no asyncio.

Why: transformers' generic forward spends more time in Python than in the matmuls at
batch 1 on a small model (measured on a 2-core AVX-512 CPU: the model's Linears take
~9 ms a step in float16, transformers' whole step ~22 ms).

The KV cache keeps one row per sequence, left-aligned: row b holds its tokens at
positions 0..length_b-1, and a step for row b attends to positions <= its own. Rows
never shift, so joining copies the new rows in and cutting selects rows.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
import torch
import torch.nn.functional as F

from linears import make_linears
from prompts import TextCodec
from transfer import to_device

log = logging.getLogger("minivault.llama")

SUPPORTED = {"llama", "mistral"}
CAPACITY_STEP = 256  # cache positions added at a time when a row outgrows the buffers
SPAN_BUCKET = 256  # prefill attention spans are whole buckets (a multiple of CAPACITY_STEP)
# A decode step's attention spans whole buckets of this many positions. Measured here: a
# row's attention over spans that are multiples of 16 gave bit-identical results alone
# and beside longer rows (480 of 480; at multiples of 8, 3 differed; exact lengths, 321).
# 64 rather than 256 reads a quarter as many cached keys for short rows: at 8 rows the
# step's attention cost ~4.5 ms over 256 positions.
DECODE_SPAN_BUCKET = 64


def supports(config: dict) -> bool:
    return (config.get("model_type") in SUPPORTED and not config.get("attention_bias")
            and not config.get("mlp_bias") and not config.get("sliding_window")
            and (config.get("rope_scaling") or config.get("rope_parameters") or {}).get("rope_type",
                                                                                      "default") == "default")


class KVRows:
    """Keys and values of several sequences in one tensor, [2, layers, rows, kv_heads,
    capacity, head_dim] (keys, then values), so that a step writes a layer's new keys
    and values in one op (30 fewer a decode step of the embedded model)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, rows: int = 0, capacity: int = 0,
                 device: str = "cpu", dtype=torch.float32):
        self.kv = torch.zeros((2, layers, rows, kv_heads, capacity, head_dim), device=device, dtype=dtype)
        self.lengths: list[int] = [0] * rows

    @classmethod
    def over(cls, kv, lengths: list[int]) -> "KVRows":
        """Rows kept in a tensor owned elsewhere (a view: writes land there)."""
        rows = cls.__new__(cls)
        rows.kv, rows.lengths = kv, list(lengths)
        return rows

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    def ensure(self, capacity: int) -> None:
        have = self.capacity
        if capacity <= have:
            return
        grown = math.ceil(capacity / CAPACITY_STEP) * CAPACITY_STEP
        self.kv = F.pad(self.kv, (0, 0, 0, grown - have))

    def join(self, other: "KVRows") -> None:
        width = max(self.capacity, other.capacity)
        self.ensure(width)
        other.ensure(width)
        self.kv = torch.cat([self.kv, other.kv], dim=2)
        self.lengths += other.lengths

    def keep(self, rows: list[int]) -> None:
        self.kv = self.kv.index_select(2, torch.tensor(rows, dtype=torch.long, device=self.kv.device))
        self.lengths = [self.lengths[r] for r in rows]
        longest = max(self.lengths, default=0)
        if self.capacity - longest > 2 * CAPACITY_STEP:  # give memory back after long rows end
            keep = math.ceil(max(longest, 1) / CAPACITY_STEP) * CAPACITY_STEP
            self.kv = self.kv[:, :, :, :, :keep].contiguous()


class LlamaModel:
    """The forward pass. `weights`: tensors named as in transformers' LlamaForCausalLM.
    On a GPU (`device`), the weights, the rotary table and the KV cache live there and
    the cache holds `cache_dtype` (bfloat16 halves it); on the CPU it is float32.
    `activations`: the dtype of the work inside a layer (matmul inputs and outputs,
    rotation, attention); the residual stream it adds to stays float32. float32 on the
    CPU, whatever the weights (the int8 and int4 kernels take bfloat16 in and give
    float32 back). bfloat16 for a bfloat16 model on a GPU: one conversion after each norm
    instead of two around each matmul and the attention, which cut the operations a
    captured decode step replays from 977 to 677 (counted on the embedded model's
    shape; views excluded; 616 since keys and values are written in one op). On the
    embedded model its greedy token agreed with
    float32's at 98.8% of 1,024 teacher-forced steps (16 prompts x 64), against 98.4%
    with float32 between the matmuls: the bfloat16 matmuls and cache set the agreement.
    Logits are float32 either way."""

    def __init__(self, config: dict, weights: dict, kind: str, device: str = "cpu", cache_dtype=torch.float32,
                 activations=torch.float32, fused_decode_attention: bool = False):
        self.device = device
        self.fused_decode_attention = fused_decode_attention  # see _attend_one
        self.cache_dtype = cache_dtype
        self.activations = activations
        self.layers = config["num_hidden_layers"]
        self.hidden = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads
        self.head_dim = config.get("head_dim") or self.hidden // self.heads
        self.eps = config.get("rms_norm_eps", 1e-6)
        theta = (config.get("rope_parameters") or {}).get("rope_theta") or config.get("rope_theta", 10000.0)
        self.context = config.get("max_position_embeddings", 2048)
        inv = 1.0 / theta ** (torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        angles = torch.outer(torch.arange(self.context).float(), inv)
        # [context, head_dim], computed in float32 then rounded, as transformers does; laid
        # out for _rope: cos = [cos, cos], sin = [-sin, sin] over each head
        cos, sin = angles.cos(), angles.sin()
        self.cos = torch.cat([cos, cos], dim=-1).to(device, activations)
        self.sin = torch.cat([-sin, sin], dim=-1).to(device, activations)
        # Values ride along the rotation unturned (cos 1, sin 0), so that a layer's new
        # keys and values leave it side by side, for one write into the cache.
        self._unturned = (torch.ones(1, 1, 1, self.head_dim, device=device, dtype=activations),
                          torch.zeros(1, 1, 1, self.head_dim, device=device, dtype=activations))
        w = {name: t.to(device) for name, t in weights.items()}
        embed = w["model.embed_tokens.weight"].float()
        # Rows are gathered, then widened. (Copies: a tensor kept from a memory-mapped
        # weights file keeps the whole mapping resident.)
        self.embed = embed.half() if kind != "float32" else embed.clone()
        head = w.get("lm_head.weight", embed).float()
        matrices = []  # per layer: fused q/k/v, o, fused gate/up, down; then the head
        for i in range(self.layers):
            p = f"model.layers.{i}."
            matrices += [torch.cat([w[p + "self_attn.q_proj.weight"], w[p + "self_attn.k_proj.weight"],
                                    w[p + "self_attn.v_proj.weight"]]).float(),
                         w[p + "self_attn.o_proj.weight"].float(),
                         torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]]).float(),
                         w[p + "mlp.down_proj.weight"].float()]
        linears = make_linears(matrices + [head], kind)
        self.blocks = []
        for i in range(self.layers):
            p = f"model.layers.{i}."
            qkv, o, gate_up, down = linears[4 * i:4 * i + 4]
            self.blocks.append({"attn_norm": w[p + "input_layernorm.weight"].float().clone(), "qkv": qkv,
                                "o": o,
                                "mlp_norm": w[p + "post_attention_layernorm.weight"].float().clone(),
                                "gate_up": gate_up, "down": down})
        self.norm = w["model.norm.weight"].float().clone()
        self.head = linears[-1]

    def new_cache(self, rows: int = 0, capacity: int = 0) -> KVRows:
        return KVRows(self.layers, self.kv_heads, self.head_dim, rows, capacity, self.device, self.cache_dtype)

    def cached(self, ids: list[int]) -> KVRows:
        """A one-row cache holding the keys and values of `ids` (a shared prefix)."""
        cache = self.new_cache(rows=1)
        self.forward(torch.tensor([ids]), cache, [len(ids) - 1])
        return cache

    def begin_embedding(self, ids: list[int]) -> "PartialEmbedding":
        """An embedding of `ids` computed a chunk at a time (advance_embedding), alone,
        in a one-row cache of its own."""
        return PartialEmbedding(list(ids), self.new_cache(rows=1))

    def advance_embedding(self, partial: "PartialEmbedding", tokens: int) -> list[float] | None:
        """Compute up to `tokens` more of an embedding. None while some are left; else
        the final hidden states (after the last norm) averaged over every token,
        L2-normalised. The cache carries the context from chunk to chunk, so only the
        sum is kept: the same vector as one pass, to float rounding."""
        done = partial.cache.lengths[0]
        chunk = partial.ids[done:done + tokens]
        hidden = self.forward(torch.tensor([chunk]), partial.cache, [len(chunk) - 1], hidden_states=True)
        summed = hidden[0].float().sum(dim=0)
        partial.total = summed if partial.total is None else partial.total + summed
        if partial.cache.lengths[0] < len(partial.ids):
            return None
        return F.normalize(partial.total / len(partial.ids), dim=0).tolist()

    @staticmethod
    def _rope(x, cos, sin):
        """Rotary embedding, transformers' layout (the two halves of each head rotate
        together): [a, b] -> [a cos - b sin, b cos + a sin], with cos = [cos, cos] and
        sin = [-sin, sin] over the whole head. Three ops instead of eight."""
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)

    def _attend_one(self, q, keys, values, hidden):
        """Attention for one new token per row, as two batched matmuls: each key head
        serves its group of query heads without copying keys. scaled_dot_product_attention
        took 184 us a layer for 8 rows over 256 positions here, mostly overhead.
        `hidden`: 0 where a key is visible, -inf where not, added to the scaled scores in
        one op (the same values as scaling, then masking).

        `fused_decode_attention`: the same in one scaled_dot_product_attention, each key
        head's group of query heads as its query positions: one kernel on a GPU (the
        memory-efficient one, which takes the mask) instead of four, 90 fewer a step of
        the embedded model; on a GPU each captured step keeps the faster of the two
        (cuda_runner.DecodeGraphs)."""
        rows = q.shape[0]
        group = q.reshape(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim)
        if group.dtype != keys.dtype:
            group = group.to(keys.dtype)
        if self.fused_decode_attention:
            out = F.scaled_dot_product_attention(group, keys, values, attn_mask=hidden)
            out = out.reshape(rows, 1, self.heads, self.head_dim)
            return out if out.dtype == self.activations else out.to(self.activations)
        scores = torch.add(hidden, torch.matmul(group, keys.transpose(-1, -2)), alpha=self.head_dim ** -0.5)
        out = torch.matmul(torch.softmax(scores, dim=-1), values).reshape(rows, 1, self.heads, self.head_dim)
        return out if out.dtype == self.activations else out.to(self.activations)

    def forward(self, tokens, cache: KVRows, last: list[int], every_position: bool = False,
                hidden_states: bool = False):
        """Feed tokens [rows, new] to the cache's rows, each continuing from its length;
        `last[b]`: the index in `new` of row b's last real token (later ones are padding).
        Returns the logits at those tokens, [rows, vocab] (or at every token, [rows, new,
        vocab], for measuring perplexity); lengths grow by last[b] + 1."""
        rows, new = tokens.shape
        tokens = to_device(tokens, self.device)
        starts = to_device(cache.lengths, self.device).unsqueeze(1)  # (torch.tensor(device=) waits on a GPU)
        positions = starts + torch.arange(new, device=self.device)  # [rows, new]
        # Attention runs over a span rounded up to a whole bucket, so a row's sums run
        # over the same length alone as beside longer rows of the same bucket: summed
        # over another length, float rounding differed in the last bits, which the
        # bfloat16 activations of int8 turned into other greedy tokens.
        bucket = DECODE_SPAN_BUCKET if new == 1 else SPAN_BUCKET
        span = math.ceil((max(cache.lengths) + new) / bucket) * bucket
        cache.ensure(span)
        x = self.residual(tokens, positions, cache.kv, span)
        cache.lengths = [n + t + 1 for n, t in zip(cache.lengths, last)]
        if hidden_states:  # after the final norm, every position: [rows, new, hidden]
            return F.rms_norm(x, (self.hidden,), self.norm, self.eps).reshape(rows, new, self.hidden)
        if every_position:
            return self._logits(x).reshape(rows, new, -1)
        last_tokens = (torch.arange(rows, device=self.device), to_device(last, self.device))
        return self._logits(x.reshape(rows, new, self.hidden)[last_tokens])

    def _normed(self, x, weight):
        """RMS norm of the float32 residual (one fused kernel on a GPU), in the layers'
        activation dtype."""
        return F.rms_norm(x, (self.hidden,), weight, self.eps).to(self.activations)

    def _logits(self, x):
        return self.head(self._normed(x, self.norm)).float()

    def decode_logits(self, tokens, positions, kv, span: int):
        """One decode step with everything on the device and no host synchronisation,
        as a CUDA graph captures it: tokens and positions [rows, 1], the cache's rows
        (KVRows.kv); returns logits [rows, vocab]."""
        return self._logits(self.residual(tokens, positions, kv, span))

    def residual(self, tokens, positions, kv, span: int):
        """The residual stream after the last layer, [rows * new, hidden], for tokens
        [rows, new] at positions [rows, new]; writes their keys and values into kv
        ([2, layers, rows, kv_heads, capacity >= span, head_dim])."""
        rows, new = tokens.shape
        # Row b's token t sees every key at or before its own position.
        visible = (torch.arange(span, device=self.device) <= positions.unsqueeze(-1)).unsqueeze(1)
        if new == 1:
            hidden = torch.zeros(visible.shape, device=self.device, dtype=kv.dtype).masked_fill_(~visible, -torch.inf)
        row_index = torch.arange(rows, device=self.device).unsqueeze(1).expand(rows, new)
        # The rotation of these positions for every head, once for every layer: [rows,
        # new, heads + 2 * kv_heads, head_dim]; the values' heads unturned.
        turned, unturned = self.heads + self.kv_heads, (rows, new, self.kv_heads, self.head_dim)
        cos, sin = (torch.cat([table[positions].unsqueeze(2).expand(rows, new, turned, self.head_dim),
                               same.expand(unturned)], dim=2) for table, same in zip((self.cos, self.sin),
                                                                                   self._unturned))
        x = self.embed[tokens].float().reshape(rows * new, self.hidden)
        for i, blk in enumerate(self.blocks):
            h = self._normed(x, blk["attn_norm"])
            # Queries and keys rotate together, values beside them: one rotation a layer.
            qkv = self._rope(blk["qkv"](h).reshape(rows, new, turned + self.kv_heads, self.head_dim), cos, sin)
            q = qkv[:, :, :self.heads]
            layer = kv[:, i]  # [2, rows, kv_heads, capacity, head_dim]
            written = qkv[:, :, self.heads:].reshape(rows, new, 2, self.kv_heads, self.head_dim)
            layer[:, row_index, :, positions] = written if written.dtype == layer.dtype else written.to(layer.dtype)
            keys, values = layer[0], layer[1]
            if new == 1:
                attn = self._attend_one(q, keys[:, :, :span], values[:, :, :span], hidden)
            else:
                attn = F.scaled_dot_product_attention(q.transpose(1, 2).to(keys.dtype), keys[:, :, :span],
                                                      values[:, :, :span], attn_mask=visible,
                                                      enable_gqa=True).transpose(1, 2).to(self.activations)
            x = x + blk["o"](attn.reshape(rows * new, self.heads * self.head_dim))
            h = self._normed(x, blk["mlp_norm"])
            gate, up = blk["gate_up"](h).chunk(2, dim=-1)
            x = x + blk["down"](F.silu(gate) * up)
        return x


def all_start_with(prompts: list[list[int]], prefix: list[int]) -> bool:
    """Every prompt starts with the prefix and goes on past it."""
    return all(len(p) > len(prefix) and p[:len(prefix)] == prefix for p in prompts)


class PartialPrefill:
    def __init__(self, prompt: list[int], cache: KVRows):
        self.prompt = prompt
        self.cache = cache


class PartialEmbedding:
    """An input being embedded a chunk at a time: its cache holds the tokens computed so
    far, `total` the sum of their final hidden states."""

    def __init__(self, ids: list[int], cache: KVRows):
        self.ids = ids
        self.cache = cache
        self.total = None


class LlamaRunner:
    """The runner interface (runner.py) over LlamaModel."""

    device = "cpu"
    architecture = "llama"

    def __init__(self, model: LlamaModel, codec: TextCodec, config: dict, dtype: str, eos_ids: frozenset[int],
                 parameters: int):
        self.model = model
        self.codec = codec
        self.dtype = dtype
        self.architecture = config.get("model_type", "llama")
        self.context_length = model.context
        self.eos_ids = eos_ids
        self.parameters = parameters
        self._prefix: tuple[list[int], KVRows] | None = None
        self.reset()

    @property
    def rows(self) -> int:
        return self._cache.rows

    def reset(self) -> None:
        self._cache = self.model.new_cache()

    @torch.inference_mode()
    def remember_prefix(self, ids: list[int]) -> None:
        self._prefix = (list(ids), self.model.cached(ids))

    def _seeded(self, prompts: list[list[int]]) -> KVRows:
        """Fresh cache rows, holding the shared prefix when every prompt starts with it."""
        if self._prefix is not None:
            ids, cached = self._prefix
            if all_start_with(prompts, ids):
                rows = self.model.new_cache(len(prompts), cached.capacity)
                rows.kv[:] = cached.kv  # broadcast over the rows
                rows.lengths = [len(ids)] * len(prompts)
                return rows
        return self.model.new_cache(len(prompts))

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]):
        rows = self._seeded(prompts)
        rests = [p[n:] for p, n in zip(prompts, rows.lengths)]
        width = max(len(r) for r in rests)
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rests])
        logits = self.model.forward(tokens, rows, [len(r) - 1 for r in rests])
        self._cache.join(rows)
        return logits

    def begin(self, prompt: list[int]) -> PartialPrefill:
        return PartialPrefill(prompt, self._seeded([prompt]))

    @torch.inference_mode()
    def advance(self, partial: PartialPrefill, tokens: int):
        done = partial.cache.lengths[0]
        chunk = partial.prompt[done:done + tokens]
        logits = self.model.forward(torch.tensor([chunk]), partial.cache, [len(chunk) - 1])
        if partial.cache.lengths[0] < len(partial.prompt):
            return None
        self._cache.join(partial.cache)
        return logits

    @torch.inference_mode()
    def decode(self, tokens: list[int]):
        if len(tokens) != self.rows:
            raise ValueError(f"{len(tokens)} tokens for a batch of {self.rows} rows")
        return self.model.forward(torch.tensor(tokens).unsqueeze(1), self._cache, [0] * len(tokens))

    def keep(self, rows: list[int]) -> None:
        if rows != list(range(self.rows)):
            self._cache.keep(rows)

    def begin_embedding(self, ids: list[int]) -> PartialEmbedding:
        return self.model.begin_embedding(ids)

    @torch.inference_mode()
    def advance_embedding(self, partial: PartialEmbedding, tokens: int) -> list[float] | None:
        return self.model.advance_embedding(partial, tokens)


def from_transformers(model, tokenizer, dtype: str, eos_ids: frozenset[int]) -> LlamaRunner:
    """A LlamaRunner computing a loaded transformers model (which can be dropped afterwards)."""
    config = model.config.to_dict()
    parameters = sum(p.numel() for p in model.parameters())
    return LlamaRunner(LlamaModel(config, model.state_dict(), dtype), TextCodec.from_transformers(tokenizer),
                       config, dtype, eos_ids, parameters)


def servable_folder(folder: Path) -> bool:
    """A folder this runner loads by itself: a supported config, safetensors weights,
    tokenizer files."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (supports(config) and any(folder.glob("*.safetensors")) and (folder / "tokenizer.json").exists()
            and (folder / "tokenizer_config.json").exists())


def read_folder(folder: Path):
    """(config, weights, codec, eos ids, parameters) of a servable folder, read without
    transformers; None if its tokenizer files need transformers."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    codec = TextCodec.from_folder(folder)
    if codec is None:
        return None
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(file))
    eos = set()
    generation = folder / "generation_config.json"
    for value in (json.loads(generation.read_text()).get("eos_token_id") if generation.exists() else None,
                  config.get("eos_token_id"), codec.eos_token_id):
        eos.update([value] if isinstance(value, int) else value or [])
    # A tied head is the embedding again (a file may still hold a copy of it); an
    # untied one is parameters of its own, as transformers counts them.
    tied = config.get("tie_word_embeddings", False)
    parameters = sum(t.numel() for name, t in weights.items() if not (tied and name == "lm_head.weight"))
    return config, weights, codec, frozenset(eos), parameters


def load_folder(folder: Path, dtype: str) -> LlamaRunner | None:
    """A LlamaRunner straight from a servable folder, without transformers (a warm
    start's fast path); None if its tokenizer files need transformers."""
    read = read_folder(folder)
    if read is None:
        return None
    config, weights, codec, eos, parameters = read
    runner = LlamaRunner(LlamaModel(config, weights, dtype), codec, config, dtype, eos, parameters)
    del weights, read
    give_back_freed_memory()
    return runner


def give_back_freed_memory() -> None:
    """The float32 weights read while building are freed, but glibc keeps freed heap
    unless asked; asking took the resident size down by ~200 MB here."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
