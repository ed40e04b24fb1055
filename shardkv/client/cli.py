"""``shardkv``: the command-line client of a shardkv cluster (through one of its proxies).

    shardkv [--url URL] [--token-file F] [--json] [--timeout S] COMMAND ...

The global options come before the command, as in ``git`` or ``kubectl``. It
is built on the package's own API client (L{shardkv.client.blocking}), so it
sees the cluster exactly as any other client does, and it only fetches and
prints: the tables are L{shardkv.client.render}, the p99 estimate
L{shardkv.client.quantiles}. ``--json`` prints the machine-readable answer
instead of a table, for every command.

Exit codes, for scripts:

    0  done
    1  not found (a key, or a member a change names)
    2  usage: a bad option or argument, an unreadable token file
    3  the cluster refused (any other HTTP error) or could not be reached
    4  a bug in this command (the one line says what)
    130  interrupted (Ctrl-C); a move being watched goes on

Every error is one line on stderr (with ``--json``, one JSON object
``{"error", "message", "status"}``), never a traceback.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

from rich.console import Console, RenderableType
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from shardkv.client import render
from shardkv.client.api import Reply, quote_key
from shardkv.client.blocking import BlockingClient, TransportError
from shardkv.client.quantiles import p99_by_node

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV = "SHARDKV_URL"
TOKEN_ENV = "SHARDKV_TOKEN_FILE"

EXIT_OK = 0
EXIT_NOT_FOUND = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
EXIT_BUG = 4
EXIT_INTERRUPTED = 130

NODE_HEALTH_TIMEOUT = 2.0
"""Seconds ``status`` waits for a node's own ``/health``: a down node costs this, once."""
PIPE_WIDTH = 200
"""Columns of output that is not a terminal."""
POLL_INTERVAL = 0.5
"""Seconds between two looks at a move's progress."""
LOST_PROXY_GRACE = 30.0
"""Seconds a watch keeps retrying a proxy that stopped answering before giving up."""


# -- failures -------------------------------------------------------------------------


class CommandFailed(Exception):
    """Ends the command with one line on stderr and an exit code."""

    def __init__(
        self, message: str, code: str, exit_code: int = EXIT_UNAVAILABLE, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.exit_code = exit_code
        self.status = status


class UsageError(CommandFailed):
    def __init__(self, message: str) -> None:
        super().__init__(message, "usage", EXIT_USAGE)


class Detached(Exception):
    """Ctrl-C while watching a move: the move is not touched."""


def refused(reply: Reply) -> CommandFailed:
    """The cluster's answer as a failure: 404 is "not found" (1), the rest 3.

    ``no_route`` is a 404 too, but it means this proxy does not serve the
    route (an older version, or membership not configured): the cluster's
    refusal, not a missing key.
    """
    try:
        status, code = reply.error()
        message = str(reply.json()["message"])
    except ValueError:
        status, code = reply.status, f"http_{reply.status}"
        message = reply.text.strip().splitlines()[0][:200] if reply.text.strip() else "no body"
    not_found = status == 404 and code != "no_route"
    return CommandFailed(
        message, code, EXIT_NOT_FOUND if not_found else EXIT_UNAVAILABLE, status=status
    )


# -- the parser ---------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (L{UsageError}) rather than usage + exit."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _rate(text: str) -> int:
    if not text.isascii() or not text.isdigit():
        raise argparse.ArgumentTypeError(f"a whole number of keys per second, not {text!r}")
    return int(text)


def _address(text: str) -> str:
    host, _, port = text.rpartition(":")
    if "://" in text or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"give the node as host:port, not {text!r}")
    return text


def _key(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("a key must be UTF-8") from None
    return text


def build_parser() -> Parser:
    parser = Parser(
        prog="shardkv",
        description="The command-line client of a shardkv cluster, through one of its proxies.",
        epilog="Exit codes: 0 ok, 1 not found, 2 usage, 3 the cluster refused or is unavailable.",
    )
    parser.add_argument(
        "--url",
        default=None,
        help=f"the proxy (default ${URL_ENV}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="F",
        help=f"the token to send as Authorization: Bearer (default ${TOKEN_ENV})",
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument(
        "--timeout",
        type=_positive,
        default=5.0,
        metavar="S",
        help="seconds to wait for each answer (default 5)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    get = commands.add_parser("get", help="print a key's value (its raw bytes)")
    get.add_argument("key", type=_key, metavar="KEY")
    get.set_defaults(run=cmd_get)

    put = commands.add_parser("set", help="store a value ('-' reads it from stdin)")
    put.add_argument("key", type=_key, metavar="KEY")
    put.add_argument("value", metavar="VALUE", help="the value, or - for stdin")
    put.add_argument("--content-type", default=None, metavar="TYPE", help="stored with the value")
    put.set_defaults(run=cmd_set)

    delete = commands.add_parser("del", help="delete a key")
    delete.add_argument("key", type=_key, metavar="KEY")
    delete.set_defaults(run=cmd_del)

    explain = commands.add_parser("explain", help="where a key lives and what each replica holds")
    explain.add_argument("key", type=_key, metavar="KEY")
    explain.set_defaults(run=cmd_explain)

    status = commands.add_parser("status", help="one table of the nodes")
    status.set_defaults(run=cmd_status)

    nodes = commands.add_parser("nodes", help="stage a membership change and print its plan")
    change = nodes.add_subparsers(dest="change", metavar="CHANGE", required=True)
    add = change.add_parser("add", help="add a node (started empty)")
    add.add_argument("address", type=_address, metavar="ADDR", help="host:port")
    add.add_argument("--weight", type=_positive, default=1.0, metavar="W")
    add.add_argument("--rate", type=_rate, default=None, metavar="N", help="keys/s for the move")
    add.set_defaults(run=cmd_nodes_add)
    remove = change.add_parser("remove", help="remove one or more members")
    remove.add_argument("ids", nargs="+", metavar="ID")
    remove.add_argument("--rate", type=_rate, default=None, metavar="N", help="keys/s for the move")
    remove.set_defaults(run=cmd_nodes_remove)
    reweight = change.add_parser("weight", help="give a member another weight")
    reweight.add_argument("id", metavar="ID")
    reweight.add_argument("weight", type=_positive, metavar="W")
    reweight.add_argument(
        "--rate", type=_rate, default=None, metavar="N", help="keys/s for the move"
    )
    reweight.set_defaults(run=cmd_nodes_weight)

    plan = commands.add_parser("plan", help="print the plan staged on this proxy")
    plan.set_defaults(run=cmd_plan)

    commit = commands.add_parser(
        "commit", help="start the staged change; a live progress bar until the move is idle"
    )
    commit.add_argument("--no-wait", action="store_true", help="return once the move has started")
    commit.set_defaults(run=cmd_commit)

    rebalance = commands.add_parser("rebalance", help="the move's progress")
    rebalance.add_argument("--watch", action="store_true", help="a progress bar until idle")
    rebalance.set_defaults(run=cmd_rebalance)

    abort = commands.add_parser("abort", help="head a running move back to the previous placement")
    abort.set_defaults(run=cmd_abort)
    return parser


# -- what every command works with --------------------------------------------------------


@dataclass
class Context:
    """The proxy, the token and the outputs of one invocation."""

    client: BlockingClient
    token: str | None
    json: bool
    out: Console
    err: Console
    stdout: IO[bytes]
    stdin: IO[bytes]
    clock: Callable[[], float] = field(default=time.monotonic)
    sleep: Callable[[float], None] = field(default=time.sleep)

    @property
    def url(self) -> str:
        return self.client.base_url

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def send(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """One request to the proxy, whatever its status; L{CommandFailed} without an answer."""
        try:
            return self.client.request(
                method, path, body, json=json_body, headers=self.headers(headers)
            )
        except (TransportError, TimeoutError) as e:
            raise CommandFailed(f"cannot reach {self.url}: {e}", "unavailable") from None

    def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        json_body: object = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """L{send}, and a 2xx answer or L{CommandFailed}."""
        reply = self.send(method, path, body, json_body=json_body, headers=headers)
        if not reply.ok:
            raise refused(reply)
        return reply

    def call_json(self, method: str, path: str, *, json_body: object = None) -> Any:
        reply = self.call(method, path, json_body=json_body)
        try:
            return reply.json()
        except ValueError:
            raise CommandFailed(
                f"{method} {path} answered HTTP {reply.status} without JSON", "bad_answer"
            ) from None

    def show(self, data: object, view: RenderableType | str | None = None) -> None:
        """``data`` as JSON with ``--json``, else ``view``."""
        if self.json:
            print_json(self.out, data)
        elif view is not None:
            self.out.print(view)


def print_json(console: Console, data: object) -> None:
    """One JSON document on one line (``jq``-friendly), no styling."""
    console.file.write(json.dumps(data, ensure_ascii=False) + "\n")
    console.file.flush()


def _etag(reply: Reply) -> str | None:
    tag = reply.headers.get("etag")
    return tag[1:-1] if tag and len(tag) >= 2 and tag[0] == tag[-1] == '"' else tag


# -- data commands ------------------------------------------------------------------------


def cmd_get(ctx: Context, args: argparse.Namespace) -> int:
    reply = ctx.call("GET", "/kv/" + quote_key(args.key))
    if ctx.json:
        answer: dict[str, Any] = {"key": args.key}
        try:
            answer["value"] = reply.body.decode("utf-8")
        except UnicodeDecodeError:
            answer["value_base64"] = base64.b64encode(reply.body).decode("ascii")
        answer["version"] = _etag(reply)
        answer["content_type"] = reply.headers.get("content-type")
        print_json(ctx.out, answer)
        return EXIT_OK
    ctx.stdout.write(reply.body)
    if ctx.stdout.isatty() and not reply.body.endswith(b"\n"):
        ctx.stdout.write(b"\n")  # a prompt after the value, not glued to it; pipes get the bytes
    ctx.stdout.flush()
    return EXIT_OK


def cmd_set(ctx: Context, args: argparse.Namespace) -> int:
    value = ctx.stdin.read() if args.value == "-" else os.fsencode(args.value)
    headers = {} if args.content_type is None else {"Content-Type": args.content_type}
    reply = ctx.call("PUT", "/kv/" + quote_key(args.key), value, headers=headers)
    created = reply.status == 201
    version = _etag(reply)
    ctx.show(
        {"key": args.key, "created": created, "version": version},
        f"{'created' if created else 'replaced'} {args.key!r}, version {version}",
    )
    return EXIT_OK


def cmd_del(ctx: Context, args: argparse.Namespace) -> int:
    answer = ctx.call_json("DELETE", "/kv/" + quote_key(args.key))
    ctx.show(answer, f"deleted {args.key!r}, version {answer.get('version')}")
    return EXIT_OK


def cmd_explain(ctx: Context, args: argparse.Namespace) -> int:
    answer = ctx.call_json("GET", "/explain?key=" + quote_key(args.key))
    ctx.show(answer, render.explain_view(answer))
    return EXIT_OK


# -- status ---------------------------------------------------------------------------------


def _metrics(ctx: Context) -> dict[str, dict[str, float | None]] | None:
    """The p99s from the proxy's ``/metrics``, or None when it has none (or they do not parse)."""
    try:
        reply = ctx.send("GET", "/metrics")
    except CommandFailed:
        return None
    if reply.status != 200:
        return None
    try:
        return p99_by_node(reply.text)
    except ValueError:
        return None


def _node_reports(
    ctx: Context, addresses: Mapping[str, str]
) -> dict[str, Mapping[str, Any] | None]:
    """Each node's own ``/health`` (open, so sent without the token), in parallel; None when
    a node does not answer with JSON in time. Nodes are asked over plain HTTP."""

    def one(address: str) -> Mapping[str, Any] | None:
        try:
            client = ctx.client.at(f"http://{address}", timeout=NODE_HEALTH_TIMEOUT)
            payload = client.request("GET", "/health").json()
        except (TransportError, TimeoutError, ValueError):
            return None
        return payload if isinstance(payload, dict) else None

    if not addresses:
        return {}
    with ThreadPoolExecutor(max_workers=min(16, len(addresses))) as pool:
        results = dict(zip(addresses, pool.map(one, addresses.values()), strict=True))
    return results


def cmd_status(ctx: Context, args: argparse.Namespace) -> int:
    cluster = ctx.call_json("GET", "/cluster")
    if not isinstance(cluster, dict):
        raise CommandFailed("/cluster did not answer a JSON object", "bad_answer")
    addresses = {n["node"]: n["node"] for n in cluster.get("nodes", []) if isinstance(n, dict)}
    for member in cluster.get("members", []):
        if isinstance(member, dict) and "id" in member:
            addresses[member["id"]] = str(member.get("address") or member["id"])
    rows = render.status_rows(cluster, _metrics(ctx), _node_reports(ctx, addresses))
    summary = {k: cluster.get(k) for k in ("epoch", "replicas", "r", "w", "phase", "undelivered")}
    ctx.show(
        {**summary, "rebalance": cluster.get("rebalance"), "nodes": rows},
        render.status_table(rows, title=render.status_summary(cluster)),
    )
    return EXIT_OK


# -- membership -------------------------------------------------------------------------------


def _stage(ctx: Context, change: dict[str, Any], rate: int | None) -> int:
    if rate is not None:
        change["rate"] = rate
    plan = ctx.call_json("POST", "/admin/plan", json_body=change)
    ctx.show(plan, render.plan_view(plan))
    if not ctx.json:
        ctx.err.print("staged on this proxy: `shardkv commit` starts the move")
    return EXIT_OK


def cmd_nodes_add(ctx: Context, args: argparse.Namespace) -> int:
    return _stage(ctx, {"add": [{"address": args.address, "weight": args.weight}]}, args.rate)


def cmd_nodes_remove(ctx: Context, args: argparse.Namespace) -> int:
    return _stage(ctx, {"remove": list(args.ids)}, args.rate)


def cmd_nodes_weight(ctx: Context, args: argparse.Namespace) -> int:
    return _stage(ctx, {"weights": {args.id: args.weight}}, args.rate)


def cmd_plan(ctx: Context, args: argparse.Namespace) -> int:
    plan = ctx.call_json("GET", "/admin/plan")
    ctx.show(plan, render.plan_view(plan))
    return EXIT_OK


def cmd_commit(ctx: Context, args: argparse.Namespace) -> int:
    answer = ctx.call_json("POST", "/admin/commit")
    epoch = answer.get("epoch") if isinstance(answer, dict) else None
    if args.no_wait:
        ctx.show(answer, f"committed: epoch {epoch}; the move has started")
        return EXIT_OK
    first = answer.get("rebalance") if isinstance(answer, dict) else None
    try:
        if not ctx.json:
            ctx.err.print(
                f"committed: epoch {epoch}; watching the move (Ctrl-C detaches, it goes on)"
            )
        final = watch(ctx, first if isinstance(first, dict) else None, after_epoch=epoch)
    except KeyboardInterrupt:  # between the two: still detached, never an abort
        raise Detached() from None
    ctx.show(
        {**answer, "rebalance": final},
        f"done: idle at epoch {final.get('epoch')}, {render.rebalance_line(final)}",
    )
    return EXIT_OK


def cmd_rebalance(ctx: Context, args: argparse.Namespace) -> int:
    status = ctx.call_json("GET", "/admin/rebalance")
    if args.watch and status.get("state") != "idle":
        status = watch(ctx, status, after_epoch=None)
    ctx.show(status, render.rebalance_view(status))
    return EXIT_OK


def cmd_abort(ctx: Context, args: argparse.Namespace) -> int:
    answer = ctx.call_json("POST", "/admin/abort")
    ctx.show(
        answer,
        f"aborting at epoch {answer.get('epoch')}: the move heads back to the previous "
        "placement (`shardkv rebalance --watch` follows it)",
    )
    return EXIT_OK


def finished(status: Mapping[str, Any], after_epoch: int | None) -> bool:
    """Is the move over? ``idle``, at a later epoch than the commit's when there was one
    (each phase is a new epoch, so an ``idle`` at the commit's epoch is from before it)."""
    if status.get("state") != "idle":
        return False
    epoch = status.get("epoch")
    return after_epoch is None or not isinstance(epoch, int) or epoch > after_epoch


def watch(ctx: Context, first: dict[str, Any] | None, after_epoch: int | None) -> dict[str, Any]:
    """Poll ``/admin/rebalance`` until the move is idle, drawing a progress bar on stderr.

    Ctrl-C raises L{Detached} and leaves the move alone. A proxy that stops
    answering is retried for L{LOST_PROXY_GRACE} seconds (it may be restarting;
    the move does not need it).
    """
    status = first
    lost_since: float | None = None
    try:
        progress = Progress(
            TextColumn("[bold]{task.description:<9}"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[line]}"),
            console=ctx.err,
            disable=ctx.json,
        )
        with progress:
            task = progress.add_task("starting", total=None, line="")
            while True:
                if status is not None:
                    total = status.get("keys_total")
                    progress.update(
                        task,
                        description=str(status.get("state")),
                        total=total if isinstance(total, int) and total > 0 else None,
                        completed=status.get("keys_moved") or 0,
                        line=render.rebalance_line(status),
                    )
                    if finished(status, after_epoch):
                        if not isinstance(total, int) or total <= 0:
                            progress.update(task, total=1, completed=1)
                        return status
                ctx.sleep(POLL_INTERVAL)
                try:
                    fetched = ctx.call_json("GET", "/admin/rebalance")
                except CommandFailed as e:
                    if e.status is not None:  # the proxy answered: a refusal, not a blip
                        raise
                    now = ctx.clock()
                    lost_since = now if lost_since is None else lost_since
                    if now - lost_since > LOST_PROXY_GRACE:
                        raise CommandFailed(
                            f"{e.message}; the move goes on without this command",
                            e.code,
                        ) from None
                    progress.update(task, line=f"[yellow]{e.message}; retrying")
                    continue
                lost_since = None
                if isinstance(fetched, dict):
                    status = fetched
    except KeyboardInterrupt:
        raise Detached() from None


# -- main -----------------------------------------------------------------------------------------


def _url(given: str | None, environ: Mapping[str, str]) -> str:
    url = given or environ.get(URL_ENV) or DEFAULT_URL
    source = "--url" if given else URL_ENV if environ.get(URL_ENV) else "the default URL"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"{source}: need http[s]://host:port, not {url!r}")
    return url.rstrip("/")


def _token(given: str | None, environ: Mapping[str, str]) -> str | None:
    if given:
        path, option = given, "--token-file"
    elif environ.get(TOKEN_ENV):
        path, option = environ[TOKEN_ENV], TOKEN_ENV
    else:
        return None
    # Read as the servers read theirs; imported here, as it pulls in the web stack.
    from shardkv.web.auth import TokenFileError, load_token

    try:
        return load_token(path, option)
    except TokenFileError as e:
        raise UsageError(str(e)) from None


def _width(stream: IO[str]) -> int | None:
    """A terminal's own width; for a pipe or a file, wide enough that lines stay whole
    for grep (rich would wrap at 80 columns)."""
    try:
        return None if stream.isatty() else PIPE_WIDTH
    except (AttributeError, ValueError):
        return PIPE_WIDTH


def _say_error(err: Console, as_json: bool, message: str, code: str, status: int | None) -> None:
    line = message.replace("\n", " ")
    if as_json:
        print_json(err, {"error": code, "message": line, "status": status})
    else:
        err.file.write(f"shardkv: {line}\n")
        err.file.flush()


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    stdout: IO[bytes] | None = None,
    stdin: IO[bytes] | None = None,
    out: Console | None = None,
    err: Console | None = None,
    connect: Callable[..., BlockingClient] = BlockingClient,
) -> int:
    """Run one command; its exit code. Never raises (``--help`` prints and returns 0).

    The keywords replace the process's environment, streams and HTTP client
    (``connect(url, timeout=S)``), for tests.
    """
    environ = os.environ if environ is None else environ
    out = Console(highlight=False, width=_width(sys.stdout)) if out is None else out
    err = Console(stderr=True, highlight=False, width=_width(sys.stderr)) if err is None else err
    as_json = "--json" in (sys.argv[1:] if argv is None else argv)  # until parsed
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started ignoring it
    client: BlockingClient | None = None
    try:
        args = build_parser().parse_args(argv)
        as_json = bool(args.json)
        url, token = _url(args.url, environ), _token(args.token_file, environ)
        client = connect(url, timeout=args.timeout)
        ctx = Context(
            client,
            token,
            as_json,
            out,
            err,
            stdout if stdout is not None else sys.stdout.buffer,
            stdin if stdin is not None else sys.stdin.buffer,
        )
        code: int = args.run(ctx, args)
        return code
    except SystemExit as e:  # --help / --version: argparse printed them
        return e.code if isinstance(e.code, int) else EXIT_OK
    except CommandFailed as e:
        _say_error(err, as_json, e.message, e.code, e.status)
        return e.exit_code
    except Detached:
        _say_error(
            err,
            as_json,
            "detached: the move goes on, it was not aborted; follow it with "
            "`shardkv rebalance --watch`, stop it with `shardkv abort`",
            "detached",
            None,
        )
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _say_error(err, as_json, "interrupted", "interrupted", None)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `shardkv get k | head -c 10`: the reader has all it wanted
        with contextlib.suppress(OSError, ValueError), open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_OK
    except Exception as e:  # a bug: still one line, and it says so
        _say_error(err, as_json, f"internal error: {type(e).__name__}: {e}", "internal", None)
        return EXIT_BUG
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
