"""Klein's routing with less work per request: what nodes and the proxy serve.

Klein stays the router: routes are declared with ``@app.route``, matched by
the app's werkzeug ``Map``, run through Klein's own ``execute_endpoint``, and
failures go through the error handlers registered with ``handle_errors``, in
their order. What changes is what Klein's ``KleinResource.render`` does around
that for every request, which profiled at about half of a node's CPU per
``GET /get`` (py-spy, ``wrk -c32``; see bench/README.md):

- it binds ``url_map`` to the request (``Map.bind``: a new ``MapAdapter``) and
  works out the server name, port and scheme again (``extractURLparts``,
  which asks the transport twice whether it is TLS);
- it adapts the request to ``IKleinRequest`` to hang that adapter on it;
- it runs the endpoint inside two ``maybeDeferred``, registers two
  ``notifyFinish`` Deferreds, and sends the answer through a chain of four
  callbacks, even when the endpoint answered synchronously with bytes;
- it writes the answer with ``request.write`` before ``finish``, so twisted.web
  has no length and sends it chunked.

L{RouterResource} binds the ``MapAdapter`` once per (server name, scheme,
script name) and matches each request with ``adapter.match(path_info,
method)``, which is what ``bind`` followed by ``match`` computes. When the
endpoint (or the error handler that takes its failure) returns ``bytes`` or
``str`` synchronously, the answer is written at once with ``Content-Length``
and the request finished: no Deferred is made. Anything else (a Deferred, a
coroutine, a Klein ``Response``, a ``Resource``, an element, ``None``, an error
handler that itself fails) continues exactly as in Klein's ``render``, from
the same point: L{_klein_chain} is a copy of Klein 24.8's callbacks
(``process``, ``processing_failed``, ``write_response``), kept because Klein
defines them inside ``render`` where nothing else can call them. A request
Klein would refuse before routing (a server name or path that is not UTF-8) is
handed to Klein's own ``render`` untouched.

The one thing left out: ``IKleinRequest(request).mapper`` is not set, since no
shardkv route builds URLs with it (``url_for``); Klein's ``Klein.url_for``
binds its own adapter and still works.
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

_Matches = dict[tuple[str, str], tuple[Rule, Mapping[str, Any]]]
"""(path, method) -> werkzeug's match, for rules without arguments."""

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
        postpath = request.postpath
        path_info = b""
        if postpath:
            path_info = b"/".join(postpath)
            if not path_info.startswith(b"/"):
                path_info = b"/" + path_info
        prepath = request.prepath
        script_name = b""
        if prepath:
            script_name = b"/".join(prepath)
            if not script_name.startswith(b"/"):
                script_name = b"/" + script_name
        # Everything the server name and scheme are made of: the adapter for them.
        host = request.getHost()
        key = (
            request.getHeader(b"host"),
            request.isSecure(),
            getattr(host, "host", None),
            getattr(host, "port", 0),
            script_name,
        )
        bound = self._adapters.get(key)
        try:
            path_text = path_info.decode("utf-8")
            method = request.method.decode("utf-8")
            if bound is None:
                bound = self._bind(request, key)
        except (URLDecodeError, UnicodeDecodeError):
            # Klein answers these itself (and logs them) before routing.
            return super().render(request)

        app = self._app
        adapter, static = bound
        found = static.get((path_text, method))
        if found is not None:
            rule, kwargs = found
        else:
            try:
                rule, kwargs = adapter.match(path_text, method, return_rule=True)
            except BaseException:
                self._failed(request, Failure(), app._error_handlers)
                return server.NOT_DONE_YET
            if not rule.arguments and len(static) < MAX_STATIC_MATCHES:
                static[path_text, method] = (rule, kwargs)
        endpoint = rule.endpoint
        route = self._routes.get(endpoint)
        if route is None:
            route = self._route(endpoint, rule)
        request.route, segment_count = route
        if segment_count:
            prepath.extend(postpath[:segment_count])
            request.postpath = postpath[segment_count:]

        try:
            result = app.execute_endpoint(endpoint, request, **kwargs)
        except BaseException:
            self._failed(request, Failure(), app._error_handlers)
            return server.NOT_DONE_YET
        _answer(app, request, result, app._error_handlers, cancel=True)
        return server.NOT_DONE_YET

    def _route(self, endpoint: str, rule: Rule) -> tuple[str, int]:
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

    def _failed(self, request: Any, failure: Failure, handlers: ErrorMethods) -> None:
        """Klein's error handlers, in order, run synchronously while they answer bytes."""
        app = self._app
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
    length, and the request finished; everything else goes Klein's way
    (L{_klein_chain}), with ``handlers`` left for its failures. ``cancel``:
    an endpoint's Deferred, which Klein cancels when the client goes away.
    """
    if (type(result) is bytes or type(result) is str) and not (
        request.finished or getattr(request, "_disconnected", False)
    ):
        body = result.encode("utf-8") if type(result) is str else result
        if not request.startedWriting and request.code not in NO_BODY_CODES:
            request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()
    elif isinstance(result, Deferred):
        _klein_chain(app, request, result, handlers, cancel=result if cancel else None)
    else:
        _klein_chain(app, request, succeed(result), handlers)


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
    is read instead of a flag when it was already finished, and type hints.
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
        if isinstance(r, bytes):
            request.write(r)
        if not request_finished[0]:
            request.finish()

    d.addCallback(process)
    d.addErrback(processing_failed, error_handlers)
    d.addCallback(write_response)
    d.addErrback(log.err, _why="Unhandled Error writing response")
