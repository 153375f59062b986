"""Truth rows → verify's truth: rids are matched to stitched spans by kind and url.path."""

from __future__ import annotations

import pytest

from infra.demo import DemoError, build_truth, check_rows
from stitcher.otlp_convert import JsonSpan


def _span(span_id: str, kind: str, path: str, parent: str = "") -> JsonSpan:
    return JsonSpan("t" * 32, span_id, parent, f"GET {path}", kind, 0, 1, "svc", "n0", {"url.path": path})


ROWS = [
    {"rid": "a-0-0", "parent_rid": "", "role": "client", "service": "driver", "hop": "root"},
    {"rid": "a-0-0", "parent_rid": "", "role": "server", "service": "front", "hop": "cross_node"},
    {"rid": "a-0-0.cart", "parent_rid": "a-0-0", "role": "client", "service": "front",
     "hop": "spawned_thread"},
    {"rid": "a-0-0.cart", "parent_rid": "a-0-0", "role": "server", "service": "cart", "hop": "nat"},
]


def test_rows_map_to_span_ids_by_kind_and_path() -> None:
    spans = [_span("c0", "CLIENT", "/front/r-a-0-0"), _span("s0", "SERVER", "/front/r-a-0-0"),
             _span("c1", "CLIENT", "/cart/r-a-0-0.cart"), _span("s1", "SERVER", "/cart/r-a-0-0.cart"),
             _span("zz", "SERVER", "/health")]
    assert build_truth(ROWS, spans) == [
        {"span": "c0", "parent": "", "hop": "root"},
        {"span": "s0", "parent": "c0", "hop": "cross_node"},
        {"span": "c1", "parent": "s0", "hop": "spawned_thread"},
        {"span": "s1", "parent": "c1", "hop": "nat"},
    ]


def test_a_span_weft_missed_gets_a_placeholder_that_never_matches() -> None:
    spans = [_span("c0", "CLIENT", "/front/r-a-0-0"), _span("s1", "SERVER", "/cart/r-a-0-0.cart")]
    truth = build_truth(ROWS, spans)
    assert truth[1] == {"span": "missing:server:a-0-0", "parent": "c0", "hop": "cross_node"}
    assert truth[3] == {"span": "s1", "parent": "missing:client:a-0-0.cart", "hop": "nat"}


def test_two_spans_claiming_one_call_is_an_error() -> None:
    with pytest.raises(DemoError, match="two stitched spans"):
        build_truth(ROWS, [_span("c0", "CLIENT", "/front/r-a-0-0"), _span("c9", "CLIENT", "/front/r-a-0-0")])


def test_check_rows_finds_half_logged_and_inconsistent_calls() -> None:
    assert check_rows(ROWS) == []
    assert check_rows(ROWS[:3]) == ["client a-0-0.cart (front) has no server row"]
    bad = [*ROWS[:3], {**ROWS[3], "parent_rid": "other"}]
    assert check_rows(bad) == ["server a-0-0.cart: x-truth-parent 'other' but the caller logged 'a-0-0'"]
    assert check_rows([*ROWS, ROWS[0]]) == ["client a-0-0 logged twice"]
