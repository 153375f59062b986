"""The join state on a real Redis Cluster: the engine's keys spread over three primaries and the
spans come out byte for byte as with the in-memory store (DESIGN.md: keys that work on Cluster)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from stitcher.engine import Engine, Span
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from stitcher.state_redis import RedisStateStore
from tests.integration.stitch_harness import StitchRun, rebuild_spans, received_bytes, span_bytes
from tests.otlp_receiver import OtlpReceiver
from tests.redis_cluster import LocalCluster


@pytest.fixture(params=["auth", "tls+auth"])
def any_cluster(request: pytest.FixtureRequest) -> LocalCluster:
    """The password-protected cluster, then the one that also speaks only TLS."""
    name = "redis_cluster" if request.param == "auth" else "tls_redis_cluster"
    cluster: LocalCluster = request.getfixturevalue(name)
    return cluster


def test_engine_on_redis_cluster_gives_the_spans_of_the_memory_store(any_cluster: LocalCluster) -> None:
    redis_cluster = any_cluster
    redis_cluster.flush()
    sim = Simulation(SimConfig(nodes=4, rps=120, seconds=3.0, seed=11))
    sim.run()
    frames = list(interleaved_frames(sim))
    expected = rebuild_spans(frames, sim.node_names)
    store = RedisStateStore(redis_cluster.settings(), cluster=True, namespace="cl:")
    lease = store.lease(ttl_ms=30_000)
    assert lease.try_acquire()
    engine = Engine(store)
    engine.expect_nodes(sim.node_names)
    spans: list[Span] = []
    try:
        for i in range(0, len(frames), 16):     # the worker's batched path, as `weft stitch` runs it
            spans += engine.process_frames(frames[i:i + 16])
        spans += engine.flush()
    finally:
        lease.release()
    assert len(expected) > 1000
    assert span_bytes(spans) == span_bytes(expected)
    # the state really was spread: every primary holds some of the engine's keys, each with a TTL
    for port in redis_cluster.ports:
        node = redis_cluster.node(port)
        keys = node.keys("cl:w:*")
        assert keys, f"primary {port} holds none of the join state"
        assert all(node.ttl(k) > 0 for k in keys[:50])
        node.close()


@pytest.mark.infra
@pytest.mark.slow
def test_two_stitch_workers_on_redis_cluster_export_exactly_the_rebuild(
        infra: Any, any_cluster: LocalCluster, tmp_path: Path) -> None:
    """`weft stitch` with `stitch.cluster` on: two Faust workers, the real broker, the state on the
    password-protected cluster (then on the TLS one, settings from WEFT_REDIS_*), a real
    OTLP/gRPC receiver; each span exactly once, as the offline rebuild gives it."""
    redis_cluster = any_cluster
    redis_cluster.flush()
    sim = Simulation(SimConfig(nodes=4, rps=25, seconds=3, seed=23))
    sim.run()
    expected = span_bytes(rebuild_spans(interleaved_frames(sim), sim.node_names))
    run = StitchRun.fresh(infra, sim.node_names, partitions=4)
    run.redis_url = redis_cluster.url
    with OtlpReceiver() as rx:
        try:
            env = {"WEFT_STITCH_CLUSTER": "true", "WEFT_REDIS_PASSWORD": redis_cluster.password}
            if redis_cluster.ca:
                env["WEFT_REDIS_SSL_CA_CERTS"] = str(redis_cluster.ca)
            for i in range(2):
                run.start_worker(tmp_path / f"worker{i}.log", rx.endpoint, env)
            run.wait_assigned(4)
            sent = run.produce(interleaved_frames(sim))
            rx.wait_for(len(expected), timeout=90)
            run.wait_consumed(4, sent)
        finally:
            codes = [w.stop() for w in run.workers]
    received = received_bytes(rx.requests)
    assert codes == [0, 0], [w.tail() for w in run.workers]
    assert len(expected) > 300
    assert received == expected
    for port in redis_cluster.ports:     # the workers' join state is on every primary
        node = redis_cluster.node(port)
        assert node.keys(f"{run.namespace}w:*"), f"primary {port} holds none of the join state"
        node.close()
