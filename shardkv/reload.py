"""Reading the config file again while running (SIGHUP or ``POST /admin/reload``).

A reload parses the process's command line again, so the file is read afresh
and the command line still overrides it. Each option whose value changed is
either applied at once, when the service registered a setter for it
(L{Reloader.on_change}: timeouts, default R and W, the access log, the
rebalance rate, the log level), or reported as needing a restart and left
as it was (ports, data directory, token files and every other option). A file
that no longer parses changes nothing.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python import usage

from shardkv.config import CONFIG_OPTION
from shardkv.errors import InvalidRequest

log = Logger(namespace="shardkv.reload")

_HIDDEN = frozenset({"help", "version"})


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


class Reloader:
    """The options in force, the setters of those that may change live, and reload.

    ``parse`` parses the command line again (reading the file) and answers
    the new options; ``current`` are the options the process runs with;
    ``names`` the option names to compare (the long names, not derived keys
    such as the tokens themselves, which are never shown).
    """

    def __init__(
        self,
        parse: Callable[[], Mapping[str, Any]],
        current: Mapping[str, Any],
        names: set[str],
    ) -> None:
        self._parse = parse
        self.current = dict(current)
        self.names = sorted(names - _HIDDEN)
        self.setters: dict[str, list[Callable[[Any], None]]] = {}

    @property
    def path(self) -> str | None:
        path = self.current.get(CONFIG_OPTION)
        return path if isinstance(path, str) else None

    def on_change(self, name: str, setter: Callable[[Any], None]) -> None:
        """Call ``setter(new_value)`` when a reload changes option ``name``."""
        self.setters.setdefault(name, []).append(setter)

    @property
    def live(self) -> list[str]:
        """The options a reload applies at once."""
        return sorted(self.setters)

    def reload(self) -> dict[str, Any]:
        """Read the file again; apply what may change live. The answer says what changed,
        what was applied and what needs a restart. Raises L{InvalidRequest}
        (``invalid_config``) if the file or the command line no longer parses."""
        if self.path is None:
            return {
                "config": None,
                "message": "no --config file was given, so there is nothing to read again",
                "changed": {},
                "applied": [],
                "restart_needed": [],
                "live": self.live,
            }
        try:
            new = self._parse()
        except usage.UsageError as e:
            log.warn("reload of {path} refused, nothing changed: {error}", path=self.path, error=e)
            raise InvalidRequest(f"nothing changed: {e}", "invalid_config") from None
        changed = {
            name: {"from": _jsonable(self.current.get(name)), "to": _jsonable(new.get(name))}
            for name in self.names
            if self.current.get(name) != new.get(name)
        }
        applied, restart = [], []
        for name in changed:
            setters = self.setters.get(name)
            if setters is None:
                restart.append(name)
                continue
            for setter in setters:
                setter(new[name])
            self.current[name] = new[name]
            applied.append(name)
        log.info(
            "reloaded {path}: applied {applied}; needs a restart: {restart}",
            path=self.path,
            applied=", ".join(applied) or "nothing",
            restart=", ".join(restart) or "nothing",
        )
        return {
            "config": self.path,
            "changed": changed,
            "applied": applied,
            "restart_needed": restart,
            "live": self.live,
        }


class ReloadService(Service):
    """Reloads on SIGHUP while running. The signal handler only schedules the
    reload on the reactor (C{callFromThread} is safe from a signal handler)."""

    def __init__(self, reloader: Reloader, reactor: Any) -> None:
        self.reloader = reloader
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        super().stopService()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        with contextlib.suppress(InvalidRequest):  # logged by the reloader
            self.reloader.reload()
