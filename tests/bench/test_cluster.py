"""bench/cluster.py: when a benchmark's proxy counts as ready."""

from cluster import ready_over


def test_a_proxy_is_ready_once_every_node_is_up_and_it_serves_the_chosen_map() -> None:
    health = {"nodes_up": 3, "nodes_total": 3, "map": {"epoch": 1, "provisional": False}}
    assert ready_over(health, 3)


def test_a_proxy_still_on_its_provisional_map_is_not_ready() -> None:
    """Its N, R and W are its own options until the nodes' map is chosen."""
    health = {"nodes_up": 3, "nodes_total": 3, "map": {"epoch": 0, "provisional": True}}
    assert not ready_over(health, 3)
    assert not ready_over({"nodes_up": 3, "nodes_total": 3}, 3)


def test_a_proxy_missing_a_node_or_over_other_nodes_is_not_ready() -> None:
    chosen = {"epoch": 1, "provisional": False}
    assert not ready_over({"nodes_up": 2, "nodes_total": 3, "map": chosen}, 3)
    assert not ready_over({"nodes_up": 3, "nodes_total": 3, "map": chosen}, 6)
    assert not ready_over(["not", "a", "dict"], 3)
