"""The ``shardkv`` command (L{shardkv.client.cli}) without a cluster: parsing, output, exit codes.

Each command runs through L{main} with a fake HTTP client that answers from a
table of canned replies and records what was sent; the real thing, as a
subprocess against real processes, is tests/system/test_cli.py.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from shardkv.client import cli
from shardkv.client.api import Reply
from shardkv.client.blocking import NotSent

PROXY = "http://proxy:8080"
TOKEN = "cli-token-0123456789abcdef"

Answer = Reply | BaseException | Callable[[], Reply]


def reply(status: int, body: object = b"", headers: dict[str, str] | None = None) -> Reply:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Reply(status, headers or {}, data)


def error(status: int, code: str, message: str = "nope") -> Reply:
    return reply(status, {"error": code, "message": message})


@dataclass
class Sent:
    method: str
    url: str
    body: bytes | str | None
    json: object
    headers: dict[str, Any]


@dataclass
class FakeClient:
    """What the CLI uses of L{BlockingClient}: ``request``, ``at``, ``base_url``, ``close``.

    ``routes`` maps ``(method, full URL)`` to a reply, an exception to raise,
    or a list of those, used up in order (the last one repeats).
    """

    routes: dict[tuple[str, str], Answer | list[Answer]]
    base_url: str = PROXY
    sent: list[Sent] = field(default_factory=list)
    closed: bool = False

    def at(self, base_url: str, *, timeout: float | None = None) -> FakeClient:
        return FakeClient(self.routes, base_url, self.sent)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        *,
        json: object = None,
        headers: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Reply:
        url = self.base_url + path
        self.sent.append(Sent(method, url, body, json, dict(headers or {})))
        answer = self.routes.get((method, url))
        if isinstance(answer, list):
            answer = answer.pop(0) if len(answer) > 1 else answer[0]
        if answer is None:
            return error(404, "no_route", f"no route for {path}")
        if isinstance(answer, BaseException):
            raise answer
        return answer if isinstance(answer, Reply) else answer()

    def close(self) -> None:
        self.closed = True


@dataclass
class Result:
    code: int
    out: str
    err: str
    raw: bytes
    client: FakeClient

    def sent(self, method: str, path: str) -> list[Sent]:
        return [s for s in self.client.sent if (s.method, s.url) == (method, PROXY + path)]


def run(
    *argv: str,
    routes: dict[tuple[str, str], Answer | list[Answer]] | None = None,
    stdin: bytes = b"",
    environ: dict[str, str] | None = None,
) -> Result:
    client = FakeClient(routes or {})
    urls: list[str] = []

    def connect(url: str, timeout: float) -> FakeClient:
        urls.append(url)
        client.base_url = url
        return client

    out = Console(file=io.StringIO(), width=160, color_system=None)
    err = Console(file=io.StringIO(), width=160, color_system=None, stderr=True)
    raw = io.BytesIO()
    code = cli.main(
        list(argv),
        environ={"SHARDKV_URL": PROXY} if environ is None else environ,
        stdout=raw,
        stdin=io.BytesIO(stdin),
        out=out,
        err=err,
        connect=connect,  # type: ignore[arg-type]
    )
    return Result(
        code,
        out.file.getvalue(),  # type: ignore[attr-defined]
        err.file.getvalue(),  # type: ignore[attr-defined]
        raw.getvalue(),
        client,
    )


def one_line(text: str) -> str:
    lines = text.splitlines()
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(cli, "POLL_INTERVAL", 0.0)
    yield


# -- the command line -------------------------------------------------------------------


def test_global_options_come_before_the_command() -> None:
    args = cli.build_parser().parse_args(["--url", "http://h:1", "--json", "get", "k"])
    assert (args.url, args.json, args.command, args.key) == ("http://h:1", True, "get", "k")
    with pytest.raises(cli.UsageError, match="unrecognized arguments: --json"):
        cli.build_parser().parse_args(["get", "k", "--json"])


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frob"],
        ["get"],
        ["get", "a", "b"],
        ["--timeout", "soon", "status"],
        ["--timeout", "0", "status"],
        ["nodes"],
        ["nodes", "add", "http://h:1"],
        ["nodes", "add", "h:99999"],
        ["nodes", "add", "h:1", "--weight", "-1"],
        ["nodes", "weight", "h:1", "nan"],
        ["nodes", "remove"],
        ["nodes", "add", "h:1", "--rate", "fast"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv: list[str]) -> None:
    result = run(*argv)
    assert result.code == cli.EXIT_USAGE, result
    assert one_line(result.err).startswith("shardkv: ")
    assert result.client.sent == []


def test_usage_error_as_json() -> None:
    result = run("--json", "frob")
    assert result.code == 2
    assert json.loads(one_line(result.err))["error"] == "usage"


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("--help").code == 0
    assert "COMMAND" in capsys.readouterr().out


def test_the_url_comes_from_the_flag_the_environment_or_the_default() -> None:
    assert cli._url(None, {}) == cli.DEFAULT_URL
    assert cli._url(None, {"SHARDKV_URL": "http://e:1/"}) == "http://e:1"
    assert cli._url("https://f:2", {"SHARDKV_URL": "http://e:1"}) == "https://f:2"
    with pytest.raises(cli.UsageError, match="SHARDKV_URL"):
        cli._url(None, {"SHARDKV_URL": "e:1"})
    result = run("--url", "ftp://x", "status")
    assert result.code == 2 and "--url" in result.err


def test_the_token_is_sent_as_a_bearer_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    (tmp_path / "t").write_text(TOKEN + "\n")
    (tmp_path / "weak").write_text("tiny-secret")
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("GET", PROXY + "/kv/k"): reply(200, b"v")
    }
    for environ, argv in [
        ({"SHARDKV_URL": PROXY, "SHARDKV_TOKEN_FILE": str(tmp_path / "t")}, ["get", "k"]),
        ({"SHARDKV_URL": PROXY}, ["--token-file", str(tmp_path / "t"), "get", "k"]),
    ]:
        result = run(*argv, routes=routes, environ=environ)
        assert result.code == 0, result.err
        assert result.client.sent[0].headers["Authorization"] == f"Bearer {TOKEN}"
    result = run("get", "k", routes=routes)
    assert "Authorization" not in result.client.sent[0].headers

    result = run("--token-file", str(tmp_path / "missing"), "get", "k")
    assert result.code == 2 and "--token-file: cannot read" in one_line(result.err)
    env = {"SHARDKV_URL": PROXY, "SHARDKV_TOKEN_FILE": str(tmp_path / "weak")}
    result = run("get", "k", environ=env)
    assert result.code == 2 and "SHARDKV_TOKEN_FILE" in one_line(result.err)
    assert "tiny-secret" not in result.err


# -- data ---------------------------------------------------------------------------------


def test_get_prints_the_raw_bytes() -> None:
    value = b"\x00\xffno newline"
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("GET", PROXY + "/kv/a%2Fb%20%C3%A9"): reply(200, value, {"etag": '"1-2-p"'})
    }
    result = run("get", "a/b é", routes=routes)
    assert (result.code, result.raw, result.out, result.err) == (0, value, "", "")
    assert result.client.closed


def test_get_json() -> None:
    headers = {"etag": '"1-2-p"', "content-type": "text/plain"}
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("GET", PROXY + "/kv/t"): reply(200, "héllo".encode(), headers),
        ("GET", PROXY + "/kv/b"): reply(200, b"\xff\x00", headers),
    }
    answer = json.loads(run("--json", "get", "t", routes=routes).out)
    assert answer == {
        "key": "t",
        "value": "héllo",
        "version": "1-2-p",
        "content_type": "text/plain",
    }
    answer = json.loads(run("--json", "get", "b", routes=routes).out)
    assert answer["value_base64"] == "/wA=" and "value" not in answer


def test_set_from_the_argument_or_stdin() -> None:
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("PUT", PROXY + "/kv/k"): [
            reply(201, {"key": "k"}, {"etag": '"1-1-p"'}),
            reply(200, {"key": "k"}, {"etag": '"2-1-p"'}),
        ]
    }
    result = run("set", "k", "alice", routes=routes)
    assert (result.code, one_line(result.out)) == (0, "created 'k', version 1-1-p")
    assert result.sent("PUT", "/kv/k")[0].body == b"alice"
    result = run(
        "--json", "set", "k", "-", "--content-type", "image/png", routes=routes, stdin=b"\x89P"
    )
    assert json.loads(result.out) == {"key": "k", "created": False, "version": "2-1-p"}
    sent = result.sent("PUT", "/kv/k")[0]
    assert sent.body == b"\x89P" and sent.headers["Content-Type"] == "image/png"


def test_del() -> None:
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("DELETE", PROXY + "/kv/k"): [
            reply(200, {"key": "k", "deleted": True, "version": "2-1-p"}),
            error(404, "not_found", "no value for key 'k'"),
        ]
    }
    assert one_line(run("del", "k", routes=routes).out) == "deleted 'k', version 2-1-p"
    result = run("del", "k", routes=routes)
    assert (result.code, one_line(result.err)) == (1, "shardkv: no value for key 'k'")


@pytest.mark.parametrize(
    ("answer", "code"),
    [
        (error(404, "not_found"), cli.EXIT_NOT_FOUND),
        (error(404, "unknown_member"), cli.EXIT_NOT_FOUND),
        (error(404, "no_route"), cli.EXIT_UNAVAILABLE),
        (error(400, "invalid_key"), cli.EXIT_UNAVAILABLE),
        (error(409, "move_in_progress"), cli.EXIT_UNAVAILABLE),
        (error(503, "insufficient_replicas"), cli.EXIT_UNAVAILABLE),
        (reply(502, b"<html>Bad Gateway</html>\n<p>"), cli.EXIT_UNAVAILABLE),
        (NotSent("ConnectionRefusedError: refused"), cli.EXIT_UNAVAILABLE),
        (TimeoutError("no result"), cli.EXIT_UNAVAILABLE),
    ],
)
def test_exit_codes(answer: Answer, code: int) -> None:
    routes: dict[tuple[str, str], Answer | list[Answer]] = {("GET", PROXY + "/kv/k"): answer}
    result = run("get", "k", routes=routes)
    assert result.code == code
    assert one_line(result.err).startswith("shardkv: ")
    failure = json.loads(one_line(run("--json", "get", "k", routes=routes).err))
    assert set(failure) == {"error", "message", "status"}


def test_a_bug_is_one_line_too() -> None:
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("GET", PROXY + "/kv/k"): RuntimeError("boom\nsecond line")
    }
    result = run("get", "k", routes=routes)
    assert result.code == cli.EXIT_BUG
    assert one_line(result.err) == "shardkv: internal error: RuntimeError: boom second line"


def test_explain() -> None:
    answer = {"key": "k", "hash": 1, "position": 2, "owner": "a:1", "replicas": []}
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("GET", PROXY + "/explain?key=k"): reply(200, answer)
    }
    assert "owner a:1" in run("explain", "k", routes=routes).out
    assert json.loads(run("--json", "explain", "k", routes=routes).out) == answer


# -- status ---------------------------------------------------------------------------------

CLUSTER = {
    "replicas": 3,
    "r": 2,
    "w": 2,
    "undelivered": 0,
    "epoch": 1,
    "nodes": [
        {
            "node": "a:1",
            "weight": 1.0,
            "share": 0.6,
            "health": {"status": "up"},
            "hints_waiting": 0,
        },
        {
            "node": "b:1",
            "weight": 2.0,
            "share": 0.4,
            "health": {"status": "down"},
            "hints_waiting": 5,
        },
    ],
    "members": [
        {"id": "a:1", "address": "a:1", "weight": 1.0, "state": "active"},
        {"id": "b:1", "address": "b:1", "weight": 2.0, "state": "active"},
    ],
}
METRICS = """\
# HELP shardkv_replica_operation_duration_seconds replica latency
# TYPE shardkv_replica_operation_duration_seconds histogram
shardkv_replica_operation_duration_seconds_bucket{le="0.01",node="a:1",op="get"} 100.0
shardkv_replica_operation_duration_seconds_bucket{le="+Inf",node="a:1",op="get"} 100.0
shardkv_replica_operation_duration_seconds_count{node="a:1",op="get"} 100.0
shardkv_replica_operation_duration_seconds_sum{node="a:1",op="get"} 0.1
"""


def status_routes(metrics: Answer) -> dict[tuple[str, str], Answer | list[Answer]]:
    return {
        ("GET", PROXY + "/cluster"): reply(200, CLUSTER),
        ("GET", PROXY + "/metrics"): metrics,
        ("GET", "http://a:1/health"): reply(200, {"status": "ok", "storage": {"keys": 42}}),
        ("GET", "http://b:1/health"): NotSent("refused"),
    }


def test_status_table() -> None:
    result = run("status", routes=status_routes(reply(200, METRICS.encode())))
    assert result.code == 0, result.err
    row_a = next(line for line in result.out.splitlines() if "a:1" in line)
    row_b = next(line for line in result.out.splitlines() if "b:1" in line)
    assert "up" in row_a and "60.0%" in row_a and "42" in row_a and "9.9 ms" in row_a
    assert "down" in row_b and "40.0%" in row_b and " 5 " in row_b
    assert row_b.count(" - ") == 2  # keys and p99
    assert "epoch 1 · N=3 R=2 W=2 · no move" in result.out
    assert all("Authorization" not in s.headers for s in result.client.sent if "/health" in s.url)


@pytest.mark.parametrize(
    "metrics", [error(404, "no_route"), reply(200, b"<html>"), NotSent("gone"), error(403, "x")]
)
def test_status_without_metrics(metrics: Answer) -> None:
    result = run("--json", "status", routes=status_routes(metrics))
    assert result.code == 0, result.err
    answer = json.loads(result.out)
    assert [n["p99_s"] for n in answer["nodes"]] == [None, None]
    assert [n["keys"] for n in answer["nodes"]] == [42, None]
    assert answer["epoch"] == 1


def test_status_needs_the_cluster() -> None:
    result = run("status", routes={("GET", PROXY + "/cluster"): NotSent("refused")})
    assert result.code == 3 and "cannot reach http://proxy:8080" in one_line(result.err)


# -- membership ---------------------------------------------------------------------------

PLAN = {
    "base_epoch": 1,
    "keys_moving": 10,
    "bytes_moving": 100,
    "keys_total": 30,
    "fraction": 0.333,
    "ideal_fraction": 0.25,
    "pairs": [{"from": "a:1", "to": "c:1", "keys": 10, "bytes": 100}],
    "shares": {"before": {"a:1": 1.0}, "after": {"a:1": 0.75, "c:1": 0.25}},
    "weights": {"before": {"a:1": 1.0}, "after": {"a:1": 1.0, "c:1": 2.0}},
}


@pytest.mark.parametrize(
    ("argv", "change"),
    [
        (["nodes", "add", "c:1", "--weight", "2"], {"add": [{"address": "c:1", "weight": 2.0}]}),
        (
            ["nodes", "add", "c:1", "--rate", "50"],
            {"add": [{"address": "c:1", "weight": 1.0}], "rate": 50},
        ),
        (["nodes", "remove", "a:1", "b:1"], {"remove": ["a:1", "b:1"]}),
        (["nodes", "weight", "a:1", "1.5"], {"weights": {"a:1": 1.5}}),
    ],
)
def test_nodes_stage_a_plan_and_print_it(argv: list[str], change: dict[str, Any]) -> None:
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("POST", PROXY + "/admin/plan"): reply(200, PLAN)
    }
    result = run(*argv, routes=routes)
    assert result.code == 0, result.err
    assert result.sent("POST", "/admin/plan")[0].json == change
    assert "moves 10 of 30 copies" in result.out and "- → 2" in result.out
    assert "shardkv commit" in result.err
    assert json.loads(run("--json", *argv, routes=routes).out) == PLAN


def test_nodes_remove_an_unknown_member_is_not_found() -> None:
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("POST", PROXY + "/admin/plan"): error(404, "unknown_member", "no member 'x:1'")
    }
    result = run("nodes", "remove", "x:1", routes=routes)
    assert (result.code, one_line(result.err)) == (1, "shardkv: no member 'x:1'")


def test_plan_shows_the_staged_plan() -> None:
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("GET", PROXY + "/admin/plan"): [reply(200, PLAN), error(409, "no_plan", "no plan")]
    }
    assert "moves 10 of 30 copies" in run("plan", routes=routes).out
    result = run("plan", routes=routes)
    assert (result.code, one_line(result.err)) == (3, "shardkv: no plan")


def status(state: str, epoch: int, moved: int = 0, **more: Any) -> dict[str, Any]:
    return {
        "state": state,
        "epoch": epoch,
        "keys_moved": moved,
        "keys_total": 10,
        "aborted": False,
        "waiting_for": [],
        "error": None,
        "transfers": [],
        **more,
    }


def commit_routes(*later: Answer) -> dict[tuple[str, str], Answer | list[Answer]]:
    return {
        ("POST", PROXY + "/admin/commit"): reply(
            200, {"epoch": 2, "map": {}, "rebalance": status("copying", 2)}
        ),
        ("GET", PROXY + "/admin/rebalance"): list(later),
    }


def test_commit_watches_the_move_until_idle() -> None:
    routes = commit_routes(
        reply(200, status("copying", 2, 5)),
        reply(200, status("idle", 1)),  # a stale answer from before the commit: not done
        reply(200, status("handover", 3, 10)),
        reply(200, status("idle", 5, 10)),
    )
    result = run("commit", routes=routes)
    assert result.code == 0, result.err
    assert one_line(result.out) == "done: idle at epoch 5, 10/10 keys"
    assert len(result.sent("GET", "/admin/rebalance")) == 4
    assert result.sent("POST", "/admin/abort") == []


def test_commit_json_waits_and_prints_the_final_state() -> None:
    result = run("--json", "commit", routes=commit_routes(reply(200, status("idle", 5, 10))))
    answer = json.loads(result.out)
    assert answer["epoch"] == 2 and answer["rebalance"]["state"] == "idle"
    assert result.err == ""


def test_commit_no_wait() -> None:
    result = run("commit", "--no-wait", routes=commit_routes())
    assert result.code == 0 and "epoch 2" in result.out
    assert result.sent("GET", "/admin/rebalance") == []


def test_ctrl_c_detaches_without_aborting() -> None:
    routes = commit_routes(reply(200, status("copying", 2, 5)), KeyboardInterrupt())
    result = run("commit", routes=routes)
    assert result.code == cli.EXIT_INTERRUPTED
    line = one_line(result.err.splitlines()[-1])
    assert "detached" in line and "not aborted" in line
    assert result.sent("POST", "/admin/abort") == []


def test_a_watch_rides_out_a_proxy_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    routes = commit_routes(NotSent("refused"), NotSent("refused"), reply(200, status("idle", 5)))
    assert run("commit", routes=routes).code == 0
    monkeypatch.setattr(cli, "LOST_PROXY_GRACE", -1.0)
    result = run("commit", routes=commit_routes(NotSent("refused")))
    assert result.code == 3
    assert "the move goes on without this command" in result.err.splitlines()[-1]


def test_a_watch_stops_at_a_refusal() -> None:
    result = run("commit", routes=commit_routes(error(403, "forbidden", "no token")))
    assert result.code == 3 and result.err.splitlines()[-1] == "shardkv: no token"


def test_rebalance_and_abort() -> None:
    routes: dict[tuple[str, str], Answer | list[Answer]] = {
        ("GET", PROXY + "/admin/rebalance"): [
            reply(200, status("copying", 2, 5)),
            reply(200, status("copying", 2, 7)),
            reply(200, status("idle", 4, 10)),
        ],
        ("POST", PROXY + "/admin/abort"): [
            reply(200, {"epoch": 3, "map": {}}),
            error(409, "no_move", "no move is in progress at epoch 4"),
        ],
    }
    assert "copying at epoch 2: 5/10 keys" in run("rebalance", routes=routes).out
    assert "idle at epoch 4" in run("rebalance", "--watch", routes=routes).out
    assert "aborting at epoch 3" in run("abort", routes=routes).out
    result = run("abort", routes=routes)
    assert (result.code, one_line(result.err)) == (3, "shardkv: no move is in progress at epoch 4")
