"""A tiny randomly initialised GPT-2 saved with save_pretrained, served via --model <folder>.

This is the loading path of `--model gpt2` (a folder instead of the hub), with a model
that has no chat template, a different architecture and a short context.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from serverproc import ServerProcess, wait_for_log
from tinymodels import CONTEXT


@pytest.fixture(scope="module")
def gpt2_server(tiny_gpt2_folder, tmp_path_factory):
    log_file = tmp_path_factory.mktemp("gpt2-logs") / "log.jsonl"
    proc = ServerProcess(["--model", str(tiny_gpt2_folder), "--dtype", "float32"], log_file=log_file)
    proc.wait_ready()
    yield proc
    assert proc.stop() == 0


def test_streams_from_a_saved_gpt2_folder(gpt2_server):
    resp = gpt2_server.generate(prompt="The quick brown fox", max_tokens=10, temperature=0)
    assert resp.status == 200
    final = resp.lines()[-1]
    assert final["done"] and final["done_reason"] in ("stop", "length")
    assert final["eval_count"] <= 10 and final["prompt_eval_count"] > 0
    assert gpt2_server.request("GET", "/health").json()["model"] != "smollm2-135m-instruct"


def test_gpt2_without_template_uses_the_raw_prompt(gpt2_server):
    templated = gpt2_server.generate(prompt="The quick brown fox", max_tokens=1).lines()[-1]
    raw = gpt2_server.generate(prompt="The quick brown fox", raw=True, max_tokens=1).lines()[-1]
    assert templated["prompt_eval_count"] == raw["prompt_eval_count"]


def test_generation_stops_at_the_context_length(gpt2_server):
    resp = gpt2_server.generate(prompt="fox " * 40, max_tokens=300, temperature=0, repeat_penalty=1.0)
    final = resp.lines()[-1]
    assert final["prompt_eval_count"] + final["eval_count"] <= CONTEXT
    assert final["done_reason"] in ("stop", "length")


def test_prompt_over_the_context_is_400(gpt2_server):
    resp = gpt2_server.generate(prompt="fox " * 200)
    assert resp.status == 400 and "context" in resp.json()["error"]


def test_concurrent_streams_on_gpt2(gpt2_server):
    prompts = ["The quick", "A language model", "Streaming servers", "The lazy dog"]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda p: gpt2_server.generate(prompt=p, max_tokens=8, temperature=0), prompts))
    alone = [gpt2_server.generate(prompt=p, max_tokens=8, temperature=0) for p in prompts]
    assert all(r.status == 200 and r.lines()[-1]["done"] for r in results)
    # Greedy text is the same whether a prompt ran alone or beside others.
    assert [r.text() for r in results] == [r.text() for r in alone]
    rid = results[0].headers["x-request-id"]
    assert wait_for_log(gpt2_server.log_file, lambda r: str(r["id"]) == rid)["status"] == "done"
