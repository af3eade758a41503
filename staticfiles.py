"""Serving the playground's files from one folder, and nothing outside it (stdlib only)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

from httpserver import Request, ResponseWriter

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
}

# The page may talk only to this server and load only its own files.
SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("Content-Security-Policy", "default-src 'self'; connect-src 'self'; img-src 'self' data:; "
                                "style-src 'self'; script-src 'self'; base-uri 'none'; "
                                "form-action 'self'; frame-ancestors 'none'"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache"),
]


def resolve(root: Path, url_path: str) -> Path | None:
    """The file under `root` that `url_path` (still percent-encoded, relative) names, or None.

    Refuses `..` and `.` segments (also when percent-encoded), absolute paths,
    backslashes, NUL, unknown file types, and symlinks that lead outside `root`.
    """
    path = unquote(url_path)
    if "\x00" in path or "\\" in path or path.startswith("/"):
        return None
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return None
    root = root.resolve()
    candidate = root.joinpath(*parts)
    try:
        real = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not real.is_relative_to(root) or not real.is_file() or real.suffix not in CONTENT_TYPES:
        return None
    return real


class StaticFiles:
    def __init__(self, root: Path, prefix: str = "/web/"):
        self.root = root
        self.prefix = prefix

    async def index(self, request: Request, writer: ResponseWriter) -> None:
        await self._send(writer, resolve(self.root, "index.html"))

    async def file(self, request: Request, writer: ResponseWriter) -> None:
        await self._send(writer, resolve(self.root, request.path[len(self.prefix):]))

    async def _send(self, writer: ResponseWriter, path: Path | None) -> None:
        if path is None:
            await writer.send_json(404, {"error": "not found"}, SECURITY_HEADERS)
            return
        try:
            body = path.read_bytes()
        except OSError:
            await writer.send_json(404, {"error": "not found"}, SECURITY_HEADERS)
            return
        await writer.send(200, body, CONTENT_TYPES[path.suffix], SECURITY_HEADERS)
