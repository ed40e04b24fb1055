"""Running out of room: map growth steps and telling a full disk from a failing one."""

from __future__ import annotations

import errno

import lmdb
import pytest

from shardkv.storage.lmdb.capacity import (
    SHORT_WRITE_SLACK,
    disk_full_reason,
    error_errno,
    next_map_size,
)

KiB = 1024


def test_map_doubles_up_to_the_cap_in_whole_pages() -> None:
    assert next_map_size(64 * KiB, 1024 * KiB) == 128 * KiB
    assert next_map_size(512 * KiB, 600 * KiB) == 600 * KiB
    assert next_map_size(64 * KiB, 64 * KiB + 1) == 68 * KiB, "rounded up to a 4 KiB page"
    assert next_map_size(64 * KiB, 64 * KiB) is None
    assert next_map_size(128 * KiB, 64 * KiB) is None


def test_error_errno() -> None:
    assert error_errno(OSError(errno.EIO, "Input/output error")) == errno.EIO
    assert error_errno(lmdb.Error("mdb_txn_commit: No space left on device")) == errno.ENOSPC
    assert error_errno(RuntimeError("x", errno.EROFS)) == errno.EROFS
    assert error_errno(RuntimeError("something else")) is None


def _no_free_bytes() -> int:
    raise OSError(errno.EIO, "statvfs failed")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_out_of_space_errors_mean_full(code: int) -> None:
    reason = disk_full_reason(OSError(code, "no room"), 10, None)
    assert reason is not None and reason.startswith("disk full")


def test_eio_means_full_only_when_the_file_system_is_out_of_space() -> None:
    eio = OSError(errno.EIO, "Input/output error")
    assert disk_full_reason(eio, 10, None) is None
    assert disk_full_reason(eio, 10, lambda: 100 * SHORT_WRITE_SLACK) is None
    assert disk_full_reason(eio, 10, _no_free_bytes) is None
    reason = disk_full_reason(eio, 10, lambda: 0)
    assert reason is not None and "0 bytes free" in reason
    big_group = SHORT_WRITE_SLACK
    assert disk_full_reason(eio, big_group, lambda: 2 * big_group - 1) is not None
    assert disk_full_reason(eio, big_group, lambda: 2 * big_group) is None


def test_other_errors_are_failures() -> None:
    assert disk_full_reason(OSError(errno.EROFS, "Read-only file system"), 10, lambda: 0) is None
