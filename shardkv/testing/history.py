"""A history of client operations, and the checkers run over it.

Fault tests record every operation a client makes as it is invoked and as it
completes, after Jepsen: ``ok`` (it definitely happened), ``fail`` (it
definitely did not) or ``info`` (unknown: a timeout, or a 504). The checkers
then look for what a Dynamo-style store with R + W > N must never do:

- ``lost``: an acknowledged write that is gone, or was overwritten by a
  write that had finished before it started;
- ``fabricated``: a read of a value that no write ever tried to store (or
  that only a definitely failed write tried to store);
- ``stale``: a client read older than its own acknowledged write
  (read-your-writes);
- ``diverged``: replicas that still disagree after the faults stopped.

Values must be unique per key, so that a read names the write it saw.
Times are any monotonic clock, shared by all clients of one history.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True, slots=True)
class Op:
    """One completed operation: invoked at ``start``, answered at ``end``."""

    client: str
    f: str  # "put" or "get"
    key: str
    value: str | None  # put: the value written; get: the value read (None: absent)
    status: str  # "ok", "fail" or "info"
    start: float
    end: float


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)

    def add(self, op: Op) -> None:
        self.ops.append(op)

    def dump(self, path: str) -> None:
        with open(path, "w") as f:
            for op in self.ops:
                f.write(json.dumps(asdict(op)) + "\n")

    @classmethod
    def load(cls, path: str) -> History:
        with open(path) as f:
            return cls([Op(**json.loads(line)) for line in f if line.strip()])

    def writes(self) -> dict[str, list[Op]]:
        by_key: dict[str, list[Op]] = defaultdict(list)
        for op in self.ops:
            if op.f == "put":
                by_key[op.key].append(op)
        return by_key


@dataclass(frozen=True, slots=True)
class Violation:
    kind: str
    key: str
    detail: str


def check_final(history: History, final: Mapping[str, str | None]) -> list[Violation]:
    """Lost acknowledged writes, given the value each key ended with."""
    found = []
    for key, writes in history.writes().items():
        acked = [w for w in writes if w.status == "ok"]
        if not acked:
            continue
        value = final.get(key)
        winner = next((w for w in writes if w.value == value), None)
        if winner is None:
            found.append(Violation("lost", key, f"ends as {value!r}; {len(acked)} writes acked"))
            continue
        later = [a for a in acked if a.start > winner.end]
        if later:
            found.append(
                Violation(
                    "lost",
                    key,
                    f"ends as {value!r} (written by {winner.client} by t={winner.end:.3f}) "
                    f"but {later[-1].value!r} was acked after it, "
                    f"starting at t={later[-1].start:.3f}",
                )
            )
    return found


def check_reads(history: History) -> list[Violation]:
    """Fabricated values and read-your-writes, over every read in the history."""
    writes = history.writes()
    by_value = {(w.key, w.value): w for ws in writes.values() for w in ws}
    found = []
    for op in history.ops:
        if op.f != "get" or op.status != "ok":
            continue
        if op.value is not None:
            source = by_value.get((op.key, op.value))
            if source is None or source.status == "fail" or source.start > op.end:
                found.append(Violation("fabricated", op.key, f"read {op.value!r} by {op.client}"))
                continue
        own = [
            w
            for w in writes.get(op.key, [])
            if w.client == op.client and w.status == "ok" and w.end < op.start
        ]
        if not own:
            continue
        mine = own[-1]
        seen = by_value.get((op.key, op.value)) if op.value is not None else None
        if seen is None or seen.end < mine.start:
            found.append(
                Violation(
                    "stale",
                    op.key,
                    f"{op.client} read {op.value!r} after its own acked write {mine.value!r}",
                )
            )
    return found


def check_convergence(replicas: Mapping[str, Mapping[str, object]]) -> list[Violation]:
    """Replicas (node -> key -> state) that disagree about a key they should share.

    Each node lists the keys it is a home replica for; a key missing on a node
    that lists it as absent (None) counts as a disagreement.
    """
    states: dict[str, dict[str, object]] = defaultdict(dict)
    for node, keys in replicas.items():
        for key, state in keys.items():
            states[key][node] = state
    found = []
    for key, per_node in states.items():
        distinct = {json.dumps(v, sort_keys=True, default=str) for v in per_node.values()}
        if len(distinct) > 1:
            detail = f"{len(distinct)} states on {sorted(per_node)}"
            found.append(Violation("diverged", key, detail))
    return found


def check_all(
    history: History,
    final: Mapping[str, str | None],
    replicas: Mapping[str, Mapping[str, object]] | None = None,
) -> list[Violation]:
    found = check_final(history, final) + check_reads(history)
    if replicas is not None:
        found += check_convergence(replicas)
    return found


def summary(history: History, violations: Iterable[Violation]) -> str:
    counts: dict[str, int] = defaultdict(int)
    for op in history.ops:
        counts[f"{op.f}:{op.status}"] += 1
    by_kind: dict[str, int] = defaultdict(int)
    for v in violations:
        by_kind[v.kind] += 1
    return f"ops {dict(sorted(counts.items()))}; violations {dict(by_kind) or 'none'}"
