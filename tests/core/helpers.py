"""What the core tests share: Hypothesis settings, version strategies, a settable wall clock."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st

from shardkv.core.conditions import Precondition
from shardkv.core.versions import Version
from tests.helpers import U64, WRITER_ALPHABET

# No example database: the tests must not leave a .hypothesis/ in the tree,
# and a deadline only makes a loaded CI machine flaky.
PROPERTY = settings(database=None, deadline=None, max_examples=200)

NINETY_SECONDS_MS = 90_000

writers = st.text(alphabet=WRITER_ALPHABET, min_size=1, max_size=128)
versions = st.builds(
    Version,
    counter=st.integers(min_value=1, max_value=2**63),
    clock_ms=st.integers(min_value=0, max_value=U64),
    writer=writers,
)
# Text that can be encoded as UTF-8 (no lone surrogates).
utf8_text = st.text(alphabet=st.characters(codec="utf-8"))

V1 = Version(1, 1000, "n1")
V2 = Version(2, 2000, "n2")


class Wall:
    """A settable wall clock in milliseconds."""

    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


def precondition_headers(pre: Precondition) -> dict[bytes, bytes]:
    """The If-Match / If-None-Match headers a client sends to express ``pre``."""
    headers = {}
    if pre.match_any:
        headers[b"If-Match"] = b"*"
    elif pre.if_match:
        headers[b"If-Match"] = ", ".join(v.etag() for v in sorted(pre.if_match)).encode()
    if pre.none_match_any:
        headers[b"If-None-Match"] = b"*"
    return headers
