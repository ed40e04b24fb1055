"""
Tests for L{shardkv.web.openapi}: the document stays true to the code.

Every Klein route of the proxy and of the node is described, with the same
methods, and nothing else is; every error code the status table can give
is named under its status; the document is valid OpenAPI 3.1; and each
process serves the part of it that is its own.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
from klein import Klein
from schemathesis.specs.openapi.definitions import OPENAPI_31_VALIDATOR
from twisted.web.test.requesthelper import DummyRequest

from shardkv.errors import ShardkvError
from shardkv.node.app import NodeApp
from shardkv.proxy.app import ProxyApp
from shardkv.web.errors import STATUS
from shardkv.web.openapi import (
    BOTH,
    ERRORS,
    NODE,
    PROXY,
    document,
    document_for,
    error_codes,
    routes,
)

APPS: dict[str, Klein] = {PROXY: ProxyApp.app, NODE: NodeApp.app}
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def described(doc: dict[str, Any]) -> dict[str, set[str]]:
    return {
        path: {m for m in ops if m in HTTP_METHODS} for path, ops in doc["paths"].items() if ops
    }


def without_implicit_head(methods: set[str], described_methods: set[str]) -> set[str]:
    """werkzeug answers HEAD on every GET rule; only a described HEAD counts."""
    return methods if "head" in described_methods else methods - {"head"}


@pytest.mark.parametrize("role", [PROXY, NODE])
def test_every_route_is_described_with_its_methods_and_nothing_else(role: str) -> None:
    """
    The routes an app serves are exactly the operations whose C{x-served-by}
    names it, method for method (a GET's automatic HEAD aside).
    """
    doc = document()
    mine = {
        path: {m for m, op in ops.items() if role in op["x-served-by"]}
        for path, ops in doc["paths"].items()
    }
    mine = {path: methods for path, methods in mine.items() if methods}
    served = routes(APPS[role])
    assert set(served) == set(mine), "paths differ"
    for path, methods in served.items():
        assert without_implicit_head(methods, mine[path]) == mine[path], path


def test_every_described_operation_is_served_by_someone() -> None:
    """No operation names a process kind that does not exist."""
    for path, ops in document()["paths"].items():
        for method, op in ops.items():
            assert op["x-served-by"], (path, method)
            assert set(op["x-served-by"]) <= set(BOTH), (path, method)


def _codes_of(cls: type[ShardkvError]) -> set[str]:
    codes = {cls.code}
    for sub in cls.__subclasses__():
        if sub not in STATUS:
            codes |= _codes_of(sub)
    return codes


STATUS_CLASSES: list[type[ShardkvError]] = sorted(STATUS, key=repr)


@pytest.mark.parametrize("cls", STATUS_CLASSES)
def test_every_status_table_code_is_named_under_its_status(cls: type[ShardkvError]) -> None:
    """
    Each class in STATUS, and each subclass that inherits its status, has
    its code listed under that status's error response.
    """
    status = STATUS[cls]
    assert status in ERRORS
    for code in _codes_of(cls):
        assert code in ERRORS[status][1], (cls.__name__, code, status)


def test_every_error_response_is_used_and_holds_the_error_body() -> None:
    """Each error status is a component response whose body is the Error schema."""
    doc = document()
    text = json.dumps(doc["paths"])
    for status in ERRORS:
        response = doc["components"]["responses"][f"Error{status}"]
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/Error"}
        assert response["x-error-codes"] == list(ERRORS[status][1])
        if status != 405:  # 405 is for the methods a path does not describe
            assert f"#/components/responses/Error{status}" in text, status
    assert {"error", "message"} <= set(doc["components"]["schemas"]["Error"]["required"])
    assert "not_found" in error_codes()


@pytest.mark.parametrize("doc", [document(), document_for(ProxyApp.app, PROXY, 3)])
def test_the_document_is_valid_openapi_3_1(doc: dict[str, Any]) -> None:
    """The OpenAPI 3.1 meta-schema accepts it, and every schema in it is valid JSON Schema."""
    OPENAPI_31_VALIDATOR.validate(doc)
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name


def test_each_process_serves_its_own_part() -> None:
    """
    GET /openapi.json on a node lists the replica routes and no admin route;
    on a proxy the reverse, with r and w bounded by its replication factor.
    """
    node_doc = document_for(NodeApp.app, NODE)
    assert "/replica/batch" in node_doc["paths"]
    assert not any(p.startswith("/admin/") for p in node_doc["paths"])
    set_params = node_doc["paths"]["/set"]["post"].get("parameters", [])
    assert not [p for p in set_params if p["name"] in ("r", "w")]

    proxy_doc = document_for(ProxyApp.app, PROXY, 3)
    assert "/admin/plan" in proxy_doc["paths"]
    assert not any(p.startswith("/replica/") for p in proxy_doc["paths"])
    r = [p for p in proxy_doc["paths"]["/get"]["get"]["parameters"] if p["name"] == "r"]
    assert r[0]["schema"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 3}


class _Coordinator:
    def quorum_sizes(self, c: object) -> Any:
        class Sizes:
            n = 5

        return Sizes()


def test_the_route_answers_the_document_for_its_app() -> None:
    """The handler answers JSON, the proxy's N read from its coordinator."""
    app = ProxyApp.__new__(ProxyApp)
    app.coordinator = _Coordinator()  # type: ignore[assignment]
    request = DummyRequest([b"openapi.json"])
    adapter = ProxyApp.app.url_map.bind("localhost")
    endpoint, _ = adapter.match("/openapi.json", "GET")
    body = ProxyApp.app.endpoints[endpoint](app, request)
    assert isinstance(body, bytes)
    doc = json.loads(body)
    assert request.responseHeaders.getRawHeaders(b"content-type") == [b"application/json"]
    assert doc["openapi"] == "3.1.0"
    r = [p for p in doc["paths"]["/get"]["get"]["parameters"] if p["name"] == "r"]
    assert r[0]["schema"]["anyOf"][0]["maximum"] == 5
