"""Per-client token-bucket rate limiting (pure: the caller passes the time)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
          "h": 3600.0, "hour": 3600.0}


def parse_rate(text: str) -> tuple[int, float] | None:
    """'30/min' -> (30, 60.0); 'off' -> None. Raises ValueError on anything else."""
    text = text.strip().lower()
    if text in ("off", "none", "0"):
        return None
    m = re.fullmatch(r"(\d+)\s*/\s*([a-z]+)", text)
    if not m or m.group(2) not in _UNITS or int(m.group(1)) < 1:
        raise ValueError(f"rate must look like 30/min, 5/s or off, not {text!r}")
    return int(m.group(1)), _UNITS[m.group(2)]


@dataclass
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset_s: int  # seconds until the bucket is full again
    retry_after_s: int  # seconds until one more request is allowed (0 when allowed)

    def headers(self) -> list[tuple[str, str]]:
        hdrs = [("RateLimit-Limit", str(self.limit)), ("RateLimit-Remaining", str(self.remaining)),
                ("RateLimit-Reset", str(self.reset_s))]
        if not self.allowed:
            hdrs.append(("Retry-After", str(self.retry_after_s)))
        return hdrs


class RateLimiter:
    """A bucket of `limit` requests per client, refilled evenly over `period` seconds."""

    MAX_CLIENTS = 100_000  # beyond this the least recently seen client is forgotten

    def __init__(self, limit: int, period: float):
        self.limit = limit
        self.period = period
        self._rate = limit / period
        # key -> (tokens, last time), oldest use first: a client seen again moves to the end.
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, key: str, now: float) -> Decision:
        tokens, last = self._buckets.pop(key, (float(self.limit), now))
        tokens = min(float(self.limit), tokens + (now - last) * self._rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        if len(self._buckets) >= self.MAX_CLIENTS:
            # The least recently seen bucket: usually refilled already, so forgetting
            # it changes nothing; memory stays bounded either way, at O(1) a request.
            del self._buckets[next(iter(self._buckets))]
        self._buckets[key] = (tokens, now)
        reset = math.ceil((self.limit - tokens) / self._rate)
        retry = 0 if allowed else max(1, math.ceil((1.0 - tokens) / self._rate))
        return Decision(allowed, self.limit, int(tokens), reset, retry)
