"""Klein's routing with less work per request: what nodes and the proxy serve.

Klein stays the router: routes are declared with ``@app.route``, matched by
the app's werkzeug ``Map``, run through Klein's own ``execute_endpoint``, and
failures go through the error handlers registered with ``handle_errors``, in
their order. What changes is what Klein's ``KleinResource.render`` does around
that for every request, about a quarter of a node's CPU for a ``GET /get``
(py-spy under ``wrk -c32``; bench/README.md has the profiles):

- it binds ``url_map`` to the request (``Map.bind``: a new ``MapAdapter``) and
  works out the server name, port and scheme again (``extractURLparts``,
  which asks the transport twice whether it is TLS), then matches the path
  with werkzeug's state machine;
- it adapts the request to ``IKleinRequest`` to hang that adapter on it;
- it runs the endpoint inside two ``maybeDeferred``, registers two
  ``notifyFinish`` Deferreds, and sends the answer through a chain of four
  callbacks, even when the endpoint answered synchronously with bytes;
- it writes the answer with ``request.write`` before ``finish``, so twisted.web
  has no length and sends it chunked.

L{RouterResource} binds the ``MapAdapter`` once per (server name, scheme,
script name) and matches each request with ``adapter.match(path_info,
method)``, which is what ``bind`` followed by ``match`` computes; the match
of a rule without arguments (``/get``, ``/replica/batch``, not
``/kv/<key>``) depends on the path and method alone, so it is kept. When the
endpoint (or the error handler that takes its failure) returns ``bytes`` or
``str`` synchronously, or a Deferred that has already fired (a node writing
to memory), the answer is written at once with ``Content-Length`` and the
request finished: no Deferred is made. Anything else (a Deferred still
waiting, a coroutine, a Klein ``Response``, a ``Resource``, an element,
``None``, an error handler that itself fails) continues exactly as in
Klein's ``render``, from the same point: L{_klein_chain} is a copy of Klein
24.8's callbacks (``process``, ``processing_failed``, ``write_response``),
kept because Klein defines them inside ``render`` where nothing else can call
them; its bytes get a length too. A request Klein would refuse before routing
(a server name or path that is not UTF-8) is handed to Klein's own ``render``
untouched.

So every status, header and body is Klein's, but for the framing: a whole
answer carries ``Content-Length`` instead of ``Transfer-Encoding: chunked``
(and a HEAD answer the length of its GET's body). An empty body is left as
Klein sends it. The one thing left out: ``IKleinRequest(request).mapper`` is
not set, since no shardkv route builds URLs with it; ``Klein.url_for`` binds
its own adapter and still works.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from klein import Klein
from klein._app import ErrorMethods
from klein._dihttp import Response
from klein._resource import (
    KleinResource,
    StandInResource,
    URLDecodeError,
    ensure_utf8_bytes,
    extractURLparts,
    route_metadata,
)
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python import log
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http import NO_BODY_CODES
from twisted.web.iweb import IRenderable
from twisted.web.resource import IResource, getChildForRequest
from twisted.web.template import renderElement
from werkzeug.exceptions import HTTPException
from werkzeug.routing import MapAdapter, Rule

__all__ = ["MAX_ADAPTERS", "RoutedKlein", "RouterResource", "route_label"]

MAX_ADAPTERS = 64
"""Bound adapters kept per resource. The Host header is the client's to choose,
so the cache is emptied when it fills rather than growing with every name sent."""

_AdapterKey = tuple[bytes | None, bool, str | None, int, bytes]
"""(Host header, TLS, local address, local port, script name)."""

_Matches = dict[tuple[bytes, bytes], tuple[str, Mapping[str, Any], str, int]]
"""(path, method) -> werkzeug's match (endpoint, arguments) with the route's label and
segment count (L{RouterResource._route}), for rules without arguments."""

MAX_STATIC_MATCHES = 256
"""More than (rules without arguments) x (methods): a bound that is never reached."""

_CONVERTER = re.compile(r"<(?:[^:<>]+:)?_?([^<>]+)>")


def route_label(rule: str) -> str:
    """``/kv/<key:_key>`` -> ``/kv/<key>``: the rule as an operator reads it."""
    return _CONVERTER.sub(r"<\1>", rule)


class RoutedKlein(Klein):
    """A Klein app served through L{RouterResource}, which records on each
    request (``request.route``) which rule matched.

    The route label feeds the HTTP metrics (L{shardkv.web.metricsroutes}): one
    dict lookup per request, so the label is bounded by the routes
    (``/kv/<key>`` for every key) and costs no second URL match. A request no
    rule took (404, 405, refused before routing) keeps ``other``.
    """

    def resource(self) -> RouterResource:
        """What Klein's C{resource()} gives, with the per-request work cut (L{RouterResource})."""
        return RouterResource(self)


def _rooted(segments: list[bytes]) -> bytes:
    """Path segments joined with one leading slash, or b"" for none."""
    if not segments:
        return b""
    joined = b"/".join(segments)
    return joined if joined[:1] == b"/" else b"/" + joined


class RouterResource(KleinResource):
    """A C{KleinResource} that reuses its bound ``MapAdapter`` and answers
    synchronous bytes at once, with ``Content-Length`` (see the module's docstring)."""

    def __init__(self, app: Klein) -> None:
        super().__init__(app)
        self._adapters: dict[_AdapterKey, tuple[MapAdapter, _Matches]] = {}
        self._routes: dict[str, tuple[str, int]] = {}
        """endpoint -> (its route label, the path segments Klein moves to prepath)."""

    def __eq__(self, other: object) -> bool:
        # Klein compares resources by their attributes; the adapter cache is not one that counts.
        if isinstance(other, RouterResource):
            return self._app == other._app
        return super().__eq__(other)

    def render(self, request: Any) -> Any:
        # The path and script name as Klein's extractURLparts makes them.
        postpath, prepath = request.postpath, request.prepath
        path_info = _rooted(postpath)
        script_name = _rooted(prepath)
        # Everything the server name and scheme are made of: the adapter for them.
        local = request.getHost()
        hosts = request.requestHeaders.getRawHeaders(b"host")
        key = (
            hosts[-1] if hosts else None,
            request.isSecure(),
            getattr(local, "host", None),
            getattr(local, "port", 0),
            script_name,
        )
        bound = self._adapters.get(key)
        if bound is None:
            try:
                bound = self._bind(request, key)
            except URLDecodeError:
                # Klein answers this itself (and logs it) before routing.
                return super().render(request)
        adapter, static = bound
        app = self._app
        method = request.method
        found = static.get((path_info, method))
        if found is None:
            try:
                path_text = path_info.decode("utf-8")
                method_text = method.decode("utf-8")
            except UnicodeDecodeError:
                return super().render(request)
            try:
                rule, kwargs = adapter.match(path_text, method_text, return_rule=True)
            except BaseException:
                _fail(app, request, Failure(), app._error_handlers)
                return server.NOT_DONE_YET
            found = (rule.endpoint, kwargs, *self._route(rule))
            if not rule.arguments and len(static) < MAX_STATIC_MATCHES:
                static[path_info, method] = found
        endpoint, kwargs, request.route, segment_count = found
        if segment_count:
            prepath.extend(postpath[:segment_count])
            request.postpath = postpath[segment_count:]

        try:
            result = app.execute_endpoint(endpoint, request, **kwargs)
        except BaseException:
            _fail(app, request, Failure(), app._error_handlers)
            return server.NOT_DONE_YET
        _answer(app, request, result, app._error_handlers, cancel=True)
        return server.NOT_DONE_YET

    def _route(self, rule: Rule) -> tuple[str, int]:
        """The rule's label for the metrics, and how many path segments Klein moves
        from ``postpath`` to ``prepath`` for its endpoint."""
        endpoint = rule.endpoint
        route = self._routes.get(endpoint)
        if route is None:
            segment_count = route_metadata(self._app.endpoints[endpoint]).segment_count
            route = self._routes[endpoint] = (route_label(rule.rule), segment_count)
        return route

    def _bind(self, request: Any, key: _AdapterKey) -> tuple[MapAdapter, _Matches]:
        """Bind ``url_map`` as Klein's ``render`` does; kept for the next request alike,
        with the matches of its rules that take no arguments (``/get``, not ``/kv/<key>``):
        werkzeug answers those from the path and method alone, always alike."""
        url_scheme, server_name, _port, _path, script_text = extractURLparts(request)
        adapter: MapAdapter = self._app.url_map.bind(
            server_name, script_text, url_scheme=url_scheme
        )
        adapters = self._adapters
        if len(adapters) >= MAX_ADAPTERS:
            adapters.clear()
        bound = adapters[key] = (adapter, {})
        return bound


def _fail(app: Klein, request: Any, failure: Failure, handlers: ErrorMethods) -> None:
    """Klein's error handlers, in order, run synchronously while they answer at once.

    As in Klein, a handler that fails passes its own failure to the handlers
    after it, none left means Klein's defaults, and a request already finished
    or gone only logs the failure (L{_klein_chain} does both)."""
    if not _open(request):
        _klein_chain(app, request, fail(failure), handlers)
        return
    for i, (exceptions, handler) in enumerate(handlers):
        if not failure.check(*exceptions):
            continue
        rest = handlers[i + 1 :]
        try:
            result = app.execute_error_handler(handler, request, failure)
        except BaseException:
            _klein_chain(app, request, fail(Failure()), rest)
            return
        _answer(app, request, result, rest, cancel=False)
        return
    _klein_chain(app, request, fail(failure), [])


def _answer(
    app: Klein, request: Any, result: object, handlers: ErrorMethods, *, cancel: bool
) -> None:
    """Send what an endpoint (or an error handler) returned.

    Bytes or text for a request still open are written at once, with their
    length (L{_write_whole}), and so is a Deferred that has already fired
    (a node's write to memory answers so), or its failure handled (L{_fail});
    everything else goes Klein's way (L{_klein_chain}), with ``handlers`` left
    for its failures. ``cancel``: this is an endpoint's result, and Klein
    cancels an endpoint's Deferred when the client goes away.
    """
    if isinstance(result, Deferred):
        fired = _fired(result)
        if not fired:
            _klein_chain(app, request, result, handlers, cancel=result if cancel else None)
            return
        result = fired[0]
        if isinstance(result, Failure):
            _fail(app, request, result, handlers)
            return
    if (type(result) is bytes or type(result) is str) and _open(request):
        _write_whole(request, result)
    else:
        _klein_chain(app, request, succeed(result), handlers)


def _fired(d: Deferred[Any]) -> list[Any]:
    """``[result]`` taken from ``d`` if it has one already, else ``[]`` (and ``d`` untouched)."""
    taken: list[Any] = []
    waiting = [False]

    def take(result: object) -> object:
        if waiting[0]:
            return result
        taken.append(result)
        return None

    d.addBoth(take)
    waiting[0] = True
    return taken


def _open(request: Any) -> bool:
    """Not finished and not disconnected: what Klein's ``request_finished`` flag tracks."""
    return not (request.finished or getattr(request, "_disconnected", False))


def _write_whole(request: Any, body: bytes | str) -> None:
    """The whole answer, with its length unless the route already began writing it.

    An empty body is left as Klein sends it: twisted.web drops its default
    Content-Type for a ``Content-Length: 0``, and that header would change."""
    if type(body) is str:
        body = body.encode("utf-8")
    if body and not request.startedWriting and request.code not in NO_BODY_CODES:
        request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


def _klein_chain(
    app: Klein,
    request: Any,
    d: Deferred[Any],
    error_handlers: ErrorMethods,
    cancel: Deferred[Any] | None = None,
) -> None:
    """The rest of Klein 24.8's ``KleinResource.render`` from a result (or failure) on.

    Copied because Klein defines these callbacks inside ``render``; the only
    changes are that ``d`` is given rather than made, that the request's state
    is read instead of a flag when it was already finished, that bytes for an
    open request are written with their length (L{_write_whole}), and type hints.
    ``cancel``: the endpoint's Deferred, cancelled if the client goes away.
    """
    request_finished = [bool(request.finished or request._disconnected)]

    def _finish(result: object) -> None:
        request_finished[0] = True

    request.notifyFinish().addBoth(_finish)
    if cancel is not None:
        request.notifyFinish().addErrback(lambda _: cancel.cancel())

    def process(r: object) -> Any:
        if isinstance(r, Response):
            r = r._applyToRequest(request)
        if IResource.providedBy(r):
            request.render(getChildForRequest(r, request))
            return StandInResource
        if IRenderable.providedBy(r):
            renderElement(request, r)
            return StandInResource
        return r

    def processing_failed(failure: Failure, error_handlers: ErrorMethods) -> Deferred[Any] | None:
        if request_finished[0]:
            if not failure.check(defer.CancelledError):
                log.err(failure, "Unhandled Error Processing Request.")
            return None
        if len(error_handlers) == 0:
            if failure.check(HTTPException):
                he = failure.value
                assert isinstance(he, HTTPException)
                request.setResponseCode(he.code)
                resp = he.get_response({})
                for header, value in resp.headers:
                    request.setHeader(ensure_utf8_bytes(header), ensure_utf8_bytes(value))
                encoded = resp.iter_encoded()
                return succeed(ensure_utf8_bytes(b"".join(encoded)))
            request.processingFailed(failure)
            return None
        error_handler = error_handlers[0]
        if failure.check(*error_handler[0]):
            handler_func = error_handler[1]
            hd = defer.maybeDeferred(app.execute_error_handler, handler_func, request, failure)
            hd.addCallback(process)
            return hd.addErrback(processing_failed, error_handlers[1:])
        return processing_failed(failure, error_handlers[1:])

    def write_response(r: object) -> None:
        if r is StandInResource:
            return
        if isinstance(r, str):
            r = r.encode("utf-8")
        if isinstance(r, bytes) and not request_finished[0]:
            _write_whole(request, r)
            return
        if isinstance(r, bytes):
            request.write(r)
        if not request_finished[0]:
            request.finish()

    d.addCallback(process)
    d.addErrback(processing_failed, error_handlers)
    d.addCallback(write_response)
    d.addErrback(log.err, _why="Unhandled Error writing response")
