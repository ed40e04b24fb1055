"""Reloading the config file: live settings applied, the rest reported, a bad file: nothing."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel

from shardkv import logs, tap
from shardkv.core.quorum import Consistency
from shardkv.errors import InvalidRequest
from shardkv.proxy.service import ProxyService
from shardkv.reload import Reloader, ReloadService
from shardkv.web.site import QuietSite


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def find(service: Any, kind: type) -> list[Any]:
    found = [service] if isinstance(service, kind) else []
    for child in getattr(service, "services", []):
        found += find(child, kind)
    return found


def reloader_of(service: Any) -> Reloader:
    (reloading,) = find(service, ReloadService)
    assert isinstance(reloading, ReloadService)
    return reloading.reloader


def sites(service: Any) -> list[QuietSite]:
    factories = [getattr(s, "factory", None) for s in find(service, object)]
    return [f for f in factories if isinstance(f, QuietSite)]


@pytest.fixture(autouse=True)
def _info_level() -> Any:
    yield
    logs.set_level("info")


def test_a_proxy_reload_applies_what_may_change_live(tmp_path: Path) -> None:
    """
    If the file's timeout, r, w, access-log, rebalance-rate and log-level
    change, then a reload applies each at once and says so; a changed port
    is reported as needing a restart and left alone.
    """
    path = tmp_path / "proxy.toml"
    path.write_text("port = 9080\ntimeout = 2.0\n")
    service = tap.makeService(parse("proxy", "--config", str(path)), MemoryReactorClock())
    assert isinstance(service, ProxyService)
    path.write_text(
        "port = 9090\ntimeout = 0.25\nr = 1\nw = 1\naccess-log = true\nrebalance-rate = 50\n"
        'log-level = "warn"\n'
    )
    answer = reloader_of(service).reload()
    assert answer["applied"] == ["access-log", "log-level", "r", "rebalance-rate", "timeout", "w"]
    assert answer["restart_needed"] == ["port", "proxy-id"]  # proxy-PORT by default
    assert answer["changed"]["timeout"] == {"from": 2.0, "to": 0.25}
    parts = service.parts
    assert parts.replica_client.timeout == 0.25
    assert parts.coordinator.defaults == Consistency(r=1, w=1)
    assert parts.coordinator.quorum_sizes(Consistency()) == (3, 1, 1)
    assert service.app.admin.rate == 50
    assert [site.access_log for site in sites(service)] == [True]
    assert logs.LEVEL_FILTER.defaultLogLevel is LogLevel.warn
    again = reloader_of(service).reload()
    assert (again["applied"], again["restart_needed"]) == ([], ["port", "proxy-id"])


def test_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    """
    If the file no longer parses, then a reload raises invalid_config and
    applies nothing, even of its live settings.
    """
    path = tmp_path / "node.toml"
    path.write_text('storage = "memory"\n')
    service = tap.makeService(parse("node", "--config", str(path)), MemoryReactorClock())
    path.write_text('storage = "memory"\naccess-log = true\nport = "x"\n')
    with pytest.raises(InvalidRequest) as raised:
        reloader_of(service).reload()
    assert raised.value.code == "invalid_config"
    assert "port" in raised.value.message
    assert [site.access_log for site in sites(service)] == [False]


def test_without_a_file_there_is_nothing_to_reload() -> None:
    service = tap.makeService(parse("node", "--storage", "memory"), MemoryReactorClock())
    answer = reloader_of(service).reload()
    assert answer["config"] is None and answer["applied"] == []


def test_the_command_line_still_wins_on_reload(tmp_path: Path) -> None:
    """A reload reads the file again under the same command line."""
    path = tmp_path / "proxy.toml"
    path.write_text("timeout = 2.0\n")
    service = tap.makeService(
        parse("proxy", "--config", str(path), "--timeout", "3"), MemoryReactorClock()
    )
    path.write_text("timeout = 0.1\n")
    assert reloader_of(service).reload()["changed"] == {}


def test_cluster_reload_reaches_every_site(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text('storage = "memory"\nnode-ports = [9501, 9502]\n')
    service = tap.makeService(parse("cluster", "--config", str(path)), MemoryReactorClock())
    path.write_text('storage = "memory"\nnode-ports = [9501, 9502]\naccess-log = true\n')
    assert reloader_of(service).reload()["applied"] == ["access-log"]
    assert [site.access_log for site in sites(service)] == [True, True, True]


def test_post_admin_reload(tmp_path: Path) -> None:
    """
    C{POST /admin/reload} on the proxy answers what the reload did, and a
    bad file is a JSON 400 invalid_config.
    """
    path = tmp_path / "proxy.toml"
    path.write_text("timeout = 2.0\n")
    service = tap.makeService(parse("proxy", "--config", str(path)), MemoryReactorClock())
    assert isinstance(service, ProxyService)
    stub: Any = StubTreq(service.app.resource())

    def post() -> tuple[int, dict[str, Any]]:
        answers: list[Any] = []
        stub.post("http://127.0.0.1/admin/reload").addCallback(answers.append)
        stub.flush()
        bodies: list[bytes] = []
        answers[0].content().addCallback(bodies.append)
        stub.flush()
        return answers[0].code, json.loads(bodies[0])

    path.write_text("timeout = 1.0\n")
    code, body = post()
    assert (code, body["applied"]) == (200, ["timeout"])
    path.write_text("timeout = 'soon'\n")
    code, body = post()
    assert (code, body["error"]) == (400, "invalid_config")


def test_sighup_schedules_a_reload(tmp_path: Path) -> None:
    """
    While the service runs, SIGHUP schedules a reload on the reactor; once
    stopped, the previous handler is back.
    """
    path = tmp_path / "node.toml"
    path.write_text('storage = "memory"\n')
    reactor = MemoryReactorClock()
    calls: list[Any] = []
    reactor.callFromThread = lambda f, *a, **k: calls.append(f)  # type: ignore[attr-defined]
    service = ReloadService(Reloader(lambda: {}, {}, set()), reactor)
    before = signal.getsignal(signal.SIGHUP)
    service.startService()
    try:
        os.kill(os.getpid(), signal.SIGHUP)
        assert calls == [service.reload]
    finally:
        service.stopService()
    assert signal.getsignal(signal.SIGHUP) == before
