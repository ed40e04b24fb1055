"""The pytest glue for L{shardkv.testing.processes}: a fixture body that always cleans up.

The process helpers themselves (free ports, L{ProcessSet}, readiness waits,
kill and restart) live in the package, shared with bench/run.py; this module
only adds what needs pytest::

    @pytest.fixture
    def procs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ProcessSet]:
        yield from process_set(request, tmp_path)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shardkv.testing.processes import ProcessSet


def process_set(request: pytest.FixtureRequest, root: Path) -> Iterator[ProcessSet]:
    """The body of a fixture: yields a L{ProcessSet} and always closes it.

    If the test failed, every process's log tail is printed at teardown;
    pytest shows that output ("Captured stdout teardown") under the failure.
    """
    failed_before = request.session.testsfailed
    procs = ProcessSet(root)
    try:
        yield procs
    finally:
        procs.close()
        if request.session.testsfailed > failed_before and procs.procs:
            print(f"\n{request.node.nodeid}: process logs\n{procs.report()}")
