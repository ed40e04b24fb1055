"""
Tests for L{shardkv.core.conditions}: If-Match / If-None-Match as a pure
decision, and the entity-tag lists a proxy forwards to a node.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from shardkv.core.conditions import Precondition, parse_etags
from shardkv.core.versions import Version, VersionError
from tests.core.helpers import PROPERTY, V1, V2, precondition_headers, versions

_CURRENT = {"absent": None, "v1": V1, "v2": V2}
_PRECONDITIONS = {
    "none": Precondition(),
    "match *": Precondition(match_any=True),
    "none-match *": Precondition(none_match_any=True),
    "match v1": Precondition(if_match=frozenset([V1])),
    "match v1,v2": Precondition(if_match=frozenset([V2, V1])),
}


@pytest.mark.parametrize(
    ("pre", "current", "failure"),
    [
        ("none", "absent", None),
        ("none", "v1", None),
        ("match *", "absent", "the key does not exist and If-Match: * was given"),
        ("match *", "v1", None),
        ("none-match *", "absent", None),
        (
            "none-match *",
            "v1",
            "the key exists (version 1-1000-n1) and If-None-Match: * was given",
        ),
        ("match v1", "v1", None),
        ("match v1", "v2", "If-Match wants 1-1000-n1 but the key has 2-2000-n2"),
        (
            "match v1",
            "absent",
            "If-Match wants 1-1000-n1 but the key has no version (the key is absent)",
        ),
        ("match v1,v2", "v1", None),
        ("match v1,v2", "v2", None),
        (
            "match v1,v2",
            "absent",
            "If-Match wants 1-1000-n1, 2-2000-n2 but the key has no version (the key is absent)",
        ),
    ],
)
def test_precondition_failure(pre: str, current: str, failure: str | None) -> None:
    assert _PRECONDITIONS[pre].failure(_CURRENT[current]) == failure


@pytest.mark.parametrize(
    ("pre", "headers"),
    [
        ("none", {}),
        ("match *", {b"If-Match": b"*"}),
        ("none-match *", {b"If-None-Match": b"*"}),
        ("match v1", {b"If-Match": b'"1-1000-n1"'}),
        ("match v1,v2", {b"If-Match": b'"1-1000-n1", "2-2000-n2"'}),
    ],
)
def test_precondition_header_values(pre: str, headers: dict[bytes, bytes]) -> None:
    assert precondition_headers(_PRECONDITIONS[pre]) == headers


@pytest.mark.parametrize(
    ("header", "star", "tags"),
    [
        ("*", True, set()),
        ("  *  ", True, set()),
        ('"1-1000-n1"', False, {V1}),
        ("1-1000-n1", False, {V1}),
        ('W/"1-1000-n1"', False, {V1}),
        ('"1-1000-n1", "2-2000-n2"', False, {V1, V2}),
        ('"1-1000-n1","2-2000-n2"', False, {V1, V2}),
        (' "1-1000-n1" ,, W/"2-2000-n2" ', False, {V1, V2}),
        ('"1-1000-n1", "1-1000-n1"', False, {V1}),
    ],
)
def test_parse_etags(header: str, star: bool, tags: set[Version]) -> None:
    assert parse_etags(header) == (star, frozenset(tags))


@pytest.mark.parametrize(
    "header",
    ["", "  ", ",", " , ", "garbage", '"1-1000"', '"*"', '*, "1-1000-n1"', '"1-1000-n1", junk'],
)
def test_parse_etags_rejects(header: str) -> None:
    with pytest.raises(VersionError):
        parse_etags(header)


@PROPERTY
@given(st.frozensets(versions, min_size=1, max_size=5))
def test_forwarded_if_match_parses_back(tags: frozenset[Version]) -> None:
    """An If-Match listing several of our ETags parses back to those versions."""
    header = precondition_headers(Precondition(if_match=tags))[b"If-Match"]
    assert parse_etags(header.decode("latin-1")) == (False, tags)


@PROPERTY
@given(versions, st.one_of(st.none(), versions))
def test_if_match_passes_only_for_the_current_version(
    tag: Version, current: Version | None
) -> None:
    assume(current is None or current != tag)
    pre = Precondition(if_match=frozenset([tag]))
    assert pre.failure(tag) is None
    assert pre.failure(current) is not None
