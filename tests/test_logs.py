"""Log output: one JSON object per line, the level filter, and twistd's logger option."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from twisted.logger import Logger, LogPublisher
from twisted.python import usage
from twisted.scripts.twistd import ServerOptions

from shardkv import logs
from shardkv.web.agent import ConnectionFactory
from shardkv.web.httpclient import HTTPClientService


@pytest.fixture(autouse=True)
def _info_level() -> Any:
    yield
    logs.set_level("info")


def emit(log_format: str, **kwargs: Any) -> str:
    out = io.StringIO()
    publisher = LogPublisher(logs.observer(out, log_format))
    log = Logger(namespace="shardkv.test", observer=publisher)
    log.info("node {node} is {state}", **kwargs)
    log.debug("hidden {n}", n=1)
    return out.getvalue()


def test_json_is_one_object_per_line_with_namespace_level_text_and_fields() -> None:
    line = emit("json", node="127.0.0.1:8082", state="down")
    assert line.count("\n") == 1
    record = json.loads(line)
    assert record["namespace"] == "shardkv.test"
    assert record["level"] == "info"
    assert record["text"] == "node 127.0.0.1:8082 is down"
    assert record["fields"] == {"node": "127.0.0.1:8082", "state": "down"}
    assert record["time"].endswith("Z")


def test_values_json_cannot_hold_become_their_repr() -> None:
    record = json.loads(emit("json", node=object(), state={1, 2}))
    assert record["fields"]["node"].startswith("<object object")


def test_a_failure_carries_its_traceback() -> None:
    out = io.StringIO()
    log = Logger(namespace="x", observer=LogPublisher(logs.observer(out, "json")))
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.failure("it broke")
    record = json.loads(out.getvalue())
    assert record["level"] == "critical" and "ZeroDivisionError" in record["traceback"]


def test_text_stays_twistds_format() -> None:
    assert emit("text", node="a", state="up").rstrip().endswith("node a is up")


def test_the_level_filter_can_change_live() -> None:
    """Below the level nothing is written; set_level changes it for every observer."""
    logs.set_level("debug")
    assert "hidden 1" in emit("text", node="a", state="up")
    logs.set_level("error")
    assert emit("json", node="a", state="up") == ""


def test_twistd_is_told_to_use_shardkvs_observer() -> None:
    """
    twistd's logger option names L{logs.twistd_observer}, unless twistd's own
    --logger or --syslog was chosen, which --log-format json refuses.
    """
    options = ServerOptions()
    options.parseOptions(["-n", "shardkv", "node", "--log-format", "json"])
    assert options["logger"] is logs.twistd_observer
    text = ServerOptions()
    text.parseOptions(["-n", "--syslog", "shardkv", "node"])
    assert not text["logger"]
    with pytest.raises(usage.UsageError, match="--log-format json"):
        ServerOptions().parseOptions(["-n", "--syslog", "shardkv", "node", "--log-format", "json"])


def test_the_pool_does_not_log_each_connection() -> None:
    """The HTTP client's agent connects through a factory that logs nothing."""
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    service = HTTPClientService(reactor)
    service.startService()
    try:
        service.request("GET", b"http://127.0.0.1:9101/health")
        ((_, _, factory, _, _),) = reactor.tcpClients
        wrapped: Any = factory
        assert isinstance(wrapped._wrappedFactory, ConnectionFactory)
        assert ConnectionFactory.noisy is False
    finally:
        service.stopService()
