"""
Tests for L{shardkv.core.conditions}: If-Match / If-None-Match as a pure
decision, and the entity-tag lists a proxy forwards to a node.
"""

from __future__ import annotations

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from shardkv.core.conditions import EntityTags, Precondition, parse_etag, parse_etags
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
    assert parse_etags(header) == EntityTags(star, frozenset(tags))


@pytest.mark.parametrize(
    ("header", "tags", "others"),
    [
        ('"not-the-version"', set(), {'"not-the-version"'}),
        ('"1-1000"', set(), {'"1-1000"'}),
        ('"*"', set(), {'"*"'}),
        ('""', set(), {'""'}),
        ('W/"x"', set(), {'W/"x"'}),
        ('"a,b", "1-1000-n1"', {V1}, {'"a,b"'}),
        ('"\xb2-1-w"', set(), {'"\xb2-1-w"'}),
        ('"' + "1" * 5000 + '-0-w"', set(), {'"' + "1" * 5000 + '-0-w"'}),
        ('"18446744073709551615-1-w"', {Version(2**64 - 1, 1, "w")}, set()),
    ],
)
def test_well_formed_tags_that_are_not_ours_match_nothing(
    header: str, tags: set[Version], others: set[str]
) -> None:
    """
    RFC 9110: If-Match lists entity tags, ``"..."`` or ``W/"..."`` of etagc
    characters (commas and obs-text included). One this system never issued
    is no error; it is kept apart and can never match, so the write answers
    412 rather than 400.
    """
    parsed = parse_etags(header)
    assert parsed == EntityTags(False, frozenset(tags), frozenset(others))
    pre = Precondition(if_match=parsed.versions, other_tags=parsed.others)
    if not tags:
        assert pre.failure(V1) is not None
        assert pre.failure(None) is not None


@pytest.mark.parametrize(
    "header",
    [
        "",
        "  ",
        ",",
        " , ",
        "garbage",
        '*, "1-1000-n1"',
        '"1-1000-n1", junk',
        '"unterminated',
        '"a" "b"',
        '"a"b',
        '"with space"',
        '"ctl\x01"',
        "W/",
        '"\u0100"',
    ],
)
def test_parse_etags_rejects(header: str) -> None:
    """Only a value that is not a list of entity tags (or our bare versions) is invalid."""
    with pytest.raises(VersionError):
        parse_etags(header)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("1-1000-n1", V1),
        ('"1-1000-n1"', V1),
        ("not-the-version", "not-the-version"),
        ('"quoted"', '"quoted"'),
        ("\xb2-1-w", "\xb2-1-w"),
    ],
)
def test_a_json_version_field_is_an_opaque_tag(text: str, parsed: Version | str) -> None:
    """
    The seed API writes versions bare in JSON; there any etagc text is a
    tag (never ours unless it parses), while in a header a bare token must
    be one of our versions.
    """
    assert parse_etag(text, bare_opaque=True) == parsed


@pytest.mark.parametrize("text", ["", "a b", 'a"b', "\u0100", "W/x", "tab\t"])
def test_a_json_version_field_that_is_no_tag_is_invalid(text: str) -> None:
    with pytest.raises(VersionError):
        parse_etag(text, bare_opaque=True)


def test_a_foreign_tag_names_itself_in_the_failure() -> None:
    pre = Precondition(if_match=frozenset([V2]), other_tags=frozenset(['"x"']))
    assert pre.failure(V1) == f'If-Match wants {V2}, "x" but the key has {V1}'
    assert pre.failure(V2) is None
    huge = Precondition(other_tags=frozenset(['"' + "y" * 5000 + '"']))
    reason = huge.failure(V1)
    assert reason is not None and len(reason) < 300


@PROPERTY
@given(st.frozensets(versions, min_size=1, max_size=5))
def test_forwarded_if_match_parses_back(tags: frozenset[Version]) -> None:
    """An If-Match listing several of our ETags parses back to those versions."""
    header = precondition_headers(Precondition(if_match=tags))[b"If-Match"]
    assert parse_etags(header.decode("latin-1")) == EntityTags(False, tags)


@PROPERTY
@given(versions, st.one_of(st.none(), versions))
def test_if_match_passes_only_for_the_current_version(
    tag: Version, current: Version | None
) -> None:
    assume(current is None or current != tag)
    pre = Precondition(if_match=frozenset([tag]))
    assert pre.failure(tag) is None
    assert pre.failure(current) is not None
