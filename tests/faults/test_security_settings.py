"""Kafka SASL/TLS and Redis AUTH/TLS settings reach the clients that use them.

* Redis: a real redis-server with TLS (a CA of this test's own) and a password; `weft replay
  --store redis` configured only through WEFT_REDIS_* variables stitches a topic through it.
  Without the password, or without the CA, the store refuses to start. A second server requires
  a client certificate (mutual TLS): refused without one, accepted with WEFT_REDIS_SSL_CERTFILE/KEYFILE.
* Kafka: settings from WEFT_KAFKA_* reach the agent's producer config, librdkafka accepts them
  (dead-letter producer built), and Faust gets matching SASL / SSL credentials. (The TLS round
  trip against a TLS-only broker, every client included: test_kafka_tls.py.)
(confluent() and client_kwargs() contents: tests/unit/test_config.py; a password-protected Redis
started by infra: tests/integration/test_infra.py::test_redis_password_is_required_when_set.)"""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import certifi
import pytest
import redis

from infra.procs import free_port, port_open, stop_pid
from probe_agent.sinks import producer_config
from stitcher.app import _credentials
from stitcher.deadletter import DeadLetterProducer
from stitcher.otlp import OtlpSettings, OtlpSpanExporter
from stitcher.simulate import SimConfig, Simulation, interleaved_frames
from stitcher.state_redis import RedisStateStore
from tests.integration.stitch_harness import WEFT, StitchRun, rebuild_spans
from tests.otlp_receiver import OtlpHttpReceiver, OtlpReceiver
from tests.tls import TestPki
from weft.config import ConfigError, KafkaSettings, RedisSettings, load_section

PASSWORD = "tls-and-auth-5e1f"


@dataclass
class TlsRedis:
    url: str
    ca: Path
    client_cert: Path       # signed by `ca`; the server asks for it only in mutual-TLS mode
    client_key: Path


def _tls_redis(tmp_path: Path, auth_clients: str) -> Iterator[TlsRedis]:
    """redis-server speaking only TLS (certificate for 127.0.0.1 signed by a CA made here),
    requiring a password, and a client certificate when auth_clients is "yes"."""
    pki = TestPki.make(tmp_path)
    ca, (cert, key), (client_cert, client_key) = pki.ca.cert, pki.server, pki.client
    port = free_port()
    log = open(tmp_path / "redis.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                             "--tls-cert-file", str(cert), "--tls-key-file", str(key),
                             "--tls-ca-cert-file", str(ca), "--tls-auth-clients", auth_clients,
                             "--requirepass", PASSWORD, "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            if port_open("127.0.0.1", port):
                break
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            time.sleep(0.05)
        yield TlsRedis(f"rediss://127.0.0.1:{port}/0", ca, client_cert, client_key)
    finally:
        stop_pid(proc.pid)
        proc.wait(5)
        log.close()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    yield from _tls_redis(tmp_path, auth_clients="no")


@pytest.fixture
def mtls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    yield from _tls_redis(tmp_path, auth_clients="yes")


@pytest.mark.infra
def test_replay_through_redis_with_tls_and_password_from_env(infra: Any, tls_redis: TlsRedis,
                                                             tmp_path: Path) -> None:
    env = {"WEFT_REDIS_URL": tls_redis.url, "WEFT_REDIS_PASSWORD": PASSWORD,
           "WEFT_REDIS_SSL_CA_CERTS": str(tls_redis.ca)}
    settings = load_section(RedisSettings, "redis", env=env)
    RedisStateStore(settings, namespace="probe:").close()            # TLS + AUTH: accepted
    with pytest.raises(redis.AuthenticationError):
        RedisStateStore(RedisSettings(url=tls_redis.url, ssl_ca_certs=str(tls_redis.ca)))
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        RedisStateStore(RedisSettings(url=tls_redis.url, password=PASSWORD))  # unknown CA

    sim = Simulation(SimConfig(nodes=2, rps=10, seconds=1, seed=3))
    sim.run()
    run = StitchRun.fresh(infra, sim.node_names, partitions=1)
    run.produce(interleaved_frames(sim))
    out = tmp_path / "replay.jsonl"
    done = subprocess.run([WEFT, "replay", "--bootstrap", run.bootstrap, "--topic", run.raw_topic,
                           "--store", "redis", "--out", str(out)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spans = re.search(r"→ (\d+) spans", done.stdout)
    assert spans is not None and int(spans.group(1)) > 0 and out.stat().st_size > 0, done.stdout
    client = redis.Redis.from_url(tls_redis.url, password=PASSWORD, ssl_ca_certs=str(tls_redis.ca))
    assert any(k.startswith(b"replay-") for k in client.scan_iter(count=1000)), "state went elsewhere"


def test_redis_mutual_tls_takes_the_client_certificate_from_env(mtls_redis: TlsRedis) -> None:
    env = {"WEFT_REDIS_URL": mtls_redis.url, "WEFT_REDIS_PASSWORD": PASSWORD,
           "WEFT_REDIS_SSL_CA_CERTS": str(mtls_redis.ca)}
    with pytest.raises(redis.ConnectionError):                       # no client certificate: refused
        RedisStateStore(load_section(RedisSettings, "redis", env=env), namespace="probe:")
    env |= {"WEFT_REDIS_SSL_CERTFILE": str(mtls_redis.client_cert),
            "WEFT_REDIS_SSL_KEYFILE": str(mtls_redis.client_key)}
    RedisStateStore(load_section(RedisSettings, "redis", env=env), namespace="probe:").close()
    with pytest.raises(ConfigError, match=r"ssl_certfile and redis\.ssl_keyfile go together"):
        load_section(RedisSettings, "redis", env={**env, "WEFT_REDIS_SSL_KEYFILE": ""})


def test_kafka_security_settings_reach_every_client(tmp_path: Path) -> None:
    ca = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    env = {"WEFT_KAFKA_BOOTSTRAP": "127.0.0.1:9", "WEFT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
           "WEFT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "WEFT_KAFKA_SASL_USERNAME": "weft",
           "WEFT_KAFKA_SASL_PASSWORD": "s3cret", "WEFT_KAFKA_SSL_CA_LOCATION": str(ca)}
    kafka = load_section(KafkaSettings, "kafka", env=env)
    agent = producer_config(kafka)
    keyed = load_section(KafkaSettings, "kafka", env={**env, "WEFT_KAFKA_SSL_KEY_PASSWORD": "k3y"})
    assert producer_config(keyed)["ssl.key.password"] == "k3y" and "k3y" not in repr(keyed)
    assert {k: agent[k] for k in ("security.protocol", "sasl.mechanism", "sasl.username", "sasl.password",
                                  "ssl.ca.location")} == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "weft",
        "sasl.password": "s3cret", "ssl.ca.location": str(ca)}
    DeadLetterProducer(kafka, timeout_s=0.1)._producer.flush(0)   # librdkafka accepts the settings
    faust_creds = _credentials(kafka)
    assert (faust_creds.mechanism.value, faust_creds.username, faust_creds.password) == (
        "SCRAM-SHA-512", "weft", "s3cret")
    assert faust_creds.ssl_context is not None and faust_creds.ssl_context.get_ca_certs()
    plain_ssl = load_section(KafkaSettings, "kafka", env={**env, "WEFT_KAFKA_SECURITY_PROTOCOL": "SSL",
                                                          "WEFT_KAFKA_SASL_MECHANISM": ""})
    assert _credentials(plain_ssl).context.get_ca_certs()
    assert _credentials(load_section(KafkaSettings, "kafka", env={})) is None


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_otlp_export_over_tls_trusts_only_the_ca_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          protocol: str) -> None:
    """A collector that speaks only TLS, with a certificate from a private CA: the stitcher's
    exporter reaches it with OTEL_EXPORTER_OTLP_CERTIFICATE (the standard variable) even where
    REQUESTS_CA_BUNDLE is set, and without it refuses the server (the spans are counted as
    failed; none is sent in clear)."""
    pki = TestPki.make(tmp_path)
    ca, (cert, key) = pki.ca.cert, pki.server
    sim = Simulation(SimConfig(nodes=2, rps=10, seconds=1, seed=3))
    sim.run()
    spans = rebuild_spans(interleaved_frames(sim), sim.node_names)
    assert spans

    def receiver() -> OtlpReceiver | OtlpHttpReceiver:
        if protocol == "grpc":
            return OtlpReceiver(tls=(cert.read_bytes(), key.read_bytes()))
        return OtlpHttpReceiver(tls=(cert, key))

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "3")       # seconds: bounds the refused case
    # as many base images do: requests would let this bundle replace the collector's CA
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", certifi.where())
    with receiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_CERTIFICATE", str(ca))
        with OtlpSpanExporter(OtlpSettings.from_env()) as exporter:
            exporter.export(spans)
            got = rx.wait_for(len(spans), timeout=30)
        assert sorted(r.span_id for r in got) == sorted(sp.span_id for sp in spans)
        assert (exporter.stats.exported, exporter.stats.failed) == (len(spans), 0)
    with receiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.endpoint)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_CERTIFICATE")
        exporter = OtlpSpanExporter(OtlpSettings.from_env())
        exporter.export(spans)
        exporter.shutdown(timeout_s=60)
        assert (exporter.stats.exported, exporter.stats.failed) == (0, len(spans))
        assert rx.spans == []
