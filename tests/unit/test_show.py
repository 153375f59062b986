from io import StringIO

from rich.console import Console

from schemas.codec import make_frame
from stitcher.engine import Engine
from stitcher.engine import events as E
from stitcher.otlp_convert import JsonSpan, read_json_spans, spans_to_json_line
from stitcher.show import render_trace
from stitcher.state_memory import MemoryStateStore


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


def test_failed_spans_are_marked_from_their_otlp_status() -> None:
    """The status the engine exported decides, read back from OTLP JSON: a client's 404 and a
    request that got no response are failures, a server's 404 is not."""
    s = 10**9
    a, b = ("10.0.0.1", 40000), ("10.0.0.2", 80)
    events = [E.http("client", pid=1, tid=1, start=s, end=s + 5, cookie=1, local=a, remote=b, path="/nf",
                     status=404),
              E.http("server", pid=2, tid=2, start=s + 1, end=s + 4, cookie=2, local=b, remote=a, path="/nf",
                     status=404),
              E.http("client", pid=1, tid=1, start=s + 10, end=s + 90, cookie=3, local=a, remote=b,
                     path="/gone", status=0),
              E.watermark(s + 600 * 10**9)]
    engine = Engine(MemoryStateStore())
    engine.expect_nodes({"n": []})
    exported = engine.process(make_frame("n", events)) + engine.flush()
    spans = list(read_json_spans([spans_to_json_line(exported)]))
    failed = {(x.kind, x.name): x.error for x in spans}
    assert failed == {("CLIENT", "GET /nf"): True, ("SERVER", "GET /nf"): False,
                      ("CLIENT", "GET /gone"): True}
    out = StringIO()
    Console(file=out, width=120, color_system=None).print(render_trace(spans[0].trace_id, spans, 120))
    text = out.getvalue()
    assert "GET /nf ✗ 404" in text and "GET /gone ✗ no response" in text and text.count("✗") == 2, text
