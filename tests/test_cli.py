"""cli_test.py against a real server, a server that answers an error, and no server."""

from __future__ import annotations

import socket
import subprocess
import sys

from serverproc import ROOT


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "cli_test.py"), *args],
                          capture_output=True, text=True, timeout=300)


def test_cli_streams_text_and_reports_speed(server):
    result = run_cli("--url", f"http://127.0.0.1:{server.port}", "--max-tokens", "12",
                     "--temperature", "0", "What is an AI model?")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) > 5
    assert "12 tokens" in result.stderr and "tokens/s" in result.stderr


def test_cli_reports_a_server_error(server):
    result = run_cli("--url", f"http://127.0.0.1:{server.port}", "   ")
    assert result.returncode != 0
    assert "400" in result.stderr and "prompt" in result.stderr


def test_cli_reports_a_server_that_is_down():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once closed
    result = run_cli("--url", f"http://127.0.0.1:{port}", "hello")
    assert result.returncode != 0
    assert "cannot reach MiniVault" in result.stderr
