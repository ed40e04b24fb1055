"""wrk runs: what to load (L{Target}), one measured run (L{Run}), wrk's output parsed.

Every mode of ``bench/run.py`` describes its work as a list of targets and
runs them through L{run_wrk}, which also reads the CPU time the serving
processes spent during the run from ``/proc``.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field

from machine import BENCH_DIR, CLK_TCK, BenchError, cpu_ticks, loadavg

from shardkv.testing.processes import Proc

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
