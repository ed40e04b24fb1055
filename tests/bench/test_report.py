"""bench/report.py: paired ratios per round, their medians, and the targets' verdicts."""

import pytest
from report import Goal, Ratio, ratio_values, summarize, target_line

from tests.bench.helpers import made_run


def test_goal_at_least_and_at_most() -> None:
    assert Goal(">=", 0.5).met(0.5)
    assert not Goal(">=", 0.5).met(0.49)
    assert Goal("<=", 4.0).met(4.0)
    assert not Goal("<=", 4.0).met(4.01)
    assert str(Goal(">=", 0.35)) == ">= 0.35"


def test_goal_and_ratio_refuse_what_they_cannot_judge() -> None:
    with pytest.raises(ValueError):
        Goal(">", 1.0)
    with pytest.raises(ValueError):
        Ratio("x", ("GET", "a"), ("GET", "b"), metric="p75")


def test_ops_ratio_is_per_round_and_skips_a_round_without_both_runs() -> None:
    runs = [
        made_run(1, "GET", "proxied", 500),
        made_run(1, "GET", "direct", 1000),
        made_run(2, "GET", "proxied", 900),
        made_run(2, "GET", "direct", 1000),
        made_run(3, "GET", "proxied", 900),  # its direct run is missing
    ]
    ratio = Ratio("GET", ("GET", "proxied"), ("GET", "direct"))
    assert ratio_values(runs, ratio) == [0.5, 0.9]


def test_p50_ratio_divides_latencies_and_has_no_cpu_ratio() -> None:
    runs = [
        made_run(1, "GET", "proxied c=1", 100, p50_ms=2.0, cpu_us=1000),
        made_run(1, "GET", "direct c=1", 1000, p50_ms=0.25, cpu_us=100),
    ]
    p50 = Ratio("p50", ("GET", "proxied c=1"), ("GET", "direct c=1"), "p50")
    ops = Ratio("ops", ("GET", "proxied c=1"), ("GET", "direct c=1"))
    assert ratio_values(runs, p50) == [8.0]
    assert ratio_values(runs, p50, cpu=True) == []
    assert ratio_values(runs, ops, cpu=True) == [0.1]


def test_summary_judges_the_median_of_per_round_ratios() -> None:
    runs = []
    for n, proxied in enumerate((300, 600, 700), start=1):
        runs += [made_run(n, "GET", "proxied", proxied), made_run(n, "GET", "direct", 1000)]
    ratio = Ratio("GET ops/s", ("GET", "proxied"), ("GET", "direct"), goal=Goal(">=", 0.5))
    summary = summarize(runs, [ratio])
    (target,) = summary["targets"]
    assert target["value"] == pytest.approx(0.6)
    assert target["met"] is True
    assert target["per_round"] == [0.3, 0.6, 0.7]
    (entry,) = summary["ratios"]
    assert entry["goal"] == ">= 0.5" and entry["met"] is True


def test_a_target_whose_runs_were_not_made_is_not_measured() -> None:
    runs = [made_run(1, "GET", "proxied c=1", 100), made_run(1, "GET", "direct c=1", 1000)]
    missing = Ratio("c=32", ("GET", "proxied c=32"), ("GET", "direct c=32"), goal=Goal(">=", 0.5))
    summary = summarize(runs, [missing])
    assert summary["ratios"] == []
    assert summary["targets"] == [
        {"name": "c=32", "goal": ">= 0.5", "value": None, "per_round": [], "met": None}
    ]
    assert target_line(summary["targets"][0]).split()[0] == "n/a"


def test_target_lines_say_pass_or_miss_with_the_number() -> None:
    miss = {"name": "GET p50", "goal": "<= 4", "value": 9.1, "per_round": [9.1], "met": False}
    assert target_line(miss).split()[:4] == ["MISS", "GET", "p50", "="]
    assert "9.100" in target_line(miss)
    passed = {**miss, "value": 3.0, "per_round": [3.0], "met": True}
    assert target_line(passed).split()[0] == "PASS"
