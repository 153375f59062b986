"""Kafka over mutual TLS, end to end: the real agents publish, a real `weft stitch` worker
consumes and writes dead letters, `weft replay` re-reads — all with nothing but the
WEFT_KAFKA_* settings, against a broker that accepts only TLS with a client certificate.

The broker is Tansu (memory storage) behind a TLS terminator (tests/tls.py) that requires a
client certificate signed by a CA made here; Tansu advertises the terminator's address, so a
client that does not speak TLS with that CA and certificate cannot get anywhere. Kafka SASL
cannot be tested here: Tansu offers no SASL mechanism (its `--authentication` rejects every
client), so those settings stay tested at the config level (test_security_settings.py)."""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

from infra import broker
from infra.procs import free_port, stop_daemon
from tests.faults.pipeline import AgentPipeline
from tests.integration.stitch_harness import WEFT, StitchRun
from tests.otlp_receiver import OtlpReceiver
from tests.tls import TestPki, TlsTerminator
from weft.config import KafkaSettings, load_section
from weft.run import spawn_agent, wait_agents

SERVER_PORT = 8080
PARTITIONS = 2


@dataclass
class TlsKafka:
    bootstrap: str                  # the terminator: the only address clients are told about
    env: dict[str, str]             # WEFT_KAFKA_* for a client with the CA and a client certificate
    terminator: TlsTerminator

    def settings(self, **overrides: str) -> KafkaSettings:
        return load_section(KafkaSettings, "kafka", env={**self.env, **overrides})


@pytest.fixture(scope="module")
def tls_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsKafka]:
    work = tmp_path_factory.mktemp("kafka-tls")
    pki = TestPki.make(work / "pki")
    plain_port, tls_port = free_port(), free_port()
    daemon = broker.start_broker(work / "broker", plain_port, advertised_port=tls_port)
    env = {"WEFT_KAFKA_BOOTSTRAP": f"127.0.0.1:{tls_port}", "WEFT_KAFKA_SECURITY_PROTOCOL": "SSL",
           "WEFT_KAFKA_SSL_CA_LOCATION": str(pki.ca.cert),
           "WEFT_KAFKA_SSL_CERTIFICATE_LOCATION": str(pki.client.cert),
           "WEFT_KAFKA_SSL_KEY_LOCATION": str(pki.client.key)}
    try:
        with TlsTerminator(pki, plain_port, require_client_cert=True, port=tls_port) as terminator:
            yield TlsKafka(f"127.0.0.1:{tls_port}", env, terminator)
    finally:
        stop_daemon(daemon)


def create_topics(kafka: KafkaSettings, topics: dict[str, int]) -> None:
    admin = AdminClient(kafka.confluent())
    futures = admin.create_topics([NewTopic(t, num_partitions=n, replication_factor=1)
                                   for t, n in topics.items()], operation_timeout=10)
    for future in futures.values():
        future.result(timeout=20)


def read_all(kafka: KafkaSettings, topic: str, enough: Callable[[list[bytes]], bool],
             timeout_s: float = 30.0) -> list[bytes]:
    consumer = Consumer({**kafka.confluent(), "group.id": f"tls-read-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        values: list[bytes] = []
        deadline = time.monotonic() + timeout_s
        while not enough(values):
            assert time.monotonic() < deadline, f"{topic}: not found in {len(values)} records"
            values += [m.value() or b"" for m in consumer.consume(1000, timeout=0.5) if m.error() is None]
        return values
    finally:
        consumer.close()


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def stitch_once(tls_kafka: TlsKafka, infra: Any, tmp_path: Path,
                **env: str) -> subprocess.CompletedProcess[str]:
    """`weft stitch` with the module's TLS settings plus `env`, asked to find Kafka once."""
    return subprocess.run([WEFT, "stitch", "--redis-url", infra.redis_url, "--group", "tls-refused"],
                          env={**os.environ, **tls_kafka.env, "WEFT_STITCH_STARTUP_WAIT_S": "0",
                               "WEFT_RUN_DIR": str(tmp_path), **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.infra
def test_a_client_without_the_certificate_or_the_ca_is_refused_in_one_sentence(
        tls_kafka: TlsKafka, infra: Any, tmp_path: Path) -> None:
    check = broker.reachable(tls_kafka.settings())
    assert check.ok, check.detail
    refused_before = tls_kafka.terminator.refused
    # what each misconfiguration looks like from the client: the cause librdkafka logged (any
    # one of these; which form it logs depends on when the server's refusal reaches it)
    cases = {
        "plaintext": ({"WEFT_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"}, ("connection closed by peer",)),
        # TLS 1.3: the server refuses after the client's side of the handshake is done, so the
        # client sees the connection closed, or the server's alert if it reads it first
        "no client certificate": (
            {"WEFT_KAFKA_SSL_CERTIFICATE_LOCATION": "", "WEFT_KAFKA_SSL_KEY_LOCATION": ""},
            ("SSL connection closed by peer", "alert certificate required")),
        # librdkafka logs this one in a long form (with its hint) and a short one
        "another CA": ({"WEFT_KAFKA_SSL_CA_LOCATION": str(TestPki.make(tmp_path / "other").ca.cert)},
                       ("error:0A000086:SSL routines::certificate verify failed",)),
    }
    for case, (env, causes) in cases.items():
        done = stitch_once(tls_kafka, infra, tmp_path, **env)
        out = done.stdout + done.stderr
        print(f"{case}: {out.strip()[-400:]}")
        assert done.returncode == 1, (case, out)
        assert f"cannot start: Kafka: {tls_kafka.bootstrap} accepts TCP connections but the Kafka session " \
               f"failed (" in out and "check kafka.security_protocol" in out, (case, out)
        assert any(cause in out for cause in causes), (case, out)
        assert "weft infra up" not in out, (case, out)       # starting a broker would not help
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, (case, out)
    assert tls_kafka.terminator.refused > refused_before       # the TLS cases failed at the handshake


def test_an_agent_given_a_file_librdkafka_cannot_use_says_so_in_one_sentence(
        tls_kafka: TlsKafka, tmp_path: Path) -> None:
    env = {**os.environ, **tls_kafka.env, "WEFT_RUN_DIR": str(tmp_path),
           "WEFT_KAFKA_SSL_CA_LOCATION": tls_kafka.env["WEFT_KAFKA_SSL_KEY_LOCATION"]}   # a key, not a CA
    done = subprocess.run([WEFT, "agent", "--node", "n", "--kafka", tls_kafka.bootstrap], env=env,
                          capture_output=True, text=True, timeout=120)
    out = (done.stdout + done.stderr).strip()
    assert done.returncode == 2, out
    assert out.startswith("weft agent: the Kafka client refused the kafka settings: ") and \
        "ssl.ca.location failed" in out and len(out.splitlines()) == 1, out


@pytest.mark.infra
@pytest.mark.slow
def test_a_ca_directory_serves_librdkafka_and_faust_alike(tls_kafka: TlsKafka, infra: Any,
                                                        tmp_path: Path) -> None:
    """librdkafka takes a CA file or a directory of hashed certificates; the Faust consumer
    (Python's ssl) needs to be told which, or a directory ends a worker with IsADirectoryError."""
    ca_dir = tmp_path / "cas"
    ca_dir.mkdir()
    (ca_dir / "weft-test-ca.pem").write_bytes(Path(tls_kafka.env["WEFT_KAFKA_SSL_CA_LOCATION"]).read_bytes())
    subprocess.run(["openssl", "rehash", str(ca_dir)], check=True, capture_output=True)
    env = {**tls_kafka.env, "WEFT_KAFKA_SSL_CA_LOCATION": str(ca_dir)}
    assert broker.reachable(tls_kafka.settings(WEFT_KAFKA_SSL_CA_LOCATION=str(ca_dir))).ok
    topic = f"weft.raw.{uuid.uuid4().hex[:8]}"
    create_topics(tls_kafka.settings(), {topic: 1, f"{topic}.dead": 1})
    run = StitchRun(bootstrap=tls_kafka.bootstrap, redis_url=infra.redis_url, raw_topic=topic,
                    dead_topic=f"{topic}.dead", group=f"weft-stitch-{uuid.uuid4().hex[:8]}",
                    namespace=f"tlsdir{uuid.uuid4().hex[:8]}:", nodes=["n0"])
    with OtlpReceiver() as rx:
        try:
            run.start_worker(tmp_path / "stitch.log", rx.endpoint, extra_env=env)
            run.wait_assigned(1, timeout=120)            # the Faust consumer joined over TLS
        finally:
            run.stop_all()


@pytest.mark.bpf
@pytest.mark.infra
@pytest.mark.netns
@pytest.mark.slow
def test_agents_stitch_dead_letters_and_replay_all_over_mutual_tls(tls_kafka: TlsKafka, infra: Any,
                                                                   tmp_path: Path) -> None:
    kafka = tls_kafka.settings()
    topic = f"weft.raw.{uuid.uuid4().hex[:8]}"
    create_topics(kafka, {topic: PARTITIONS, f"{topic}.dead": 1})
    path, requests = f"/tls-{uuid.uuid4().hex[:6]}", 5
    run = StitchRun(bootstrap=tls_kafka.bootstrap, redis_url=infra.redis_url, raw_topic=topic,
                    dead_topic=f"{topic}.dead", group=f"weft-stitch-{uuid.uuid4().hex[:8]}",
                    namespace=f"tls{uuid.uuid4().hex[:8]}:", nodes=["n0", "n1"])
    handshakes_before = tls_kafka.terminator.handshakes
    with OtlpReceiver() as rx, AgentPipeline.start(tmp_path, tls_kafka.bootstrap, topic, ["n0", "n1"],
                                                   extra_env=tls_kafka.env) as pipe:
        pipe.serve_http("n0", SERVER_PORT)
        try:
            run.start_worker(tmp_path / "stitch.log", rx.endpoint, extra_env=tls_kafka.env)
            run.wait_assigned(PARTITIONS, timeout=120)
            for _ in range(requests):
                done = pipe.node("n1").run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                            pipe.url("n0", SERVER_PORT, path)])
                assert done.stdout == "404", done
            producer = Producer(kafka.confluent())
            producer.produce(topic, b"not a frame", b"n9")
            assert producer.flush(20) == 0

            def ours() -> list[Any]:
                return [s for s in rx.spans if s.attributes.get("url.path") == path]
            wait_until(lambda: len(ours()) >= 2 * requests, 60, "the spans of every request, both sides")
            dead = read_all(kafka, run.dead_topic, lambda v: len(v) >= 1)
        finally:
            run.stop_all()
    spans = ours()
    clients = {s.span_id: s for s in spans if s.kind == PbSpan.SPAN_KIND_CLIENT}
    servers = [s for s in spans if s.kind == PbSpan.SPAN_KIND_SERVER]
    linked = [s for s in servers
              if s.parent_span_id in clients and clients[s.parent_span_id].trace_id == s.trace_id]
    print(f"over mutual TLS: {len(clients)} client and {len(servers)} server spans, {len(linked)} linked; "
          f"dead letters {len(dead)}; TLS handshakes {tls_kafka.terminator.handshakes - handshakes_before}")
    assert len(clients) == len(servers) == len(linked) == requests
    assert len(dead) == 1 and b"not a frame" in dead[0]

    out = tmp_path / "replay.jsonl"
    replay = subprocess.run([WEFT, "replay", "--topic", topic, "--store", "memory", "--out", str(out)],
                            env={**os.environ, **tls_kafka.env, "WEFT_RUN_DIR": str(tmp_path)},
                            capture_output=True, text=True, timeout=180)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    replayed = out.read_text()
    missing = [s.span_id.hex() for s in spans if s.span_id.hex() not in replayed]
    assert not missing, f"replay over TLS lacks {missing}"


@pytest.mark.bpf
@pytest.mark.slow
def test_an_agent_the_broker_refuses_spools_and_says_why_without_flooding_its_log(
        tls_kafka: TlsKafka, tmp_path: Path) -> None:
    """librdkafka retries a refused TLS handshake several times a second and logs each one;
    the agent (one per node, running for months) passes on each kind of line at most every 30 s."""
    other_ca = TestPki.make(tmp_path / "other").ca.cert
    env = {**os.environ, **tls_kafka.env, "WEFT_RUN_DIR": str(tmp_path / "run"),
           "WEFT_KAFKA_SSL_CA_LOCATION": str(other_ca)}
    agent = spawn_agent("refused", tmp_path, bootstrap=tls_kafka.bootstrap, env=env)
    try:
        wait_agents([agent])
        refused_before = tls_kafka.terminator.refused
        time.sleep(12)
        refused = tls_kafka.terminator.refused - refused_before
    finally:
        agent.stop(30)
    log = (tmp_path / "agent-refused.log").read_text()
    fail_lines = [line for line in log.splitlines() if "librdkafka: FAIL" in line]
    print(f"{refused} refused handshakes in 12 s; {len(fail_lines)} librdkafka FAIL lines logged")
    assert refused >= 10                        # librdkafka kept retrying: there was something to thin
    assert "certificate verify failed" in log and "spooling frames to" in log
    assert re.search(r"\d+ frames \(\d+ bytes\) wait in \S+ for the next start", log)
    assert 1 <= len(fail_lines) <= 3, "\n".join(fail_lines)
    assert "Traceback" not in log


def test_terminator_refuses_a_plain_client(tls_kafka: TlsKafka) -> None:
    """The fixture is what it claims: without TLS the broker behind it cannot be reached."""
    check = broker.reachable(tls_kafka.settings(WEFT_KAFKA_SECURITY_PROTOCOL="PLAINTEXT"), timeout_s=3)
    assert not check.ok and check.listening, check
    assert re.search(r"^127\.0\.0\.1:\d+ accepts TCP connections but the Kafka session failed", check.detail)
