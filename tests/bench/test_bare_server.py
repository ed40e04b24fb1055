"""bench/bare_server.py: the same answer shape as a node's /get, 404 JSON otherwise."""

import json

from bare_server import Get
from twisted.web.test.requesthelper import DummyRequest


def get(resource: Get, path: bytes, args: dict[bytes, list[bytes]]) -> tuple[int, dict[str, str]]:
    request = DummyRequest([])
    request.path = path  # type: ignore[attr-defined]  # a real Request has one
    request.args = args
    body = resource.render(request)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert isinstance(body, bytes) and body.endswith(b"\n")
    return request.responseCode or 200, json.loads(body)


def test_a_key_answers_key_and_value() -> None:
    resource = Get({"k0": "vvv", "é": "ü"})
    assert get(resource, b"/get", {b"key": [b"k0"]}) == (200, {"key": "k0", "value": "vvv"})
    assert get(resource, b"/get", {b"key": ["é".encode()]}) == (200, {"key": "é", "value": "ü"})


def test_a_missing_key_or_another_path_is_a_json_404() -> None:
    resource = Get({"k0": "v"})
    for path, args in ((b"/get", {b"key": [b"nope"]}), (b"/get", {}), (b"/kv/k0", {})):
        status, payload = get(resource, path, args)
        assert status == 404
        assert set(payload) == {"error", "message"}
