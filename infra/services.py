"""The local infrastructure as one object: the broker and Redis of one run directory.

    infra = LocalInfra.start(Path("run"))          # or reuses the ones already running there
    infra.bootstrap, infra.redis_url, infra.kafka_settings(), infra.redis_settings()
    infra.stop()                                   # stops exactly the pids this call started

Everything listens on 127.0.0.1. The rest of Weft only sees KafkaSettings / RedisSettings, so the
same code runs against a production Kafka cluster and Redis.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import broker, redis_server
from infra.procs import Daemon, InfraError, find_daemon, free_port, read_pid_file, stop_daemon
from weft.config import KafkaSettings, RedisSettings

logger = logging.getLogger(__name__)


def _reuse(run_dir: Path, name: str, wanted_port: int | None) -> Daemon | None:
    """The running daemon `name` of run_dir if there is one; refuse a conflicting port."""
    daemon = find_daemon(run_dir, name)
    if daemon is None:
        return None
    port = int(daemon.facts["port"])
    if wanted_port is not None and wanted_port != port:
        raise InfraError(f"{name} of {run_dir} already runs on port {port} (pid {daemon.pid}), "
                         f"not {wanted_port}: run 'weft infra down' first or use port {port}")
    return daemon


@dataclass
class LocalInfra:
    run_dir: Path
    broker: Daemon
    redis: Daemon
    partitions: int
    redis_password: str = field(default="", repr=False)
    started: tuple[Daemon, ...] = ()  # what this object started (and so stops); reused ones not

    @property
    def broker_port(self) -> int:
        return int(self.broker.facts["port"])

    @property
    def redis_port(self) -> int:
        return int(self.redis.facts["port"])

    @property
    def bootstrap(self) -> str:
        return f"{broker.HOST}:{self.broker_port}"

    @property
    def redis_url(self) -> str:
        return redis_server.redis_url(self.redis_port)

    def kafka_settings(self) -> KafkaSettings:
        return dataclasses.replace(KafkaSettings(), bootstrap=self.bootstrap, partitions=self.partitions)

    def redis_settings(self) -> RedisSettings:
        return dataclasses.replace(RedisSettings(), url=self.redis_url, password=self.redis_password)

    def create_topic(self, name: str, partitions: int | None = None) -> None:
        broker.create_topics(self.bootstrap, {name: partitions or self.partitions})

    @classmethod
    def start(cls, run_dir: Path, *, broker_port: int | None = None, redis_port: int | None = None,
              partitions: int = 4, redis_password: str = "") -> LocalInfra:
        """Start the broker and Redis under run_dir (free ports when None), or reuse the ones
        whose pid files show them running and healthy. Creates the raw and dead-letter topics."""
        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        started: list[Daemon] = []
        with _locked(run_dir):
            return cls._start_locked(run_dir, started, broker_port, redis_port, partitions, redis_password)

    @classmethod
    def _start_locked(cls, run_dir: Path, started: list[Daemon], broker_port: int | None,
                      redis_port: int | None, partitions: int, redis_password: str) -> LocalInfra:
        try:
            kafka = _reuse(run_dir, broker.NAME, broker_port)
            if kafka is not None and not broker.broker_healthy(f"{broker.HOST}:{kafka.facts['port']}"):
                raise InfraError(f"broker pid {kafka.pid} of {run_dir} runs but does not answer; "
                                 f"see {kafka.log_file} or run 'weft infra down'")
            if kafka is None:
                kafka = broker.start_broker(run_dir, broker_port or free_port())
                started.append(kafka)
            rds = _reuse(run_dir, redis_server.NAME, redis_port)
            if rds is not None and not redis_server.redis_healthy(int(rds.facts["port"]), redis_password):
                raise InfraError(f"redis pid {rds.pid} of {run_dir} runs but does not answer PING "
                                 f"(with this password); see {rds.log_file} or run 'weft infra down'")
            if rds is None:
                rds = redis_server.start_redis(run_dir, redis_port or free_port(), password=redis_password)
                started.append(rds)
            infra = cls(run_dir=run_dir, broker=kafka, redis=rds, partitions=partitions,
                        redis_password=redis_password, started=tuple(started))
            defaults = KafkaSettings()
            broker.create_topics(infra.bootstrap, {defaults.raw_topic: partitions,
                                                   defaults.dead_letter_topic: partitions})
        except BaseException:
            for daemon in reversed(started):
                stop_daemon(daemon)
            raise
        for daemon in (kafka, rds):
            how = "started" if daemon in started else "reusing"
            logger.info("%s %s pid %d on port %s", how, daemon.name, daemon.pid, daemon.facts["port"])
        return infra

    def stop(self) -> None:
        """Stop exactly the processes this object started, by pid."""
        for daemon in reversed(self.started):
            stop_daemon(daemon)
        self.started = ()

    @staticmethod
    def down(run_dir: Path) -> list[Daemon]:
        """Stop the services recorded in run_dir's pid files (each only if its pid is still the
        process that was started); returns those stopped. Stale pid files are removed."""
        run_dir = Path(run_dir).resolve()
        if not run_dir.is_dir():
            return []
        stopped = []
        with _locked(run_dir):
            for name in (redis_server.NAME, broker.NAME):
                daemon = read_pid_file(run_dir, name)
                if daemon is not None and stop_daemon(daemon):
                    stopped.append(daemon)
        return stopped

    @staticmethod
    def status(run_dir: Path) -> dict[str, Any]:
        """What runs under run_dir: per service pid, port, health, address and log."""
        run_dir = Path(run_dir).resolve()
        report: dict[str, Any] = {"run_dir": str(run_dir)}
        kafka = find_daemon(run_dir, broker.NAME)
        report[broker.NAME] = _describe(kafka, broker.NAME, run_dir)
        if kafka is not None:
            bootstrap = f"{broker.HOST}:{kafka.facts['port']}"
            report[broker.NAME].update(bootstrap=bootstrap, healthy=broker.broker_healthy(bootstrap))
        rds = find_daemon(run_dir, redis_server.NAME)
        report[redis_server.NAME] = _describe(rds, redis_server.NAME, run_dir)
        if rds is not None:
            port = int(rds.facts["port"])
            # A password-protected Redis answers "NOAUTH" without it: alive is what status reports.
            report[redis_server.NAME].update(url=redis_server.redis_url(port),
                                             healthy=redis_server.redis_healthy(port)
                                             or _answers_noauth(port))
        return report


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    """One `up`/`down` at a time per run directory, so two never start two brokers."""
    with open(run_dir / "infra.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _describe(daemon: Daemon | None, name: str, run_dir: Path) -> dict[str, Any]:
    if daemon is None:
        stale = read_pid_file(run_dir, name)
        return {"running": False, "stale_pid_file": str(stale.pid_file) if stale else None}
    return {"running": True, "pid": daemon.pid, "port": int(daemon.facts["port"]),
            "log": str(daemon.log_file), "pid_file": str(daemon.pid_file)}


def _answers_noauth(port: int) -> bool:
    import redis

    client = redis.Redis(host=redis_server.HOST, port=port, socket_timeout=1.0,
                         retry=redis_server.NO_RETRY)
    try:
        client.ping()
    except redis.AuthenticationError:
        return True
    except redis.RedisError as exc:
        return "NOAUTH" in str(exc)
    finally:
        client.close()
    return True
