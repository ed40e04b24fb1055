"""Listening on the command line's endpoints, or refusing to start with one line.

Twisted's C{StreamServerEndpointService} logs a failed listen as an unhandled
error and lets the process run on without its port: a node that serves
nothing, or a cluster whose proxy sends one node's traffic to whatever holds
that port. L{ListeningService} listens in C{privilegedStartService}, which
twistd calls on the whole tree before any C{startService}, so in a cluster
every port is checked before any node opens its data directory; a port it
cannot have ends the process with one line naming it and a non-zero status.

The module also reads the address a process listens on out of an endpoint
string, so that a node started with C{--listen} and no C{--port} can be named
after where it really listens.
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from shardkv.logs import TWISTD_LOGGER, twistd_observer

log = Logger(namespace="shardkv")


def refuse_to_start(message: str, *, echo: bool = True) -> NoReturn:
    """Log ``message``, say it on the terminal, and exit with status 1.

    twistd has replaced C{sys.stderr} with its log by the time services
    start, so the line goes to C{sys.__stderr__}; ``echo=False`` leaves that
    out when twistd's log already is the terminal (C{twistd -n} without
    C{--logfile}), so that the operator reads the reason once.
    """
    _report(message, echo)
    raise SystemExit(1)


def _report(message: str, echo: bool) -> None:
    log.critical("{message}", message=message)
    if echo and sys.__stderr__ is not None:
        print(message, file=sys.__stderr__, flush=True)


def echo_needed(twistd_options: Mapping[str, Any] | None) -> bool:
    """Whether a refusal must be printed besides being logged, given twistd's options.

    Only C{twistd -n} with no C{--logfile} (or C{--logfile -}), no
    C{--syslog} and no C{--logger} (other than L{shardkv.logs}', which writes
    where twistd would) writes its log to the terminal.
    """
    if twistd_options is None:
        return True
    to_stdout = (
        bool(twistd_options.get("nodaemon"))
        and twistd_options.get("logfile") in (None, "", "-")
        and not twistd_options.get("syslog")
        and twistd_options.get("logger") in (None, TWISTD_LOGGER, twistd_observer)
    )
    return not to_stdout


def _reason(description: str, error: BaseException) -> str:
    if isinstance(error, CannotListenError):
        if isinstance(error.port, int):
            where = f"port {error.port}" + (f" of {error.interface}" if error.interface else "")
        else:
            where = str(error.port)
        cause = error.socketError
        text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        if isinstance(cause, OSError) and cause.errno == errno.EADDRINUSE:
            text += " (another process holds it)"
        return f"cannot listen on {where} ({description}): {text}"
    return f"cannot listen on {description}: {error}"


class ListeningService(StreamServerEndpointService):
    """Listens on one endpoint, or ends the process with one line saying why not.

    A TCP, SSL or UNIX endpoint's C{listen} answers at once, so a failure is
    known before C{privilegedStartService} returns, and the
    C{SystemExit} it raises stops twistd before the reactor runs and before
    any engine opens. An endpoint that listens later and then fails logs the
    same line and stops the reactor: the process ends, though twistd then
    exits with status 0, as it does after any reactor stop.

    It keeps the C{endpoint} and C{factory} attributes of the Twisted service
    it replaces, and none of that service's private state.
    """

    def __init__(
        self,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        *,
        description: str,
        owner: str,
        reactor: Any,
        echo: bool = True,
    ) -> None:
        super().__init__(endpoint, factory)
        self.description = description
        self.owner = owner
        self.echo = echo
        self._reactor = reactor
        self.port: IListeningPort | None = None
        self._pending: Deferred[None] | None = None
        self._listened = False
        self._failure: Failure | None = None
        self._synchronous = False
        self._stopped = False

    def message(self, failure: Failure) -> str:
        """The one line that says why this listener could not listen."""
        error = failure.value if failure.value is not None else Exception(failure.type)
        return f"shardkv: cannot start the {self.owner}: {_reason(self.description, error)}"

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._listen()

    def startService(self) -> None:
        Service.startService(self)
        if not self._listened:
            self._listen()

    def _listen(self) -> None:
        self._listened = True
        self._synchronous = True
        try:
            listening: Deferred[IListeningPort] = maybeDeferred(self.endpoint.listen, self.factory)
            settled = listening.addCallbacks(self._listening, self._failed)
        finally:
            self._synchronous = False
        if self._failure is not None:
            refuse_to_start(self.message(self._failure), echo=self.echo)
        if self.port is None:
            self._pending = settled

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        self._pending = None

    def _failed(self, failure: Failure) -> None:
        self._pending = None
        if failure.check(CancelledError):
            return
        if self._synchronous:
            self._failure = failure
            return
        if self._stopped:
            return
        _report(self.message(failure), self.echo)
        self._reactor.stop()

    def stopService(self) -> Deferred[None]:
        """Stop listening; fires once the port is closed (or the attempt cancelled)."""
        Service.stopService(self)
        self._stopped = True
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            closed: Deferred[None] = pending.addCallback(lambda _: self._close())
            return closed
        return self._close()

    def _close(self) -> Deferred[None]:
        port, self.port = self.port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return stopped if isinstance(stopped, Deferred) else succeed(None)


def listening_service(
    reactor: Any, description: str, factory: IProtocolFactory, *, owner: str, echo: bool = True
) -> ListeningService:
    """A L{ListeningService} for an endpoint string.

    A string Twisted cannot turn into an endpoint (an unknown type, a port
    that is no number, an SSL key file that is missing) refuses to start at
    once with one line, before twistd has begun its log: so the line is
    printed whatever ``echo`` says, and is not logged.
    """
    try:
        endpoint = serverFromString(reactor, description)
    except Exception as e:
        message = f"shardkv: cannot start the {owner}: cannot listen on {description}: {e}"
        if sys.__stderr__ is not None:
            print(message, file=sys.__stderr__, flush=True)
        raise SystemExit(1) from None
    return ListeningService(
        endpoint, factory, description=description, owner=owner, reactor=reactor, echo=echo
    )


# -- the address an endpoint string listens on -----------------------------------

_POSITIONAL = {
    "tcp": ("port", "interface", "backlog"),
    "tcp6": ("port", "backlog", "interface"),
    "ssl": ("port", "privateKey", "certKey", "sslmethod", "interface", "backlog"),
    "tls": ("path", "port", "backlog", "interface"),
}
"""Each type's positional arguments, in the order Twisted's parsers take them."""
_DEFAULT_PORT = {"tls": "443"}
_EVERY_INTERFACE = ("", "0.0.0.0", "::")


def _fields(description: str) -> tuple[list[str], dict[str, str]]:
    """Split an endpoint string as Twisted does: ``:`` between fields, the first
    ``=`` of a field names it, a backslash escapes the next character."""
    fields: list[list[str]] = [[""]]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            fields[-1][-1] += next(chars, "")
        elif char == ":":
            fields.append([""])
        elif char == "=" and len(fields[-1]) == 1:
            fields[-1].append("")
        else:
            fields[-1][-1] += char
    args = [f[0] for f in fields if len(f) == 1]
    kwargs = {f[0]: f[1] for f in fields if len(f) == 2}
    return args, kwargs


def listening_address(description: str) -> tuple[str, int] | None:
    """``(interface, port)`` of a tcp, tcp6, ssl or tls endpoint string.

    The interface is ``""`` when it listens on every interface. None for an
    endpoint with no fixed port of its own (unix sockets, systemd's inherited
    sockets, port 0, other plugins). Raises C{ValueError} for a port that is
    not a number.
    """
    args, kwargs = _fields(description)
    kind = args[0].lower() if args else ""
    if kind not in _POSITIONAL:
        return None
    values = dict(zip(_POSITIONAL[kind], args[1:], strict=False))
    values.update(kwargs)
    port_text = values.get("port", _DEFAULT_PORT.get(kind))
    if port_text is None:
        raise ValueError(f"{description!r} names no port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"port {port_text!r} of {description!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} of {description!r} is out of range")
    if port == 0:
        return None
    interface = values.get("interface", "")
    return ("" if interface in _EVERY_INTERFACE else interface), port


def address_name(
    description: str, hostname: Callable[[], str] | None = None
) -> tuple[str, int] | None:
    """``(host, port)`` naming a process that listens on ``description``.

    The host is the interface it is bound to, or the machine's host name when
    it listens on every interface: unlike ``0.0.0.0`` the host name tells the
    machines of a cluster apart, and it stays the same across restarts.
    None when the endpoint has no port (see L{listening_address}).
    """
    address = listening_address(description)
    if address is None:
        return None
    interface, port = address
    return (interface or (hostname or socket.gethostname)()), port
