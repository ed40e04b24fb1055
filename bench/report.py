"""Tables, paired ratios and targets: what ``bench/run.py`` prints and stores.

A ratio compares two runs of the same round (A and B back to back), because
on this shared box absolute figures move by 2x between runs and paired ratios
by 10-20 %. The summary gives the median of the per-round values. A ratio may
carry a L{Goal}, one of issue 10's targets; the summary then says PASS or MISS
for it, as information only (the exit status stays about errors).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from wrkrun import Run

METRICS: dict[str, Callable[[Run], float]] = {
    # What a ratio divides. ops/s: higher is better; p50/p99 latency: lower is.
    "ops/s": lambda run: run.result.rps,
    "p50": lambda run: run.result.p50_ms,
    "p99": lambda run: run.result.p99_ms,
}


@dataclass(frozen=True)
class Goal:
    """A target for a ratio's median: ``value >= bound`` or ``value <= bound``."""

    sense: str  # ">=" or "<="
    bound: float

    def __post_init__(self) -> None:
        if self.sense not in (">=", "<="):
            raise ValueError(f"a goal is >= or <=, not {self.sense!r}")

    def met(self, value: float) -> bool:
        return value >= self.bound if self.sense == ">=" else value <= self.bound

    def __str__(self) -> str:
        return f"{self.sense} {self.bound:g}"


@dataclass(frozen=True)
class Ratio:
    """numerator/denominator, both (op, target), computed within each round.

    ``metric`` is what is divided (L{METRICS}): ops/s by default, or a
    latency percentile (proxied p50 / direct p50: how many times slower).
    """

    name: str
    numerator: tuple[str, str]
    denominator: tuple[str, str]
    metric: str = "ops/s"
    goal: Goal | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; one of {', '.join(METRICS)}")


def fmt_ms(ms: float) -> str:
    if ms < 1.0:
        return f"{ms * 1000:.0f}us"
    if ms < 100.0:
        return f"{ms:.2f}ms"
    return f"{ms:.0f}ms"


def fmt_cpu(cpu: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.0f}%" for name, value in cpu.items())


TARGET_WIDTH = 14  # "proxied c=128"


def row(run: Run) -> str:
    r = run.result
    flag = "  <-- ERRORS" if run.flagged else ""
    sock = sum(r.socket_errors.values())
    return (
        f"  {run.op:<4} {run.target:<{TARGET_WIDTH}} {r.rps:>10,.0f} {fmt_ms(r.p50_ms):>9} "
        f"{fmt_ms(r.p99_ms):>9} {run.cpu_us_per_req:>8,.0f} {r.non_2xx:>7} {sock:>7}   "
        f"{fmt_cpu(run.cpu_percent)}{flag}"
    )


HEADER = (
    f"  {'op':<4} {'target':<{TARGET_WIDTH}} {'ops/s':>10} {'p50':>9} {'p99':>9} "
    f"{'CPUus/op':>8} {'non2xx':>7} {'sockerr':>7}   CPU use of the processes serving"
)


def ratio_values(runs: Sequence[Run], ratio: Ratio, cpu: bool = False) -> list[float]:
    """One value per round that has both runs.

    With ``cpu``, the ratio of CPU cost instead of throughput: denominator's
    CPU per request over numerator's. That is the throughput ratio to expect
    if each serving process had a core to itself, and it moves far less with
    the load on this shared box than ops/s do. Only ops/s ratios have one.
    """
    if cpu and ratio.metric != "ops/s":
        return []
    metric = METRICS[ratio.metric]
    by_round: dict[int, dict[tuple[str, str], Run]] = {}
    for run in runs:
        by_round.setdefault(run.round, {})[(run.op, run.target)] = run
    values = []
    for _, got in sorted(by_round.items()):
        num, den = got.get(ratio.numerator), got.get(ratio.denominator)
        if num is None or den is None:
            continue
        if cpu:
            if num.cpu_us_per_req:
                values.append(den.cpu_us_per_req / num.cpu_us_per_req)
        elif metric(den):
            values.append(metric(num) / metric(den))
    return values


def summarize(runs: Sequence[Run], ratios: Sequence[Ratio]) -> dict[str, Any]:
    """Per (op, target): medians over the rounds; per ratio: the median of its
    per-round values, and whether it meets its goal; ``targets``: one entry per
    goal, ``value`` None when its runs were not made (not in ``--concurrency``)."""
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
    targets = []
    for ratio in ratios:
        values = ratio_values(runs, ratio)
        cpu = ratio_values(runs, ratio, cpu=True)
        median = statistics.median(values) if values else None
        met = None if ratio.goal is None or median is None else ratio.goal.met(median)
        if values:
            out_ratios.append(
                {
                    "name": ratio.name,
                    "metric": ratio.metric,
                    "per_round": [round(v, 6) for v in values],
                    "median": median,
                    "min": min(values),
                    "max": max(values),
                    "cpu_per_round": [round(v, 6) for v in cpu],
                    "cpu_median": statistics.median(cpu) if cpu else None,
                    "goal": None if ratio.goal is None else str(ratio.goal),
                    "met": met,
                }
            )
        if ratio.goal is not None:
            targets.append(
                {
                    "name": ratio.name,
                    "goal": str(ratio.goal),
                    "value": median,
                    "per_round": [round(v, 6) for v in values],
                    "met": met,
                }
            )
    return {"rows": rows, "ratios": out_ratios, "targets": targets}


def print_round_ratios(runs: Sequence[Run], ratios: Sequence[Ratio]) -> None:
    parts = []
    for ratio in ratios:
        values = ratio_values(runs, ratio)
        cpu = ratio_values(runs, ratio, cpu=True)
        if values:
            extra = f" (CPU-cost {cpu[-1]:.3f})" if cpu else ""
            parts.append(f"{ratio.name} {values[-1]:.3f}{extra}")
    if len(parts) > 3:
        for part in parts:
            print(f"  ratio {part}")
    elif parts:
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
            f"  {r['op']:<4} {r['target']:<{TARGET_WIDTH}} {r['ops_per_s_median']:>8,.0f} "
            f"{span:<16} p50 {fmt_ms(r['p50_ms_median']):>8}  "
            f"p99 {fmt_ms(r['p99_ms_median']):>8}  CPU {r['cpu_us_per_op_median']:,.0f} us/op"
            f"{errors}"
        )
    width = max((len(q["name"]) for q in summary["ratios"]), default=22)
    for q in summary["ratios"]:
        per_round = ", ".join(f"{v:.3f}" for v in q["per_round"])
        print(
            f"  ratio {q['name']:<{width}} median {q['median']:.3f} "
            f"({q['min']:.3f}..{q['max']:.3f})   per round: {per_round}"
        )
        if q["cpu_median"] is not None:
            cpu_rounds = ", ".join(f"{v:.3f}" for v in q["cpu_per_round"])
            print(
                f"        {'':<{width}} CPU-cost ratio median {q['cpu_median']:.3f}"
                f"   per round: {cpu_rounds}"
            )
    print_targets(summary["targets"])


def target_line(target: dict[str, Any]) -> str:
    """``PASS``/``MISS`` (or ``n/a``), the ratio's name, its goal and its median."""
    value = target["value"]
    if value is None:
        return f"  n/a   {target['name']} (target {target['goal']}): not measured in this run"
    verdict = "PASS" if target["met"] else "MISS"
    per_round = ", ".join(f"{v:.3f}" for v in target["per_round"])
    return (
        f"  {verdict}  {target['name']} = {value:.3f} (target {target['goal']}; "
        f"median of per-round {per_round})"
    )


def print_targets(targets: Sequence[dict[str, Any]]) -> None:
    if not targets:
        return
    print("targets (issue 10; information only, the exit status does not depend on them):")
    for target in targets:
        print(target_line(target))
