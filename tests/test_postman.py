"""The Postman collection is valid v2.1 and each request gets the status its example shows."""

from __future__ import annotations

import json

import pytest

from serverproc import ROOT

COLLECTION = ROOT / "postman" / "MiniVault.postman_collection.json"
ITEMS = json.loads(COLLECTION.read_text())["item"]


def test_collection_is_postman_v2_1_with_a_base_url():
    coll = json.loads(COLLECTION.read_text())
    assert coll["info"]["schema"].endswith("/v2.1.0/collection.json")
    assert {"key": "baseUrl", "value": "http://localhost:3000", "type": "string"} in coll["variable"]
    assert all(item["request"]["url"]["raw"].startswith("{{baseUrl}}/") for item in ITEMS)


@pytest.mark.parametrize("item", ITEMS, ids=[i["name"] for i in ITEMS])
def test_request_gets_its_documented_status(server, item):
    req = item["request"]
    path = req["url"]["raw"].replace("{{baseUrl}}", "")
    body = req.get("body", {}).get("raw")
    if body is not None:
        body = body.encode()
        if req["method"] == "POST" and body.startswith(b"{") and item["response"][0]["code"] == 200:
            # Keep the run short: the examples' own max_tokens would only cost time.
            fields = json.loads(body)
            fields["max_output_tokens" if path == "/v1/responses" else "max_tokens"] = 3
            fields.get("options", {}).pop("num_predict", None)
            body = json.dumps(fields).encode()
    resp = server.request(req["method"], path, body)
    example = item["response"][0]
    assert resp.status == example["code"]
    if example["code"] >= 400:
        assert "error" in resp.json()
    elif req["url"]["raw"].endswith("/v1/chat/completions") and b'"stream": true' in body:
        assert resp.headers["content-type"] == "text/event-stream"
