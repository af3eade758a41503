"""Linear layers in the weight formats our own runners serve, each a callable
x [rows, in] (float32) -> [rows, out] (float32). Every row's result depends on that
row alone, so an answer does not change with what else is in the batch.

Measured on this 2-core AVX-512 CPU, all Linears of SmolLM2-135M (one call each), ms
at 1 / 8 rows: float32 37 / 72, fbgemm float16 9.2 / 14.3, int8 (`_int_mm` with
per-row activation scales) 10.3 / 14.4.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# torch 2.13 marks the fbgemm float16 ops deprecated; they are what makes float16 fast.
warnings.filterwarnings("ignore", message=r".*fbgemm.*deprecated")

KINDS = ("float32", "float16", "int8", "bfloat16")


class Float32Linear:
    def __init__(self, weight):
        self.weight = weight.contiguous()

    def __call__(self, x):
        return F.linear(x, self.weight)


class Float16Linear:
    """The weight rounded to float16 and packed for fbgemm; inputs and sums stay float32."""

    def __init__(self, weight):
        self.out_features = weight.shape[0]
        self.packed = torch.fbgemm_pack_gemm_matrix_fp16(weight.to(torch.float16).float())
        self.bias = torch.zeros(self.out_features)

    def __call__(self, x):
        return torch.fbgemm_linear_fp16_weight(x.contiguous(), self.packed, self.bias)


class Int8Linear:
    """int8 weights with one scale per output channel; each input row is quantised to
    int8 with its own scale, so rows stay independent (a per-tensor scale, as
    quantize_dynamic uses, let one outlier row change every other row's result).
    The int32 sums are exact, whatever the batch."""

    def __init__(self, weight):
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight_t = (weight / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8).t().contiguous()
        self.scale = scale

    def __call__(self, x):
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        xq = (x / x_scale).round().to(torch.int8)
        return torch._int_mm(xq, self.weight_t).float() * x_scale * self.scale


class BFloat16Linear:
    def __init__(self, weight):
        self.weight = weight.to(torch.bfloat16).contiguous()

    def __call__(self, x):
        return F.linear(x.to(torch.bfloat16), self.weight).float()


def make_linear(weight, kind: str):
    return {"float32": Float32Linear, "float16": Float16Linear, "int8": Int8Linear,
            "bfloat16": BFloat16Linear}[kind](weight)
