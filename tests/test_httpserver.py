"""Unit tests for the pure parts of httpserver: request parsing, chunked framing,
response encoding and routing. No sockets, no sleeps: bytes in, Request or HTTPError out.

Rules come from RFC 9112 (HTTP/1.1 message syntax) and RFC 9110 (semantics), and from
the status table in DESIGN.md. h11 serves as an oracle in the differential test at the end.
"""

import sys
import pathlib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import json  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import h11  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from httpserver import (  # noqa: E402
    LAST_CHUNK,
    ChunkedDecoder,
    HTTPError,
    Limits,
    Request,
    RequestParser,
    Router,
    encode_chunk,
    encode_head,
    json_bytes,
    parse_head,
)


# ---------------------------------------------------------------------------
# Helpers


def http(*lines: str, body: bytes = b"", eol: str = "\r\n") -> bytes:
    """A raw request: each line ended by `eol`, the blank line, then the body."""
    head = "".join(line + eol for line in lines) + eol
    return head.encode("latin-1") + body


def chunked(*pieces: bytes) -> bytes:
    """A chunked body made of `pieces`, then the last chunk."""
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def parse_one(raw: bytes, limits: Limits | None = None) -> Request:
    """Feed a whole request; return it with its body. Fails if anything is missing."""
    parser = RequestParser(limits or Limits())
    parser.feed(raw)
    request = parser.head()
    assert request is not None, "the head is incomplete"
    body = parser.body()
    assert body is not None, "the body is incomplete"
    request.body = body
    return request


def refusal(raw: bytes, limits: Limits | None = None) -> int:
    """The status of the HTTPError the parser raises for `raw`; fails if it accepts."""
    with pytest.raises(HTTPError) as info:
        parse_one(raw, limits)
    return info.value.status


def head_refusal(raw: bytes, limits: Limits | None = None) -> int:
    """Like `refusal`, for bytes that are only (part of) a head: head() must refuse."""
    parser = RequestParser(limits or Limits())
    parser.feed(raw)
    with pytest.raises(HTTPError) as info:
        parser.head()
    return info.value.status


def get(*fields: str, target: str = "/", version: str = "HTTP/1.1") -> bytes:
    return http(f"GET {target} {version}", *fields)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """`data` cut at the given offsets (clamped, sorted, deduplicated)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])] or [b""]


def feed_in_pieces(pieces: list[bytes], limits: Limits | None = None) -> list[Request]:
    """Feed pieces one by one, asking for head and body after each; return finished requests."""
    parser = RequestParser(limits or Limits())
    done: list[Request] = []
    current: Request | None = None
    for piece in pieces:
        parser.feed(piece)
        while True:
            if current is None:
                current = parser.head()
                if current is None:
                    break
            body = parser.body()
            if body is None:
                break
            current.body = body
            done.append(current)
            current = None
    return done


# ---------------------------------------------------------------------------
# Valid requests


def test_simple_get():
    req = parse_one(get("Host: example.org", "Accept: */*", target="/health?x=1"))
    assert (req.method, req.target, req.version) == ("GET", "/health?x=1", (1, 1))
    assert req.headers == [("host", "example.org"), ("accept", "*/*")]
    assert req.body == b""
    assert req.content_length == 0 and not req.chunked


def test_post_body_is_exactly_content_length_bytes():
    parser = RequestParser(Limits())
    parser.feed(http("POST /generate HTTP/1.1", "Host: a", "Content-Length: 5", body=b"helloEXTRA"))
    req = parser.head()
    assert (req.method, req.target, req.content_length) == ("POST", "/generate", 5)
    assert parser.body() == b"hello"
    assert bytes(parser.buffer) == b"EXTRA"  # the next request's bytes stay put


def test_body_waits_until_content_length_bytes_arrived():
    parser = RequestParser(Limits())
    parser.feed(http("POST / HTTP/1.1", "Host: a", "Content-Length: 5", body=b"hel"))
    assert parser.head() is not None
    assert parser.body() is None
    parser.feed(b"lo")
    assert parser.body() == b"hello"


def test_pipelined_requests_come_out_in_order_with_their_bodies():
    raw = (
        http("GET /a HTTP/1.1", "Host: h")
        + http("POST /b HTTP/1.1", "Host: h", "Content-Length: 3", body=b"one")
        + http("POST /c HTTP/1.1", "Host: h", "Transfer-Encoding: chunked", body=chunked(b"tw", b"o"))
        + http("DELETE /d HTTP/1.1", "Host: h")
    )
    requests = feed_in_pieces([raw])
    assert [(r.method, r.target, r.body) for r in requests] == [
        ("GET", "/a", b""), ("POST", "/b", b"one"), ("POST", "/c", b"two"), ("DELETE", "/d", b""),
    ]


# RFC 9112 2.2: a server SHOULD ignore at least one empty line before the request-line.
@pytest.mark.parametrize("prefix", [b"\r\n", b"\n", b"\r\n\r\n", b"\n\r\n"])
def test_empty_lines_before_the_request_line_are_ignored(prefix):
    req = parse_one(prefix + get("Host: a"))
    assert (req.method, req.target) == ("GET", "/")


# RFC 9112 2.2: a recipient MAY recognise a single LF as a line terminator.
def test_lf_only_line_endings_are_accepted():
    raw = http("POST /x HTTP/1.1", "Host: a", "Content-Length: 2", body=b"hi", eol="\n")
    req = parse_one(raw)
    assert (req.method, req.target, req.body) == ("POST", "/x", b"hi")
    assert req.headers == [("host", "a"), ("content-length", "2")]


def test_field_names_are_lowercased_and_values_trimmed():
    req = parse_one(get("HOST: a", "X-Thing: \t spaced  value \t"))
    assert req.headers == [("host", "a"), ("x-thing", "spaced  value")]


# RFC 9110 5.5: a value may hold HTAB and obs-text (bytes 0x80-0xFF).
def test_tab_and_obs_text_in_values_are_accepted():
    req = parse_one(get("Host: a", "X: a\tb\x80\xff"))
    assert req.header("x") == "a\tb\x80\xff"


# ---------------------------------------------------------------------------
# Chunked bodies (RFC 9112 7.1)


def test_chunked_body_with_extensions_and_trailers():
    body = b"5;foo=bar\r\nhello\r\n6 ; a=1;b\r\n world\r\n0;last\r\nX-Checksum: 1\r\nX-Other: 2\r\n\r\n"
    req = parse_one(http("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", body=body))
    assert req.chunked and req.content_length is None
    assert req.body == b"hello world"


def test_chunk_sizes_are_hex_in_either_case():
    payload = bytes(range(26))
    body = b"A\r\n" + payload[:10] + b"\r\nf\r\n" + payload[10:25] + b"\r\n01\r\n" + payload[25:] + b"\r\n0\r\n\r\n"
    req = parse_one(http("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", body=body))
    assert req.body == payload


def test_chunked_decoder_leaves_the_next_request_in_the_buffer():
    decoder = ChunkedDecoder(max_body=100)
    buf = bytearray(b"3\r\nabc\r\n0\r\n\r\nGET / HTTP/1.1\r\n")
    decoder.feed(buf)
    assert decoder.done and bytes(decoder.body) == b"abc"
    assert bytes(buf) == b"GET / HTTP/1.1\r\n"


@pytest.mark.parametrize("body", [
    pytest.param(b"zz\r\nhello\r\n0\r\n\r\n", id="non-hex size"),
    pytest.param(b"\r\nhello\r\n0\r\n\r\n", id="empty size"),
    pytest.param(b"1" * 17 + b"\r\nhello\r\n0\r\n\r\n", id="size over 16 hex digits"),
    pytest.param(b"-5\r\nhello\r\n0\r\n\r\n", id="negative size"),
    pytest.param(b"0x5\r\nhello\r\n0\r\n\r\n", id="0x prefix"),
    pytest.param(b" 5\r\nhello\r\n0\r\n\r\n", id="space before size"),
    pytest.param(b"5\r\nhelloX\r\n0\r\n\r\n", id="data longer than size"),
    pytest.param(b"5\r\nhello0\r\n\r\n", id="no CRLF after data"),
    pytest.param(b"5\r\r\nhello\r\n0\r\n\r\n", id="bare CR in a size line"),
    pytest.param(b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n", id="trailer without colon"),
    pytest.param(b"5\r\nhello\r\n0\r\nX: 1\r\n folded\r\n\r\n", id="obs-fold in trailer"),
])
def test_bad_chunk_framing_is_400(body):
    assert refusal(http("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", body=body)) == 400


def test_chunk_line_too_long_without_newline_is_400():
    parser = RequestParser(Limits())
    parser.feed(http("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", body=b"5;" + b"x" * 5000))
    parser.head()
    with pytest.raises(HTTPError) as info:
        parser.body()
    assert info.value.status == 400


@pytest.mark.parametrize("body", [
    pytest.param(chunked(b"x" * 11), id="one chunk over"),
    pytest.param(chunked(b"x" * 6, b"y" * 5), id="chunks add up to over"),
    pytest.param(b"ffffffffffffffff\r\n", id="declared size alone"),
])
def test_chunked_body_over_max_body_is_413(body):
    raw = http("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", body=body)
    assert refusal(raw, Limits(max_body=10)) == 413


def test_chunked_body_at_max_body_is_accepted():
    raw = http("POST / HTTP/1.1", "Host: a", "Transfer-Encoding: chunked", body=chunked(b"x" * 6, b"y" * 4))
    assert parse_one(raw, Limits(max_body=10)).body == b"xxxxxxyyyy"


# ---------------------------------------------------------------------------
# Message framing: Content-Length and Transfer-Encoding (RFC 9112 6)


# RFC 9112 6.3: both present "ought to be handled as an error" (request smuggling).
@pytest.mark.parametrize("fields", [
    ("Content-Length: 5", "Transfer-Encoding: chunked"),
    ("Transfer-Encoding: chunked", "Content-Length: 5"),
    ("Transfer-Encoding: chunked", "Content-Length: 0"),
])
def test_content_length_and_transfer_encoding_together_are_400(fields):
    assert refusal(http("POST / HTTP/1.1", "Host: a", *fields, body=chunked(b"hello"))) == 400


@pytest.mark.parametrize("fields", [
    ("Content-Length: 5", "Content-Length: 6"),
    ("Content-Length: 1,2",),
    ("Content-Length: 5, 6",),
    ("Content-Length: 5", "Content-Length: 5, 6"),
])
def test_conflicting_content_lengths_are_400(fields):
    assert refusal(http("POST / HTTP/1.1", "Host: a", *fields, body=b"hello!")) == 400


# RFC 9110 8.6: identical repeated values may be treated as one.
@pytest.mark.parametrize("fields", [
    ("Content-Length: 5", "Content-Length: 5"),
    ("Content-Length: 5, 5",),
])
def test_identical_duplicate_content_lengths_are_accepted(fields):
    req = parse_one(http("POST / HTTP/1.1", "Host: a", *fields, body=b"hello"))
    assert (req.content_length, req.body) == (5, b"hello")


@pytest.mark.parametrize("value", ["abc", "-5", "+5", "", "5.0", "0x5", "5 5", "5a", "\xb2", ","])
def test_invalid_content_length_is_400(value):
    assert refusal(http("POST / HTTP/1.1", "Host: a", f"Content-Length: {value}", body=b"hello")) == 400


def test_content_length_with_thousands_of_digits_is_refused_cleanly():
    # int() of more than 4300 decimal digits raises ValueError (Python's DoS guard);
    # the parser must answer with a status, not crash.
    head = http("POST / HTTP/1.1", "Host: a", "Content-Length: " + "9" * 5000)
    assert head_refusal(head) in (400, 413)


@pytest.mark.parametrize("coding", ["gzip", "chunked, gzip", "gzip, chunked", "identity", "chunked, chunked"])
def test_transfer_coding_other_than_chunked_is_501(coding):
    head = http("POST / HTTP/1.1", "Host: a", f"Transfer-Encoding: {coding}")
    assert head_refusal(head) == 501


@pytest.mark.parametrize("value", ["chunked", "Chunked", "CHUNKED", "chunked \t"])
def test_chunked_is_recognised_case_insensitively(value):
    raw = http("POST / HTTP/1.1", "Host: a", f"Transfer-Encoding: {value}", body=chunked(b"ok"))
    assert parse_one(raw).body == b"ok"


# RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
def test_transfer_encoding_in_http10_is_400():
    assert refusal(http("POST / HTTP/1.0", "Transfer-Encoding: chunked", body=chunked(b"hello"))) == 400


def test_content_length_over_max_body_is_413_from_the_head_alone():
    head = http("POST / HTTP/1.1", "Host: a", "Content-Length: 11")
    assert head_refusal(head, Limits(max_body=10)) == 413


def test_content_length_at_max_body_is_accepted():
    req = parse_one(http("POST / HTTP/1.1", "Host: a", "Content-Length: 10", body=b"0123456789"), Limits(max_body=10))
    assert req.body == b"0123456789"


# ---------------------------------------------------------------------------
# Header field syntax (RFC 9112 5, RFC 9110 5.5)


# RFC 9112 5.2: a server MUST reject obs-fold with 400 or unfold it; we reject.
@pytest.mark.parametrize("fold", [" ", "\t", "  \t"])
def test_obs_fold_is_400(fold):
    assert refusal(get("Host: a", "X-Long: first", f"{fold}continued")) == 400


def test_obs_fold_right_after_the_request_line_is_400():
    assert refusal(get(" X: b", "Host: a")) == 400


# RFC 9112 5.1: no whitespace is allowed between the field name and colon; 400.
@pytest.mark.parametrize("fields", [("Host : a",), ("Host\t: a",), ("Host: a", "Content-Length : 0")])
def test_whitespace_between_field_name_and_colon_is_400(fields):
    assert refusal(get(*fields)) == 400


@pytest.mark.parametrize("name", ["Bad Name", "Bad\x00", "Bad(", "Bad/", "Bad\x7f", "\xdcber", "Bad\"", "", "@"])
def test_invalid_characters_in_field_names_are_400(name):
    assert refusal(get("Host: a", f"{name}: v")) == 400


def test_field_line_without_colon_is_400():
    assert refusal(get("Host: a", "NoColonHere")) == 400


@pytest.mark.parametrize("value", [
    pytest.param("a\x00b", id="NUL"),
    pytest.param("a\rb", id="bare CR"),
    pytest.param("a\x01b", id="SOH"),
    pytest.param("a\x0bb", id="VT"),
    pytest.param("a\x0cb", id="FF"),
    pytest.param("a\x1bb", id="ESC"),
    pytest.param("a\x7fb", id="DEL"),
    pytest.param("\x00", id="NUL alone"),
])
def test_control_characters_in_field_values_are_400(value):
    assert refusal(get("Host: a", f"X: {value}")) == 400


def test_bare_cr_as_line_ending_is_400():
    assert refusal(b"GET / HTTP/1.1\rHost: a\r\n\r\n") == 400


# RFC 9112 3.2: HTTP/1.1 needs exactly one Host; more than one is 400 in any version.
def test_missing_host_in_http11_is_400():
    assert refusal(get("Accept: */*")) == 400


def test_http10_without_host_is_accepted():
    req = parse_one(get(version="HTTP/1.0"))
    assert (req.method, req.version, req.headers) == ("GET", (1, 0), [])


def test_empty_host_is_accepted():
    assert parse_one(get("Host:")).header("host") == ""


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_two_host_headers_are_400(version):
    assert refusal(get("Host: a", "Host: b", version=version)) == 400


@pytest.mark.parametrize("line", [
    pytest.param("GET /", id="no version"),
    pytest.param("GET", id="method only"),
    pytest.param("/ HTTP/1.1", id="no method"),
    pytest.param("GET  / HTTP/1.1", id="double space"),
    pytest.param("GET / HTTP/1.1 ", id="trailing space"),
    pytest.param(" GET / HTTP/1.1", id="leading space"),
    pytest.param("GET\t/\tHTTP/1.1", id="tabs"),
    pytest.param("GET / http/1.1", id="lowercase version"),
    pytest.param("GET / HTTP/2.0", id="HTTP/2.0"),
    pytest.param("GET / HTTP/1.10", id="HTTP/1.10"),
    pytest.param("GET / HTTP/0.9", id="HTTP/0.9"),
    pytest.param("GET / HTTP/1", id="no minor version"),
    pytest.param("GET / HTTPS/1.1", id="wrong protocol name"),
    pytest.param("G(T / HTTP/1.1", id="method not a token"),
    pytest.param("GET /a\x00b HTTP/1.1", id="NUL in target"),
    pytest.param("GET /a\x7fb HTTP/1.1", id="DEL in target"),
    pytest.param("GET / / HTTP/1.1", id="four parts"),
])
def test_malformed_request_line_is_400(line):
    assert refusal(http(line, "Host: a")) == 400


def test_parse_head_takes_a_head_without_its_blank_line():
    req = parse_head(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3", Limits())
    assert (req.method, req.target, req.content_length) == ("PUT", "/x", 3)


# ---------------------------------------------------------------------------
# Limits: 414 for the request line, 431 for the header section, 413 for the body


def long_line(length: int) -> bytes:
    """A GET request line of exactly `length` bytes."""
    fixed = len("GET / HTTP/1.1")
    return f"GET /{'a' * (length - fixed)} HTTP/1.1".encode()


def test_request_line_over_the_limit_is_414():
    raw = long_line(41) + b"\r\nHost: a\r\n\r\n"
    assert refusal(raw, Limits(max_request_line=40)) == 414


def test_request_line_over_the_limit_is_414_while_still_arriving():
    assert head_refusal(long_line(41), Limits(max_request_line=40)) == 414


def refused_splits(raw: bytes, limits: Limits) -> list[tuple[bytes, int]]:
    """For each way of cutting `raw` in two that the parser refuses: (end of first piece, status)."""
    refused = []
    for cut in range(len(raw) + 1):
        try:
            assert len(feed_in_pieces(split_at(raw, [cut]), limits)) == 1
        except HTTPError as err:
            refused.append((raw[max(cut - 3, 0):cut], err.status))
    return refused


def test_request_line_at_the_limit_is_accepted_however_it_is_split():
    limits = Limits(max_request_line=40)
    raw = long_line(40) + b"\r\nHost: a\r\n\r\n"
    assert parse_one(raw, limits).target == "/" + "a" * 26
    assert refused_splits(raw, limits) == []


def head_of_size(size: int) -> bytes:
    """A complete head whose fields section (without the final CRLF CRLF) is `size` bytes."""
    start = b"GET / HTTP/1.1\r\nHost: a\r\nX: "
    return start + b"v" * (size - len(start)) + b"\r\n\r\n"


def test_header_section_over_the_limit_is_431():
    assert refusal(head_of_size(101), Limits(max_header_bytes=100)) == 431


def test_header_section_over_the_limit_is_431_while_still_arriving():
    partial = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * 200
    assert head_refusal(partial, Limits(max_header_bytes=100)) == 431


def test_header_section_at_the_limit_is_accepted_however_it_is_split():
    limits = Limits(max_header_bytes=100)
    raw = head_of_size(100)
    assert parse_one(raw, limits).header("host") == "a"
    assert refused_splits(raw, limits) == []


def test_more_header_fields_than_the_limit_is_431():
    assert refusal(get("Host: a", "A: 1", "B: 2", "C: 3"), Limits(max_header_count=3)) == 431


def test_header_fields_at_the_count_limit_are_accepted():
    assert len(parse_one(get("Host: a", "A: 1", "B: 2"), Limits(max_header_count=3)).headers) == 3


# ---------------------------------------------------------------------------
# Request properties


# RFC 9112 9.3: HTTP/1.1 is persistent unless "close"; HTTP/1.0 only with "keep-alive".
@pytest.mark.parametrize("version, connection, expected", [
    ("HTTP/1.1", None, True),
    ("HTTP/1.1", "close", False),
    ("HTTP/1.1", "Close", False),
    ("HTTP/1.1", "CLOSE", False),
    ("HTTP/1.1", "keep-alive, close", False),
    ("HTTP/1.1", "Upgrade ,  close ", False),
    ("HTTP/1.1", "keep-alive", True),
    ("HTTP/1.1", "closed", True),
    ("HTTP/1.0", None, False),
    ("HTTP/1.0", "keep-alive", True),
    ("HTTP/1.0", "Keep-Alive", True),
    ("HTTP/1.0", "keep-alive, close", False),
])
def test_keep_alive(version, connection, expected):
    fields = ["Host: a"] + ([f"Connection: {connection}"] if connection is not None else [])
    assert parse_one(get(*fields, version=version)).keep_alive is expected


def test_close_in_a_second_connection_field_counts():
    assert parse_one(get("Host: a", "Connection: upgrade", "Connection: close")).keep_alive is False


# RFC 9110 10.1.1: 100-continue is case-insensitive and ignored in HTTP/1.0.
@pytest.mark.parametrize("version, expect, expected", [
    ("HTTP/1.1", "100-continue", True),
    ("HTTP/1.1", "100-Continue", True),
    ("HTTP/1.1", None, False),
    ("HTTP/1.1", "something-else", False),
    ("HTTP/1.0", "100-continue", False),
])
def test_expects_continue(version, expect, expected):
    fields = ["Host: a", "Content-Length: 0"] + ([f"Expect: {expect}"] if expect is not None else [])
    assert parse_one(http(f"POST / {version}", *fields)).expects_continue is expected


@pytest.mark.parametrize("target, path, query", [
    ("/generate", "/generate", {}),
    ("/api/tags?x=1&x=2&y=z", "/api/tags", {"x": ["1", "2"], "y": ["z"]}),
    ("/a%20b?q=%C3%A9", "/a%20b", {"q": ["é"]}),
    ("http://example.org/p?k=v", "/p", {"k": ["v"]}),
    ("http://example.org", "/", {}),
    ("//evil/generate", "//evil/generate", {}),  # a path, not a host: origin-form starts with "/"
    ("//evil/generate?a=b", "//evil/generate", {"a": ["b"]}),
    ("/p?k=v#frag", "/p", {"k": ["v"]}),
])
def test_path_and_query(target, path, query):
    req = parse_one(get("Host: a", target=target))
    assert (req.path, req.query) == (path, query)


@pytest.mark.parametrize("target", ["//[", "http://[::1/", "http://[zz]/"])
def test_path_of_any_accepted_target_is_computable(target):
    # The connection layer reads request.path outside its HTTPError handling: anything
    # else escaping here closes the connection with no reply instead of a 400.
    try:
        req = parse_one(get("Host: a", target=target))
        _ = req.path, req.query
    except HTTPError as err:
        assert err.status == 400


def test_header_joins_repeated_fields_and_returns_none_when_absent():
    req = parse_one(get("Host: a", "Accept: text/html", "Accept: application/json"))
    assert req.header("accept") == "text/html, application/json"
    assert req.header("x-missing") is None


# ---------------------------------------------------------------------------
# Encoding responses


def test_encode_chunk():
    assert encode_chunk(b"abc") == b"3\r\nabc\r\n"
    assert encode_chunk(b"x" * 255) == b"ff\r\n" + b"x" * 255 + b"\r\n"


def test_encode_chunk_of_nothing_is_nothing():
    # An empty chunk on the wire ("0\r\n\r\n") would end the body.
    assert encode_chunk(b"") == b""


def test_last_chunk():
    assert LAST_CHUNK == b"0\r\n\r\n"


@pytest.mark.parametrize("status, phrase", [
    (200, "OK"), (400, "Bad Request"), (404, "Not Found"),
    (431, "Request Header Fields Too Large"), (503, "Service Unavailable"),
])
def test_encode_head(status, phrase):
    head = encode_head(status, [("Content-Type", "application/json"), ("Content-Length", "2")])
    assert head == (f"HTTP/1.1 {status} {phrase}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n").encode()


def test_encode_head_without_headers():
    assert encode_head(204, []) == b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.mark.parametrize("text", ["\ud800", "model '\udfff' not found", "k\ud83d"])
def test_json_bytes_never_raises_on_a_lone_surrogate_and_stays_valid_json(text):
    # Error messages echo client text, and a JSON escape can make a lone surrogate.
    data = json_bytes({"error": text, text: 1})
    data.decode("utf-8")  # strict: valid UTF-8 on the wire
    assert json.loads(data) == {"error": text, text: 1}


def decode_chunked(data: bytes) -> bytes:
    decoder = ChunkedDecoder(max_body=len(data))
    buf = bytearray(data)
    decoder.feed(buf)
    assert decoder.done and buf == b""
    return bytes(decoder.body)


def test_chunks_round_trip_through_the_decoder():
    pieces = [b"a", b"", b"hello world", bytes(range(256)), b"x" * 5000, b"\r\n0\r\n\r\n"]
    wire = b"".join(encode_chunk(p) for p in pieces) + LAST_CHUNK
    assert decode_chunked(wire) == b"".join(pieces)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=10))
def test_any_chunks_round_trip_through_the_decoder(pieces):
    wire = b"".join(encode_chunk(p) for p in pieces) + LAST_CHUNK
    assert decode_chunked(wire) == b"".join(pieces)


def test_streamed_response_is_read_back_by_h11():
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="POST", target="/generate", headers=[("Host", "a")]))
    pieces = [b'{"response": "An"}\n', b'{"response": " AI"}\n']
    wire = (encode_head(200, [("Content-Type", "application/x-ndjson"), ("Transfer-Encoding", "chunked")])
            + b"".join(encode_chunk(p) for p in pieces) + LAST_CHUNK)
    client.receive_data(wire)
    events = []
    while not events or not isinstance(events[-1], h11.EndOfMessage):
        events.append(client.next_event())
    response = events[0]
    assert (response.status_code, response.reason) == (200, b"OK")
    assert b"".join(e.data for e in events if isinstance(e, h11.Data)) == b"".join(pieces)


# ---------------------------------------------------------------------------
# Routing


async def generate_handler(request, writer):
    pass


async def tags_handler(request, writer):
    pass


async def health_handler(request, writer):
    pass


def make_router() -> Router:
    router = Router()
    router.add("POST", "/generate", generate_handler)
    router.add("GET", "/api/tags", tags_handler)
    router.add("GET", "/health", health_handler)
    router.add("POST", "/health", generate_handler)
    return router


def test_router_resolves_method_and_path():
    router = make_router()
    assert router.resolve("POST", "/generate") is generate_handler
    assert router.resolve("GET", "/api/tags") is tags_handler


def test_router_unknown_path_is_404():
    with pytest.raises(HTTPError) as info:
        make_router().resolve("GET", "/nope")
    assert info.value.status == 404


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/generate", "POST"),
    ("DELETE", "/api/tags", "GET, HEAD"),
    ("PUT", "/health", "GET, HEAD, POST"),
])
def test_router_wrong_method_is_405_with_allow(method, path, allow):
    with pytest.raises(HTTPError) as info:
        make_router().resolve(method, path)
    assert info.value.status == 405
    assert info.value.headers == [("Allow", allow)]


# RFC 9110 9.3.2: HEAD is GET without the body.
def test_router_head_uses_the_get_handler():
    assert make_router().resolve("HEAD", "/api/tags") is tags_handler


# ---------------------------------------------------------------------------
# Property tests


TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
VALUE_CHARS = "".join(chr(c) for c in [*range(0x21, 0x7F), *range(0x80, 0x100)]) + " \t"
PATH_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~%/?=&:@!$'()*+,;"
FRAMING_FIELDS = {"host", "content-length", "transfer-encoding"}


@dataclass
class Generated:
    raw: bytes
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


@st.composite
def valid_requests(draw) -> Generated:
    """A well-formed HTTP/1.1 request, framed by Content-Length, chunked, or nothing."""
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]))
    target = "/" + draw(st.text(PATH_CHARS, max_size=20))
    names = st.text(TOKEN_CHARS, min_size=1, max_size=10).filter(lambda n: n.lower() not in FRAMING_FIELDS)
    values = st.text(VALUE_CHARS, max_size=20).map(lambda v: v.strip(" \t"))
    fields = draw(st.lists(st.tuples(names, values), max_size=5))
    fields.insert(draw(st.integers(0, len(fields))), ("Host", draw(st.sampled_from(["a", "localhost:8000"]))))
    body = draw(st.binary(max_size=200))
    framing = draw(st.sampled_from(["content-length", "chunked"] if body else ["content-length", "chunked", "none"]))
    eol = draw(st.sampled_from(["\r\n", "\n"]))
    if framing == "content-length":
        fields.append(("Content-Length", str(len(body))))
        wire_body = body
    elif framing == "chunked":
        fields.append(("Transfer-Encoding", "chunked"))
        wire_body = draw(chunked_encodings(body, eol.encode()))
    else:
        wire_body = b""
    prefix = draw(st.sampled_from(["", "\r\n", "\n"]))
    raw = prefix.encode() + http(f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in fields),
                                 body=wire_body, eol=eol)
    return Generated(raw, method, target, [(k.lower(), v) for k, v in fields], body)


@st.composite
def chunked_encodings(draw, body: bytes, eol: bytes) -> bytes:
    """`body` as chunks of random sizes, with optional extensions, uppercase hex and trailers."""
    cuts = draw(st.lists(st.integers(0, len(body)), max_size=4))
    out = b""
    for piece in split_at(body, cuts):
        if not piece:
            continue
        size = b"%x" % len(piece)
        if draw(st.booleans()):
            size = size.upper()
        ext = draw(st.sampled_from([b"", b";foo=bar", b" ;a", b';q="x y"']))
        out += size + ext + eol + piece + eol
    trailers = draw(st.sampled_from([b"", b"X-Sum: 1" + eol, b"A: b" + eol + b"C: d" + eol]))
    return out + b"0" + eol + trailers + eol


INTERESTING_BYTES = b"\r\n \t:;,0123456789aAfFxX-+\x00\x01\x7f\x80\xff"


@st.composite
def mangled_requests(draw) -> bytes:
    """A valid request (or two, pipelined) with a few bytes inserted, deleted or replaced."""
    raw = bytearray(draw(valid_requests()).raw)
    if draw(st.booleans()):
        raw += draw(valid_requests()).raw
    for _ in range(draw(st.integers(1, 6))):
        pos = draw(st.integers(0, len(raw)))
        byte = draw(st.sampled_from(INTERESTING_BYTES))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        if edit == "insert":
            raw.insert(pos, byte)
        elif pos < len(raw):
            if edit == "delete":
                del raw[pos]
            else:
                raw[pos] = byte
    return bytes(raw)


SMALL_LIMITS = Limits(max_request_line=40, max_header_bytes=120, max_header_count=4, max_body=64)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(st.binary(max_size=400), mangled_requests()),
    cuts=st.lists(st.integers(0, 600), max_size=6),
    limits=st.sampled_from([Limits(), SMALL_LIMITS]),
)
def test_any_bytes_parse_or_raise_http_error(data, cuts, limits):
    """Whatever arrives, head()/body() return None, a Request or bytes, or raise HTTPError."""
    parser = RequestParser(limits)
    current = None
    try:
        for piece in split_at(data, cuts):
            parser.feed(piece)
            while True:
                if current is None:
                    current = parser.head()
                    if current is None:
                        break
                    assert isinstance(current, Request)
                    _ = current.keep_alive, current.expects_continue  # must not raise either
                body = parser.body()
                if body is None:
                    break
                assert isinstance(body, bytes)
                current = None
    except HTTPError as err:
        assert 400 <= err.status <= 599


def parsed_summary(requests: list[Request]):
    return [(r.method, r.target, r.headers, r.body) for r in requests]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=valid_requests(), cuts=st.lists(st.integers(0, 1000), max_size=8),
       bytewise=st.booleans())
def test_valid_request_parses_the_same_however_it_is_split(request, cuts, bytewise):
    whole = feed_in_pieces([request.raw])
    assert parsed_summary(whole) == [(request.method, request.target, request.headers, request.body)]
    pieces = [request.raw[i:i + 1] for i in range(len(request.raw))] if bytewise else split_at(request.raw, cuts)
    assert parsed_summary(feed_in_pieces(pieces)) == parsed_summary(whole)


# ---------------------------------------------------------------------------
# Differential test against h11 (python-hyper/h11) as an oracle


def h11_verdict(raw: bytes):
    """("accept", method, target, body), ("refuse", status) or ("incomplete",) from h11."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    request, body = None, b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return ("incomplete",)
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return ("accept", request.method.decode(), request.target.decode("latin-1"), body)
    except h11.RemoteProtocolError as err:
        return ("refuse", err.error_status_hint)


def our_verdict(raw: bytes):
    """The same shape of verdict from our parser; any non-HTTPError exception propagates."""
    parser = RequestParser(Limits())
    parser.feed(raw)
    try:
        request = parser.head()
        body = parser.body() if request is not None else None
    except HTTPError as err:
        return ("refuse", err.status)
    if body is None:
        return ("incomplete",)
    return ("accept", request.method, request.target, body)


def kind(verdict) -> str:
    return verdict[0] if verdict[0] != "refuse" else f"refuse {verdict[1]}"


POST = "POST / HTTP/1.1"
CHUNKED_HELLO = chunked(b"hello")

CORPUS = {
    # valid
    "get": get("Host: a"),
    "post content-length": http(POST, "Host: a", "Content-Length: 5", body=b"hello"),
    "post chunked": http(POST, "Host: a", "Transfer-Encoding: chunked", body=CHUNKED_HELLO),
    "chunk extension and trailer": http(POST, "Host: a", "Transfer-Encoding: chunked",
                                        body=b"5;foo=bar\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"),
    "uppercase hex chunk size": http(POST, "Host: a", "Transfer-Encoding: chunked",
                                     body=b"A\r\n0123456789\r\n0\r\n\r\n"),
    "lf-only head": http(POST, "Host: a", "Content-Length: 2", body=b"hi", eol="\n"),
    "identical duplicate content-length": http(POST, "Host: a", "Content-Length: 5", "Content-Length: 5",
                                               body=b"hello"),
    "content-length list of one value": http(POST, "Host: a", "Content-Length: 5, 5", body=b"hello"),
    "te trailing space": http(POST, "Host: a", "Transfer-Encoding: chunked ", body=CHUNKED_HELLO),
    "te tab before value": http(POST, "Host: a", "Transfer-Encoding:\tchunked", body=CHUNKED_HELLO),
    "te uppercase": http(POST, "Host: a", "Transfer-Encoding: CHUNKED", body=CHUNKED_HELLO),
    "http/1.0 without host": get(version="HTTP/1.0"),
    "asterisk target": http("OPTIONS * HTTP/1.1", "Host: a"),
    "empty lines before request line": b"\r\n\r\n" + get("Host: a"),
    "chunk lines ending in bare lf": http(POST, "Host: a", "Transfer-Encoding: chunked",
                                          body=b"5\nhello\n0\n\n"),
    "chunk extension after whitespace": http(POST, "Host: a", "Transfer-Encoding: chunked",
                                             body=b"5 ;a=b\r\nhello\r\n0\r\n\r\n"),
    "utf-8 bytes in target": get("Host: a", target="/caf\xc3\xa9"),
    # request smuggling: framing ambiguity
    "cl then te": http(POST, "Host: a", "Content-Length: 5", "Transfer-Encoding: chunked", body=CHUNKED_HELLO),
    "te then cl": http(POST, "Host: a", "Transfer-Encoding: chunked", "Content-Length: 5", body=CHUNKED_HELLO),
    "te space before colon": http(POST, "Host: a", "Transfer-Encoding : chunked", "Content-Length: 5",
                                  body=b"hello"),
    "cl space before colon": http(POST, "Host: a", "Content-Length : 5", body=b"hello"),
    "te obs-fold": http(POST, "Host: a", "Transfer-Encoding:", " chunked", body=CHUNKED_HELLO),
    "te hidden in obs-fold of another field": http(POST, "Host: a", "Content-Length: 5", "X: y",
                                                   " Transfer-Encoding: chunked", body=b"hello"),
    "te vertical tab": http(POST, "Host: a", "Transfer-Encoding: \x0bchunked", body=CHUNKED_HELLO),
    "te twice": http(POST, "Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked",
                     body=CHUNKED_HELLO),
    "te gzip": http(POST, "Host: a", "Transfer-Encoding: gzip", body=b"hello"),
    "te chunked, gzip": http(POST, "Host: a", "Transfer-Encoding: chunked, gzip", body=CHUNKED_HELLO),
    "te gzip, chunked": http(POST, "Host: a", "Transfer-Encoding: gzip, chunked", body=CHUNKED_HELLO),
    "te identity": http(POST, "Host: a", "Transfer-Encoding: identity", body=b"hello"),
    "te in http/1.0": http("POST / HTTP/1.0", "Transfer-Encoding: chunked", body=CHUNKED_HELLO),
    "duplicate cl with different values": http(POST, "Host: a", "Content-Length: 5", "Content-Length: 6",
                                               body=b"hello!"),
    "cl 1,2": http(POST, "Host: a", "Content-Length: 1,2", body=b"ab"),
    "cl negative": http(POST, "Host: a", "Content-Length: -1", body=b"hello"),
    "cl plus sign": http(POST, "Host: a", "Content-Length: +5", body=b"hello"),
    "cl hex": http(POST, "Host: a", "Content-Length: 0x5", body=b"hello"),
    "cl thousands of digits": http(POST, "Host: a", "Content-Length: " + "0" * 4400 + "5", body=b"hello"),
    "cl over max body": http(POST, "Host: a", "Content-Length: 2000000"),
    # malformed heads
    "missing host": get("Accept: */*"),
    "two hosts": get("Host: a", "Host: b"),
    "two hosts http/1.0": get("Host: a", "Host: b", version="HTTP/1.0"),
    "nul in value": get("Host: a", "X: a\x00b"),
    "control char in value": get("Host: a", "X: a\x01b"),
    "bare cr in head": b"GET / HTTP/1.1\r\nHost: a\rX: b\r\n\r\n",
    "obs-fold of a plain field": get("Host: a", "X: b", "\tc"),
    "double space in request line": http("GET  / HTTP/1.1", "Host: a"),
    "lowercase http": http("GET / http/1.1", "Host: a"),
    "http/2.0": http("GET / HTTP/2.0", "Host: a"),
    "http/0.9": http("GET / HTTP/0.9", "Host: a"),
    # bad chunk framing
    "bad chunk size": http(POST, "Host: a", "Transfer-Encoding: chunked", body=b"zz\r\nhello\r\n0\r\n\r\n"),
    "chunk data without crlf": http(POST, "Host: a", "Transfer-Encoding: chunked", body=b"5\r\nhelloXX0\r\n\r\n"),
    "chunk size of 17 digits": http(POST, "Host: a", "Transfer-Encoding: chunked",
                                    body=b"00000000000000005\r\nhello\r\n0\r\n\r\n"),
    "chunk size of 21 digits": http(POST, "Host: a", "Transfer-Encoding: chunked",
                                    body=b"0" * 20 + b"5\r\nhello\r\n0\r\n\r\n"),
}

# Where we and h11 legitimately disagree: case -> (h11's verdict, ours, why).
DELIBERATE_DIFFERENCES = {
    "empty lines before request line": ("refuse 400", "accept",
        "RFC 9112 2.2: a server SHOULD ignore empty lines before the request-line; h11 does not"),
    "chunk lines ending in bare lf": ("incomplete", "accept",
        "RFC 9112 2.2 lets a recipient take a bare LF as line end; h11 insists on CRLF in chunk framing"),
    "chunk extension after whitespace": ("refuse 400", "accept",
        "RFC 9112 7.1.1 allows BWS before ';' in a chunk extension; h11's regex does not"),
    "utf-8 bytes in target": ("refuse 400", "accept",
        "we tolerate obs-text in the request-target (raw UTF-8 paths); h11 allows only VCHAR"),
    "cl then te": ("accept", "refuse 400",
        "RFC 9112 6.3: CL with TE ought to be an error (smuggling); h11 lets TE win"),
    "te then cl": ("accept", "refuse 400",
        "RFC 9112 6.3: CL with TE ought to be an error (smuggling); h11 lets TE win"),
    "te obs-fold": ("accept", "refuse 400",
        "RFC 9112 5.2: a server rejects obs-fold with 400 or unfolds it; h11 unfolds"),
    "te hidden in obs-fold of another field": ("accept", "refuse 400",
        "RFC 9112 5.2: a server rejects obs-fold with 400 or unfolds it; h11 unfolds"),
    "obs-fold of a plain field": ("accept", "refuse 400",
        "RFC 9112 5.2: a server rejects obs-fold with 400 or unfolds it; h11 unfolds"),
    "te in http/1.0": ("accept", "refuse 400",
        "RFC 9112 6.1: TE in an HTTP/1.0 message means faulty framing; h11 accepts it"),
    "cl over max body": ("incomplete", "refuse 413",
        "h11 has no body size limit; ours is Limits.max_body"),
    "control char in value": ("accept", "refuse 400",
        "RFC 9110 5.5: CTLs are invalid in values; h11 tolerates them for broken cookies (h11 issue 57)"),
    "http/2.0": ("accept", "refuse 400",
        "we speak HTTP/1.x only; h11 leaves the version check to the application"),
    "http/0.9": ("accept", "refuse 400",
        "we speak HTTP/1.x only; h11 leaves the version check to the application"),
    "chunk size of 17 digits": ("accept", "refuse 400",
        "we cap chunk-size at 16 hex digits (a 64-bit length); h11 allows 20"),
}


@pytest.mark.parametrize("case", list(CORPUS))
def test_agrees_with_h11(case):
    raw = CORPUS[case]
    theirs, ours = h11_verdict(raw), our_verdict(raw)
    if case in DELIBERATE_DIFFERENCES:
        expected_theirs, expected_ours, _why = DELIBERATE_DIFFERENCES[case]
        assert (kind(theirs), kind(ours)) == (expected_theirs, expected_ours)
    else:
        assert kind(ours) == kind(theirs)
        assert ours == theirs  # when both accept: same method, target and body


def test_deliberate_differences_name_corpus_cases():
    assert set(DELIBERATE_DIFFERENCES) <= set(CORPUS)
