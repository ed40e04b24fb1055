"""Versions: the order in which writes to one key win.

A version is ``(counter, clock_ms, writer)``, compared as a tuple.

- ``counter`` is a per-key logical counter. A writer reads the newest version it
  can see and writes ``counter + 1``. A write that starts after another write
  was acknowledged therefore always carries a larger counter (as long as the
  writer saw the acknowledged version, which quorum reads with R + W > N
  guarantee), whatever the machines' clocks say. Plain wall-clock
  last-write-wins loses such writes under clock skew (Jepsen: Cassandra, Riak).
- ``clock_ms`` is the writer's wall clock. It only breaks ties between
  *concurrent* writes that minted the same counter, so that the write that
  happened later in wall time usually wins.
- ``writer`` identifies who minted the version (a node or proxy id plus a
  per-process incarnation). It makes the order total, so every replica picks
  the same winner between concurrent writes.

One writer never mints the same ``(counter, clock_ms)`` twice: L{VersionClock}
keeps its clock strictly increasing.

Range. The record format holds two unsigned 64-bit numbers, but a node refuses
a replicated version whose counter is above L{MAX_COUNTER} (2^63) or whose
clock is more than L{MAX_FUTURE_MS} ahead of its own (L{check_incoming}).
Why: every write mints ``counter + 1``, so a version at the format's top would
leave the key unwritable (nothing newer could be minted), and read repair
would spread it to every replica. An honest counter grows by one per write and
never gets near 2^63. A key that someone pushed to the cap stays writable: at
the cap the counter stops growing and the clock decides, so L{VersionClock}
mints ``(MAX_COUNTER, seen.clock_ms + 1)`` or later, which every replica takes
(however far behind it is) because the entry check bounds the clock by each
node's own time, not by a fixed number that could be reached.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

_WRITER = re.compile(r"^[A-Za-z0-9_.:\-]{1,128}$")
_TEXT = re.compile(r"^([0-9]{1,20})-([0-9]{1,20})-(.*)$", re.ASCII)
_U64 = 1 << 64

MAX_COUNTER = 1 << 63
"""The largest counter a node takes from another process, and where minting stops counting."""
MAX_FUTURE_MS = 1 << 40
"""How far ahead of a node's clock a replicated version's clock may be (about 35 years)."""


@functools.lru_cache(maxsize=4096)
def _valid_writer(writer: str) -> bool:
    """Cached: a store sees few distinct writers, and every read builds versions."""
    return _WRITER.match(writer) is not None


class VersionError(ValueError):
    """A version string that does not parse."""


@dataclass(frozen=True, order=True, slots=True)
class Version:
    counter: int
    clock_ms: int
    writer: str

    def __post_init__(self) -> None:
        in_range = 1 <= self.counter < _U64 and 0 <= self.clock_ms < _U64
        if not in_range or not _valid_writer(self.writer):
            raise VersionError(f"not a valid version: {self!r}")

    def __str__(self) -> str:
        return f"{self.counter}-{self.clock_ms}-{self.writer}"

    def etag(self) -> str:
        """The version as a strong HTTP entity tag (quoted)."""
        return f'"{self}"'

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``str(version)``; quotes from an ETag are accepted."""
        text = text.strip()
        if len(text) >= 2 and text[0] == text[-1] == '"':
            text = text[1:-1]
        match = _TEXT.match(text)
        if match is None:
            raise VersionError(f"not a version: {text[:200]!r}")
        try:
            return cls(int(match[1]), int(match[2]), match[3])
        except VersionError:
            raise VersionError(f"not a version: {text[:200]!r}") from None


def check_incoming(version: Version, now_ms: int) -> Version:
    """``version`` if a node whose clock reads ``now_ms`` may store it, else L{VersionError}.

    Used where a node takes replicated records (replica writes, batch puts,
    hints), not for If-Match tags, which are only compared.
    """
    if version.counter > MAX_COUNTER:
        raise VersionError(f"version {version} is out of range: the counter may be at most 2^63")
    if version.clock_ms > max(now_ms, 0) + MAX_FUTURE_MS:
        raise VersionError(
            f"version {version} is out of range: its clock is more than 2^40 ms ahead of ours"
        )
    return version


class VersionClock:
    """Mints versions for one writer.

    The wall clock is injected (milliseconds) so that tests can skew it; the
    clock this class uses never goes backwards even when the wall clock does.
    """

    def __init__(self, writer: str, now_ms: Callable[[], int]) -> None:
        if not _WRITER.match(writer):
            raise VersionError(f"not a valid writer id: {writer!r}")
        self.writer = writer
        self._now_ms = now_ms
        self._last_ms = -1

    def mint(self, seen: Version | None) -> Version:
        """A version that is newer than ``seen`` and than anything minted before.

        At L{MAX_COUNTER} the counter stays and the clock moves past
        ``seen``'s instead, so a version that passed L{check_incoming} always
        has a successor that passes it too. Raises L{VersionError} only for a
        ``seen`` no node takes (a counter over the cap, or a clock at the
        format's top), which can only come from data stored before the check.
        """
        ms = max(self._now_ms(), self._last_ms + 1, 0)
        if seen is None:
            counter = 1
        elif seen.counter < MAX_COUNTER:
            counter = seen.counter + 1
        else:
            counter = seen.counter
            ms = max(ms, seen.clock_ms + 1)
        self._last_ms = ms
        return Version(counter, ms, self.writer)

    def mint_after(self, counter: int | None) -> Version:
        """A version with counter ``counter + 1`` (1 for None), newer than anything
        minted before: a tentative version from a counter alone (L{SeenCounters}).
        ``counter`` must be below L{MAX_COUNTER}, where L{mint} needs the clock too."""
        ms = max(self._now_ms(), self._last_ms + 1, 0)
        self._last_ms = ms
        return Version(1 if counter is None else counter + 1, ms, self.writer)


class SeenCounters:
    """The newest version counter a proxy saw for each key, for tentative versions.

    A one-round write (L{shardkv.proxy.coordinator}) mints one past the counter
    seen here, so that a key this proxy read or wrote lately takes one round;
    a key it never saw starts at counter 1 and learns the real one from the
    replicas' refusals. A wrong guess costs a round, never correctness (the
    replicas decide what is newer), so the cache may forget freely.

    Bounded, two generations of plain dicts: a key goes into the young one;
    when that holds ``size / 2`` keys it becomes the old one and the oldest
    generation is dropped. Lookups read both. Every operation is O(1) (a dict
    used as a FIFO slows down as deleted entries pile up at its front, and an
    OrderedDict costs twice as much per operation). Memory: at most ``size``
    keys, about 150 bytes each on CPython (the key's string, an int, dict slots),
    so the default 100,000 keys hold some 15 MB. Counters at L{MAX_COUNTER} are
    not kept (minting there needs the clock too); such a key learns it from a
    refusal.
    """

    __slots__ = ("_half", "_old", "_young")

    def __init__(self, size: int = 100_000) -> None:
        self._half = max(1, size // 2)
        self._young: dict[str, int] = {}
        self._old: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._young) + len(self._old)

    def get(self, key: str) -> int | None:
        counter = self._young.get(key)
        return counter if counter is not None else self._old.get(key)

    def saw(self, key: str, version: Version) -> None:
        """Note ``version`` of ``key`` (kept if newer than what is noted)."""
        counter = version.counter
        if counter >= MAX_COUNTER:
            return
        young = self._young
        known = young.get(key)
        if known is None:
            known = self._old.get(key)
        if known is not None and known >= counter:
            if key in young:
                return
            counter = known
        young[key] = counter
        if len(young) >= self._half:
            self._old, self._young = young, {}
