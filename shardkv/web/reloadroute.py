"""``POST /admin/reload``: read the config file again (L{shardkv.reload}).

An admin route (the cluster token, or a loopback peer in protected mode).
It answers what changed, what was applied and what needs a restart:

    {"config": "/etc/shardkv/proxy.toml", "changed": {"timeout": {"from": 2.0, "to": 0.5}},
     "applied": ["timeout"], "restart_needed": [], "live": ["access-log", ...]}
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from twisted.web.iweb import IRequest

from shardkv.errors import NotFound
from shardkv.reload import Reloader
from shardkv.web.errors import json_body

RELOAD_PATH = "/admin/reload"


def attach_reloader(app: Any, reloader: Reloader) -> None:
    """Give the app whose class installed the route the reloader it calls."""
    app.reloader = reloader


def install_reload_routes(app: Klein) -> None:
    @app.route(RELOAD_PATH, methods=["POST"])
    def reload(self: Any, request: IRequest) -> bytes:
        reloader = getattr(self, "reloader", None)
        if not isinstance(reloader, Reloader):
            raise NotFound("this process was not started with options to reload", "no_route")
        return json_body(request, 200, reloader.reload())
