"""End-to-end accuracy of Weft on the demo (issue 5): three test nodes, an agent per node, the
broker, Redis, `weft stitch`, six services; at concurrency 1, 8 and 64, each sustained for 60 s
(15 s with --quick), the stitched traces are compared with the services' own truth.

Metrics: e2e.precision and e2e.recall — the minimum over concurrency levels and hop types —
e2e.recall.<hop type> (minimum over levels), and per level the root requests per second and
the share of true spans Weft exported (e2e.c<N>.roots_per_s, e2e.c<N>.spans_found), and the
spans left unlinked because the kernel lost their parent's record (e2e.c<N>.parent_lost).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tests.bench.bench_infra import shared_infra
from tests.bench.context import BenchContext
from weft.demo import DemoPipeline

LEVELS = (1, 8, 64)


def run(ctx: BenchContext) -> dict[str, float]:
    seconds = 15.0 if ctx.quick else 60.0
    infra = shared_infra(ctx)
    figures: dict[str, float] = {}
    precision: list[float] = []
    recall: list[float] = []
    by_hop: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="weft-bench-e2e-") as tmp, \
            DemoPipeline.running(infra, Path(tmp)) as pipeline:
        for level in LEVELS:
            result = pipeline.app.drive(concurrency=level, seconds=seconds)
            verified = pipeline.verify(result, timeout_s=180)
            report = verified.report
            for hop, score in report.hops.items():
                if score.produced:
                    precision.append(score.precision)
                if score.true_edges:
                    recall.append(score.recall)
                    by_hop.setdefault(hop, []).append(score.recall)
            figures[f"e2e.c{level}.roots_per_s"] = round(result.ok / result.seconds, 1)
            figures[f"e2e.c{level}.spans_found"] = round(
                1 - report.missing / report.spans_true, 6) if report.spans_true else 0.0
            figures[f"e2e.c{level}.failed_requests"] = result.failed
            # calls whose parent's record the kernel lost (a LostRequest marker): left unlinked
            parent_lost = sum(1 for s in verified.spans.values() if s.attributes.get("weft.parent_lost"))
            figures[f"e2e.c{level}.parent_lost"] = parent_lost
            hops = ", ".join(f"{hop} {score.recall:.4f}" for hop, score in report.hops.items())
            ctx.console.print(f"concurrency {level}: {result.sent} roots in {result.seconds:.0f} s, "
                              f"precision {report.precision:.4%}, recall {report.recall:.4%}, "
                              f"missing {report.missing}, broken traces {report.broken_traces}, "
                              f"parent lost {parent_lost}, "
                              f"recall per hop: {hops}")
    figures["e2e.precision"] = min(precision, default=1.0)
    figures["e2e.recall"] = min(recall, default=0.0)
    for hop, values in sorted(by_hop.items()):
        figures[f"e2e.recall.{hop}"] = min(values)
    return figures
