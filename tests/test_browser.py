"""The playground page in a real headless Chromium (Debian's package, driven by Playwright)."""

from __future__ import annotations

import contextlib
import pathlib
import shutil
import time

import pytest

from serverproc import ROOT, wait_for_log

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "test-artifacts"
# Headless in a closed network: no background fetches, no sandbox (we run as root).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert pathlib.Path(CHROMIUM).exists(), "Chromium is missing: `make test` installs Debian's chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@contextlib.contextmanager
def open_page(browser, server, **context_args):
    """The playground in a fresh browser context, closed whatever happens."""
    context = browser.new_context(**context_args)
    try:
        pg = context.new_page()
        pg.goto(f"http://127.0.0.1:{server.port}/")
        yield pg
    finally:
        context.close()


@pytest.fixture
def page(browser, server):
    with open_page(browser, server, viewport={"width": 1280, "height": 800}) as pg:
        yield pg


def wait_js(page, expression: str, timeout: float = 120.0) -> None:
    """Poll a JavaScript expression (page.wait_for_function would need eval, which our CSP forbids)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, (f"timed out waiting for {expression}; page: "
                                             f"{page.text_content('main')!r}")
        page.wait_for_timeout(30)


def _lengths_while_streaming(page, selector: str, done_text: str, timeout: float = 120.0) -> list[int]:
    """Lengths of the answer's text sampled while it streams, until the stats appear."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while done_text not in (page.text_content("#stats") or ""):
        assert time.monotonic() < deadline, "the answer never finished"
        text = page.text_content(selector) if page.query_selector(selector) else ""
        if not seen or len(text or "") != seen[-1]:
            seen.append(len(text or ""))
        page.wait_for_timeout(30)
    return seen


def test_answer_streams_in_and_shows_statistics(page):
    wait_js(page, "document.getElementById('model').textContent.includes('smollm2')")
    page.fill("#max-tokens", "40")
    page.fill("#temperature", "0")
    page.fill("#prompt", "What is an AI model?")
    page.press("#prompt", "Enter")
    lengths = _lengths_while_streaming(page, ".turn.assistant", "tokens/s")
    # The text was seen at several growing lengths: it streamed in, not all at once.
    assert len([n for n in lengths if n > 0]) >= 3 and lengths == sorted(lengths)
    answer = page.text_content(".turn.assistant")
    assert len(answer) > 20
    stats = page.text_content("#stats")
    assert "first token" in stats and "tokens/s" in stats and "40 tokens" in stats
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "playground-answer.png"), full_page=True)


def test_shift_enter_makes_a_new_line(page):
    page.fill("#prompt", "line one")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "line two")
    assert page.input_value("#prompt") == "line one\nline two"
    assert page.query_selector(".turn") is None


def test_stop_cancels_the_generation_on_the_server(page, server):
    prompt = f"Write a very long story about a lighthouse keeper ({time.time()})."
    page.fill("#max-tokens", "300")
    page.fill("#prompt", prompt)
    page.click("#send")
    wait_js(page, "document.querySelector('.turn.assistant') && "
                           "document.querySelector('.turn.assistant').textContent.length > 10")
    page.click("#stop")
    wait_js(page, "document.getElementById('status').textContent === 'stopped'")
    assert page.is_disabled("#stop") and not page.is_disabled("#send")
    record = wait_for_log(server.log_file, lambda r: r["prompt"] == prompt)
    assert record["status"] == "cancelled" and record["completion_tokens"] < 300


def test_chat_mode_keeps_the_conversation(page, server):
    page.check("#chat-mode")
    page.fill("#max-tokens", "8")
    for text in ("Hello!", "What did I just say?"):
        page.fill("#prompt", text)
        page.press("#prompt", "Enter")
        wait_js(page, "document.getElementById('stats').textContent.includes('tokens/s')")
        page.evaluate("document.getElementById('stats').textContent = ''")
    assert len(page.query_selector_all(".turn.user")) == 2
    assert len(page.query_selector_all(".turn.assistant")) == 2
    record = wait_for_log(server.log_file, lambda r: r["endpoint"] == "/api/chat"
                          and isinstance(r["prompt"], list) and r["prompt"][-1]["content"] == "What did I just say?")
    assert [m["role"] for m in record["prompt"]] == ["user", "assistant", "user"]


def test_compare_lines_ranks_a_paraphrase_above_an_unrelated_line(page, server):
    page.fill("#prompt", "The cat sat on the mat.\nStock markets fell sharply today.\nA kitten rested on the rug.")
    page.click("#compare")
    wait_js(page, "document.querySelectorAll('.turn.assistant').length === 1 && "
                  "document.querySelector('.turn.assistant').textContent.includes('\\n')")
    ranked = page.text_content(".turn.assistant").split("\n")
    assert ranked[0].endswith("A kitten rested on the rug.") and ranked[1].endswith("Stock markets fell sharply today.")
    record = wait_for_log(server.log_file, lambda r: r["endpoint"] == "/api/embed"
                          and r["prompt"] == ["The cat sat on the mat.", "Stock markets fell sharply today.",
                                              "A kitten rested on the rug."])
    assert record["status"] == "done"


def test_server_errors_are_shown_in_words(page):
    page.fill("#max-tokens", "0")
    page.fill("#prompt", "Hi")
    page.press("#prompt", "Enter")
    page.wait_for_selector("#error:not([hidden])")
    error = page.text_content("#error")
    assert "400" in error and "num_predict" in error


def test_readable_on_a_phone_sized_window(browser, server):
    with open_page(browser, server, viewport={"width": 375, "height": 740}, is_mobile=True) as pg:
        assert pg.evaluate("document.documentElement.scrollWidth") <= 375
        for selector in ("#prompt", "#send", "#stop"):
            box = pg.query_selector(selector).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 375
        ARTIFACTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / "playground-phone.png"), full_page=True)
