"""Where the log goes and in what form: twistd's text lines, or one JSON object per line.

twistd asks its C{--logger} option (the name of a factory of log
observers) for the process's observer before anything else is logged, so
L{shardkv.tap} sets that option to L{twistd_observer} unless the user chose a logger or syslog. The
observer writes where twistd would have (stdout with ``-n``, else
``--logfile``, default ``twistd.log``, reopened on SIGUSR1 like twistd's
own), through one process-wide level filter that a reload may change
(L{set_level}). Text stays the default; ``--log-format json`` writes, per event:

    {"time": "2026-01-02T03:04:05.678Z", "level": "info", "namespace": "shardkv.proxy",
     "text": "node 127.0.0.1:8082 is down", "fields": {"node": "127.0.0.1:8082"}}

with ``"traceback"`` added for a logged failure.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from zope.interface import implementer

LOG_LEVELS = ("debug", "info", "warn", "error", "critical")

LEVEL_FILTER = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
"""The least level the process logs. One per process: the log is the process's."""

_LEGACY_KEYS = frozenset({"message", "time", "isError", "why", "failure", "format", "printed"})


def set_level(name: str) -> None:
    """Log events at ``name`` (one of L{LOG_LEVELS}) and above, from now on."""
    LEVEL_FILTER.defaultLogLevel = LogLevel.levelWithName(name)
    LEVEL_FILTER.clearLogLevels()  # the level in force is the root namespace's


def _fields(event: Mapping[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in event.items()
        if not k.startswith("log_") and k not in _LEGACY_KEYS and k != "system"
    }


def event_as_json(event: Mapping[str, Any]) -> str:
    """One event as one line of JSON; values JSON cannot hold become their repr."""
    level = event.get("log_level")
    when = event.get("log_time")
    record: dict[str, Any] = {
        "time": None
        if when is None
        else datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "text": formatEvent(dict(event)),
        "fields": _fields(event),
    }
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        record["traceback"] = failure.getTraceback()
    try:
        return json.dumps(record, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):  # keys JSON cannot hold, or a repr that raised
        record["fields"] = {str(k): repr(v) for k, v in record["fields"].items()}
        return json.dumps(record, ensure_ascii=False, default=repr)


@implementer(ILogObserver)
class JSONLinesObserver:
    """Writes each event as one JSON object and a newline, flushed at once."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def __call__(self, event: Mapping[str, Any]) -> None:
        self.out.write(event_as_json(event) + "\n")
        self.out.flush()


def observer(out: IO[str], log_format: str) -> ILogObserver:
    """The observer for ``log_format`` (text or json) writing to ``out``, behind L{LEVEL_FILTER}."""
    inner: ILogObserver = (
        JSONLinesObserver(out) if log_format == "json" else textFileLogObserver(out)
    )
    return FilteringLogObserver(inner, [LEVEL_FILTER])


def _log_file(server_options: Mapping[str, Any]) -> IO[str]:
    """Where twistd's own logger would write (L{twisted.scripts._twistd_unix.UnixAppLogger})."""
    name = server_options.get("logfile") or ""
    if name == "-" or (server_options.get("nodaemon") and not name):
        if not server_options.get("nodaemon"):
            sys.exit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    log_file = LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return cast(IO[str], log_file)


_twistd: dict[str, Any] = {"options": {}, "format": "text"}

TWISTD_LOGGER = f"{__name__}.twistd_observer"
"""The name to give twistd's ``logger`` option, which twistd imports and calls."""


def use_with_twistd(server_options: Mapping[str, Any], log_format: str) -> str:
    """Remember how twistd was asked to log; the value for its ``logger`` option."""
    _twistd.update(options=server_options, format=log_format)
    return TWISTD_LOGGER


def twistd_observer() -> ILogObserver:
    """twistd's log observer: L{observer} on the log file twistd would use."""
    return observer(_log_file(_twistd["options"]), _twistd["format"])
