"""Tests for L{shardkv.storage.lmdb.operations}: outcomes reach the right Deferreds."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from shardkv.errors import StorageFull
from shardkv.storage.lmdb.operations import CommitStats, Failed, WriteOp, fire


def _noop(txn: object, db: object) -> None:
    return None


class FireTests(SynchronousTestCase):
    def test_each_operation_gets_its_own_outcome(self) -> None:
        ok: WriteOp[object] = WriteOp("records", _noop)
        full: WriteOp[object] = WriteOp("records", _noop)
        fire([ok, full], [True, Failed(StorageFull("no room"))])
        self.assertIs(self.successResultOf(ok.deferred), True)
        self.assertEqual(str(self.failureResultOf(full.deferred, StorageFull).value), "no room")

    def test_every_operation_has_a_fresh_deferred(self) -> None:
        self.assertIsNot(WriteOp("records", _noop).deferred, WriteOp("records", _noop).deferred)


def test_average_batch() -> None:
    assert CommitStats().average_batch == 0.0
    assert CommitStats(commits=4, committed_ops=10).average_batch == 2.5
