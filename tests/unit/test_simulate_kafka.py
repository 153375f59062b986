"""`weft simulate --kafka`: every frame reaches the real broker, keyed by node, in node order."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from confluent_kafka import Consumer

from infra.services import LocalInfra
from schemas.codec import decode_frame
from stitcher.simulate import SimConfig, Simulation
from weft.cli import cli


def test_simulate_produces_every_frame_keyed_by_node(infra: LocalInfra, tmp_path: Path) -> None:
    topic = "weft.test.simulate"
    infra.create_topic(topic, 2)
    args = ["simulate", "--nodes", "3", "--rps", "5", "--seconds", "1", "--seed", "4",
            "--kafka", infra.bootstrap, "--topic", topic, "--truth", str(tmp_path / "truth.jsonl")]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    sim = Simulation(SimConfig(nodes=3, rps=5, seconds=1, seed=4))
    sim.run()
    expected = {name: [f.seq for f in sim.frames(n)] for n, name in enumerate(sim.node_names)}
    consumer = Consumer({"bootstrap.servers": infra.bootstrap, "group.id": "weft-test-simulate",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    got: dict[str, list[int]] = {name: [] for name in expected}
    total = sum(len(v) for v in expected.values())
    try:
        for _ in range(600):
            if sum(len(v) for v in got.values()) >= total:
                break
            for msg in consumer.consume(500, timeout=0.5):
                assert msg.error() is None
                frame = decode_frame(msg.value())
                assert msg.key() == frame.node.encode()
                got[frame.node].append(frame.seq)
    finally:
        consumer.close()
    assert got == expected
    assert (tmp_path / "truth.jsonl").read_text().count("\n") == len(sim.truth)
