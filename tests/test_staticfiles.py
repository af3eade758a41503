"""Static files come only from web/: traversal, encoded traversal, absolute paths and
symlinks out are refused; types and security headers are right."""

from __future__ import annotations

import os

import pytest

from serverproc import ROOT
from staticfiles import resolve

WEB = ROOT / "web"


@pytest.mark.parametrize("path", ["../minivault.py", "%2e%2e/minivault.py", "%2E%2E%2Fminivault.py",
                                  "/etc/passwd", "%2fetc%2fpasswd", "./index.html", "a/../index.html",
                                  "..%5cminivault.py", "index.html%00.js", "", "missing.js",
                                  "../README.md"])
def test_refused_paths(path):
    assert resolve(WEB, path) is None


def test_files_in_the_folder_resolve():
    assert resolve(WEB, "app.js") == (WEB / "app.js").resolve()


def test_symlink_out_of_the_folder_is_refused(tmp_path):
    root = tmp_path / "web"
    root.mkdir()
    (root / "ok.js").write_text("1")
    secret = tmp_path / "secret.js"
    secret.write_text("secret")
    os.symlink(secret, root / "leak.js")
    assert resolve(root, "ok.js") is not None
    assert resolve(root, "leak.js") is None


@pytest.mark.parametrize("target", ["/web/../minivault.py", "/web/%2e%2e/minivault.py", "/web//etc/passwd",
                                    "/web/%2fetc%2fpasswd", "/web/..%2fminivault.py", "/../minivault.py"])
def test_traversal_over_http_is_404(server, target):
    resp = server.request("GET", target)
    assert resp.status == 404 and b"import" not in resp.body


@pytest.mark.parametrize("path,ctype", [("/", "text/html; charset=utf-8"),
                                        ("/web/app.js", "text/javascript; charset=utf-8"),
                                        ("/web/style.css", "text/css; charset=utf-8")])
def test_content_types_and_security_headers(server, path, ctype):
    resp = server.request("GET", path)
    assert resp.status == 200 and resp.headers["content-type"] == ctype
    assert resp.headers["x-content-type-options"] == "nosniff"
    csp = resp.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
