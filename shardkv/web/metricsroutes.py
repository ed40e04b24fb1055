"""``GET /metrics``, and the Klein app that names each request's route for it.

The HTTP metrics are counted by the site once a request has finished
(L{shardkv.web.site.QuietSite.log}), labelled with the Klein rule that
answered: L{RoutedKlein} sets it on the request just before the handler
runs, one dict lookup, so the label is bounded by the routes (``/kv/<key>``
for every key) and costs no second URL match. A request no route took (404,
405, refused by the guard before routing) keeps ``other``.

Who may scrape is the guard's business (L{shardkv.web.auth}): on the proxy
``/metrics`` is a view like ``/cluster``, on a node a cluster route like
every route but ``/health``.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

from klein import Klein
from twisted.web.iweb import IRequest

from shardkv.errors import NotFound
from shardkv.metrics import CONTENT_TYPE, OTHER_ROUTE, render

METRICS_PATH = "/metrics"

_CONVERTER = re.compile(r"<(?:[^:<>]+:)?_?([^<>]+)>")


def route_label(rule: str) -> str:
    """``/kv/<key:_key>`` -> ``/kv/<key>``: the rule as an operator reads it."""
    return _CONVERTER.sub(r"<\1>", rule)


class RoutedKlein(Klein):
    """A Klein app that records on each request (``request.route``) which rule matched."""

    _labels: dict[str, str] | None = None

    def execute_endpoint(self, endpoint: str, request: IRequest, *args: Any, **kwargs: Any) -> Any:
        labels = self._labels
        if labels is None or endpoint not in labels:
            labels = self._labels = {
                rule.endpoint: route_label(rule.rule) for rule in self.url_map.iter_rules()
            }
        request.route = labels.get(endpoint, OTHER_ROUTE)  # type: ignore[attr-defined]
        return super().execute_endpoint(endpoint, request, *args, **kwargs)


class MetricsService(Protocol):
    """An app that serves ``/metrics``: its registry, if it has one."""

    metrics: Any


def install_metrics_routes(app: Klein) -> None:
    """Register ``GET /metrics`` on ``app``; its instances hold ``metrics`` (a
    L{shardkv.metrics.ProxyMetrics} or L{shardkv.metrics.NodeMetrics}, or None:
    404)."""

    @app.route(METRICS_PATH, methods=["GET"])
    def metrics(self: MetricsService, request: IRequest) -> bytes:
        m = getattr(self, "metrics", None)
        if m is None:
            raise NotFound("this server keeps no metrics", "not_found")
        request.setHeader(b"content-type", CONTENT_TYPE)
        return render(m.registry)
