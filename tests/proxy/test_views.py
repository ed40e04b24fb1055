"""
In-memory tests of what ``/cluster`` and ``/explain`` show (L{shardkv.proxy.views}).

``/cluster`` is the proxy's view of the ring, the quorum levels, each node's
health and the hints waiting for it; ``/explain`` is where one key lives and
what each of its replicas holds right now. The first tests use a one-copy
cluster, where the owner is the only replica; the last one a replicated
cluster with a replica that missed a write.
"""

from __future__ import annotations

from urllib.parse import quote

from twisted.trial.unittest import SynchronousTestCase

from shardkv.core.placement import hash_key
from tests.helpers import NODES_5, check_health, deliver_hints, memory_cluster
from tests.proxy.cluster_case import (
    NODES,
    TIMEOUT,
    UNKNOWN,
    ClusterCase,
    holders,
    key_owned_by,
    kv,
    new_cluster,
    proxy_http,
    version_of,
)


class OneCopyViewTests(SynchronousTestCase):
    """With one copy, the views show each key's owner as its only replica."""

    def setUp(self) -> None:
        self.cluster = new_cluster()
        self.http = proxy_http(self, self.cluster)

    def test_cluster_view(self) -> None:
        reply = self.http.get("/cluster")
        self.assertEqual(reply.code, 200)
        payload = reply.json()
        self.assertEqual(
            list(payload),
            [
                "replicas",
                "r",
                "w",
                "undelivered",
                "nodes",
                "epoch",
                "provisional",
                "phase",
                "members",
                "rebalance",
            ],
        )
        self.assertEqual(
            (payload["replicas"], payload["r"], payload["w"], payload["undelivered"]), (1, 1, 1, 0)
        )
        nodes = payload["nodes"]
        self.assertEqual([n["node"] for n in nodes], NODES)
        ring = self.cluster.ring
        shares = ring.shares()
        for entry in nodes:
            node = entry["node"]
            self.assertEqual(
                entry,
                {
                    "node": node,
                    "weight": 1.0,
                    "vnodes": ring.vnode_counts()[node],
                    "share": round(shares[node], 6),
                    "health": UNKNOWN,
                    "hints_waiting": 0,
                    "pipelines": {},
                },
            )
            self.assertGreater(entry["vnodes"], 0)
            # Equal weights: each share is about a third.
            self.assertLess(abs(entry["share"] - 1 / 3), 0.02, entry)
        # trial's assertAlmostEqual ignores delta=, so compare by hand.
        self.assertLess(abs(sum(n["share"] for n in nodes) - 1.0), 1e-5)

    def test_cluster_view_shows_quorum_levels(self) -> None:
        """
        /cluster names the cluster's N, R and W; N never exceeds the number
        of nodes, and R and W shrink with it.
        """
        for kwargs, expected in [
            ({"replicas": 1, "r": 1, "w": 1}, (1, 1, 1)),
            ({"replicas": 3, "r": 2, "w": 2}, (3, 2, 2)),
            ({"replicas": 3, "r": 1, "w": 3}, (3, 1, 3)),
            ({"replicas": 5, "r": 3, "w": 3}, (3, 3, 3)),
        ]:
            cluster = memory_cluster(NODES, TIMEOUT, **kwargs)
            payload = proxy_http(self, cluster).get("/cluster").json()
            self.assertEqual((payload["replicas"], payload["r"], payload["w"]), expected, kwargs)

    def test_cluster_view_shows_health(self) -> None:
        down = NODES[1]
        self.cluster.network.down.add(down)
        self.cluster.clock.advance(7)
        d = self.cluster.health.check_all()
        self.http.pump(d)
        self.successResultOf(d)
        health = {n["node"]: n["health"] for n in self.http.get("/cluster").json()["nodes"]}
        for node in NODES:
            status = "down" if node == down else "up"
            self.assertEqual(
                (health[node]["status"], health[node]["since"], health[node]["last_check"]),
                (status, 7.0, 7.0),
                node,
            )
        self.assertIsNone(health[NODES[0]]["error"])
        self.assertIn(down, health[down]["error"])

    def test_explain(self) -> None:
        for key, query in [("name", "name"), ("a/b", "a%2Fb"), ("café", "caf%C3%A9")]:
            reply = self.http.get("/explain?key=" + query)
            self.assertEqual(reply.code, 200)
            payload = reply.json()
            placement = self.cluster.ring.explain(key, 3)
            owner = self.cluster.ring.owner(key)
            self.assertEqual(
                payload,
                {
                    "key": key,
                    "hash": hash_key(key),
                    "position": placement.position,
                    "token": placement.token,
                    "owner": owner,
                    "replicas": [{"node": owner, "status": "unknown", "version": None}],
                    "preference_list": list(placement.preference_list),
                },
            )
            prefs = payload["preference_list"]
            self.assertEqual(prefs[0], owner)
            self.assertEqual(sorted(prefs), NODES)
            # The explanation is the truth: a write goes to that owner, and
            # the explanation then shows the version the owner holds.
            version = self.http.put("/kv/" + quote(key, safe=""), b"v").json()["version"]
            self.assertEqual(holders(self.cluster, key), [owner])
            replicas = self.http.get("/explain?key=" + query).json()["replicas"]
            self.assertEqual(
                replicas,
                [{"node": owner, "status": "unknown", "version": version, "tombstone": False}],
            )
            deleted = self.http.delete("/kv/" + quote(key, safe="")).json()["version"]
            replicas = self.http.get("/explain?key=" + query).json()["replicas"]
            self.assertEqual(
                replicas,
                [{"node": owner, "status": "unknown", "version": deleted, "tombstone": True}],
            )

    def test_explain_shows_health(self) -> None:
        """
        Each of a key's N replicas is listed in preference order with the
        proxy's view of its health; one that cannot be asked shows why.
        """
        self.cluster = new_cluster(replicas=3)
        self.http = proxy_http(self, self.cluster)
        key = key_owned_by(self.cluster, NODES[0])
        self.cluster.health.mark(NODES[0], up=False, error="test")
        self.cluster.health.mark(NODES[1], up=True)
        self.cluster.network.down.add(NODES[2])
        payload = self.http.get("/explain?key=" + key).json()
        status = {"127.0.0.1:8081": "down", "127.0.0.1:8082": "up", "127.0.0.1:8083": "unknown"}
        replicas = payload["replicas"]
        self.assertEqual([r["node"] for r in replicas], payload["preference_list"])
        self.assertEqual(replicas[0]["node"], NODES[0])
        for entry in replicas:
            node = entry["node"]
            self.assertEqual((entry["status"], entry["version"]), (status[node], None), node)
            if node == NODES[2]:
                self.assertIn(f"{node} is down", entry["error"])
            else:
                self.assertNotIn("error", entry)


class ReplicatedViewTests(ClusterCase):
    """With three copies, the views show every home replica and the hints it waits for."""

    def test_explain_and_cluster_show_replicas_and_hints(self) -> None:
        """
        /explain lists each home replica with its health and the version it
        holds; /cluster shows the quorum levels and the hints waiting for
        each node.
        """
        self.use(5)
        key = "name"
        preference = self.cluster.ring.preference_list(key, 5)
        home = preference[:3]
        v1 = str(version_of(self.now("PUT", kv(key), b"v1")))
        behind = home[1]
        self.down(behind)
        v2 = str(version_of(self.now("PUT", kv(key), b"v2")))

        explained = self.now("GET", "/explain?key=" + key).json()
        placement = self.cluster.ring.explain(key, 5)
        self.assertEqual(
            {k: explained[k] for k in ("key", "owner", "token", "position", "preference_list")},
            {
                "key": key,
                "owner": home[0],
                "token": placement.token,
                "position": placement.position,
                "preference_list": preference,
            },
        )
        replicas = explained["replicas"]
        self.assertEqual([r["node"] for r in replicas], home)
        self.assertEqual(
            [(r["status"], r["version"], r.get("tombstone")) for r in replicas],
            [("up", v2, False), ("down", None, None), ("up", v2, False)],
        )
        self.assertIn(f"{behind} is down", replicas[1]["error"])

        cluster = self.now("GET", "/cluster").json()
        self.assertEqual((cluster["replicas"], cluster["r"], cluster["w"]), (3, 2, 2))
        waiting = {n["node"]: n["hints_waiting"] for n in cluster["nodes"]}
        self.assertEqual(waiting, dict.fromkeys(NODES_5, 0))  # a down node's hints: not counted yet

        self.restart(behind)
        explained = self.now("GET", "/explain?key=" + key).json()
        self.assertEqual(
            [(r["status"], r["version"]) for r in explained["replicas"]],
            [("up", v2), ("up", v1), ("up", v2)],
        )
        waiting = {
            n["node"]: n["hints_waiting"] for n in self.now("GET", "/cluster").json()["nodes"]
        }
        self.assertEqual(waiting, {n: 1 if n == behind else 0 for n in NODES_5})

        deliver_hints(self, self.cluster)
        check_health(self, self.cluster)
        waiting = {
            n["node"]: n["hints_waiting"] for n in self.now("GET", "/cluster").json()["nodes"]
        }
        self.assertEqual(waiting, dict.fromkeys(NODES_5, 0))
        explained = self.now("GET", "/explain?key=" + key).json()
        self.assertEqual([r["version"] for r in explained["replicas"]], [v2] * 3)
