"""Runs made up for the ratio tests: only what the report reads is filled in."""

from wrkrun import Run, WrkResult


def made_run(
    round_no: int,
    op: str,
    target: str,
    rps: float,
    p50_ms: float = 1.0,
    cpu_us: float = 100.0,
    non_2xx: int = 0,
) -> Run:
    result = WrkResult(
        rps=rps,
        requests=int(rps * 3),
        seconds=3.0,
        p50_ms=p50_ms,
        p75_ms=p50_ms,
        p90_ms=p50_ms,
        p99_ms=p50_ms * 4,
        non_2xx=non_2xx,
        socket_errors=dict.fromkeys(("connect", "read", "write", "timeout"), 0),
    )
    return Run(
        round=round_no,
        op=op,
        target=target,
        url="http://127.0.0.1:1/",
        connections=32,
        threads=1,
        duration_s=3,
        loadavg=1.0,
        result=result,
        cpu_percent={},
        cpu_seconds={},
        cpu_us_per_req=cpu_us,
    )
