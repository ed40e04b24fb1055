"""twistd's entry point for ``twistd shardkv node|proxy|cluster``: subcommands, service tree.

Each subcommand's options (L{shardkv.options}) turn into keyword arguments
for one service factory; the factories know nothing about command lines, so
tests build the same services directly. ``proxy --workers N`` (N > 1) builds
a supervisor instead (L{shardkv.proxy.workers}), whose workers build the proxy
with L{proxy_service}. Here too the options meet twistd:
the process's log observer (L{shardkv.logs}) and the settings a reload may
change in the running tree (L{shardkv.reload}).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from twisted.application.service import IService, IServiceCollection, MultiService
from twisted.logger import Logger
from twisted.python import usage

from shardkv.heap import freeze_startup_heap, garbage_collector
from shardkv.logs import set_level, use_with_twistd
from shardkv.node.service import make_node_service
from shardkv.options import ClusterOptions, NodeOptions, ProxyOptions
from shardkv.proxy.service import ProxyService, make_proxy_service
from shardkv.proxy.workers import Supervisor, SupervisorReloadService, make_supervisor
from shardkv.reload import Reloader, ReloadService
from shardkv.storage.engine import StorageEngine
from shardkv.storage.memory import MemoryEngine
from shardkv.web.reloadroute import attach_reloader
from shardkv.web.site import (
    NODE_MAX_INFLIGHT_BYTES,
    PROXY_MAX_INFLIGHT_BYTES,
    QuietSite,
)

log = Logger(namespace="shardkv")


class Options(usage.Options):
    synopsis = "node|proxy|cluster [options]"
    longdesc = "shardkv: a sharded key-value store. Run a storage node, the proxy, or both."
    subCommands = [
        ["node", None, NodeOptions, "Run a storage node (default port 8081)."],
        ["proxy", None, ProxyOptions, "Run the routing proxy (default port 8080)."],
        ["cluster", None, ClusterOptions, "Run 3 nodes and the proxy in one process."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("choose a subcommand: node, proxy or cluster")
        self._avoid_pidfile_clash()
        self._choose_logger()

    def _choose_logger(self) -> None:
        """Have twistd log through L{shardkv.logs} (the format, the level filter),
        unless its own ``--logger`` or ``--syslog`` was chosen."""
        parent = getattr(self, "parent", None)
        if parent is None:
            return
        log_format = self.subOptions["log-format"]
        if parent.get("logger") or parent.get("syslog"):
            if log_format == "json":
                raise usage.UsageError(
                    "--log-format json chooses the log observer itself: "
                    "leave out twistd's --logger and --syslog"
                )
            return
        parent["logger"] = use_with_twistd(parent, log_format)

    def _avoid_pidfile_clash(self) -> None:
        """Give each server its own pidfile unless the user chose one.

        ``twistd -n`` still writes ./twistd.pid, so the seed's quick start
        (three nodes started from one directory) would refuse the second node.
        """
        parent = getattr(self, "parent", None)
        if parent is None or parent.get("pidfile") != "twistd.pid":
            return
        if parent.get("nodaemon"):
            parent["pidfile"] = ""
        else:
            parent["pidfile"] = f"shardkv-{self.subCommand}-{self.subOptions['port']}.pid"


def _now_ms(reactor: Any, offset_ms: int) -> Callable[[], int]:
    return lambda: int(reactor.seconds() * 1000) + offset_ms


def _engine(config: Any, data_dir: str, reactor: Any) -> StorageEngine:
    if config["storage"] == "memory":
        return MemoryEngine()
    from shardkv.storage.lmdb.engine import LMDBEngine

    return LMDBEngine(data_dir, reactor, durability=config["durability"])


def _node(
    config: Any,
    reactor: Any,
    *,
    node_id: str,
    data_dir: str,
    listen: list[str],
    members: list[str] | None = None,
) -> MultiService:
    return make_node_service(
        reactor=reactor,
        node_id=node_id,
        engine=_engine(config, data_dir, reactor),
        listen=listen,
        max_value_bytes=config["max-value-bytes"],
        now_ms=_now_ms(reactor, config["clock-offset-ms"]),
        access_log=config["access-log"],
        echo_errors=config.echo_errors(),
        ca_file=config["ca-file"],
        token=config["token"],
        members=members,
        header_timeout=config["header-timeout"],
        max_connections=config["max-connections"],
        max_inflight_bytes=config["max-inflight-bytes"] or NODE_MAX_INFLIGHT_BYTES,
    )


def makeService(config: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    sub = config.subOptions
    set_level(sub["log-level"])
    service = _service(config.subCommand, sub, reactor)
    reactor.callWhenRunning(freeze_startup_heap)
    if IServiceCollection.providedBy(service):
        garbage_collector(reactor).setServiceParent(service)
        add_reload_service(sub, service, reactor)
    return service


def add_reload_service(sub: Any, service: Any, reactor: Any) -> None:
    """Reload ``service``'s live settings on SIGHUP (and on ``POST /admin/reload``).

    A supervisor of ``--workers`` also passes each reload on to its workers.
    """
    reload_service: ReloadService
    if isinstance(service, Supervisor):
        # The parent applies only its log level; each worker reloads (and logs) the rest.
        reloader = Reloader(lambda: _reparse(sub), sub, {"log-level"})
        reloader.on_change("log-level", set_level)
        reload_service = SupervisorReloadService(reloader, reactor, service)
    else:
        reload_service = ReloadService(_reloader(sub, service), reactor)
    reload_service.setServiceParent(service)


def _service(subcommand: str | None, sub: Any, reactor: Any) -> IService:
    if subcommand == "node":
        return _node(
            sub, reactor, node_id=sub["node-id"], data_dir=sub["data-dir"], listen=sub.endpoints()
        )
    if subcommand == "proxy":
        if sub["workers"] > 1:
            return make_supervisor(sub, reactor)
        return proxy_service(sub, reactor)
    return _cluster(sub, reactor)


def _shared_proxy_options(sub: ProxyOptions | ClusterOptions) -> dict[str, Any]:
    """The L{make_proxy_service} arguments that ``proxy`` and ``cluster`` take
    from options of the same names."""
    return dict(
        listen=sub.endpoints(),
        max_value_bytes=sub["max-value-bytes"],
        timeout=sub["timeout"],
        pipeline_depth=sub["pipeline-depth"],
        access_log=sub["access-log"],
        echo_errors=sub.echo_errors(),
        replicas=sub["replicas"],
        r=sub["r"],
        w=sub["w"],
        ca_file=sub["ca-file"],
        token=sub["token"],
        client_token=sub["client-token"],
        header_timeout=sub["header-timeout"],
        max_connections=sub["max-connections"],
        max_inflight_bytes=sub["max-inflight-bytes"] or PROXY_MAX_INFLIGHT_BYTES,
        rebalance_rate=sub["rebalance-rate"],
    )


def proxy_service(sub: ProxyOptions, reactor: Any, **overrides: Any) -> ProxyService:
    """The proxy that ``twistd shardkv proxy`` runs, from its options.

    ``overrides`` replace keyword arguments of L{make_proxy_service}: a worker
    of ``--workers`` (L{shardkv.proxy.workers}) builds the same proxy with its
    own app and listeners this way.
    """
    kwargs: dict[str, Any] = dict(
        _shared_proxy_options(sub),
        reactor=reactor,
        nodes=sub["nodes"],
        vnodes=sub["vnodes"],
        pool_size=sub["pool-size"],
        node_inflight_bytes=sub["node-inflight-bytes"],
        health_interval=sub["health-interval"],
        writer_id=sub["proxy-id"],
        clock_offset_ms=sub["clock-offset-ms"],
        urls=sub["node-urls"],
    )
    kwargs.update(overrides)
    return make_proxy_service(**kwargs)


def _cluster(sub: ClusterOptions, reactor: Any) -> MultiService:
    top = MultiService()
    nodes = {}
    scheme = "http" if sub["node-cert"] is None else "https"
    members = [f"127.0.0.1:{port}" for port in sub["node-ports"]]
    for port in sub["node-ports"]:
        node_id = f"127.0.0.1:{port}"
        data_dir = os.path.join(sub["data-dir"], f"node-{port}")
        _node(
            sub,
            reactor,
            node_id=node_id,
            data_dir=data_dir,
            listen=[sub.node_endpoint(port)],
            members=members,
        ).setServiceParent(top)
        nodes[node_id] = 1.0
    if sub["storage"] == "lmdb":
        log.info(
            "cluster data is in {path}; delete that directory to start empty",
            path=os.path.abspath(sub["data-dir"]),
        )
    make_proxy_service(
        **_shared_proxy_options(sub),
        reactor=reactor,
        nodes=nodes,
        writer_id=f"proxy-{sub['port']}",
        urls={node: f"{scheme}://{node}" for node in nodes},
    ).setServiceParent(top)
    return top


def _walk(service: Any) -> Iterator[Any]:
    yield service
    if IServiceCollection.providedBy(service):
        for child in service:
            yield from _walk(child)


def _reparse(sub: Any) -> Any:
    """The same command line parsed again: the config file is read afresh."""
    fresh = type(sub)()
    fresh.parseOptions(sub.argv)
    return fresh


def _reloader(sub: Any, service: IService) -> Reloader:
    """What a reload may change in this tree: each live option's setter."""
    reloader = Reloader(lambda: _reparse(sub), sub, set(sub.synonyms.values()))
    reloader.on_change("log-level", set_level)
    for each in _walk(service):
        site = getattr(each, "factory", None)
        if isinstance(site, QuietSite):
            reloader.on_change("access-log", partial(setattr, site, "access_log"))
            reloader.on_change("header-timeout", partial(setattr, site, "header_timeout"))
    for proxy in _walk(service):
        if isinstance(proxy, ProxyService):
            _proxy_settings(reloader, proxy)
    return reloader


def _proxy_settings(reloader: Reloader, proxy: ProxyService) -> None:
    coordinator = proxy.parts.coordinator
    reloader.on_change("timeout", proxy.parts.replica_client.set_timeout)

    def default_r(r: int) -> None:
        """This proxy's default R from now on, in place of the map's."""
        coordinator.defaults = dataclasses.replace(coordinator.defaults, r=r)

    def default_w(w: int) -> None:
        coordinator.defaults = dataclasses.replace(coordinator.defaults, w=w)

    reloader.on_change("r", default_r)
    reloader.on_change("w", default_w)
    admin = getattr(proxy.app, "admin", None)
    if admin is not None:  # for plans made from now on
        reloader.on_change("rebalance-rate", partial(setattr, admin, "rate"))
    attach_reloader(proxy.app, reloader)
