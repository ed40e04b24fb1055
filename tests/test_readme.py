"""The README tells the truth: its error table lists exactly the codes the code can answer.

The codes are collected from the source with L{ast}, so a new error cannot be
added without the README learning of it: every ``code = "..."`` class
attribute (the domain errors of L{shardkv.errors} and their kin), every code
passed to L{InvalidRequest}, L{NotFound} or L{ReplicaRefused} (second
argument or ``code=``), every ``refuse(status, code, ...)`` of the front door,
and every literal ``{"error": code}`` body (Klein's no_route and
method_not_allowed among them).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

NEVER_ANSWERED = {
    # The replica client's errors: the coordinator turns a failed call to a
    # node into a quorum answer (insufficient_replicas, replica_timeout,
    # overloaded), and the admin routes into member_unreachable.
    "node_failed",
    "node_unreachable",
    "node_timeout",
    "node_busy",
    "bad_gateway",
    # A data directory that cannot be opened stops the process at start.
    "storage_startup",
    # The client hung up; nobody reads the answer.
    "cancelled",
}

_CODE_ARGUMENT = {"InvalidRequest": 1, "NotFound": 1, "ReplicaRefused": 1, "refuse": 1}


def _name(func: ast.expr) -> str | None:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _string(node: ast.expr | None) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return None


def codes_in(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for statement in node.body:
                if isinstance(statement, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "code" for t in statement.targets
                ):
                    found.add(_string(statement.value) or "")
        elif isinstance(node, ast.Call):
            found.update(_string(kw.value) or "" for kw in node.keywords if kw.arg == "code")
            position = _CODE_ARGUMENT.get(_name(node.func) or "")
            if position is not None and len(node.args) > position:
                found.add(_string(node.args[position]) or "")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if _string(key) == "error":
                    found.add(_string(value) or "")
    found.discard("")
    return found


def source_codes() -> set[str]:
    codes: set[str] = set()
    for path in sorted((ROOT / "shardkv").rglob("*.py")):
        codes |= codes_in(ast.parse(path.read_text(encoding="utf-8")))
    return codes


def readme_section(title: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n{title}\n")
    end = text.find("\n#", start + len(title) + 2)
    return text[start : end if end != -1 else len(text)]


def readme_error_codes() -> set[str]:
    codes: set[str] = set()
    for line in readme_section("### Errors").splitlines():
        cells = line.split("|")
        if len(cells) > 3 and re.match(r"\s*\d{3}", cells[1]):
            codes.update(re.findall(r"`([a-z_]+)`", cells[2]))
    return codes


def test_the_collector_finds_each_kind_of_code() -> None:
    """
    The collector sees a class attribute, a code passed as an argument or a
    keyword, a front-door refusal and a literal error body.
    """
    tree = ast.parse(
        "class E(ShardkvError):\n    code = 'a'\n"
        "InvalidRequest('m', 'b')\nNotFound('m', code='c')\nself.refuse(400, 'd', 'm')\n"
        "json_body(request, 404, {'error': 'e', 'message': 'm'})\n"
    )
    assert codes_in(tree) == {"a", "b", "c", "d", "e"}


def test_the_error_table_lists_exactly_the_codes_the_code_answers() -> None:
    """
    The README's error table names every code a client can get, and no code
    that none can.
    """
    answered = source_codes() - NEVER_ANSWERED
    listed = readme_error_codes()
    assert sorted(answered - listed) == [], "codes missing from the README's error table"
    assert sorted(listed - answered) == [], "codes in the README that the code never answers"


def test_never_answered_codes_exist() -> None:
    """Each exception above names a code the source still has."""
    assert source_codes() >= NEVER_ANSWERED
