"""`weft verify`: compare stitched spans with the true parents → edge precision and recall.

Truth is a JSON-lines file, one object per span: {"span": hex, "parent": hex or "", "hop": hop
type} (what `weft simulate` writes; the end-to-end demo builds the same from its x-truth-parent
headers). An *edge* is (span, parent). Precision: of the edges Weft produced for spans in the
truth, the share that are true. Recall: of the true edges, the share Weft produced. Both are
also given per hop type (of the child span). A *broken trace* is a true trace whose spans do not
all share one stitched trace id; an *orphan* is a span with a true parent that Weft exported
without one; *missing* spans are in the truth but not in the output.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from stitcher.otlp_convert import JsonSpan, read_json_spans


@dataclass(frozen=True)
class Stitched:
    span: str
    parent: str
    trace: str


@dataclass
class HopScore:
    true_edges: int = 0
    found: int = 0          # true edges that Weft produced
    produced: int = 0       # edges Weft produced for spans of this hop type
    correct: int = 0        # of those, how many were true

    @property
    def precision(self) -> float:
        return self.correct / self.produced if self.produced else 1.0

    @property
    def recall(self) -> float:
        return self.found / self.true_edges if self.true_edges else 1.0


@dataclass
class Report:
    spans_true: int = 0
    spans_stitched: int = 0
    missing: int = 0
    extra: int = 0
    orphans: int = 0
    traces_true: int = 0
    broken_traces: int = 0
    hops: dict[str, HopScore] = field(default_factory=dict)

    def _total(self) -> HopScore:
        total = HopScore()
        for h in self.hops.values():
            total.true_edges += h.true_edges
            total.found += h.found
            total.produced += h.produced
            total.correct += h.correct
        return total

    @property
    def precision(self) -> float:
        return self._total().precision

    @property
    def recall(self) -> float:
        return self._total().recall

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {"precision": self.precision, "recall": self.recall,
                                 "spans_true": self.spans_true, "spans_stitched": self.spans_stitched,
                                 "missing": self.missing, "orphans": self.orphans,
                                 "broken_traces": self.broken_traces, "traces_true": self.traces_true}
        for hop, score in sorted(self.hops.items()):
            out[f"precision.{hop}"] = score.precision
            out[f"recall.{hop}"] = score.recall
            out[f"edges.{hop}"] = score.true_edges
        return out


def read_truth(path: Path) -> dict[str, tuple[str, str]]:
    """span hex → (true parent hex or "", hop type)."""
    truth: dict[str, tuple[str, str]] = {}
    with open(path) as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                truth[row["span"]] = (row.get("parent", ""), row.get("hop", "unknown"))
    return truth


def _true_roots(truth: dict[str, tuple[str, str]]) -> dict[str, str]:
    """span → the topmost span of its true trace that is in the truth (foreign parents end it)."""
    roots: dict[str, str] = {}
    for span in truth:
        chain = [span]
        current = span
        while True:
            parent = truth[current][0]
            if not parent or parent not in truth or parent in chain:
                break
            if parent in roots:
                current = roots[parent]
                break
            chain.append(parent)
            current = parent
        for member in chain:
            roots[member] = current
    return roots


def compare(stitched: Iterable[Stitched], truth: dict[str, tuple[str, str]]) -> Report:
    got = {s.span: s for s in stitched}
    report = Report(spans_true=len(truth), spans_stitched=len(got))
    report.extra = sum(1 for s in got if s not in truth)
    for span, (parent, hop) in truth.items():
        score = report.hops.setdefault(hop, HopScore())
        mine = got.get(span)
        if mine is None:
            report.missing += 1
            if parent:
                score.true_edges += 1
            continue
        if parent:
            score.true_edges += 1
            if mine.parent == parent:
                score.found += 1
            elif not mine.parent:
                report.orphans += 1
        if mine.parent:
            score.produced += 1
            if mine.parent == parent:
                score.correct += 1
    by_root: dict[str, set[str]] = defaultdict(set)
    for span, root in _true_roots(truth).items():
        mine = got.get(span)
        by_root[root].add(mine.trace if mine else "missing")
    report.traces_true = len(by_root)
    report.broken_traces = sum(1 for traces in by_root.values() if len(traces) != 1 or "missing" in traces)
    report.hops = dict(sorted(report.hops.items()))
    return report


def from_json_spans(spans: Iterable[JsonSpan]) -> list[Stitched]:
    return [Stitched(s.span_id, s.parent_span_id, s.trace_id) for s in spans]


def print_report(report: Report, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="weft verify: stitched edges vs truth")
    for col in ("hop type", "true edges", "precision", "recall"):
        table.add_column(col, justify="left" if col == "hop type" else "right")
    for hop, score in report.hops.items():
        table.add_row(hop, str(score.true_edges), f"{score.precision:.4%}", f"{score.recall:.4%}")
    table.add_row("[bold]all", str(sum(h.true_edges for h in report.hops.values())),
                  f"[bold]{report.precision:.4%}", f"[bold]{report.recall:.4%}")
    console.print(table)
    console.print(f"spans: {report.spans_true} true, {report.spans_stitched} stitched, "
                  f"{report.missing} missing, {report.orphans} orphans; traces: {report.traces_true} "
                  f"true, {report.broken_traces} broken")


@click.command("verify")
@click.argument("traces", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--truth", "truth_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="truth JSON lines ({span, parent, hop} per span)")
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object")
@click.option("--min-precision", type=float, default=None, help="exit 1 when precision is lower")
@click.option("--min-recall", type=float, default=None, help="exit 1 when recall is lower")
def verify_command(traces: Path, truth_path: Path, as_json: bool, min_precision: float | None,
                   min_recall: float | None) -> None:
    """Compare an OTLP JSON lines file of stitched traces with the truth."""
    with open(traces) as fh:
        report = compare(from_json_spans(read_json_spans(fh)), read_truth(truth_path))
    if as_json:
        click.echo(json.dumps(report.as_dict(), sort_keys=True))
    else:
        print_report(report)
    if (min_precision is not None and report.precision < min_precision) or (
            min_recall is not None and report.recall < min_recall):
        raise SystemExit(1)
