"""What the replica tests (and the node's batch-route tests) share: one node's
address and timeout, and builders for batch bodies that are wrong on purpose."""

from __future__ import annotations

import base64
import json
from typing import Any

from tests.core.helpers import V1, V2

__all__ = ["GOOD_RECORD", "NODE_ID", "TIMEOUT", "V1", "V2", "json_bytes", "ops_body"]

NODE_ID = "127.0.0.1:8081"
TIMEOUT = 2.0

GOOD_RECORD: dict[str, Any] = {
    "version": "1-1-w",
    "tombstone": False,
    "content_type": "text/plain",
    "value": base64.b64encode(b"x").decode("ascii"),
}
"""A record as the batch format writes it; tests change one field to break it."""


def json_bytes(payload: object) -> bytes:
    return json.dumps(payload).encode("utf-8")


def ops_body(*items: object) -> bytes:
    """A request body whose ``ops`` are exactly ``items``, valid or not."""
    return json_bytes({"ops": list(items)})
