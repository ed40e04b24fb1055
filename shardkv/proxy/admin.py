"""The proxy's admin API: the cluster map, membership changes and the move's progress.

Routes only parse and render; what a change does is L{shardkv.proxy.changes}
and how a move runs is L{shardkv.proxy.rebalancer}. Every path here starts
with ``/admin/``, which the proxy's guard (L{shardkv.web.auth.proxy_policy})
treats as an admin route: the cluster token, or a loopback peer in protected
mode. Failures are domain errors; L{shardkv.web.errors} renders them.

    GET  /admin/map                             the current map
    POST /admin/plan {"add", "remove", "weights"} stage a change; what it would move
    GET  /admin/plan                            the staged plan, as POST answered it
    GET  /admin/plan/keys?from=ID&to=ID&cursor=C  one page of a pair's keys
    POST /admin/commit                          install the staged map; the move starts
    POST /admin/abort                           head back to the previous placement
    GET  /admin/rebalance                       the move's progress
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from klein import Klein
from twisted.web.iweb import IRequest

from shardkv.errors import InvalidRequest, NotFound
from shardkv.web.errors import json_body

if TYPE_CHECKING:  # the routes only call them; importing them would pull in the map core
    from shardkv.proxy.changes import MembershipAdmin
    from shardkv.proxy.rebalancer import Rebalancer


class AdminService(Protocol):
    """What an app serving the admin routes provides (None: not configured)."""

    admin: MembershipAdmin | None
    rebalancer: Rebalancer | None


def _admin(service: AdminService) -> MembershipAdmin:
    if service.admin is None:
        raise NotFound("membership changes are not configured on this proxy", "no_route")
    return service.admin


def _query(request: IRequest, name: bytes, default: str | None = None) -> str:
    values = request.args.get(name)
    if not values:
        if default is not None:
            return default
        raise InvalidRequest(f"the query parameter ?{name.decode()}= is required", "invalid_query")
    try:
        return str(values[0].decode("utf-8"))
    except UnicodeDecodeError:
        raise InvalidRequest(f"?{name.decode()}= is not UTF-8", "invalid_query") from None


def _limit(request: IRequest) -> int | None:
    raw = _query(request, b"limit", "")
    if not raw:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 6:
        raise InvalidRequest(f"?limit= must be a whole number, not {raw[:20]!r}", "invalid_query")
    return int(raw)


def install_admin_routes(app: Klein) -> None:
    """Register the admin API on ``app``; its instances must be L{AdminService}s."""

    @app.route("/admin/map", methods=["GET"])
    def admin_map(self: AdminService, request: IRequest) -> bytes:
        return json_body(request, 200, _admin(self).map())

    @app.route("/admin/plan", methods=["POST"])
    async def admin_plan(self: AdminService, request: IRequest) -> bytes:
        admin = _admin(self)
        answer = await admin.plan(request.content.read())
        return json_body(request, 200, answer)

    @app.route("/admin/plan", methods=["GET"])
    def admin_staged_plan(self: AdminService, request: IRequest) -> bytes:
        return json_body(request, 200, _admin(self).staged_plan())

    @app.route("/admin/plan/keys", methods=["GET"])
    async def admin_plan_keys(self: AdminService, request: IRequest) -> bytes:
        admin = _admin(self)
        source, to = _query(request, b"from"), _query(request, b"to")
        cursor, limit = _query(request, b"cursor", ""), _limit(request)
        answer = await admin.plan_keys(source, to, cursor, limit)
        return json_body(request, 200, answer)

    @app.route("/admin/commit", methods=["POST"])
    async def admin_commit(self: AdminService, request: IRequest) -> bytes:
        return json_body(request, 200, await _admin(self).commit())

    @app.route("/admin/abort", methods=["POST"])
    async def admin_abort(self: AdminService, request: IRequest) -> bytes:
        return json_body(request, 200, await _admin(self).abort())

    @app.route("/admin/rebalance", methods=["GET"])
    def admin_rebalance(self: AdminService, request: IRequest) -> bytes:
        if self.rebalancer is None:
            raise NotFound("the rebalancer is not configured on this proxy", "no_route")
        status: dict[str, Any] = self.rebalancer.status()
        return json_body(request, 200, status)
