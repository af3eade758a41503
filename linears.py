"""Linear layers in the weight formats our own runners serve, each a callable
x [rows, in] (float32) -> [rows, out] (float32). Every row's result depends on that
row alone, so an answer does not change with what else is in the batch.

Measured on this 2-core AVX-512 CPU, all Linears of SmolLM2-135M (one call each), ms
at 1 / 8 rows: float32 37 / 72, fbgemm float16 9.2 / 14.3, int8 (`_int_mm` with
per-row activation scales) 10.3 / 14.4.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

# torch 2.13 marks the fbgemm float16 ops deprecated; they are what makes float16 fast.
warnings.filterwarnings("ignore", message=r".*fbgemm.*deprecated")

log = logging.getLogger("minivault.linears")

def half_weights_supported() -> bool:
    """fbgemm's float16 kernels need AVX2 and F16C; torch raises without them."""
    try:
        with warnings.catch_warnings():  # the deprecation notice, wherever filters were reset
            warnings.filterwarnings("ignore", message=r".*fbgemm.*deprecated")
            packed = torch.fbgemm_pack_gemm_matrix_fp16(torch.ones(4, 4))
            return bool(torch.fbgemm_linear_fp16_weight(torch.ones(2, 4), packed, torch.zeros(4)).sum() == 32)
    except Exception:
        return False


def native_bfloat16() -> bool:
    try:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    except Exception:
        return False


def choose_dtype(requested: str, int8_computable: bool) -> str:
    """What `--dtype` serves. `auto`: int4 (4-bit weights where the model's are 4-bit
    already, int8 for the rest; bfloat16 activations) where the CPU computes bfloat16
    natively and the runner computes integer weights; else float16 weights where fbgemm
    runs (AVX2 + F16C); else float32.

    Never bfloat16 by default: through transformers its 8-bit mantissa in the
    activations flipped near-ties, so greedy answers changed with what else was in the
    batch (5 of 8 prompts differed at 48 tokens). Our own runner's kernels keep each
    row's products its own, in every format.
    """
    if requested in ("int8", "int4") and not int8_computable:
        raise RuntimeError(f"--dtype {requested} needs the llama runner, which does not compute this model")
    if requested == "auto" and int8_computable and native_bfloat16():
        return "int4"
    if requested in ("auto", "float16"):
        if half_weights_supported():
            return "float16"
        if requested == "float16":
            log.warning("float16 weights need fbgemm (AVX2 and F16C); serving float32")
        return "float32"
    return requested


class Float32Linear:
    def __init__(self, weight):
        self.weight = weight.contiguous()

    def __call__(self, x):
        return F.linear(x, self.weight)


class Float16Linear:
    """The weight rounded to float16 and packed for fbgemm; inputs and sums stay float32."""

    def __init__(self, weight, bias=None):
        self.out_features = weight.shape[0]
        self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight.to(torch.float16).float())
        self.bias = bias.float() if bias is not None else torch.zeros(self.out_features)

    def __call__(self, x):
        return torch.fbgemm_linear_fp16_weight(x.contiguous(), self.packed, self.bias)


class Int8Linear:
    """int8 weights with one scale per output channel, multiplied by bfloat16
    activations (torch's weight-only int8 kernel: fast where the CPU has bfloat16
    instructions, ~10x slower without); float32 out. Each row's products are its own.

    Quantising the activations to int8 too (per row, with torch._int_mm) was as fast
    but cost 7% perplexity against float32; bfloat16 activations cost 1.4%."""

    def __init__(self, weight):
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = (weight / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)

    def __call__(self, x):
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale).float()


class Int4Linear:
    """4-bit weights in groups of 32 inputs, each group with a bfloat16 scale and zero
    (torch's CPU int4 kernel; the layout of a Q4_1 GGUF), bfloat16 activations.

    Used only for a matrix whose values are 4-bit already, as a Q4_1 GGUF's layers
    are: at most 16 distinct values in a group of 32, so requantising loses only the
    bfloat16 rounding of the scale and zero (0.4% relative error on the embedded
    model's layers). Other matrices (its output head has 27 distinct values a group:
    9% error in 4 bits) stay int8. All the embedded model's Linears, 1 / 8 rows: int8
    5.5 / 9.5 ms, int4 3.1 / 7.6 ms."""

    GROUP = 32

    def __init__(self, weight, scale, zero, levels):
        out_features, in_features = weight.shape
        self.weight = torch._convert_weight_to_int4pack_for_cpu(
            levels.reshape(out_features, in_features).to(torch.int32), 1)
        self.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)

    @classmethod
    def of(cls, weight) -> "Int4Linear | None":
        """The matrix in 4 bits, or None unless it is 4-bit already: every value of a
        group of 32 lies on one of 16 evenly spaced levels between the group's ends."""
        out_features, in_features = weight.shape
        if in_features % cls.GROUP or out_features % 8:
            return None
        groups = weight.float().reshape(out_features, in_features // cls.GROUP, cls.GROUP)
        if not cls._levels_fit(groups[:64]):  # most matrices that do not fit show it in their first rows
            return None
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp_(min=1e-10)
        levels = (groups - low).div_(scale)
        rounded = levels.round()
        if float(levels.sub_(rounded).abs_().amax()) > 0.01:
            return None
        zero = low + 8 * scale  # the kernel computes (level - 8) * scale + zero
        return cls(weight, scale.squeeze(-1), zero.squeeze(-1), rounded.clamp_(0, 15))

    @staticmethod
    def _levels_fit(groups) -> bool:
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        steps = (groups - low) / ((high - low) / 15).clamp(min=1e-10)
        return float((steps - steps.round()).abs().amax()) <= 0.01

    def __call__(self, x):
        return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.weight, self.GROUP,
                                                 self.scales_and_zeros).float()


class BFloat16Linear:
    def __init__(self, weight):
        self.weight = weight.to(torch.bfloat16).contiguous()

    def __call__(self, x):
        return F.linear(x.to(torch.bfloat16), self.weight).to(x.dtype)  # bfloat16 activations stay so


def make_linear(weight, kind: str):
    if kind == "int4":
        return Int4Linear.of(weight) or Int8Linear(weight)
    return {"float32": Float32Linear, "float16": Float16Linear, "int8": Int8Linear,
            "bfloat16": BFloat16Linear}[kind](weight)


def build_in_parallel(build, items: list) -> list:
    """[build(item) for item in items], one worker per torch thread: packing weights is
    C++ that releases the GIL, and this halved the embedded model's packing (int8:
    1.2 -> ~0.6 s; fbgemm float16 through transformers: ~3 -> ~1.3 s)."""
    with ThreadPoolExecutor(max(1, torch.get_num_threads())) as pool:
        return list(pool.map(build, items))


def make_linears(weights: list, kind: str) -> list:
    return build_in_parallel(lambda w: make_linear(w, kind), weights)
