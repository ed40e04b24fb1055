"""Real twistd processes: --config, SIGHUP and /admin/reload, --log-format json, quiet pools."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardkv.client.blocking import request
from shardkv.testing.polling import free_port, poll_until
from shardkv.testing.processes import ProcessSet
from tests.system.procs import process_set

pytestmark = pytest.mark.slow

DEADLINE = 15.0


@pytest.fixture
def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
    yield from process_set(request, tmp_path)


def json_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_config_file_json_logs_and_reload(procs: ProcessSet, tmp_path: Path) -> None:
    """
    A node and a proxy read their options from TOML files (the command line
    adds the port); the proxy logs one JSON object per line; SIGHUP applies
    a new timeout and access log at once and reports a changed rebalance
    rate as applied and a changed vnodes as needing a restart;
    POST /admin/reload then finds nothing new.
    """
    node_file = tmp_path / "node.toml"
    node_file.write_text('storage = "memory"\nlog-format = "json"\n')
    node = procs.start_node(None, None, "--config", str(node_file))
    proxy_file = tmp_path / "proxy.toml"
    proxy_file.write_text(
        f'nodes = ["127.0.0.1:{node.port}"]\nreplicas = 1\nr = 1\nw = 1\n'
        'log-format = "json"\ntimeout = 2.0\n'
    )
    proxy = procs.start_proxy(None, [node], "--config", str(proxy_file))
    # the command line's --nodes (from start_proxy) wins over the file's; both are the node
    records = json_lines(proxy.log_path)
    assert {"time", "level", "namespace", "text", "fields"} <= set(records[-1])
    assert any(
        r["namespace"] == "shardkv" or r["namespace"].startswith("shardkv.") for r in records
    )
    assert all(r["level"] in ("debug", "info", "warn", "error", "critical") for r in records)
    assert json_lines(node.log_path)  # the node's log is JSON too

    assert request("PUT", proxy.url + "/kv/k", b"v").status in (200, 201)
    proxy_file.write_text(
        proxy_file.read_text().replace("timeout = 2.0", "timeout = 0.5")
        + "access-log = true\nvnodes = 8\n"
    )
    os.kill(proxy.pid, signal.SIGHUP)
    reloaded = poll_until(
        lambda: [r for r in json_lines(proxy.log_path) if r["text"].startswith("reloaded ")],
        DEADLINE,
        "the proxy's reload log line",
    )
    assert reloaded[-1]["fields"]["applied"] == "access-log, timeout"
    assert reloaded[-1]["fields"]["restart"] == "vnodes"
    assert request("GET", proxy.url + "/kv/k").status == 200
    poll_until(
        lambda: any('"GET /kv/k' in r["text"] for r in json_lines(proxy.log_path)),
        DEADLINE,
        "an access-log line",
    )
    answer = request("POST", proxy.url + "/admin/reload").json()
    assert (answer["applied"], answer["restart_needed"]) == ([], ["vnodes"])


def test_a_bad_option_names_itself(procs: ProcessSet, tmp_path: Path) -> None:
    """``twistd shardkv node --port abc`` exits with one line naming the option."""
    bad = tmp_path / "bad.toml"
    bad.write_text("prot = 1\n")
    for argv, words in (
        (["--port", "abc"], ["--port must be a whole number", "'abc'"]),
        (["--config", str(bad)], [str(bad), "'prot'"]),
    ):
        proc = procs.start("bad", "node", "--storage", "memory", *argv, wait=False)
        assert proc.wait() != 0
        out = proc.out_path.read_text()
        for word in words:
            assert word in out
        assert "invalid literal" not in out


def test_a_down_node_makes_no_factory_noise(procs: ProcessSet, tmp_path: Path) -> None:
    """
    While one of its nodes is down, the proxy keeps checking it without
    logging "Starting factory" / "Stopping factory" for each attempt.
    """
    node = procs.start_node(None, None, "--storage", "memory")
    dead = f"127.0.0.1:{free_port()}"
    proxy = procs.start_proxy(
        None, [node, dead], "--health-interval", "0.1", "--replicas", "1", "--r", "1", "--w", "1"
    )

    def checked_for_a_while() -> bool:
        health = next(
            n["health"]
            for n in request("GET", proxy.url + "/cluster").json()["nodes"]
            if n["node"] == dead
        )
        assert "_HTTP11ClientFactory" not in proxy.log_path.read_text()
        return bool(health["status"] == "down" and health["last_check"] - health["since"] >= 2.0)

    poll_until(checked_for_a_while, DEADLINE, "two seconds of checks of the down node")
    log = proxy.log_path.read_text()
    assert f"node {dead} is down" in log
    noise = [line for line in log.splitlines() if "ClientFactory" in line]
    assert noise == []
