"""Trace sampling at export (`OTEL_TRACES_SAMPLER`): the decision is the OpenTelemetry Python SDK's
`TraceIdRatioBased` one, checked against the SDK itself; a sampled sink passes whole traces and
counts the rest; bad settings are one sentence."""

from __future__ import annotations

import random
from functools import cache
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from stitcher.engine.model import Resource, Span
from stitcher.sampling import SampledSink, sampled
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from stitcher.sinks import JsonLinesSink
from tests.integration.stitch_harness import rebuild_spans
from weft.config import ConfigError
from weft.sampling import TraceSampler


@cache
def _spans() -> tuple[Span, ...]:
    sim = Simulation(SimConfig(nodes=4, rps=40, seconds=2, seed=5))
    sim.run()
    return tuple(rebuild_spans(interleaved_frames(sim), sim.node_names))


@pytest.mark.parametrize("ratio", [0.0, 1e-6, 0.001, 0.1, 0.25, 0.5, 0.999, 1.0])
def test_the_decision_is_the_sdks_trace_id_ratio(ratio: float) -> None:
    rng = random.Random(ratio)
    sdk = TraceIdRatioBased(ratio)
    ours = TraceSampler(ratio, "traceidratio")
    edges = [0, 1, (1 << 64) - 1, ours.bound - 1, ours.bound, ours.bound + 1]
    ids = [rng.getrandbits(128) for _ in range(20_000)] + [rng.getrandbits(64) << 64 | e for e in edges
                                                          if 0 <= e < 1 << 64]
    for trace_id in ids:
        expected = sdk.should_sample(None, trace_id, "span").decision.is_sampled()
        assert ours.keeps(trace_id.to_bytes(16, "big")) == expected, (ratio, hex(trace_id))


@pytest.mark.parametrize(("env", "ratio", "name"), [
    ({}, 1.0, "parentbased_always_on"),                         # the SDK's default
    ({"OTEL_TRACES_SAMPLER": "always_off"}, 0.0, "always_off"),
    ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, 0.0, "parentbased_always_off"),
    ({"OTEL_TRACES_SAMPLER": "AlWaYs_On "}, 1.0, "always_on"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio"}, 1.0, "traceidratio"),  # no argument: ratio 1
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}, 0.1, "traceidratio"),
    ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": " 0.5 "}, 0.5,
     "parentbased_traceidratio"),
    ({"OTEL_TRACES_SAMPLER_ARG": "0.1"}, 1.0, "parentbased_always_on"),  # an argument alone: ignored
])
def test_the_standard_variables_choose_the_sampler(env: dict[str, str], ratio: float, name: str) -> None:
    sampler = TraceSampler.from_env(env)
    assert (sampler.ratio, sampler.name) == (ratio, name)


@pytest.mark.parametrize(("env", "says"), [
    ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER='jaeger_remote': Weft samples by "
                                               "trace id; allowed: always_on, parentbased_always_on, "
                                               "always_off, parentbased_always_off, traceidratio, "
                                               "parentbased_traceidratio"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "10%"},
     "OTEL_TRACES_SAMPLER_ARG='10%': a ratio from 0 to 1, e.g. 0.1"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
     "OTEL_TRACES_SAMPLER_ARG=1.5: a ratio from 0 to 1"),
])
def test_a_bad_setting_is_one_sentence(env: dict[str, str], says: str) -> None:
    with pytest.raises(ConfigError) as err:
        TraceSampler.from_env(env)
    assert str(err.value) == says


def test_a_sampled_sink_passes_whole_traces_and_counts_the_rest(tmp_path: Path) -> None:
    spans = _spans()
    sampler = TraceSampler(0.3, "traceidratio")
    inner = JsonLinesSink(tmp_path / "out.jsonl")
    sink = sampled(inner, sampler)
    assert isinstance(sink, SampledSink)
    for i in range(0, len(spans), 50):       # in batches, as a worker exports
        sink.export(spans[i:i + 50])
    sink.shutdown()
    traces = {s.trace_id for s in spans}
    kept = {t for t in traces if sampler.keeps(t)}
    assert 0 < len(kept) < len(traces)       # the workload has traces on both sides
    kept_spans = [s for s in spans if s.trace_id in kept]
    assert inner.stats.exported == len(kept_spans)
    assert sink.stats.sampled_out == len(spans) - len(kept_spans)
    assert inner.stats is sink.stats         # the worker's metrics read one set of counters


def test_a_sampler_that_keeps_everything_adds_no_step(tmp_path: Path) -> None:
    inner = JsonLinesSink(tmp_path / "out.jsonl")
    assert sampled(inner, TraceSampler.from_env({"OTEL_TRACES_SAMPLER": "always_on"})) is inner
    assert sampled(inner, TraceSampler(1.0, "traceidratio")) is inner
    assert sampled(inner, TraceSampler.from_env({})) is not inner   # parent-based: callers decide
    inner.shutdown()


@pytest.mark.parametrize("name", ["parentbased_always_on", "parentbased_always_off",
                                  "parentbased_traceidratio", "always_on", "traceidratio"])
def test_a_trace_from_outside_is_decided_as_the_sdks_parent_based_sampler_decides(name: str) -> None:
    """Against the SDK's sampler of the same name, given the caller's context as a remote parent
    (or none, for a trace that starts in Weft)."""
    env = {"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": "0.5"}
    ours = TraceSampler.from_env(env)
    sdk = _sdk_sampler(name, 0.5)
    rng = random.Random(name)
    for _ in range(2_000):
        trace_id = rng.getrandbits(128)
        for remote in (None, True, False):
            parent = None if remote is None else set_span_in_context(NonRecordingSpan(SpanContext(
                trace_id, rng.getrandbits(64) | 1, is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED if remote else TraceFlags.DEFAULT))))
            expected = sdk.should_sample(parent, trace_id, "span").decision.is_sampled()
            span = _SPAN._replace(trace_id=trace_id.to_bytes(16, "big"), remote_sampled=remote)
            assert ours.keeps_span(span) == expected, (name, hex(trace_id), remote)


def _sdk_sampler(name: str, ratio: float) -> Sampler:
    return {"parentbased_always_on": ParentBased(ALWAYS_ON),
            "parentbased_always_off": ParentBased(ALWAYS_OFF),
            "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
            "always_on": ALWAYS_ON, "traceidratio": TraceIdRatioBased(ratio)}[name]


_SPAN = Span(b"", b"\x01" * 8, b"", "SERVER", "GET /", 1, 2, (), Resource("svc", "n", 1, "svc"), False)


def test_the_default_sampler_leaves_out_the_traces_a_caller_did_not_sample(tmp_path: Path) -> None:
    inner = JsonLinesSink(tmp_path / "out.jsonl")
    sink = sampled(inner, TraceSampler.from_env({}))
    spans = [_SPAN._replace(trace_id=bytes([i]) * 16, remote_sampled=remote)
             for i, remote in enumerate((None, True, False, False, None))]
    sink.export(spans)
    sink.shutdown()
    assert (inner.stats.exported, sink.stats.sampled_out) == (3, 2)
    assert TraceSampler.from_env({}).describe() == (
        "parentbased_always_on: every trace exported but those whose caller's traceparent said not sampled")


@pytest.mark.parametrize(("name", "says"), [
    ("always_on", "always_on: every trace exported"),
    ("always_off", "always_off: no traces exported (the join sees all; `weft rebuild` recovers the rest)"),
    ("parentbased_always_off", "parentbased_always_off: no traces that start here exported; a trace from "
                               "outside by its caller's sampled flag (the join sees all; `weft rebuild` "
                               "recovers the rest)"),
    ("traceidratio", "traceidratio 0.25: traces exported by trace id, about 25.00% of them (the join sees "
                     "all; `weft rebuild` recovers the rest)"),
])
def test_the_sampler_says_what_it_exports(name: str, says: str) -> None:
    sampler = TraceSampler.from_env({"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert sampler.describe() == says
