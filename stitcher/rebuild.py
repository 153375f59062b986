"""`weft rebuild CAPTURE... [--out FILE | --otlp]`: stitch capture files offline.

The nodes' streams are merged by frame time (each file keeps its own order), run through the
engine with the in-memory store, and written as OTLP JSON lines — one ExportTraceServiceRequest
per line, spans sorted by (trace id, start, span id), so the same captures always give the same
bytes — or handed to the OTLP exporter (`stitcher.otlp.OtlpSpanExporter`).
"""

from __future__ import annotations

import gc
import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import TextIO

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from schemas import weft_events_pb2 as pb
from schemas.codec import CaptureReader, CodecError, decode_frame
from stitcher.engine import Engine, EngineConfig, Span
from stitcher.otlp_convert import spans_to_json_line
from stitcher.routes import RouteNamer, RouteSettings
from stitcher.state_memory import MemoryStateStore
from weft.config import ConfigError, load_section

SPANS_PER_LINE = 512
# Frames handed to the engine at once: the per-call work (low watermark over every node, the
# sweep check) is paid per batch; the output does not depend on the batching.
FRAMES_PER_BATCH = 64
# Span.sort_key's order (trace, start, span id), read in C rather than by a method call per span
_CANONICAL_ORDER = attrgetter("trace_id", "start_ns", "span_id")


@dataclass
class RebuildResult:
    spans: list[Span]
    frames: int
    events: int
    stats: dict[str, int]


def _stream(reader: CaptureReader) -> Iterator[pb.Frame]:
    for record in reader.records():
        try:
            yield decode_frame(record.payload, str(reader.path))
        except CodecError as exc:
            raise CodecError(exc.reason, record.offset, str(reader.path)) from None


def merged_frames(readers: Sequence[CaptureReader]) -> Iterator[pb.Frame]:
    """Frames of all captures, each file in its own order, merged by the frames' end time
    (ties: the earlier file first)."""
    return heapq.merge(*(_stream(r) for r in readers), key=_frame_end)


def _frame_end(frame: pb.Frame) -> int:
    return frame.t_max_ns


def _nodes(readers: Sequence[CaptureReader]) -> set[str]:
    nodes: set[str] = set()
    for reader in readers:
        if reader.header.node:
            nodes.add(reader.header.node)
        else:  # a capture that mixes nodes: name them all
            nodes.update(f.node for f in _stream(reader))
    return nodes


def rebuild(paths: Sequence[str | Path], config: EngineConfig | None = None,
            on_frame: Callable[[int], None] | None = None) -> RebuildResult:
    """Stitch capture files; spans come back sorted (the canonical output order)."""
    readers = [CaptureReader(p) for p in paths]
    engine = Engine(MemoryStateStore(), config)
    engine.expect_nodes(_nodes(readers))
    spans: list[Span] = []
    frames = 0
    # The join state is millions of small acyclic dicts and strings; the cyclic garbage
    # collector would re-scan them over and over as they grow (a quarter of the run time).
    collecting = gc.isenabled()
    gc.disable()
    try:
        batch: list[pb.Frame] = []
        for frame in merged_frames(readers):
            batch.append(frame)
            if len(batch) == FRAMES_PER_BATCH:
                spans.extend(engine.process_frames(batch))
                frames += len(batch)
                batch.clear()
                if on_frame is not None:
                    on_frame(frames)
        spans.extend(engine.process_frames(batch))
        frames += len(batch)
        if on_frame is not None:
            on_frame(frames)
        spans.extend(engine.flush())
        stats, events = engine.stats.as_dict(), engine.stats.events
        del engine                      # the join state goes now, by reference counting
        spans.sort(key=_CANONICAL_ORDER)
    finally:
        if collecting:
            # Everything allocated while the collector was off sits in its youngest
            # generation; the first collection would walk all of it (the spans: millions of
            # objects, none cyclic). Promote it to the oldest generation instead, unscanned.
            gc.freeze()
            gc.unfreeze()
            gc.enable()
    return RebuildResult(spans, frames, events, stats)


def write_json_lines(spans: Sequence[Span], out: TextIO) -> int:
    lines = 0
    for i in range(0, len(spans), SPANS_PER_LINE):
        out.write(spans_to_json_line(spans[i:i + SPANS_PER_LINE]))
        out.write("\n")                # not appended: that would copy the long line
        lines += 1
    return lines


def _count_frames(paths: Sequence[str | Path]) -> int:
    return sum(sum(1 for _ in CaptureReader(p).records()) for p in paths)


@click.command("rebuild")
@click.argument("captures", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="OTLP JSON lines file (default: stdout)")
@click.option("--otlp", is_flag=True, help="export over OTLP (OTEL_EXPORTER_OTLP_* settings)")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML file whose `engine:` section sets the join rules and `routes:` the span names "
                   "(else WEFT_CONFIG, WEFT_ENGINE_*, WEFT_ROUTES_*)")
def rebuild_command(captures: tuple[str, ...], out_path: Path | None, otlp: bool,
                    config_file: str | None) -> None:
    """Stitch capture files offline into traces: every trace (OTEL_TRACES_SAMPLER is not read, so
    this gives back the traces a sampling stitcher left out)."""
    if otlp and out_path is not None:
        raise click.UsageError("give --out FILE or --otlp, not both")
    try:
        config = load_section(EngineConfig, "engine", config_file=config_file).validate()
        routes = load_section(RouteSettings, "routes", config_file=config_file)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        total = _count_frames(captures)
        with Progress(TextColumn("rebuild"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=True, console=None) as progress:
            task = progress.add_task("frames", total=total)
            result = rebuild(captures, config,
                             on_frame=lambda n: progress.update(task, completed=n))
    except CodecError as exc:
        raise click.ClickException(f"cannot read capture: {exc}") from None
    spans = RouteNamer(routes).rename_all(result.spans) if routes.renames else result.spans
    if otlp:
        from stitcher.otlp import OtlpSpanExporter

        with OtlpSpanExporter() as exporter:
            exporter.export(spans)
        where = "OTLP"
    elif out_path is not None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(out_path, "w") as fh:
                write_json_lines(spans, fh)
        except OSError as exc:       # a write on a file names no file: say which one
            raise OSError(exc.errno, exc.strerror, str(out_path)) from exc
        where = str(out_path)
    else:
        write_json_lines(spans, click.get_text_stream("stdout"))
        where = "stdout"
    s = result.stats
    ignored = f", ignored routes {s['ignored']}" if s["ignored"] else ""
    click.echo(f"{result.frames} frames, {result.events} events → {len(spans)} spans to {where} "
               f"(duplicates {s['duplicates']}, late {s['late']}, ambiguous {s['ambiguous']}, "
               f"trace splits {s['trace_splits']}{ignored})", err=True)
