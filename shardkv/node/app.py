"""The node's Klein app: the data API backed directly by a storage engine.

Reads answer inline. A write checks its precondition and mints its version
against the engine's newest record in the same reactor turn that queues it,
so no other request can slip between the check and the write.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from klein import Klein
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from shardkv.core import batch
from shardkv.core.conditions import Precondition
from shardkv.core.records import CorruptRecord, Record
from shardkv.core.versions import Version, VersionClock, VersionError
from shardkv.http.dataroutes import (
    Consistency,
    Maybe,
    WriteResult,
    install_data_routes,
    not_found,
    path_key,
)
from shardkv.http.errors import ApiError, bad_request, install_error_handlers, json_body
from shardkv.storage.engine import StorageEngine, StorageError

REPLICA_PREFIX = b"/replica/kv/"
VERSION_HEADER = b"x-shardkv-version"
TOMBSTONE_HEADER = b"x-shardkv-tombstone"


def _storage_failure(failure: Failure) -> StorageError:
    """The engine's error in ``failure``; anything else propagates."""
    failure.trap(StorageError)
    err = failure.value
    assert isinstance(err, StorageError)
    return err


def _storage_error(failure: Failure) -> Failure:
    """Turn an engine failure into the HTTP answer that names it."""
    err = _storage_failure(failure)
    raise ApiError(err.status, err.code, str(err))


class NodeApp:
    app = Klein()
    install_data_routes(app)
    install_error_handlers(app)

    def __init__(
        self,
        node_id: str,
        engine: StorageEngine,
        clock: VersionClock,
        max_value_bytes: int,
        now_ms: Callable[[], int],
    ) -> None:
        self.node_id = node_id
        self.now_ms = now_ms
        self.engine = engine
        self.clock = clock
        self.max_value_bytes = max_value_bytes

    def _stored(self, key: str, latest: bool = False) -> Record | None:
        try:
            return self.engine.latest(key) if latest else self.engine.get(key)
        except CorruptRecord as e:
            raise ApiError(
                503,
                "corrupt_record",
                f"the stored record for {key!r} on {self.node_id} failed its checksum: {e}",
            ) from None

    def read(self, key: str, c: Consistency | None = None) -> Record | None:
        record = self._stored(key)
        if record is None or record.tombstone:
            return None
        return record

    def _store(self, key: str, record: Record) -> Deferred[bool]:
        d: Deferred[bool] = self.engine.put(key, record)
        return d.addErrback(_storage_error)

    def write(
        self,
        key: str,
        value: bytes,
        content_type: str,
        pre: Precondition,
        c: Consistency | None = None,
    ) -> Maybe[WriteResult]:
        current = self._stored(key, latest=True)
        live = current if current is not None and not current.tombstone else None
        reason = pre.failure(live.version if live else None)
        if reason is not None:
            raise ApiError(412, "precondition_failed", reason)
        version = self.clock.mint(current.version if current else None)
        record = Record(version, value, content_type, stored_ms=self.now_ms())
        result = WriteResult(version, created=live is None)
        return self._store(key, record).addCallback(lambda _: result)

    def remove(self, key: str, pre: Precondition, c: Consistency | None = None) -> Maybe[Version]:
        current = self._stored(key, latest=True)
        if current is None or current.tombstone:
            raise not_found(key)
        reason = pre.failure(current.version)
        if reason is not None:
            raise ApiError(412, "precondition_failed", reason)
        version = self.clock.mint(current.version)
        return self._store(key, Record.deleted(version, self.now_ms())).addCallback(
            lambda _: version
        )

    @app.route("/replica/kv/<key:_key>", methods=["GET"])
    def replica_get(self, request: IRequest, _key: str) -> bytes:
        """The stored record as replication sees it, tombstones included.

        A corrupt record answers as missing, so the coordinator's read repair
        overwrites it with a good copy from another replica.
        """
        key = path_key(request, REPLICA_PREFIX)
        try:
            record = self.engine.get(key)
        except CorruptRecord as e:
            message = f"the record for {key!r} is corrupt: {e}"
            raise ApiError(404, "corrupt_record", message) from None
        if record is None:
            raise ApiError(404, "not_found", f"no record for key {key!r}")
        request.setHeader(VERSION_HEADER, str(record.version).encode())
        request.setHeader(TOMBSTONE_HEADER, b"1" if record.tombstone else b"0")
        request.setHeader(b"content-type", record.content_type.encode("ascii"))
        return record.value

    @app.route("/replica/kv/<key:_key>", methods=["PUT"])
    def replica_put(self, request: IRequest, _key: str) -> Deferred[bytes]:
        """Store a record minted elsewhere, if it is newer than ours.

        With ``?hint_for=NODE`` this node only keeps it for NODE, which was
        down, and hands it back later.
        """
        key = path_key(request, REPLICA_PREFIX)
        raw = request.getHeader(VERSION_HEADER)
        try:
            version = Version.parse((raw or b"").decode("latin-1"))
        except VersionError as e:
            raise bad_request(f"{VERSION_HEADER.decode()}: {e}", "invalid_version") from None
        value = request.content.read()
        tombstone = request.getHeader(TOMBSTONE_HEADER) == b"1"
        ctype = (request.getHeader(b"content-type") or b"").decode("ascii", "replace")
        hint_for = request.args.get(b"hint_for", [b""])[0].decode("utf-8", "replace")
        d = self._accept(key, Record(version, value, ctype, tombstone), hint_for or None)
        d.addErrback(_storage_error)
        return d.addCallback(lambda applied: json_body(request, 200, {"applied": applied}))

    def _accept(self, key: str, record: Record, hint_for: str | None) -> Deferred[bool]:
        """Store a replicated record if newer, or keep it as a hint for ``hint_for``."""
        local = dataclasses.replace(record, stored_ms=self.now_ms())
        if hint_for is not None:
            return self.engine.put_hint(hint_for, key, local)
        return self.engine.put(key, local)

    @app.route("/replica/batch", methods=["POST"])
    def replica_batch(self, request: IRequest) -> Deferred[bytes]:
        """Many replica reads and writes in one exchange (see L{shardkv.core.batch}).

        Reads answer from the engine at once; writes join the same group
        commit, and the response waits until every one of them is durable.
        """
        try:
            ops = batch.decode_request(request.content.read())
        except batch.BatchError as e:
            raise bad_request(str(e), "invalid_batch") from None
        inline_left = batch.MAX_INLINE_TOTAL
        answers: list[Deferred[batch.Result]] = []
        for op in ops:
            if isinstance(op, batch.GetOp):
                result = self._batch_get(op.key, inline_left)
                if result.record is not None:
                    inline_left -= len(result.record.value)
                answers.append(succeed(result))
            else:
                answers.append(self._batch_put(op))
        done = gatherResults(answers)
        return done.addCallback(
            lambda results: self._batch_body(request, batch.encode_response(results))
        )

    def _batch_get(self, key: str, inline_left: int) -> batch.Result:
        try:
            record = self.engine.get(key)
        except CorruptRecord as e:
            return batch.Result(404, error="corrupt_record", message=f"{key!r} is corrupt: {e}")
        if record is None:
            return batch.Result(404, error="not_found", message=f"no record for key {key!r}")
        if not batch.fits(record) or len(record.value) > inline_left:
            return batch.Result(200, inline=False)
        return batch.Result(200, record=record)

    def _batch_put(self, op: batch.PutOp) -> Deferred[batch.Result]:
        if len(op.record.value) > self.max_value_bytes:
            message = f"the value is over this node's {self.max_value_bytes}-byte limit"
            return succeed(batch.Result(413, error="value_too_large", message=message))
        d = self._accept(op.key, op.record, op.hint_for)

        def failed(failure: Failure) -> batch.Result:
            err = _storage_failure(failure)
            return batch.Result(err.status, error=err.code, message=f"{self.node_id}: {err}")

        return d.addCallbacks(lambda applied: batch.Result(200, applied=applied), failed)

    @staticmethod
    def _batch_body(request: IRequest, body: bytes) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return body

    @app.route("/health", methods=["GET"])
    def health(self, request: IRequest) -> bytes:
        h = self.engine.health()
        payload = {
            "status": "ok" if h.ok else "failing",
            "role": "node",
            "node": self.node_id,
            "storage": {"engine": self.engine.name, "writable": h.writable, **h.details},
            "hints": self.engine.hint_counts(),
        }
        if h.reason:
            payload["reason"] = h.reason
        return json_body(request, 200 if h.ok else 503, payload)
