"""The JSONL request log: one complete line per finished request.

Lines are written by one background thread, each with a single `write` on a file
opened with O_APPEND, so a line is never torn or interleaved and a slow or failing
disk never blocks the event loop or fails a request.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from datetime import datetime, timezone

log = logging.getLogger("minivault.log")


_second_text: tuple[int, str] = (-1, "")  # the last whole second, formatted (one tuple: threads share it)


def utc_timestamp(timespec: str = "milliseconds") -> str:
    """Now in RFC 3339 UTC with a Z (rfc3339's `timespec`)."""
    return rfc3339(time.time_ns(), timespec)


def rfc3339(ns: int, timespec: str = "milliseconds") -> str:
    """The instant `ns` (nanoseconds since the epoch) in RFC 3339 UTC with a Z:
    milliseconds, or microseconds for `auto` (always six digits, where
    datetime.isoformat's `auto` drops a zero fraction). An Ollama stream stamps every
    token: the seconds are formatted once a second, 0.52 instead of 1.57 us a stamp."""
    global _second_text
    second, micro = divmod(ns // 1000, 1_000_000)
    cached, text = _second_text
    if cached != second:
        text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second_text = (second, text)
    if timespec == "milliseconds":
        return f"{text}.{micro // 1000:03d}Z"
    if timespec in ("auto", "microseconds"):
        return f"{text}.{micro:06d}Z"
    raise ValueError(f"timespec {timespec!r}: milliseconds, microseconds or auto")


def encode_line(record: dict) -> bytes:
    # ensure_ascii keeps the line free of raw newlines or odd bytes whatever the text.
    return (json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n").encode()


class RequestLog:
    """`max_bytes` > 0 rotates the file by size, keeping `backups` older files (.1 newest)."""

    def __init__(self, path: str | None, max_bytes: int = 0, backups: int = 3):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._size = 0
        self.errors = 0
        self.written = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._fd: int | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file _fd has open
        self._reported = False
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()

    def write(self, record: dict) -> None:
        """Queue one record; returns at once."""
        if self.path:
            self._queue.put(encode_line(record))

    def close(self, timeout: float = 5.0) -> None:
        """Write out everything queued, then stop."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        while (line := self._queue.get()) is not None:
            try:
                self._append(line)
                self.written += 1
            except OSError as exc:
                self.errors += 1
                self._close_fd()  # reopened for the next line (a full disk must not leak a descriptor a line)
                if not self._reported:  # say it once, not once per request
                    self._reported = True
                    log.error("cannot write the request log %s: %s", self.path, exc)
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass

    def _append(self, line: bytes) -> None:
        if self._fd is not None and not self._still_at_path():
            # Deleted (its folder too) or moved away: lines written to the open file
            # would be lost without an error. Reopen the path, as WatchedFileHandler does.
            self._close_fd()
        if self._fd is None:
            folder = os.path.dirname(self.path)
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._open()
        if self.max_bytes and self._size and self._size + len(line) > self.max_bytes:
            self._rotate()
        written = os.write(self._fd, line)
        self._size += written
        if written != len(line):
            raise OSError(f"short write ({written} of {len(line)} bytes)")

    def _rotate(self) -> None:
        self._close_fd()
        if self.backups > 0:
            for n in range(self.backups - 1, 0, -1):
                if os.path.exists(f"{self.path}.{n}"):
                    os.replace(f"{self.path}.{n}", f"{self.path}.{n + 1}")
            os.replace(self.path, f"{self.path}.1")
        else:
            os.remove(self.path)
        self._open()

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        st = os.fstat(self._fd)
        self._identity = (st.st_dev, st.st_ino)
        self._size = st.st_size

    def _still_at_path(self) -> bool:
        try:
            st = os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError:  # e.g. its folder no longer searchable: the open file still takes lines
            return True
        return (st.st_dev, st.st_ino) == self._identity
