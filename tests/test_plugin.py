"""The twistd plugin is discoverable and documents its subcommands.

A broken plugin module does not fail loudly: twistd logs an error while it
scans plugins and the ``shardkv`` command silently disappears. These tests
catch that, in process and through the real ``twistd`` script that users run.
"""

from __future__ import annotations

import subprocess

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

from shardkv import tap
from shardkv.testing.processes import TWISTD


def _shardkv_makers() -> list[IServiceMaker]:
    return [p for p in getPlugins(IServiceMaker) if p.tapname == "shardkv"]


HELP_COMMANDS = {
    "twistd": ["--help"],
    "shardkv": ["shardkv", "--help"],
    "node": ["shardkv", "node", "--help"],
    "proxy": ["shardkv", "proxy", "--help"],
    "cluster": ["shardkv", "cluster", "--help"],
}


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """The stdout of each help command, run in parallel (each twistd start
    scans every plugin, which takes a second or two). Each must exit 0 with
    no error logged while the plugins were scanned."""
    running = {
        name: subprocess.Popen(
            [TWISTD, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, args in HELP_COMMANDS.items()
    }
    outputs = {}
    try:
        for name, proc in running.items():
            stdout, stderr = proc.communicate(timeout=60)
            output = stdout + stderr
            assert proc.returncode == 0, output
            assert "Traceback" not in output, output
            assert "Unhandled Error" not in output, output
            outputs[name] = stdout
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def test_exactly_one_plugin() -> None:
    """
    If plugins are scanned, then exactly one service maker has the tapname
    C{shardkv}, and it is backed by L{shardkv.tap}.
    """
    makers = _shardkv_makers()
    assert len(makers) == 1, makers
    maker = makers[0]
    assert maker.description
    assert maker.options is tap.Options
    assert maker.makeService is tap.makeService


def test_plugin_makes_a_listening_service() -> None:
    """
    If the plugin's own options parse C{node --storage memory}, then its
    C{makeService} builds a tree holding one L{StreamServerEndpointService}.
    """
    (maker,) = _shardkv_makers()
    options = maker.options()
    options.parseOptions(["node", "--port", "18081", "--storage", "memory"])
    service = maker.makeService(options)
    listeners = [s for s in service if isinstance(s, StreamServerEndpointService)]
    assert len(listeners) == 1


def test_twistd_help_lists_shardkv(helps: dict[str, str]) -> None:
    """
    If a user runs C{twistd --help}, then the commands include C{shardkv}
    with its description, and no plugin failed to load.
    """
    out = helps["twistd"]
    commands = out.split("Commands:", 1)[1]
    assert any(line.split()[:1] == ["shardkv"] for line in commands.splitlines()), commands


def test_shardkv_help_lists_subcommands(helps: dict[str, str]) -> None:
    """
    If a user runs C{twistd shardkv --help}, then node, proxy and cluster
    are listed as commands.
    """
    out = helps["shardkv"]
    commands = out.split("Commands:", 1)[1]
    listed = {line.split()[0] for line in commands.splitlines() if line.strip()}
    assert {"node", "proxy", "cluster"} <= listed, out


@pytest.mark.parametrize(
    ("subcommand", "options"),
    [
        ("node", ["--port", "--listen", "--storage", "--data-dir", "--durability"]),
        ("proxy", ["--port", "--listen", "--nodes", "--timeout"]),
        ("cluster", ["--port", "--node-ports", "--storage", "--data-dir"]),
    ],
)
def test_subcommand_help_explains_options(
    helps: dict[str, str], subcommand: str, options: list[str]
) -> None:
    """
    If a user asks a subcommand for help, then each of its main options is
    listed with an explanation next to it.
    """
    out = helps[subcommand]
    lines = out.splitlines()
    for option in options:
        found = [line for line in lines if option + "=" in line or option + " " in line]
        assert found, f"{option} missing from:\n{out}"
        explanation = found[0].split(option, 1)[1].lstrip("= ")
        assert len(explanation.split()) >= 2, f"{option} is not explained: {found[0]!r}"
