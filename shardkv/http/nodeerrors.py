"""What a caller may conclude when a node call fails.

- L{NodeUnreachable} with ``sent=False``: the request never left (connection
  refused); a write definitely did not happen.
- L{NodeUnreachable} with ``sent=True``: the connection broke after the
  request may have been delivered; a write's outcome is unknown.
- L{NodeTimeout}: no answer in time. With ``sent=True`` a write's outcome is
  unknown; with ``sent=False`` it was still queued here and never left.
- L{NodeBusy}: too much is already queued for the node; nothing was sent,
  and the node is not thought to be down.
"""

from __future__ import annotations


class NodeUnreachable(Exception):
    def __init__(self, node: str, reason: str, sent: bool) -> None:
        super().__init__(f"node {node} is unreachable: {reason}")
        self.node = node
        self.reason = reason
        self.sent = sent


class NodeTimeout(Exception):
    def __init__(self, node: str, seconds: float, sent: bool = True) -> None:
        super().__init__(f"node {node} did not answer within {seconds:g} s")
        self.node = node
        self.seconds = seconds
        self.sent = sent


class NodeBusy(Exception):
    def __init__(self, node: str, queued: int) -> None:
        super().__init__(f"node {node} already has {queued} operations queued; try again later")
        self.node = node
        self.queued = queued
