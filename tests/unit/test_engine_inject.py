"""The engine and Weft's own traceparents (header injection): exported ids, trace choice, and the
link_by_seq / link_by_tuple switches. Scenarios reuse the rule tests' builders."""

from __future__ import annotations

import pytest

from schemas import weft_events_pb2 as pb
from stitcher.engine import EngineConfig
from stitcher.engine.store import StateStore
from tests.unit.test_engine_rules import A_IP, B_IP, STORES, cli, run, srv

HEADER_ONLY = EngineConfig(link_by_seq=False, link_by_tuple=False)
TRACE = "11111111111111111111111111111111"
CLIENT_TP = f"00-{TRACE}-2222222222222222-01"
ASSIGNED_A = f"00-{TRACE}-3333333333333333-01"
ASSIGNED_B = f"00-{TRACE}-4444444444444444-01"


@pytest.fixture(params=sorted(STORES))
def store(request: pytest.FixtureRequest) -> StateStore:
    return STORES[request.param]()


def assigned(event: pb.Event, traceparent: str) -> pb.Event:
    event.http.assigned_traceparent = traceparent
    return event


def hop(*, injected: str = CLIENT_TP, seq: int | None = 777, server_tp: str = CLIENT_TP,
        a_assigned: str = "", b_assigned: str = ASSIGNED_B) -> dict[str, list[pb.Event]]:
    """A: a server whose handler calls B; B: the server of that call."""
    a = srv("/a", 0, 100)
    if a_assigned:
        assigned(a, a_assigned)
    return {"A": [a, cli("/b", 10, 50, seq=seq, injected=injected)],
            "B": [assigned(srv("/b", 12, 48, pid=200, seq=seq, local=(B_IP, 80), remote=(A_IP, 40000),
                               traceparent=server_tp), b_assigned)]}


def test_header_alone_links_and_exports_the_wire_ids(store: StateStore) -> None:
    spans, engine = run(store, hop(a_assigned=ASSIGNED_A), HEADER_ONLY)
    server_a, client, server_b = spans["S/a@A"], spans["C/b@A"], spans["S/b@B"]
    assert server_a.span_id.hex() == "3333333333333333" and server_a.trace_id.hex() == TRACE
    assert client.span_id.hex() == "2222222222222222" and client.parent_span_id == server_a.span_id
    assert server_b.span_id.hex() == "4444444444444444" and server_b.parent_span_id == client.span_id
    assert server_b.link == "traceparent" and server_b.trace_id.hex() == TRACE
    assert engine.stats.trace_mismatch == 0


def test_without_the_header_the_switches_leave_the_hop_unlinked(store: StateStore) -> None:
    spans, _ = run(store, hop(injected="", server_tp=""), HEADER_ONLY)
    assert spans["S/b@B"].parent_span_id == b""
    spans_seq, _ = run(type(store)(), hop(injected="", server_tp=""))  # default: by seq
    assert spans_seq["S/b@B"].parent_span_id == spans_seq["C/b@A"].span_id
    assert spans_seq["S/b@B"].link == "cross_node"


@pytest.mark.parametrize("config", [EngineConfig(link_by_seq=False), HEADER_ONLY])
def test_tuple_fallback_follows_its_switch(store: StateStore, config: EngineConfig) -> None:
    spans, _ = run(store, hop(injected="", server_tp="", seq=None), config)
    linked = spans["S/b@B"].parent_span_id == spans["C/b@A"].span_id
    assert linked == config.link_by_tuple


def test_a_child_keeps_its_parents_trace_and_the_mismatch_is_counted(store: StateStore) -> None:
    other = "00-99999999999999999999999999999999-2222222222222222-01"
    spans, engine = run(store, hop(injected=other, server_tp=other, a_assigned=ASSIGNED_A), HEADER_ONLY)
    assert spans["C/b@A"].trace_id.hex() == TRACE == spans["S/b@B"].trace_id.hex()
    assert spans["C/b@A"].span_id.hex() == "2222222222222222"
    assert engine.stats.trace_mismatch == 1


def test_a_root_takes_the_trace_weft_gave_it(store: StateStore) -> None:
    spans, _ = run(store, {"B": [assigned(srv("/b", 12, 48, pid=200), ASSIGNED_B)]})
    assert spans["S/b@B"].trace_id.hex() == TRACE
    assert spans["S/b@B"].span_id.hex() == "4444444444444444"
