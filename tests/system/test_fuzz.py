"""
A fuzzer over real sockets: no input may earn a 5xx, every error is JSON, and
no key can be poisoned.

Three nodes and a proxy run as real ``twistd`` processes. Hypothesis builds
requests for every route of the proxy and of a node (the data API, the
replica routes, batches, health, cluster views, unknown paths): random
methods, keys, query strings, headers, bodies, numbers at and past 2^63 and
2^64, non-UTF-8 bytes and odd content types. They go out as raw bytes on
kept-alive sockets, because the package's client would normalise exactly the
inputs worth sending (raw bytes in paths, odd header values).

The requests are well-formed HTTP: what Twisted itself refuses before the
application sees it (a bad request line, bad chunking) is the front door's
business, tested in tests/web/test_site.py. Every answer is recorded rather
than asserted inside Hypothesis, so one run reports every bad answer and no
time goes into shrinking; the generation is seeded (``SHARDKV_FUZZ_SEED``,
printed) so CI is reproducible. Afterwards every key the fuzzer touched, and
fresh ones, must still take writes and reads through the proxy.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from shardkv.client.api import quote_key
from shardkv.client.blocking import BlockingClient
from shardkv.client.blocking import request as send
from shardkv.core.versions import MAX_COUNTER, MAX_FUTURE_MS
from shardkv.replica.codec import MAX_OPS
from shardkv.testing.processes import Proc, ProcessSet
from tests.system.procs import process_set

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SHARDKV_FUZZ_SEED", "20261201"))
SOCKET_TIMEOUT = 10.0
ROUNDS = 5
"""Writes a key may need after the fuzz before the proxy's own write shows (see assert_usable)."""
WALL_BUDGET = 50.0
"""Seconds the whole fuzz may take before the test fails (it runs in about a third)."""

# Requests per family; 5,600 in all. The proxy gets a second round after the
# replica routes, so that it reads and writes keys they may have poisoned.
DATA_VIA_PROXY = 1000
DATA_VIA_PROXY_AFTER = 500
SEED_API = 400
DATA_ON_NODES = 900
REPLICA_ON_NODES = 1400
BATCHES_ON_NODES = 800
ODD_PATHS = 600


# -- what is sent -------------------------------------------------------------

KEYS = ["k0", "k1", "k2", "k3", "k4", "k5", "\u00e9", "a/b", "%", " sp", "\u2603", "?x=1"]
"""A small pool, so that what one request does to a key (a replicated
version near 2^64, an odd content type) meets later reads and writes of it."""

NUMBERS = [
    0,
    1,
    2,
    3,
    10**12,
    MAX_COUNTER - 1,
    MAX_COUNTER,
    MAX_COUNTER + 1,
    MAX_FUTURE_MS,
    MAX_FUTURE_MS + 1_700_000_000_000,
    MAX_FUTURE_MS + 1_900_000_000_000,
    2**64 - 2,
    2**64 - 1,
    2**64,
    10**30,
]

any_bytes = st.binary(max_size=64)
header_text = st.binary(max_size=80).map(
    lambda b: bytes(c for c in b if c >= 0x20 or c == 0x09)  # no CR, LF or NUL in a header
)
numbers = st.one_of(st.sampled_from(NUMBERS), st.integers(min_value=-5, max_value=2**70))
number_text = st.one_of(
    numbers.map(str),
    st.integers(min_value=1, max_value=9).map(lambda n: "9" * (4300 + n)),
    st.sampled_from(["\u00b2", "\u0662", "\uff12", "1.5", "1e3", " 2", "+1", "", "0x10", "NaN"]),
)
writers = st.one_of(
    st.sampled_from(["w", "proxy-8080.abc123", "127.0.0.1:8081", "a b", "\u00e9", "", "w" * 200]),
    st.text(max_size=10),
)
versions = st.one_of(
    st.builds(lambda c, t, w: f"{c}-{t}-{w}", number_text, number_text, writers),
    st.text(max_size=30),
)
good_versions = st.builds(
    lambda c, t, w: f"{c}-{t}-{w}".encode(),
    st.sampled_from(NUMBERS[1:]),
    st.sampled_from(NUMBERS),
    st.sampled_from(["w", "attacker", "proxy-1.a"]),
)
"""Versions that parse, at and around every boundary: what a poisoning write sends."""
content_types = st.one_of(
    st.sampled_from(
        [
            b"text/plain",
            b"application/json",
            b"application/octet-stream",
            b"text/plain; charset=caf\xc3\xa9",
            b"\xff\xfe",
            b"x" * 5000,
            b"",
            b"text/\x7f",
        ]
    ),
    header_text,
)
etags = st.one_of(
    st.sampled_from(
        [
            b"*",
            b'"not-the-version"',
            b'W/"x"',
            b'"1-1-w"',
            b'"unterminated',
            b'"a", junk',
            b"*, *",
            b'"' + b"1" * 5000 + b'-1-w"',
            b'"\xb2-1-w"',
            b"",
        ]
    ),
    versions.map(lambda v: b'"' + v.encode("utf-8", "surrogatepass") + b'"'),
    header_text,
)
keys_text = st.one_of(
    st.sampled_from(KEYS), st.sampled_from(KEYS), st.text(max_size=12), st.just("k" * 1100)
)


def key_segment(key: str) -> bytes:
    return quote(key.encode("utf-8", "surrogatepass"), safe="").encode("ascii")


raw_segment = st.one_of(
    keys_text.map(key_segment),
    any_bytes.map(lambda b: bytes(c for c in b if c > 0x20 and c not in b"?#")),
    st.sampled_from([b"", b"%", b"%zz", b"%ff%fe", b"..", b"%2F", b"/", b"a%00b"]),
)
query_pairs = st.lists(
    st.tuples(
        st.sampled_from([b"key", b"r", b"w", b"sloppy", b"hint_for", b"x", b"key", b"r"]),
        st.one_of(
            number_text.map(lambda t: quote(t.encode("utf-8")).encode("ascii")),
            raw_segment,
        ),
    ),
    max_size=4,
)


def query(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"&".join(k + b"=" + v for k, v in pairs)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    numbers,
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(KEYS),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
seed_bodies = st.fixed_dictionaries(
    {},
    optional={
        "key": st.one_of(st.sampled_from(KEYS), json_values),
        "value": st.one_of(st.text(max_size=30), json_values),
        "version": st.one_of(versions, json_values),
    },
)


def encode_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    st.just(b""),
    any_bytes,
    seed_bodies.map(encode_json),
    json_values.map(encode_json),
    st.integers(min_value=900, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=900, max_value=3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.just(b'{"key": "k0", "value": "v", "version": ' + b"9" * 5000 + b"}"),
    st.just(b'{"key": "\xff\xfe", "value": "v"}'),
    st.just(b'{"key": "k0", "value": "\\ud800"}'),
)
header_names = st.sampled_from(
    [
        b"Content-Type",
        b"If-Match",
        b"If-None-Match",
        b"X-Shardkv-R",
        b"X-Shardkv-W",
        b"X-Shardkv-Sloppy",
        b"X-Shardkv-Version",
        b"X-Shardkv-Tombstone",
        b"Accept",
        b"Authorization",
        b"Transfer-Encoding-Not",
        b"X-Odd",
    ]
)


def header_value(name: bytes) -> st.SearchStrategy[bytes]:
    if name == b"Content-Type":
        return content_types
    if name in (b"If-Match", b"If-None-Match"):
        return etags
    if name == b"X-Shardkv-Version":
        return versions.map(lambda v: v.encode("utf-8", "surrogatepass"))
    if name.startswith(b"X-Shardkv-"):
        return number_text.map(lambda t: t.encode("utf-8"))
    return header_text


headers = st.lists(
    header_names.flatmap(lambda n: header_value(n).map(lambda v: (n, v))), max_size=4
)
methods = st.sampled_from(
    [b"GET", b"GET", b"PUT", b"PUT", b"PUT", b"POST", b"POST", b"DELETE", b"HEAD", b"PATCH"]
)


@dataclass(frozen=True)
class Request:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    def raw(self) -> bytes:
        lines = [self.method + b" " + self.target + b" HTTP/1.1", b"Host: 127.0.0.1"]
        lines += [name + b": " + value for name, value in self.headers]
        lines.append(b"Content-Length: %d" % len(self.body))
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.body


def with_query(path: bytes, pairs: list[tuple[bytes, bytes]]) -> bytes:
    return path + (b"?" + query(pairs) if pairs else b"")


data_paths = st.one_of(
    raw_segment.map(lambda s: b"/kv/" + s),
    st.sampled_from([b"/set", b"/delete", b"/get", b"/kv", b"/kv/", b"/health"]),
    st.sampled_from([b"/get", b"/explain", b"/cluster", b"/"]).flatmap(
        lambda p: keys_text.map(lambda k: p + b"?key=" + key_segment(k))
    ),
)
data_requests = st.builds(
    Request,
    methods,
    st.builds(with_query, data_paths, query_pairs),
    headers,
    bodies,
)


seed_requests = st.builds(
    Request,
    st.sampled_from([b"POST", b"POST", b"POST", b"PUT", b"GET"]),
    st.builds(with_query, st.sampled_from([b"/set", b"/delete"]), query_pairs),
    st.one_of(st.just([(b"Content-Type", b"application/json")]), headers),
    bodies,
)


def record_json() -> st.SearchStrategy[Any]:
    good = {
        "version": st.one_of(
            good_versions.map(bytes.decode), good_versions.map(bytes.decode), versions, json_values
        ),
        "tombstone": st.one_of(st.booleans(), json_values),
        "content_type": st.one_of(
            st.sampled_from(["text/plain", "", "caf\u00e9", "x\x01", "a" * 2000]),
            st.text(max_size=10),
            json_values,
        ),
        "value": st.one_of(
            any_bytes.map(lambda b: base64.b64encode(b).decode("ascii")),
            st.sampled_from(["not base64!", "eA=", "\u00e9"]),
            json_values,
        ),
    }
    return st.one_of(st.fixed_dictionaries({}, optional=good), json_values)


batch_ops = st.one_of(
    st.fixed_dictionaries(
        {"op": st.just("get"), "key": st.one_of(st.sampled_from(KEYS), json_values)}
    ),
    st.fixed_dictionaries(
        {"op": st.just("put"), "key": st.sampled_from(KEYS), "record": record_json()},
        optional={"hint_for": st.one_of(st.sampled_from(["127.0.0.1:1", "0", ""]), json_values)},
    ),
    json_values,
)
batch_bodies = st.one_of(
    st.lists(batch_ops, max_size=6).map(lambda ops: encode_json({"ops": ops})),
    st.just(encode_json({"ops": [{"op": "get", "key": "k0"}] * (MAX_OPS + 1)})),
    bodies,
)
batch_requests = st.builds(
    Request,
    st.sampled_from([b"POST", b"POST", b"POST", b"GET", b"PUT"]),
    st.builds(with_query, st.just(b"/replica/batch"), query_pairs),
    st.just([(b"Content-Type", b"application/json")]),
    batch_bodies,
)
replica_headers = st.lists(
    st.one_of(
        good_versions.map(lambda v: (b"X-Shardkv-Version", v)),
        good_versions.map(lambda v: (b"X-Shardkv-Version", v)),
        versions.map(lambda v: (b"X-Shardkv-Version", v.encode("utf-8", "surrogatepass"))),
        st.sampled_from([b"0", b"1", b"true", b"\xff"]).map(lambda v: (b"X-Shardkv-Tombstone", v)),
        content_types.map(lambda v: (b"Content-Type", v)),
    ),
    max_size=3,
)
replica_requests = st.builds(
    Request,
    st.sampled_from([b"PUT", b"PUT", b"PUT", b"GET", b"GET", b"DELETE", b"POST"]),
    st.builds(
        with_query,
        st.one_of(
            st.sampled_from(KEYS).map(lambda k: b"/replica/kv/" + key_segment(k)),
            st.sampled_from(KEYS).map(lambda k: b"/replica/kv/" + key_segment(k)),
            raw_segment.map(lambda s: b"/replica/kv/" + s),
            st.sampled_from([b"/replica/kv", b"/replica/", b"/replica/members", b"/replica/x"]),
        ),
        query_pairs,
    ),
    replica_headers,
    st.one_of(st.just(b"v"), any_bytes, bodies),
)
odd_paths = st.builds(
    Request,
    methods,
    st.one_of(
        any_bytes.map(lambda b: b"/" + bytes(c for c in b if c > 0x20)),
        st.sampled_from([b"//kv//x", b"/kv/%2e%2e/%2e%2e", b"/cluster/", b"/health?x=\xff"]),
        st.integers(min_value=2000, max_value=8000).map(lambda n: b"/kv/" + b"x" * n),
    ),
    headers,
    bodies,
)


# -- how it is sent -----------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class Connection:
    """One kept-alive HTTP/1.1 connection, opened again when the server closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buffer = None, b""

    def send(self, request: Request) -> Answer:
        for attempt in range(2):
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), SOCKET_TIMEOUT)
            try:
                self.sock.sendall(request.raw())
                answer = self._read(head_only=request.method == b"HEAD")
            except (ConnectionError, EOFError):
                self.close()
                if attempt:
                    raise
                continue
            if answer.headers.get(b"connection", b"").lower() == b"close":
                self.close()
            return answer
        raise AssertionError("unreachable")

    def _fill(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._fill()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def _read(self, head_only: bool) -> Answer:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        found: dict[bytes, bytes] = {}
        for line in lines:
            name, _, value = line.partition(b":")
            found[name.strip().lower()] = value.strip()
        if head_only or status in (204, 304) or 100 <= status < 200:
            return Answer(status, found, b"")
        if b"content-length" in found:
            return Answer(status, found, self._take(int(found[b"content-length"])))
        if found.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                size = int(self._line().split(b";")[0], 16)
                if size == 0:
                    self._line()
                    return Answer(status, found, body)
                body += self._take(size)
                self._take(2)
        body = self.buffer
        try:
            while True:
                self._fill()
        except EOFError:
            body = self.buffer
        self.close()
        return Answer(status, found, body)


@dataclass
class Findings:
    sent: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_family: dict[str, dict[int, int]] = field(default_factory=dict)
    bad: list[str] = field(default_factory=list)

    def check(self, where: str, request: Request, answer: Answer) -> None:
        self.sent += 1
        self.by_status[answer.status] = self.by_status.get(answer.status, 0) + 1
        family = self.by_family.setdefault(where.split(" on ")[0], {})
        family[answer.status] = family.get(answer.status, 0) + 1
        problem = None
        if answer.status >= 500:
            problem = "a 5xx"
        elif answer.status >= 400 and request.method != b"HEAD":
            try:
                payload = json.loads(answer.body)
            except ValueError:
                payload = None
            if not (
                isinstance(payload, dict)
                and isinstance(payload.get("error"), str)
                and isinstance(payload.get("message"), str)
            ):
                problem = "an error that is not {error, message} JSON"
        if problem and len(self.bad) < 20:
            self.bad.append(
                f"{problem} from {where}: {request.raw()[:400]!r}\n"
                f"  -> {answer.status} {answer.body[:300]!r}"
            )


@dataclass
class Cluster:
    proxy: Proc
    nodes: list[Proc]
    procs: ProcessSet


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("fuzz")
    glue = process_set(request, root)  # a generator: close() stops every process
    procs = next(glue)
    try:
        nodes = [
            procs.start_node(None, root / f"n{i}", "--durability", "os", name=f"node{i}")
            for i in range(3)
        ]
        proxy = procs.start_proxy(None, nodes)
        yield Cluster(proxy, nodes, procs)
    finally:
        cast(Generator[ProcessSet, None, None], glue).close()


def fuzz(
    name: str,
    strategy: st.SearchStrategy[Request],
    examples: int,
    connections: list[Connection],
    findings: Findings,
) -> None:
    """Send ``examples`` requests drawn from ``strategy``, spread over ``connections``."""
    turn = [0]

    @seed(SEED)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def run(req: Request) -> None:
        conn = connections[turn[0] % len(connections)]
        turn[0] += 1
        findings.check(f"{name} on :{conn.port}", req, conn.send(req))

    run()


def test_fuzz_every_route(cluster: Cluster) -> None:
    """
    Over 5,000 requests to the proxy and the nodes: not one answer of 500 or
    more, and every error is ``{"error", "message"}`` JSON.
    """
    print(f"\nfuzz seed {SEED} (set SHARDKV_FUZZ_SEED to change it)")
    findings = Findings()
    proxy = [Connection(cluster.proxy.port or 0)]
    nodes = [Connection(n.port or 0) for n in cluster.nodes]
    started = time.monotonic()
    try:
        fuzz("data API", data_requests, DATA_VIA_PROXY, proxy, findings)
        fuzz("seed API", seed_requests, SEED_API, [*proxy, *nodes], findings)
        fuzz("data API", data_requests, DATA_ON_NODES, nodes, findings)
        fuzz("replica route", replica_requests, REPLICA_ON_NODES, nodes, findings)
        fuzz("batch route", batch_requests, BATCHES_ON_NODES, nodes, findings)
        fuzz("data API, again", data_requests, DATA_VIA_PROXY_AFTER, proxy, findings)
        fuzz("odd path", odd_paths, ODD_PATHS, [*proxy, *nodes], findings)
    finally:
        for conn in [*proxy, *nodes]:
            conn.close()
    took = time.monotonic() - started
    statuses = sorted(findings.by_status.items())
    print(f"fuzz: {findings.sent} requests in {took:.1f} s; statuses {statuses}")
    for family, counts in findings.by_family.items():
        print(f"  {family}: {sorted(counts.items())}")
    assert not findings.bad, "\n".join(findings.bad)
    assert findings.sent >= 5000
    assert took < WALL_BUDGET
    for proc in [cluster.proxy, *cluster.nodes]:
        log = proc.log_path.read_text("utf-8", "replace")
        for sign in ["Unhandled error", "Unhandled Error", "unexpected error handling"]:
            assert sign not in log, f"{proc.name}: {sign!r} in its log\n{proc.tail()}"
    assert_usable(cluster, [*KEYS, *(f"fresh-{i}" for i in range(20))])


def assert_usable(cluster: Cluster, keys: list[str]) -> None:
    """Every key takes writes, reads, a seed-API write and a delete through the proxy.

    A fuzzed replica write may have left one replica with a version newer
    than the other two (the replica routes trust their caller; the cluster
    token guards them). A proxy write that read the other two then loses to
    it, as any write that raced a newer one does; the read after it repairs
    the replicas, so within a few rounds the proxy's own write must win.
    That read asks all three replicas (``?r=3``): a default read asks the
    first R and, one time in ten at random, all N (the coordinator's
    ``READ_ALL_FRACTION``), so it could miss the one replica that holds the
    newer version until a later read, after the delete, met it.
    Poisoned, a key would instead answer 5xx or never take a write.
    """
    with BlockingClient(cluster.proxy.url) as kv:
        for key in keys:
            for round_ in range(ROUNDS):
                value = b"after-%d" % round_
                kv.put(key, value, content_type="text/plain").expect(200, 201)
                got = send("GET", f"{cluster.proxy.url}/kv/{quote_key(key)}?r=3").expect(200)
                if (got.body, got.header("content-type")) == (value, "text/plain"):
                    break
            else:
                raise AssertionError(f"{key!r}: {ROUNDS} writes through the proxy never showed")
            kv.set(key, "again").expect(200)
            kv.delete(key).expect(200)
            kv.read(key).expect(404)


def test_the_poisoning_inputs_are_refused_and_leave_the_key_usable(cluster: Cluster) -> None:
    """
    The reproductions: a replicated version at 2^64 - 1 and a non-ASCII
    content type sent straight to a node are 400s, and the key stays
    readable and writable through the proxy; so does a key pushed to the
    cap on every replica, or on one replica only (the others, far behind,
    must still take the writes minted from it).
    """
    conns = [Connection(n.port or 0) for n in cluster.nodes]
    try:
        for conn in conns:
            for version, ctype in [
                (b"%d-1-attacker" % (2**64 - 1), b"text/plain"),
                (b"%d-1-attacker" % (MAX_COUNTER + 1), b"text/plain"),
                (b"5-5-x", "caf\u00e9".encode()),
            ]:
                req = Request(
                    b"PUT",
                    b"/replica/kv/victim",
                    [(b"X-Shardkv-Version", version), (b"Content-Type", ctype)],
                    b"evil",
                )
                answer = conn.send(req)
                assert answer.status == 400, (req, answer)
                assert json.loads(answer.body)["error"] in ("invalid_version", "bad_request")
            at_cap = b"%d-%d-zzz" % (MAX_COUNTER, int(time.time() * 1000) + MAX_FUTURE_MS // 2)
            pinned = Request(b"PUT", b"/replica/kv/pinned", [(b"X-Shardkv-Version", at_cap)])
            assert conn.send(pinned).status == 200
            behind = Request(b"PUT", b"/replica/kv/behind", [(b"X-Shardkv-Version", at_cap)])
            if conn is conns[0]:
                assert conn.send(behind).status == 200
    finally:
        for conn in conns:
            conn.close()
    assert_usable(cluster, ["victim", "pinned", "behind"])


def test_an_asterisk_target_is_answered_in_json(cluster: Cluster) -> None:
    """``GET * HTTP/1.1`` is well-formed HTTP; its error should be JSON like every other."""
    conn = Connection(cluster.proxy.port or 0)
    try:
        answer = conn.send(Request(b"GET", b"*"))
    finally:
        conn.close()
    assert answer.status == 405
    assert set(json.loads(answer.body)) >= {"error", "message"}
