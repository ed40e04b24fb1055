"""``GET /metrics``, and the Klein app that names each request's route for it.

The HTTP metrics are counted by the site once a request has finished
(L{shardkv.web.site.QuietSite.log}), labelled with the Klein rule that
answered: L{RoutedKlein} (L{shardkv.web.router}) sets it on the request just
before the handler runs, one dict lookup, so the label is bounded by the
routes (``/kv/<key>`` for every key) and costs no second URL match. A request no route took (404,
405, refused by the guard before routing) keeps ``other``.

Who may scrape is the guard's business (L{shardkv.web.auth}): on the proxy
``/metrics`` is a view like ``/cluster``, on a node a cluster route like
every route but ``/health``.
"""

from __future__ import annotations

from typing import Any, Protocol

from klein import Klein
from twisted.web.iweb import IRequest

from shardkv.errors import NotFound
from shardkv.metrics import CONTENT_TYPE, render
from shardkv.web.router import RoutedKlein, route_label

__all__ = ["METRICS_PATH", "MetricsService", "RoutedKlein", "install_metrics_routes", "route_label"]

METRICS_PATH = "/metrics"


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
