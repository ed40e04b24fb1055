"""Node addresses as the proxy's ``--nodes`` writes them: ``[http[s]://]host:port[=weight]``.

The id of a node is ``host:port`` whatever the scheme, so that placement,
hints and versions do not change when a cluster moves to TLS; the scheme
only decides the URL the proxy calls.
"""

from __future__ import annotations

from twisted.python import usage


def _node_item(item: str) -> tuple[str, str, str]:
    """``[http[s]://]host:port[=weight]`` into the node id ``host:port``, its base URL
    and the weight as written. The id has no scheme, so placement, hints and
    versions stay the same when a cluster moves to TLS.
    """
    address, _, weight = item.partition("=")
    scheme, sep, address = address.rpartition("://")
    scheme = scheme.lower() if sep else "http"
    host, _, port = address.rpartition(":")
    if scheme not in ("http", "https") or not host or "/" in host or not port.isdigit():
        raise usage.UsageError(f"--nodes: {item!r} is not [http[s]://]host:port[=weight]")
    return address, f"{scheme}://{address}", weight


def _node_items(text: str) -> list[str]:
    return [item for item in (part.strip() for part in text.split(",")) if item]


def parse_node_urls(text: str) -> dict[str, str]:
    """``--nodes`` (already checked by L{parse_nodes}) into each node's base URL."""
    return {node: url for node, url, _ in map(_node_item, _node_items(text))}


def parse_nodes(text: str) -> dict[str, float]:
    """``[http[s]://]host:port[=weight],...`` into an ordered mapping of node id to weight."""
    nodes: dict[str, float] = {}
    for item in _node_items(text):
        address, _, weight = _node_item(item)
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            raise usage.UsageError(f"--nodes: weight {weight!r} is not a number") from None
        if value <= 0:
            raise usage.UsageError(f"--nodes: weight of {address} must be positive")
        if address in nodes:
            raise usage.UsageError(f"--nodes: {address} is listed twice")
        nodes[address] = value
    if not nodes:
        raise usage.UsageError("--nodes: no nodes given")
    return nodes
