"""A load generator for fault tests that records every operation in a History.

Client threads send requests one at a time (one request per connection at a
time and none retried, so a failure belongs to exactly one request;
L{shardkv.client.blocking} tells a request that never left from one that may
have arrived) and record each operation with its
invocation and completion times from ``time.monotonic()``, after Jepsen:

- ``ok``: a 2xx answer; a GET of 404 is an ok read of "absent";
- ``fail``: the request definitely did not happen: a 4xx answer, a 503 whose
  body says ``"outcome": "not_applied"``, or no connection to the proxy at all
  (refused, or a connect that never completed, so nothing was sent);
- ``info``: the outcome is unknown: a 504, any other 5xx (a 503 with
  ``"outcome": "unknown"`` or with no outcome at all), or a socket timeout or
  reset after the request was sent.

Writes store unique values (``f"{client}-{seq}"``), so a read names the write
it saw. The L{Workload} runs N such clients at a target rate against a set of
keys, mixes GETs in, and stops by itself after a number of writes or seconds
(or when told to). Everything is synchronous (threads over
L{shardkv.client.blocking}), so it runs from plain pytest functions next to
L{shardkv.testing.processes}.

Typical use::

    recorder = Recorder()
    config = WorkloadConfig(urls=[proxy.url], keys=keys, write_rate=200, duration=30)
    with Workload(config, recorder) as load:
        ...  # inject faults while the load runs
        load.stop()
    recorder.dump(tmp_path / "history.jsonl")
    print(recorder.summary())
"""

from __future__ import annotations

import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from shardkv.client import blocking
from shardkv.client.api import NotSent, Reply
from shardkv.client.blocking import BlockingClient
from shardkv.testing.history import History, Op

Api = Literal["set", "kv"]
Status = Literal["ok", "fail", "info"]


# -- classification ----------------------------------------------------------------


def classify_write(status: int, body: bytes) -> Status:
    """What an HTTP answer to a write says about whether it was applied."""
    if 200 <= status < 300:
        return "ok"
    if 400 <= status < 500:
        return "fail"
    if status == 503 and _outcome(body) == "not_applied":
        return "fail"
    return "info"


def classify_read(status: int) -> Status:
    if 200 <= status < 300 or status == 404:
        return "ok"
    if 400 <= status < 500:
        return "fail"
    if status == 503:
        return "fail"  # a read has no effect: a refused read simply did not happen
    return "info"


def _outcome(body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    outcome = payload.get("outcome") if isinstance(payload, dict) else None
    return outcome if isinstance(outcome, str) else None


# -- recording ---------------------------------------------------------------------


@dataclass(frozen=True)
class Note:
    """What an operation's Op does not say: where it went and what came back."""

    url: str
    http: int | None
    detail: str


@dataclass
class Recorder:
    """A History shared by client threads, plus a note per operation for debugging."""

    history: History = field(default_factory=History)
    notes: list[Note] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, op: Op, note: Note) -> None:
        with self.lock:
            self.history.add(op)
            self.notes.append(note)

    def snapshot(self) -> list[tuple[Op, Note]]:
        with self.lock:
            return list(zip(self.history.ops, self.notes, strict=True))

    def dump(self, path: str | Path) -> Path:
        """Write the history as JSON lines (each Op plus its note)."""
        path = Path(path)
        with path.open("w") as f:
            for op, note in self.snapshot():
                f.write(json.dumps({**asdict(op), **asdict(note)}) + "\n")
        return path

    def writes(self) -> list[Op]:
        with self.lock:
            return [op for op in self.history.ops if op.f == "put"]

    def counts(self) -> Counter[str]:
        with self.lock:
            return Counter(f"{op.f}:{op.status}" for op in self.history.ops)

    def write_success(self) -> float:
        """ok writes / all writes (1.0 with no writes)."""
        writes = self.writes()
        if not writes:
            return 1.0
        return sum(1 for w in writes if w.status == "ok") / len(writes)

    def write_latencies(self) -> list[float]:
        """Seconds from invocation to answer of every ok write."""
        return [w.end - w.start for w in self.writes() if w.status == "ok"]

    def last_acked(self) -> dict[str, Op]:
        """Per key, the ok write that was invoked last."""
        last: dict[str, Op] = {}
        for w in self.writes():
            if w.status == "ok" and (w.key not in last or w.start > last[w.key].start):
                last[w.key] = w
        return last


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by the nearest-rank method; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


# -- a client session ---------------------------------------------------------------


class Client:
    """One client: sequential requests, each recorded in a Recorder.

    ``api="set"`` writes with ``POST /set`` and reads with ``GET /get?key=``;
    ``api="kv"`` uses ``PUT`` and ``GET /kv/{key}``.
    """

    def __init__(
        self,
        name: str,
        recorder: Recorder,
        url: str,
        *,
        api: Api = "set",
        timeout: float = 5.0,
        http: BlockingClient | None = None,
    ) -> None:
        self.name = name
        self.recorder = recorder
        self.url = url
        self.api = api
        self.timeout = timeout
        self.http = blocking.shared() if http is None else http
        """Sends the requests (default: the shared client, a connection per request)."""
        self.seq = 0

    def next_value(self) -> str:
        self.seq += 1
        return f"{self.name}-{self.seq}"

    def put(self, key: str, value: str | None = None, url: str | None = None) -> Op:
        """Write ``value`` (default: a fresh unique one) to ``key``; the recorded Op."""
        value = self.next_value() if value is None else value
        url = url or self.url
        new = value
        start = time.monotonic()
        http_status: int | None = None
        answer, status, detail = self._send(
            url,
            lambda kv: (
                kv.set(key, new)
                if self.api == "set"
                else kv.put(key, new, content_type="text/plain; charset=utf-8")
            ),
        )
        if answer is not None:
            http_status = answer.status
            status = classify_write(answer.status, answer.body)
            detail = answer.body[:300].decode("utf-8", "replace").strip()
        op = Op(self.name, "put", key, value, status, start, time.monotonic())
        self.recorder.add(op, Note(url, http_status, detail))
        return op

    def get(self, key: str, url: str | None = None) -> Op:
        """Read ``key``; the recorded Op (value None: absent, or not known)."""
        url = url or self.url
        start = time.monotonic()
        http_status: int | None = None
        value: str | None = None
        answer, status, detail = self._send(
            url, lambda kv: kv.get(key) if self.api == "set" else kv.read(key)
        )
        if answer is not None:
            http_status = answer.status
            status = classify_read(answer.status)
            detail = "" if answer.status == 200 else answer.body[:300].decode("utf-8", "replace")
            if answer.status == 200:
                try:
                    value = self._read_value(answer.body)
                except ValueError as e:
                    status, detail = "info", f"unreadable answer: {e}"
        op = Op(self.name, "get", key, value, status, start, time.monotonic())
        self.recorder.add(op, Note(url, http_status, detail.strip()))
        return op

    def _send(
        self, url: str, call: Callable[[BlockingClient], Reply]
    ) -> tuple[Reply | None, Status, str]:
        """The answer, or why there is none: "fail" if the request was surely
        not sent, "info" if it may have been."""
        try:
            return call(self.http.at(url, timeout=self.timeout)), "ok", ""
        except NotSent as e:
            return None, "fail", f"not sent: {e}"
        except OSError as e:  # MaybeSent, or no hand-off from the client thread
            return None, "info", f"{type(e).__name__}: {e}"

    def _read_value(self, body: bytes) -> str:
        if self.api == "kv":
            return body.decode("utf-8")
        payload: Any = json.loads(body)
        value = payload.get("value") if isinstance(payload, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"no string value in {body[:200]!r}")
        return value


# -- the load generator --------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadConfig:
    """What to run: ``clients`` threads share ``write_rate`` writes per second.

    Each client sends one operation per tick: a GET with probability
    ``read_fraction``, else a PUT of a unique value to a random key. Client
    ``i`` talks to ``urls[i % len(urls)]``. The run stops after
    ``max_writes`` writes were invoked, after ``duration`` seconds, or when
    L{Workload.stop} is called, whichever comes first.
    """

    urls: Sequence[str]
    keys: Sequence[str]
    clients: int = 8
    write_rate: float = 200.0
    read_fraction: float = 0.2
    duration: float = 30.0
    max_writes: int = 100_000
    api: Api = "set"
    timeout: float = 5.0
    seed: int = 0
    name: str = "c"

    def __post_init__(self) -> None:
        if not self.urls or not self.keys:
            raise ValueError("a workload needs at least one URL and one key")
        if self.clients < 1 or self.write_rate <= 0 or not 0 <= self.read_fraction < 1:
            raise ValueError(f"bad workload settings: {self}")


class Workload:
    """Runs a L{WorkloadConfig} in background threads; a context manager.

    Leaving the ``with`` block stops the clients and waits for them, so no
    thread outlives the test that started it.
    """

    def __init__(self, config: WorkloadConfig, recorder: Recorder | None = None) -> None:
        self.config = config
        self.recorder = recorder if recorder is not None else Recorder()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._writes_invoked = 0
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.started: float | None = None
        self.stopped: float | None = None
        self._end: float | None = None
        self._http: BlockingClient | None = None
        """The clients' shared HTTP: one private reactor thread and kept-alive
        connections (each carries one request at a time and none is retried,
        so a failure still belongs to exactly one request; a connection the
        server dropped between requests can only turn a "fail" into an "info").
        Connecting afresh each time costs the client ~60 % more CPU, which on a
        small box shows in the servers' latencies."""

    def __enter__(self) -> Workload:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self.join()

    def start(self) -> None:
        if self._threads:
            raise RuntimeError("this workload was already started")
        self._http = BlockingClient(self.config.urls[0], timeout=self.config.timeout)
        self.started = time.monotonic()
        for i in range(self.config.clients):
            t = threading.Thread(target=self._run, args=(i,), name=f"workload-{i}", daemon=True)
            self._threads.append(t)
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()

    def end_at(self, when: float) -> None:
        """Move the end of the run to ``when`` (a ``time.monotonic()`` value)."""
        with self._lock:
            self._end = when

    def end(self) -> float:
        """When the run ends by itself (``time.monotonic()``)."""
        with self._lock:
            if self._end is not None:
                return self._end
        assert self.started is not None
        return self.started + self.config.duration

    def join(self, timeout: float | None = None) -> None:
        """Wait for every client to finish its current request and exit.

        Without ``timeout``, wait until the run's end (now, if it was
        stopped) plus one request timeout and some slack.
        """
        if timeout is None:
            end = time.monotonic() if self._stop.is_set() else self.end()
            deadline = max(end, time.monotonic()) + self.config.timeout + 5.0
        else:
            deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            raise TimeoutError("workload clients did not stop")
        if self._http is not None:
            self._http.close()
        if self.stopped is None:
            self.stopped = time.monotonic()
        if self._errors:
            raise RuntimeError("a workload client crashed") from self._errors[0]

    def done(self) -> bool:
        return bool(self._threads) and not any(t.is_alive() for t in self._threads)

    @property
    def writes_invoked(self) -> int:
        with self._lock:
            return self._writes_invoked

    def _claim_write(self) -> bool:
        with self._lock:
            if self._writes_invoked >= self.config.max_writes:
                return False
            self._writes_invoked += 1
            return True

    def _run(self, index: int) -> None:
        try:
            self._client_loop(index)
        except BaseException as e:  # reported by join()
            self._errors.append(e)
            self._stop.set()

    def _client_loop(self, index: int) -> None:
        cfg = self.config
        assert self.started is not None
        rng = random.Random(f"{cfg.seed}:{index}")
        client = Client(
            f"{cfg.name}{index}",
            self.recorder,
            cfg.urls[index % len(cfg.urls)],
            api=cfg.api,
            timeout=cfg.timeout,
            http=self._http,
        )
        ops_per_second = cfg.write_rate / (1.0 - cfg.read_fraction) / cfg.clients
        interval = 1.0 / ops_per_second
        # Spread the clients' first ticks over one interval.
        next_tick = self.started + interval * index / cfg.clients
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= self.end():
                return
            # Pacing the rate, not synchronising: wake early on stop().
            if next_tick > now and self._stop.wait(next_tick - now):
                return
            next_tick = max(next_tick + interval, time.monotonic() - interval)
            key = cfg.keys[rng.randrange(len(cfg.keys))]
            if rng.random() < cfg.read_fraction:
                client.get(key)
            elif self._claim_write():
                client.put(key)
            else:
                return
