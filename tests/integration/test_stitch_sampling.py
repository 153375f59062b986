"""The export stages on a real `weft stitch` worker (Kafka, Redis, OTLP/gRPC receiver) and on
`weft replay`: with `OTEL_TRACES_SAMPLER`, exactly the spans of the traces the sampler keeps are
exported, counted on the worker's metrics, and a replay with the same setting keeps the same
traces; with a `routes` setting, those spans are named by it."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from infra.procs import free_port
from stitcher.otlp_convert import request_from_json
from stitcher.routes import RouteNamer, RouteSettings
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from tests.integration.stitch_harness import (
    WEFT,
    StitchRun,
    rebuild_spans,
    received_bytes,
    scrape_metrics,
    scrape_until_exported,
    span_bytes,
)
from tests.otlp_receiver import OtlpReceiver
from weft.sampling import TraceSampler

pytestmark = [pytest.mark.infra, pytest.mark.slow]

RATIO = "0.3"
SAMPLER_ENV = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": RATIO}
EXPORT_ENV = {**SAMPLER_ENV, "WEFT_ROUTES_UNMATCHED": "method"}   # spans named by method alone


def test_a_worker_exports_the_traces_its_sampler_keeps_and_a_replay_the_same(
        infra: Any, tmp_path: Path) -> None:
    # a quarter of the entry requests come with a caller's traceparent, half of those not sampled
    sim = Simulation(SimConfig(nodes=4, rps=25, seconds=3, seed=31, foreign_tp_rate=0.25,
                               foreign_unsampled_rate=0.5))
    sim.run()
    spans = rebuild_spans(interleaved_frames(sim), sim.node_names)
    sampler = TraceSampler.from_env(SAMPLER_ENV)
    namer = RouteNamer(RouteSettings(unmatched="method"))
    expected = span_bytes(namer.rename(s) for s in spans if sampler.keeps_span(s))
    assert 0 < len(expected) < len(spans)
    assert not set(expected) & set(span_bytes(spans))     # every exported span was renamed
    # the callers' flags overrule the trace id both ways, so a sampler by id alone fails this test
    by_id = {s.span_id for s in spans if sampler.keeps(s.trace_id)}
    by_caller = {s.span_id for s in spans if sampler.keeps_span(s)}
    assert by_caller - by_id and by_id - by_caller
    run = StitchRun.fresh(infra, sim.node_names, partitions=2)
    port = free_port()
    with OtlpReceiver() as rx:
        try:
            worker = run.start_worker(tmp_path / "worker.log", rx.endpoint,
                                      {**EXPORT_ENV, "WEFT_STITCH_METRICS_PORT": str(port)})
            run.wait_assigned(2)
            sent = run.produce(interleaved_frames(sim))
            rx.wait_for(len(expected), timeout=90)
            run.wait_consumed(2, sent)
            [metrics] = scrape_until_exported([port], len(expected))
            # the traces left out may finish after the last kept one
            deadline = time.monotonic() + 30
            while metrics.get(("weft_stitch_spans_total", ()), 0) < len(spans) \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
                metrics = scrape_metrics(port)
        finally:
            code = worker.stop()     # SIGTERM: flush, then exit
        assert code == 0, worker.tail()
        assert received_bytes(rx.requests) == expected    # every kept span once, no other
    assert metrics[("weft_stitch_spans_total", ())] == len(spans)    # the join saw every span
    assert metrics[("weft_stitch_export_spans_total", (("result", "exported"),))] == len(expected)
    assert metrics[("weft_stitch_export_spans_total", (("result", "sampled_out"),))] == \
        len(spans) - len(expected)
    assert f"sampling: parentbased_traceidratio {RATIO}: traces that start here exported by trace id" \
        in worker.text()
    assert "span names: by method alone" in worker.text()

    out = tmp_path / "replay.jsonl"
    done = subprocess.run([WEFT, "replay", "--bootstrap", run.bootstrap, "--topic", run.raw_topic,
                           "--out", str(out)], env={**os.environ, **EXPORT_ENV},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert received_bytes(request_from_json(line) for line in out.read_text().splitlines()) == expected
    assert f"the sampler left out {len(spans) - len(expected)} of the {len(spans)} spans" in done.stdout


@pytest.mark.parametrize(("env", "error"), [
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "10%"},
     "Error: OTEL_TRACES_SAMPLER_ARG='10%': a ratio from 0 to 1, e.g. 0.1"),
    ({"WEFT_ROUTES_PATTERNS": "users/{id}"}, "Error: routes.patterns: 'users/{id}' must start with /"),
    ({"WEFT_ENGINE_IGNORE_ROUTES": "/healthz,/a*"},
     "Error: engine.ignore_routes: '/a*': * may only be the last segment"),
], ids=["sampler", "routes", "ignore"])
def test_a_bad_export_setting_stops_the_worker_in_one_sentence(infra: Any, tmp_path: Path,
                                                               env: dict[str, str], error: str) -> None:
    done = subprocess.run([WEFT, "stitch", "--redis-url", infra.redis_url, "--bootstrap", infra.bootstrap],
                          env={**os.environ, **env, "WEFT_RUN_DIR": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    out = (done.stdout + done.stderr).strip()
    assert done.returncode != 0
    assert out.splitlines() == [error], out
