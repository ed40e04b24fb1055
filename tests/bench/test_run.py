"""bench/run.py: argument checks, the latency, floor and ceiling modes' ratios and targets."""

import pytest
from cluster import parse_engine, parse_engines, storage_args
from machine import BenchError
from run import (
    LATENCY_GOALS,
    answer_difference,
    ceiling_ratios,
    floor_ratios,
    latency_ratios,
    parse_args,
    parse_concurrency,
    profiled_concurrency,
)
from wrkrun import parse_wrk

WRK_OUTPUT = """\
Running 3s test @ http://127.0.0.1:5000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     7.06ms    3.01ms  40.12ms   80.00%
  Latency Distribution
     50%    7.06ms
     75%    8.10ms
     90%   10.20ms
     99%  624.00us
  11511 requests in 3.00s, 2.10MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 3
Requests/sec:   3837.00
Transfer/sec:    700.00KB
"""


def test_parse_wrk_reads_rate_percentiles_and_errors() -> None:
    got = parse_wrk(WRK_OUTPUT)
    assert got.rps == 3837.0 and got.requests == 11511 and got.seconds == 3.0
    assert (got.p50_ms, got.p99_ms) == (7.06, 0.624)
    assert got.errors == 3 + 2 + 1


def test_parse_concurrency_keeps_the_order_given() -> None:
    assert parse_concurrency("1,32,128") == [1, 32, 128]
    assert parse_concurrency(" 128, 1 ,") == [128, 1]
    for bad in ("", "0", "1,x", "32,32", "-1"):
        with pytest.raises(ValueError):
            parse_concurrency(bad)


def test_latency_ratios_carry_issue_10s_targets() -> None:
    ratios = {r.name: r for r in latency_ratios([1, 32, 128])}
    assert len(ratios) == 12  # GET and SET, p50 and ops/s, at 3 concurrencies
    get_p50 = ratios["GET p50 proxied/direct c=1"]
    assert (get_p50.numerator, get_p50.denominator) == (
        ("GET", "proxied c=1"),
        ("GET", "direct c=1"),
    )
    assert get_p50.metric == "p50" and str(get_p50.goal) == "<= 4"
    assert str(ratios["SET p50 proxied/direct c=1"].goal) == "<= 4"
    assert str(ratios["GET ops/s proxied/direct c=32"].goal) == ">= 0.5"
    assert str(ratios["SET ops/s proxied/direct c=32"].goal) == ">= 0.35"
    assert sum(r.goal is not None for r in ratios.values()) == len(LATENCY_GOALS)


def test_latency_targets_stay_listed_when_their_concurrency_is_not_run() -> None:
    ratios = latency_ratios([128])
    with_goal = {r.name for r in ratios if r.goal is not None}
    assert with_goal == {
        "GET p50 proxied/direct c=1",
        "SET p50 proxied/direct c=1",
        "GET ops/s proxied/direct c=32",
        "SET ops/s proxied/direct c=32",
    }


def test_floor_ratios_judge_both_floors_and_the_proxy_by_the_same_targets() -> None:
    ratios = {r.name: r for r in floor_ratios([1, 32])}
    assert len(ratios) == 40  # 5 ratios for GET and SET, p50 and ops/s, at 2 concurrencies
    for op, metric, c in LATENCY_GOALS:
        goal = LATENCY_GOALS[(op, metric, c)]
        for name in ("floor", "stack", "proxied"):
            judged = ratios[f"{op} {metric} {name}/direct c={c}"]
            assert (judged.numerator, judged.denominator) == (
                (op, f"{name} c={c}"),
                (op, f"direct c={c}"),
            )
            assert judged.goal == goal
        stack_floor = ratios[f"{op} {metric} stack/floor c={c}"]
        assert (stack_floor.numerator, stack_floor.denominator) == (
            (op, f"stack c={c}"),
            (op, f"floor c={c}"),
        )
        assert stack_floor.goal is None
        assert ratios[f"{op} {metric} proxied/stack c={c}"].goal is None
    assert sum(r.goal is not None for r in ratios.values()) == 3 * len(LATENCY_GOALS)


def test_floor_mode_runs_at_1_and_32_and_keeps_the_proxys_defaults() -> None:
    assert parse_args(["floor"]).concurrency == [1, 32]
    assert parse_args(["floor", "--concurrency", "1,8"]).concurrency == [1, 8]
    assert parse_args(["floor", "--storage", "lmdb:always"]).storage == "lmdb:always"
    for argv in (["floor", "--connections", "8"], ["floor", "--r", "1"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_the_profiled_concurrency_is_32_or_the_nearest() -> None:
    assert profiled_concurrency([1, 32, 128]) == 32
    assert profiled_concurrency([1, 128]) == 1
    assert profiled_concurrency([16, 48]) == 16


def test_ceiling_judges_the_same_request_only() -> None:
    ratios = ceiling_ratios()
    judged = [r for r in ratios if r.goal is not None]
    assert [(r.numerator, r.denominator, str(r.goal)) for r in judged] == [
        (("GET", "node /get"), ("GET", "bare /get"), ">= 0.75")
    ]


def test_answer_difference_allows_only_the_nodes_version() -> None:
    bare = b'{"key": "k0", "value": "vv"}\n'
    assert answer_difference(b'{"key": "k0", "value": "vv", "version": "1-a"}\n', bare) == {
        "version"
    }
    assert answer_difference(b'{"key": "k0", "value": "v"}', bare) == {"value"}
    assert answer_difference(b"[]", bare) == {"<not a JSON object>"}


def test_latency_mode_takes_concurrency_not_connections() -> None:
    args = parse_args(["latency"])
    assert args.concurrency == [1, 32, 128]
    assert args.storage == "memory"
    assert parse_args(["latency", "--concurrency", "32"]).concurrency == [32]
    with pytest.raises(SystemExit):
        parse_args(["latency", "--connections", "8"])
    with pytest.raises(SystemExit):
        parse_args(["proxy", "--concurrency", "1,32"])
    with pytest.raises(SystemExit):
        parse_args(["latency", "--concurrency", "1,32", "--threads", "2"])


def test_modes_default_their_connections_and_refuse_options_they_ignore() -> None:
    assert parse_args(["ceiling"]).connections == 32
    assert parse_args(["storage"]).connections == 64
    assert parse_args(["latency", "--replicas", "1", "--r", "1", "--w", "1"]).replicas == 1
    assert parse_args(["latency", "--storage", "lmdb:always"]).storage == "lmdb:always"
    for argv in (
        ["ceiling", "--storage", "lmdb:always"],
        ["storage", "--storage", "memory"],
        ["ceiling", "--replicas", "1"],
        ["latency", "--storage", "lmdb"],
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)


def test_storage_names_parse_into_node_options() -> None:
    assert parse_engine("memory") == ("memory", None)
    lmdb = ["--storage", "lmdb", "--durability", "batch"]
    assert storage_args(parse_engine("lmdb:batch")) == lmdb
    assert parse_engines("memory, lmdb:always") == [("memory", None), ("lmdb", "always")]
    for bad in ("lmdb", "memory:always", "disk"):
        with pytest.raises(BenchError):
            parse_engine(bad)
    with pytest.raises(BenchError):
        parse_engines("memory")
