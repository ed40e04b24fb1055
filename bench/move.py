"""How fast a membership change moves data, and what it costs foreground reads.

    .venv/bin/python bench/move.py                # 100,000 keys of 100 bytes, 3 nodes
    .venv/bin/python bench/move.py --help

One run, on real processes (issue 11, section 5):

1. Three LMDB nodes (default durability, ``always``) preloaded with ``--keys``
   records of ``--value-bytes`` bytes, written into their data directories
   before they start at the epoch-1 placement (as the membership tests do;
   see ``tests/system/membership_harness.py``), two blank spare nodes, and two
   proxies on the three: ``fast`` (no ``--rebalance-rate``) and ``capped``
   (``--rebalance-rate --cap``, 5,000 keys/s).
2. **GET p99 before**: wrk, paced (``--get-rate`` requests/s over
   ``--connections`` connections, random preloaded keys) against ``fast``
   for ``--get-seconds``, with the same watchers running as during a move
   (L{observed}), so that the two windows differ by the move alone.
3. **Unlimited move**: ``fast`` plans and commits adding the first spare
   (3 -> 4). The copy rate is the keys (and bytes) the nodes' streams report
   sending (``GET /replica/move`` on every node, ten times a second) over the
   time from the commit until every source reports its stream done. No
   foreground load runs during this move.
4. **GET p99 before the capped move** (4 nodes), then **during** it:
   ``capped`` adds the second spare (4 -> 5) at 5,000 keys/s, and the same
   paced wrk run starts right after the commit and ends before the copy does.
5. A table, and ``--json FILE`` for every figure.

Targets: the unlimited copy at >= 20,000 keys/s; the GET p99 during the capped
move at most 3x the p99 just before it. Exit status 0 when both hold, 1 when
either misses, 2 when the benchmark could not run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))  # the harness lives with the tests

from run import (  # noqa: E402
    CLK_TCK,
    BenchError,
    WrkResult,
    cpu_ticks,
    find_twistd,
    find_wrk,
    machine_info,
    parse_wrk,
)

from shardkv.testing.processes import Proc, ProcessSet  # noqa: E402
from tests.system.membership_harness import (  # noqa: E402
    Cluster,
    MoveWatch,
    move_progress,
    post_json,
    start_cluster,
    wait_idle,
    wait_proxies_on,
)

PACED_GET = """\
-- Paced GET /get?key=K, K at random from a key file; each connection waits
-- DELAY ms between requests, so the load stays below saturation and the
-- latency measured is the service time, not queueing behind wrk itself.
local keys, n, delay_ms = {}, 0, 0
function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then n = n + 1; keys[n] = line end
  end
  delay_ms = tonumber(args[2])
  math.randomseed(os.time())
end
function delay() return delay_ms end
function request()
  if n == 0 then return wrk.format("GET", "/get?key=b0") end
  return wrk.format("GET", "/get?key=" .. keys[math.random(n)])
end
"""


@dataclass
class MoveFigures:
    label: str
    copies: int
    """Copies the streams report sending (primary sources), against the plan's."""
    planned: int
    bytes: int
    copy_s: float
    idle_s: float
    rate_cap: int
    cpu_percent: dict[str, float]
    """Each process's CPU over the copy (commit to the last stream done), in % of a core."""

    @property
    def keys_per_s(self) -> float:
        return self.copies / self.copy_s if self.copy_s > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / self.copy_s if self.copy_s > 0 else 0.0


def write_keys(path: Path, keys: list[str]) -> Path:
    path.write_text("\n".join(keys) + "\n", encoding="ascii")
    return path


def paced_wrk(
    wrk: str, url: str, script: Path, keys: Path, args: argparse.Namespace, seconds: int
) -> WrkResult:
    delay_ms = max(0, round(1000.0 * args.connections / args.get_rate))
    argv = [
        wrk,
        "-t1",
        f"-c{args.connections}",
        f"-d{seconds}s",
        "--timeout=10s",
        "--latency",
        "-s",
        str(script),
        url,
        "--",
        str(keys),
        str(delay_ms),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {' '.join(argv)}\n{out.stderr}")
    return parse_wrk(out.stdout + out.stderr)


class CpuSampler:
    """Every process's CPU ticks (``/proc/PID/stat``), ten times a second, from a thread."""

    def __init__(self, procs: list[Proc]) -> None:
        self.procs = procs
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-sampler", daemon=True)

    def __enter__(self) -> CpuSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), {p.name: cpu_ticks(p.pid) for p in self.procs}))
            self._stop.wait(0.1)

    def percent(self, start: float, end: float) -> dict[str, float]:
        inside = [(t, ticks) for t, ticks in self.samples if start <= t <= end]
        if len(inside) < 2:
            return {}
        (t0, a), (t1, b) = inside[0], inside[-1]
        return {n: round(100.0 * (b[n] - a[n]) / CLK_TCK / (t1 - t0)) for n in a}


def observed(cluster: Cluster, via: Proc) -> tuple[MoveWatch, CpuSampler]:
    """The watchers of a move: every node's ``/replica/move`` and the orchestrating
    proxy's (``via``) ``/admin/rebalance`` ten times a second, and every
    process's CPU. Some 60 requests a second: the GET windows before a move run
    under them too, and they ask ``via``, not the proxy the GETs go to."""
    others = [p for p in cluster.proxies if p is not via]
    everyone = [*cluster.nodes.values(), *cluster.proxies]
    return MoveWatch(sorted(cluster.nodes), [via, *others]), CpuSampler(everyone)


def join(
    cluster: Cluster,
    via: Proc,
    node: str,
    label: str,
    cap: int,
    during: Callable[[], None] | None = None,
) -> MoveFigures:
    """Plan and commit adding ``node`` through ``via``; ``during()`` runs right after the
    commit (in this thread); returns once the move is idle."""
    watch, sampler = observed(cluster, via)
    with watch, sampler as cpu:
        status, plan = post_json(via.url + "/admin/plan", {"add": [{"address": node, "weight": 1}]})
        if status != 200:
            raise BenchError(f"plan through {via.name}: {status} {plan}")
        sources = sorted(plan["map"]["move"]["previous"])
        committed = time.monotonic()
        status, answer = post_json(via.url + "/admin/commit", {})
        if status != 200:
            raise BenchError(f"commit through {via.name}: {status} {answer}")
        epoch = int(answer["epoch"])
        if during is not None:
            during()
        final = wait_idle(via, epoch, 300.0)
        idle = time.monotonic()
        wait_proxies_on(cluster, final["epoch"])
        done = watch.copy_done_at(epoch, sources)
        streams = [move_progress(d, epoch)["stream"] or {} for d in cluster.dirs.values()]
        copies = sum(int(p.get("keys_moved", 0)) for p in streams)
        moved_bytes = sum(int(p.get("bytes_moved", 0)) for p in streams)
    return MoveFigures(
        label=label,
        copies=copies,
        planned=int(plan["keys_moving"]),
        bytes=moved_bytes,
        copy_s=(done - committed) if done is not None else float("nan"),
        idle_s=idle - committed,
        rate_cap=cap,
        cpu_percent=cpu.percent(committed, done if done is not None else idle),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keys", type=int, default=100_000, help="keys preloaded (100000)")
    p.add_argument("--value-bytes", type=int, default=100, help="value size (100)")
    p.add_argument("--cap", type=int, default=5000, help="--rebalance-rate of the capped move")
    p.add_argument("--get-seconds", type=int, default=5, help="seconds per wrk run (5)")
    p.add_argument("--get-rate", type=float, default=200.0, help="paced GETs per second (200)")
    p.add_argument("--connections", type=int, default=4, help="wrk connections (4)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--keep-logs", action="store_true", help="keep the servers' logs and data")
    args = p.parse_args(argv)
    if args.keys < 1000 or args.value_bytes < 16 or args.cap < 1 or args.get_rate <= 0:
        p.error("need --keys >= 1000, --value-bytes >= 16, --cap >= 1, --get-rate > 0")
    return args


def fmt_row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(
        c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        find_twistd()
        wrk = find_wrk()
    except BenchError as e:
        print(f"move.py: {e}", file=sys.stderr)
        return 2
    machine = machine_info(wrk)
    root = Path(tempfile.mkdtemp(prefix="shardkv-move-"))
    procs = ProcessSet(root)
    ok = False
    try:
        keys = [f"b{i:06d}" for i in range(args.keys)]
        started = time.monotonic()
        cluster = start_cluster(
            procs,
            root,
            3,
            keys,
            spares=2,
            value_size=args.value_bytes,
            proxy_args=((), ("--rebalance-rate", str(args.cap))),
        )
        fast, capped = cluster.proxies
        fast.name, capped.name = "fast", "capped"
        print(
            f"setup: {args.keys} keys x {args.value_bytes} B preloaded in "
            f"{cluster.preload.seconds:.1f} s ({cluster.preload.records} records), "
            f"cluster up in {time.monotonic() - started:.1f} s; logs in {root}"
        )
        script = root / "paced_get.lua"
        script.write_text(PACED_GET, encoding="ascii")
        key_file = write_keys(root / "keys.txt", keys)
        paced_wrk(wrk, fast.url, script, key_file, args, 2)  # warm-up, not measured

        def watched_wrk(via: Proc) -> WrkResult:
            watch, sampler = observed(cluster, via)
            with watch, sampler:
                return paced_wrk(wrk, fast.url, script, key_file, args, args.get_seconds)

        before_first = watched_wrk(fast)
        unlimited = join(cluster, fast, cluster.spares[0], "3->4, rate unset", 0)
        before = watched_wrk(capped)
        during: list[WrkResult] = []

        def foreground() -> None:
            # Two windows back to back from the commit: the first holds the map
            # changes at the start of the move, the second only the paced copy.
            for _ in range(2):
                during.append(paced_wrk(wrk, fast.url, script, key_file, args, args.get_seconds))

        capped_move = join(
            cluster,
            capped,
            cluster.spares[1],
            f"4->5, capped {args.cap} keys/s",
            args.cap,
            foreground,
        )
        for m in (unlimited, capped_move):
            print(
                f"CPU over the copy, {m.label}: "
                + ", ".join(f"{n} {v:.0f}%" for n, v in m.cpu_percent.items())
            )
        ok = report(args, machine, unlimited, capped_move, before_first, before, during)
        return 0 if ok else 1
    except (BenchError, AssertionError, OSError) as e:
        print(f"move.py: {e}", file=sys.stderr)
        print(procs.report(), file=sys.stderr)
        return 2
    finally:
        procs.close()
        if ok and not args.keep_logs:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"logs and data kept in {root}")


def report(
    args: argparse.Namespace,
    machine: dict[str, Any],
    unlimited: MoveFigures,
    capped: MoveFigures,
    before_first: WrkResult,
    before: WrkResult,
    during: list[WrkResult],
) -> bool:
    print()
    widths = [30, 8, 8, 7, 7, 9, 7, 8]
    head = ["move", "planned", "copies", "MB", "copy s", "keys/s", "MB/s", "idle s"]
    print(fmt_row(head, widths))
    for m in (unlimited, capped):
        cells = [
            m.label,
            f"{m.planned:,}",
            f"{m.copies:,}",
            f"{m.bytes / 1e6:.1f}",
            f"{m.copy_s:.2f}",
            f"{m.keys_per_s:,.0f}",
            f"{m.mb_per_s:.2f}",
            f"{m.idle_s:.1f}",
        ]
        print(fmt_row(cells, widths))
    print()
    widths = [44, 7, 8, 8, 8, 7]
    title = f"GET, paced {args.get_rate:g}/s, c={args.connections}"
    print(fmt_row([title, "req/s", "p50 ms", "p90 ms", "p99 ms", "errors"], widths))
    s = args.get_seconds
    rows = [
        ("before any move (3 nodes)", before_first),
        ("before the capped move (4 nodes)", before),
        (f"capped move, 0-{s} s after the commit", during[0]),
        (f"capped move, {s}-{2 * s} s after the commit", during[1]),
    ]
    for label, r in rows:
        cells = [label, f"{r.rps:.0f}", f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}"]
        print(fmt_row([*cells, str(r.errors)], widths))
    ratios = [d.p99_ms / before.p99_ms if before.p99_ms else float("inf") for d in during]
    ratio = max(ratios)
    fast_ok = unlimited.keys_per_s >= 20_000
    p99_ok = ratio <= 3.0
    print(
        f"\nunlimited copy {unlimited.keys_per_s:,.0f} keys/s (target >= 20,000: "
        f"{'met' if fast_ok else 'MISSED'}); GET p99 during/before the capped move "
        f"{' and '.join(f'{r:.2f}' for r in ratios)} (target <= 3: {'met' if p99_ok else 'MISSED'})"
    )
    pk, src = machine["packages"], machine["source"]
    changed = f" + uncommitted {', '.join(src['modified'])}" if src["modified"] else ""
    print(
        f"machine: nproc {machine['nproc']}, {machine['cpu_model']}, {machine['python']}, "
        f"Twisted {pk['twisted']}, lmdb {pk['lmdb']}; loadavg at start "
        f"{' '.join(f'{v:.2f}' for v in machine['loadavg_start'])}; source {src['commit']}{changed}"
    )
    if args.json is not None:
        payload = {
            "machine": machine,
            "args": {k: str(v) for k, v in vars(args).items()},
            "moves": [
                {**asdict(m), "keys_per_s": m.keys_per_s, "mb_per_s": m.mb_per_s}
                for m in (unlimited, capped)
            ],
            "get": {
                "before_first": asdict(before_first),
                "before": asdict(before),
                "during": [asdict(d) for d in during],
                "p99_ratios": ratios,
            },
            "targets": {"keys_per_s": fast_ok, "p99_ratio": p99_ok},
        }
        args.json.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        print(f"figures: {args.json}")
    return fast_ok and p99_ok


if __name__ == "__main__":
    sys.exit(main())
