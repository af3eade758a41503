"""cli_test.py against a real server, a server that answers an error, and no server."""

from __future__ import annotations

import http.server
import socket
import subprocess
import sys
import threading

import pytest

import cli_test

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


@pytest.mark.parametrize("url", ["http://127.0.0.1:abc", "http://[::1", "ftp://127.0.0.1:3000"])
def test_cli_refuses_a_url_it_cannot_use_without_a_traceback(url, capsys):
    assert cli_test.main(["--url", url, "hello"]) == 1
    assert "--url must look like http://host:port" in capsys.readouterr().err


def test_cli_reports_a_reply_that_is_not_ndjson_without_a_traceback(capsys):
    class NotMiniVault(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = b"<html>a proxy's page</html>\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotMiniVault)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        assert cli_test.main(["--url", f"http://127.0.0.1:{server.server_port}", "hello"]) == 1
    finally:
        server.shutdown()
        server.server_close()
    assert "not JSON" in capsys.readouterr().err
