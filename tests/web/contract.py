"""
The data API every server of it must honour, written once.

A node and the proxy serve the same API, so its behaviour lives here, as
L{DataAPIContract}, and runs against a node in C{tests.node.test_app} and
through the proxy in C{tests.proxy.test_app}. A subclass says how to reach
the server and where the node keeps its records; the tests are the same.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.keys import MAX_KEY_BYTES
from shardkv.core.records import Record
from shardkv.core.versions import Version
from shardkv.web.dataroutes import TEXT_CONTENT_TYPE
from tests.helpers import HTTP, Reply

if TYPE_CHECKING:
    _ContractBase = SynchronousTestCase
else:
    _ContractBase = object

# (path segment as sent, the key it names)
ENCODED_KEYS = [
    ("a%2Fb", "a/b"),
    ("a/b", "a/b"),
    ("caf%C3%A9", "café"),
    ("sp%20ace", "sp ace"),
    ("100%25", "100%"),
    ("a+b", "a+b"),
    ("%3Fx%3D1%26y", "?x=1&y"),
    ("%F0%9F%99%82", "🙂"),
]


class DataAPIContract(_ContractBase):
    """
    The data API every server of it (a node, the proxy) must honour.

    Subclasses provide C{self.http} in C{setUp} and the three hooks below.
    """

    http: HTTP

    def stored(self, key: str) -> Record | None:
        """The record (tombstones included) the storage node holds for C{key}."""
        raise NotImplementedError

    def limited(self, max_value_bytes: int) -> HTTP:
        """A server of the same kind that refuses values over C{max_value_bytes}."""
        raise NotImplementedError

    def relayed(self, key: str, message: str) -> str:
        """A node's error message for C{key} as the client of this server sees it."""
        return message

    # -- helpers ---------------------------------------------------------

    def assertError(self, reply: Reply, status: int, code: str, message: str | None = None) -> None:
        """C{reply} is a JSON error with exactly this status, code (and message)."""
        self.assertEqual(reply.error(), (status, code), reply.body)
        if message is not None:
            self.assertEqual(reply.json(), {"error": code, "message": message})

    def put(self, key: str, value: bytes, content_type: str = "text/plain") -> Version:
        reply = self.http.put("/kv/" + quote(key, safe=""), value, {"Content-Type": content_type})
        self.assertIn(reply.code, (200, 201), reply.body)
        return Version.parse(reply.json()["version"])

    def assertStored(self, key: str, version: Version, value: bytes, content_type: str) -> None:
        record = self.stored(key)
        assert record is not None, f"nothing stored under {key!r}"
        self.assertEqual(
            (record.version, record.value, record.content_type, record.tombstone),
            (version, value, content_type, False),
        )

    # -- the seed API ----------------------------------------------------

    def test_set_then_get(self) -> None:
        """
        POST /set answers 200 with the key and its new version (also as the
        ETag); GET /get returns key, value and that version.
        """
        reply = self.http.post_json("/set", {"key": "name", "value": "alice"})
        self.assertEqual(reply.code, 200)
        body = reply.json()
        self.assertEqual(sorted(body), ["key", "version"])
        self.assertEqual(body["key"], "name")
        version = Version.parse(body["version"])
        self.assertEqual(version.counter, 1)
        self.assertEqual(reply.header("etag"), version.etag())

        got = self.http.get("/get?key=name")
        self.assertEqual(got.code, 200)
        self.assertEqual(got.json(), {"key": "name", "value": "alice", "version": str(version)})
        self.assertEqual(got.header("etag"), version.etag())
        self.assertStored("name", version, b"alice", TEXT_CONTENT_TYPE)

    def test_set_replaces_with_a_newer_version(self) -> None:
        first = Version.parse(
            self.http.post_json("/set", {"key": "k", "value": "1"}).json()["version"]
        )
        reply = self.http.post_json("/set", {"key": "k", "value": "2"})
        self.assertEqual(reply.code, 200)
        second = Version.parse(reply.json()["version"])
        self.assertGreater(second, first)
        self.assertEqual(second.counter, 2)
        self.assertEqual(self.http.get("/get?key=k").json()["value"], "2")

    def test_set_unicode_and_empty_values(self) -> None:
        """
        /set stores the value's UTF-8 bytes as text/plain, which /kv serves
        as-is; an empty string is a value.
        """
        for value in ["héllo 🙂", "", 'line\nbreak "quoted"']:
            reply = self.http.post_json("/set", {"key": "t", "value": value})
            self.assertEqual(reply.code, 200)
            got = self.http.get("/get?key=t")
            self.assertEqual(got.json()["value"], value)
            raw = self.http.get("/kv/t")
            self.assertEqual(
                (raw.code, raw.body, raw.header("content-type")),
                (200, value.encode("utf-8"), TEXT_CONTENT_TYPE),
            )

    def test_get_unknown_key(self) -> None:
        reply = self.http.get("/get?key=nope")
        self.assertError(reply, 404, "not_found", "no value for key 'nope'")

    def test_delete_then_get(self) -> None:
        set_version = Version.parse(
            self.http.post_json("/set", {"key": "name", "value": "alice"}).json()["version"]
        )
        reply = self.http.post_json("/delete", {"key": "name"})
        self.assertEqual(reply.code, 200)
        body = reply.json()
        self.assertEqual(sorted(body), ["deleted", "key", "version"])
        self.assertEqual((body["key"], body["deleted"]), ("name", True))
        deleted = Version.parse(body["version"])
        self.assertGreater(deleted, set_version)

        self.assertError(
            self.http.get("/get?key=name"), 404, "not_found", "no value for key 'name'"
        )
        self.assertError(self.http.get("/kv/name"), 404, "not_found", "no value for key 'name'")
        tombstone = self.stored("name")
        assert tombstone is not None
        self.assertEqual((tombstone.tombstone, tombstone.version), (True, deleted))

        again = self.http.post_json("/delete", {"key": "name"})
        self.assertError(again, 404, "not_found", self.relayed("name", "no value for key 'name'"))

    def test_delete_absent_key(self) -> None:
        for reply in [
            self.http.post_json("/delete", {"key": "ghost"}),
            self.http.delete("/kv/ghost"),
        ]:
            self.assertError(
                reply, 404, "not_found", self.relayed("ghost", "no value for key 'ghost'")
            )
        self.assertIsNone(self.stored("ghost"))

    def test_recreate_after_delete(self) -> None:
        """
        A key written after a delete is created again (201) with a version
        newer than the tombstone's, so a stale replica cannot win.
        """
        self.put("k", b"1")
        tombstone = Version.parse(self.http.delete("/kv/k").json()["version"])
        reply = self.http.put("/kv/k", b"2")
        self.assertEqual(reply.code, 201)
        self.assertGreater(Version.parse(reply.json()["version"]), tombstone)
        self.assertEqual(self.http.get("/kv/k").body, b"2")

    # -- REST ------------------------------------------------------------

    def test_put_creates_then_replaces(self) -> None:
        created = self.http.put("/kv/doc", b'{"a": 1}', {"Content-Type": "application/json"})
        self.assertEqual(created.code, 201)
        v1 = Version.parse(created.json()["version"])
        self.assertEqual(created.json(), {"key": "doc", "version": str(v1)})
        self.assertEqual(created.header("etag"), v1.etag())

        replaced = self.http.put("/kv/doc", b"<p/>", {"Content-Type": "text/html"})
        self.assertEqual(replaced.code, 200)
        v2 = Version.parse(replaced.json()["version"])
        self.assertEqual(replaced.json(), {"key": "doc", "version": str(v2)})
        self.assertEqual(replaced.header("etag"), v2.etag())
        self.assertEqual((v2.counter, v2 > v1), (2, True))
        self.assertStored("doc", v2, b"<p/>", "text/html")

    def test_binary_value_round_trips(self) -> None:
        """PUT stores the body bytes and Content-Type as-is; GET and HEAD return them."""
        value = bytes(range(256)) * 3
        version = self.put("blob", value, "image/png")

        got = self.http.get("/kv/blob")
        self.assertEqual(
            (got.code, got.body, got.header("content-type"), got.header("etag")),
            (200, value, "image/png", version.etag()),
        )
        head = self.http.head("/kv/blob")
        self.assertEqual(
            (head.code, head.body, head.header("content-type"), head.header("etag")),
            (200, b"", "image/png", version.etag()),
        )
        self.assertStored("blob", version, value, "image/png")

    def test_empty_value_and_default_content_type(self) -> None:
        reply = self.http.put("/kv/empty", b"")
        self.assertEqual(reply.code, 201)
        version = Version.parse(reply.json()["version"])
        got = self.http.get("/kv/empty")
        self.assertEqual(
            (got.code, got.body, got.header("content-type")),
            (200, b"", "application/octet-stream"),
        )
        self.assertEqual(
            self.http.get("/get?key=empty").json(),
            {"key": "empty", "value": "", "version": str(version)},
        )

    def test_non_utf8_value_via_get_is_base64(self) -> None:
        version = self.put("bin", b"\xff\x00\xfe", "application/octet-stream")
        reply = self.http.get("/get?key=bin")
        self.assertEqual(reply.code, 200)
        self.assertEqual(
            reply.json(), {"key": "bin", "value_base64": "/wD+", "version": str(version)}
        )

    def test_rest_delete(self) -> None:
        self.put("doc", b"x")
        reply = self.http.delete("/kv/doc")
        self.assertEqual(reply.code, 200)
        body = reply.json()
        self.assertEqual((body["key"], body["deleted"]), ("doc", True))
        self.assertEqual(Version.parse(body["version"]).counter, 2)
        self.assertError(self.http.get("/kv/doc"), 404, "not_found", "no value for key 'doc'")
        head = self.http.head("/kv/doc")
        self.assertEqual((head.code, head.body), (404, b""))
        self.assertError(
            self.http.delete("/kv/doc"),
            404,
            "not_found",
            self.relayed("doc", "no value for key 'doc'"),
        )

    def test_path_keys_are_percent_decoded(self) -> None:
        """
        /kv/{key} names the percent-decoded key, the same key /get?key= and
        /set use, and the key is stored under exactly that string.
        """
        for segment, key in ENCODED_KEYS:
            value = f"value of {key}".encode()
            reply = self.http.put("/kv/" + segment, value)
            self.assertEqual(reply.json()["key"], key, segment)
            self.assertStored(
                key, Version.parse(reply.json()["version"]), value, "application/octet-stream"
            )
            got = self.http.get("/get?key=" + quote(key, safe=""))
            self.assertEqual(
                (got.code, got.json()["key"], got.json()["value"]),
                (200, key, value.decode()),
                segment,
            )
            self.assertEqual(self.http.get("/kv/" + segment).body, value, segment)

    def test_set_key_is_visible_by_path(self) -> None:
        self.http.post_json("/set", {"key": "dir/café", "value": "v"})
        got = self.http.get("/kv/dir%2Fcaf%C3%A9")
        self.assertEqual((got.code, got.body), (200, b"v"))
        self.assertEqual(self.http.get("/kv/dir/caf%C3%A9").body, b"v")

    def test_utf8_keys_in_replies(self) -> None:
        reply = self.http.post_json("/set", {"key": "café", "value": "crème"})
        self.assertEqual(reply.json()["key"], "café")
        got = self.http.get("/get?key=caf%C3%A9")
        self.assertEqual((got.json()["key"], got.json()["value"]), ("café", "crème"))
        self.assertIn("café".encode(), got.body)

    def test_key_starting_with_a_slash(self) -> None:
        self.assertEqual(self.http.post_json("/set", {"key": "/lead", "value": "v"}).code, 200)
        self.assertEqual(self.http.get("/get?key=%2Flead").code, 200)
        self.assertEqual(self.http.put("/kv/%2Flead", b"w").code, 200)
        got = self.http.get("/kv/%2Flead")
        self.assertEqual((got.code, got.body), (200, b"w"))

    # -- conditional requests --------------------------------------------

    def test_if_match_current_etag(self) -> None:
        v1 = self.put("k", b"1")
        reply = self.http.put("/kv/k", b"2", {"If-Match": v1.etag()})
        self.assertEqual(reply.code, 200)
        v2 = Version.parse(reply.json()["version"])
        self.assertGreater(v2, v1)
        self.assertStored("k", v2, b"2", "application/octet-stream")

    def test_if_match_list_and_weak_tag(self) -> None:
        v1 = self.put("k", b"1")
        reply = self.http.put("/kv/k", b"2", {"If-Match": f'"9-9-other", {v1.etag()}'})
        self.assertEqual(reply.code, 200)
        v2 = Version.parse(reply.json()["version"])
        reply = self.http.put("/kv/k", b"3", {"If-Match": "W/" + v2.etag()})
        self.assertEqual(reply.code, 200)

    def test_if_match_stale_etag(self) -> None:
        v1 = self.put("k", b"1")
        v2 = self.put("k", b"2")
        for reply in [
            self.http.put("/kv/k", b"3", {"If-Match": v1.etag()}),
            self.http.delete("/kv/k", {"If-Match": v1.etag()}),
        ]:
            self.assertError(
                reply,
                412,
                "precondition_failed",
                self.relayed("k", f"If-Match wants {v1} but the key has {v2}"),
            )
        self.assertStored("k", v2, b"2", "text/plain")

    def test_if_match_on_absent_key(self) -> None:
        etag = Version(1, 0, "w").etag()
        self.assertError(
            self.http.put("/kv/k", b"x", {"If-Match": etag}),
            412,
            "precondition_failed",
            self.relayed(
                "k", "If-Match wants 1-0-w but the key has no version (the key is absent)"
            ),
        )
        self.assertError(
            self.http.put("/kv/k", b"x", {"If-Match": "*"}),
            412,
            "precondition_failed",
            self.relayed("k", "the key does not exist and If-Match: * was given"),
        )
        self.assertIsNone(self.stored("k"))

    def test_if_match_star_on_existing_key(self) -> None:
        self.put("k", b"1")
        reply = self.http.put("/kv/k", b"2", {"If-Match": "*"})
        self.assertEqual(reply.code, 200)
        self.assertEqual(self.http.get("/kv/k").body, b"2")

    def test_if_none_match_star(self) -> None:
        """If-None-Match: * creates an absent key (201) and refuses an existing one (412)."""
        created = self.http.put("/kv/k", b"1", {"If-None-Match": "*"})
        self.assertEqual(created.code, 201)
        v1 = Version.parse(created.json()["version"])
        self.assertError(
            self.http.put("/kv/k", b"2", {"If-None-Match": "*"}),
            412,
            "precondition_failed",
            self.relayed("k", f"the key exists (version {v1}) and If-None-Match: * was given"),
        )
        self.assertStored("k", v1, b"1", "application/octet-stream")

    def test_if_none_match_star_after_delete(self) -> None:
        self.put("k", b"1")
        self.http.delete("/kv/k")
        self.assertEqual(self.http.put("/kv/k", b"2", {"If-None-Match": "*"}).code, 201)

    def test_conditional_delete(self) -> None:
        v1 = self.put("k", b"1")
        reply = self.http.delete("/kv/k", {"If-Match": v1.etag()})
        self.assertEqual(reply.code, 200)
        self.assertGreater(Version.parse(reply.json()["version"]), v1)

    def test_set_with_version_field(self) -> None:
        v1 = Version.parse(
            self.http.post_json("/set", {"key": "k", "value": "1"}).json()["version"]
        )
        ok = self.http.post_json("/set", {"key": "k", "value": "2", "version": str(v1)})
        self.assertEqual(ok.code, 200)
        v2 = Version.parse(ok.json()["version"])
        stale = self.http.post_json("/set", {"key": "k", "value": "3", "version": str(v1)})
        self.assertError(
            stale,
            412,
            "precondition_failed",
            self.relayed("k", f"If-Match wants {v1} but the key has {v2}"),
        )
        # The quoted ETag form is accepted too.
        quoted = self.http.post_json("/set", {"key": "k", "value": "4", "version": v2.etag()})
        self.assertEqual(quoted.code, 200)
        self.assertEqual(self.http.get("/get?key=k").json()["value"], "4")

    def test_set_with_version_on_absent_key(self) -> None:
        reply = self.http.post_json("/set", {"key": "new", "value": "v", "version": "1-0-w"})
        self.assertError(
            reply,
            412,
            "precondition_failed",
            self.relayed(
                "new", "If-Match wants 1-0-w but the key has no version (the key is absent)"
            ),
        )
        self.assertIsNone(self.stored("new"))

    def test_delete_with_version_field(self) -> None:
        v1 = self.put("k", b"1")
        v2 = self.put("k", b"2")
        stale = self.http.post_json("/delete", {"key": "k", "version": str(v1)})
        self.assertError(
            stale,
            412,
            "precondition_failed",
            self.relayed("k", f"If-Match wants {v1} but the key has {v2}"),
        )
        self.assertEqual(self.http.get("/kv/k").body, b"2")
        ok = self.http.post_json("/delete", {"key": "k", "version": str(v2)})
        self.assertEqual((ok.code, ok.json()["deleted"]), (200, True))

    def test_bad_version_field(self) -> None:
        self.put("k", b"1")
        for version, message in [
            ("", "not an entity tag: ''"),
            ("a b", "not an entity tag: 'a b'"),
            (5, '"version" must be a string (an ETag from a read)'),
            (["1-0-w"], '"version" must be a string (an ETag from a read)'),
        ]:
            for route, body in [
                ("/set", {"key": "k", "value": "2", "version": version}),
                ("/delete", {"key": "k", "version": version}),
            ]:
                reply = self.http.post_json(route, body)
                self.assertError(reply, 400, "invalid_version", message)
        self.assertEqual(self.http.get("/kv/k").body, b"1")

    def test_malformed_etags(self) -> None:
        self.put("k", b"1")
        cases: list[tuple[dict[str, str], str]] = [
            ({"If-Match": "garbage"}, "bad entity tag: not a version: 'garbage'"),
            ({"If-Match": '"1-2'}, "bad entity tag: not an entity tag: '\"1-2'"),
            ({"If-Match": ""}, "bad entity tag: empty entity-tag list"),
            ({"If-Match": "*, garbage"}, "bad entity tag: not a version: '*'"),
            ({"If-None-Match": "1-2"}, "bad entity tag: not a version: '1-2'"),
            ({"If-None-Match": '"1-0-w"'}, "only If-None-Match: * is supported on writes"),
        ]
        for headers, message in cases:
            for reply in [
                self.http.put("/kv/k", b"2", headers),
                self.http.delete("/kv/k", headers),
            ]:
                self.assertError(reply, 400, "invalid_precondition", message)
        self.assertEqual(self.http.get("/kv/k").body, b"1")

    def test_foreign_etags_are_412(self) -> None:
        """RFC 9110: a well-formed tag that is not the current one fails the precondition."""
        self.put("k", b"1")
        for tag in [b'"\xb2-1-w"', b'"' + b"1" * 5000 + b'-0-w"', b'"1-2"', b'"not-the-version"']:
            reply = self.http.put("/kv/k", b"2", {"If-Match": tag})
            self.assertEqual(reply.error(), (412, "precondition_failed"))
        for version in ["\u00b2-1-w", "garbage", "1-2"]:
            reply = self.http.post_json("/set", {"key": "k", "value": "2", "version": version})
            self.assertEqual(reply.error(), (412, "precondition_failed"))
        self.assertEqual(self.http.get("/kv/k").body, b"1")

    def test_get_if_none_match(self) -> None:
        """
        GET (and HEAD) answer 304 with the ETag and no body when If-None-Match
        names the current version.
        """
        v1 = self.put("k", b"value", "text/plain")
        for header in [v1.etag(), "*", f'"9-9-other", {v1.etag()}']:
            for method in ["GET", "HEAD"]:
                reply = self.http.request(method, "/kv/k", headers={"If-None-Match": header})
                self.assertEqual(
                    (reply.code, reply.body, reply.header("etag"), reply.header("content-type")),
                    (304, b"", v1.etag(), None),
                    (method, header),
                )
        v2 = self.put("k", b"newer", "text/plain")
        stale = self.http.get("/kv/k", {"If-None-Match": v1.etag()})
        self.assertEqual(
            (stale.code, stale.body, stale.header("etag"), stale.header("content-type")),
            (200, b"newer", v2.etag(), "text/plain"),
        )
        self.assertError(
            self.http.get("/kv/absent", {"If-None-Match": "*"}),
            404,
            "not_found",
            "no value for key 'absent'",
        )

    def test_get_if_none_match_list_without_space_and_weak_tag(self) -> None:
        v1 = self.put("k", b"value")
        for header in [f'"9-9-other",{v1.etag()}', "W/" + v1.etag()]:
            reply = self.http.get("/kv/k", {"If-None-Match": header})
            self.assertEqual((reply.code, reply.body), (304, b""), header)

    # -- errors: always JSON, never HTML or 500 --------------------------

    def test_bad_json_bodies(self) -> None:
        not_object = "the body must be a JSON object"
        cases: list[tuple[bytes, str, str | None]] = [
            (b"{bad", "invalid_json", None),
            (b"", "invalid_json", None),
            (b"\xff\xfe", "invalid_json", None),
            (b"[1, 2]", "invalid_json", not_object),
            (b'["key", "value"]', "invalid_json", not_object),
            (b'"key"', "invalid_json", not_object),
            (b"null", "invalid_json", not_object),
            (b"42", "invalid_json", not_object),
            (b'{"value": "v"}', "invalid_key", '"key" is required and must be a string'),
            (b'{"key": 5, "value": "v"}', "invalid_key", '"key" is required and must be a string'),
            (b'{"key": null}', "invalid_key", '"key" is required and must be a string'),
            (b'{"key": ["k"]}', "invalid_key", '"key" is required and must be a string'),
            (b'{"key": "", "value": "v"}', "invalid_key", "the key is empty"),
        ]
        for body, code, message in cases:
            for route in ["/set", "/delete"]:
                reply = self.http.post_raw(route, body)
                self.assertEqual(reply.error(), (400, code), (route, body))
                if message is not None:
                    self.assertEqual(reply.json()["message"], message, (route, body))

    def test_bad_values_for_set(self) -> None:
        message = '"value" is required and must be a string'
        for body in [
            {"key": "k"},
            {"key": "k", "value": None},
            {"key": "k", "value": 5},
            {"key": "k", "value": ["v"]},
            {"key": "k", "value": {"nested": "v"}},
        ]:
            reply = self.http.post_json("/set", body)
            self.assertError(reply, 400, "invalid_value", message)
        self.assertIsNone(self.stored("k"))

    def test_key_length_limit(self) -> None:
        """
        A key of 1024 UTF-8 bytes is fine on every route; one more byte is
        414 (JSON, query and path alike), even when it is few characters.
        """
        longest = "k" * MAX_KEY_BYTES
        self.assertEqual(self.http.post_json("/set", {"key": longest, "value": "v"}).code, 200)
        self.assertEqual(self.http.get("/get?key=" + longest).code, 200)
        self.assertEqual(self.http.put("/kv/" + longest, b"w").code, 200)
        self.assertEqual(self.http.get("/kv/" + longest).body, b"w")

        too_long = "k" * (MAX_KEY_BYTES + 1)
        wide = "é" * (MAX_KEY_BYTES // 2) + "k"  # 513 characters, 1025 bytes
        message = "the key is 1025 bytes; the limit is 1024"
        for key in [too_long, wide]:
            path = "/kv/" + quote(key, safe="")
            for reply in [
                self.http.post_json("/set", {"key": key, "value": "v"}),
                self.http.post_json("/delete", {"key": key}),
                self.http.get("/get?key=" + quote(key, safe="")),
                self.http.put(path, b"v"),
                self.http.get(path),
                self.http.delete(path),
            ]:
                self.assertError(reply, 414, "key_too_long", message)

    def test_bad_keys_in_the_query(self) -> None:
        required = "the query parameter ?key= is required"
        for path, message in [
            ("/get", required),
            ("/get?other=1", required),
            ("/get?key=", "the key is empty"),
            ("/get?key=%FF", "the key is not valid UTF-8"),
        ]:
            self.assertError(self.http.get(path), 400, "invalid_key", message)

    def test_value_size_limit(self) -> None:
        """A value over the server's limit is 413, counted in bytes, and nothing is stored."""
        small = self.limited(16)
        self.assertEqual(small.put("/kv/fits", b"x" * 16).code, 201)
        self.assertEqual(small.post_json("/set", {"key": "fits2", "value": "x" * 16}).code, 200)
        for reply, size in [
            (small.put("/kv/big", b"x" * 17), 17),
            (small.post_json("/set", {"key": "big", "value": "x" * 17}), 17),
            (small.post_json("/set", {"key": "big", "value": "é" * 9}), 18),
        ]:
            self.assertError(
                reply,
                413,
                "payload_too_large",
                f"the value is {size} bytes; the limit is 16",
            )
        self.assertIsNone(self.stored("big"))

    def test_unknown_routes(self) -> None:
        for method, path in [
            ("GET", "/nope"),
            ("GET", "/"),
            ("GET", "/kv"),
            ("GET", "/kv/"),
            ("PUT", "/kv/"),
            ("GET", "/get/"),
            ("POST", "/set/extra"),
        ]:
            reply = self.http.request(method, path)
            self.assertError(reply, 404, "no_route", f"no route for {path}")

    def test_wrong_method(self) -> None:
        for method, path, allow in [
            ("POST", "/get?key=k", "GET, HEAD"),
            ("DELETE", "/get?key=k", "GET, HEAD"),
            ("GET", "/set", "POST"),
            ("PUT", "/set", "POST"),
            ("GET", "/delete", "POST"),
            ("PATCH", "/kv/a", "DELETE, GET, HEAD, PUT"),
            ("POST", "/kv/a", "DELETE, GET, HEAD, PUT"),
            ("OPTIONS", "/kv/a", "DELETE, GET, HEAD, PUT"),
        ]:
            reply = self.http.request(method, path, b"{}")
            route = path.split("?")[0]
            self.assertError(
                reply,
                405,
                "method_not_allowed",
                f"{method} is not allowed on {route}; use {allow}",
            )
            self.assertEqual(reply.header("allow"), allow)

    def test_non_ascii_content_type(self) -> None:
        reply = self.http.put("/kv/k", b"v", {"Content-Type": b"text/caf\xc3\xa9"})
        self.assertError(reply, 400, "bad_request", "the Content-Type header is not ASCII")
        self.assertIsNone(self.stored("k"))
