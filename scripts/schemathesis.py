"""Run schemathesis (``st run``) against a live proxy and a live node.

Starts real ``twistd`` processes on free loopback ports, with memory storage
to keep it fast: three nodes and a proxy over them, and one node of its own.
The proxy is fuzzed through the document it serves itself; the lone node
through its own. The node is apart from the proxy's cluster because the
replica routes let a caller replace its member list, teach it a map or
stream it records: fuzzed, they would pull the proxy's cluster out from
under the proxy's run. The two runs go side by side, each with its own
report, and every process is stopped at the end whatever happened.

Usage: python scripts/schemathesis.py [--max-examples N] [--workers N] [ST-ARGS...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shardkv.testing.processes import ProcessSet

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "schemathesis.toml"
ST = str(Path(sys.executable).with_name("st"))
RUN_DEADLINE = 600.0
"""Seconds both runs get together before they are stopped and the target fails."""


def st_command(url: str, max_examples: int, workers: int, extra: list[str]) -> list[str]:
    return [
        ST,
        "--config-file",
        str(CONFIG),
        "run",
        f"{url}/openapi.json",
        "--url",
        url,
        "--max-examples",
        str(max_examples),
        "--workers",
        str(workers),
        "--seed",
        "1",
        *extra,
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-examples", type=int, default=100)
    # One worker per run: hypothesis describes strategies with ast.parse, and
    # CPython 3.11's ast is not thread-safe ("AST constructor recursion depth
    # mismatch"). The proxy's run and the node's run go side by side instead.
    parser.add_argument("--workers", type=int, default=1)
    args, extra = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="shardkv-st-") as tmp:
        root = Path(tmp)
        procs = ProcessSet(root)
        try:
            nodes = [
                procs.start_node(None, None, "--storage", "memory", name=f"node{i}")
                for i in range(1, 4)
            ]
            proxy = procs.start_proxy(None, nodes)
            lone = procs.start_node(None, None, "--storage", "memory", name="lone-node")
            runs = {
                name: subprocess.Popen(
                    st_command(proc.url, args.max_examples, args.workers, extra),
                    stdout=(root / f"st-{name}.txt").open("wb"),
                    stderr=subprocess.STDOUT,
                    cwd=root,  # st keeps a .schemathesis/ cache where it runs
                )
                for name, proc in (("proxy", proxy), ("node", lone))
            }
            end = time.monotonic() + RUN_DEADLINE
            codes: dict[str, int] = {}
            for name, run in runs.items():
                try:
                    codes[name] = run.wait(max(1.0, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    run.kill()
                    codes[name] = run.wait()
                    print(f"st against the {name}: stopped after {RUN_DEADLINE:g} s")
            for name in runs:
                print(f"==== st run against the {name}: exit {codes[name]} ====")
                print((root / f"st-{name}.txt").read_text(errors="replace"))
            for proc in procs.procs:
                proc.check_running()
            if any(codes.values()):
                print(procs.report())
                return 1
            return 0
        finally:
            procs.close()


if __name__ == "__main__":
    sys.exit(main())
