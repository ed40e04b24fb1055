"""shardkv's benchmark: one command, a real cluster, paired rounds.

    python bench/run.py                  # proxy mode: GET/SET, direct node vs proxied
    python bench/run.py --replicas 1 --r 1 --w 1   # the same with one copy per key
    python bench/run.py storage          # PUT throughput, memory vs lmdb --durability always
    python bench/run.py replication      # GET/SET through an N=1 proxy vs an N=3 proxy
    python bench/run.py --help

Proxy mode starts three ``twistd -n shardkv node --storage memory`` processes
and one ``twistd -n shardkv proxy`` on free loopback ports (never 8080-8083),
preloads keys through the proxy, then runs wrk in rounds. Each round measures
direct GET, proxied GET, direct SET and proxied SET back to back, so each
proxied/direct ratio compares two runs made under the same machine load (this
box is shared and noisy; absolute numbers drift by up to 2x, paired ratios by
10-20 %). See bench/README.md for what every number means. The proxy runs
with its own defaults (N/R/W as ``shardkv proxy`` ships them, read back from
its ``/cluster``) unless ``--replicas``, ``--r`` or ``--w`` are given.

Storage mode starts one node per engine (``memory`` first, as the baseline,
then ``lmdb:always`` by default) and measures PUT /kv/<random key> with a
~100-byte body, interleaved per round, with the ratio durable/memory.

Replication mode starts three memory nodes and two proxies over them, one
with ``--replicas 1 --r 1 --w 1`` and one with ``--replicas 3 --r 2 --w 2``.
Each proxy preloads its own keys (``n1k*``, ``n3k*``) and SETs its own key
range (``n1w*``, ``n3w*``), so neither reads the other's writes. Each round
runs N=1 GET, N=3 GET, N=1 SET, N=3 SET (same Lua scripts as proxy mode),
with the ratios N=3/N=1 for GET and SET: what the two extra copies cost.

Every process started here is stopped at the end (try/finally and atexit).
Exit status: 0 if every run was clean, 1 if any run saw non-2xx answers or
socket errors, 2 if the benchmark could not run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from shardkv.client.blocking import BlockingClient, TransportError, shared
from shardkv.testing.polling import ProcessError
from shardkv.testing.processes import TWISTD, Proc, ProcessSet

BENCH_DIR = Path(__file__).resolve().parent
STARTUP_SECONDS = 30.0
STOP_SECONDS = 10.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """The benchmark cannot go on; the message says why (exit status 2)."""


# -- machine ------------------------------------------------------------------


def loadavg() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "unknown"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def filesystem_of(path: Path) -> str:
    """The file system type holding ``path`` (ext4, tmpfs, ...), from /proc/mounts."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1]
                inside = target == mount or target.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def source_state() -> dict[str, Any]:
    """The commit measured and the files under shardkv/ that differ from it.

    Other engineers edit the tree while benchmarks run; a result belongs to
    the code as it was on disk when the servers started.
    """
    root = BENCH_DIR.parent

    def git(*argv: str) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", str(root), *argv],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except OSError:
            return ""
        return out.stdout if out.returncode == 0 else ""

    status = git("status", "--porcelain", "--", "shardkv")
    return {
        "commit": git("rev-parse", "--short", "HEAD").strip() or "unknown",
        "modified": [line[3:] for line in status.splitlines() if line.strip()],
    }


def machine_info(wrk: str) -> dict[str, Any]:
    packages = {}
    for name in ("twisted", "klein", "treq", "lmdb"):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = "not installed"
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "packages": packages,
        "wrk": _version([wrk, "-v"]),
        "kernel": platform.release(),
        "loadavg_start": list(os.getloadavg()),
        "source": source_state(),
    }


# -- processes ----------------------------------------------------------------


def find_twistd() -> str:
    """The twistd next to this interpreter (the project's venv): the one the
    process helpers of L{shardkv.testing.processes} start."""
    if not Path(TWISTD).exists():
        raise BenchError(
            "twistd not found; run this with the project's venv: .venv/bin/python bench/run.py"
        )
    return TWISTD


def find_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise BenchError(
            "wrk is not installed (or not on PATH). Install it with "
            "`./scripts/system-deps wrk` or `sudo apt-get install wrk`; `make bench` does that."
        )
    return found


def cpu_ticks(pid: int) -> int:
    """User + system CPU time of ``pid`` so far, in clock ticks (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)


class Processes(ProcessSet):
    """The run's servers (L{ProcessSet}: free ports, logs, readiness, stop by pid),
    plus directories to remove once they have stopped."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.cleanup: list[Path] = []


def api(server: Proc) -> BlockingClient:
    """The shared one-off client (one connection per request), aimed at ``server``."""
    return shared().at(server.url)


# -- wrk ----------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.M)
_PERCENTILE = re.compile(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.M)
_SOCKET = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass
class WrkResult:
    rps: float
    requests: int
    seconds: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: dict[str, int]

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def parse_wrk(text: str) -> WrkResult:
    """Requests/s, the latency distribution and error counts from ``wrk --latency``."""
    rps = _RPS.search(text)
    total = _TOTAL.search(text)
    percentiles = {int(p): float(v) * _UNITS_MS[u] for p, v, u in _PERCENTILE.findall(text)}
    if rps is None or total is None or set(percentiles) != {50, 75, 90, 99}:
        raise BenchError(f"could not parse wrk's output:\n{text}")
    sock = _SOCKET.search(text)
    socket_errors = dict.fromkeys(("connect", "read", "write", "timeout"), 0)
    if sock is not None:
        socket_errors = dict(zip(socket_errors, map(int, sock.groups()), strict=True))
    non2xx = _NON2XX.search(text)
    return WrkResult(
        rps=float(rps.group(1)),
        requests=int(total.group(1)),
        seconds=float(total.group(2)) * _UNITS_MS[total.group(3)] / 1000.0,
        p50_ms=percentiles[50],
        p75_ms=percentiles[75],
        p90_ms=percentiles[90],
        p99_ms=percentiles[99],
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
    )


@dataclass
class Target:
    """One thing to load: an operation against one server, with its wrk script."""

    op: str  # GET, SET, PUT
    target: str  # direct, proxied, memory, lmdb-always, ...
    server: Proc
    script: str
    script_args: list[str]
    connections: int
    path: str = "/"
    watch: list[Proc] = field(default_factory=list)  # processes whose CPU is reported

    @property
    def label(self) -> str:
        return f"{self.op} {self.target}"


@dataclass
class Run:
    round: int
    op: str
    target: str
    url: str
    connections: int
    threads: int
    duration_s: int
    loadavg: float
    result: WrkResult
    cpu_percent: dict[str, float]
    cpu_seconds: dict[str, float]
    cpu_us_per_req: float  # CPU time of the process wrk talks to, per request

    @property
    def flagged(self) -> bool:
        return self.result.errors > 0


def wrk_argv(wrk: str, t: Target, threads: int, duration: int, timeout: int) -> list[str]:
    return [
        wrk,
        f"-t{threads}",
        f"-c{t.connections}",
        f"-d{duration}s",
        f"--timeout={timeout}s",
        "--latency",
        "-s",
        str(BENCH_DIR / t.script),
        t.server.url + t.path,
        "--",
        *t.script_args,
    ]


def run_wrk(
    wrk: str, t: Target, threads: int, duration: int, round_no: int, timeout: int = 10
) -> Run:
    argv = wrk_argv(wrk, t, threads, duration, timeout)
    load = loadavg()
    before = {s.name: cpu_ticks(s.pid) for s in t.watch}
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=False)
    wall = time.monotonic() - started
    after = {s.name: cpu_ticks(s.pid) for s in t.watch}
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {' '.join(argv)}\n{out.stderr}")
    for s in t.watch:
        if not s.running:
            raise BenchError(f"{s.name} died during {t.label}:\n{s.tail(25)}")
    cpu_s = {name: (after[name] - before[name]) / CLK_TCK for name in before}
    result = parse_wrk(out.stdout + out.stderr)
    served = cpu_s.get(t.server.name, 0.0)
    return Run(
        round=round_no,
        op=t.op,
        target=t.target,
        url=t.server.url + t.path,
        connections=t.connections,
        threads=threads,
        duration_s=duration,
        loadavg=load,
        result=result,
        cpu_percent={name: 100.0 * v / wall for name, v in cpu_s.items()},
        cpu_seconds=cpu_s,
        cpu_us_per_req=1e6 * served / result.requests if result.requests else 0.0,
    )


# -- reporting ----------------------------------------------------------------


@dataclass
class Ratio:
    """numerator/denominator, both (op, target), computed within each round."""

    name: str
    numerator: tuple[str, str]
    denominator: tuple[str, str]


def fmt_ms(ms: float) -> str:
    if ms < 1.0:
        return f"{ms * 1000:.0f}us"
    if ms < 100.0:
        return f"{ms:.2f}ms"
    return f"{ms:.0f}ms"


def fmt_cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.0f}%" for name, value in cpu.items())


def row(run: Run) -> str:
    r = run.result
    flag = "  <-- ERRORS" if run.flagged else ""
    sock = sum(r.socket_errors.values())
    return (
        f"  {run.op:<4} {run.target:<12} {r.rps:>10,.0f} {fmt_ms(r.p50_ms):>9} "
        f"{fmt_ms(r.p99_ms):>9} {run.cpu_us_per_req:>8,.0f} {r.non_2xx:>7} {sock:>7}   "
        f"{fmt_cpu(run.cpu_percent)}{flag}"
    )


HEADER = (
    f"  {'op':<4} {'target':<12} {'ops/s':>10} {'p50':>9} {'p99':>9} {'CPUus/op':>8} "
    f"{'non2xx':>7} {'sockerr':>7}   CPU use of the processes serving"
)


def ratio_values(runs: Sequence[Run], ratio: Ratio, cpu: bool = False) -> list[float]:
    """One value per round that has both runs.

    With ``cpu``, the ratio of CPU cost instead of throughput: denominator's
    CPU per request over numerator's. That is the throughput ratio to expect
    if each serving process had a core to itself, and it moves far less with
    the load on this shared box than ops/s do.
    """
    by_round: dict[int, dict[tuple[str, str], Run]] = {}
    for run in runs:
        by_round.setdefault(run.round, {})[(run.op, run.target)] = run
    values = []
    for _, got in sorted(by_round.items()):
        num, den = got.get(ratio.numerator), got.get(ratio.denominator)
        if num is None or den is None:
            continue
        if cpu and num.cpu_us_per_req:
            values.append(den.cpu_us_per_req / num.cpu_us_per_req)
        elif not cpu and den.result.rps:
            values.append(num.result.rps / den.result.rps)
    return values


def summarize(runs: Sequence[Run], ratios: Sequence[Ratio]) -> dict[str, Any]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.op, run.target), []).append(run)
    rows = []
    for (op, target), group in groups.items():
        rps = [r.result.rps for r in group]
        rows.append(
            {
                "op": op,
                "target": target,
                "n": len(group),
                "ops_per_s_median": statistics.median(rps),
                "ops_per_s_min": min(rps),
                "ops_per_s_max": max(rps),
                "p50_ms_median": statistics.median(r.result.p50_ms for r in group),
                "p99_ms_median": statistics.median(r.result.p99_ms for r in group),
                "cpu_us_per_op_median": statistics.median(r.cpu_us_per_req for r in group),
                "errors": sum(r.result.errors for r in group),
            }
        )
    out_ratios = []
    for ratio in ratios:
        values = ratio_values(runs, ratio)
        cpu = ratio_values(runs, ratio, cpu=True)
        if values:
            out_ratios.append(
                {
                    "name": ratio.name,
                    "per_round": [round(v, 6) for v in values],
                    "median": statistics.median(values),
                    "min": min(values),
                    "max": max(values),
                    "cpu_per_round": [round(v, 6) for v in cpu],
                    "cpu_median": statistics.median(cpu) if cpu else None,
                }
            )
    return {"rows": rows, "ratios": out_ratios}


def print_round_ratios(runs: Sequence[Run], ratios: Sequence[Ratio]) -> None:
    parts = []
    for ratio in ratios:
        values = ratio_values(runs, ratio)
        cpu = ratio_values(runs, ratio, cpu=True)
        if values:
            extra = f" (CPU-cost {cpu[-1]:.3f})" if cpu else ""
            parts.append(f"{ratio.name} {values[-1]:.3f}{extra}")
    if parts:
        print("  ratio " + "   ".join(parts))


def print_summary(summary: dict[str, Any], rounds: int) -> None:
    print(
        f"\nsummary over {rounds} round(s): median ops/s (min..max), median p50 / p99, "
        "median CPU us per op of the process wrk talks to"
    )
    for r in summary["rows"]:
        errors = f"   {r['errors']} errors" if r["errors"] else ""
        span = f"({r['ops_per_s_min']:,.0f}..{r['ops_per_s_max']:,.0f})"
        print(
            f"  {r['op']:<4} {r['target']:<12} {r['ops_per_s_median']:>8,.0f} {span:<16} "
            f"p50 {fmt_ms(r['p50_ms_median']):>8}  p99 {fmt_ms(r['p99_ms_median']):>8}  "
            f"CPU {r['cpu_us_per_op_median']:,.0f} us/op{errors}"
        )
    for q in summary["ratios"]:
        per_round = ", ".join(f"{v:.3f}" for v in q["per_round"])
        print(
            f"  ratio {q['name']:<22} median {q['median']:.3f} "
            f"({q['min']:.3f}..{q['max']:.3f})   per round: {per_round}"
        )
        if q["cpu_median"] is not None:
            cpu_rounds = ", ".join(f"{v:.3f}" for v in q["cpu_per_round"])
            print(
                f"        {'':<22} CPU-cost ratio median {q['cpu_median']:.3f}"
                f"   per round: {cpu_rounds}"
            )


def print_machine(machine: dict[str, Any]) -> None:
    pk = machine["packages"]
    print(
        f"machine: nproc {machine['nproc']} (usable {machine['cpus_usable']}), "
        f"{machine['cpu_model']}, kernel {machine['kernel']}\n"
        f"         {machine['python']}, Twisted {pk['twisted']}, Klein {pk['klein']}, "
        f"treq {pk['treq']}, {machine['wrk'].split(' Copyright')[0]}\n"
        f"         loadavg at start {' '.join(f'{v:.2f}' for v in machine['loadavg_start'])}"
    )
    src = machine["source"]
    changed = f" + uncommitted {', '.join(src['modified'])}" if src["modified"] else ""
    print(f"         source {src['commit']}{changed}")


# -- the benchmark loop ---------------------------------------------------------


def measure(
    wrk: str,
    targets: Sequence[Target],
    ratios: Sequence[Ratio],
    args: argparse.Namespace,
) -> list[Run]:
    if args.warmup > 0:
        print(f"\nwarm-up: {args.warmup} s per target, not measured")
        for t in targets:
            run_wrk(wrk, t, args.threads, args.warmup, 0, args.wrk_timeout)
    runs: list[Run] = []
    for n in range(1, args.rounds + 1):
        print(
            f"\nround {n}/{args.rounds}  ({args.duration} s per run, -t{args.threads}, "
            f"loadavg {loadavg():.2f})"
        )
        print(HEADER)
        for t in targets:
            run = run_wrk(wrk, t, args.threads, args.duration, n, args.wrk_timeout)
            runs.append(run)
            print(row(run), flush=True)
            if args.pause > 0:
                time.sleep(args.pause)
        print_round_ratios([r for r in runs if r.round == n], ratios)
    return runs


# -- proxy mode -----------------------------------------------------------------


PRELOAD_WORKERS = 8


def _preload_chunk(
    client: BlockingClient, keys: Sequence[str], value: str
) -> list[tuple[str, str | None]]:
    """POST /set each key (on kept-alive connections); its owner from /explain (or None)."""
    owners: list[tuple[str, str | None]] = []
    for key in keys:
        reply = client.set(key, value)
        if reply.status != 200:
            raise BenchError(
                f"preload: POST /set {key} answered {reply.status}: {reply.body[:300]!r}"
            )
        reply = client.explain(key)
        owners.append((key, reply.json()["owner"] if reply.status == 200 else None))
    return owners


def preload(
    proxy: Proc, nodes: Sequence[Proc], count: int, value_bytes: int, prefix: str = "k"
) -> dict[str, list[str]]:
    """Store ``count`` keys (``prefix``0, ``prefix``1, ...) through the proxy; map each
    node's address to the keys it owns.

    Owners come from the proxy's /explain?key=. If the proxy has no /explain,
    the keys are also written straight to the first node (PUT /kv), which then
    owns them all as far as the direct GETs are concerned.
    """
    value = "v" * value_bytes
    keys = [f"{prefix}{i}" for i in range(count)]
    chunks = [keys[i::PRELOAD_WORKERS] for i in range(PRELOAD_WORKERS)]
    with (
        BlockingClient(proxy.url, timeout=30) as client,
        ThreadPoolExecutor(PRELOAD_WORKERS) as pool,
    ):
        done = list(pool.map(lambda c: _preload_chunk(client, c, value), chunks))
    owners: dict[str, list[str]] = {f"127.0.0.1:{n.port}": [] for n in nodes}
    explained = True
    for key, owner in sorted((pair for chunk in done for pair in chunk), key=lambda p: p[0]):
        if owner is None:
            explained = False
            break
        owners.setdefault(owner, []).append(key)
    if explained:
        return owners
    print("  the proxy has no /explain; writing the keys straight to the first node too")
    first = nodes[0]
    with BlockingClient(first.url, timeout=30) as client:
        for key in keys:
            status = client.put(key, value).status
            if status not in (200, 201):
                raise BenchError(f"preload: PUT /kv/{key} on {first.name} answered {status}")
    return {f"127.0.0.1:{first.port}": keys}


def write_keys(path: Path, keys: Iterable[str]) -> Path:
    path.write_text("".join(quote(k, safe="") + "\n" for k in keys), encoding="utf-8")
    return path


def check_get(server: Proc, key: str) -> None:
    reply = api(server).get(key)
    if reply.status != 200:
        raise BenchError(
            f"GET {key} on {server.name} answered {reply.status}: {reply.body[:300]!r}"
        )


def start_nodes(procs: Processes, count: int) -> list[Proc]:
    """``count`` memory nodes on free ports, started together, then waited for."""
    nodes = [
        procs.start_node(None, None, "--storage", "memory", name=f"node{i + 1}", wait=False)
        for i in range(count)
    ]
    for node in nodes:
        node.wait_healthy(STARTUP_SECONDS)
    return nodes


def start_proxy(
    procs: Processes, name: str, nodes: Sequence[Proc], options: dict[str, int | None]
) -> Proc:
    """A proxy over ``nodes``, ready once it counts every node as up.

    ``options`` maps proxy options (pool_size, replicas, r, w) to values;
    None leaves the proxy's own default.
    """
    extra: list[str] = []
    for option, value in options.items():
        if value is not None:
            extra += [f"--{option.replace('_', '-')}", str(value)]
    proxy = procs.start_proxy(None, nodes, *extra, name=name, deadline=STARTUP_SECONDS)

    def all_up(reply: Any) -> bool:
        health = reply.json()
        return bool(health.get("nodes_up") == health.get("nodes_total") == len(nodes))

    proxy.wait_healthy(STARTUP_SECONDS, ready=all_up)
    return proxy


def quorum_levels(proxy: Proc) -> dict[str, int | None]:
    """The N, R and W the proxy actually uses by default, from its GET /cluster."""
    levels: dict[str, int | None] = dict.fromkeys(("replicas", "r", "w"))
    try:
        reply = api(proxy).cluster()
        payload = reply.json() if reply.status == 200 else {}
    except (OSError, ValueError):
        payload = {}
    if isinstance(payload, dict):
        for name in levels:
            if isinstance(payload.get(name), int):
                levels[name] = payload[name]
    return levels


def fmt_levels(levels: dict[str, int | None]) -> str:
    def show(v: int | None) -> str:
        return "?" if v is None else str(v)

    return f"N={show(levels['replicas'])} R={show(levels['r'])} W={show(levels['w'])}"


def proxy_mode(
    args: argparse.Namespace, procs: Processes, wrk: str
) -> tuple[list[Target], list[Ratio], dict[str, Any]]:
    nodes = start_nodes(procs, args.nodes)
    options = {o: getattr(args, o) for o in ("pool_size", "replicas", "r", "w")}
    proxy = start_proxy(procs, "proxy", nodes, options)
    levels = quorum_levels(proxy)
    asked = any(v is not None for v in (args.replicas, args.r, args.w))
    chosen = "as asked" if asked else "the proxy's defaults"
    print(
        f"cluster: nodes on {', '.join(str(n.port) for n in nodes)}, proxy on {proxy.port} "
        f"({fmt_levels(levels)}, {chosen})"
    )
    print(f"         logs in {procs.root}")

    started = time.monotonic()
    owners = preload(proxy, nodes, args.keys, args.value_bytes)
    by_address = {f"127.0.0.1:{n.port}": n for n in nodes}
    owner_address = max(owners, key=lambda a: len(owners[a]))
    direct = by_address[owner_address]
    spread = ", ".join(f"{by_address[a].name} {len(k)}" for a, k in owners.items())
    print(
        f"preloaded {args.keys} keys through the proxy in {time.monotonic() - started:.1f} s "
        f"({spread}); direct runs use {direct.name} and its {len(owners[owner_address])} keys"
    )
    all_keys = write_keys(procs.root / "keys-all.txt", (f"k{i}" for i in range(args.keys)))
    own_keys = write_keys(procs.root / "keys-direct.txt", owners[owner_address])
    check_get(direct, owners[owner_address][0])
    check_get(proxy, "k0")

    c = args.connections
    set_args = [str(args.keyspace), str(args.value_bytes), "w"]
    targets = [
        Target("GET", "direct", direct, "get.lua", [str(own_keys)], c, watch=[direct]),
        Target("GET", "proxied", proxy, "get.lua", [str(all_keys)], c, watch=[proxy, *nodes]),
        Target("SET", "direct", direct, "set.lua", set_args, c, path="/set", watch=[direct]),
        Target("SET", "proxied", proxy, "set.lua", set_args, c, "/set", [proxy, *nodes]),
    ]
    ratios = [
        Ratio("GET proxied/direct", ("GET", "proxied"), ("GET", "direct")),
        Ratio("SET proxied/direct", ("SET", "proxied"), ("SET", "direct")),
    ]
    setup = {
        "nodes": args.nodes,
        "keys": args.keys,
        "keys_per_node": {by_address[a].name: len(k) for a, k in owners.items()},
        "direct_node": direct.name,
        "pool_size": args.pool_size,
        "replicas": args.replicas,
        "r": args.r,
        "w": args.w,
        "effective": levels,  # what the proxy reported on /cluster
    }
    return targets, ratios, setup


# -- replication mode -----------------------------------------------------------

REPLICATION_LEVELS: dict[str, dict[str, int]] = {
    # target name: proxy options. The order is the order of the runs in a round.
    "N=1": {"replicas": 1, "r": 1, "w": 1},
    "N=3": {"replicas": 3, "r": 2, "w": 2},
}


def replication_mode(
    args: argparse.Namespace, procs: Processes, wrk: str
) -> tuple[list[Target], list[Ratio], dict[str, Any]]:
    """Two proxies over the same three nodes, N=1 and N=3 (R=2, W=2), same load.

    Each proxy gets its own keys for GET (``n1k*``, ``n3k*``) and for SET
    (``n1w*``, ``n3w*``), so neither reads what the other wrote: with shared
    keys the N=1 proxy's writes (to one replica) would leave the other two
    stale and the N=3 proxy would spend its runs on read repair.
    """
    nodes = start_nodes(procs, args.nodes)
    proxies: dict[str, Proc] = {}
    levels: dict[str, dict[str, int | None]] = {}
    for label, wanted in REPLICATION_LEVELS.items():
        name = "proxy" + label.replace("=", "")  # proxyN1, proxyN3
        proxies[label] = start_proxy(procs, name, nodes, {"pool_size": args.pool_size, **wanted})
        levels[label] = quorum_levels(proxies[label])
        got = {k: v for k, v in levels[label].items() if v is not None}
        if got and got != wanted:
            raise BenchError(f"{name} reports {fmt_levels(levels[label])}, not {wanted}")
    print(
        f"cluster: nodes on {', '.join(str(n.port) for n in nodes)}; "
        + ", ".join(
            f"{p.name} on {p.port} ({fmt_levels(levels[label])})" for label, p in proxies.items()
        )
    )
    print(f"         logs in {procs.root}")

    c = args.connections
    targets: list[Target] = []
    key_counts: dict[str, dict[str, int]] = {}
    key_files: dict[str, Path] = {}
    for label, proxy in proxies.items():
        tag = label.replace("=", "").lower()  # n1, n3
        started = time.monotonic()
        owners = preload(proxy, nodes, args.keys, args.value_bytes, prefix=f"{tag}k")
        by_address = {f"127.0.0.1:{n.port}": n.name for n in nodes}
        key_counts[label] = {by_address.get(a, a): len(k) for a, k in owners.items()}
        spread = ", ".join(f"{name} {count}" for name, count in key_counts[label].items())
        print(
            f"preloaded {args.keys} keys {tag}k0..{tag}k{args.keys - 1} through {proxy.name} "
            f"in {time.monotonic() - started:.1f} s (owners: {spread})"
        )
        keys = (f"{tag}k{i}" for i in range(args.keys))
        key_files[label] = write_keys(procs.root / f"keys-{tag}.txt", keys)
        check_get(proxy, f"{tag}k0")
    for op in ("GET", "SET"):
        for label, proxy in proxies.items():
            tag = label.replace("=", "").lower()
            watch = [proxy, *nodes]
            if op == "GET":
                targets.append(
                    Target("GET", label, proxy, "get.lua", [str(key_files[label])], c, "/", watch)
                )
            else:
                set_args = [str(args.keyspace), str(args.value_bytes), f"{tag}w"]
                targets.append(Target("SET", label, proxy, "set.lua", set_args, c, "/set", watch))
    ratios = [
        Ratio("GET N=3/N=1", ("GET", "N=3"), ("GET", "N=1")),
        Ratio("SET N=3/N=1", ("SET", "N=3"), ("SET", "N=1")),
    ]
    setup = {
        "nodes": args.nodes,
        "keys": args.keys,
        "keys_per_node": key_counts,
        "pool_size": args.pool_size,
        "proxies": {
            label: {
                "name": proxies[label].name,
                "asked": REPLICATION_LEVELS[label],
                "effective": levels[label],
            }
            for label in proxies
        },
    }
    return targets, ratios, setup


# -- storage mode ---------------------------------------------------------------


def parse_engines(text: str) -> list[tuple[str, str | None]]:
    """``memory,lmdb:always,lmdb:batch`` into (engine, durability) pairs."""
    engines: list[tuple[str, str | None]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        engine, _, durability = item.partition(":")
        if engine == "memory" and not durability:
            engines.append(("memory", None))
        elif engine == "lmdb" and durability in ("always", "batch", "os"):
            engines.append(("lmdb", durability))
        else:
            raise BenchError(f"--engines: {item!r} is not memory or lmdb:always|batch|os")
    if len(engines) < 2:
        raise BenchError("--engines: name a baseline and at least one engine to compare")
    return engines


def storage_mode(
    args: argparse.Namespace, procs: Processes, wrk: str
) -> tuple[list[Target], list[Ratio], dict[str, Any]]:
    engines = parse_engines(args.engines)
    data_root = Path(tempfile.mkdtemp(prefix="shardkv-bench-data-", dir=args.data_dir))
    procs.cleanup.append(data_root)
    fs = filesystem_of(data_root)
    targets: list[Target] = []
    names: Counter[str] = Counter()
    for engine, durability in engines:
        base = engine if durability is None else f"{engine}-{durability}"
        names[base] += 1
        name = base if names[base] == 1 else f"{base}#{names[base]}"
        extra = ["--storage", engine]
        data_dir = None
        if durability is not None:
            data_dir = data_root / name
            extra += ["--durability", durability]
        server = procs.start_node(None, data_dir, *extra, name=name, deadline=STARTUP_SECONDS)
        put_args = [str(args.keyspace), str(args.value_bytes), "p"]
        targets.append(
            Target("PUT", name, server, "put.lua", put_args, args.connections, "/", [server])
        )
    print(f"nodes: {', '.join(f'{t.target} on {t.server.port}' for t in targets)}")
    print(f"       lmdb data under {data_root} ({fs}); logs in {procs.root}")
    if fs in ("tmpfs", "ramfs"):
        print("WARNING: the data directory is on a RAM file system: fsync costs nothing there")
    baseline = targets[0]
    ratios = [
        Ratio(f"{t.target}/{baseline.target}", ("PUT", t.target), ("PUT", baseline.target))
        for t in targets[1:]
    ]
    setup = {"engines": args.engines, "data_dir": str(data_root), "data_fs": fs}
    return targets, ratios, setup


STORAGE_FIELDS = (
    "entries",
    "keys",
    "commits",
    "committed_writes",
    "average_batch",
    "largest_batch",
    "syncs",
    "used_bytes",
)


def storage_details(targets: Sequence[Target]) -> dict[str, dict[str, Any]]:
    """What each node's /health says about its engine after the runs (group commit sizes)."""
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        try:
            storage = api(t.server).health().json().get("storage", {})
        except (OSError, ValueError, AttributeError):
            continue
        out[t.target] = {k: storage[k] for k in STORAGE_FIELDS if k in storage}
    print("\nengines after the runs (from /health):")
    for name, fields in out.items():
        print(f"  {name:<14} " + ", ".join(f"{k} {v}" for k, v in fields.items()))
    return out


# -- profiling (optional; py-spy is not a project dependency) --------------------


def _frame_parts(frame: str) -> tuple[str, str]:
    """``func (path:line)`` into (func, path)."""
    m = re.match(r"^(.*) \((.*?)(?::\d+)?\)$", frame)
    return (m.group(1), m.group(2)) if m else (frame, "")


def module_of(path: str) -> str:
    """A dotted module name for a file path from py-spy."""
    p = path.replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in p:
            p = p.split(marker, 1)[1]
            break
    else:
        if "/shardkv/" in p:
            p = "shardkv/" + p.rsplit("/shardkv/", 1)[1]
        elif re.search(r"/python3\.\d+/", p):
            p = re.split(r"/python3\.\d+/", p, maxsplit=1)[1]
    return p.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    ("our code (shardkv)", ("shardkv.",)),
    ("treq", ("treq.",)),
    ("Agent/pool + HTTP client parser", ("twisted.web.client", "twisted.web._newclient")),
    ("Klein", ("klein.",)),
    ("werkzeug routing", ("werkzeug.",)),
    ("twisted.web server (http.py, server.py)", ("twisted.web.http", "twisted.web.server")),
    ("other twisted.web", ("twisted.web.",)),
    ("Deferred machinery", ("twisted.internet.defer",)),
    ("reactor + TCP", ("twisted.internet.",)),
    ("twisted.python/logger (Failure, log, ...)", ("twisted.python.", "twisted.logger.")),
    ("json", ("json.",)),
    ("zope/attrs/hyperlink/other deps", ("zope.", "attr.", "attrs.", "hyperlink.")),
]


HOTSPOTS: list[tuple[str, str]] = [
    # (label, regex on "function (module)"); each is inclusive: the share of the
    # samples with that frame anywhere on the stack. Nested rows are indented.
    (
        "inbound: twisted.web reads a client request",
        r"^HTTPChannel\.dataReceived \(twisted\.web\.http\)",
    ),
    ("  Klein dispatch + handler (KleinResource.render)", r"^KleinResource\.render \(klein"),
    ("    werkzeug URL matching", r"\(werkzeug\."),
    ("    our code: Coordinator read/write/remove", r"^Coordinator\.(read|write|remove) \(shardkv"),
    ("      NodeClient._call (all of the outbound call)", r"^NodeClient\._call \(shardkv"),
    ("        treq HTTPClient.request", r"^HTTPClient\.request \(treq"),
    ("          hyperlink URL parsing", r"\(hyperlink\."),
    ("          Agent.request (pool, endpoint, request write)", r"^Agent\.request \(twisted\.web"),
    ("            HostnameEndpoint (built per request)", r"^HostnameEndpoint\."),
    ("node answers: HTTP11ClientProtocol.dataReceived", r"^HTTP11ClientProtocol\.dataReceived"),
    (
        "  treq wrappers on the answer (redirect, gzip, cookies)",
        r"^(RedirectAgent|ContentDecoderAgent)\._handleResponse|^CookieAgent\._extractCookies",
    ),
    (
        "cookie jar (treq's CookieAgent, on requests and answers)",
        r"\(http\.cookiejar\)|^_Fake\w*(Request|Response)\.|^CookieAgent\._extractCookies",
    ),
    (
        "Deferred.addTimeout / callLater / cancel",
        r"^(Deferred\.addTimeout|ReactorBase\.callLater|DelayedCall\.cancel) ",
    ),
    ("json (dumps, loads)", r"\(json\."),
    (
        "Request.write/finish to the client",
        r"^Request\.(write|finish) \(twisted\.web\.(http|server)\)",
    ),
    ("socket send (Connection.writeSomeData)", r"^Connection\.writeSomeData "),
]


SYSCALLS = "socket syscalls: send, recv, epoll (see README)"
SYSCALL_LEAVES = frozenset(
    {
        "untilConcludes (twisted.python.util)",  # wraps send() in writeSomeData
        "Connection.writeSomeData (twisted.internet.tcp)",
        "Connection.doRead (twisted.internet.tcp)",  # recv()
        "EPollReactor.doPoll (twisted.internet.epollreactor)",  # epoll_wait()
        "Port.doRead (twisted.internet.tcp)",  # accept()
    }
)


def category_of(module: str, func: str = "") -> str:
    if f"{func} ({module})" in SYSCALL_LEAVES:
        return SYSCALLS
    for name, prefixes in CATEGORIES:
        if any(module == p.rstrip(".") or module.startswith(p) for p in prefixes):
            return name
    return "stdlib/other"


def analyze_raw(path: Path, top: int = 25) -> dict[str, Any]:
    """Own and total time by category and by function from py-spy's ``--format raw``."""
    own_fn: Counter[str] = Counter()
    total_fn: Counter[str] = Counter()
    own_cat: Counter[str] = Counter()
    hot: Counter[str] = Counter()
    hot_res = [(label, re.compile(rx)) for label, rx in HOTSPOTS]
    samples = other_threads = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            _frame_parts(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        if any(func == "Thread._bootstrap" for func, _ in frames):
            # Twisted's thread pool (DNS lookups for new connections) waiting
            # on its queue: not the reactor thread, which does all the work.
            other_threads += count
            continue
        samples += count
        named = [f"{func} ({module_of(p)})" for func, p in frames]
        leaf_func, leaf_path = frames[-1]
        own_fn[named[-1]] += count
        own_cat[category_of(module_of(leaf_path), leaf_func)] += count
        for name in set(named):
            total_fn[name] += count
        for label, rx in hot_res:
            if any(rx.search(n) for n in named):
                hot[label] += count

    def share(c: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(k, 100.0 * v / samples) for k, v in c.most_common(n)] if samples else []

    return {
        "samples": samples,
        "other_thread_samples": other_threads,
        "hotspots": [(k, 100.0 * hot[k] / samples if samples else 0.0) for k, _ in HOTSPOTS],
        "own_by_category": share(own_cat, len(own_cat)),
        "own_by_function": share(own_fn, top),
        # Leave out the reactor loop and twistd frames that are on (nearly) every stack.
        "total_by_function": [
            (k, pct) for k, pct in share(total_fn, top + len(total_fn)) if pct < 90.0
        ][:top],
    }


def print_profile(title: str, prof: dict[str, Any]) -> None:
    print(
        f"\n{title}: {prof['samples']} samples of the reactor thread "
        f"({prof['other_thread_samples']} of other threads left out)"
    )
    for key, label in (
        ("hotspots", "where the time goes (inclusive: share of samples with it on the stack)"),
        ("own_by_category", "own time by category (leaf frame)"),
        ("own_by_function", "top functions by own time"),
        ("total_by_function", "top functions by total time (under 90 %: no reactor loop)"),
    ):
        print(f"  {label}:")
        for name, pct in prof[key]:
            print(f"    {pct:5.1f}%  {name}")


def profile(
    wrk: str, targets: Sequence[Target], args: argparse.Namespace, procs: Processes
) -> dict[str, Any]:
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise BenchError("--profile needs py-spy (pip install py-spy into the venv)")
    out_dir = Path(args.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.mode == "replication":
        chosen = list(targets)
    else:
        chosen = [t for t in targets if t.target == "proxied"] or list(targets[-1:])
    results: dict[str, Any] = {}
    for t in chosen:
        victim = t.server
        stem = f"{victim.name}-{t.op.lower()}"
        for fmt, ext in (("raw", "txt"), ("flamegraph", "svg")):
            out = out_dir / f"{stem}.{ext}"
            spy_argv = [pyspy, "record", "--pid", str(victim.pid)]
            spy_argv += ["--duration", str(args.duration), "--rate", "100", "--nonblocking"]
            spy_argv += ["--format", fmt, "-o", str(out)]
            spy = subprocess.Popen(
                spy_argv,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            try:
                time.sleep(0.5)  # let py-spy attach before the load starts
                run = run_wrk(wrk, t, args.threads, args.duration, 0, args.wrk_timeout)
                _, err = spy.communicate(timeout=args.duration + 30)
            finally:
                if spy.poll() is None:
                    spy.kill()
                    spy.wait()
            if spy.returncode != 0:
                raise BenchError(f"py-spy failed: {err.decode(errors='replace')}")
            print(f"\nprofiled {t.label} ({fmt}, {out}):")
            print(HEADER)
            print(row(run))
            if fmt == "raw":
                prof = analyze_raw(out)
                print_profile(f"py-spy on {victim.name} during {t.label}", prof)
                results[t.label] = {"run": asdict(run), "profile": prof, "raw": str(out)}
            else:
                results[t.label]["flamegraph"] = str(out)
    return results


# -- main ------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark shardkv with wrk against a cluster this command starts itself. "
        "See bench/README.md.",
    )
    p.add_argument(
        "mode",
        nargs="?",
        default="proxy",
        choices=["proxy", "storage", "replication"],
        help="proxy (default): GET and SET, straight at a node vs through the proxy; "
        "storage: PUT throughput of one node per storage engine; "
        "replication: GET and SET through an N=1 proxy vs an N=3 (R=2, W=2) proxy",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds of interleaved runs (3)")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (10)")
    p.add_argument(
        "--connections",
        type=int,
        default=None,
        help="wrk connections (proxy and replication 32, storage 64)",
    )
    p.add_argument("--threads", type=int, default=1, help="wrk threads (1: leaves a core free)")
    p.add_argument(
        "--warmup", type=int, default=2, help="unmeasured seconds per target before round 1 (2)"
    )
    p.add_argument("--pause", type=float, default=1.0, help="seconds between runs (1)")
    p.add_argument("--keys", type=int, default=1000, help="keys preloaded for the GETs (1000)")
    p.add_argument(
        "--keyspace", type=int, default=100_000, help="random keys for SET and PUT (100000)"
    )
    p.add_argument("--value-bytes", type=int, default=100, help="value size in bytes (100)")
    p.add_argument(
        "--nodes", type=int, default=3, help="proxy and replication modes: storage nodes (3)"
    )
    p.add_argument("--pool-size", type=int, help="passed to the proxy (default: the proxy's)")
    p.add_argument(
        "--replicas", type=int, help="proxy mode: proxy --replicas N (default: the proxy's)"
    )
    p.add_argument(
        "--r", type=int, help="proxy mode: proxy --r, the read quorum (default: the proxy's)"
    )
    p.add_argument(
        "--w", type=int, help="proxy mode: proxy --w, the write quorum (default: the proxy's)"
    )
    p.add_argument(
        "--wrk-timeout", type=int, default=10, help="seconds before wrk counts a timeout (10)"
    )
    p.add_argument(
        "--engines",
        default="memory,lmdb:always",
        help="storage mode: the baseline first, then the engines to compare with it "
        "(memory,lmdb:always; also lmdb:batch, lmdb:os)",
    )
    p.add_argument(
        "--data-dir", help="storage mode: where lmdb data goes (default: a new temp dir)"
    )
    p.add_argument("--json", metavar="FILE", help="also write every run and the summary here")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="after the rounds, run py-spy on the proxy (replication mode: each proxy; "
        "storage mode: the last node) during one extra run per operation; raw stacks and "
        "flame graphs go to DIR",
    )
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = p.parse_args(argv)
    if args.connections is None:
        args.connections = 64 if args.mode == "storage" else 32
    if args.mode != "proxy":
        for name in ("replicas", "r", "w"):
            if getattr(args, name) is not None:
                p.error(f"--{name} is for proxy mode; {args.mode} mode sets its own")
    if args.mode == "replication" and args.nodes < 3:
        p.error("replication mode needs --nodes 3 or more (its N=3 proxy keeps 3 copies)")
    positive = ("rounds", "duration", "connections", "threads", "keys", "keyspace", "nodes")
    for name in (*positive, "wrk_timeout"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads > args.connections:
        p.error("--threads may not exceed --connections")
    if args.value_bytes < 0 or args.warmup < 0 or args.pause < 0:
        p.error("--value-bytes, --warmup and --pause may not be negative")
    return args


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        wrk = find_wrk()
        find_twistd()
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    machine = machine_info(wrk)
    print_machine(machine)

    workdir = Path(tempfile.mkdtemp(prefix="shardkv-bench-"))
    procs = Processes(workdir)
    atexit.register(procs.close, STOP_SECONDS)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGHUP, _exit_on_signal)
    ok = False
    try:
        modes = {"proxy": proxy_mode, "storage": storage_mode, "replication": replication_mode}
        mode = modes[args.mode]
        targets, ratios, setup = mode(args, procs, wrk)
        runs = measure(wrk, targets, ratios, args)
        summary = summarize(runs, ratios)
        print_summary(summary, args.rounds)
        machine["loadavg_end"] = list(os.getloadavg())
        print(
            "loadavg at end "
            + " ".join(f"{v:.2f}" for v in machine["loadavg_end"])
            + f"; per run: {min(r.loadavg for r in runs):.2f}..{max(r.loadavg for r in runs):.2f}"
        )
        if args.mode == "storage":
            setup["engines_after"] = storage_details(targets)
        flagged = [r for r in runs if r.flagged]
        for r in flagged:
            print(
                f"FLAGGED round {r.round} {r.op} {r.target}: {r.result.non_2xx} non-2xx, "
                f"socket errors {r.result.socket_errors}"
            )
        profiled = profile(wrk, targets, args, procs) if args.profile else {}
        if args.json:
            report = {
                "mode": args.mode,
                "config": {k: v for k, v in vars(args).items() if k != "json"},
                "setup": setup,
                "machine": machine,
                "runs": [asdict(r) for r in runs],
                "summary": summary,
                "profile": profiled,
            }
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            print(f"results written to {args.json}")
        ok = True
        return 1 if flagged else 0
    except (BenchError, ProcessError, TransportError) as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    finally:
        procs.close(STOP_SECONDS)
        for path in procs.cleanup:
            shutil.rmtree(path, ignore_errors=True)
        if ok and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"server logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
