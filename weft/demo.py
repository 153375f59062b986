"""`weft demo`: Weft as a whole on this machine — three test nodes, the broker and Redis, one
agent per node (on the host, each filtering by its node's cgroup), the stitcher, the demo
application (infra/demo.py) and steady traffic; then the stitched traces as trees and the
verify table. Ctrl-C or the end tears everything down.

`DemoPipeline` is the same assembly for the end-to-end test and bench: each one gets its own
topic, consumer group and Redis namespace, so runs never see each other's events.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from infra.demo import DemoApp, DriveResult, build_truth, spec, write_truth
from infra.nodes import NodeSet
from infra.services import LocalInfra
from stitcher.otlp_convert import JsonSpan, read_json_spans
from stitcher.verify import Report, compare, from_json_spans, read_truth
from weft.run import Child, StitchTarget, spawn_agent, start_stitcher, wait_agents

logger = logging.getLogger(__name__)


def _demo_keys(rows: list[dict[str, str]]) -> set[tuple[str, str]]:
    return {(r["role"], r["rid"]) for r in rows}


def read_spans(path: Path) -> list[JsonSpan]:
    if not path.exists():
        return []
    with open(path) as fh:
        return list(read_json_spans(fh))


@dataclass
class DemoPipeline:
    nodes: NodeSet
    infra: LocalInfra
    work_dir: Path
    app: DemoApp
    traces: Path
    children: list[Child] = field(default_factory=list)
    _spans: dict[str, JsonSpan] = field(default_factory=dict)
    _read_offset: int = 0

    @classmethod
    @contextlib.contextmanager
    def running(cls, infra: LocalInfra, work_dir: Path) -> Iterator[DemoPipeline]:
        """Nodes, stitcher, agents and the demo services, all stopped on the way out."""
        tag = uuid.uuid4().hex[:8]
        work_dir.mkdir(parents=True, exist_ok=True)
        topic = f"weft.raw.demo-{tag}"
        infra.create_topic(topic)
        infra.create_topic(f"weft.deadletter.demo-{tag}", 1)
        env = {**os.environ, "WEFT_RUN_DIR": str(work_dir), "WEFT_KAFKA_RAW_TOPIC": topic,
               "WEFT_KAFKA_DEAD_LETTER_TOPIC": f"weft.deadletter.demo-{tag}"}
        target = StitchTarget(infra.bootstrap, infra.redis_url, topic, f"weft-demo-{tag}", f"demo{tag}:")
        logs = work_dir / "logs"
        with NodeSet(3, router=True) as nodes:
            app = DemoApp(nodes, work_dir / "app")
            pipeline = cls(nodes, infra, work_dir, app, work_dir / "traces.jsonl")
            try:
                # Agents first (BCC compiles for a while; spawned together), so they see every
                # service process start; the stitcher meanwhile joins its consumer group.
                agents = [spawn_agent(n.name, logs, cgroups=[n.cgroup], bootstrap=infra.bootstrap, env=env)
                          for n in nodes]
                pipeline.children.extend(agents)
                pipeline.children.append(start_stitcher(target, logs, out=pipeline.traces,
                                                         expect_nodes=[n.name for n in nodes], env=env))
                wait_agents(agents)
                pipeline.app.start()
                yield pipeline
            finally:
                pipeline.app.stop()
                for child in reversed(pipeline.children):
                    child.stop()

    def check_alive(self) -> None:
        dead = [c for c in self.children if not c.alive()]
        if dead:
            raise RuntimeError(f"{dead[0].name} exited ({dead[0].proc.returncode}):\n{dead[0].tail()}")

    def stitched(self) -> dict[str, JsonSpan]:
        """Every span the stitcher wrote so far, by id; reads only what was appended since the
        last call (complete lines only: the stitcher may be mid-write)."""
        if self.traces.exists():
            with open(self.traces, "rb") as fh:
                fh.seek(self._read_offset)
                data = fh.read()
            complete = data[:data.rfind(b"\n") + 1]
            self._read_offset += len(complete)
            for span in read_json_spans(complete.decode().splitlines()):
                self._spans.setdefault(span.span_id, span)
        return self._spans

    def wait_stitched(self, rows: list[dict[str, str]], timeout_s: float = 60.0) -> list[JsonSpan]:
        """Poll the stitcher's output until every span of `rows` is there or time is up."""
        wanted = _demo_keys(rows)
        deadline = time.monotonic() + timeout_s
        while True:
            spans = list(self.stitched().values())
            have = {(s.kind.lower(), str(s.attributes.get("url.path", "")).partition("/r-")[2])
                    for s in spans}
            if wanted <= have or time.monotonic() > deadline:
                return spans
            self.check_alive()
            time.sleep(0.25)

    def verify(self, result: DriveResult, timeout_s: float = 60.0) -> Verified:
        """Verify the stitched spans of one traffic run against the services' truth."""
        rows = self.app.truth_rows(result.run_id)
        spans = self.wait_stitched(rows, timeout_s)
        truth = build_truth(rows, spans)
        path = write_truth(truth, self.work_dir / f"truth-{result.run_id}.jsonl")
        verified = Verified(compare(from_json_spans(spans), read_truth(path)), rows, truth,
                            {s.span_id: s for s in spans})
        # A long run writes millions of spans: keep only those a later verify may still need.
        mine = f"/r-{result.run_id}-"
        self._spans = {k: s for k, s in self._spans.items() if mine not in str(s.attributes.get("url.path"))}
        return verified


@dataclass(frozen=True)
class Verified:
    """One traffic run checked: verify's report, the services' truth rows, verify's truth
    (row for row), and the stitched spans by id."""

    report: Report
    rows: list[dict[str, str]]
    truth: list[dict[str, str]]
    spans: dict[str, JsonSpan]

    def flagged(self, *attributes: str) -> int:
        """How many stitched spans carry any of these boolean attributes (e.g. weft.parent_lost)."""
        return sum(1 for s in self.spans.values() if any(s.attributes.get(a) for a in attributes))


def demo_main(*, run_path: Path, seconds: float, concurrency: int, rps: float, show: int) -> int:
    """`weft demo`: the whole pipeline, `seconds` of traffic, then trees and the verify table."""
    from rich.console import Console

    from stitcher.show import group_traces, pick, render_trace
    from stitcher.verify import print_report
    from weft.run import PipelineError, StopRequested, stop_on_signals

    console = Console()
    work_dir = run_path / "demo" / time.strftime("%Y%m%d-%H%M%S")
    infra: LocalInfra | None = None
    try:
        with stop_on_signals():
            infra = LocalInfra.start(run_path)
            console.print(f"broker {infra.bootstrap}, redis {infra.redis_url}; work dir {work_dir}")
            console.print("starting 3 test nodes, one agent per node (BCC compiles: ~20 s), the stitcher "
                          "and the demo services …")
            with DemoPipeline.running(infra, work_dir) as pipeline:
                entry = spec("front")
                console.print(f"demo up: driver on n2 → front@n{entry.node} → … ; {seconds:.0f} s of traffic "
                              f"at concurrency {concurrency}" + (f", ≤ {rps:.0f} roots/s" if rps else ""))
                result = pipeline.app.drive(concurrency=concurrency, seconds=seconds, rps=rps)
                console.print(f"sent {result.sent} root requests ({result.failed} failed) in "
                              f"{result.seconds:.1f} s; waiting for the stitched traces …")
                report = pipeline.verify(result).report
                traces = group_traces(read_spans(pipeline.traces))
                for trace_id in pick(traces, None, show):
                    console.print(render_trace(trace_id, traces[trace_id]))
                    console.print()
                print_report(report, console)
                console.print(f"traces: {pipeline.traces}  (weft show --last 10 --file {pipeline.traces})")
        return 0
    except StopRequested:
        console.print("stopping")
        return 130
    except (PipelineError, RuntimeError) as exc:
        console.print(f"[red]weft demo: {exc}")
        return 1
    finally:
        if infra is not None:
            infra.stop()
