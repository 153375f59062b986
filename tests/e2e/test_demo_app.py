"""The demo application alone (no Weft): its services reach each other across the three test
nodes and through the NAT VIP, and their truth logs describe every call exactly once."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.demo import HOP_TYPES, SERVICES, DemoApp, check_rows, spans_per_root
from infra.nodes import ROUTER_ADDRESS, NodeSet

pytestmark = [pytest.mark.netns, pytest.mark.slow]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoApp]:
    with NodeSet(3, router=True) as nodes:
        demo = DemoApp(nodes, Path(tmp_path_factory.mktemp("demo-app")))
        demo.start()
        try:
            yield demo
        finally:
            demo.stop()


def test_layout_spreads_languages_over_nodes() -> None:
    assert len(SERVICES) >= 5
    assert {s.lang for s in SERVICES} == {"python", "go", "node"}
    assert {s.node for s in SERVICES} == {0, 1, 2}
    assert spans_per_root() == 12


@pytest.mark.parametrize("concurrency", [1, 8])
def test_every_call_is_logged_once_by_both_sides(app: DemoApp, concurrency: int) -> None:
    result = app.drive(concurrency=concurrency, requests=24)
    assert (result.sent, result.ok, result.failed) == (24, 24, 0)
    rows = app.truth_rows(result.run_id)
    assert check_rows(rows) == []
    assert len(rows) == 24 * spans_per_root()
    by_hop = Counter((r["role"], r["hop"]) for r in rows)
    assert by_hop == {("client", "root"): 24, ("server", "cross_node"): 24 * 5, ("server", "nat"): 24,
                      ("client", "spawned_thread"): 48, ("client", "goroutine"): 24, ("client", "thread"): 48}
    assert {hop for _, hop in by_hop} == set(HOP_TYPES)
    # The chain of depth 4 below the root: front → cart → stock → ledger.
    assert any(r["rid"].endswith(".cart.stock.ledger") and r["role"] == "server" for r in rows)


def test_calls_cross_nodes_and_the_vip_crosses_nat(app: DemoApp) -> None:
    result = app.drive(concurrency=2, requests=6)
    servers = [r for r in app.truth_rows(result.run_id) if r["role"] == "server"]
    callers = {"front": "driver", "catalog": "front", "cart": "front", "stock": "cart", "ledger": "stock"}
    node_of = {s.name: app.nodes[s.node].address for s in SERVICES} | {"driver": app.nodes[2].address}
    for row in servers:
        if row["service"] == "pricing":
            assert row["peer"] == ROUTER_ADDRESS, row  # masqueraded by the VIP router
        else:
            assert row["peer"] == node_of[callers[row["service"]]], row
            assert row["peer"] != node_of[row["service"]], row
