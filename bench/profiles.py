"""py-spy profiles of a server under load, and where their samples fall.

``--profile DIR`` (any mode) runs one extra, unmeasured wrk run per profiled
target after the rounds, with ``py-spy record`` attached to the process that
serves it: once for the raw stacks (analysed here: hotspots, own time by
category, top functions) and once for a flame graph. py-spy comes with the
``bench`` extra (``pip install -e '.[bench]'``; ``make bench`` does that).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from machine import BenchError
from report import HEADER, row
from wrkrun import Target, run_wrk


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
    (
        "  Klein dispatch + handler (KleinResource.render, shardkv's RouterResource.render)",
        r"^(KleinResource\.render \(klein|RouterResource\.render \(shardkv)",
    ),
    ("    werkzeug URL matching", r"\(werkzeug\."),
    ("    our code: Coordinator read/write/remove", r"^Coordinator\.(read|write|remove) \(shardkv"),
    (
        "      ReplicaClient._call (all of the outbound call)",
        r"^(NodeClient|ReplicaClient)\._call \(shardkv|^_Exchange\.",
    ),
    ("        treq HTTPClient.request", r"^HTTPClient\.request \(treq"),
    ("          hyperlink URL parsing", r"\(hyperlink\."),
    (
        "          Agent.request (pool, endpoint, request write; PersistentAgent after 242c371)",
        r"^(Agent\.request \(twisted\.web|PersistentAgent\.request \(shardkv)",
    ),
    ("            HostnameEndpoint (built per request)", r"^HostnameEndpoint\."),
    (
        "node answers: HTTP11ClientProtocol.dataReceived (shardkv's _Connection after 242c371)",
        r"^(HTTP11ClientProtocol\.dataReceived|_Connection\.dataReceived \(shardkv\.web\.agent)",
    ),
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


PTRACE_HINT = (
    "py-spy needs ptrace rights over the server: run as root (sudo), or give the binary "
    "CAP_SYS_PTRACE (`sudo setcap cap_sys_ptrace+ep .venv/bin/py-spy`), or set "
    "`sudo sysctl kernel.yama.ptrace_scope=0` for servers of your own user, or in a "
    "container `docker run --cap-add SYS_PTRACE` (bench/README.md, Profiling)"
)


def find_pyspy() -> str:
    """The py-spy next to this interpreter (the venv's, from the ``bench`` extra) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return str(beside)
    found = shutil.which("py-spy")
    if found is None:
        raise BenchError(
            "--profile needs py-spy: .venv/bin/pip install -e '.[bench]' (make bench does that)"
        )
    return found


def profile(
    wrk: str, chosen: Sequence[tuple[Target, str]], args: argparse.Namespace
) -> dict[str, Any]:
    """One extra run per (target, file stem) with py-spy on the target's server:
    ``DIR/<stem>.txt`` (raw stacks, analysed and printed) and ``DIR/<stem>.svg``."""
    pyspy = find_pyspy()
    out_dir = Path(args.profile)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for t, stem in chosen:
        victim = t.server
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
                text = err.decode(errors="replace")
                hint = ""
                if "ermission" in text or "not permitted" in text:
                    hint = f"\n{PTRACE_HINT}"
                raise BenchError(f"py-spy failed ({spy.returncode}): {text}{hint}")
            print(f"\nprofiled {t.label} on {victim.name} ({fmt}, {out}):")
            print(HEADER)
            print(row(run))
            if fmt == "raw":
                prof = analyze_raw(out)
                print_profile(f"py-spy on {victim.name} during {t.label}", prof)
                results[t.label] = {"run": asdict(run), "profile": prof, "raw": str(out)}
            else:
                results[t.label]["flamegraph"] = str(out)
    return results
