from io import StringIO

from rich.console import Console

from stitcher.otlp_convert import JsonSpan
from stitcher.show import render_trace


def _span(span_id: str, parent: str, name: str, start_ms: float, end_ms: float) -> JsonSpan:
    return JsonSpan(trace_id="ab" * 16, span_id=span_id, parent_span_id=parent, name=name,
                    kind="SERVER", start_ns=int(start_ms * 1e6), end_ns=int(end_ms * 1e6),
                    service="a-rather-long-service-name", node="node-with-a-long-name",
                    attributes={"weft.link": "cross_node"})


def test_durations_stay_whole_on_an_80_column_terminal() -> None:
    spans = [_span("01" * 8, "", "GET /checkout/items/with/a/long/path", 0, 1234.5),
             _span("02" * 8, "01" * 8, "GET /stock/items/with/a/long/path", 10, 900.25)]
    out = StringIO()
    Console(file=out, width=80, color_system=None).print(render_trace("ab" * 16, spans, 80))
    text = out.getvalue()
    assert "1234.5 ms" in text and "890.2 ms" in text, text
    assert max(len(line) for line in text.splitlines()) <= 80
