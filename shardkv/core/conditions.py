"""HTTP preconditions (If-Match, If-None-Match) as a pure decision.

A node checks them against its own newest version; a coordinator checks them
against the newest version its read quorum saw. Both use this one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardkv.core.versions import Version, VersionError


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

    def failure(self, current: Version | None) -> str | None:
        """Why the write must not go ahead, or None if it may.

        ``current`` is the live version (None when the key is absent or
        deleted).
        """
        if self.none_match_any and current is not None:
            return f"the key exists (version {current}) and If-None-Match: * was given"
        if self.match_any and current is None:
            return "the key does not exist and If-Match: * was given"
        if self.if_match and current not in self.if_match:
            wanted = ", ".join(sorted(str(v) for v in self.if_match))
            found = str(current) if current is not None else "no version (the key is absent)"
            return f"If-Match wants {wanted} but the key has {found}"
        return None


def parse_etags(header: str) -> tuple[bool, frozenset[Version]]:
    """Parse an If-Match / If-None-Match value: (is ``*``, the listed versions).

    Raises L{VersionError} for a tag that is not one of ours, which the
    routes refuse as invalid input: a tag this system never issued cannot match.
    """
    header = header.strip()
    if header == "*":
        return True, frozenset()
    tags = [t.strip() for t in header.split(",") if t.strip()]
    if not tags:
        raise VersionError("empty entity-tag list")
    versions = set()
    for tag in tags:
        if tag.startswith("W/"):
            tag = tag[2:]
        versions.add(Version.parse(tag))
    return False, frozenset(versions)
