"""``--config FILE``: a TOML file holding any option the command line takes.

Keys are the long option names, values their TOML types: ``port = 8081``,
``data-dir = "/var/lib/shardkv"``, ``timeout = 0.5``, flags as booleans
(``access-log = true``), and ``listen`` (repeatable), ``nodes`` and
``node-ports`` (comma-separated) also as arrays. The file becomes
command-line arguments placed before the real ones, leaving out every option
the command line gives, so the command line overrides the file and one parser,
with every check it makes, serves both. A key no option has, or a value of the
wrong type, is a usage error naming the key and the file.
"""

from __future__ import annotations

import getopt
import os
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

from twisted.python import usage

CONFIG_OPTION = "config"

LIST_OPTIONS = frozenset({"listen", "nodes", "node-ports"})
"""Options a file may give as an array: ``listen`` repeats, the others join with commas."""

_NOT_SETTABLE = frozenset({CONFIG_OPTION, "help", "version"})


def read_config(path: str) -> dict[str, Any]:
    """The file's table; a missing, unreadable or malformed file is a usage error naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise usage.UsageError(f"--config {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"--config {path}: not valid TOML: {e}") from None


def _long_name(options: usage.Options, name: str) -> str | None:
    found = options.synonyms.get(name) or options.synonyms.get(name.replace("-", "_"))
    return found if isinstance(found, str) else None


def command_line(options: usage.Options, argv: Sequence[str]) -> tuple[set[str], str | None]:
    """The long names of the options ``argv`` gives, and its ``--config`` path (the last)."""
    try:
        opts, _ = getopt.getopt(list(argv), options.shortOpt, options.longOpt)
    except getopt.error:
        return set(), None  # the real parse reports it
    given: set[str] = set()
    path = None
    for opt, arg in opts:
        name = _long_name(options, opt.lstrip("-")) or opt.lstrip("-")
        given.add(name)
        if name == CONFIG_OPTION:
            path = arg
    return given, path


def _kind(options: usage.Options, name: str) -> type | None:
    """int, float or str for a parameter (by its coercer); None for a flag."""
    if f"{name}=" not in options.longOpt:
        return None
    coerce = getattr(options._dispatch[name], "coerce", str)
    kind = getattr(coerce, "kind", coerce)
    return kind if kind in (int, float) else str


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _type_name(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _arguments(options: usage.Options, name: str, value: Any, path: str) -> list[str]:
    """``--name=value`` arguments for one key, its type checked against the option's."""
    kind = _kind(options, name)
    if kind is None:
        if not isinstance(value, bool):
            raise usage.UsageError(
                f"{path}: {name} is a flag: give true or false, not {_type_name(value)}"
            )
        return [f"--{name}"] if value else []
    values = [value]
    if isinstance(value, list) and name in LIST_OPTIONS:
        if not value or not all(_fits(v, str) or _fits(v, int) for v in value):
            raise usage.UsageError(f"{path}: {name} must be a non-empty array of strings")
        values = [str(v) for v in value]
        if name != "listen":
            values = [",".join(values)]
    elif not _fits(value, kind):
        raise usage.UsageError(
            f"{path}: {name} must be {_TYPE_NAMES[kind]}, not {_type_name(value)} ({value!r})"
        )
    coerce = getattr(options._dispatch[name], "coerce", None)
    for v in values:
        if coerce is not None:
            try:
                coerce(str(v))
            except (ValueError, usage.UsageError) as e:
                raise usage.UsageError(f"{path}: {name}: {e}") from None
    return [f"--{name}={v}" for v in values]


def file_arguments(options: usage.Options, path: str, given: set[str]) -> list[str]:
    """The file's settings as arguments, for every option the command line leaves out."""
    argv: list[str] = []
    for key, value in read_config(path).items():
        name = _long_name(options, key)
        if name != key or key in _NOT_SETTABLE:
            raise usage.UsageError(
                f"{path}: unknown key {key!r}: keys are the long names of the options "
                "(see --help), such as port or data-dir"
            )
        if name not in given:
            argv.extend(_arguments(options, name, value, path))
    return argv


class ConfigFileOption(usage.Options):
    """``--config FILE``, read before the command line so that the command line wins.

    ``argv`` keeps the arguments as parsed (with the file's path made absolute),
    so that a reload (L{shardkv.reload}) can parse them again and read the file
    afresh.
    """

    optParameters: list[list[Any]] = [
        [
            CONFIG_OPTION,
            None,
            None,
            'TOML file of options keyed by long name (port = 8081, data-dir = "...", '
            "access-log = true); the command line overrides it. SIGHUP or POST /admin/reload "
            "reads it again.",
        ],
    ]

    argv: list[str]

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        argv = list(sys.argv[1:] if options is None else options)
        given, path = command_line(self, argv)
        prefix = [] if path is None else file_arguments(self, path, given)
        self.argv = argv if path is None else [*argv, f"--config={os.path.abspath(path)}"]
        super().parseOptions(prefix + argv)
        if path is not None:
            self[CONFIG_OPTION] = os.path.abspath(path)
