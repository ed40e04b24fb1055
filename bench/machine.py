"""The machine a benchmark ran on, the code it measured, and the tools it needs.

Shared by every mode of ``bench/run.py`` and by ``bench/move.py``: a figure
from this shared 2-core box means nothing without the load average and the
commit beside it, so every mode prints and stores the same machine line.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from shardkv.testing.processes import TWISTD

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
