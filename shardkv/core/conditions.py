"""HTTP preconditions (If-Match, If-None-Match) as a pure decision.

A node checks them against its own newest version; a coordinator checks them
against the newest version its read quorum saw. Both use this one rule.

Entity tags follow RFC 9110 (section 8.8.3): ``"opaque"`` or ``W/"opaque"``,
the opaque part made of ``etagc`` characters. A well-formed tag that is not a
version of ours is no error: it just matches nothing, so an If-Match naming
only such tags fails with 412, as the RFC's evaluation order says. Only a
header that is not a list of entity tags is invalid input (400). For
convenience a bare version (``1-1700000000000-w``, without quotes, as the
seed API's JSON writes it) is accepted too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shardkv.core.versions import Version, VersionError

_TAG = re.compile(r'(W/)?(?:"([\x21\x23-\x7e\x80-\xff]*)"|([^\s,"]+))')
"""One list element: an entity tag (etagc is %x21 / %x23-7E / obs-text) or a bare token."""
_ETAGC = re.compile(r"[\x21\x23-\x7e\x80-\xff]+")
_OWS = " \t"
_MAX_MESSAGE_TAGS = 200


@dataclass(frozen=True, slots=True)
class Precondition:
    """What a write requires of the key's current live version.

    ``if_match`` holds acceptable versions; ``match_any`` is ``If-Match: *``
    (the key must exist); ``none_match_any`` is ``If-None-Match: *`` (the key
    must not exist, so a PUT only creates).
    """

    if_match: frozenset[Version] = frozenset()
    match_any: bool = False
    none_match_any: bool = False
    other_tags: frozenset[str] = frozenset()
    """Well-formed If-Match tags that are no version of ours: they match nothing."""

    def failure(self, current: Version | None) -> str | None:
        """Why the write must not go ahead, or None if it may.

        ``current`` is the live version (None when the key is absent or
        deleted).
        """
        if self.none_match_any and current is not None:
            return f"the key exists (version {current}) and If-None-Match: * was given"
        if self.match_any and current is None:
            return "the key does not exist and If-Match: * was given"
        if (self.if_match or self.other_tags) and current not in self.if_match:
            wanted = ", ".join([*sorted(str(v) for v in self.if_match), *sorted(self.other_tags)])
            if len(wanted) > _MAX_MESSAGE_TAGS:
                wanted = wanted[:_MAX_MESSAGE_TAGS] + "..."
            found = str(current) if current is not None else "no version (the key is absent)"
            return f"If-Match wants {wanted} but the key has {found}"
        return None


@dataclass(frozen=True, slots=True)
class EntityTags:
    """A parsed If-Match / If-None-Match value."""

    any: bool = False
    """The value was ``*``."""
    versions: frozenset[Version] = frozenset()
    """The listed tags that are versions of ours."""
    others: frozenset[str] = frozenset()
    """The listed tags, as written, that are well-formed but no version of ours."""


def parse_etag(text: str, bare_opaque: bool = False) -> Version | str:
    """One entity tag: our version, or the tag as written when it is well-formed
    but not ours. L{VersionError} when ``text`` is not an entity tag at all.

    A bare (unquoted) token must be one of our versions, unless
    ``bare_opaque``: then it is the opaque part of a tag (the seed API's JSON
    ``"version"`` field writes tags that way) and any ``etagc`` text is a tag.
    """
    match = _TAG.fullmatch(text)
    if match is None:
        raise VersionError(f"not an entity tag: {text[:200]!r}")
    quoted, bare = match[2], match[3]
    if bare is not None:
        if bare_opaque and match[1] is None and _ETAGC.fullmatch(bare):
            try:
                return Version.parse(bare)
            except VersionError:
                return text
        return Version.parse(bare)
    try:
        return Version.parse(quoted)
    except VersionError:
        return text


def parse_etags(header: str) -> EntityTags:
    """Parse an If-Match / If-None-Match value (``*`` or a list of entity tags).

    Raises L{VersionError} for a value that is not such a list; a listed tag
    that is not one of ours lands in ``others`` (it can never match).
    """
    text = header.strip(_OWS)
    if text == "*":
        return EntityTags(any=True)
    versions: set[Version] = set()
    others: set[str] = set()
    i, n = 0, len(text)
    while i < n:
        if text[i] in _OWS or text[i] == ",":
            i += 1
            continue
        match = _TAG.match(text, i)
        if match is None:
            raise VersionError(f"not an entity tag: {text[i : i + 200]!r}")
        i = match.end()
        while i < n and text[i] in _OWS:
            i += 1
        if i < n and text[i] != ",":
            raise VersionError(f"not an entity-tag list: {text[:200]!r}")
        tag = parse_etag(match[0])
        if isinstance(tag, Version):
            versions.add(tag)
        else:
            others.add(tag)
    if not versions and not others:
        raise VersionError("empty entity-tag list")
    return EntityTags(False, frozenset(versions), frozenset(others))
