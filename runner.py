"""The interface between the scheduler and a model, and the model's facts.

A runner owns the model, its tokenizer and the KV cache of the running batch. It has
no threads and no asyncio: the scheduler (engine.py) calls it from the model thread
only, and its tests call it directly. Rows of the batch are numbered 0..rows-1 in the
order they joined; `keep` cuts rows out and renumbers the rest in order.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class ModelFacts:
    """What the event loop may know of the loaded model: one immutable snapshot,
    published once by the model thread."""

    name: str
    architecture: str = ""
    parameters: int = 0
    chat_template: str = ""
    context_length: int = 0
    dtype: str = ""
    device: str = "cpu"
    max_prompt_chars: int = 0  # longer prompts cannot fit the context, whatever they say
    load_seconds: float = 0.0


class Runner(Protocol):
    codec: Any  # prompts.TextCodec: the tokenizer and chat template
    architecture: str
    parameters: int
    context_length: int
    dtype: str
    device: str
    eos_ids: frozenset[int]
    # True where a step runs on a device while the host goes on (a GPU): the step's
    # results are waited for when sampling reads them. Absent: False.
    asynchronous: bool
    # The optional ones below, as the scheduler reads them (absent: the default said).
    # Asynchronous and `decode` takes the last sampled tokens as a device tensor, so the
    # scheduler launches step N+1 before reading step N's tokens. Absent: False.
    pipelined: bool
    # Prompt tokens of padding a grouped prefill may add for free (a GPU's pass costs
    # its launches, not its size). Absent: 0.
    free_padding: int
    # Batch rows the runner holds at most (a GPU's KV slots); the scheduler admits no
    # more. Absent: as many as the scheduler was asked for.
    max_batch: int

    @property
    def rows(self) -> int:
        """Rows in the running batch."""

    def remember_prefix(self, ids: list[int]) -> None:
        """Cache a prompt prefix many requests share; later prefills reuse it."""

    def prefill(self, prompts: list[list[int]]):
        """Compute the prompts in one pass and join them to the batch as new last rows.
        Returns the logits of each one's last position, [len(prompts), vocab]. On an
        exception the batch is as it was."""

    def begin(self, prompt: list[int]) -> Any:
        """Start a prefill computed a chunk at a time (`advance`), apart from the batch."""

    def advance(self, partial: Any, tokens: int):
        """Compute up to `tokens` more of a partial prefill. Returns None while some
        are left; else joins it to the batch as the new last row and returns its logits [1, vocab]."""

    def decode(self, tokens: list[int]):
        """Feed one token per row; returns the next logits of every row, [rows, vocab]."""

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows of the batch, in this order."""

    def begin_embedding(self, ids: list[int]) -> Any:
        """Start a text's embedding, computed a chunk at a time (`advance_embedding`),
        apart from the batch."""

    def advance_embedding(self, partial: Any, tokens: int) -> list[float] | None:
        """Compute up to `tokens` more of an embedding. Returns None while some are left;
        else the final hidden states (after the last norm) averaged over all its tokens,
        L2-normalised: the same vector, to float rounding, whatever the chunks."""

    def reset(self) -> None:
        """Forget the batch (after a failure left it in doubt)."""


RUNNERS = ("auto", "llama", "static", "transformers")
DEVICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(requested: str) -> str:
    """The device `--device` serves on, or a RuntimeError saying why it cannot.
    `auto`: the first CUDA device when torch sees one, else the CPU. Torch is imported
    (1.2-1.7 s here, before the server listens) only where a GPU may be: the NVIDIA
    driver's device files exist (/dev/dxg under WSL)."""
    if requested == "cpu" or (requested == "auto" and not _driver_present()):
        return "cpu"
    if requested == "auto" or re.fullmatch(r"cuda(:\d+)?", requested):
        import torch

        if torch.cuda.is_available():
            device = "cuda:0" if requested in ("auto", "cuda") else requested
            if int(device.split(":")[1]) >= torch.cuda.device_count():
                raise RuntimeError(f"--device {requested}: torch sees {torch.cuda.device_count()} CUDA device(s)")
            return device
        if requested == "auto":
            return "cpu"
        raise RuntimeError(f"--device {requested}: no CUDA device is visible to torch {torch.__version__} "
                           f"here; serve on the CPU with --device cpu (or auto)")
    raise RuntimeError(f"--device must be auto, cpu, cuda or cuda:N, not {requested!r}")


def _driver_present() -> bool:
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/dxg") or bool(glob.glob("/dev/nvidia[0-9]*"))


def load_runner(source, dtype: str, cache_dir: str | None, runner: str = "auto", device: str = "cpu",
                max_batch: int = 8, fixed_batch: bool = True) -> Runner:
    """The runner for a model source. `auto`: on a GPU the static runner (Llama
    architectures only); on the CPU our own Llama runner for the architectures it
    computes, transformers' for every other. Imports torch: call it on the model thread.

    A model folder, or a GGUF file converted once before, loads straight from its
    safetensors without importing transformers; anything else loads through
    transformers (which converts and caches a GGUF file the first time)."""
    if device != "cpu" and runner in ("llama", "transformers"):
        raise RuntimeError(f"--runner {runner} computes on the CPU only; on {device} the static runner serves "
                           f"(--runner auto or static), or use --device cpu")
    if device != "cpu" or runner == "static":
        return _load_static(source, dtype, cache_dir, device, max_batch, fixed_batch)
    import linears
    import llama_runner
    from modelsource import weights_folder

    folder = weights_folder(source, cache_dir)
    if runner != "transformers" and folder is not None and llama_runner.servable_folder(folder):
        fast = llama_runner.load_folder(folder, linears.choose_dtype(dtype, int8_computable=True))
        if fast is not None:
            return fast
    import transformers_runner as hf

    if runner == "transformers":
        dtype = linears.choose_dtype(dtype, int8_computable=False)
        model, tokenizer = hf.load_model(source, dtype, cache_dir)
        return hf.TransformersRunner(model, tokenizer, dtype, hf.eos_ids(model, tokenizer))
    model, tokenizer = hf.load_model(source, "float32", cache_dir)
    ours = llama_runner.supports(model.config.to_dict())
    if runner == "llama" and not ours:
        raise RuntimeError(f"the llama runner does not compute {model.config.model_type!r} models")
    dtype = linears.choose_dtype(dtype, int8_computable=ours)
    if ours:
        return llama_runner.from_transformers(model, tokenizer, dtype, hf.eos_ids(model, tokenizer))
    model = model.to(hf.torch_dtype(dtype))
    return hf.TransformersRunner(model, tokenizer, dtype, hf.eos_ids(model, tokenizer))


def _load_static(source, dtype: str, cache_dir: str | None, device: str, max_batch: int,
                 fixed_batch: bool) -> Runner:
    """cuda_runner.StaticRunner, from the folder (a GGUF file is converted and cached
    through transformers first, once). Its `max_batch` may be fewer than asked when
    `fixed_batch` is false (cuda_runner.slot_plan)."""
    import cuda_runner
    import llama_runner
    from modelsource import weights_folder

    folder = weights_folder(source, cache_dir)
    if folder is None or not llama_runner.servable_folder(folder):
        import transformers_runner as hf

        hf.load_model(source, "float32", cache_dir)  # converts and caches a GGUF file
        folder = weights_folder(source, cache_dir)
    if folder is None or not llama_runner.servable_folder(folder):
        raise RuntimeError("the static runner serves only Llama-architecture models from a folder, or from a GGUF "
                           "file through its cached conversion (--cache-dir)"
                           + ("" if device == "cpu" else f" (all that runs on {device}); serve this one with "
                                                         f"--device cpu"))
    runner = cuda_runner.load_folder(folder, dtype, device, max_batch, fixed_batch=fixed_batch)
    if runner is None:
        raise RuntimeError("the static runner needs a tokenizer.json it can read without transformers")
    return runner
