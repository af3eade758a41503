"""Shared fixtures: a real MiniVault server process and a raw-socket HTTP client."""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from serverproc import ServerProcess  # noqa: E402
from tinymodels import save_tiny_gpt2, save_tiny_llama  # noqa: E402


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The embedded model behind a real server, shared by the end-to-end tests."""
    log_file = tmp_path_factory.mktemp("logs") / "log.jsonl"
    # MINIVAULT_TEST_DTYPE=bfloat16 runs the end-to-end tests in that dtype.
    dtype = os.environ.get("MINIVAULT_TEST_DTYPE", "auto")
    proc = ServerProcess(["--dtype", dtype], log_file=log_file)
    proc.wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def tiny_gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 saved as a model folder, built once per session."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    save_tiny_gpt2(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_folder(tmp_path_factory, tiny_gpt2_folder):
    """A tiny random Llama saved as a model folder: what the llama runner computes."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(folder, tiny_gpt2_folder)
    return folder


@pytest.fixture(scope="module")
def ol(server):
    """The official `ollama` client on the shared server."""
    import ollama

    return ollama.Client(host=f"http://127.0.0.1:{server.port}")


@pytest.fixture(scope="module")
def oa(server):
    """The official `openai` client on the shared server's /v1."""
    import openai

    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0)
