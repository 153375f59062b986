"""`weft show TRACE_ID | --last N [--file F]`: traces as indented trees with a time bar.

Reads OTLP JSON lines (default: run_dir()/traces.jsonl, the file `weft run` writes). Each row
shows the span name, kind, service@node, duration, the hop type that linked it, and a bar
placed on the trace's time axis — a waterfall in the terminal. A failed span (status Error)
is marked ✗ with its status code or "no response", its bar in red.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from stitcher.otlp_convert import JsonSpan, read_json_spans
from weft.config import run_dir

BAR_WIDTH = 32
DUR_WIDTH = 10   # "123456.7 ms"-ish: never cut
LINK_WIDTH = 14


def default_file() -> Path:
    return run_dir() / "traces.jsonl"


def group_traces(spans: Iterable[JsonSpan]) -> dict[str, list[JsonSpan]]:
    """trace id → its spans (first occurrence of a span id wins: re-exports are identical)."""
    traces: dict[str, dict[str, JsonSpan]] = defaultdict(dict)
    for span in spans:
        traces[span.trace_id].setdefault(span.span_id, span)
    return {t: list(members.values()) for t, members in traces.items()}


def tree_rows(spans: list[JsonSpan]) -> list[tuple[int, JsonSpan]]:
    """(depth, span) in depth-first order, children by start time; spans whose parent is not in
    the trace (foreign parent, or not exported yet) are shown as roots."""
    ids = {s.span_id for s in spans}
    children: dict[str, list[JsonSpan]] = defaultdict(list)
    roots: list[JsonSpan] = []
    for span in spans:
        if span.parent_span_id and span.parent_span_id in ids and span.parent_span_id != span.span_id:
            children[span.parent_span_id].append(span)
        else:
            roots.append(span)
    rows: list[tuple[int, JsonSpan]] = []
    seen: set[str] = set()

    def walk(span: JsonSpan, depth: int) -> None:
        if span.span_id in seen:
            return
        seen.add(span.span_id)
        rows.append((depth, span))
        for child in sorted(children[span.span_id], key=lambda s: (s.start_ns, s.span_id)):
            walk(child, depth + 1)

    for root in sorted(roots, key=lambda s: (s.start_ns, s.span_id)):
        walk(root, 0)
    return rows


def _bar(span: JsonSpan, t0: int, total: int, bar_width: int) -> Text:
    begin = int((span.start_ns - t0) / total * bar_width) if total else 0
    length = max(1, int((span.end_ns - span.start_ns) / total * bar_width)) if total else bar_width
    begin = min(begin, bar_width - 1)
    length = min(length, bar_width - begin)
    style = "red" if span.error else "cyan" if span.kind == "SERVER" else "magenta"
    return Text(" " * begin) + Text("█" * length, style=style) + Text(" " * (bar_width - begin - length))


def render_trace(trace_id: str, spans: list[JsonSpan], width: int = 120) -> Table:
    """The trace as a table that fits `width` columns: durations and links keep their width,
    the bar narrows, and span names and services are cut with an ellipsis."""
    # 5 columns, 4 separators of 3 characters; the duration and link columns are fixed
    free = max(width - 4 * 3 - DUR_WIDTH - LINK_WIDTH, 24)
    bar_width = max(8, min(BAR_WIDTH, free // 4))
    names = free - bar_width
    span_width = names * 3 // 5
    t0 = min(s.start_ns for s in spans)
    total = max(s.end_ns for s in spans) - t0
    table = Table(title=f"trace {trace_id} · {len(spans)} spans · {total / 1e6:.1f} ms",
                  title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("span", no_wrap=True, overflow="ellipsis", max_width=span_width)
    table.add_column("service@node", style="green", no_wrap=True, overflow="ellipsis",
                     max_width=names - span_width)
    table.add_column("dur", justify="right", no_wrap=True, min_width=DUR_WIDTH)
    table.add_column("link", style="dim", no_wrap=True, overflow="ellipsis", max_width=LINK_WIDTH)
    table.add_column("timeline", no_wrap=True)
    for depth, span in tree_rows(spans):
        kind = "→" if span.kind == "CLIENT" else "⇢" if span.kind == "SERVER" else "·"
        duration = f"{(span.end_ns - span.start_ns) / 1e6:.1f} ms"
        status = span.attributes.get("http.response.status_code") or "no response"
        failed = f" ✗ {status}" if span.error else ""
        table.add_row(f"{'  ' * depth}{kind} {span.name}{failed}", f"{span.service}@{span.node}", duration,
                      str(span.attributes.get("weft.link", "")), _bar(span, t0, total, bar_width))
    return table


def pick(traces: dict[str, list[JsonSpan]], trace_id: str | None, last: int | None) -> list[str]:
    if trace_id:
        wanted = trace_id.lower()
        return [t for t in traces if t == wanted or t.startswith(wanted)]
    by_start = sorted(traces, key=lambda t: max(s.start_ns for s in traces[t]))
    return by_start[-(last or 1):]


@click.command("show")
@click.argument("trace_id", required=False)
@click.option("--last", type=int, default=None, help="show the N most recent traces")
@click.option("--file", "path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="OTLP JSON lines file (default: run_dir()/traces.jsonl)")
def show_command(trace_id: str | None, last: int | None, path: Path | None) -> None:
    """Print traces as indented trees with durations and a time bar."""
    if not trace_id and last is None:
        raise click.UsageError("give a TRACE_ID (or a prefix of one) or --last N")
    path = path or default_file()
    if not path.exists():
        raise click.ClickException(f"{path} does not exist: run `weft rebuild --out {path}` or "
                                   "`make run` first, or pass --file")
    with open(path) as fh:
        traces = group_traces(read_json_spans(fh))
    chosen = pick(traces, trace_id, last)
    if not chosen:
        raise click.ClickException(f"no trace {trace_id!r} in {path}" if trace_id else f"no traces in {path}")
    console = Console()
    for t in chosen:
        console.print(render_trace(t, traces[t], console.width))
        console.print()
