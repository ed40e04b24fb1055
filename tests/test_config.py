"""``--config FILE`` and option errors: the file as options, the command line on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import MultiService
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from shardkv import tap
from shardkv.options import ClusterOptions, NodeOptions, ProxyOptions


def parse(*argv: str) -> tap.Options:
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "shardkv.toml"
    path.write_text(text)
    return str(path)


def test_the_file_sets_options_by_long_name(tmp_path: Path) -> None:
    """
    If the file sets numbers, strings, a flag and arrays by long name, then
    the options hold them as if given on the command line.
    """
    path = config(
        tmp_path,
        'port = 9080\ntimeout = 1\nnodes = ["a:1", "b:2=2"]\naccess-log = true\n'
        'listen = ["tcp:9081:interface=127.0.0.1", "tcp:9082:interface=127.0.0.1"]\n'
        'log-format = "json"\n',
    )
    sub = parse("proxy", "--config", path).subOptions
    assert (sub["port"], sub["timeout"], sub["access-log"]) == (9080, 1.0, True)
    assert sub["nodes"] == {"a:1": 1.0, "b:2": 2.0}
    assert sub["listen"] == ["tcp:9081:interface=127.0.0.1", "tcp:9082:interface=127.0.0.1"]
    assert sub["log-format"] == "json"
    assert sub["config"] == str(Path(path).resolve())


def test_the_command_line_overrides_the_file(tmp_path: Path) -> None:
    """
    If an option is in the file and on the command line, before or after
    --config, then the command line's value holds; repeatable options are
    replaced, not added to.
    """
    path = config(tmp_path, 'port = 9080\ntimeout = 1.5\nlisten = "tcp:9999:interface=127.0.0.1"\n')
    sub = parse("proxy", "--port", "9180", "--config", path).subOptions
    assert (sub["port"], sub["timeout"]) == (9180, 1.5)
    sub = parse("proxy", "--config", path, "-p", "9280").subOptions
    assert sub["port"] == 9280
    sub = parse("proxy", "--config", path, "--listen", "tcp:9300:interface=127.0.0.1").subOptions
    assert sub["listen"] == ["tcp:9300:interface=127.0.0.1"]


def test_node_and_cluster_take_a_file(tmp_path: Path) -> None:
    """The node and cluster read the same kind of file."""
    path = config(tmp_path, 'storage = "memory"\nnode-ports = [9301, 9302]\nr = 1\n')
    cluster = parse("cluster", "--config", path).subOptions
    assert (cluster["storage"], cluster["node-ports"], cluster["r"]) == ("memory", [9301, 9302], 1)
    node = parse("node", "--config", config(tmp_path, 'storage = "memory"\nport = 9400\n'))
    assert node.subOptions["node-id"] == "127.0.0.1:9400"


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("prot = 8080\n", ["prot", "unknown key"]),
        ("p = 8080\n", ["'p'", "unknown key"]),
        ("help = true\n", ["help", "unknown key"]),
        ('port = "8080"\n', ["port", "integer", "string"]),
        ("port = 8080.5\n", ["port", "integer"]),
        ("timeout = true\n", ["timeout", "number", "boolean"]),
        ('access-log = "yes"\n', ["access-log", "true or false"]),
        ("timeout = -1\n", ["timeout", "--timeout must be positive"]),
        ("nodes = []\n", ["nodes", "array"]),
        ("port = \n", ["not valid TOML"]),
    ],
)
def test_a_bad_file_names_the_key_and_the_file(tmp_path: Path, text: str, words: list[str]) -> None:
    """
    If the file has an unknown key, a value of the wrong type or a bad value,
    or is not TOML, then parsing is a one-line usage error naming the file
    and the key.
    """
    path = config(tmp_path, text)
    with pytest.raises(usage.UsageError) as raised:
        parse("proxy", "--config", path)
    message = str(raised.value)
    assert path in message and "\n" not in message
    for word in words:
        assert word in message


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match=r"--config .*missing\.toml"):
        parse("node", "--config", str(tmp_path / "missing.toml"))


# -- every typed option names itself ----------------------------------------------


SUBCOMMANDS = (("node", NodeOptions), ("proxy", ProxyOptions), ("cluster", ClusterOptions))


def _typed(options_class: type[usage.Options]) -> list[str]:
    options = options_class()
    return sorted(
        name
        for name, handler in options._dispatch.items()
        if getattr(getattr(handler, "coerce", None), "kind", None) in (int, float)
    )


@pytest.mark.parametrize(
    ("subcommand", "name"),
    [(sub, name) for sub, cls in SUBCOMMANDS for name in _typed(cls)],
)
def test_a_bad_number_names_the_option(subcommand: str, name: str) -> None:
    """
    If a numeric option is given a word, then the usage error names the
    option and the value (not only Python's ``invalid literal for int()``).
    """
    with pytest.raises(usage.UsageError) as raised:
        parse(subcommand, f"--{name}", "abc")
    message = str(raised.value)
    assert f"--{name} must be" in message and "'abc'" in message
    assert "invalid literal" not in message


def test_every_number_option_is_typed() -> None:
    """No option is coerced by a bare int or float, whose errors name nothing."""
    for cls in (NodeOptions, ProxyOptions, ClusterOptions):
        for name, handler in cls()._dispatch.items():
            assert getattr(handler, "coerce", None) not in (int, float), name


def test_port_must_be_a_port() -> None:
    with pytest.raises(usage.UsageError, match="--port must be a port number"):
        parse("node", "--port", "70000")


@pytest.mark.parametrize(("option", "value"), [("--log-format", "xml"), ("--log-level", "loud")])
def test_log_options_are_checked(option: str, value: str) -> None:
    with pytest.raises(usage.UsageError, match=option):
        parse("node", option, value)


# -- cluster's options --------------------------------------------------------------


def test_cluster_takes_the_replication_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    If C{cluster} is given --replicas, --r, --w and --pipeline-depth, then its
    proxy is built with them.
    """
    seen: dict[str, Any] = {}

    def make_proxy_service(**kwargs: Any) -> MultiService:
        seen.update(kwargs)
        return MultiService()

    monkeypatch.setattr(tap, "make_proxy_service", make_proxy_service)
    argv = ["--replicas", "2", "--r", "1", "--w", "1", "--pipeline-depth", "0"]
    tap.makeService(parse("cluster", "--storage", "memory", *argv), MemoryReactorClock())
    assert (seen["replicas"], seen["r"], seen["w"], seen["pipeline_depth"]) == (2, 1, 1, 0)
    with pytest.raises(usage.UsageError, match="--r and --w"):
        parse("cluster", "--replicas", "1")


def test_node_id_is_offered_only_where_it_is_used() -> None:
    """C{cluster} names its nodes itself, so it has no --node-id."""
    assert "node-id" in NodeOptions().synonyms
    assert "node-id" not in ClusterOptions().synonyms
    assert "node-id" not in ProxyOptions().synonyms
    with pytest.raises(usage.UsageError):
        parse("cluster", "--node-id", "x:1")
