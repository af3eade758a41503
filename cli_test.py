"""Stream an answer from a MiniVault server to the terminal (stdlib only).

    python cli_test.py "What is an AI model?"
    python cli_test.py --url http://127.0.0.1:3001 --max-tokens 50 "Tell me a joke"

Prints the text as it arrives; tokens and tokens/s go to stderr. Exits non-zero
when the server is unreachable or answers with an error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from urllib.parse import urlsplit


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Stream a prompt's answer from MiniVault.")
    p.add_argument("prompt", help="the prompt to send")
    p.add_argument("--url", default="http://127.0.0.1:3000", help="the server's base URL")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to generate (server default if unset)")
    p.add_argument("--temperature", type=float, default=None, help="0 for greedy")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each piece of the answer")
    return p.parse_args(argv)


def fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        url = urlsplit(args.url)
        port = url.port or 80
    except ValueError:  # a port that is no number, an unclosed '[' of an IPv6 address
        url = None
    if url is None or url.scheme != "http" or not url.hostname:
        return fail(f"--url must look like http://host:port, not {args.url!r}")
    body = {"prompt": args.prompt, "stream": True}
    for key in ("max_tokens", "temperature", "seed", "system"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)

    conn = http.client.HTTPConnection(url.hostname, port, timeout=args.timeout)
    started = time.monotonic()
    first_token_at = None
    try:
        conn.request("POST", url.path.rstrip("/") + "/generate", json.dumps(body).encode(),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raw = resp.read().decode("utf-8", "replace")
            try:
                detail = json.loads(raw).get("error", raw)
            except (ValueError, AttributeError):
                detail = raw
            return fail(f"server answered {resp.status} {resp.reason}: {detail}")
        final = None
        for line in resp:  # http.client undoes the chunked framing; one NDJSON object per line
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:  # not MiniVault (or a proxy's page) at that address
                print(file=sys.stderr)
                return fail(f"the server sent a line that is not JSON: {line[:200]!r}")
            if "error" in obj:
                print(file=sys.stderr)
                return fail(f"generation failed: {obj['error']}")
            if obj.get("response"):
                first_token_at = first_token_at or time.monotonic()
                sys.stdout.write(obj["response"])
                sys.stdout.flush()
            if obj.get("done"):
                final = obj
    except (ConnectionError, OSError, http.client.HTTPException) as exc:
        return fail(f"cannot reach MiniVault at {args.url}: {exc}")
    finally:
        conn.close()
    print()
    if final is None:
        return fail("the stream ended without its final object")
    tokens = final.get("eval_count", 0)
    eval_s = final.get("eval_duration", 0) / 1e9
    rate = tokens / eval_s if eval_s > 0 else 0.0
    ttft = (first_token_at - started) if first_token_at else 0.0
    print(f"[{tokens} tokens, {rate:.1f} tokens/s, first token after {ttft:.2f} s, "
          f"done: {final.get('done_reason')}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
